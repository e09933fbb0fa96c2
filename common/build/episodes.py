"""Episodes as the dataset builders make them: rollouts of a policy, their checksum, Minari's shapes, progress.

Shared by the D4RL recipe (`common/build/recipe.py`) and the scripted-expert builder
(`common/build/scripted.py`), so that neither imports the other's module for them.
"""

from __future__ import annotations

import hashlib
import sys
import time
from typing import Callable, Sequence

import gymnasium as gym
import numpy as np

MEDIUM_FRACTION = 1 / 3  # D4RL: medium is "about 1/3 of the expert's" return, measured from random
MEDIUM_RATIO_BAND = (0.15, 0.6)  # a re-measured medium ratio outside this band is refused (D4RL's is ~1/3)
ROLLOUT_SEED_OFFSET = {"random": 1, "medium": 2, "expert": 3}
REFERENCE_SEED_OFFSET = 4  # sampling seed of the behaviour policies' reference evaluations


class ProgressBar:
    """One progress line on stderr: done/total, steps/s and ETA; redrawn in place on a terminal, a new
    line every 15 s otherwise (logs). The rate counts only steps made since the first update (a resumed
    run does not count the steps it restored)."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.tty = sys.stderr.isatty()
        self.interval = 0.25 if self.tty else 15.0
        self.first: tuple[int, float] | None = None
        self.last_draw = 0.0
        self.done, self.note = 0, ""

    def rate(self) -> float:
        if self.first is None:
            return 0.0
        elapsed = time.perf_counter() - self.first[1]
        return (self.done - self.first[0]) / elapsed if elapsed > 0 else 0.0

    def __call__(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
            self.last_draw = now
        self.done, self.note = done, note
        if now - self.last_draw >= self.interval:
            self.last_draw = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"{self.label:<22} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{rate:,.0f} steps/s eta {eta:,.0f} s  {self.note}")
        if self.tty:
            print(f"\r{line:<120}", end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> float:
        """Draw the final line; return the measured steps/s."""
        self._draw(end="\n")
        return self.rate()


def dataset_checksum(episodes: Sequence, action_start: int = 0) -> str:
    """sha256 of a dataset's arrays in the form `common.datasets.load_dataset` returns them.

    `episodes`: dicts or `Episode` objects with observations (N+1, ...), actions, rewards, terminations,
    truncations. Canonical form per episode, in order: observations float32 (N+1, obs_dim), actions
    float32 (N, act_dim) or, for discrete actions, int64 (N,) minus `action_start`, rewards float32,
    terminations and truncations bool; each array's shape is hashed with its bytes.
    """
    digest = hashlib.sha256()
    for ep in episodes:
        get = ep.__getitem__ if isinstance(ep, dict) else ep.__getattribute__
        obs = np.asarray(get("observations"), dtype=np.float32)
        actions = np.asarray(get("actions"))
        n = len(actions)
        if np.issubdtype(actions.dtype, np.integer):
            actions = actions.astype(np.int64).reshape(n) - action_start
        else:
            actions = actions.astype(np.float32).reshape(n, -1)
        arrays = (obs.reshape(len(obs), -1), actions, np.asarray(get("rewards"), dtype=np.float32),
                  np.asarray(get("terminations"), dtype=bool), np.asarray(get("truncations"), dtype=bool))
        for arr in arrays:
            arr = np.ascontiguousarray(arr)
            digest.update(repr(arr.shape).encode())
            digest.update(arr.tobytes())
    return digest.hexdigest()


def rollout(env: gym.Env, act: Callable, budget: int, seed: int,
            progress: Callable[[int], None] | None = None) -> tuple[list[dict], bool]:
    """Run the policy `act(obs) -> action` for exactly `budget` env steps, as whole episodes.

    The env is reset with `seed` once, then continues its own RNG. Returns the episodes (dicts with flat
    float32 `observations` (N+1, obs_dim), `actions`, `rewards` (N,) float32, `terminations`,
    `truncations` (N,) bool) and whether the last episode was cut at the budget (then marked truncated).
    """
    episodes, steps, cut = [], 0, False
    obs, _ = env.reset(seed=seed)
    while steps < budget:
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        while True:
            action = act(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            steps += 1
            if steps >= budget and not (terminated or truncated):
                truncated = cut = True  # the budget ends this episode
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            if progress is not None:
                progress(steps)
            if terminated or truncated:
                break
        episodes.append({"observations": np.stack([np.asarray(o, np.float32).reshape(-1) for o in observations]),
                         "actions": np.asarray(actions), "rewards": np.asarray(rewards, np.float32),
                         "terminations": np.asarray(terminations, bool),
                         "truncations": np.asarray(truncations, bool)})
        if steps < budget:
            obs, _ = env.reset()
    return episodes, cut


def returns_of(episodes: Sequence[dict]) -> np.ndarray:
    return np.array([float(np.sum(e["rewards"], dtype=np.float64)) for e in episodes])


def to_minari(episode: dict, obs_space: gym.Space, act_space: gym.Space) -> dict:
    """An episode in the env's own shapes and dtypes, as `save_episodes` writes it."""
    n = len(episode["rewards"])
    out = dict(episode)
    out["observations"] = episode["observations"].reshape(n + 1, *obs_space.shape).astype(obs_space.dtype)
    if isinstance(act_space, gym.spaces.Discrete):
        out["actions"] = np.asarray(episode["actions"], np.int64).reshape(n)
    else:
        out["actions"] = np.asarray(episode["actions"]).reshape(n, *act_space.shape).astype(act_space.dtype)
    return out
