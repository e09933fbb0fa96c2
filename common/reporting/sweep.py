"""Sweeps: algorithms x datasets x seeds on Ray Tune, resumable, one ordinary run directory per trial.

    python -m common.reporting.sweep --algos iql td3_bc \\
        --envs local/pendulum/medium-replay-v0 local/pendulum/medium-expert-v0 --seeds 0 1 2
    python -m common.reporting.sweep --algos bc iql --envs local/pendulum/medium-v0 --seeds 0 1 \\
        --name short -- --max-steps 5000 --eval-every 1000        # flags after -- go to every trial
    python -m common.reporting.sweep ... --address auto --gpus-per-trial 0.25   # on a running Ray cluster

Each trial is one call of the algorithm file's own `train(config)`, with the Config built from the grid
point and the flags after `--` exactly as `python algorithms/<algo>.py --env ... --seed ... <flags>` would
build it, so it writes its usual run directory `<runs-dir>/<algo>/<dataset>/<seed>-<time>/`.

Locally (the default) Ray starts inside this process and runs one trial per `--threads` cores at once
(`--max-concurrent` caps it). With `--address HOST:PORT`, `auto` or `RAY_ADDRESS`, it joins a running
cluster (`ray start --head` on one machine, `ray start --address HEAD:6379` on the others); every node
must see this repository, the datasets and `--runs-dir` at the same paths (shared storage).
Each trial asks for `--cpus-per-trial` CPUs (default: `--threads`) and `--gpus-per-trial` GPUs (a fraction
shares a GPU: 0.25 puts four trials on each; memory is not isolated).

Resuming is this tool's own bookkeeping on top of Ray, not `Tuner.restore`: the sweep folder
`<runs-dir>/sweeps/<name>/` holds `manifest.json`, mapping each trial (algorithm, dataset, seed, flags) to
its run directory and status. Rerunning the same command skips every trial whose run directory holds
`summary.json`, continues an unfinished one from its checkpoint (the library's `--resume`, which continues
a run exactly), and starts the rest. A finished run made outside the sweep with the same settings counts as
done too. Tune's own restore would need every trial to hand its state to Ray as a Ray checkpoint (a second
copy of what `checkpoint.pt` already holds), ties the state to Ray's version and storage layout, and cannot
add a seed or an algorithm to a stopped grid; the manifest and the run directories are plain files that
`make results` reads as well.

A trial that raises is recorded with its error (traceback in `<sweep>/logs/<trial>.log`, where each trial's
output goes) and the others go on. Bad input stops before anything starts: an unknown algorithm or dataset
(with the closest names), flags the algorithm does not accept, an unreachable cluster address.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.checkpoint import import_algorithm, atomic_write_text, find_checkpoint  # noqa: E402
from common.errors import EXIT_USER_ERROR, UserError, fail  # noqa: E402

ALGORITHMS = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))
SET_BY_SWEEP = {"--env": "--envs", "--seed": "--seeds", "--threads": "--threads", "--runs-dir": "--runs-dir",
                "--resume": "(rerun the sweep to resume it)"}
# Config fields that say where or how a run is made, not what it computes: two runs that differ only in
# these are the same trial (a finished run made outside the sweep is adopted).
WHERE_FIELDS = {"runs_dir", "threads", "resume", "checkpoint_dir", "track", "wandb_project", "download",
                "compile", "device", "capture_video"}
CONNECT_TIMEOUT_S = 10.0  # joining a cluster (--connect-timeout): Ray itself retries a dead address for minutes
PROGRESS_EVERY_S = 20.0  # at most one progress line per trial this often (evaluations always print)


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trial:
    """One grid point: an algorithm on a dataset with a seed, and the flags every trial gets."""

    algo: str
    env: str
    seed: int
    flags: tuple[str, ...]

    @property
    def key(self) -> str:
        """The manifest's key: the command line of this trial, minus the parts the sweep chooses."""
        return " ".join([self.algo, self.env, f"seed={self.seed}", *self.flags])

    @property
    def label(self) -> str:
        """How progress lines name the trial (the flags, the same for every trial, are printed once)."""
        return f"{self.algo} {self.env} seed {self.seed}"

    @property
    def name(self) -> str:
        """A file name for the trial's log."""
        tail = f"-{hashlib.sha1(' '.join(self.flags).encode()).hexdigest()[:6]}" if self.flags else ""
        return f"{self.algo}-{self.env.replace('/', '-')}-seed{self.seed}{tail}"

    def argv(self, runs_dir: Path, threads: int, device: str | None, download: bool = True) -> list[str]:
        """The algorithm's command-line arguments for this trial."""
        extra = ["--device", device] if device and not any(f.split("=")[0] == "--device" for f in self.flags) else []
        extra += [] if download else ["--no-download"]
        return ["--env", self.env, "--seed", str(self.seed), "--threads", str(threads),
                "--runs-dir", str(runs_dir), *extra, *self.flags]


