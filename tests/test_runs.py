"""Runs are reliable: a resume continues the run it names with that run's settings, run folders never
collide, bad flags and bad data are refused with one line before anything is written, kills leave nothing
that breaks the next start."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_algorithm, rollout_episodes, run_config

from common.checkpoint import CHECKPOINT_NAME, CHECKPOINT_POINTER, find_checkpoint
from common.datasets import load_dataset, minari_root as minari_root_of, remove_stale_staging, save_episodes
from common.errors import UserError
from common.runs import new_run_dir, run_cli

bc = load_algorithm("bc")


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run bc.py's command line in-process: (exit status, stderr)."""
    old = sys.argv
    sys.argv = ["bc.py", *argv]
    try:
        run_cli(bc.train, bc.Config)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def run_dirs(runs_dir: Path) -> list[Path]:
    return sorted(p for p in runs_dir.glob("*/*/*") if p.is_dir())


def base_flags(env: str, runs_dir: Path) -> list[str]:
    return ["--env", env, "--device", "cpu", "--eval-every", "0", "--eval-episodes", "2", "--runs-dir", str(runs_dir),
            "--no-download"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, pendulum_expert_id) -> Path:
    """A 300-step BC run with non-default settings (lr, widths, periods)."""
    runs = tmp_path_factory.mktemp("finished")
    summary = bc.train(run_config(bc.Config, pendulum_expert_id, runs, max_steps=300, lr=1e-3, hidden_dims=(32, 32),
                                  log_every=50, checkpoint_every=100))
    return Path(summary["run_dir"])


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bc" / "copy" / run.name
    shutil.copytree(run, target)
    return target


# --- 1. a resumed run is the run it names -----------------------------------------------------------


def test_resume_takes_the_saved_settings(finished_run, tmp_path, pendulum_expert_id, capsys):
    run = copy_run(finished_run, tmp_path)
    code, err = cli(["--resume", str(run), "--max-steps", "400", "--device", "cpu", "--eval-episodes", "2"], capsys)
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    # flags not repeated keep the run's values, not the defaults (lr 3e-4, widths 256, periods 1000/10000)
    assert (saved["lr"], saved["hidden_dims"], saved["log_every"], saved["checkpoint_every"]) == \
        (1e-3, [32, 32], 50, 100)
    assert saved["max_steps"] == 400 and saved["env"] == pendulum_expert_id
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 400


@pytest.mark.parametrize("flags, named", [
    (["--lr", "0.5"], "--lr 0.5"),
    (["--batch-size", "64"], "--batch-size 64"),
    (["--hidden-dims", "64", "64"], "--hidden-dims 64 64"),
    (["--seed", "3"], "--seed 3"),
])
def test_resume_refuses_changed_settings_before_writing(finished_run, tmp_path, capsys, flags, named):
    run = copy_run(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, err = cli(["--resume", str(run), "--max-steps", "400", *flags], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert named in err and "cannot change on resume" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing rewritten


def test_resume_refuses_a_shorter_run(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    code, err = cli(["--resume", str(run), "--max-steps", "200"], capsys)
    assert code == 2 and "may only be extended" in err


def test_resume_in_python_takes_saved_values_for_defaults(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    summary = bc.train(bc.Config(resume=str(run), max_steps=350, device="cpu", eval_every=0, eval_episodes=2,
                                 download=False))
    assert summary["run_dir"] == str(run)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["lr"], saved["hidden_dims"]) == (1e-3, [32, 32])
    with pytest.raises(UserError, match="--lr 0.5"):
        bc.train(bc.Config(resume=str(run), max_steps=400, lr=0.5, device="cpu", download=False))


# --- 2. the run continues where it now is ------------------------------------------------------------


def test_resuming_a_copy_leaves_the_original_alone(finished_run, tmp_path, capsys):
    original_metrics = (finished_run / "metrics.jsonl").read_bytes()
    original_ckpt = (finished_run / CHECKPOINT_NAME).read_bytes()
    run = copy_run(finished_run, tmp_path)
    code, err = cli(["--resume", str(run), "--max-steps", "400", "--eval-episodes", "2"], capsys)
    assert code == 0, err
    assert (finished_run / "metrics.jsonl").read_bytes() == original_metrics
    assert (finished_run / CHECKPOINT_NAME).read_bytes() == original_ckpt
    assert torch.load(run / CHECKPOINT_NAME, weights_only=False)["step"] == 400
    assert f"run directory: {run}" in err


# --- 3. run folders never collide ------------------------------------------------------------------


def test_run_folders_are_created_exclusively_under_concurrency(tmp_path):
    barrier, made, errors = threading.Barrier(8), [], []

    def start():
        barrier.wait()
        try:
            made.append(new_run_dir(tmp_path / "bc" / "data", "0"))
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 8 and len(set(made)) == 8
    assert all(p.is_dir() for p in made)


def test_two_runs_in_the_same_second_get_two_folders(tmp_path, pendulum_expert_id, monkeypatch):
    import common.runs as runs

    monkeypatch.setattr(runs.time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second
    a = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=20, eval_episodes=2))
    b = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=20, eval_episodes=2))
    assert a["run_dir"] != b["run_dir"]
    assert Path(b["run_dir"]).name == "0-20260101-000000-2"
    for summary in (a, b):  # each folder holds one run's metrics only
        lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [20, 20]


