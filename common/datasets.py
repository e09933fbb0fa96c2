"""Offline datasets: name resolution, Minari loading and writing, the two views, and the device sampler.

Names accepted by every algorithm's `--env`:
  * D4RL names (`halfcheetah-medium-v2`, `antmaze-umaze-v2`, `pen-human-v1`, ...), mapped to their Minari
    counterparts by `D4RL_TO_MINARI` below. Every mapping is a name-only match (Minari regenerated or
    ported the data on newer environment versions), so a one-line note is printed. D4RL names without a
    Minari counterpart (random, medium-replay, medium-expert, full-replay) raise an error that points to
    the local builder (`python -m common.build`).
  * Any Minari id `namespace/name-vN`, found under the Minari root (`$MINARI_DATASETS_PATH`, else
    `~/.minari/datasets`) or downloaded from Minari's remote when online. Locally built datasets use the
    namespace `local/` (`local/pendulum/medium-v0`), which no remote dataset uses.

Two views of a dataset (both built from whole episodes, every step kept):
  * `OfflineDataset.transitions()`: flat arrays obs, actions, rewards, next_obs, terminals. `terminals`
    comes from terminations only: a truncation (time limit) is never terminal, so TD targets bootstrap
    through it.
  * `OfflineDataset.episodes`: `Episode` objects with N+1 observations for N actions, returns,
    returns-to-go and timesteps, for sequence and filtered methods.

Dict observations (antmaze, pointmaze, kitchen) are flattened by `flatten_observation`: the leaves are
concatenated in the Dict space's key order, recursively. Gymnasium sorts plain-dict keys, so for the mazes
the order is `achieved_goal, desired_goal, observation`; this is the order of `gymnasium.spaces.flatten`.

Run `python -m common.datasets --list` to see what is available locally.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence
from urllib.parse import urlparse

import gymnasium as gym
import numpy as np
import torch

from common.errors import UserError, fail

# --------------------------------------------------------------------------------------------------
# Name tables
# --------------------------------------------------------------------------------------------------

# D4RL's reference scores (d4rl/infos.py): normalised score = 100 * (R - min) / (max - min).
D4RL_REFERENCE_SCORES: dict[str, tuple[float, float]] = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "pen": (96.262799, 3076.8331),
    "door": (-56.512833, 2880.5693),
    "hammer": (-274.856578, 12794.134825),
    "relocate": (-6.425911, 4233.877797),
    "kitchen": (0.0, 4.0),
    "maze2d-umaze": (23.85, 161.86),
    "maze2d-medium": (13.13, 277.39),
    "maze2d-large": (6.7, 273.99),
    "maze2d-umaze-dense": (68.537689, 193.66),
    "maze2d-medium-dense": (44.264742, 297.46),
    "maze2d-large-dense": (30.569041, 303.49),
}

LOCOMOTION = ("halfcheetah", "hopper", "walker2d", "ant")
LOCAL_PRESET_HINT = "python -m common.build {preset}"


@dataclass(frozen=True)
class D4RLEntry:
    """What a D4RL name maps to: a Minari id (or None when Minari has no counterpart) and why."""

    d4rl_name: str
    minari_id: str | None
    note: str
    reference_key: str


def _build_d4rl_table() -> dict[str, D4RLEntry]:
    table: dict[str, D4RLEntry] = {}
    for env in LOCOMOTION:
        for quality in ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay"):
            for version in ("v0", "v1", "v2"):
                name = f"{env}-{quality}-{version}"
                if quality in ("medium", "expert"):
                    target = f"mujoco/{env}/{quality}-v0"
                    note = (f"'{name}' has no exact Minari copy; using '{target}' (Gymnasium v5 env, other "
                            f"behaviour policy; Minari's medium is stronger than D4RL's), scored with D4RL's "
                            f"reference scores")
                    table[name] = D4RLEntry(name, target, note, env)
                else:
                    note = (f"D4RL's '{name}' has no Minari counterpart (Minari's mujoco/ datasets have only "
                            f"simple, medium and expert). Build a local D4RL-recipe copy with "
                            f"`{LOCAL_PRESET_HINT.format(preset=env)}` and use "
                            f"--env local/{env}/{quality}-v0")
                    table[name] = D4RLEntry(name, None, note, env)
    for maze in ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse"):
        for version in ("v0", "v1", "v2"):
            name = f"antmaze-{maze}-{version}"
            target = f"D4RL/antmaze/{maze}-v1"
            table[name] = D4RLEntry(name, target, f"'{name}' -> '{target}' (Minari's regeneration on "
                                    f"Gymnasium-Robotics AntMaze; env version differs from D4RL's)", "antmaze")
    for maze in ("umaze", "medium", "large", "umaze-dense", "medium-dense", "large-dense"):
        for version in ("v0", "v1"):
            name = f"maze2d-{maze}-{version}"
            target = f"D4RL/pointmaze/{maze}-v2"
            table[name] = D4RLEntry(name, target, f"'{name}' -> '{target}' (Minari's regeneration on "
                                    f"Gymnasium-Robotics PointMaze; env version differs from D4RL's)",
                                    f"maze2d-{maze}")
    for env in ("pen", "door", "hammer", "relocate"):
        for quality in ("human", "cloned", "expert"):
            for version in ("v0", "v1"):
                name = f"{env}-{quality}-{version}"
                target = f"D4RL/{env}/{quality}-v2"
                table[name] = D4RLEntry(name, target, f"'{name}' -> '{target}' (Minari's port on "
                                        f"Gymnasium-Robotics Adroit; env version differs from D4RL's)", env)
    for quality in ("complete", "partial", "mixed"):
        for version in ("v0", "v1"):
            name = f"kitchen-{quality}-{version}"
            target = f"D4RL/kitchen/{quality}-v2"
            table[name] = D4RLEntry(name, target, f"'{name}' -> '{target}' (Minari's port on "
                                    f"Gymnasium-Robotics Kitchen; env version differs from D4RL's)", "kitchen")
    return table


D4RL_TO_MINARI: dict[str, D4RLEntry] = _build_d4rl_table()

MINARI_ID_PATTERN = re.compile(r"^(?:[\w.-]+/)*[\w.-]+-v\d+$")


def minari_root() -> Path:
    """The Minari storage root: `$MINARI_DATASETS_PATH`, else `~/.minari/datasets`."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root) if root else Path.home() / ".minari" / "datasets"