def check_algorithms(algos: list[str]) -> None:
    """Every name must be a file in algorithms/; one line with the closest names otherwise."""
    for algo in algos:
        if algo not in ALGORITHMS:
            close = difflib.get_close_matches(algo, ALGORITHMS, n=3, cutoff=0.5)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            fail(f"unknown algorithm '{algo}'{hint} (known: {', '.join(ALGORITHMS)})")


def check_flags(flags: list[str]) -> None:
    for flag in flags:
        name = flag.split("=")[0]
        if name in SET_BY_SWEEP:
            fail(f"{name} is chosen by the sweep for each trial; use {SET_BY_SWEEP[name]} instead of passing it "
                 f"after --")


def parse_config(module: Any, argv: list[str]) -> Any:
    """The algorithm's Config from `argv`, parsed by tyro as its command line would be; `UserError` for bad
    flags (tyro prints which flag and why just before)."""
    import tyro

    try:
        with contextlib.redirect_stdout(sys.stderr):
            return tyro.cli(module.Config, args=argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        algo = Path(module.__file__).stem
        fail(f"{algo}.py does not accept these flags: {' '.join(argv)} (see `python algorithms/{algo}.py --help`)")


def resolved_config(module: Any, argv: list[str]) -> Any:
    """`parse_config` plus what `train` fills before it writes anything: validation, per-dataset defaults."""
    from common.runs import apply_dataset_settings, settings_table, validate_config

    config = parse_config(module, argv)
    validate_config(config)
    config = apply_dataset_settings(config, settings_table(module, config), quiet=True)
    validate_config(config)
    return config


def check_datasets(envs: list[str], download: bool) -> None:
    """Every dataset must resolve and be available; one missing from the Minari root is fetched here, once
    (the embedded pendulum suite is built, a remote id downloaded when online), or refused with the
    library's message (closest names, how to build or download it) before any trial starts."""
    from common.datasets import load_dataset, local_dataset_ids, resolve_name

    stored = set(local_dataset_ids())
    for env in envs:
        resolved = resolve_name(env)
        if resolved.minari_id not in stored:
            load_dataset(env, download=download)


def config_signature(config: dict) -> dict:
    """The fields of a config that decide what a run computes (JSON-normalised)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in WHERE_FIELDS}, default=str))


def find_finished_run(runs_dir: Path, algo: str, config: Any) -> Path | None:
    """A finished run (summary.json) under `runs_dir` made with the same settings as `config`, or None."""
    want = config_signature(dataclasses.asdict(config))
    folder = runs_dir / algo / config.env.replace("/", "-")
    for run in sorted(folder.glob(f"{config.seed}-*")):
        try:
            if (run / "summary.json").is_file() and config_signature(
                    json.loads((run / "config.json").read_text())) == want:
                return run
        except (OSError, ValueError):
            continue
    return None


# --------------------------------------------------------------------------------------------------
# The sweep folder: manifest.json (trial key -> run directory, status), logs/, a lock
# --------------------------------------------------------------------------------------------------


class Manifest:
    """`<sweep>/manifest.json`: {trial key: {algo, env, seed, flags, run_dir, status, error, ...}}.

    Written atomically after every change by the driver only (trials report to the driver through Ray),
    so a sweep killed at any moment leaves a readable manifest.
    """

    def __init__(self, folder: Path):
        self.path = folder / "manifest.json"
        self.trials: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.trials = json.loads(self.path.read_text())["trials"]
            except (OSError, ValueError, KeyError, TypeError):
                fail(f"{self.path} is not a sweep manifest (unreadable JSON); move it away to start afresh")

    def entry(self, trial: Trial) -> dict:
        return self.trials.setdefault(trial.key, {"algo": trial.algo, "env": trial.env, "seed": trial.seed,
                                                  "flags": list(trial.flags), "run_dir": None,
                                                  "status": "pending"})

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"trials": self.trials}, indent=2) + "\n")


@contextlib.contextmanager
def trial_lock(runs_dir: Path, algo: str, config: Any):
    """Hold the lock of one trial (algorithm and settings, seed included) across every sweep on `runs_dir`.

    Two sweeps of different names that share trials would otherwise train each shared trial twice, at once.
    The second one to reach a trial waits here until the first is done with it, then finds its finished run
    (`find_finished_run`) and adopts it. Yields the adopted finished run, or None (train it). An OS lock: a
    killed trial releases it."""
    import fcntl

    signature = json.dumps(config_signature(dataclasses.asdict(config)), sort_keys=True)
    key = hashlib.sha256(f"{algo} {signature}".encode()).hexdigest()[:24]
    folder = runs_dir / "sweeps" / ".trials"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks while another sweep trains this trial
        yield find_finished_run(runs_dir, algo, config)


@contextlib.contextmanager
def sweep_lock(folder: Path):
    """Refuse a second sweep of the same name while one runs (an OS lock, released when the process dies)."""
    import fcntl

    handle = open(folder / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        fail(f"another sweep is running in {folder}; wait for it, or choose another --name")
    try:
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def run_dir_file(folder: Path, trial: Trial) -> Path:
    """Where a trial writes its run directory the moment it has one (`<sweep>/logs/<trial>.run_dir`)."""
    return folder / "logs" / f"{trial.name}.run_dir"


def plan(trials: list[Trial], manifest: Manifest, runs_dir: Path, configs: dict[Trial, Any],
         folder: Path) -> dict[Trial, str | None]:
    """What each trial needs: "done" (a finished run exists), a run directory to resume, or None (new).

    A trial's run directory is the manifest's, else the one the trial wrote to its `.run_dir` file (a sweep
    killed hard may not have heard of it). An unfinished run directory with no checkpoint yet has nothing to
    resume: it is removed and the trial starts again (else `make results` would flag it forever).
    """
    out: dict[Trial, str | None] = {}
    for trial in trials:
        entry = manifest.entry(trial)
        marker = run_dir_file(folder, trial)
        if not entry.get("run_dir") and marker.is_file():
            entry["run_dir"] = marker.read_text().strip() or None
        run = Path(entry["run_dir"]) if entry.get("run_dir") else None
        if run is not None and (run / "summary.json").is_file():
            out[trial] = "done"
            entry["status"] = "finished"
            continue
        adopted = find_finished_run(runs_dir, trial.algo, configs[trial])
        if adopted is not None:
            out[trial] = "done"
            entry.update(run_dir=str(adopted), status="finished", note="finished run found under --runs-dir")
            continue
        if run is not None and run.is_dir():
            try:
                find_checkpoint(run)
                out[trial] = str(run)
                continue
            except UserError:
                print(f"note: {run} was started but holds no checkpoint yet; starting {trial.key} again",
                      file=sys.stderr)
                shutil.rmtree(run, ignore_errors=True)
        entry["run_dir"] = None
        marker.unlink(missing_ok=True)
        out[trial] = None
    return out


# --------------------------------------------------------------------------------------------------
# Ray: connecting, the trial function, progress
# --------------------------------------------------------------------------------------------------


def quiet_ray_environment() -> None:
    """Before Ray is imported: no usage reporting, no Tune tables and loggers, no per-trial folders as cwd."""
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AIR_NEW_OUTPUT": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
                       "RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_DEDUP_LOGS": "0",
                       "RAY_AIR_RICH_LAYOUT": "0", "RAY_TRAIN_V2_ENABLED": "0"}.items():
        os.environ.setdefault(key, value)


def probe_address(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds when `host:port` (or `ray://host:port`) refuses, does not resolve or does not answer."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        fail(f"--address {address}: expected HOST:PORT (the head's GCS port, 6379 by default), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        fail(f"cannot reach a Ray cluster at {address}: {err.strerror or type(err).__name__} (is `ray start --head` "
             f"running there, and is the port open?)")


def connect(address: str | None, cores: int, timeout: float = CONNECT_TIMEOUT_S) -> str:
    """Start Ray inside this process (address None) or join the cluster at `address`; returns a description.

    Joining is bounded by `timeout` seconds: Ray's own client retries a dead address for a minute or more.
    """
    import logging

    import ray

    common = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                  runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}})
    if address is None:
        ray.init(address="local", num_cpus=cores, **common)  # "local": never join a `ray start` found here
        return f"local Ray in this process, {cores} CPUs"
    probe_address(address)
    outcome: dict[str, Any] = {}

    def join() -> None:
        try:
            ray.init(address=address, **common)
            outcome["ok"] = True
        except Exception as err:  # ConnectionError, RuntimeError, ...: all mean "not joined"
            outcome["error"] = err

    # Ray's C++ client prints a warning a second while it retries: keep the console to our one line, and
    # read the warnings for the one cause worth naming (a cluster with token authentication).
    console = os.dup(2)
    captured = tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" not in outcome:
        captured.seek(0)
        hint = " (start one with `ray start --head`, or drop --address/RAY_ADDRESS to run locally)"
        if b"Authentication token" in captured.read():
            why, hint = ("the cluster uses token authentication: set RAY_AUTH_MODE=token and give this machine the "
                         "head's token (~/.ray/auth_token or RAY_AUTH_TOKEN; docs.ray.io ray-security/token-auth)", "")
        elif "error" in outcome:
            why = f"{type(outcome['error']).__name__}: {str(outcome['error']).splitlines()[0]}"
        else:
            why = f"no answer within {timeout:g} s"
        raise _Unreachable(f"cannot join a Ray cluster at {address}: {why}{hint}", console)
    os.dup2(console, 2)
    os.close(console)
    captured.close()
    res = ray.cluster_resources()
    return f"Ray cluster at {address}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, " \
           f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s)"


class _Unreachable(UserError):
    """A cluster that does not answer: Ray's connection thread may still be blocked (and writing to stderr,
    which points to /dev/null meanwhile), so the message goes to the console's descriptor and we exit hard."""

    def __init__(self, message: str, console: int):
        super().__init__(message)
        self.console = console


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def reporting_run(base: type, report, run_dir_file: Path) -> type:
    """`base` (common.runs.Run) that also reports to Ray: its run directory when made, each log, each evaluation.

    Injected as the algorithm module's `Run` inside the trial's process only; `train` itself is unchanged.
    The run directory also goes to `run_dir_file` at once, so that a sweep killed before Ray delivered the
    report still finds (and resumes) the run.
    """

    class ReportingRun(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            atomic_write_text(run_dir_file, str(self.dir) + "\n")
            steps = int(self.config.max_steps) + int(getattr(self.config, "online_steps", 0) or 0)  # both phases
            report({"event": "started", "run_dir": str(self.dir), "max_steps": steps})

        def log(self, step, metrics):
            values = super().log(step, metrics)
            report({"event": "progress", "step": int(step), "steps_per_sec": values.get("perf/steps_per_sec", 0.0)})
            return values

        def log_eval(self, step, result):
            super().log_eval(step, result)
            score = result.get("normalized_mean")
            report({"event": "eval", "step": int(step), "return": float(result["return_mean"]),
                    "score": float("nan") if score is None else float(score)})

    return ReportingRun


def run_trial(space: dict) -> None:
    """Ray Tune's trainable: one trial = the algorithm's own `train(config)`, output to the trial's log file.

    `space["trial"]` holds the trial's key, algorithm, argv, run directory to resume and log file. Errors are
    caught and reported (with the traceback in the log) so that the sweep records them and goes on.
    """
    from ray import tune

    from common.runs import cli_config

    params = space["trial"]

    def report(metrics: dict) -> None:
        tune.report({"key": params["key"], **metrics})

    os.environ.update(params["env_vars"])
    Path(params["log"]).parent.mkdir(parents=True, exist_ok=True)
    with open(params["log"], "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {params['key']}"
              f"{' (resuming ' + params['resume'] + ')' if params['resume'] else ''}", flush=True)
        start = time.perf_counter()
        try:
            module = import_algorithm(params["algo"])
            # a reused worker serves trial after trial with the module already imported: wrap its own Run, not
            # the previous trial's wrapper (whose report would speak for that trial, with this one's run directory),
            # and put it back afterwards
            base = module.Run
            module.Run = reporting_run(base, report, Path(params["run_dir_file"]))
            try:
                argv = params["argv"] + (["--resume", params["resume"]] if params["resume"] else [])
                config = cli_config(module.Config, argv)
                with trial_lock(Path(config.runs_dir), params["algo"], config) as adopted:
                    if adopted is not None:  # another sweep trained this very trial meanwhile
                        print(f"adopting {adopted}: finished by another sweep on the same --runs-dir", flush=True)
                        summary = {**json.loads((adopted / "summary.json").read_text()), "run_dir": str(adopted)}
                    else:
                        summary = module.train(config)
            finally:
                module.Run = base
        except (Exception, SystemExit) as err:
            if isinstance(err, SystemExit) and err.code in (0, None):
                raise  # Tune stops a trial (Ctrl-C on the sweep) by raising SystemExit(0) inside report()
            traceback.print_exc()
            report({"event": "failed", "error": _one_line(err), "seconds": time.perf_counter() - start})
            return
        score = summary.get("normalized_score_mean")
        report({"event": "finished", "run_dir": summary["run_dir"], "return": float(summary["return_mean"]),
                "score": float("nan") if score is None else float(score), "seconds": time.perf_counter() - start})


def _progress_callback(manifest: Manifest, by_key: dict[str, Trial], total: int, t0: float):
    from ray import tune

    class SweepProgress(tune.Callback):
        """Prints one line per trial event and keeps the manifest current (the driver is its only writer)."""

        def __init__(self):
            self.started: dict[str, float] = {}  # when each running trial's run began (this invocation)
            self.last_print: dict[str, float] = {}
            self.max_steps: dict[str, int] = {}
            self.done = 0

        def say(self, text: str) -> None:
            print(f"[{time.perf_counter() - t0:6.0f} s] {text}", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = result.get("key")
            if key not in by_key:
                return
            entry, event, label = manifest.trials[key], result.get("event"), by_key[key].label
            if event == "started":
                entry.update(run_dir=result["run_dir"], status="running")
                self.started[key] = time.perf_counter()
                self.max_steps[key] = result["max_steps"]
                self.last_print[key] = time.perf_counter()
                manifest.save()
                self.say(f"started  {label} -> {result['run_dir']}")
            elif event == "progress" and time.perf_counter() - self.last_print.get(key, 0.0) >= PROGRESS_EVERY_S:
                self.last_print[key] = time.perf_counter()
                self.say(f"running  {label}: step {result['step']}/{self.max_steps.get(key, '?')}, "
                         f"{result['steps_per_sec']:.0f} steps/s")
            elif event == "eval":
                self.say(f"eval     {label}: step {result['step']}/{self.max_steps.get(key, '?')}, "
                         f"{_score_text(result['score'], result['return'])}")
            elif event == "finished":
                self.done += 1
                self.started.pop(key, None)
                entry.update(run_dir=result["run_dir"], status="finished", error=None,
                             seconds=round(entry.get("seconds", 0.0) + result["seconds"], 1))
                manifest.save()
                self.say(f"finished {label}: {_score_text(result['score'], result['return'])} "
                         f"({result['seconds']:.0f} s) [{self.done}/{total} this run]")
            elif event == "failed":
                self.done += 1
                self.started.pop(key, None)
                entry.update(status="failed", error=result["error"],
                             seconds=round(entry.get("seconds", 0.0) + result["seconds"], 1))
                manifest.save()
                self.say(f"FAILED   {label}: {result['error']} (log: {trial.config['trial']['log']}) "
                         f"[{self.done}/{total} this run]")

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config["trial"]["key"]
            entry, label = manifest.trials[key], by_key[key].label
            if entry.get("status") != "failed":
                self.done += 1
                try:
                    text = (trial.get_error() or "").strip().splitlines()
                except Exception:  # the error file is Ray's; its absence must not stop the sweep
                    text = []
                entry.update(status="failed", error=text[-1] if text else "the trial's process died")
                manifest.save()
                self.say(f"FAILED   {label}: {entry['error']} [{self.done}/{total} this run]")

        def interrupted(self) -> None:
            """Count the time the running trials spent before an interrupt (their next run resumes them)."""
            for key, start in self.started.items():
                entry = manifest.trials[key]
                entry["seconds"] = round(entry.get("seconds", 0.0) + time.perf_counter() - start, 1)

    return SweepProgress()


def _score_text(score: float, ret: float) -> str:
    return f"return {ret:.1f}" + ("" if score != score else f", normalised score {score:.1f}")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    flags: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, flags = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m common.reporting.sweep", description=__doc__.split("\n")[0],
        epilog="Flags after -- go to every trial, e.g. `-- --max-steps 5000 --eval-every 1000`.")
    parser.add_argument("--algos", nargs="+", required=True, help="algorithm files (names in algorithms/)")
    parser.add_argument("--envs", nargs="+", required=True, help="datasets, as --env of the algorithms")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial (default 1)")
    parser.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs Ray reserves per trial "
                        "(default: --threads)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; a fraction shares one "
                        "(0.25: four trials per GPU). 0 (default): trials run with --device cpu unless given after --")
    parser.add_argument("--max-concurrent", type=int, default=None, help="at most this many trials at once "
                        "(default: as many as the CPUs and GPUs allow)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or None,
                        help="join a running Ray cluster (HOST:PORT, ray://HOST:PORT or auto; default $RAY_ADDRESS); "
                             "without it Ray runs inside this process")
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S, help="seconds to wait for "
                        "the cluster at --address before giving up (default %(default)g)")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go (default runs/); on a "
                        "cluster: storage every node sees")
    parser.add_argument("--name", default="sweep", help="the sweep's folder <runs-dir>/sweeps/<name>/ (manifest, "
                        "logs); rerun with the same name to resume")
    parser.add_argument("--no-download", action="store_true", help="never download a dataset")
    return parser.parse_args(argv), flags


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def sweep(argv: list[str]) -> int:
    args, flags = parse_args(argv)
    t0 = time.perf_counter()
    # 1. Everything that can be wrong is checked before anything is written or any trial starts.
    if args.threads < 1:
        fail(f"--threads must be at least 1, got {args.threads}")
    if args.gpus_per_trial < 0:
        fail(f"--gpus-per-trial must be 0 or positive, got {args.gpus_per_trial}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        fail(f"--max-concurrent must be at least 1, got {args.max_concurrent}")
    cpus_per_trial = args.threads if args.cpus_per_trial is None else args.cpus_per_trial
    cores = available_cores()
    if args.address is None and cpus_per_trial > cores:
        fail(f"each trial asks for {cpus_per_trial:g} CPUs but this machine has {cores}; lower --threads or "
             f"--cpus-per-trial")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name) or ".." in args.name:
        fail(f"--name {args.name!r}: a sweep's name is one folder name (letters, digits, '.', '_', '-'), kept under "
             f"<runs-dir>/sweeps/")
    check_algorithms(args.algos)
    check_flags(flags)
    from common.datasets import resolve_name

    for env in args.envs:
        resolve_name(env)  # unknown names, with suggestions, before any dataset is touched
    runs_dir = Path(args.runs_dir).resolve()
    device = None if args.gpus_per_trial > 0 else "cpu"
    trials = [Trial(a, e, s, tuple(flags)) for a in dict.fromkeys(args.algos) for e in dict.fromkeys(args.envs)
              for s in dict.fromkeys(args.seeds)]
    modules = {algo: import_algorithm(algo) for algo in dict.fromkeys(args.algos)}
    configs = {t: resolved_config(modules[t.algo], t.argv(runs_dir, args.threads, device, not args.no_download))
               for t in trials}
    check_datasets(list(dict.fromkeys(args.envs)), download=not args.no_download)
    quiet_ray_environment()
    import ray

    try:
        # A cluster is joined (or refused) before anything is written; a local Ray only starts when needed.
        where = connect(args.address, cores, args.connect_timeout) if args.address else None
        check_resources(args, cpus_per_trial)
        folder = runs_dir / "sweeps" / args.name
        folder.mkdir(parents=True, exist_ok=True)
        with sweep_lock(folder):
            manifest = Manifest(folder)
            todo = plan(trials, manifest, runs_dir, configs, folder)
            manifest.save()
            pending = [t for t in trials if todo[t] != "done"]
            print(f"sweep '{args.name}': {len(trials)} trials ({len(trials) - len(pending)} already finished, "
                  f"{sum(1 for t in pending if todo[t])} to resume, {sum(1 for t in pending if not todo[t])} to "
                  f"start); folder {folder}", flush=True)
            interrupted = False
            if pending:
                where = where or connect(None, cores)
                interrupted = _fit(args, pending, todo, manifest, folder, runs_dir, where, cpus_per_trial, device, t0)
            wall = time.perf_counter() - t0
            lines = final_table(trials, manifest, wall)
            (folder / "summary.md").write_text("\n".join(lines) + "\n")
            print("\n".join(lines), flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    failed = [t for t in trials if manifest.trials[t.key]["status"] == "failed"]
    unfinished = [t for t in trials if manifest.trials[t.key]["status"] not in ("finished", "failed")]
    if unfinished:
        print(f"{len(unfinished)} trials did not finish{' (interrupted)' if interrupted else ''}: rerun the same "
              f"command to resume them", file=sys.stderr)
        return 130 if interrupted else 1
    return 1 if failed else 0


def check_resources(args: argparse.Namespace, cpus_per_trial: float) -> None:
    """A trial must fit on the cluster joined (locally the CPU count was checked before)."""
    import ray

    if not ray.is_initialized():
        if args.gpus_per_trial > 0:
            import torch

            if torch.cuda.device_count() < args.gpus_per_trial:
                fail(f"--gpus-per-trial {args.gpus_per_trial:g}, but this machine has {torch.cuda.device_count()} "
                     f"CUDA GPUs")
        return
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) < args.gpus_per_trial:
        fail(f"--gpus-per-trial {args.gpus_per_trial:g}, but the Ray cluster has {resources.get('GPU', 0):g} GPUs")
    if resources.get("CPU", 0) < cpus_per_trial:
        fail(f"each trial asks for {cpus_per_trial:g} CPUs, more than the cluster's {resources.get('CPU', 0):g}")


