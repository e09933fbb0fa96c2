"""Find, identify and import a reference implementation's file, without copying it anywhere near the repository.

Standard library only: the JAX side (`jax_side.py`) runs it in an interpreter that has no torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import tempfile
import types
from pathlib import Path

# CORL's files import these at module level for their training loop (datasets, envs, configs, logging,
# progress bars); the updates never call them, so empty stand-ins are put in sys.modules while a file is imported
TRAINING_ONLY_MODULES = ("d4rl", "gym", "gym.wrappers", "pyrallis", "wandb", "tqdm", "tqdm.auto")


def _git(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True)


def has_file(checkout: Path, relpath: str) -> bool:
    """Whether `relpath` is in the checkout's work tree, or in its HEAD when `checkout` is a bare git mirror."""
    return (checkout / relpath).is_file() or _git(checkout, "cat-file", "-e", f"HEAD:{relpath}").returncode == 0


def commit_of(checkout: Path, relpath: str) -> str:
    """The checkout's HEAD commit, with ` (modified)` when `relpath` differs from it; "unknown" outside git."""
    head = _git(checkout, "rev-parse", "HEAD").stdout.strip()
    if not head:
        return "unknown (not a git checkout)"
    if (checkout / relpath).is_file() and _git(checkout, "diff", "--quiet", "HEAD", "--", relpath).returncode != 0:
        return f"{head} (modified)"
    return head


def source_path(checkout: Path, relpath: str, scratch: Path) -> Path:
    """The file to run: `checkout/relpath`, or for a bare mirror its HEAD version written to `scratch`."""
    path = checkout / relpath
    if path.is_file():
        return path
    text = _git(checkout, "show", f"HEAD:{relpath}").stdout
    path = scratch / Path(relpath).name
    path.write_text(text)
    return path


def _stand_ins() -> dict[str, types.ModuleType]:
    modules = {name: types.ModuleType(name) for name in TRAINING_ONLY_MODULES}
    modules["gym"].Env = object  # annotations such as `-> gym.Env` are evaluated at import time
    modules["gym"].wrappers = modules["gym.wrappers"]
    modules["pyrallis"].wrap = lambda *args, **kwargs: (lambda fn: fn)  # the decorator of CORL's train()
    modules["tqdm"].trange = modules["tqdm.auto"].trange = range
    modules["tqdm"].tqdm = modules["tqdm.auto"].tqdm = lambda iterable=None, *args, **kwargs: iterable
    modules["tqdm"].auto = modules["tqdm.auto"]
    return modules


@contextlib.contextmanager
def _training_modules_stubbed():
    saved = {name: sys.modules.get(name) for name in TRAINING_ONLY_MODULES}
    sys.modules.update(_stand_ins())
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_file(checkout: Path, relpath: str, name: str) -> types.ModuleType:
    """Import the reference's own `relpath` from the checkout as module `name`, its training-only imports
    stubbed (the module keeps the stand-ins it bound; nothing else sees them)."""
    with tempfile.TemporaryDirectory(prefix="crosscheck_") as scratch, _training_modules_stubbed():
        spec = importlib.util.spec_from_file_location(name, source_path(checkout, relpath, Path(scratch)))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses resolve their module by name while the file runs
        spec.loader.exec_module(module)
    return module
