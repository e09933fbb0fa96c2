"""Bad input at the command line: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_algorithm_cli


def run_bc(*args: str) -> subprocess.CompletedProcess:
    return run_algorithm_cli("bc", *args)


def assert_clean_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert pattern in proc.stderr, proc.stderr


def test_unknown_env_suggests_close_names(minari_root):
    proc = run_bc("--env", "hopper-medum-v2")
    assert_clean_error(proc, "did you mean: hopper-medium-v2")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_data_offline_says_how_to_get_it(minari_root):
    proc = run_bc("--env", "mujoco/walker2d/expert-v0")
    assert_clean_error(proc, "cannot be downloaded")
    assert "minari download mujoco/walker2d/expert-v0" in proc.stderr


def test_d4rl_name_without_counterpart_points_to_local_builder(minari_root):
    proc = run_bc("--env", "walker2d-medium-expert-v2")
    assert_clean_error(proc, "python -m common.build walker2d")


def test_flag_of_the_wrong_type_is_rejected():
    proc = run_bc("--max-steps", "many")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "max-steps" in proc.stderr


def test_nan_loss_stops_with_step_and_loss_name(tmp_path, pendulum_expert_id, monkeypatch):
    from conftest import load_algorithm, run_config

    from common.errors import UserError

    bc = load_algorithm("bc")
    original = bc.Agent._update_impl

    def poisoned(self, obs, actions):  # a loss that turns NaN, as a diverging critic would
        logs = original(self, obs, actions)
        return {"train/policy_loss": logs["train/policy_loss"] * float("nan")}

    monkeypatch.setattr(bc.Agent, "_update_impl", poisoned)
    with pytest.raises(UserError, match="train/policy_loss is nan at step 100"):
        bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=300, log_every=100))


def test_unwritable_run_directory(tmp_path, pendulum_expert_id, minari_root):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_bc("--env", pendulum_expert_id, "--runs-dir", str(blocker / "runs"), "--max-steps", "10")
    assert_clean_error(proc, "cannot write the run directory")


def test_resume_from_nothing(tmp_path, pendulum_expert_id, minari_root):
    proc = run_bc("--env", pendulum_expert_id, "--resume", str(tmp_path / "nowhere"), "--max-steps", "10")
    assert_clean_error(proc, "no checkpoint at")


@pytest.mark.parametrize("module", ["common.datasets"])
def test_dataset_listing_runs_offline(module, minari_root, pendulum_expert_id):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(minari_root))
    proc = subprocess.run([sys.executable, "-m", module, "--list"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)
    assert proc.returncode == 0
    assert pendulum_expert_id in proc.stdout