def _fit(args, pending, todo, manifest, folder, runs_dir, where, cpus_per_trial, device, t0) -> bool:
    """Run the pending trials on Ray (already started or joined); returns whether it was interrupted (Ctrl-C)."""
    import logging

    from ray import tune

    logging.getLogger("ray").setLevel(logging.CRITICAL)  # trial errors are reported by SweepProgress, once
    env_vars = {k: os.environ[k] for k in ("MINARI_DATASETS_PATH", "HF_HUB_OFFLINE", "WANDB_MODE")
                if k in os.environ}
    params = [{"key": t.key, "algo": t.algo, "argv": t.argv(runs_dir, args.threads, device, not args.no_download),
               "resume": todo[t], "log": str(folder / "logs" / f"{t.name}.log"), "env_vars": env_vars,
               "run_dir_file": str(run_dir_file(folder, t))}
              for t in pending]
    for t in pending:
        manifest.trials[t.key]["status"] = "queued"
    manifest.save()
    concurrent = args.max_concurrent or 0
    print(f"running {len(pending)} trials on {where}; each {cpus_per_trial:g} CPU"
          f"{f', {args.gpus_per_trial:g} GPU' if args.gpus_per_trial else ''}, {args.threads} torch thread(s)"
          f"{f', at most {concurrent} at once' if concurrent else ''}; flags to every trial: "
          f"{' '.join(pending[0].flags) or '(none)'}", flush=True)
    progress = _progress_callback(manifest, {t.key: t for t in pending}, len(pending), t0)
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": cpus_per_trial, "gpu": args.gpus_per_trial}),
        param_space={"trial": tune.grid_search(params)},
        # reuse_actors: a worker process serves trial after trial, so torch and the datasets library are imported
        # once per process, not once per trial (each trial seeds and sets its threads itself, in `setup`)
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=time.strftime("fit-%Y%m%d-%H%M%S"), storage_path=str(folder / "ray"),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress]))
    interrupted = False
    try:
        tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
    if any(manifest.trials[t.key]["status"] in ("queued", "running") for t in pending):
        interrupted = True
        progress.interrupted()
    for t in pending:
        entry = manifest.trials[t.key]
        if entry["status"] in ("queued", "running"):
            entry["status"] = "interrupted"
    manifest.save()
    shutil.rmtree(folder / "ray", ignore_errors=True)  # Tune's own records: the manifest and logs say it all
    return interrupted


