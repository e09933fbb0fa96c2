"""Run bookkeeping shared by every algorithm: set-up, run directory, metrics, progress bar, checkpoints.

A run writes to `<runs_dir>/<algo>/<dataset>/<seed>-<YYYYmmdd-HHMMSS>/`:
  config.json     the resolved config
  versions.json   package versions, python, git commit (and whether the tree was dirty), torch threads, device
  metrics.jsonl   one JSON object per logged step: {"step": ..., "train/...": ..., "perf/steps_per_sec": ...}
  checkpoint.pt   the latest checkpoint (unless --checkpoint-dir points elsewhere)
  summary.json    the final evaluation
  videos/         with --capture-video: step-<N>-episode-<i>.mp4, the first episodes of the evaluation at step N
                  (common/video.py says what the frames are)
With `--track`, the same metrics go to Weights & Biases (WANDB_MODE=offline works without a network).

Metrics are read from the device only every `log_every` steps (`.item()` happens here, never per step),
and every logged value is checked: a NaN or infinite loss stops the run with the step and the loss name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from common.checkpoint import FORMAT as CHECKPOINT_FORMAT
from common.checkpoint import (CHECKPOINT_NAME, CHECKPOINT_POINTER, RENAMED_FIELDS, atomic_write_text,
                               find_checkpoint, load_checkpoint, recorded_algorithm_file, renamed_keys, rng_state, save_checkpoint,
                               set_rng_state)
from common.errors import EXIT_USER_ERROR, UserError, fail

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "numpy", "gymnasium", "minari", "mujoco", "tyro", "wandb", "h5py")


def tune_cpu_allocator() -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS (glibc only).

    glibc serves allocations above 128 KiB with mmap and unmaps them on free; a batch-256 x 256-unit
    activation is 256 KiB, so every update re-faults fresh pages (about 25 page faults per BC update,
    measured), which costs a quarter of a small-MLP update on CPU. Raising the mmap and trim thresholds
    (mallopt) removes those faults. Returns whether the settings were applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 256 << 20)
                    and libc.mallopt(m_top_pad, 64 << 20))
    except (OSError, AttributeError):
        return False


def setup(seed: int, device: str, threads: int) -> torch.device:
    """Pin torch's thread count, seed python/numpy/torch, and resolve `device` ("auto", "cpu", "cuda[:i]")."""
    if threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    tune_cpu_allocator()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return resolve_device(device)


def resolve_device(device: str) -> torch.device:
    """`device` as a torch.device ("auto": CUDA when present, else CPU); one clear line when unusable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        fail(f"unknown --device '{device}' (use auto, cpu, cuda or cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {device} asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            fail(f"--device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif resolved.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            fail(f"--device {device} asked for, but this machine has no MPS (Apple GPU) backend "
                 f"(use --device cpu or auto)")
    elif resolved.type != "cpu":
        fail(f"unsupported --device '{device}' (use auto, cpu, cuda, cuda:N or mps)")
    return resolved


# --------------------------------------------------------------------------------------------------
# The run's config: resumed settings, validation, per-dataset defaults
# --------------------------------------------------------------------------------------------------

# Fields a resumed run may change: they steer bookkeeping, not the training maths. Every other field is
# the run's own: a resumed run keeps it, and a flag that tries to change it is refused.
RESUME_MAY_CHANGE = {"max_steps", "online_steps", "eval_every", "eval_episodes", "log_every", "checkpoint_every",
                     "checkpoint_dir", "resume", "track", "wandb_project", "runs_dir", "download", "threads",
                     "compile", "capture_video"}
MAX_SEED = 2 ** 32 - 1  # numpy's seed range


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _same(a: Any, b: Any) -> bool:
    """Config values equal, with tuples and lists (JSON) compared alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def saved_config(resume: str) -> tuple[dict, int]:
    """The config a run was made with (from its checkpoint) and the checkpoint's step."""
    ckpt = load_checkpoint(resume, map_location="cpu")
    return renamed_keys(dict(ckpt.get("config", {}))), int(ckpt.get("step", 0))


