"""Small Gymnasium environments for the lecture's examples (tools, like common/build; algorithm files never
import them: a dataset's stored env spec names the entry point, and `gym.make` imports it).

    python -m common.envs.fork               # the two-mode fork: the scripted expert's paths and success rate

fork.py      PointFork-v0: a 2-D point passes an obstacle on the left or the right to reach a goal; a scripted
             expert picks either side at random (the lecture's "Multimodal demonstration data" slide).
pendulum.py  a scripted Pendulum-v1 swing-up expert (the tests' datasets, the compounding-error experiment,
             the figures, and a ready `dagger.py --expert common.envs.pendulum:scripted_pendulum_expert`).

Importing this package registers the env ids, so `gym.make("PointFork-v0")` works after `import common.envs`;
a dataset's stored EnvSpec (entry point `common.envs.fork:PointForkEnv`) works in any process whose path holds
the repository root, as every algorithm file's does.
"""

import gymnasium as gym

FORK_ENV_ID = "PointFork-v0"
FORK_MAX_EPISODE_STEPS = 50  # the expert needs about 12 steps; a wandering policy runs out of time

if FORK_ENV_ID not in gym.registry:
    gym.register(FORK_ENV_ID, entry_point="common.envs.fork:PointForkEnv",
                 max_episode_steps=FORK_MAX_EPISODE_STEPS)