def final_table(trials: list[Trial], manifest: Manifest, wall: float) -> list[str]:
    """The sweep's closing table (also written to <sweep>/summary.md)."""
    lines = ["| algorithm | dataset | seed | status | final normalised score | trial time | run directory |",
             "|---|---|---|---|---|---|---|"]
    trial_seconds = 0.0
    for t in trials:
        entry = manifest.trials[t.key]
        run = Path(entry["run_dir"]) if entry.get("run_dir") else None
        score = "-"
        if run is not None and (run / "summary.json").is_file():
            try:
                summary = json.loads((run / "summary.json").read_text())
                value = summary.get("normalized_score_mean")
                score = f"{value:.1f}" if value is not None else f"return {summary['return_mean']:.1f}"
            except (OSError, ValueError, KeyError):
                score = "unreadable summary.json"
        status = entry["status"] + (f": {entry['error']}" if entry.get("error") and entry["status"] == "failed" else "")
        trial_seconds += entry.get("seconds") or 0.0
        seconds = f"{entry['seconds']:.0f} s" if entry.get("seconds") else "-"
        lines.append(f"| {t.algo} | {t.env} | {t.seed} | {status} | {score} | {seconds} | {run or '-'} |")
    flags = " ".join(trials[0].flags) if trials else ""
    lines += ["", f"flags: {flags or '(none)'}; sweep wall time {wall:.0f} s; trial times (from each "
                  f"run's start to its end, across interrupted and resumed parts) add up to {trial_seconds:.0f} s"]
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        return sweep(sys.argv[1:] if argv is None else argv)
    except _Unreachable as err:
        sys.stdout.flush()
        os.write(err.console, f"error: {err}\n".encode())
        os._exit(EXIT_USER_ERROR)  # Ray's connection thread may be blocked inside C++: do not wait for it
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
