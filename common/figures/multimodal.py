"""Figure 5: multimodal demonstrations (lecture: "What can go wrong in imitation learning? 2. Multimodal
demonstration data": "The data takes two different actions here! If we use l2 loss, what action will the
agent take?" ... "Use expressive distribution class to fit p(a|s): e.g. Gaussian mixture, ... diffusion").

The library's two-mode task, PointFork-v0 (`common/envs/fork.py`): a point must pass a round obstacle on the
left or the right to reach a goal straight behind it. The demonstrations are `local/fork/expert-v0` exactly
as `python -m common.build fork` builds it (the builder's own `rollout` of the scripted `ForkExpert`, a side
drawn 50/50 per episode, action noise 0.1, 5,000 steps, about 425 episodes), made in memory. Three of the
library's algorithm files are cloned from them, their Agents built from their own `Config` and fed minibatches
as their `train()` does (observations standardised with the data's statistics, a `TensorSampler`), with the
small settings of their tests (tests/test_bc_expressive.py, tests/test_diffusion_bc.py):
  l2 BC               algorithms/bc.py --policy deterministic: min ||pi(s) - a||^2 learns the mean of the two
                      modes, straight ahead, into the obstacle;
  Gaussian mixture    algorithms/bc_expressive.py --head gmm (5 components; acts with a component's mean,
                      drawn by its weight);
  diffusion BC        algorithms/diffusion_bc.py (DDPM over actions, 100 noise levels, cosine schedule, EMA
                      weights; a fresh reverse process at every step).
Each is rolled out with `fork.rollout_paths` (the evaluation episodes of a run with this seed); `summarize`
gives the success rate and which side each episode passed.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

import common.envs  # noqa: F401  (registers PointFork-v0)
from common.build.episodes import ROLLOUT_SEED_OFFSET, rollout
from common.build.scripted import EXPERT_NOISE, ResetsPolicy
from common.datasets import DataSpec, ObsNormalizer, TensorSampler
from common.envs.fork import (GOAL, GOAL_RADIUS, OBSTACLE_CENTER, OBSTACLE_RADIUS, ForkExpert, make_expert,
                              rollout_paths, summarize)
from common.figures.offline_training import make_agent

SPEC = DataSpec(obs_dim=2, act_dim=2, max_action=1.0, discrete=False)
DATASET = "local/fork/expert-v0"  # whose per-dataset settings the Agents take for fields not set here
DEMO_STEPS = 5_000  # the `fork` preset's dataset size
SEED = 0
BATCH_SIZE, LR = 256, 1e-3
# name -> (algorithm file, gradient steps, hidden layers, Config overrides)
POLICIES: dict[str, tuple[str, int, tuple[int, ...], dict]] = {
    "l2 BC": ("bc", 2_000, (128, 128), {"policy": "deterministic"}),
    "Gaussian mixture BC": ("bc_expressive", 2_000, (128, 128), {"head": "gmm"}),
    "diffusion BC": ("diffusion_bc", 4_000, (128, 128, 128), {}),  # the denoiser needs longer
}
EPISODES = 100  # evaluation rollouts per policy (the numbers); the figure draws the first PLOTTED
PLOTTED = 40


def demonstrations(seed: int = SEED, steps: int = DEMO_STEPS) -> dict:
    """The expert dataset of `python -m common.build fork --seed seed` in memory: `obs`, `actions` (steps, 2)
    and `episodes` (the builder's episode dicts, `observations` (N+1, 2) and `actions` (N, 2) each)."""
    rollout_seed = seed + ROLLOUT_SEED_OFFSET["expert"]
    expert = make_expert(rollout_seed, EXPERT_NOISE)
    env = ResetsPolicy(gym.make("PointFork-v0"), expert)
    episodes, _ = rollout(env, expert, steps, rollout_seed)
    env.close()
    return {"obs": np.concatenate([e["observations"][:-1] for e in episodes]),
            "actions": np.concatenate([e["actions"] for e in episodes]).astype(np.float32), "episodes": episodes}


class ClonedPolicy:
    """A trained Agent as `rollout_paths` wants it: raw obs (n, 2) -> actions (n, 2); `reset` reseeds the
    Agent's sampling generator (as evaluation does before every evaluation)."""

    def __init__(self, agent, normalizer: ObsNormalizer):
        self.agent, self.normalizer = agent, normalizer

    def reset(self, n: int) -> None:
        if hasattr(self.agent, "reset_sampling"):
            self.agent.reset_sampling()

    @torch.no_grad()
    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return self.agent.act(torch.as_tensor(self.normalizer(obs))).numpy()


def clone(name: str, data: dict, seed: int = SEED) -> ClonedPolicy:
    """Train the algorithm file of POLICIES[name] on the demonstrations, in memory."""
    algo, steps, hidden_dims, overrides = POLICIES[name]
    agent = make_agent(algo, seed, hidden_dims, BATCH_SIZE, steps, spec=SPEC, env=DATASET, lr=LR, **overrides)
    normalizer = ObsNormalizer.from_data(data["obs"])
    sampler = TensorSampler({"obs": normalizer(data["obs"]), "actions": data["actions"]}, "cpu", seed)
    for _ in range(steps):
        agent.update(sampler.sample(BATCH_SIZE))
    return ClonedPolicy(agent, normalizer)


def run(episodes: int = EPISODES, seed: int = SEED, names: tuple[str, ...] = tuple(POLICIES)) -> dict:
    """Demonstrations, the cloned policies' rollouts and the demonstrator's own (the scripted expert with its
    action noise, on the same start states): {"data": ..., "paths": {name: rollout_paths(...)}}."""
    torch.set_num_threads(1)
    data = demonstrations(seed)
    paths = {"expert (demonstrator)": rollout_paths(ForkExpert(seed, EXPERT_NOISE), episodes, seed)}
    for name in names:
        paths[name] = rollout_paths(clone(name, data, seed), episodes, seed)
    return {"data": data, "paths": paths}


def first_action_left(data: dict) -> float:
    """Fraction of demonstrations whose first action veers left: the two actions the data takes at the start."""
    return float(np.mean([e["actions"][0, 0] < 0 for e in data["episodes"]]))


def make(path) -> dict:
    """Draw figure 5 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    res = run()
    data = res["data"]
    stats = {name: summarize(p) for name, p in res["paths"].items()}
    colors = {"l2 BC": "#cc0000", "Gaussian mixture BC": "#3d85c6", "diffusion BC": "#38761d"}
    files = {"l2 BC": "bc.py", "Gaussian mixture BC": "bc_expressive.py --head gmm", "diffusion BC": "diffusion_bc.py"}
    fig, axes = plt.subplots(1, 4, figsize=(15, 4.9), sharey=True)

    def arena(ax):
        ax.add_patch(plt.Circle(OBSTACLE_CENTER, OBSTACLE_RADIUS, color="dimgray", alpha=0.6, zorder=3))
        ax.add_patch(plt.Circle(GOAL, GOAL_RADIUS, color="gold", alpha=0.7, zorder=3))
        ax.plot(0, 0, "o", color="black", ms=4, zorder=4)
        ax.set_aspect("equal")
        ax.set_xlim(-1.0, 1.0)
        ax.set_ylim(-0.15, 1.95)

    demos = data["episodes"][:PLOTTED]
    for e in demos:
        side = "#e69138" if e["actions"][0, 0] < 0 else "#8e7cc3"
        axes[0].plot(e["observations"][:, 0], e["observations"][:, 1], color=side, lw=0.8, alpha=0.6)
    arena(axes[0])
    left = first_action_left(data)
    axes[0].set_title(f"demonstrations (local/fork/expert-v0)\n{len(data['episodes'])} episodes: first action "
                      f"left {left:.0%} / right {1 - left:.0%}", fontsize=9)
    for ax, name in zip(axes[1:], POLICIES):
        for e in demos:
            ax.plot(e["observations"][:, 0], e["observations"][:, 1], color="lightgray", lw=0.6, zorder=1)
        for p in res["paths"][name][:PLOTTED]:
            ax.plot(p["path"][:, 0], p["path"][:, 1], color=colors[name], lw=1.0, alpha=0.6, zorder=2)
            if p["collision"]:
                ax.plot(*p["path"][-1], "x", color="black", ms=5, zorder=5)
        arena(ax)
        s = stats[name]
        ax.set_title(f"{name} ({files[name]})\nsuccess {s['success_rate']:.0%} (left {s['left_success']:.0%} + right "
                     f"{s['right_success']:.0%}), collisions {s['collision_rate']:.0%}", fontsize=9)
    fig.suptitle("Multimodal demonstrations: half pass the obstacle on the left, half on the right. The l2 policy "
                 "averages the two modes into the obstacle (x: collision); the mixture and the diffusion policy "
                 "go around it on both sides", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"episodes": EPISODES, "demonstrations": len(data["episodes"]), "demonstrations: first action left": left,
            **stats}
