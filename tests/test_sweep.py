"""The sweep runner: trials on a local Ray write ordinary run directories, resume, survive a failing trial.

Ray starts once (its start-up takes seconds): that sweep meets a trial whose run was cut after its
checkpoint (as a sweep killed during that trial leaves it), a new trial, and two trials on a corrupt dataset;
the same sweep over the two finished trials must then run nothing. Real kills (SIGINT, SIGKILL) of a sweep
are exercised by hand (their timing is not deterministic), not here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, load_algorithm, run_config

from common.reporting import sweep

FLAGS = ["--max-steps", "300", "--eval-every", "0", "--eval-episodes", "2", "--log-every", "100",
         "--checkpoint-every", "100", "--batch-size", "64"]
BROKEN = "test/broken/expert-v0"


@pytest.fixture(scope="module")
def broken_id(minari_root, pendulum_expert_id) -> str:
    """A stored dataset whose data file is garbage: it passes the sweep's checks, and its trials fail."""
    target = minari_root / BROKEN
    if not target.exists():
        shutil.copytree(minari_root / pendulum_expert_id, target)
        for data in (target / "data").glob("*.hdf5"):
            data.write_bytes(b"not an hdf5 file")
    return BROKEN


@dataclasses.dataclass
class Finished:
    returncode: int
    stdout: str


def sweep_args(tmp: Path, envs: list[str], *extra: str) -> list[str]:
    return ["--algos", "bc", "--envs", *envs, "--seeds", "0", "1", "--runs-dir", str(tmp / "runs"),
            "--name", "t", *extra, "--", *FLAGS]


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory, pendulum_expert_id, broken_id):
    """Seed 1 on pendulum cut at step 100 as a killed sweep leaves it, then the sweep, then the sweep again."""
    tmp = tmp_path_factory.mktemp("sweep")
    runs = tmp / "runs"
    # What a sweep killed during the trial "bc, pendulum, seed 1" leaves: a run with its step-100 checkpoint
    # and no summary, and the file in which the trial named its run directory.
    bc = load_algorithm("bc")
    cut = bc.train(run_config(bc.Config, pendulum_expert_id, tmp, seed=1, max_steps=100, eval_episodes=2,
                              log_every=100, checkpoint_every=100, batch_size=64, runs_dir=str(runs)))
    os.remove(Path(cut["run_dir"]) / "summary.json")
    trial = sweep.Trial("bc", pendulum_expert_id, 1, tuple(FLAGS))
    marker = sweep.run_dir_file(runs / "sweeps" / "t", trial)
    marker.parent.mkdir(parents=True)
    marker.write_text(cut["run_dir"] + "\n")

    outputs = []
    # The sweep in this process (Ray embedded, as `python -m common.reporting.sweep` runs it); then again
    # over the pendulum trials, which have all finished: nothing may run (and Ray need not start).
    for envs in ([pendulum_expert_id, broken_id], [pendulum_expert_id]):
        started, out = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(out):
            code = sweep.main(sweep_args(tmp, envs))
        summaries = {p: p.stat().st_mtime_ns for p in runs.glob("bc/*/*/summary.json")}
        outputs.append((Finished(code, out.getvalue()), time.perf_counter() - started, summaries))
    manifest = json.loads((runs / "sweeps" / "t" / "manifest.json").read_text())["trials"]
    return {"runs": runs, "cut": Path(cut["run_dir"]), "first": outputs[0], "second": outputs[1],
            "manifest": manifest, "folder": runs / "sweeps" / "t"}


def entry(manifest: dict, env: str, seed: int) -> dict:
    return next(e for e in manifest.values() if e["env"] == env and e["seed"] == seed)


def test_trials_write_their_usual_run_directories(two_sweeps, pendulum_expert_id):
    proc, _, _ = two_sweeps["first"]
    assert "Traceback" not in proc.stdout, proc.stdout
    runs = sorted((two_sweeps["runs"] / "bc" / pendulum_expert_id.replace("/", "-")).iterdir())
    assert [r.name.split("-")[0] for r in runs] == ["0", "1"], runs
    for seed, run in enumerate(runs):
        summary = json.loads((run / "summary.json").read_text())
        assert (summary["seed"], summary["steps"]) == (seed, 300)
        recorded = entry(two_sweeps["manifest"], pendulum_expert_id, seed)
        assert (recorded["run_dir"], recorded["status"]) == (str(run), "finished")
    assert f"started  bc {pendulum_expert_id} seed 0" in proc.stdout
    assert "sweep wall time" in proc.stdout