# --- 5. bad data is refused at load ---------------------------------------------------------------


@pytest.mark.parametrize("key, value", [("rewards", np.nan), ("observations", np.inf), ("actions", np.nan)])
def test_non_finite_values_are_named_at_load(minari_root, key, value):
    episodes = rollout_episodes("Pendulum-v1", None, 3, seed=7)
    episodes[1][key] = np.array(episodes[1][key], dtype=np.float32)
    episodes[1][key][5] = value
    dataset_id = f"test/nonfinite/{key}-v0"
    save_episodes(dataset_id, episodes, "Pendulum-v1", overwrite=True)
    with pytest.raises(UserError, match=rf"episode 1 step 5: {key} holds"):
        load_dataset(dataset_id)


# --- 6 and 7. bad flags: one line, exit 2, no run folder -------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "-5"], "--batch-size must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--eval-episodes", "0"], "--eval-episodes must be at least 1"),
    (["--seed", "-1"], "--seed must lie in"),
    (["--seed", str(2 ** 32)], "--seed must lie in"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--max-steps", "-5"], "--max-steps must be at least 1"),
    (["--hidden-dims", "256", "0"], "--hidden-dims must list one or more positive widths"),
    (["--hidden-dims", "-4"], "--hidden-dims must list one or more positive widths"),
    (["--hidden-dims", "0"], "--hidden-dims must list one or more positive widths"),
    (["--eval-every", "-1"], "--eval-every must be 0 (off) or positive"),
    (["--device", "mps"], "no MPS"),
    (["--device", "tpu"], "--device"),
])
def test_bad_flags_are_refused_before_any_folder(tmp_path, pendulum_expert_id, capsys, flags, message):
    runs = tmp_path / "runs"
    code, err = cli(base_flags(pendulum_expert_id, runs) + ["--max-steps", "10", *flags], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not runs.exists() or not run_dirs(runs)


def test_track_without_a_login_is_refused_before_any_folder(tmp_path, pendulum_expert_id, capsys, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    runs = tmp_path / "runs"
    code, err = cli(base_flags(pendulum_expert_id, runs) + ["--max-steps", "10", "--track"], capsys)
    assert code == 2 and "wandb login" in err and "WANDB_MODE=offline" in err
    assert not runs.exists() or not run_dirs(runs)


def test_unwritable_checkpoint_dir_is_caught_at_start(tmp_path, pendulum_expert_id, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    runs = tmp_path / "runs"
    code, err = cli(base_flags(pendulum_expert_id, runs) + ["--max-steps", "10", "--checkpoint-dir",
                                                            str(blocker / "ckpt")], capsys)
    assert code == 2 and "--checkpoint-dir" in err and "cannot be written" in err
    assert not runs.exists() or not run_dirs(runs)


# --- kills: partial lines, stale temporary files, checkpoints elsewhere -----------------------------


def test_resume_copes_with_a_partial_metrics_line_and_a_stale_tmp(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3')  # a kill during a write
    (run / (CHECKPOINT_NAME + ".tmp")).write_bytes(b"half a checkpoint")
    code, err = cli(["--resume", str(run), "--max-steps", "400", "--eval-episodes", "2"], capsys)
    assert code == 0, err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and json.loads(lines[-1])["step"] == 400
    assert not (run / (CHECKPOINT_NAME + ".tmp")).exists()


def test_checkpoint_dir_runs_resume_from_their_run_directory(tmp_path, pendulum_expert_id, capsys):
    ckpt_root = tmp_path / "ckpt"
    first = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=100, checkpoint_every=50,
                                eval_episodes=2, checkpoint_dir=str(ckpt_root)))
    second = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=100, checkpoint_every=50,
                                 eval_episodes=2, checkpoint_dir=str(ckpt_root), seed=1))
    run = Path(first["run_dir"])
    assert not (run / CHECKPOINT_NAME).exists() and (run / CHECKPOINT_POINTER).is_file()
    # two runs sharing one --checkpoint-dir keep separate checkpoints
    assert find_checkpoint(run) != find_checkpoint(second["run_dir"])
    assert find_checkpoint(run).is_relative_to(ckpt_root.resolve())
    code, err = cli(["--resume", str(run), "--max-steps", "150", "--eval-episodes", "2"], capsys)
    assert code == 0, err
    assert torch.load(find_checkpoint(run), weights_only=False)["step"] == 150