def stored_env_id(minari_id: str) -> str | None:
    """The id of the env a locally stored dataset came from (its eval env spec, else its env spec), read from its
    metadata without loading the data; None when the dataset is not stored here or names no env."""
    path = minari_root() / minari_id / "data" / "metadata.json"
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for key in ("eval_env_spec", "env_spec"):
        spec = metadata.get(key)
        try:
            env_id = json.loads(spec).get("id") if isinstance(spec, str) else (spec or {}).get("id")
        except (ValueError, AttributeError):
            env_id = None
        if env_id:
            return env_id
    return None


def local_dataset_ids() -> list[str]:
    """Ids of every Minari dataset stored under the Minari root (a folder `<root>/<id>/data/`)."""
    root = minari_root()
    if not root.is_dir():
        return []
    ids = []
    for metadata in root.glob("**/data/metadata.json"):
        rel = metadata.parent.parent.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # unfinished builds live in hidden folders
        ids.append(rel.as_posix())
    return sorted(ids)


def known_names() -> list[str]:
    """Every name `--env` knows without the network: D4RL names, their Minari targets, local ids."""
    targets = {e.minari_id for e in D4RL_TO_MINARI.values() if e.minari_id}
    return sorted(set(D4RL_TO_MINARI) | targets | set(local_dataset_ids()))


def suggest(name: str, n: int = 3) -> list[str]:
    """The `n` known names closest to `name` (difflib ratio), best first."""
    return difflib.get_close_matches(name, known_names(), n=n, cutoff=0.5)


@dataclass(frozen=True)
class ResolvedName:
    """A user's `--env` resolved to a Minari id, with the note to print and the reference scores to use."""

    requested: str
    minari_id: str
    note: str | None
    d4rl_reference: tuple[float, float] | None


def resolve_name(name: str) -> ResolvedName:
    """Map a D4RL name or a Minari id to a Minari id; raise `UserError` with suggestions otherwise."""
    name = name.strip()
    if name in D4RL_TO_MINARI:
        entry = D4RL_TO_MINARI[name]
        if entry.minari_id is None:
            fail(entry.note)
        return ResolvedName(name, entry.minari_id, entry.note, D4RL_REFERENCE_SCORES[entry.reference_key])
    if MINARI_ID_PATTERN.match(name) and "/" in name:
        return ResolvedName(name, name, None, None)
    close = suggest(name)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    if "/" in name and not re.search(r"-v\d+$", name):
        hint += " (Minari ids end in a version, e.g. 'local/pendulum/medium-v0')"
    fail(f"unknown dataset '{name}'{hint} (`python -m common.datasets --list` shows local datasets)")


# --------------------------------------------------------------------------------------------------
# Observations
# --------------------------------------------------------------------------------------------------


def flatten_observation(obs: Any, space: gym.Space) -> np.ndarray:
    """Flatten one observation or a batch of them to float32 `(..., obs_dim)`.

    Box: reshaped to `(batch..., prod(shape))` relative to `space.shape`. Dict: leaves concatenated in the
    space's key order (recursively). Works on single observations and on leading batch dimensions alike.
    """
    if isinstance(space, gym.spaces.Dict):
        parts = [flatten_observation(obs[key], sub) for key, sub in space.spaces.items()]
        return np.concatenate(parts, axis=-1)
    if isinstance(space, gym.spaces.Box):
        arr = np.asarray(obs, dtype=np.float32)
        lead = arr.shape[: arr.ndim - len(space.shape)]
        return arr.reshape(*lead, int(np.prod(space.shape, dtype=np.int64)))
    if isinstance(space, gym.spaces.Discrete):
        arr = np.asarray(obs, dtype=np.int64) - space.start
        return np.eye(space.n, dtype=np.float32)[arr]
    fail(f"unsupported observation space {space} (supported: Box, Discrete, and Dict of these)")