def resume_conflicts(config: Any, saved: dict, given: set[str] | None = None, step: int = 0) -> list[str]:
    """Fields of `config` that differ from the resumed run's `saved` config and may not change.

    `given`: the fields the user set explicitly (the command line); None means "every field that differs
    from the dataclass default" (a config built in Python).
    """
    conflicts = []
    for f in dataclasses.fields(config):
        if may_change_on_resume(f.name, saved, step) or f.name not in saved:
            continue
        value = getattr(config, f.name)
        if _same(value, saved[f.name]):
            continue
        explicit = (f.name in given) if given is not None else not _same(value, _field_default(f))
        if explicit:
            conflicts.append(f"{_flag(f.name)} {_show(value)} (the run has {_show(saved[f.name])})")
    return conflicts


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def merge_resumed(config: Any, saved: dict, step: int) -> Any:
    """`config` with every field the resumed run fixed taken from `saved` (see `RESUME_MAY_CHANGE`).

    For a config built in Python, a field still at its dataclass default counts as "not given" and takes
    the saved value; a field set to anything else must equal the saved one (or be one that may change).
    The command line is exact instead: `cli_config` parses the flags on top of the saved config.
    """
    conflicts = resume_conflicts(config, saved, step=step)
    if conflicts:
        fail(f"--resume {config.resume}: these settings differ from the run's and cannot change on resume: "
             f"{'; '.join(conflicts)}. Drop them to continue the run as it was, or start a new run")
    values = {}
    for f in dataclasses.fields(config):
        if f.name not in saved:
            continue
        value = getattr(config, f.name)
        if may_change_on_resume(f.name, saved, step) and not _same(value, _field_default(f)):
            values[f.name] = value  # a bookkeeping (or not yet used online) field the user set: it wins
        else:
            saved_value = saved[f.name]
            values[f.name] = tuple(saved_value) if isinstance(saved_value, list) else saved_value
    values["resume"] = config.resume
    merged = dataclasses.replace(config, **values)
    check_extension(merged, saved, step)
    return merged


def may_change_on_resume(name: str, saved: dict, step: int) -> bool:
    """Bookkeeping fields always; the online phase's own settings (fields named `online_*`: its exploration
    noise, its batch mix, an algorithm's online-phase values) until the online phase has begun, so that a
    finished offline run can be fine-tuned with settings of one's choice."""
    if name in RESUME_MAY_CHANGE:
        return True
    return name.startswith("online_") and step <= (saved.get("max_steps") or 0)


def check_extension(config: Any, saved: dict, step: int) -> None:
    """A resumed run may only be extended: `--max-steps` and `--online-steps` never below the run's, the
    checkpoint's step within the new total, and `--max-steps` fixed once the online phase has begun."""
    max_steps, saved_max = config.max_steps, saved.get("max_steps") or 0
    online, saved_online = getattr(config, "online_steps", 0) or 0, saved.get("online_steps") or 0
    if max_steps is not None and max_steps < saved_max:
        fail(f"--max-steps {max_steps} is below the resumed run's {saved_max}: a resumed run may only be extended")
    if online < saved_online:
        fail(f"--online-steps {online} is below the resumed run's {saved_online}: a resumed run may only be "
             f"extended")
    if step > saved_max and max_steps is not None and max_steps != saved_max:
        fail(f"--max-steps cannot change once the online phase has begun (the checkpoint is at step {step}, "
             f"{step - saved_max} env steps into it)")
    if max_steps is not None and step > max_steps + online:
        beyond = f"--max-steps {max_steps}" + (f" + --online-steps {online}" if online else "")
        fail(f"--resume checkpoint is at step {step}, beyond {beyond}")


def validate_config(config: Any) -> None:
    """Check the shared fields (and every `*hidden_dims` field) before anything is written.

    One clear line (`UserError`) for: a seed outside [0, 2^32), non-positive batch size, evaluation
    episodes, log period or steps, negative periods, hidden layers of width < 1, an unusable device,
    `--track` without a W&B login, and a checkpoint directory that cannot be written.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            fail(message)

    names = {f.name for f in dataclasses.fields(config)}
    need(0 <= config.seed <= MAX_SEED, f"--seed must lie in [0, {MAX_SEED}], got {config.seed}")
    need(config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}")
    need(config.eval_episodes >= 1, f"--eval-episodes must be at least 1, got {config.eval_episodes}")
    need(config.log_every >= 1, f"--log-every must be at least 1, got {config.log_every}")
    need(config.threads >= 1, f"--threads must be at least 1, got {config.threads}")
    need(config.max_steps is None or config.max_steps >= 1,
         f"--max-steps must be at least 1, got {config.max_steps}")
    for name in ("eval_every", "checkpoint_every", *(["online_steps"] if "online_steps" in names else [])):
        value = getattr(config, name)
        need(value >= 0, f"{_flag(name)} must be 0 (off) or positive, got {value}")
    if getattr(config, "online_steps", 0):
        module = sys.modules.get(type(config).__module__)
        agent = getattr(module, "Agent", None)
        need(agent is not None and hasattr(agent, "explore"),
             f"--online-steps: {Path(getattr(module, '__file__', 'this file')).name} has no online phase (its Agent "
             f"cannot explore); the files with one list `explore` in their Agent (see CONTRIBUTING.md)")
    if getattr(config, "capture_video", False):
        module = sys.modules.get(type(config).__module__)
        need(not getattr(module, "NOT_A_POLICY", None),
             f"--capture-video: a {Path(getattr(module, '__file__', 'this file')).name} run is not a policy and "
             f"records no videos; render the run it evaluates with `python -m common.reporting.video RUN`")
    for name in sorted(n for n in names if n.endswith("hidden_dims")):
        widths = getattr(config, name)
        need(len(widths) >= 1 and all(w >= 1 for w in widths),
             f"{_flag(name)} must list one or more positive widths, got {_show(widths) or '(none)'}")
    resolve_device(config.device)
    if config.track:
        check_wandb_login()
    if config.checkpoint_dir:
        check_writable(Path(config.checkpoint_dir), "--checkpoint-dir")


def check_wandb_login() -> None:
    """`--track` needs wandb and either a login (API key) or an offline/disabled WANDB_MODE."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        fail("--track needs wandb: pip install wandb")
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return
    except OSError:
        pass
    fail("--track needs a Weights & Biases login: run `wandb login`, or set WANDB_MODE=offline to log "
         "locally (sync later with `wandb sync`)")