def test_stale_staging_folders_of_dead_writers_are_removed(minari_root):
    root = minari_root_of()
    dead = root / ".staging-999999999"  # no such process
    (dead / "x").mkdir(parents=True)
    alive = root / f".staging-{__import__('os').getppid()}"  # the parent process is alive
    alive.mkdir(exist_ok=True)
    removed = remove_stale_staging(root)
    assert dead in removed and not dead.exists() and alive.exists()
    alive.rmdir()


# --- 8. mistyped local ids get suggestions ------------------------------------------------------------


@pytest.mark.parametrize("name, suggestion", [
    ("test/pendulum/expert-v1", "test/pendulum/expert-v0"),
    ("Test/Pendulum/Expert-v0", "test/pendulum/expert-v0"),
    ("local/pendulum/medum-v0", "local/pendulum/medium-v0"),
])
def test_mistyped_ids_get_close_names(pendulum_expert_id, name, suggestion):
    with pytest.raises(UserError, match=suggestion.replace("/", "/")) as info:
        load_dataset(name, download=True)
    assert "network" not in str(info.value)


# --- 10. a trained policy loads from anywhere the README says ------------------------------------


def test_load_policy_works_outside_the_repository(finished_run, tmp_path):
    import os
    import subprocess

    from conftest import ROOT

    code = ("from common.checkpoint import load_policy; import numpy as np; "
            f"policy = load_policy({str(finished_run)!r}); print(policy(np.zeros(3, np.float32)).shape)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1,)"


# --- checkpoints under a changed --checkpoint-dir: the newest is always the one resumed ----------------


def checkpoint_step(run: Path) -> int:
    from common.checkpoint import load_checkpoint

    return int(load_checkpoint(run)["step"])


def last_metrics_step(run: Path) -> int:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]


def test_extending_under_a_checkpoint_dir_then_resuming_without_it_continues_from_the_newest(
        finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)  # its checkpoint.pt (step 300) lies in the run directory
    elsewhere = tmp_path / "elsewhere"
    code, err = cli(["--resume", str(run), "--max-steps", "400", "--checkpoint-dir", str(elsewhere)], capsys)
    assert code == 0, err
    assert find_checkpoint(run).is_relative_to(elsewhere.resolve()) and checkpoint_step(run) == 400
    # the older run-directory checkpoint (step 300) is still there, but never taken in place of the newest
    code, err = cli(["--resume", str(run), "--max-steps", "500"], capsys)
    assert code == 0, err
    assert "resumed from step 400" in err
    assert checkpoint_step(run) == 500 and last_metrics_step(run) == 500