def flat_dim(space: gym.Space) -> int:
    """Size of `flatten_observation`'s output for `space`."""
    if isinstance(space, gym.spaces.Dict):
        return sum(flat_dim(s) for s in space.spaces.values())
    if isinstance(space, gym.spaces.Box):
        return int(np.prod(space.shape, dtype=np.int64))
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    fail(f"unsupported observation space {space} (supported: Box, Discrete, and Dict of these)")


class ObsNormalizer:
    """Per-dimension standardisation `(s - mean) / std`, with `std + eps` (TD3+BC: eps = 1e-3).

    Statistics come from the dataset's observations and are saved in checkpoints, so that evaluation and
    a reloaded policy see observations exactly as training did.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    @classmethod
    def from_data(cls, obs: np.ndarray, eps: float = 1e-3) -> "ObsNormalizer":
        return cls(obs.mean(axis=0), obs.std(axis=0) + eps)

    @classmethod
    def identity(cls, dim: int) -> "ObsNormalizer":
        return cls(np.zeros(dim, np.float32), np.ones(dim, np.float32))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        return ((obs - self.mean) / self.std).astype(np.float32)

    def state_dict(self) -> dict:
        """mean and std as tensors (a checkpoint holds tensors and plain values only)."""
        return {"mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ObsNormalizer":
        """From `state_dict()`'s tensors, or the numpy arrays of checkpoints of format 1."""
        def array(value):
            return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

        return cls(array(state["mean"]), array(state["std"]))


# --------------------------------------------------------------------------------------------------
# Episodes and the dataset
# --------------------------------------------------------------------------------------------------


