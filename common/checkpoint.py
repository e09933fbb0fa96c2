"""Checkpoints: atomic writes, RNG capture, and loading a trained policy back.

A checkpoint is one `torch.save`d dict:
  step, algo, config (dict), agent (networks + optimisers), sampler (its generator), rng (python, numpy,
  torch CPU and CUDA states), normalizer (obs mean/std or None), spec (DataSpec as a dict),
  run_dir.
It is written to `<path>.tmp`, flushed to disk, then renamed over `<path>` (`os.replace` is atomic), so a
crash or kill during the write leaves the previous checkpoint intact.

Loading the final policy of a run (the README shows the same lines):

    from common.checkpoint import load_policy
    policy = load_policy("runs/bc/local-pendulum-expert-v0/0-20261124-101500")   # run dir or .pt file
    action = policy(observation)        # raw env observation(s) in, numpy action(s) out
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
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


def rng_state() -> dict:
    """Every global RNG state a training step may touch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` to `path` atomically (temporary file, fsync, rename). Returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        fail(f"cannot write checkpoint {path}: {err.strerror or err}")
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
    """The checkpoint file `path` names: the file itself, `<run dir>/checkpoint.pt`, or the file a run
    directory's `checkpoint.path` points to (runs made with `--checkpoint-dir`); `UserError` when none."""
    path = Path(path)
    if path.is_file() and path.name != CHECKPOINT_POINTER:
        return path
    candidate = path / CHECKPOINT_NAME
    if candidate.is_file():
        return candidate
    pointer = path / CHECKPOINT_POINTER
    if pointer.is_file():
        target = Path(pointer.read_text().strip())
        if target.is_file():
            return target
        fail(f"run directory {path} keeps its checkpoint at {target}, which does not exist (was the "
             f"--checkpoint-dir moved or deleted?)")
    fail(f"no checkpoint at {path} (expected a run directory holding {CHECKPOINT_NAME}, or the file)")


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` (a run directory or the file itself)."""
    file = find_checkpoint(path)
    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except Exception as err:
        fail(f"cannot read checkpoint {file}: {type(err).__name__}: {err}")


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
    """Rebuild the agent of a checkpoint: returns `(agent, checkpoint dict)`."""
    ckpt = load_checkpoint(path, map_location=device)
    module = import_algorithm(ckpt["algo"], ckpt.get("algo_file"))
    from common.datasets import DataSpec

    fields = {f.name for f in dataclasses.fields(module.Config)}
    config = module.Config(**{k: v for k, v in renamed_keys(ckpt["config"]).items() if k in fields})
    agent = module.Agent(config, DataSpec(**ckpt["spec"]), torch.device(device))
    agent.load_state_dict(ckpt["agent"])
    return agent, ckpt


def load_policy(path: str | Path, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """A function from flattened raw observation(s) to deterministic numpy action(s), normalisation included."""
    from common.datasets import ObsNormalizer

    agent, ckpt = load_agent(path, device)
    normalizer = ObsNormalizer.from_state_dict(ckpt["normalizer"]) if ckpt.get("normalizer") else None

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        single = obs.ndim == 1
        batch = obs[None] if single else obs
        if normalizer is not None:
            batch = normalizer(batch)
        action = agent.act(torch.as_tensor(batch, device=device)).cpu().numpy()
        return action[0] if single else action

    return policy