def check_writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and make sure a file can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        fail(f"{flag} {folder} cannot be written: {err.strerror or err}")


def resolve_config(config: Any, table: list[tuple[str, dict]]) -> Any:
    """The run's config, checked before anything is written: the first line of every `train(config)`.

    With `--resume`, the resumed run's saved settings fill every field (a resumed run is the same run);
    fields that may change on resume (`RESUME_MAY_CHANGE`: longer `--max-steps`, periods, tracking...)
    take the new value, and any other field set to something else is refused with one line naming it.
    Then the shared fields are validated and fields left at None take the per-dataset defaults of `table`.
    """
    if getattr(config, "resume", None) and not getattr(config, "_resume_merged", False):
        saved, step = saved_config(config.resume)
        config = merge_resumed(config, saved, step)
    validate_config(config)
    config = apply_dataset_settings(config, table)
    validate_config(config)  # the filled values too (max_steps from the table)
    return config


def apply_dataset_settings(config: Any, table: list[tuple[str, dict]], quiet: bool = False) -> Any:
    """Fill the config fields left at None from the first row of `table` whose pattern matches the dataset.

    `table` rows are `(fnmatch pattern, {field: value})` (e.g. "antmaze-*", "D4RL/antmaze/*", "local/pendulum/*",
    "*" last), matched against `config.env` and the Minari id it resolves to (or, for a registered Gymnasium
    env id, the id alone). Settings follow what the data is, not only its name: when no row but the catch-all
    "*" matches the name, the row is chosen by the env the data came from (its stored eval env spec, e.g.
    Hopper-v5 -> the hopper family's row), so a dataset built or renamed by a user gets its family's settings
    (`settings_row`). Fields the user set are never changed. Prints the row it used and why, and what it filled.
    """
    from common.datasets import resolve_name

    try:
        resolved = resolve_name(config.env).minari_id
        names = {config.env, resolved}
    except UserError:
        import gymnasium as gym

        if config.env.split(":")[-1] not in gym.registry and ":" not in config.env:
            raise
        resolved, names = None, {config.env, config.env.split(":")[-1]}  # a Gymnasium env id (dagger.py)
    row, why = settings_row(table, names, resolved)
    filled = {}
    if row is not None:
        for key, value in table[row][1].items():
            if getattr(config, key) is None:
                filled[key] = value
    missing = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) is None
               and f.name not in filled and f.name in {k for _, settings in table for k in settings}]
    if missing:
        fail(f"no per-dataset default for {', '.join(missing)} on '{config.env}'; set them with flags")
    if filled and not quiet:
        print(f"per-dataset settings from the row '{table[row][0]}' ({why}): "
              + ", ".join(f"{k}={v}" for k, v in filled.items()), file=sys.stderr, flush=True)
    return dataclasses.replace(config, **filled)


def settings_table(module: Any, config: Any) -> list[tuple[str, dict]]:
    """The per-dataset table an algorithm file uses for `config`: its `settings_table(config)` when it has one
    (a file whose variants have tables of their own: sac_n.py's SAC-N, EDAC and LB-SAC), else its
    DATASET_SETTINGS. Tools (sweeps, results, bench) resolve a file's settings through this, as its train() does."""
    chooser = getattr(module, "settings_table", None)
    return chooser(config) if callable(chooser) else getattr(module, "DATASET_SETTINGS", [])