def discounted_returns_to_go(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """G_t = sum_{k >= t} gamma^(k - t) r_k within one episode, shape `(N,)`, float64 accumulation."""
    out = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out.astype(np.float32)


@dataclass
class Episode:
    """One whole episode: `observations` has N+1 rows (the final observation included), the rest N."""

    observations: np.ndarray  # (N+1, obs_dim) float32, flattened
    actions: np.ndarray  # (N, act_dim) float32, or (N,) int64 for discrete actions
    rewards: np.ndarray  # (N,) float32
    terminations: np.ndarray  # (N,) bool
    truncations: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def total_return(self) -> float:
        return float(np.sum(self.rewards, dtype=np.float64))

    def returns_to_go(self, gamma: float = 1.0) -> np.ndarray:
        """R_t = sum_{k >= t} gamma^(k-t) r_k, shape (N,)."""
        return discounted_returns_to_go(self.rewards, gamma)

    @property
    def timesteps(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)


RewardTransform = Literal["none", "return-range", "minus-one"]


@dataclass(frozen=True)
class DataSpec:
    """What a network needs to know about a dataset: sizes, action bound, discrete or not."""

    obs_dim: int
    act_dim: int  # Box: action size; Discrete: number of actions
    max_action: float  # largest |bound| of a Box action space (1.0 for Discrete)
    discrete: bool


@dataclass
class OfflineDataset:
    """A loaded dataset: episodes, spaces, reference scores and how to build its evaluation env."""

    name: str
    minari_id: str
    episodes: list[Episode]
    observation_space: gym.Space
    action_space: gym.Space
    eval_env_spec: Any  # gymnasium EnvSpec (or None when the dataset stores none)
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    ref_source: str | None = None  # "D4RL table" or "Minari metadata"; None: raw returns only
    note: str | None = None
    metadata: dict = field(default_factory=dict)

    # --- spaces -------------------------------------------------------------------------------
    @property
    def obs_dim(self) -> int:
        return flat_dim(self.observation_space)

    @property
    def discrete(self) -> bool:
        return isinstance(self.action_space, gym.spaces.Discrete)

    @property
    def act_dim(self) -> int:
        """Action size: Box dims, or the number of actions for Discrete."""
        if self.discrete:
            return int(self.action_space.n)
        return int(np.prod(self.action_space.shape))

    @property
    def max_action(self) -> float:
        """Largest |action| bound (continuous); policies output tanh(.) * max_action."""
        if self.discrete:
            return 1.0
        return float(np.max(np.abs(np.concatenate([self.action_space.low.ravel(),
                                                    self.action_space.high.ravel()]))))

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.obs_dim, self.act_dim, self.max_action, self.discrete)

    @property
    def num_steps(self) -> int:
        return sum(len(e) for e in self.episodes)

    # --- views ----------------------------------------------------------------------------------
    def transitions(self, reward_transform: RewardTransform = "none",
                    returns_to_go_gamma: float | None = None) -> dict[str, np.ndarray]:
        """Flat transitions from whole episodes, every step kept.

        Returns a dict of arrays with N_total rows: `obs`, `next_obs` (float32, obs_dim), `actions`
        (float32 act_dim, or int64 for discrete), `rewards` (float32, after `reward_transform`),
        `terminals` (float32; 1 only where the env terminated, never on truncation), `timeouts` (float32),
        and, when `returns_to_go_gamma` is given, `returns_to_go` (discounted Monte Carlo return from each
        step to its episode's end, on the transformed rewards; never crossing episodes).
        """
        scale, shift = self.reward_affine(reward_transform)
        obs, next_obs, actions, rewards, terminals, timeouts, rtg = [], [], [], [], [], [], []
        for ep in self.episodes:
            obs.append(ep.observations[:-1])
            next_obs.append(ep.observations[1:])
            actions.append(ep.actions)
            r = ep.rewards.astype(np.float32) * scale + shift
            rewards.append(r)
            terminals.append(ep.terminations.astype(np.float32))
            timeouts.append(ep.truncations.astype(np.float32))
            if returns_to_go_gamma is not None:
                rtg.append(discounted_returns_to_go(r, returns_to_go_gamma))
        out = {
            "obs": np.concatenate(obs).astype(np.float32),
            "next_obs": np.concatenate(next_obs).astype(np.float32),
            "actions": np.concatenate(actions),
            "rewards": np.concatenate(rewards).astype(np.float32),
            "terminals": np.concatenate(terminals),
            "timeouts": np.concatenate(timeouts),
        }
        if returns_to_go_gamma is not None:
            out["returns_to_go"] = np.concatenate(rtg)
        return out

    def reward_affine(self, reward_transform: RewardTransform) -> tuple[float, float]:
        """(scale, shift) so that the transformed reward is `r * scale + shift`.

        - "none": r.
        - "return-range" (IQL / CORL locomotion): r * 1000 / (max episode return - min episode return).
        - "minus-one" (IQL / CQL antmaze): r - 1.
        """
        if reward_transform == "none":
            return 1.0, 0.0
        if reward_transform == "minus-one":
            return 1.0, -1.0
        if reward_transform == "return-range":
            returns = [e.total_return for e in self.episodes]
            spread = max(returns) - min(returns)
            if spread <= 0:
                fail(f"--reward-transform return-range needs episodes with different returns; all of "
                     f"'{self.name}' return {returns[0]:.3f}")
            return 1000.0 / spread, 0.0
        fail(f"unknown reward transform '{reward_transform}' (none, return-range, minus-one)")

    def top_episodes(self, fraction: float, discount: float = 1.0,
                     count: Literal["round", "floor"] = "round") -> "OfflineDataset":
        """A copy holding only the best `fraction` of episodes (filtered BC; at least one episode).

        Episodes are ranked by their return sum_t discount^t r_t (discount 1: the undiscounted return) and
        `round(fraction * n)` of them are kept (`count="floor"`: `int(fraction * n)`, as CORL's BC-x%).
        """
        if not 0.0 < fraction <= 1.0:
            fail(f"--top-fraction must be in (0, 1], got {fraction}")
        if not 0.0 < discount <= 1.0:
            fail(f"the ranking discount must be in (0, 1], got {discount}")
        returns = [e.total_return if discount == 1.0 else float(e.returns_to_go(discount)[0])
                   for e in self.episodes]
        order = np.argsort([-r for r in returns], kind="stable")
        raw = fraction * len(self.episodes)
        keep = max(1, int(round(raw)) if count == "round" else int(raw))
        chosen = [self.episodes[i] for i in sorted(order[:keep])]
        return OfflineDataset(**{**self.__dict__, "episodes": chosen})

    # --- scores and evaluation env ------------------------------------------------------------
    def normalized_score(self, returns: np.ndarray | float) -> np.ndarray | None:
        """100 * (R - ref_min) / (ref_max - ref_min), or None when the dataset has no reference scores."""
        if self.ref_min_score is None or self.ref_max_score is None:
            return None
        return 100.0 * (np.asarray(returns, dtype=np.float64) - self.ref_min_score) / (
            self.ref_max_score - self.ref_min_score)

    def make_env(self, render_mode: str | None = None) -> gym.Env:
        """One evaluation environment, rebuilt from the dataset's stored eval env spec (`render_mode`: e.g.
        "rgb_array" for an env that draws video frames; None: the spec's own, normally no rendering)."""
        if self.eval_env_spec is None:
            fail(f"dataset '{self.minari_id}' stores no environment spec: it cannot be evaluated")
        try:
            return gym.make(self.eval_env_spec, **({"render_mode": render_mode} if render_mode else {}))
        except Exception as err:  # missing extra (mujoco, gymnasium-robotics), unknown id...
            env_id = getattr(self.eval_env_spec, "id", self.eval_env_spec)
            fail(f"cannot create the evaluation env '{env_id}' of '{self.minari_id}': "
                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    def summary(self) -> str:
        returns = np.array([e.total_return for e in self.episodes])
        return (f"{self.minari_id}: {len(self.episodes)} episodes, {self.num_steps} steps, "
                f"return mean {returns.mean():.1f} (min {returns.min():.1f}, max {returns.max():.1f})")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _remote_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether Minari's remote (Hugging Face hub) answers a TCP connect within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False, "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants
    except ImportError:
        return False, "huggingface_hub is not installed (pip install 'minari[hf]')"
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True, ""
    except OSError as err:
        return False, f"no network ({type(err).__name__})"


LOCAL_QUALITIES = ("random", "medium", "medium-replay", "expert", "medium-expert")  # what the builder writes


def _local_parts(minari_id: str) -> tuple[str, str] | None:
    """(name, quality) of a local id `local/<name>/<quality>-vN`, or None for other ids."""
    parts = minari_id.split("/")
    if len(parts) != 3 or parts[0].lower() != "local":
        return None
    return parts[1], re.sub(r"-v\d+$", "", parts[2])


def _missing_message(minari_id: str, why: str) -> str:
    """Why `minari_id` is not there and what to do: a close name (case, typos), or how to build/download."""
    stored = local_dataset_ids()
    same_but_case = [i for i in stored + known_names() if i.lower() == minari_id.lower() and i != minari_id]
    if same_but_case:
        return f"dataset '{minari_id}' does not exist; did you mean '{same_but_case[0]}'? (ids are case-sensitive)"
    local = _local_parts(minari_id)
    if local is not None:
        name, quality = local
        if quality not in LOCAL_QUALITIES:
            close = difflib.get_close_matches(quality.lower(), LOCAL_QUALITIES, n=1, cutoff=0.5)
            fix = f"; did you mean 'local/{name}/{close[0]}-v0'?" if close else ""
            return (f"'{minari_id}' names no local quality '{quality}' (the builder writes "
                    f"{', '.join(LOCAL_QUALITIES)}){fix}")
        built_names = sorted({i.split("/")[1] for i in stored if i.startswith("local/")})
        for close_name in difflib.get_close_matches(name, built_names, n=3, cutoff=0.75):
            candidate = f"local/{close_name}/{quality}-v0"
            if candidate in stored:
                return f"local dataset '{minari_id}' is not built under {minari_root()}; did you mean '{candidate}'?"
        built = sorted({i.split("/")[1] for i in stored if i.startswith(f"local/{name}/")})
        if built:
            return (f"local dataset '{minari_id}' is not built under {minari_root()}, but other qualities of "
                    f"'{name}' are: build it with `python -m common.build <env or preset> --name {name} "
                    f"--qualities {quality} --skip-existing`, the same command that built the others")
        return (f"local dataset '{minari_id}' is not built under {minari_root()}; build it with "
                f"`{LOCAL_PRESET_HINT.format(preset=name)}` for a preset, or `python -m common.build <env id> "
                f"--name {name}` (or `make datasets` for the default suites)")
    close = suggest(minari_id)
    hint = f" Known names close to it: {', '.join(close)}." if close else ""
    return (f"dataset '{minari_id}' is not in the local Minari root ({minari_root()}) and cannot be "
            f"downloaded: {why}.{hint} Download it on a connected machine with `minari download {minari_id}` "
            f"and copy it there, or build a local D4RL-recipe dataset (`python -m common.build --help`)")


EMBEDDED_PRESET = "pendulum"  # the embedded default suite: built on first use, offline, in a few minutes


def _build_embedded_default(minari_id: str) -> None:
    """Build `local/pendulum/*` on first use, so the default `--env` works on a fresh machine.

    The one seam between this core and the dataset builder: the builder runs as a command,
    `python -m common.build pendulum --skip-existing`, in a child process (its progress shows in this
    terminal), so the core imports no tool. A copy of the library without `common/build/` gets one line
    saying what to copy or build."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "common" / "build" / "__main__.py").is_file():
        fail(f"'{minari_id}' is part of the embedded default suite and is not built, and the dataset builder "
             f"(common/build/) is not in {root / 'common'}: copy the whole common/ folder, or build the suite where "
             f"the builder is and point MINARI_DATASETS_PATH at it")
    print(f"'{minari_id}' is part of the embedded default suite and is not built yet: building "
          f"local/{EMBEDDED_PRESET}/* now (a few minutes on one core; `make datasets` does the same)",
          file=sys.stderr, flush=True)
    # -P: the current directory is not put first on the path, so this copy's common/ (first on PYTHONPATH) is the
    # one that runs, even where the user's own project has a package named common
    command = [sys.executable, "-P", "-m", "common.build", EMBEDDED_PRESET, "--skip-existing"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if subprocess.run(command, env=env).returncode != 0:
        fail(f"building the embedded default suite failed; run `{LOCAL_PRESET_HINT.format(preset=EMBEDDED_PRESET)}` "
             f"to see why")


def _open_minari(minari_id: str, download: bool):
    import minari

    path = minari_root() / minari_id / "data"
    if not path.is_dir() and minari_id.startswith(f"local/{EMBEDDED_PRESET}/") and \
            minari_id.split("/")[-1].rsplit("-v", 1)[0] in ("random", "medium", "medium-replay", "expert",
                                                              "medium-expert"):
        _build_embedded_default(minari_id)
    if not path.is_dir():
        if minari_id.lower().startswith(("local/", "test/")) or \
                any(i.lower() == minari_id.lower() for i in local_dataset_ids()):
            fail(_missing_message(minari_id, "the local/ and test/ namespaces exist only where they were built"))
        if not download:
            fail(_missing_message(minari_id, "downloads are off (--no-download)"))
        ok, why = _remote_reachable()
        if not ok:
            fail(_missing_message(minari_id, why))
        print(f"downloading {minari_id} from Minari's remote ...", file=sys.stderr, flush=True)
        try:
            minari.download_dataset(minari_id)
        except Exception as err:  # huggingface_hub raises requests/httpx errors, not always OSError
            close = suggest(minari_id)
            hint = f"; known names close to it: {', '.join(close)}" if close else ""
            fail(f"could not download '{minari_id}': {type(err).__name__}: "
                 f"{str(err).splitlines()[0] if str(err) else ''}{hint}")
    try:
        return minari.load_dataset(minari_id)
    except Exception as err:
        fail(f"could not read dataset '{minari_id}' at {path}: {type(err).__name__}: {err}")


def check_finite(dataset_id: str, episode_id: Any, arrays: dict[str, np.ndarray]) -> None:
    """`UserError` naming the key, episode and step of the first NaN or infinite value in `arrays`.

    Row i of `observations` is the observation at step i (N+1 rows); of `actions` and `rewards`, step i.
    """
    for key, array in arrays.items():
        if array.dtype.kind != "f":
            continue
        flat = array.reshape(len(array), -1)
        bad_rows = ~np.isfinite(flat).all(axis=1)
        if bad_rows.any():
            step = int(np.argmax(bad_rows))
            fail(f"dataset '{dataset_id}' episode {episode_id} step {step}: {key} holds "
                 f"{'NaN' if np.isnan(flat[step]).any() else 'an infinite value'}; training on it would diverge "
                 f"(clean or rebuild the dataset)")


def load_dataset(name: str, download: bool = True) -> OfflineDataset:
    """Resolve `name` (D4RL name or Minari id), open it and read every episode.

    Raises `UserError` with one clear line for unknown names, missing data, unsupported spaces or
    malformed episodes. Prints the name-only-match note when the name was mapped.
    """
    resolved = resolve_name(name)
    if resolved.note:
        print(f"note: {resolved.note}", file=sys.stderr, flush=True)
    ds = _open_minari(resolved.minari_id, download)
    obs_space, act_space = ds.observation_space, ds.action_space
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
        fail(f"dataset '{resolved.minari_id}' has action space {act_space}; only Box and Discrete are supported")
    flat_dim(obs_space)  # validates the observation space

    episodes = []
    for raw in ds.iterate_episodes():
        n = len(raw.rewards)
        obs = flatten_observation(raw.observations, obs_space)
        if obs.shape[0] != n + 1:
            fail(f"dataset '{resolved.minari_id}' episode {raw.id}: {obs.shape[0]} observations for {n} "
                 f"actions (Minari episodes must hold N+1)")
        if isinstance(act_space, gym.spaces.Discrete):
            actions = np.asarray(raw.actions, dtype=np.int64).reshape(n) - int(act_space.start)
        else:
            actions = np.asarray(raw.actions, dtype=np.float32).reshape(n, -1)
        rewards = np.asarray(raw.rewards, dtype=np.float32).reshape(n)
        check_finite(resolved.minari_id, raw.id, {"observations": obs, "actions": actions, "rewards": rewards})
        episodes.append(Episode(obs, actions, rewards, np.asarray(raw.terminations, dtype=bool).reshape(n),
                                np.asarray(raw.truncations, dtype=bool).reshape(n)))
    if not episodes:
        fail(f"dataset '{resolved.minari_id}' holds no episodes")

    metadata = dict(ds.storage.metadata)
    if resolved.d4rl_reference is not None:
        ref_min, ref_max = resolved.d4rl_reference
        source = "D4RL table"
    elif metadata.get("ref_min_score") is not None and metadata.get("ref_max_score") is not None:
        ref_min, ref_max = float(metadata["ref_min_score"]), float(metadata["ref_max_score"])
        source = "Minari metadata"
    else:
        ref_min = ref_max = source = None
    try:
        eval_spec = ds.spec.env_spec
        if metadata.get("eval_env_spec"):
            eval_spec = gym.envs.registration.EnvSpec.from_json(metadata["eval_env_spec"])
    except Exception:
        eval_spec = None
    return OfflineDataset(name=name, minari_id=resolved.minari_id, episodes=episodes,
                          observation_space=obs_space, action_space=act_space, eval_env_spec=eval_spec,
                          ref_min_score=ref_min, ref_max_score=ref_max, ref_source=source,
                          note=resolved.note, metadata=metadata)


# --------------------------------------------------------------------------------------------------
# Writing (used by the local builder and the tests)
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_staging(root: Path) -> list[Path]:
    """Remove `.staging-<pid>` and `.trash-<pid>` folders under the Minari root left by killed writers
    (their process is gone; at D4RL size they hold gigabytes). Returns what was removed."""
    removed = []
    if not root.is_dir():
        return removed
    for folder in root.iterdir():
        match = re.fullmatch(r"\.(?:staging|trash)-(\d+)", folder.name)
        if match and folder.is_dir() and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# HDF5 overhead per episode (its group, datasets and attributes) and per file, measured generously
HDF5_BYTES_PER_EPISODE, HDF5_BYTES_PER_FILE = 16 << 10, 1 << 20


def _estimated_bytes(episodes: Sequence[dict]) -> int:
    """An upper estimate of the bytes a Minari dataset of `episodes` takes on disk (rewards are stored as
    float64, the rest as given; flags as bytes)."""
    total = HDF5_BYTES_PER_FILE
    for ep in episodes:
        arrays = list(ep["observations"].values()) if isinstance(ep["observations"], dict) else [ep["observations"]]
        total += sum(np.asarray(a).nbytes for a in [*arrays, ep["actions"]])
        total += 8 * len(ep["rewards"]) + 2 * len(ep["terminations"]) + HDF5_BYTES_PER_EPISODE
    return int(total * 1.25)


def check_room(folder: Path, needed: int, what: str) -> None:
    """`UserError` (nothing written) unless `needed` bytes fit in `folder`: its disk's free space, and this
    process's file-size limit (`ulimit -f`), under which a write fails part-way (h5py may crash outright)."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(existing).free
    if needed > free:
        fail(f"{what} needs about {needed / 2**20:.1f} MiB and {existing} has {free / 2**20:.1f} MiB free; "
             f"free some space (or point MINARI_DATASETS_PATH elsewhere); nothing was written")
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    if limit != resource.RLIM_INFINITY and needed > limit:
        fail(f"{what} needs about {needed / 2**20:.1f} MiB but this process may write files of at most "
             f"{limit / 2**20:.1f} MiB (ulimit -f); raise the limit; nothing was written")


def save_episodes(dataset_id: str, episodes: Sequence[dict], env_spec: Any, *,
                  eval_env_spec: Any = None, ref_min_score: float | None = None,
                  ref_max_score: float | None = None, algorithm_name: str | None = None,
                  description: str | None = None, extra_metadata: dict | None = None,
                  overwrite: bool = False, observation_space: gym.Space | None = None,
                  action_space: gym.Space | None = None) -> Path:
    """Write `episodes` as the Minari dataset `dataset_id`, atomically; return its folder.

    Each episode is a dict with `observations` (N+1, ...), `actions` (N, ...), `rewards`, `terminations`,
    `truncations` (N,), and optionally `seed`. The dataset is built in a hidden folder of the Minari root
    and moved into place only when complete, so an interrupted write never leaves a dataset under a valid
    id. An existing id raises `UserError` unless `overwrite`. `extra_metadata` (JSON-serialisable) is added
    to the dataset's metadata (e.g. the recipe, seed and checksum). `observation_space` / `action_space`
    override the env's spaces (Minari needs them when `env_spec` is None).
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    if not MINARI_ID_PATTERN.match(dataset_id) or "/" not in dataset_id:
        fail(f"invalid dataset id '{dataset_id}': use 'namespace/name-vN', e.g. 'local/pendulum/medium-v0'")
    if not episodes:
        fail(f"refusing to write '{dataset_id}' with no episodes")
    buffers = []
    for i, ep in enumerate(episodes):
        n = len(ep["rewards"])
        n_obs = len(ep["observations"]) if not isinstance(ep["observations"], dict) else \
            len(next(iter(ep["observations"].values())))
        if n == 0 or n_obs != n + 1 or len(ep["actions"]) != n or len(ep["terminations"]) != n \
                or len(ep["truncations"]) != n:
            fail(f"episode {i} of '{dataset_id}': need N+1 observations and N actions/rewards/terminations/"
                 f"truncations with N >= 1, got {n_obs} observations, {len(ep['actions'])} actions, {n} rewards")
        buffers.append(EpisodeBuffer(id=i, seed=ep.get("seed"), observations=ep["observations"],
                                     actions=ep["actions"], rewards=list(np.asarray(ep["rewards"], np.float64)),
                                     terminations=list(np.asarray(ep["terminations"], bool)),
                                     truncations=list(np.asarray(ep["truncations"], bool))))

    root = minari_root()
    final = root / dataset_id
    if final.exists() and not overwrite:
        fail(f"dataset '{dataset_id}' already exists at {final}; pass --overwrite to replace it")
    remove_stale_staging(root)
    check_room(root, _estimated_bytes(episodes), f"dataset '{dataset_id}'")
    staging_root = root / f".staging-{os.getpid()}"
    shutil.rmtree(staging_root, ignore_errors=True)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging_root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = minari.create_dataset_from_buffers(
                dataset_id, buffers, env=env_spec, eval_env=eval_env_spec or env_spec,
                observation_space=observation_space, action_space=action_space,
                algorithm_name=algorithm_name, author="offline-rl library (local build)",
                author_email="n/a", code_permalink="common/build/recipe.py",
                ref_min_score=ref_min_score, ref_max_score=ref_max_score, description=description)
            if extra_metadata:
                dataset.storage.update_metadata({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                                                 for k, v in extra_metadata.items()})
    except Exception as err:  # h5py reports a full disk as OSError, RuntimeError or its own errors
        shutil.rmtree(staging_root, ignore_errors=True)
        fail(f"could not write dataset '{dataset_id}' under {root}: {type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''} (is the disk full?); nothing was written")
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    final.parent.mkdir(parents=True, exist_ok=True)
    trash = None
    if final.exists():
        trash = root / f".trash-{os.getpid()}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(staging_root / dataset_id, final)
    shutil.rmtree(staging_root, ignore_errors=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------------
# Device sampler
# --------------------------------------------------------------------------------------------------


class TensorSampler:
    """Keeps a dict of arrays on the training device and samples uniform minibatches there.

    Indices are drawn with a dedicated `torch.Generator` on the same device (no host sync, no numpy), whose
    state is part of checkpoints so that a resumed run draws the same batches. Arrays of the same dtype are
    packed side by side into one `(N, total_width)` table, so a minibatch is one row gather per dtype (one
    memory access per row, not one per key: on a D4RL-size dataset that is 4x faster than a gather per
    key); the batch's tensors are views of that gathered block.
    """

    def __init__(self, arrays: dict[str, np.ndarray], device: torch.device | str, seed: int):
        self.device = torch.device(device)
        data = {k: torch.as_tensor(v) for k, v in arrays.items()}
        sizes = {len(v) for v in data.values()}
        if len(sizes) != 1:
            fail(f"sampler arrays have different lengths: { {k: len(v) for k, v in data.items()} }")
        self.size = sizes.pop()
        # one table per dtype: (table, keys, column widths, trailing shapes)
        self.tables: list[tuple[torch.Tensor, list[str], list[int], list[tuple[int, ...]]]] = []
        for dtype in dict.fromkeys(v.dtype for v in data.values()):
            keys = [k for k, v in data.items() if v.dtype == dtype]
            columns = [data[k].reshape(self.size, -1) for k in keys]
            self.tables.append((torch.cat(columns, 1).to(self.device).contiguous(), keys,
                                [c.shape[1] for c in columns], [tuple(data[k].shape[1:]) for k in keys]))
        self.keys = list(data)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A batch of `batch_size` rows drawn uniformly with replacement, as device tensors."""
        return self.rows(torch.randint(0, self.size, (batch_size,), device=self.device, generator=self.generator))

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows `idx` (a device tensor of indices), as a batch."""
        batch = {}
        for table, keys, widths, shapes in self.tables:
            for key, part, shape in zip(keys, table.index_select(0, idx).split(widths, 1), shapes):
                batch[key] = part if len(shape) == 1 else part.view(len(idx), *shape)
        return {k: batch[k] for k in self.keys}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# --------------------------------------------------------------------------------------------------
# CLI: python -m common.datasets --list
# --------------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.datasets",
                                     description="List or inspect offline datasets.")
    parser.add_argument("--list", action="store_true", help="list datasets stored under the Minari root")
    parser.add_argument("--d4rl", action="store_true", help="list the D4RL names --env understands")
    parser.add_argument("--info", metavar="NAME", help="load NAME and print a summary")
    args = parser.parse_args(argv)
    try:
        if args.info:
            data = load_dataset(args.info, download=False)
            print(data.summary())
            print(f"obs_dim {data.obs_dim}, action {'discrete' if data.discrete else 'continuous'} "
                  f"{data.act_dim}, reference scores: "
                  f"{(data.ref_min_score, data.ref_max_score) if data.ref_source else 'none'} "
                  f"({data.ref_source or 'raw returns only'})")
            if data.metadata.get("sha256"):
                print(f"sha256 {data.metadata['sha256']}")
            return 0
        if args.d4rl:
            for name, entry in sorted(D4RL_TO_MINARI.items()):
                print(f"{name:36s} -> {entry.minari_id or '(none: build locally)'}")
            return 0
        ids = local_dataset_ids()
        print(f"Minari root: {minari_root()}")
        if not ids:
            print("no datasets stored locally; build the default suite with `make datasets`")
        for dataset_id in ids:
            try:
                meta = json.loads((minari_root() / dataset_id / "data" / "metadata.json").read_text())
                print(f"  {dataset_id:40s} {meta.get('total_episodes', '?'):>6} episodes "
                      f"{meta.get('total_steps', '?'):>9} steps")
            except (OSError, ValueError):
                print(f"  {dataset_id:40s} (unreadable metadata)")
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
