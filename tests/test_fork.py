"""The two-mode fork (common/envs/fork.py) and its datasets (python -m common.build fork): dynamics, success and
collision, the expert's two modes, the mean of the modes hitting the obstacle, the stored env spec working in a
fresh process, and the builder's scripted path (qualities, reference scores, checksums, no medium-replay)."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from conftest import ROOT

import common.envs  # noqa: F401  (registers PointFork-v0)
from common.build import recipe
from common.datasets import load_dataset
from common.envs import fork


def _env():
    return gym.make("PointFork-v0")


def test_step_moves_by_dt_times_the_clipped_action_and_starts_on_the_axis():
    env = _env()
    obs, info = env.reset(seed=3)
    assert obs[0] == 0.0 and abs(obs[1]) <= fork.START_HALF_WIDTH and info["side"] == 0
    nxt, reward, terminated, truncated, info = env.step(np.array([2.0, -0.5], np.float32))  # clipped to 1
    assert np.allclose(nxt, obs + fork.DT * np.array([1.0, -0.5]), atol=1e-6)
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert env.spec.max_episode_steps == 50 and env.spec.entry_point == "common.envs.fork:PointForkEnv"


def test_touching_the_obstacle_ends_the_episode_without_reward():
    env = _env()
    env.reset(seed=0)
    for _ in range(10):
        _, reward, terminated, _, info = env.step(np.array([0.0, 1.0], np.float32))  # straight ahead
        if terminated:
            break
    assert terminated and info["collision"] and not info["success"] and reward == 0.0
    # a move that jumps over the edge of the disk still counts (the segment is checked, not its end)
    assert fork.segment_hits_obstacle(np.array([-0.5, 0.7]), np.array([0.5, 0.7]))
    assert not fork.segment_hits_obstacle(np.array([-0.5, 0.2]), np.array([0.5, 0.2]))


def test_expert_reaches_the_goal_on_both_sides_and_reports_the_side():
    paths = fork.rollout_paths(fork.ForkExpert(seed=0, noise=0.1), 200, seed=1)
    stats = fork.summarize(paths)
    assert stats["success_rate"] == 1.0 and stats["collision_rate"] == 0.0
    assert 0.4 <= stats["left"] <= 0.6 and stats["left"] + stats["right"] == 1.0
    for p in paths:  # the reported side is where the path passes the obstacle's centre line
        level = p["path"][np.argmax(p["path"][:, 1] >= fork.OBSTACLE_CENTER[1])]
        assert p["side"] == np.sign(level[0]) and p["return"] == 1.0
        assert np.linalg.norm(p["path"][-1] - fork.GOAL) <= fork.GOAL_RADIUS


def test_the_mean_of_the_two_modes_drives_into_the_obstacle():
    # the l2 optimum where both modes are demonstrated: E[a|s] = (a_left + a_right) / 2
    def mean_of_modes(obs):
        return (fork.expert_action(obs, -np.ones(len(obs))) + fork.expert_action(obs, np.ones(len(obs)))) / 2

    first = mean_of_modes(np.zeros((1, 2)))[0]
    assert np.allclose(first, [0.0, fork.EXPERT_SPEED])  # straight ahead, between (-0.8, 0.8) and (0.8, 0.8)
    stats = fork.summarize(fork.rollout_paths(mean_of_modes, 50, seed=0))
    assert stats["collision_rate"] == 1.0 and stats["success_rate"] == 0.0
    assert max(p["length"] for p in fork.rollout_paths(mean_of_modes, 50, seed=0)) <= 3  # within three steps


def test_uniform_random_actions_never_succeed():
    stats = fork.summarize(fork.rollout_paths(fork.uniform_policy(0), 100, seed=0))
    assert stats["success_rate"] == 0.0


def test_builder_writes_the_fork_suite_with_reference_scores(minari_root):
    out = recipe.build(recipe.parse_args(["fork", "--name", "fork-suite-test", "--dataset-size", "1000",
                                          "--ref-episodes", "10"]))
    results = out["results"]
    assert set(results) == {"random", "medium", "expert", "medium-expert"}  # no medium-replay by default
    assert out["ref_min"] == 0.0 and out["ref_max"] >= 0.95
    assert recipe.MEDIUM_RATIO_BAND[0] <= out["medium_ratio"] <= recipe.MEDIUM_RATIO_BAND[1]
    assert results["expert"]["normalized"] >= 95 and results["random"]["normalized"] == 0.0
    assert 10 <= results["medium"]["normalized"] <= 70
    assert results["medium-expert"]["steps"] == results["medium"]["steps"] + results["expert"]["steps"] == 2000
    data = load_dataset("local/fork-suite-test/expert-v0")
    assert data.ref_min_score == out["ref_min"] and data.metadata["expert_policy"] == "common.envs.fork:make_expert"
    assert data.metadata["sha256"] == results["expert"]["sha256"]
    first = np.array([e.actions[0, 0] for e in data.episodes])  # the first action picks a side, 50/50
    assert 0.35 <= float((first > 0).mean()) <= 0.65 and float(np.abs(first).min()) > 0.4
    again = recipe.build(recipe.parse_args(["fork", "--name", "fork-suite-again", "--dataset-size", "1000",
                                            "--ref-episodes", "10", "--qualities", "expert"]))
    assert again["results"]["expert"]["sha256"] == results["expert"]["sha256"]  # same seed, same data


def test_builder_refuses_medium_replay_for_a_scripted_expert(minari_root, capsys):
    assert recipe.main(["fork", "--name", "fork-refused", "--qualities", "medium-replay"]) == 2
    assert "no medium-replay" in capsys.readouterr().err


def test_stored_env_spec_makes_the_env_in_a_fresh_process(minari_root, fork_expert_id):
    # what every algorithm file does at evaluation: load the dataset, gym.make its stored EnvSpec, with no import
    # of common.envs by the user
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from common.datasets import load_dataset; "
            f"env = load_dataset('{fork_expert_id}').make_env(); obs, _ = env.reset(seed=0); "
            "print(type(env.unwrapped).__name__, env.spec.max_episode_steps, obs.shape)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["PointForkEnv", "50", "(2,)"]


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_expert_factory_and_reset_draw_sides_from_its_own_seed(noise):
    a, b = fork.make_expert(seed=5, noise=noise), fork.make_expert(seed=5, noise=noise)
    a.reset(100)
    b.reset(100)
    assert np.array_equal(a.sides, b.sides) and set(np.unique(a.sides)) == {-1.0, 1.0}
    obs = np.zeros((100, 2), np.float32)
    assert np.array_equal(a(obs), b(obs))
    assert np.array_equal(np.sign(a(obs)[:, 0]), a.sides)  # the first action veers towards the side


def test_rolling_out_a_run_of_another_env_is_one_line(pendulum_expert_id, tmp_path, capsys):
    from conftest import load_algorithm, run_config

    from common.envs.fork import _main

    bc = load_algorithm("bc")
    run = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=5, eval_episodes=1))["run_dir"]
    assert _main(["--run", run, "--episodes", "2"]) == 2
    err = capsys.readouterr().err
    assert "the fork env has 2-d observations" in err and "Traceback" not in err
