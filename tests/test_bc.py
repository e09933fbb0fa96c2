"""BC and filtered BC: learning on data the tests build, resume equivalence, determinism, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_states_equal, load_algorithm, mean_return, pendulum_expert,
                      rollout_episodes, run_algorithm_cli, run_config, train_straight_and_resumed)

from common.checkpoint import load_policy
from common.errors import UserError
from common.evaluation import EVAL_SEED_OFFSET

bc = load_algorithm("bc")

EVAL_EPISODES = 5


@pytest.fixture(scope="module")
def expert_on_eval_seeds(minari_root) -> float:
    """The scripted expert's mean return on exactly the evaluation episodes the runs use (seed 0)."""
    return mean_return(rollout_episodes("Pendulum-v1", pendulum_expert, EVAL_EPISODES, seed=EVAL_SEED_OFFSET))


def fraction_of_expert(summary: dict, expert: float, random: float) -> float:
    """(R - R_random) / (R_expert - R_random): 1.0 is the expert's return on the same episodes."""
    return (summary["return_mean"] - random) / (expert - random)


@pytest.mark.parametrize("head", ["deterministic", "gaussian"])
def test_bc_reaches_90_percent_of_expert_return(tmp_path, pendulum_expert_id, pendulum_refs,
                                                expert_on_eval_seeds, head):
    config = run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=3000, lr=1e-3, policy=head,
                        eval_episodes=EVAL_EPISODES)
    summary = bc.train(config)
    assert fraction_of_expert(summary, expert_on_eval_seeds, pendulum_refs["random"]) >= 0.9
    assert summary["normalized_score_mean"] is not None


def test_filtered_bc_beats_bc_on_mixed_data(tmp_path, pendulum_mixed_id, pendulum_refs,
                                            expert_on_eval_seeds):
    common = dict(max_steps=3000, lr=1e-3, eval_episodes=EVAL_EPISODES)
    plain = bc.train(run_config(bc.Config, pendulum_mixed_id, tmp_path, **common))
    filtered = bc.train(run_config(bc.Config, pendulum_mixed_id, tmp_path, top_fraction=0.25, **common))
    assert filtered["return_mean"] > plain["return_mean"] + 300  # cloning the mixture swings up far worse
    assert fraction_of_expert(filtered, expert_on_eval_seeds, pendulum_refs["random"]) >= 0.8


def _final_weights(run_dir) -> dict:
    return torch.load(f"{run_dir}/checkpoint.pt", weights_only=False)["agent"]["policy"]


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_expert_id):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2)
    straight, resumed, a, b = train_straight_and_resumed(bc, pendulum_expert_id, tmp_path, 100, 200, **common)
    assert_states_equal(a, b, ("policy",))
    losses = lambda d: [json.loads(l)["train/policy_loss"] for l in open(f"{d}/metrics.jsonl")
                        if "train/policy_loss" in l]
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])


def test_same_seed_same_run_and_other_seed_differs(tmp_path, pendulum_expert_id):
    runs = [bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path / str(i), max_steps=150, seed=s,
                                log_every=50, eval_episodes=2)) for i, s in enumerate([3, 3, 4])]
    w = [_final_weights(r["run_dir"]) for r in runs]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert not all(torch.equal(w[0][k], w[2][k]) for k in w[0])
    assert runs[0]["return_mean"] == runs[1]["return_mean"]


def test_final_policy_loads_in_a_few_lines(tmp_path, pendulum_expert_id):
    summary = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=50, eval_episodes=2))
    policy = load_policy(summary["run_dir"])
    action = policy(np.array([1.0, 0.0, 0.0], np.float32))
    assert action.shape == (1,) and -2.0 <= float(action[0]) <= 2.0
    assert policy(np.zeros((4, 3), np.float32)).shape == (4, 1)


def test_run_directory_holds_config_versions_metrics_and_summary(tmp_path, pendulum_expert_id):
    summary = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=100, log_every=50,
                                  eval_every=50, eval_episodes=2))
    run_dir = summary["run_dir"]
    assert json.load(open(f"{run_dir}/config.json"))["max_steps"] == 100
    versions = json.load(open(f"{run_dir}/versions.json"))
    assert versions["torch_threads"] == 1 and "git_commit" in versions and versions["minari"]
    rows = [json.loads(l) for l in open(f"{run_dir}/metrics.jsonl")]
    assert [r["step"] for r in rows if "train/policy_loss" in r] == [50, 100]
    assert all(r["perf/steps_per_sec"] > 0 for r in rows if "train/policy_loss" in r)
    assert any("eval/normalized_score_mean" in r and r["step"] == 50 for r in rows)
    assert json.load(open(f"{run_dir}/summary.json"))["steps"] == 100


@pytest.mark.parametrize("overrides, match", [(dict(top_fraction=1.5), r"--top-fraction must lie in \(0, 1\]"),
                                              (dict(top_fraction=0.0), r"--top-fraction must lie in \(0, 1\]"),
                                              (dict(top_fraction=float("nan")), "--top-fraction"),
                                              (dict(top_discount=1.5), r"--top-discount must lie in \[0, 1\]")])
def test_filtered_bc_settings_out_of_range_are_refused_before_the_run(tmp_path, pendulum_expert_id, overrides, match):
    with pytest.raises(UserError, match=match):
        bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=10, **overrides))
    assert not (tmp_path / "runs").exists()


def test_the_cli_refuses_a_top_fraction_above_one_in_one_line(tmp_path, pendulum_expert_id):
    proc = run_algorithm_cli("bc", "--env", pendulum_expert_id, "--top-fraction", "1.5", "--no-download",
                             "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--max-steps", "10")
    assert_one_line_error(proc, "--top-fraction must lie in (0, 1]")
    assert not (tmp_path / "runs").exists()