def test_a_new_checkpoint_dir_on_resume_receives_the_newest_checkpoint_and_nothing_is_written_first(
        finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    config_before = (run / "config.json").read_text()
    new_dir = tmp_path / "new-ckpt"
    # a resume that fails after reading (max-steps below the run's) leaves everything as it was
    code, err = cli(["--resume", str(run), "--max-steps", "200", "--checkpoint-dir", str(new_dir)], capsys)
    assert code == 2
    assert (run / "config.json").read_text() == config_before and not (run / CHECKPOINT_POINTER).exists()
    assert checkpoint_step(run) == 300
    # a working resume to a new --checkpoint-dir: the newest checkpoint moves there at once and later resumes work
    code, err = cli(["--resume", str(run), "--max-steps", "400", "--checkpoint-dir", str(new_dir)], capsys)
    assert code == 0, err
    assert find_checkpoint(run).is_relative_to(new_dir.resolve()) and checkpoint_step(run) == 400
    code, err = cli(["--resume", str(run), "--max-steps", "450"], capsys)
    assert code == 0, err
    assert checkpoint_step(run) == 450


def test_a_newest_checkpoint_that_was_moved_away_is_not_replaced_silently_by_an_older_one(
        finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    code, err = cli(["--resume", str(run), "--max-steps", "400", "--checkpoint-dir", str(elsewhere)], capsys)
    assert code == 0, err
    shutil.rmtree(elsewhere)
    code, err = cli(["--resume", str(run), "--max-steps", "500"], capsys)
    assert code == 2 and "does not exist" in err and str(run / CHECKPOINT_NAME) in err
    assert last_metrics_step(run) == 400  # nothing was rewritten


# --- files a user is handed never run code when loaded ---------------------------------------------------


class _WritesAFile:
    """Unpickling this calls open(path, 'w'): what a crafted checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(finished_run, tmp_path, capsys):
    from common.checkpoint import load_policy

    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = torch.load(run / CHECKPOINT_NAME, weights_only=True)
    ckpt["agent"]["payload"] = _WritesAFile(str(marker))
    torch.save(ckpt, run / CHECKPOINT_NAME)
    code, err = cli(["--resume", str(run), "--max-steps", "400"], capsys)
    assert code == 2 and "refusing to load" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    with pytest.raises(UserError, match="refusing to load"):
        load_policy(run)
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_values(finished_run):
    ckpt = torch.load(finished_run / CHECKPOINT_NAME, weights_only=True)  # no allow-list needed: format 2
    assert ckpt["format"] == 2 and isinstance(ckpt["normalizer"]["mean"], torch.Tensor)


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_temporary_file(tmp_path, pendulum_expert_id, capsys,
                                                                            monkeypatch):
    """Disk full: torch.save raises RuntimeError (not OSError) when a write fails."""
    import common.checkpoint as checkpoint

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    runs = tmp_path / "runs"
    code, err = cli(base_flags(pendulum_expert_id, runs) + ["--max-steps", "20"], capsys)
    assert code == 2 and "cannot write checkpoint" in err and "Traceback" not in err
    assert not list(runs.rglob("*.tmp"))


def test_resuming_a_finished_run_writes_its_final_evaluation_once(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for _ in range(2):
        code, err = cli(["--resume", str(run)], capsys)
        assert code == 0, err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in rows if r["step"] == 300 and "eval/return_mean" in r) == 1


def test_a_run_directory_is_trained_by_one_process_at_a_time(finished_run, tmp_path):
    import os
    import subprocess

    from conftest import ROOT

    run = copy_run(finished_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"), str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # as a second training process holds it
        proc = subprocess.run([sys.executable, str(ROOT / "algorithms" / "bc.py"), "--resume", str(run),
                               "--max-steps", "400"], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finally:
        holder.kill()
    assert proc.returncode == 2 and "another process" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 300


def test_resume_without_a_value_says_so(capsys):
    code, err = cli(["--resume", "--max-steps", "300"], capsys)
    assert code == 2 and "--resume needs a value" in err


# --- load_policy: what it refuses, in one line ----------------------------------------------------------


def test_load_policy_with_a_wrong_observation_shape_names_the_expected_one(finished_run):
    from common.checkpoint import load_policy

    policy = load_policy(finished_run)
    assert policy(np.zeros(3, np.float32)).shape == (1,) and policy(np.zeros((4, 3), np.float32)).shape == (4, 1)
    for shape in [(4,), (2, 5), (2, 3, 3), ()]:
        with pytest.raises(UserError, match=r"shape \(3,\) or \(n, 3\).*got shape"):
            policy(np.zeros(shape, np.float32))


def test_an_ope_run_is_refused_as_a_policy(finished_run, tmp_path, pendulum_expert_id):
    from common.checkpoint import load_agent, load_policy

    ope = load_algorithm("ope")
    summary = ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, policy=str(finished_run), max_steps=5,
                                   eval_episodes=1, bootstrap=5))
    assert ope.NOT_A_POLICY
    for load in (load_policy, load_agent):
        with pytest.raises(UserError, match=f"ope.py run: an OPE run estimates another run's value.*load the run it "
                                            f"evaluated: {finished_run}"):
            load(summary["run_dir"])
