"""Checkpoints: atomic writes, RNG capture, safe loading, and loading a trained policy back.

A checkpoint is one `torch.save`d dict of tensors and plain values only (dicts, lists, tuples, numbers,
strings, None), format 2:
  format, step, algo, algo_file (the file that wrote it), config (dict), agent (networks + optimisers),
  sampler (its generator), rng (python, numpy, torch CPU and CUDA states; numpy's key as a tensor),
  normalizer (obs mean/std tensors, or None), spec (DataSpec as a dict), run_dir, wandb_id.
It is written to `<path>.tmp`, flushed to disk, then renamed over `<path>` (`os.replace` is atomic), so a
crash or kill during the write leaves the previous checkpoint intact; a failed write (disk full) removes the
temporary file and stops with one line.

Loading never runs code from the file: `torch.load(weights_only=True)`, whose unpickler accepts tensors and
plain values and refuses every other class or function. The one addition (`SAFE_GLOBALS`) is numpy's
array reconstruction, so that checkpoints of format 1 (numpy arrays in the RNG state and the normaliser) still
load; it rebuilds arrays and can call nothing else. A file holding anything more is refused in one line.

Loading the final policy of a run (the README shows the same lines):

    from common.checkpoint import load_policy
    policy = load_policy("runs/bc/local-pendulum-expert-v0/0-20261124-101500")   # run dir or .pt file
    action = policy(observation)        # raw env observation(s) in, numpy action(s) out
    # sampling runs (bc_expressive, diffusion_bc) and history-dependent ones (dt): see load_policy's docstring
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common.errors import fail

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_POINTER = "checkpoint.path"  # in a run directory whose checkpoints live under --checkpoint-dir
ROOT = Path(__file__).resolve().parent.parent  # the folder holding this common/: a repository, or a project


# Flags renamed so that one concept has one name in every file (the lecture's symbols: gamma, tau): the old
# spelling still works on the command line (common.runs.renamed_flags) and in the configs of older runs.
RENAMED_FIELDS = {"discount": "gamma", "polyak": "tau"}


def renamed_keys(saved: dict) -> dict:
    """A saved config with the fields of `RENAMED_FIELDS` under their new names (runs made before a rename)."""
    return {(RENAMED_FIELDS[key] if key in RENAMED_FIELDS and RENAMED_FIELDS[key] not in saved else key): value
            for key, value in saved.items()}


FORMAT = 2  # 1: numpy arrays in rng and normalizer (loaded through SAFE_GLOBALS); 2: tensors and plain values


def _numpy_array_globals() -> list:
    """numpy's array reconstruction (the unpickler's whole need for a plain ndarray of numbers): the functions
    and classes a format-1 checkpoint names. They build arrays and dtypes and can call nothing else."""
    multiarray = getattr(np, "_core", None) or np.core
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")
                     and not name.startswith(("Object", "Void", "String", "Str", "Bytes", "DateTime", "TimeDelta"))]
    return [multiarray.multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


SAFE_GLOBALS = _numpy_array_globals()


def safe_load(file: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """`torch.load` that runs no code from the file: tensors, plain values and numpy arrays only.

    Anything else (a pickled class or function: a crafted file could run arbitrary code) is refused with one
    line (`UserError`) before a single object of it is built."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(err).splitlines()[0] if str(err) else "")
        fail(f"refusing to load {what} {file}: it holds more than tensors and plain values ({detail}); "
             f"files are loaded without running code from them, so a file that needs it is not loaded")
    except Exception as err:
        fail(f"cannot read {what} {file}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def rng_state() -> dict:
    """Every global RNG state a training step may touch, as tensors and plain values."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.copy()), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_plain(state: Any, where: str = "state") -> None:
    """`TypeError` naming the first value in `state` that is not a tensor or a plain value (what
    `safe_load` would refuse): a programming error in an agent's `state_dict`, caught when it is saved."""
    if isinstance(state, dict):
        for key, value in state.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str or int")
            check_plain(value, f"{where}.{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(state, (torch.Tensor, str, int, float, bool, type(None))):
        raise TypeError(f"{where} is a {type(state).__module__}.{type(state).__name__}: a checkpoint holds only "
                        f"tensors and plain values (it is loaded with weights_only=True)")


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` (tensors and plain values) to `path` atomically: temporary file, fsync, rename. A failed
    write (disk full, file size limit, permissions) removes the temporary file and stops with one line."""
    path = Path(path)
    check_plain(state, "checkpoint")
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        fail(f"cannot write checkpoint {path}: {reason} (is the disk full? the previous checkpoint is intact)")
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_checkpoint(path: str | Path) -> Path:
    """The newest checkpoint `path` names: the file itself, or for a run directory the file its
    `checkpoint.path` points to (runs that wrote under `--checkpoint-dir`; the pointer is updated after every
    checkpoint written there and removed after one written into the run directory), else
    `<run dir>/checkpoint.pt`. `UserError` when none, or when the pointer's target is gone (an older
    checkpoint is never taken silently in its place)."""
    path = Path(path)
    if path.is_file() and path.name != CHECKPOINT_POINTER:
        return path
    own, pointer = path / CHECKPOINT_NAME, path / CHECKPOINT_POINTER
    if pointer.is_file():
        target = Path(pointer.read_text().strip())
        if target.is_file():
            return target
        older = f"; an older checkpoint is {own}: pass that file to --resume to continue from it" \
            if own.is_file() else ""
        fail(f"run directory {path} keeps its newest checkpoint at {target}, which does not exist (was the "
             f"--checkpoint-dir moved or deleted?){older}")
    if own.is_file():
        return own
    fail(f"no checkpoint at {path} (expected a run directory holding {CHECKPOINT_NAME}, or the file)")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (a run directory or the file itself)."""
    file = find_checkpoint(path)
    ckpt = safe_load(file, map_location, "checkpoint")
    if not isinstance(ckpt, dict) or "step" not in ckpt or "agent" not in ckpt:
        fail(f"{file} is not a checkpoint of this library (no step and agent in it)")
    return ckpt


def algorithm_file(algo: str, recorded: str | None = None) -> Path:
    """The algorithm file named `algo`: the path a checkpoint recorded when it was written (relative to the
    folder that holds this `common/`, or absolute), else `<that folder>/algorithms/<algo>.py` (this repository's
    layout), else `<that folder>/<algo>.py` (a file copied flat beside `common/`). `UserError` when none exists.
    """
    candidates = []
    if recorded:
        candidates.append(Path(recorded) if Path(recorded).is_absolute() else ROOT / recorded)
    candidates += [ROOT / "algorithms" / f"{algo}.py", ROOT / f"{algo}.py"]
    for file in candidates:
        if file.is_file():
            return file
    fail(f"algorithm '{algo}': none of {', '.join(str(c) for c in candidates)} exists (load the run where "
         f"the file that trained it sits beside common/)")


def recorded_algorithm_file(module_file: str) -> str:
    """How a checkpoint records the file that wrote it: relative to the folder holding `common/` when inside
    it (a repository or project moved elsewhere still finds it), else absolute."""
    file = Path(module_file).resolve()
    return str(file.relative_to(ROOT)) if file.is_relative_to(ROOT) else str(file)


def import_algorithm(algo: str, recorded: str | None = None):
    """Import an algorithm file as a module (the files are scripts, not a package): see `algorithm_file`.

    This is the one place where `common/` runs an algorithm file, and only the file a checkpoint names or the
    caller asks for: the core never imports an algorithm file by itself."""
    file = algorithm_file(algo, recorded)
    name = f"algorithms_{algo}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == file.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_agent(path: str | Path, device: str = "cpu"):
    """Rebuild the agent of a checkpoint: returns `(agent, checkpoint dict)`.

    A run of an algorithm file that defines `NOT_A_POLICY` (a string: why its runs are no policy, e.g. ope.py's,
    which estimates another run's value) is refused with that line, `{field}`s filled from the run's config."""
    ckpt = load_checkpoint(path, map_location=device)
    module = import_algorithm(ckpt["algo"], ckpt.get("algo_file"))
    not_a_policy = getattr(module, "NOT_A_POLICY", None)
    if not_a_policy:
        fields = {str(k): v for k, v in ckpt.get("config", {}).items()}
        fail(f"{path} is a {ckpt['algo']}.py run: " + not_a_policy.format_map(_Missing(fields)))
    from common.datasets import DataSpec

    fields = {f.name for f in dataclasses.fields(module.Config)}
    config = module.Config(**{k: v for k, v in renamed_keys(ckpt["config"]).items() if k in fields})
    agent = module.Agent(config, DataSpec(**ckpt["spec"]), torch.device(device))
    agent.load_state_dict(ckpt["agent"])
    return agent, ckpt


class _Missing(dict):
    """format_map's mapping: a field the run's config lacks shows as '?'."""

    def __missing__(self, key: str) -> str:
        return "?"


def load_policy(path: str | Path, device: str = "cpu", sample: bool = False):
    """The final policy of a run: flattened raw observation(s) in, numpy action(s) out, normalisation included.

    `policy(obs)` takes one observation `(obs_dim,)` (returns `(act_dim,)`, or a scalar int for discrete
    actions) or a batch `(n, obs_dim)` (returns `(n, act_dim)` / `(n,)`); any other shape is refused with one
    line naming the expected one. What comes back depends on the agent (the contract every algorithm file keeps):

      * a policy of the state (most files): `agent.act`, deterministic, the action evaluation takes.
      * an agent whose `act` samples (class attribute `SAMPLES_ACTIONS = True`: bc_expressive, diffusion_bc):
        by default its deterministic mode, `agent.act_deterministic` (bc_expressive: the mean of the most
        probable mixture component, the centre of each dimension's most probable bin, the decoder at the prior's
        mean z = 0); an agent without one (diffusion_bc) is refused with a line naming `sample=True`.
        `sample=True` returns the sampling policy `agent.act` instead, its generator seeded with the run's
        --seed (`agent.reset_sampling()`) when loaded and at every `reset()`: fed the observations of the
        run's evaluation episodes, in the same batch, it draws exactly what the evaluation drew.
        `sample=True` with a deterministic agent returns its one policy.
      * a history-dependent agent (`history_dependent` true: dt, diffusion_bc with action chunks) is returned
        as an object that keeps the episode so far: `policy(obs, reward=0.0)`, where `reward` is the reward
        of the previous step (scalar or `(n,)`; 0 at an episode's first step), and `policy.reset()` before
        every new episode (a `reset(n)` of a caller that passes the batch size works too). It is the agent's
        `stateful_policy(n)`, the policy of `common.evaluation.evaluate_stateful`, for the n rows of the
        first call after a reset: dt conditions on the run's first target return (for another one, build
        `load_agent(path)[0].stateful_policy(n, target_return=R)` and feed it normalised tensors).
    """
    from common.datasets import ObsNormalizer

    agent, ckpt = load_agent(path, device)
    normalizer = ObsNormalizer.from_state_dict(ckpt["normalizer"]) if ckpt.get("normalizer") else None
    obs_dim, algo = int(ckpt["spec"]["obs_dim"]), ckpt.get("algo", "?")
    samples = bool(getattr(agent, "SAMPLES_ACTIONS", False))
    if samples and not sample and not callable(getattr(agent, "act_deterministic", None)):
        fail(f"{path} is a {algo}.py run, whose policy samples its actions and has no deterministic mode: "
             f"load_policy(path, sample=True) returns the sampling policy (seeded with the run's --seed)")
    act = agent.act_deterministic if samples and not sample else agent.act

    def batch_of(obs) -> tuple[torch.Tensor, bool]:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim not in (1, 2) or obs.shape[-1] != obs_dim:
            fail(f"load_policy: the policy of {path} takes flattened observations of shape ({obs_dim},) or "
                 f"(n, {obs_dim}) (the env's '{ckpt.get('config', {}).get('env', '?')}'), got shape {obs.shape}")
        batch = obs[None] if obs.ndim == 1 else obs
        if normalizer is not None:
            batch = normalizer(batch)
        return torch.as_tensor(batch, device=device), obs.ndim == 1

    if getattr(agent, "history_dependent", False):
        return StatefulPolicy(agent, batch_of, reseed=samples and sample)
    if samples and sample:
        agent.reset_sampling()

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        batch, single = batch_of(obs)
        action = act(batch).cpu().numpy()
        return action[0] if single else action

    return policy


class StatefulPolicy:
    """`load_policy`'s policy for a history-dependent agent: `policy(obs, reward=0.0)` once per env step,
    `policy.reset()` between episodes (see `load_policy`)."""

    def __init__(self, agent, batch_of: Callable, reseed: bool):
        self.agent, self.batch_of, self.reseed = agent, batch_of, reseed
        self.reset()

    def reset(self, num_envs: int | None = None) -> None:
        """Forget the episode so far; the next call starts a new one (its batch size fixes the rows)."""
        self.step_policy, self.rows = None, None
        if self.reseed:
            self.agent.reset_sampling()

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, reward: float | np.ndarray = 0.0) -> np.ndarray:
        batch, single = self.batch_of(obs)
        if self.step_policy is None:
            self.rows = batch.shape[0]
            self.step_policy = self.agent.stateful_policy(self.rows)
        elif batch.shape[0] != self.rows:
            fail(f"load_policy: this episode runs {self.rows} observation row(s), got {batch.shape[0]}: call "
                 f"policy.reset() before an episode of another batch size")
        rewards = torch.as_tensor(np.broadcast_to(np.asarray(reward, dtype=np.float32), (self.rows,)).copy(),
                                  device=batch.device)
        action = self.step_policy(batch, rewards).cpu().numpy()
        return action[0] if single else action
