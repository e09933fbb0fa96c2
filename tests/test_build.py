"""Tests of the local D4RL-recipe dataset builder (`common/build/recipe.py`) and its behaviour agents.

Tiny builds (a few thousand agent steps, small networks, 1000-transition datasets) into a temporary Minari
root; the whole file runs in about a minute on one core. Run: `pytest tests/test_build.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from common.build import recipe as bd
from common.build.behavior_dqn import Config as DQNConfig, DQNAgent
from common.build.behavior_sac import Actor, Config as SACConfig, NumpyActor, SACAgent
from common.datasets import load_dataset, local_dataset_ids, save_episodes
from common.errors import UserError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SIZE = 1000  # transitions per rollout quality in the tiny builds
# Pendulum: with batch 64, SAC's deterministic return goes from about -1360 to about -400 in 4000 steps and
# passes one third of the way (the medium, at about -900) on the way; smaller networks learn too erratically
# in so few steps.
TINY_PENDULUM = ["pendulum", "--agent-steps", "4000", "--warmup-steps", "500", "--checkpoint-every", "250",
                 "--dataset-size", str(SIZE), "--batch-size", "64", "--eval-episodes", "3", "--ref-episodes", "5"]
TINY_CARTPOLE = ["cartpole", "--agent-steps", "3000", "--warmup-steps", "500", "--checkpoint-every", "250",
                 "--dataset-size", str(SIZE), "--hidden", "64", "--eval-episodes", "3", "--ref-episodes", "5"]


@pytest.fixture(autouse=True)
def private_minari_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def run_build(argv: list[str], build_dir: Path) -> dict:
    return bd.build(bd.parse_args(argv + ["--build-dir", str(build_dir)]))


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory):
    """One tiny pendulum build shared by the tests below, in its own Minari root."""
    root = tmp_path_factory.mktemp("pendulum")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    try:
        out = run_build(TINY_PENDULUM, root / "build")
        loaded = {q: load_dataset(f"local/pendulum/{q}-v0", download=False) for q in bd.QUALITIES}
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return out, loaded


def assert_same_episodes(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            xa = x[key] if isinstance(x, dict) else getattr(x, key)
            ya = y[key] if isinstance(y, dict) else getattr(y, key)
            np.testing.assert_array_equal(np.asarray(xa).reshape(len(xa), -1), np.asarray(ya).reshape(len(ya), -1))


# --------------------------------------------------------------------------------------------------
# The five qualities of one build
# --------------------------------------------------------------------------------------------------


def test_rollout_qualities_hold_exactly_the_budget_as_whole_episodes(pendulum):
    _, loaded = pendulum
    for quality in ("random", "medium", "expert"):
        data = loaded[quality]
        assert data.num_steps == SIZE
        for ep in data.episodes:
            assert ep.observations.shape == (len(ep) + 1, 3)
            assert ep.actions.shape == (len(ep), 1)
        # Pendulum never terminates; every episode ends by the time limit (200) or by the budget cut
        assert all(ep.truncations[-1] and not ep.truncations[:-1].any() for ep in data.episodes)
        assert not any(ep.terminations.any() for ep in data.episodes)
    assert loaded["medium-expert"].num_steps == 2 * SIZE


def test_every_quality_loads_into_both_views(pendulum):
    _, loaded = pendulum
    for quality, data in loaded.items():
        flat = data.transitions()
        assert len(flat["obs"]) == data.num_steps == len(flat["next_obs"]) == len(flat["rewards"])
        np.testing.assert_array_equal(flat["obs"][0], data.episodes[0].observations[0])
        np.testing.assert_array_equal(flat["next_obs"][len(data.episodes[0]) - 1], data.episodes[0].observations[-1])
        assert flat["terminals"].sum() == sum(ep.terminations.sum() for ep in data.episodes)
        assert data.eval_env_spec is not None and data.eval_env_spec.id == "Pendulum-v1"


def test_reference_scores_are_stored_and_come_from_the_policies(pendulum):
    out, loaded = pendulum
    for data in loaded.values():
        assert data.ref_source == "Minari metadata"
        assert data.ref_min_score == pytest.approx(out["ref_min"])
        assert data.ref_max_score == pytest.approx(out["ref_max"])
    assert out["ref_min"] < out["ref_max"]
    # estimated from separate evaluation episodes, not the datasets' own returns
    assert out["ref_min"] != pytest.approx(np.mean([e.total_return for e in loaded["random"].episodes]), abs=1e-6)


def test_medium_return_lies_between_random_and_expert(pendulum):
    out, loaded = pendulum
    mean = {q: np.mean([e.total_return for e in loaded[q].episodes]) for q in ("random", "medium", "expert")}
    assert mean["random"] < mean["medium"] < mean["expert"]
    assert 0.0 < out["medium_ratio"] < 1.0
    assert 0 < out["medium_step"] < 4000


def test_medium_expert_is_exactly_medium_then_expert(pendulum):
    _, loaded = pendulum
    assert_same_episodes(loaded["medium-expert"].episodes, loaded["medium"].episodes + loaded["expert"].episodes)


def test_medium_replay_is_the_training_stream_up_to_the_medium_step(pendulum):
    out, loaded = pendulum
    agent, step = out["agent"], out["medium_step"]
    replay = loaded["medium-replay"].episodes
    assert sum(len(e) for e in replay) == step
    assert_same_episodes(replay, agent.stream_episodes(step))
    # a prefix of the full stream: the episodes finished by then are the stream's first episodes
    full = agent.stream_episodes()
    assert_same_episodes(replay[:-1], full[:len(replay) - 1])
    last, whole = replay[-1], full[len(replay) - 1]  # the episode running at the medium step, cut there
    np.testing.assert_array_equal(last.observations, whole["observations"][:len(last) + 1])
    np.testing.assert_array_equal(last.actions, whole["actions"][:len(last)])
    assert last.truncations[-1]
    assert loaded["medium-replay"].metadata["last_episode_cut"] == (step % 200 != 0)  # Pendulum: 200-step episodes
    # the warm-up's uniform actions are in it (D4RL's medium-replay holds all early data)
    assert np.abs(replay[0].actions).max() > 1.0


def test_metadata_records_recipe_sizes_ratio_and_a_matching_checksum(pendulum):
    out, loaded = pendulum
    for quality, data in loaded.items():
        meta = data.metadata
        assert meta["quality"] == quality and meta["seed"] == 0
        recipe = json.loads(meta["recipe"])
        assert recipe["behavior_agent"] == "SAC" and recipe["agent_config"]["max_steps"] == 4000
        assert json.loads(meta["sizes"])["steps"] == data.num_steps
        assert meta["medium_ratio"] == pytest.approx(out["medium_ratio"])
        assert meta["sha256"] == out["results"][quality]["sha256"] == bd.dataset_checksum(data.episodes)
        assert "seed 0" in meta["description"].lower() and quality in meta["description"]


# --------------------------------------------------------------------------------------------------
# Discrete actions, reproducibility, resume
# --------------------------------------------------------------------------------------------------


def test_cartpole_build_and_same_seed_gives_same_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "a"))
    first = run_build(TINY_CARTPOLE, tmp_path / "build-a")
    data = load_dataset("local/cartpole/medium-expert-v0", download=False)
    assert data.discrete and data.episodes[0].actions.dtype == np.int64
    assert data.num_steps == 2 * SIZE
    mean = {q: r["return_mean"] for q, r in first["results"].items()}
    assert mean["random"] < mean["medium"] < mean["expert"]

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "b"))
    second = run_build(TINY_CARTPOLE, tmp_path / "build-b")  # from scratch: its own build folder
    checksums = {q: r["sha256"] for q, r in first["results"].items()}
    assert checksums == {q: r["sha256"] for q, r in second["results"].items()}
    assert len(set(checksums.values())) == len(bd.QUALITIES)  # the checksum does depend on the data


def test_checksum_sees_a_one_ulp_change():
    episode = {"observations": np.zeros((3, 2), np.float32), "actions": np.zeros((2, 1), np.float32),
               "rewards": np.array([1.0, 2.0], np.float32), "terminations": np.array([False, True]),
               "truncations": np.zeros(2, bool)}
    changed = dict(episode, rewards=np.array([1.0, np.nextafter(np.float32(2.0), np.float32(3.0))], np.float32))
    assert bd.dataset_checksum([episode]) != bd.dataset_checksum([changed])
    assert bd.dataset_checksum([episode]) == bd.dataset_checksum([dict(episode)])


@pytest.mark.parametrize("agent_cls, config_cls, env", [(SACAgent, SACConfig, "Pendulum-v1"),
                                                        (DQNAgent, DQNConfig, "CartPole-v1")])
def test_interrupted_training_resumes_to_the_same_policy(tmp_path, agent_cls, config_cls, env):
    config = dict(env=env, max_steps=600, warmup_steps=200, checkpoint_every=200, hidden=32, eval_episodes=1,
                  save_every=200)
    straight = agent_cls(config_cls(**config))
    straight.train()

    def interrupt(step, message):
        if step == 450:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        agent_cls(config_cls(**config, checkpoint_dir=str(tmp_path))).train(progress=interrupt)
    saved_step = torch.load(tmp_path / "agent_state.pt", weights_only=True)["step"]
    assert 200 <= saved_step < 450  # it resumes from an earlier episode end, not from scratch
    resumed = agent_cls(config_cls(**config, checkpoint_dir=str(tmp_path)))
    resumed.train()
    assert [c.step for c in resumed.checkpoints] == [c.step for c in straight.checkpoints]
    for a, b in zip(resumed.checkpoints, straight.checkpoints):
        assert a.eval_returns == b.eval_returns
        for key in a.policy:
            assert torch.equal(a.policy[key], b.policy[key]), key
    assert_same_episodes(resumed.stream_episodes(), straight.stream_episodes())


def test_numpy_actor_matches_the_torch_actor():
    torch.manual_seed(0)
    low, high = np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32)
    actor = Actor(5, 2, 32, low, high)
    obs = np.random.default_rng(0).normal(size=(10, 5)).astype(np.float32)
    expected = actor.deterministic(torch.as_tensor(obs)).detach().numpy()
    fast = NumpyActor(actor.state_dict())
    np.testing.assert_allclose(np.stack([fast(o) for o in obs]), expected, atol=1e-5)
    sampled = np.stack([fast(o, np.random.default_rng(1)) for o in obs])
    assert np.all(sampled >= low) and np.all(sampled <= high) and not np.allclose(sampled, expected)


def test_select_medium_picks_the_checkpoint_nearest_one_third():
    class Ckpt:
        def __init__(self, r):
            self.eval_return = r

    returns = [0.0, 10.0, 30.0, 36.0, 80.0, 100.0]  # first = random, last = expert; target 33.3
    index, target = bd.select_medium([Ckpt(r) for r in returns], 0.0, 100.0)
    assert target == pytest.approx(100 / 3) and index == 3
    # only endpoints, or nothing strictly between random and expert: no medium
    assert bd.select_medium([Ckpt(0.0), Ckpt(-5.0), Ckpt(120.0), Ckpt(100.0)], 0.0, 100.0)[0] is None


# --------------------------------------------------------------------------------------------------
# Bad input: one line `error: ...`, exit code 2
# --------------------------------------------------------------------------------------------------


def error_of(argv, capsys) -> str:
    assert bd.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    return err[-1]


def test_unknown_env_id_exits_2_with_suggestions():
    result = subprocess.run([sys.executable, "-m", "common.build", "Pendulumm-v1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith("error: unknown preset or env id 'Pendulumm-v1'")
    assert "Pendulum-v1" in result.stderr


def test_existing_dataset_is_refused_without_overwrite(capsys, tmp_path):
    episode = {"observations": np.zeros((3, 3), np.float32), "actions": np.zeros((2, 1), np.float32),
               "rewards": np.zeros(2), "terminations": np.zeros(2, bool), "truncations": np.array([False, True])}
    save_episodes("local/pendulum/random-v0", [episode], gym.spec("Pendulum-v1"))
    message = error_of(TINY_PENDULUM + ["--qualities", "random", "--build-dir", str(tmp_path)], capsys)
    assert "local/pendulum/random-v0" in message and "--overwrite" in message
    assert not (tmp_path / "agent").exists()  # refused before any training
    # --skip-existing keeps it and, with nothing else requested, succeeds at once
    assert bd.main(TINY_PENDULUM + ["--qualities", "random", "--skip-existing", "--build-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "agent").exists()


def test_too_small_budget_says_so(capsys, tmp_path):
    # checkpoints only at steps 0 and 400: no medium can exist
    message = error_of(["pendulum", "--agent-steps", "400", "--warmup-steps", "100", "--checkpoint-every", "400",
                        "--hidden", "32", "--eval-episodes", "1", "--ref-episodes", "2",
                        "--build-dir", str(tmp_path)], capsys)
    assert "budget too small" in message and "--agent-steps" in message
    message = error_of(["pendulum", "--agent-steps", "100", "--warmup-steps", "100", "--build-dir", str(tmp_path)],
                       capsys)
    assert "--warmup-steps" in message and "never learn" in message


def test_tiny_budget_is_refused_not_written(capsys, tmp_path, minari_root):
    # the probe's command: 300 agent steps leave the "expert" no better than random (it wrote a medium ratio
    # of -2.59 and a random set normalising to 2736 before); now exit 2, one line, no dataset
    before = set(local_dataset_ids())
    message = error_of(["Pendulum-v1", "--agent-steps", "300", "--dataset-size", "500", "--warmup-steps", "100",
                        "--build-dir", str(tmp_path)], capsys)
    assert "does not clearly beat the random policy" in message and "raise --agent-steps" in message
    assert set(local_dataset_ids()) == before


def test_expert_must_beat_random_by_the_return_noise():
    rng = np.random.default_rng(0)
    random_returns = rng.normal(-1200.0, 200.0, 20)
    # a gap of 50 against a standard error of ~63: noise, refused
    with pytest.raises(UserError, match="does not clearly beat"):
        bd.check_expert_beats_random(random_returns, random_returns + 50.0 + rng.normal(0, 200.0, 20),
                                     -1200.0, -1100.0, 1000)
    # a gap of 1000: accepted
    bd.check_expert_beats_random(random_returns, rng.normal(-200.0, 50.0, 20), -1200.0, -150.0, 1000)
    # the deterministic expert must beat the deterministic random policy too
    with pytest.raises(UserError):
        bd.check_expert_beats_random(random_returns, rng.normal(-200.0, 50.0, 20), -1200.0, -1300.0, 1000)


def test_unsupported_spaces_are_refused(capsys):
    message = error_of(["FrozenLake-v1"], capsys)
    assert "observation space" in message and "Box" in message