def settings_row(table: list[tuple[str, dict]], names: set[str], minari_id: str | None) -> tuple[int | None, str]:
    """(index of the row of `table` that applies, why): the first row whose pattern matches one of `names`;
    when only the catch-all "*" does, the row of the family of the env the data came from (`env_family`): the
    first row matching a local build of the family (`local/<family>/<x>`), else Minari's name
    (`mujoco/<family>/<x>`), else D4RL's (`D4RL/<family>/<x>`, `<family>-<x>-v2`); else the catch-all."""
    by_name = next((i for i, (pattern, _) in enumerate(table) if any(fnmatch.fnmatch(n, pattern) for n in names)),
                   None)
    if by_name is not None and table[by_name][0] != "*":
        return by_name, "its pattern matches the dataset's name"
    from common.datasets import stored_env_id

    env_id = stored_env_id(minari_id) if minari_id else None
    for family in env_family(env_id) if env_id else []:
        # a local build of that env's family first (the same env versions as the user's data), then Minari's
        # name, then D4RL's
        for alias in (f"local/{family}/data-v0", f"mujoco/{family}/data-v0", f"D4RL/{family}/data-v0",
                      f"{family}-data-v2"):
            for i, (pattern, _) in enumerate(table):
                if pattern != "*" and fnmatch.fnmatch(alias, pattern):
                    return i, f"the dataset's env is {env_id}, of the {family} family; its name matches no row"
    return by_name, "the catch-all: neither the dataset's name nor its env matches a row"


def env_family(env_id: str) -> list[str]:
    """The family names a Gymnasium env id stands for, most specific first: 'Hopper-v5' -> ['hopper'],
    'HalfCheetah-v5' -> ['halfcheetah'], 'AntMaze_UMaze-v4' -> ['antmaze_umaze', 'antmaze']."""
    base = re.sub(r"-v\d+$", "", env_id.split(":")[-1]).lower()
    return list(dict.fromkeys([base, base.split("_")[0]]))


T = TypeVar("T")

def run_cli(main: Callable[[T], object], config_type: type[T]) -> None:
    """Parse `config_type` with tyro, run `main(config)`, turn `UserError` into one line + exit 2.

    With `--resume RUN`, the flags are parsed on top of the resumed run's saved config (`cli_config`).
    tyro itself already exits with status 2 and a short message for flags of the wrong type.
    """
    try:
        config = cli_config(config_type, sys.argv[1:])
        main(config)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("\ninterrupted: resume with --resume <run dir> (progress since the last checkpoint is lost)",
              file=sys.stderr, flush=True)
        sys.exit(130)


def renamed_flags(config_type: type, argv: list[str]) -> list[str]:
    """`argv` with the old spellings of renamed flags (`--discount`, `--polyak`) replaced by the new ones, each
    with a one-line note; untouched where `config_type` has no field of the new name."""
    fields = {f.name for f in dataclasses.fields(config_type)}
    out = []
    for token in argv:
        flag, sep, value = token.partition("=")
        old = flag[2:].replace("-", "_") if flag.startswith("--") else None
        new = RENAMED_FIELDS.get(old)
        if new is not None and new in fields and old not in fields:
            print(f"note: {flag} is now {_flag(new)} (the lecture's symbol); the old name still works for now",
                  file=sys.stderr, flush=True)
            token = _flag(new) + sep + value
        out.append(token)
    return out


def cli_config(config_type: type, argv: list[str]) -> Any:
    """Parse `argv` into `config_type`; with `--resume RUN`, on top of that run's saved config.

    A resumed run keeps every setting it was made with, so flags not repeated are not reset to their
    defaults. A flag that changes a field outside `RESUME_MAY_CHANGE` is refused with one line naming it.
    """
    import tyro

    argv = renamed_flags(config_type, argv)
    resume = _resume_argument(argv)
    if not resume:
        return tyro.cli(config_type, args=argv)
    saved, step = saved_config(resume)
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    base = {k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k in fields}
    default = config_type(**{**base, "resume": resume})
    config = tyro.cli(config_type, args=argv, default=default)
    conflicts = [f"{_flag(name)} {_show(getattr(config, name))} (the run has {_show(saved[name])})"
                 for name in fields if name in saved and not may_change_on_resume(name, saved, step)
                 and not _same(getattr(config, name), saved[name])]
    if conflicts:
        fail(f"--resume {resume}: these settings differ from the run's and cannot change on resume: "
             f"{'; '.join(conflicts)}. Drop them to continue the run as it was, or start a new run")
    check_extension(config, saved, step)
    object.__setattr__(config, "_resume_merged", True)  # resolve_config: already merged, exactly
    return config


def _resume_argument(argv: list[str]) -> str | None:
    """The value of `--resume X` / `--resume=X` in `argv`, if any."""
    for i, token in enumerate(argv):
        if token == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            fail("--resume needs a value: the run directory (or checkpoint file) to continue, e.g. "
                 "--resume runs/iql/<dataset>/<run>")
        if token == "--resume" and i + 1 < len(argv):
            value = argv[i + 1]
            return None if value == "None" else value
        if token.startswith("--resume="):
            value = token.split("=", 1)[1]
            return None if value in ("", "None") else value
    return None