def test_a_cut_trial_resumes_from_its_checkpoint_in_its_own_directory(two_sweeps, pendulum_expert_id):
    assert entry(two_sweeps["manifest"], pendulum_expert_id, 1)["run_dir"] == str(two_sweeps["cut"])
    log = next(two_sweeps["folder"].glob("logs/bc-test-pendulum-expert-v0-seed1-*.log")).read_text()
    assert "resumed from step 100" in log
    entries = [json.loads(line) for line in (two_sweeps["cut"] / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if any(k.startswith("train/") for k in e)] == [100, 200, 300]
    assert json.loads((two_sweeps["cut"] / "summary.json").read_text())["steps"] == 300


def test_a_failing_trial_is_reported_and_the_others_go_on(two_sweeps, pendulum_expert_id):
    proc, _, _ = two_sweeps["first"]
    assert proc.returncode == 1  # some trials failed
    for seed in (0, 1):
        failed = entry(two_sweeps["manifest"], BROKEN, seed)
        assert failed["status"] == "failed" and failed["error"], failed
        assert f"FAILED   bc {BROKEN} seed {seed}" in proc.stdout
        assert entry(two_sweeps["manifest"], pendulum_expert_id, seed)["status"] == "finished"
    assert "Traceback" in next(two_sweeps["folder"].glob("logs/bc-test-broken-expert-v0-seed0-*.log")).read_text()


def test_rerunning_runs_no_finished_trial_again(two_sweeps):
    _, _, after_first = two_sweeps["first"]
    proc, _, after_second = two_sweeps["second"]
    assert proc.returncode == 0
    assert "2 trials (2 already finished, 0 to resume, 0 to start)" in proc.stdout, proc.stdout
    assert after_second == after_first  # the same finished runs, none written again, no new ones
    assert "started" not in proc.stdout and "running" not in proc.stdout


# --- bad input: refused before anything starts or is written ----------------------------------------


def run_sweep(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "common.reporting.sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("argv, message", [
    (["--algos", "iqll", "--envs", "ENV"], "unknown algorithm 'iqll'; did you mean: iql"),
    (["--algos", "bc", "--envs", "test/pendulum/expret-v0"], "test/pendulum/expert-v0"),  # the suggestion
    (["--algos", "bc", "--envs", "hopper-medum-v2"], "did you mean: hopper-medium-v2"),
    (["--algos", "bc", "--envs", "ENV", "--", "--no-such-flag", "1"], "bc.py does not accept these flags"),
    (["--algos", "bc", "--envs", "ENV", "--", "--seed", "3"], "--seed is chosen by the sweep"),
    (["--algos", "bc", "--envs", "ENV", "--name", "../../x"], "one folder name"),  # never outside the runs dir
])
def test_bad_input_fails_before_anything_starts(argv, message, tmp_path, pendulum_expert_id, capsys):
    argv = [a.replace("ENV", pendulum_expert_id) for a in argv]
    assert sweep.main([*argv[:4], "--runs-dir", str(tmp_path / "runs"), *argv[4:]]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_cluster_fails_in_seconds(tmp_path, pendulum_expert_id):
    """A refused port, and a port that accepts connections but never answers as Ray would."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    closed_port = refused.getsockname()[1]
    refused.close()
    for address, timeout in ((f"127.0.0.1:{closed_port}", 20), (f"127.0.0.1:{silent.getsockname()[1]}", 40)):
        started = time.perf_counter()
        proc = run_sweep("--algos", "bc", "--envs", pendulum_expert_id, "--runs-dir", str(tmp_path / "runs"),
                         "--address", address, "--connect-timeout", "3", timeout=timeout)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot "), proc.stderr
        assert address in proc.stderr.strip().splitlines()[-1]
        assert time.perf_counter() - started < timeout - 5
        assert not (tmp_path / "runs").exists()
    silent.close()


def test_a_trial_shared_by_two_sweeps_is_trained_once(tmp_path, pendulum_expert_id):
    """Two sweeps (different names, one --runs-dir) reach the same trial: the second waits on the trial's lock
    while the first trains it, then adopts the finished run instead of training it again."""
    runs = tmp_path / "runs"
    bc = load_algorithm("bc")
    config = run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=30, eval_episodes=1, runs_dir=str(runs))
    first_sweep = (
        "import dataclasses, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from pathlib import Path\n"
        "from common.checkpoint import import_algorithm\n"
        "from common.reporting import sweep\n"
        "bc = import_algorithm('bc')\n"
        f"config = bc.Config(**{dataclasses.asdict(config)!r})\n"
        f"with sweep.trial_lock(Path({str(runs)!r}), 'bc', config) as adopted:\n"
        "    assert adopted is None\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(2)\n"
        "    bc.train(config)\n")
    holder = subprocess.Popen([sys.executable, "-c", first_sweep], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
    with sweep.trial_lock(runs, "bc", config) as adopted:  # waits for the first sweep's trial to end
        assert adopted is not None and (adopted / "summary.json").is_file()
    assert holder.wait() == 0
    assert len(list((runs / "bc").glob("*/*/summary.json"))) == 1


def test_a_worker_serving_two_trials_reports_each_under_its_own_key(tmp_path, pendulum_expert_id, monkeypatch):
    """Ray reuses a worker process (reuse_actors): the second trial must not report through the first's wrapper,
    which would mark the finished first trial running again, with the second's run directory."""
    from ray import tune

    events = []
    monkeypatch.setattr(tune, "report", events.append)
    runs, folder = tmp_path / "runs", tmp_path / "runs" / "sweeps" / "t"
    trials = [sweep.Trial("bc", pendulum_expert_id, seed, tuple(FLAGS)) for seed in (0, 1)]
    bc = sweep.import_algorithm("bc")
    plain = bc.Run
    for trial in trials:
        sweep.run_trial({"trial": {"key": trial.key, "algo": "bc", "argv": trial.argv(runs, 1, "cpu", False),
                                   "resume": None, "log": str(folder / "logs" / f"{trial.name}.log"), "env_vars": {},
                                   "run_dir_file": str(sweep.run_dir_file(folder, trial))}})
    started = [(e["key"], e["run_dir"]) for e in events if e.get("event") == "started"]
    assert [key for key, _ in started] == [t.key for t in trials], started
    assert [Path(run).name.split("-")[0] for _, run in started] == ["0", "1"]
    for trial, (_, run) in zip(trials, started):
        assert sweep.run_dir_file(folder, trial).read_text().strip() == run
    assert bc.Run is plain  # the module's Run is put back after each trial
