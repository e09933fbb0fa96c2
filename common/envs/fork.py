"""PointFork-v0: the lecture's multimodal-demonstration example as a 2-D task with two equally good paths.

Lecture: "What can go wrong in imitation learning? 2. Multimodal demonstration data" ("The data takes two
different actions here! If we use l2 loss, what action will the agent take?") and its answer, "Use
expressive distribution class to fit p(a|s)".

    python -m common.envs.fork                          # the scripted expert's and random actions' statistics
    python -m common.envs.fork --run runs/bc/local-fork-expert-v0/0-...   # a trained policy's paths
    python -m common.build fork                         # the datasets local/fork/{random,medium,expert,...}-v0

The task. A point starts on the axis, at (0, y) with y uniform in [-0.05, 0.05], and must reach the goal
disk (centre (0, 1.7), radius 0.15) within 50 steps without touching the obstacle disk (centre (0, 0.7),
radius 0.4) that stands straight between them. Observation: the position (x, y). Action: a velocity in
[-1, 1]^2; the point moves by 0.2 * action per step (walls at the arena's edges). Reward 1 on reaching the
goal, else 0, so the return is the success indicator (and a dataset's normalised score is 100 x its success
rate over the random one's). Touching the obstacle ends the episode (terminated, return 0). `info` holds
`success`, `collision` and `side`: -1 (left) or +1 (right) once the point has come level with the
obstacle's centre, by the sign of x there; 0 before.

The scripted expert (`ForkExpert`) draws a side at random, 50/50 per episode, and keeps it: it veers that
way at 45 degrees (action 0.8 (side, 1)) until it is 0.55 beside the axis, goes straight up (0, 0.8) past the
obstacle, then heads for the goal at speed 0.8. Its first actions, from start states that tell nothing about
the side, are (-0.8, 0.8) or (+0.8, 0.8) in equal shares: their mean (0, 0.8), which the l2 loss fits,
drives straight into the obstacle two steps ahead. After the first step the two modes' states part, and
between them lies a wedge of states neither mode visits, where an l2 policy interpolates the two modes'
actions and keeps going up (see `rollout_paths` for a figure of the paths). The expert acts inside the
action bounds, so the datasets' action noise is rarely clipped (clipping piles probability onto the bounds,
on which a mixture's components would collapse).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import gymnasium as gym
import numpy as np

DT = 0.2  # position change per step per unit of action
START_HALF_WIDTH = 0.05  # start: x = 0, y uniform in [-0.05, 0.05]
OBSTACLE_CENTER = np.array([0.0, 0.7])
OBSTACLE_RADIUS = 0.4
GOAL = np.array([0.0, 1.7])
GOAL_RADIUS = 0.15
ARENA_LOW = np.array([-1.5, -0.5], dtype=np.float32)  # walls: the position is clipped to the arena
ARENA_HIGH = np.array([1.5, 2.5], dtype=np.float32)
# the expert veers until it is this far beside the axis: the obstacle's radius plus a margin of 0.15
EXPERT_CLEARANCE = OBSTACLE_RADIUS + 0.15
EXPERT_SPEED = 0.8  # the expert's actions stay inside the bounds, so action noise is rarely clipped
EXPERT_PASS_UNTIL = OBSTACLE_CENTER[1] + 0.2  # straight up until this height, then towards the goal
RENDER_SIZE = 300  # frame height and width in pixels: 100 per unit of the 3 x 3 arena
RENDER_FPS = 10  # a 50-step episode plays in 5 s


class PointForkEnv(gym.Env):
    """A point that must pass a round obstacle on the left or the right to reach a goal (see the module)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(self, render_mode: str | None = None):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"PointFork-v0 draws rgb_array frames only, not render_mode={render_mode!r}")
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(ARENA_LOW, ARENA_HIGH, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.position = np.zeros(2)
        self.side = 0
        self.trail = [self.position.copy()]  # the episode's positions so far, drawn by render()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.position = np.array([0.0, self.np_random.uniform(-START_HALF_WIDTH, START_HALF_WIDTH)])
        self.side = 0
        self.trail = [self.position.copy()]
        return self.position.astype(np.float32), self._info(False, False)

    def render(self) -> np.ndarray | None:
        """With render_mode="rgb_array": the arena as a (RENDER_SIZE, RENDER_SIZE, 3) uint8 image (`draw_frame`)."""
        if self.render_mode != "rgb_array":
            gym.logger.warn("PointFork-v0.render() draws only with render_mode='rgb_array' (gym.make(..., "
                            "render_mode='rgb_array'))")
            return None
        return draw_frame(self.position, np.asarray(self.trail))

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        start = self.position
        self.position = np.clip(start + DT * action, ARENA_LOW, ARENA_HIGH)
        self.trail.append(self.position.copy())
        collision = segment_hits_obstacle(start, self.position)
        success = not collision and np.linalg.norm(self.position - GOAL) <= GOAL_RADIUS
        if self.side == 0 and self.position[1] >= OBSTACLE_CENTER[1]:
            self.side = 1 if self.position[0] >= 0 else -1
        return (self.position.astype(np.float32), float(success), bool(success or collision), False,
                self._info(success, collision))

    def _info(self, success: bool, collision: bool) -> dict:
        return {"success": bool(success), "collision": bool(collision), "side": self.side}


def draw_frame(position: np.ndarray, trail: np.ndarray, size: int = RENDER_SIZE) -> np.ndarray:
    """The arena seen from above, (size, size, 3) uint8, y up: the obstacle (grey disk), the goal (green disk),
    the path so far (`trail` (T, 2), light blue) and the point at `position` (dark blue). Pure numpy: no display,
    no drawing library."""
    scale = (size - 1) / (ARENA_HIGH - ARENA_LOW)
    cols = ARENA_LOW[0] + np.arange(size) / scale[0]
    rows = ARENA_HIGH[1] - np.arange(size) / scale[1]  # the top row is the arena's top
    x, y = np.meshgrid(cols, rows)
    frame = np.full((size, size, 3), 250, dtype=np.uint8)

    def disk(center, radius, color) -> None:  # within the disk's bounding box only: a trail has 50 of them
        c0, c1 = np.clip(((center[0] - radius - ARENA_LOW[0]) * scale[0], (center[0] + radius - ARENA_LOW[0])
                          * scale[0] + 2), 0, size).astype(int)
        r0, r1 = np.clip(((ARENA_HIGH[1] - center[1] - radius) * scale[1], (ARENA_HIGH[1] - center[1] + radius)
                          * scale[1] + 2), 0, size).astype(int)
        box = (x[r0:r1, c0:c1] - center[0]) ** 2 + (y[r0:r1, c0:c1] - center[1]) ** 2 <= radius ** 2
        frame[r0:r1, c0:c1][box] = color

    disk(GOAL, GOAL_RADIUS, (90, 180, 90))
    disk(OBSTACLE_CENTER, OBSTACLE_RADIUS, (150, 150, 150))
    for point in np.asarray(trail).reshape(-1, 2):
        disk(point, 0.02, (120, 160, 230))
    disk(position, 0.05, (20, 50, 160))
    return frame


def segment_hits_obstacle(start: np.ndarray, end: np.ndarray) -> bool:
    """Whether the straight move start -> end comes within OBSTACLE_RADIUS of the obstacle's centre."""
    move = end - start
    length2 = float(move @ move)
    t = 0.0 if length2 == 0 else float(np.clip((OBSTACLE_CENTER - start) @ move / length2, 0.0, 1.0))
    return bool(np.linalg.norm(start + t * move - OBSTACLE_CENTER) <= OBSTACLE_RADIUS)


def expert_action(obs: np.ndarray, side: np.ndarray) -> np.ndarray:
    """The scripted expert's action at positions `obs` (..., 2) for sides `side` (...,) in {-1, +1}.

    Veer towards `side` with 0.8 (side, 1) until |x| >= EXPERT_CLEARANCE on that side (while below the pass
    height), then straight up 0.8 (0, 1) until EXPERT_PASS_UNTIL, then at speed 0.8 towards the goal.
    """
    obs = np.asarray(obs, dtype=np.float64)
    side = np.asarray(side, dtype=np.float64)
    x, y = obs[..., 0], obs[..., 1]
    veer = EXPERT_SPEED * np.stack([side, np.ones_like(x)], axis=-1)
    up = EXPERT_SPEED * np.stack([np.zeros_like(x), np.ones_like(x)], axis=-1)
    to_goal = GOAL - obs
    home = EXPERT_SPEED * to_goal / np.maximum(np.linalg.norm(to_goal, axis=-1, keepdims=True), 1e-6)
    below = (y < EXPERT_PASS_UNTIL)[..., None]
    inside = (side * x < EXPERT_CLEARANCE)[..., None]
    return np.where(below & inside, veer, np.where(below, up, home)).astype(np.float32)


class ForkExpert:
    """The scripted expert: a side drawn 50/50 per episode (from its own seeded generator), then
    `expert_action`, plus Gaussian action noise of std `noise` (clipped to the action bounds).

    `reset(n, seed)` starts n episodes (draws n sides; with `seed`, from a generator seeded afresh, so that the
    sides of an episode do not depend on the episodes before it); `expert(obs)` acts on obs (n, 2), or (2,)
    when n = 1. It must be reset at every episode start (common/experts.py's `Expert.reset` does so for
    DAgger): before its first reset it always takes the right-hand side.
    """

    def __init__(self, seed: int = 0, noise: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.noise = noise
        self.sides = np.ones(1)

    def reset(self, n: int = 1, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.sides = self.rng.choice([-1.0, 1.0], size=n)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        sides = self.sides if obs.ndim == 2 else self.sides[0]
        action = expert_action(obs, sides)
        if self.noise > 0:
            action = action + self.noise * self.rng.standard_normal(action.shape)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


def make_expert(seed: int = 0, noise: float = 0.0) -> ForkExpert:
    """The expert as `package.module:factory` loaders want it: `common.envs.fork:make_expert` (e.g.
    `dagger.py --env common.envs.fork:PointFork-v0 --expert common.envs.fork:make_expert`)."""
    return ForkExpert(seed, noise)


def uniform_policy(seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """Uniformly random actions in [-1, 1]^2 (the 'random' behaviour policy), for obs (2,) or (n, 2)."""
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        return rng.uniform(-1.0, 1.0, size=np.shape(obs)).astype(np.float32)

    return act


def rollout_paths(policy: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int = 0,
                  seed_offset: int | None = None) -> list[dict]:
    """Run `episodes` episodes of `policy` (obs (n, 2) -> actions (n, 2)) together; return their paths.

    Env i is reset with seed `seed_offset + seed + i`; by default `seed_offset` is the evaluation offset
    (`common.evaluation.EVAL_SEED_OFFSET`), so the paths are exactly the evaluation episodes of a run with
    this seed and `--eval-episodes episodes` (same start states, same batch rows). A policy with a
    `reset(n)` method (the scripted expert) is reset first. Finished episodes keep their last position in
    the batch and are not stepped. Each returned dict: `path` (T+1, 2) positions, `actions` (T, 2),
    `success`, `collision`, `side` (-1 left, +1 right, 0 never came level with the obstacle), `length`,
    `return`. Plot `path[:, 0]` against `path[:, 1]` with `OBSTACLE_CENTER`, `OBSTACLE_RADIUS`, `GOAL`.
    """
    import common.envs  # noqa: F401  (registers the env id)

    if seed_offset is None:
        from common.evaluation import EVAL_SEED_OFFSET as seed_offset
    envs = [gym.make("PointFork-v0") for _ in range(episodes)]
    obs = np.stack([env.reset(seed=seed_offset + seed + i)[0] for i, env in enumerate(envs)])
    if hasattr(policy, "reset"):
        policy.reset(episodes)
    paths = [[o.copy()] for o in obs]
    actions = [[] for _ in range(episodes)]
    out = [None] * episodes
    while any(o is None for o in out):
        batch_actions = np.asarray(policy(obs), dtype=np.float32).reshape(episodes, 2)
        for i, env in enumerate(envs):
            if out[i] is not None:
                continue
            next_obs, reward, terminated, truncated, info = env.step(batch_actions[i])
            obs[i] = next_obs
            paths[i].append(next_obs.copy())
            actions[i].append(batch_actions[i].copy())
            if terminated or truncated:
                out[i] = {"path": np.asarray(paths[i]), "actions": np.asarray(actions[i]),
                          "success": info["success"], "collision": info["collision"], "side": info["side"],
                          "length": len(actions[i]), "return": float(info["success"])}
    for env in envs:
        env.close()
    return out


def summarize(paths: list[dict]) -> dict:
    """Success rate, the mode coverage (fractions of episodes passing left and right) and collision rate."""
    n = len(paths)
    return {"episodes": n,
            "success_rate": sum(p["success"] for p in paths) / n,
            "left": sum(p["side"] == -1 for p in paths) / n,
            "right": sum(p["side"] == 1 for p in paths) / n,
            "collision_rate": sum(p["collision"] for p in paths) / n,
            "left_success": sum(p["success"] and p["side"] == -1 for p in paths) / n,
            "right_success": sum(p["success"] and p["side"] == 1 for p in paths) / n}


def format_summary(name: str, stats: dict) -> str:
    return (f"{name}: success {stats['success_rate']:.2f}, passed left {stats['left']:.2f} / right "
            f"{stats['right']:.2f} (successful: {stats['left_success']:.2f} / {stats['right_success']:.2f}), "
            f"collisions {stats['collision_rate']:.2f} over {stats['episodes']} episodes")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.envs.fork", description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a trained run directory or checkpoint (of any algorithm file) to roll out")
    parser.add_argument("--episodes", type=int, default=100, help="episodes (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed: env i is reset with "
                        "EVAL_SEED_OFFSET + seed + i, as evaluation does (default 0)")
    parser.add_argument("--save-paths", help="write the paths to this .npz (path_<i>, success, side, collision)")
    args = parser.parse_args(argv)
    from common.errors import UserError

    try:
        if args.run:
            from common.checkpoint import load_checkpoint, load_policy
            from common.errors import fail

            ckpt = load_checkpoint(args.run)
            env = PointForkEnv()
            want = (int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape)), False)
            spec = ckpt.get("spec", {})
            have = (spec.get("obs_dim"), spec.get("act_dim"), spec.get("discrete"))
            if have != want:
                fail(f"--run {args.run} is a {ckpt.get('algo')} run on '{ckpt.get('config', {}).get('env')}' "
                     f"({have[0]}-d observations, {have[1]} {'discrete' if have[2] else '-d'} actions); the fork env "
                     f"has {want[0]}-d observations and {want[1]}-d actions: pass a run trained on local/fork/*")
            # a sampling policy samples (a mixture or a diffusion model takes both sides), seeded with the run's --seed
            policies = {args.run: load_policy(args.run, sample=True)}
        else:
            policies = {"scripted expert": ForkExpert(args.seed), "uniform random actions": uniform_policy(args.seed)}
        for name, policy in policies.items():
            paths = rollout_paths(policy, args.episodes, args.seed)
            print(format_summary(name, summarize(paths)))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.save_paths:
        np.savez(args.save_paths, success=[p["success"] for p in paths], side=[p["side"] for p in paths],
                 collision=[p["collision"] for p in paths], **{f"path_{i}": p["path"] for i, p in enumerate(paths)})
        print(f"wrote {args.save_paths} (the last policy's paths)")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