def git_commit() -> str:
    """The repository's HEAD commit, with `-dirty` when tracked files differ; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (head + ("-dirty" if dirty else "")) if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform(), "git_commit": git_commit(),
           "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


class Progress:
    """A one-line progress bar on stderr with steps/s; plain periodic lines when stderr is not a TTY."""

    def __init__(self, name: str, total: int, initial: int = 0):
        self.name, self.total, self.step = name, total, initial
        self.tty = sys.stderr.isatty()
        self.start_time = self.last_print = time.perf_counter()
        self.start_step = initial
        self.extra = ""
        self.interval = 0.5 if self.tty else 30.0

    def update(self, step: int) -> None:
        self.step = step
        now = time.perf_counter()
        if now - self.last_print >= self.interval:
            self.last_print = now
            self._print(now)

    def _print(self, now: float, end: str = "") -> None:
        rate = (self.step - self.start_step) / max(now - self.start_time, 1e-9)
        eta = (self.total - self.step) / rate if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
        pct = 100.0 * self.step / max(self.total, 1)
        line = f"[{self.name}] {self.step}/{self.total} {pct:5.1f}% {rate:7.1f} steps/s eta {eta_s}{self.extra}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100) + end)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        self._print(time.perf_counter(), end="\n")


def new_run_dir(parent: Path, prefix: str) -> Path:
    """Create and return a fresh run directory `<parent>/<prefix>-<YYYYmmdd-HHMMSS>[-k]`, exclusively.

    `mkdir` without exist_ok is atomic: two runs started in the same second (a sweep) get `...-HHMMSS` and
    `...-HHMMSS-2`, never one shared folder.
    """
    parent.mkdir(parents=True, exist_ok=True)
    base = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1, 10_000):
        path = parent / (base if k == 1 else f"{base}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    fail(f"could not create a fresh run directory under {parent}")


def resumed_run_dir(resume: str, ckpt: dict) -> Path:
    """The run directory a `--resume` continues in: the one named (a run directory, or the folder of the
    checkpoint file given), so that a copied or moved run continues where it now is. Only when the path
    names a checkpoint outside any run directory (`--checkpoint-dir`) is the recorded run directory used."""
    path = Path(resume)
    for candidate in (path, path.parent):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    recorded = Path(ckpt.get("run_dir", ""))
    if ckpt.get("run_dir") and (recorded / "config.json").is_file():
        return recorded
    fail(f"--resume {resume} names a checkpoint whose run directory ({ckpt.get('run_dir')}) is gone; pass "
         f"the run directory (the folder holding config.json and metrics.jsonl)")


def _remove_stale_tmp(checkpoint_path: Path) -> None:
    """A kill during a checkpoint write leaves `checkpoint.pt.tmp`; the checkpoint itself is intact."""
    tmp = checkpoint_path.with_name(checkpoint_path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu().item())
    return float(value)


_RUN_LOCKS: dict[str, Any] = {}  # run directory -> its open, flock-ed .lock file, while this process trains it


class Run:
    """One training run: directory, metrics, wandb, progress, checkpoints and resume.

    Usage in an algorithm's `train(config)`:
        run = Run("bc", config, dataset, device)
        start = run.resume(agent, sampler)             # 0, or the checkpoint's step with --resume
        for step in run.steps(start):                   # progress bar; yields 1..max_steps
            logs = agent.update(sampler.sample(config.batch_size))
            if run.should_log(step): run.log(step, logs)
            ...
    """

    def __init__(self, algo: str, config: Any, dataset: Any, device: torch.device,
                 normalizer: Any = None):
        self.algo, self.config, self.dataset, self.device = algo, config, dataset, device
        self.normalizer = normalizer
        if getattr(config, "capture_video", False):
            # the encoder is there and the env draws a frame here (MuJoCo: a headless OpenGL backend), checked
            # before anything is written or trained: a run never fails at its first video after hours of training
            from common.video import check_recording

            check_recording(dataset.make_env, getattr(dataset.eval_env_spec, "id", dataset.name))
        # an online phase (common/online.py) follows the max_steps offline updates: one update per env step
        self.online_steps = int(getattr(config, "online_steps", 0) or 0)
        self.total_steps = config.max_steps + self.online_steps
        self.config_dict = dataclasses.asdict(config)
        self.wandb = None
        self._last_log_time = time.perf_counter()
        self._last_log_step = 0
        self._excluded_time = 0.0  # evaluation and checkpoint time, left out of steps/s
        self._evaluated_steps: set[int] = set()  # steps whose evaluation row a resumed run keeps
        self._switch_entries: dict | None = None  # the evaluation at the switch to the online phase
        resume_ckpt = None
        if getattr(config, "resume", None):
            # read (and checked) before anything of the run is written
            self._resume_file = find_checkpoint(config.resume)
            resume_ckpt = load_checkpoint(self._resume_file, map_location=device)
            self._check_resume_compatible(resume_ckpt)
        self._resume_ckpt = resume_ckpt
        created = False
        try:
            if resume_ckpt is not None:
                self.dir = resumed_run_dir(config.resume, resume_ckpt)
                self._lock()
            else:
                self.dir = new_run_dir(Path(config.runs_dir) / algo / dataset.name.replace("/", "-"),
                                       str(config.seed))
                created = True
                self._lock()
                self._write_config()
            self.checkpoint_path = self._checkpoint_location()
            self.metrics_file = None
        except OSError as err:
            if created:
                shutil.rmtree(self.dir, ignore_errors=True)
            where = getattr(self, "dir", Path(config.runs_dir))
            fail(f"cannot write the run directory {where}: {err.strerror or err} (choose another with --runs-dir)")
        _remove_stale_tmp(self.checkpoint_path)
        if resume_ckpt is None:
            self._open_metrics()
        if config.track:
            try:
                self._init_wandb(resume_ckpt)
            except Exception as err:
                if self.metrics_file is not None:
                    self.metrics_file.close()
                if created:
                    shutil.rmtree(self.dir, ignore_errors=True)
                if isinstance(err, UserError):
                    raise
                fail(f"--track: wandb could not start: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        print(f"run directory: {self.dir}", file=sys.stderr, flush=True)

    # --- set-up -------------------------------------------------------------------------------------
    def _lock(self) -> None:
        """Hold an exclusive lock on the run directory while this process trains in it: a second `--resume`
        of the same run fails in one line instead of interleaving two runs' checkpoints and metrics. The
        operating system releases the lock when the process ends, however it ends; within one process a
        later Run of the same directory (after an earlier one stopped with an error) takes it over."""
        key = str(self.dir.resolve())
        previous = _RUN_LOCKS.pop(key, None)
        if previous is not None:
            previous.close()
        lock_file = open(self.dir / ".lock", "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _RUN_LOCKS[key] = lock_file
        except OSError:
            lock_file.close()
            fail(f"run directory {self.dir} is being trained by another process right now; wait for it to end "
                 f"(or stop it) before resuming it")

    def _write_config(self) -> None:
        (self.dir / "config.json").write_text(json.dumps(self.config_dict, indent=2, default=str))
        (self.dir / "versions.json").write_text(json.dumps(versions(self.device), indent=2))

    def _open_metrics(self) -> None:
        self.metrics_file = open(self.dir / "metrics.jsonl", "a")

    def _checkpoint_location(self) -> Path:
        """Where this run's checkpoints go: the run directory, or under --checkpoint-dir in a folder of its own
        (`<checkpoint-dir>/<algo>/<dataset>/<run>/`: runs sharing one --checkpoint-dir never overwrite each
        other's). Nothing is written here: the run directory's `checkpoint.path` pointer is updated only after
        a checkpoint has been written (`save_checkpoint`), so it always names the newest one."""
        if not self.config.checkpoint_dir:
            return self.dir / CHECKPOINT_NAME
        rel = self.dir.resolve().relative_to(self.dir.resolve().parents[2])  # <algo>/<dataset>/<run>
        path = Path(self.config.checkpoint_dir).resolve() / rel / CHECKPOINT_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            fail(f"--checkpoint-dir {self.config.checkpoint_dir} cannot be written: {err.strerror or err}")
        return path

    def _check_resume_compatible(self, ckpt: dict) -> None:
        if ckpt.get("algo") != self.algo:
            fail(f"--resume checkpoint is from '{ckpt.get('algo')}', not '{self.algo}'")
        saved = ckpt.get("config", {})
        for key in ("env", "seed"):
            if saved.get(key) != self.config_dict.get(key):
                fail(f"--resume checkpoint has {key}={saved.get(key)!r} but this run has "
                     f"{key}={self.config_dict.get(key)!r}; pass the same --{key}")
        if ckpt["step"] > self.total_steps:
            fail(f"--resume checkpoint is at step {ckpt['step']}, beyond --max-steps {self.config.max_steps}"
                 + (f" + --online-steps {self.online_steps}" if self.online_steps else ""))

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint's step (the resumed run logs them again), and a partial
        last line that a kill during a write leaves behind. Remembers the steps whose evaluation is kept, so
        that resuming a finished run does not append its final evaluation a second time."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: the resumed run writes that step again
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                kept.append(line)
                if any(key.startswith("eval/") for key in entry):
                    self._evaluated_steps.add(entry["step"])
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def _init_wandb(self, resume_ckpt: dict | None) -> None:
        try:
            import wandb
        except ImportError:
            fail("--track needs wandb: pip install wandb")
        run_id = resume_ckpt.get("wandb_id") if resume_ckpt else None
        self.wandb = wandb.init(project=self.config.wandb_project, config=self.config_dict,
                                name=f"{self.algo}-{self.dataset.name}-{self.config.seed}",
                                group=f"{self.algo}-{self.dataset.name}", dir=str(self.dir),
                                id=run_id, resume="allow" if run_id else None)

    # --- loop -----------------------------------------------------------------------------------------
    def resume(self, agent: Any, sampler: Any) -> int:
        """Restore agent, sampler and RNG state from `--resume`; return the step to continue from (or 0)."""
        ckpt = self._resume_ckpt
        if ckpt is None:
            return 0
        try:
            agent.load_state_dict(ckpt["agent"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            fail(f"--resume {self._resume_file}: its saved {self.algo} state does not fit this version of "
                 f"{self.algo}.py ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the run "
                 f"was made by another version of the file (nothing was written)")
        if sampler is not None and ckpt.get("sampler") is not None:
            sampler.load_state_dict(ckpt["sampler"])
        set_rng_state(ckpt["rng"])
        # everything read: only now does the run directory change (config, metrics after the checkpoint's step)
        try:
            self._write_config()
            self._truncate_metrics(ckpt["step"])
            self._open_metrics()
        except OSError as err:
            fail(f"cannot write the run directory {self.dir}: {err.strerror or err}")
        print(f"resumed from step {ckpt['step']} ({self._resume_file})", file=sys.stderr)
        self._last_log_step = ckpt["step"]
        if self._resume_file.resolve() != self.checkpoint_path.resolve():
            # a new --checkpoint-dir (or the run directory again) receives the newest checkpoint right away
            self.save_checkpoint(int(ckpt["step"]), agent, sampler)
        return int(ckpt["step"])

    def steps(self, start: int) -> Iterator[int]:
        """Yield steps start+1 .. max_steps (+ online_steps) with a progress bar."""
        self.progress = Progress(f"{self.algo} {self.dataset.name}", self.total_steps, start)
        self._last_log_step = start
        self._last_log_time = time.perf_counter()
        for step in range(start + 1, self.total_steps + 1):
            yield step
            self.progress.update(step)
        self.progress.close()

    def should_log(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step in (self.config.max_steps, self.total_steps)

    def should_eval(self, step: int) -> bool:
        """Every eval_every steps, on the same cadence across the phase boundary; with an online phase also at
        the switch (the offline phase's final score). The run's last step is evaluated by train() itself."""
        if step == self.total_steps:
            return False
        switch = self.online_steps > 0 and step == self.config.max_steps
        return switch or (self.config.eval_every > 0 and step % self.config.eval_every == 0)

    def should_checkpoint(self, step: int) -> bool:
        every = self.config.checkpoint_every
        return (every > 0 and step % every == 0) or step in (self.config.max_steps, self.total_steps)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Read `metrics` to floats (the only host sync), check them, and write them out.

        Adds `perf/steps_per_sec` over the steps since the previous log (evaluation time excluded).
        A NaN or infinite value stops the run with its name and step.
        """
        values = {k: _to_float(v) for k, v in metrics.items()}
        for key, value in values.items():
            if not np.isfinite(value):
                fail(f"{key} is {value} at step {step} (values are checked every --log-every="
                     f"{self.config.log_every} steps); stopping. The last good checkpoint is "
                     f"{self.checkpoint_path if self.checkpoint_path.exists() else 'not written yet'}")
        now = time.perf_counter()
        if any(k.startswith("train/") for k in values) and step > self._last_log_step:
            elapsed = now - self._last_log_time - self._excluded_time
            values["perf/steps_per_sec"] = (step - self._last_log_step) / max(elapsed, 1e-9)
            self._last_log_step, self._last_log_time, self._excluded_time = step, now, 0.0
        self._write(step, values)
        return values

    def _write(self, step: int, values: dict[str, float]) -> None:
        self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_eval(self, step: int, result: dict) -> None:
        from common.evaluation import eval_log_entries

        entries = eval_log_entries(result)
        if self.online_steps and step == self.config.max_steps:
            self._switch_entries = entries  # the offline phase's final score: the summary names it
        if step not in self._evaluated_steps:  # a resumed finished run evaluates again: one row per step
            self._write(step, entries)
        score = entries.get("eval/normalized_score_mean")
        self.progress.extra = (f" | eval score {score:.1f}" if score is not None
                               else f" | eval return {entries['eval/return_mean']:.1f}")

    def video_for(self, step: int, group: int = 0):
        """The video recorder of the evaluation at `step` (pass it as `evaluate(..., video=)`), or None without
        --capture-video. It writes `videos/step-<step>-episode-<i>.mp4` in the run directory: the final
        evaluation's (step `total_steps`) first `common.video.FINAL_EPISODES` episodes, a periodic one's first
        `PERIODIC_EPISODES`; with --track they go to W&B as `eval/video_episode_<i>` at that step. `group`: the
        group of `evaluate_stateful(groups=...)` recorded (the one whose score the run reports)."""
        if not getattr(self.config, "capture_video", False):
            return None
        from common.video import FINAL_EPISODES, PERIODIC_EPISODES, VideoRecorder

        episodes = FINAL_EPISODES if step >= self.total_steps else PERIODIC_EPISODES
        return VideoRecorder(self.dir / "videos", f"step-{step}", episodes, group,
                             on_written=lambda paths: self._log_videos(step, paths))

    def _log_videos(self, step: int, paths: list[Path]) -> None:
        if self.wandb is None:
            return
        import wandb

        self.wandb.log({f"eval/video_episode_{i}": wandb.Video(str(path), format="mp4")
                        for i, path in enumerate(paths)}, step=step)

    def timed(self):
        """Context manager whose time is left out of steps/s (evaluation, checkpoints)."""
        run = self

        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                run._excluded_time += time.perf_counter() - self.t

        return _Timer()

    # --- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, agent: Any, sampler: Any) -> None:
        """Write the checkpoint atomically; refuse to overwrite a good one with non-finite weights."""
        state = agent.state_dict()
        tensors = [t for t in _walk_tensors(state) if t.is_floating_point()]
        if tensors and not bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
            fail(f"non-finite network weights at step {step}; not overwriting the last checkpoint "
                 f"{self.checkpoint_path}")
        pointer = self.dir / CHECKPOINT_POINTER
        save_checkpoint(self.checkpoint_path, {
            "format": CHECKPOINT_FORMAT, "step": step, "algo": self.algo, "algo_file": _algorithm_file_of(agent), "config": self.config_dict,
            "agent": state,
            "sampler": None if sampler is None else sampler.state_dict(), "rng": rng_state(),
            "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
            "spec": dataclasses.asdict(self.dataset.spec), "run_dir": str(self.dir),
            "wandb_id": None if self.wandb is None else self.wandb.id,
        })
        # the run directory names its newest checkpoint: a pointer when it lies under --checkpoint-dir, none
        # when it is the run directory's own checkpoint.pt (find_checkpoint prefers the pointer)
        try:
            if self.checkpoint_path.parent.resolve() == self.dir.resolve():
                pointer.unlink(missing_ok=True)
            else:
                atomic_write_text(pointer, str(self.checkpoint_path) + "\n")
        except OSError as err:
            fail(f"cannot write {pointer}: {err.strerror or err}")

    def finish(self, result: dict, extra: dict | None = None) -> dict:
        """Write summary.json, print the closing line, close files."""
        from common.evaluation import format_result

        summary = {"algo": self.algo, "env": self.dataset.name, "minari_id": self.dataset.minari_id,
                   "seed": self.config.seed, "steps": self.config.max_steps,
                   "return_mean": result["return_mean"], "return_std": result["return_std"],
                   "normalized_score_mean": result["normalized_mean"],
                   "normalized_score_std": result["normalized_std"],
                   "reference_scores": self.dataset.ref_source, "eval_episodes": len(result["returns"]),
                   "dataset_sha256": (self.dataset.metadata or {}).get("sha256"),
                   "git_commit": git_commit(), "run_dir": str(self.dir), **(extra or {})}
        if self.online_steps:
            switch = self._switch_entries or self._logged_eval(self.config.max_steps)
            summary.update(online_steps=self.online_steps, phases=(
                f"offline: {self.config.max_steps} updates on the dataset; online: {self.online_steps} env steps "
                f"with one update each"),
                offline_return_mean=(switch or {}).get("eval/return_mean"),
                offline_normalized_score_mean=(switch or {}).get("eval/normalized_score_mean"))
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics_file.close()
        lock = _RUN_LOCKS.pop(str(self.dir.resolve()), None)
        if lock is not None:
            lock.close()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()
        steps = f"{self.config.max_steps} steps" + (f" + {self.online_steps} online" if self.online_steps else "")
        print(f"{self.algo} on {self.dataset.name}, seed {self.config.seed}, {steps}: "
              f"{format_result(result, self.dataset)}", flush=True)
        if getattr(self.config, "capture_video", False):
            print(f"videos: {self.dir / 'videos'}", file=sys.stderr, flush=True)
        return summary

    def _logged_eval(self, step: int) -> dict | None:
        """The evaluation row of `step` in metrics.jsonl (a resumed run's switch score), or None."""
        for line in (self.dir / "metrics.jsonl").read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("step") == step and "eval/return_mean" in entry:
                return entry
        return None


def _algorithm_file_of(agent: Any) -> str | None:
    """The file that defines `agent`'s class, as a checkpoint records it (`load_agent` runs that file)."""
    module = sys.modules.get(type(agent).__module__)
    file = getattr(module, "__file__", None)
    return recorded_algorithm_file(file) if file else None


def _walk_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_tensors(v)
