"""Data layer: conversion properties, name resolution and its errors, scores, writing, sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT

from common.datasets import (D4RL_REFERENCE_SCORES, D4RL_TO_MINARI, ObsNormalizer, TensorSampler,
                             discounted_returns_to_go, flatten_observation, load_dataset,
                             local_dataset_ids, resolve_name, save_episodes)
from common.errors import UserError


def synthetic_episodes(lengths, obs_dim=3, act_dim=2, end="mixed", seed=0):
    """Episodes whose observations encode (episode, step) so that merges and shifts are detectable."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        obs = np.zeros((n + 1, obs_dim), np.float32)
        obs[:, 0] = i
        obs[:, 1] = np.arange(n + 1)
        obs[:, 2:] = rng.standard_normal((n + 1, obs_dim - 2))
        terminated = end == "terminate" or (end == "mixed" and i % 2 == 0)
        term = np.zeros(n, bool)
        trunc = np.zeros(n, bool)
        (term if terminated else trunc)[-1] = True
        out.append({"observations": obs, "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
                    "rewards": rng.standard_normal(n).astype(np.float32), "terminations": term,
                    "truncations": trunc})
    return out


BOX_OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
BOX_ACT = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


@pytest.fixture()
def synthetic_id(minari_root, request):
    dataset_id = f"test/synthetic/{request.node.name.replace('_', '-')[:40]}-v0"
    episodes = synthetic_episodes([5, 1, 7, 3])
    save_episodes(dataset_id, episodes, None, observation_space=BOX_OBS, action_space=BOX_ACT,
                  overwrite=True)
    return dataset_id, episodes


def test_transitions_keep_every_step_with_n_plus_one_observations(synthetic_id):
    dataset_id, episodes = synthetic_id
    data = load_dataset(dataset_id)
    t = data.transitions()
    assert len(t["obs"]) == sum(len(e["rewards"]) for e in episodes) == 16
    for ep, raw in zip(data.episodes, episodes):
        assert ep.observations.shape[0] == len(ep) + 1
        np.testing.assert_array_equal(ep.observations, raw["observations"])
    # next_obs is the same episode's next observation: same episode tag, step + 1
    np.testing.assert_array_equal(t["next_obs"][:, 0], t["obs"][:, 0])
    np.testing.assert_array_equal(t["next_obs"][:, 1], t["obs"][:, 1] + 1)


def test_truncation_is_not_terminal(synthetic_id):
    dataset_id, episodes = synthetic_id
    t = load_dataset(dataset_id).transitions()
    ends = np.cumsum([len(e["rewards"]) for e in episodes]) - 1
    expected_terminal = np.zeros(len(t["rewards"]), np.float32)
    expected_timeout = np.zeros(len(t["rewards"]), np.float32)
    for i, end in enumerate(ends):
        (expected_terminal if i % 2 == 0 else expected_timeout)[end] = 1.0
    np.testing.assert_array_equal(t["terminals"], expected_terminal)
    np.testing.assert_array_equal(t["timeouts"], expected_timeout)


def test_episodes_are_never_merged(synthetic_id):
    dataset_id, episodes = synthetic_id
    data = load_dataset(dataset_id)
    assert len(data.episodes) == len(episodes)
    for ep, raw in zip(data.episodes, episodes):
        assert len(set(ep.observations[:, 0])) == 1  # one episode tag per episode
        assert ep.total_return == pytest.approx(float(np.sum(raw["rewards"], dtype=np.float64)), rel=1e-6)
        rtg = ep.returns_to_go()
        assert rtg[-1] == pytest.approx(raw["rewards"][-1])  # nothing of the next episode leaks in
        assert rtg[0] == pytest.approx(ep.total_return, rel=1e-5)
        np.testing.assert_array_equal(ep.timesteps, np.arange(len(ep)))
    t = data.transitions(returns_to_go_gamma=0.9)
    ends = np.cumsum([len(e["rewards"]) for e in episodes]) - 1
    np.testing.assert_allclose(t["returns_to_go"][ends], t["rewards"][ends], rtol=1e-6)


def test_discounted_returns_to_go_match_brute_force():
    rewards = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    gamma = 0.9
    brute = [sum(gamma ** (k - t) * rewards[k] for k in range(t, 4)) for t in range(4)]
    np.testing.assert_allclose(discounted_returns_to_go(rewards, gamma), brute, rtol=1e-6)


def test_dict_observations_flatten_in_space_key_order(minari_root):
    space = gym.spaces.Dict({"observation": gym.spaces.Box(-9, 9, (3,), np.float32),
                             "desired_goal": gym.spaces.Box(-9, 9, (2,), np.float32),
                             "achieved_goal": gym.spaces.Box(-9, 9, (2,), np.float32)})
    assert list(space.spaces) == ["achieved_goal", "desired_goal", "observation"]  # gymnasium sorts
    n = 4
    obs = {"observation": np.arange(3 * (n + 1), dtype=np.float32).reshape(n + 1, 3),
           "desired_goal": np.full((n + 1, 2), -1.0, np.float32),
           "achieved_goal": np.full((n + 1, 2), -2.0, np.float32)}
    episode = {"observations": obs, "actions": np.zeros((n, 2), np.float32), "rewards": np.zeros(n),
               "terminations": np.zeros(n, bool), "truncations": np.eye(n, dtype=bool)[-1]}
    save_episodes("test/dictobs/maze-v0", [episode], None, observation_space=space, action_space=BOX_ACT,
                  overwrite=True)
    data = load_dataset("test/dictobs/maze-v0")
    assert data.obs_dim == 7
    flat = data.episodes[0].observations
    np.testing.assert_array_equal(flat[:, :2], -2.0)
    np.testing.assert_array_equal(flat[:, 2:4], -1.0)
    np.testing.assert_array_equal(flat[:, 4:], obs["observation"])
    single = {k: v[0] for k, v in obs.items()}
    np.testing.assert_array_equal(flatten_observation(single, space), gym.spaces.flatten(space, single))


def test_discrete_actions_load_as_integers(minari_root):
    n = 6
    episode = {"observations": np.zeros((n + 1, 4), np.float32), "actions": np.array([0, 1, 1, 0, 1, 0]),
               "rewards": np.ones(n), "terminations": np.eye(n, dtype=bool)[-1], "truncations": np.zeros(n, bool)}
    save_episodes("test/discrete/tiny-v0", [episode], "CartPole-v1", overwrite=True)
    data = load_dataset("test/discrete/tiny-v0")
    assert data.discrete and data.act_dim == 2
    actions = data.transitions()["actions"]
    assert actions.dtype == np.int64
    np.testing.assert_array_equal(actions, episode["actions"])


# --- names ---------------------------------------------------------------------------------------


def test_d4rl_name_maps_to_minari_with_a_note():
    resolved = resolve_name("hopper-medium-v2")
    assert resolved.minari_id == "mujoco/hopper/medium-v0"
    assert resolved.note and "no exact Minari copy" in resolved.note
    assert resolved.d4rl_reference == D4RL_REFERENCE_SCORES["hopper"]
    assert resolve_name("antmaze-umaze-v2").minari_id == "D4RL/antmaze/umaze-v1"
    assert resolve_name("pen-human-v1").minari_id == "D4RL/pen/human-v2"


def test_d4rl_name_without_minari_counterpart_points_to_the_builder():
    with pytest.raises(UserError, match=r"no Minari counterpart.*common.build hopper.*local/hopper/medium-replay-v0"):
        resolve_name("hopper-medium-replay-v2")


def test_unknown_name_suggests_close_names():
    with pytest.raises(UserError, match="did you mean: halfcheetah-medium-v2"):
        resolve_name("halfcheeta-medium-v2")


def test_minari_ids_pass_through_and_missing_local_data_says_how_to_build(minari_root):
    assert resolve_name("mujoco/hopper/expert-v0").minari_id == "mujoco/hopper/expert-v0"
    with pytest.raises(UserError, match=r"not built .*common.build walker2d"):
        load_dataset("local/walker2d/medium-v0")
    with pytest.raises(UserError, match="cannot be downloaded"):
        load_dataset("mujoco/hopper/expert-v0", download=False)


def test_every_d4rl_entry_has_reference_scores():
    for entry in D4RL_TO_MINARI.values():
        assert entry.reference_key in D4RL_REFERENCE_SCORES


# --- scores, rewards, normalisation ----------------------------------------------------------------


def test_normalized_score_is_100_times_the_fraction_between_references(synthetic_id):
    data = load_dataset(synthetic_id[0])
    assert data.normalized_score(1.0) is None  # no reference scores stored: raw returns only
    data.ref_min_score, data.ref_max_score = -20.0, 180.0
    np.testing.assert_allclose(data.normalized_score(np.array([-20.0, 80.0, 180.0])), [0.0, 50.0, 100.0])


def test_d4rl_names_use_d4rl_reference_scores_in_evaluation():
    lo, hi = D4RL_REFERENCE_SCORES["hopper"]
    assert (lo, hi) == (-20.272305, 3234.3)
    assert 100 * (1000.0 - lo) / (hi - lo) == pytest.approx(31.35, abs=0.01)


def test_reward_transforms(synthetic_id):
    data = load_dataset(synthetic_id[0])
    raw = data.transitions()["rewards"]
    returns = [e.total_return for e in data.episodes]
    scaled = data.transitions(reward_transform="return-range")["rewards"]
    np.testing.assert_allclose(scaled, raw * 1000.0 / (max(returns) - min(returns)), rtol=1e-5)
    np.testing.assert_allclose(data.transitions(reward_transform="minus-one")["rewards"], raw - 1.0)


def test_obs_normalizer_standardises_with_eps():
    obs = np.array([[0.0, 1.0], [2.0, 1.0]], np.float32)
    norm = ObsNormalizer.from_data(obs)
    np.testing.assert_allclose(norm.std, [1.0 + 1e-3, 1e-3])
    np.testing.assert_allclose(norm(obs)[:, 0], [-1.0 / 1.001, 1.0 / 1.001], rtol=1e-6)
    np.testing.assert_allclose(norm(obs)[:, 1], [0.0, 0.0])


def test_top_episodes_keeps_the_best_by_return(synthetic_id):
    data = load_dataset(synthetic_id[0])
    best = max(data.episodes, key=lambda e: e.total_return)
    top = data.top_episodes(0.25)
    assert len(top.episodes) == 1 and top.episodes[0] is best
    with pytest.raises(UserError):
        data.top_episodes(0.0)


def test_top_episodes_discounted_ranking_and_floor_count(synthetic_id):
    data = load_dataset(synthetic_id[0])
    n = len(data.episodes)
    gamma = 0.5
    by_discounted = sorted(range(n), key=lambda i: -sum(gamma ** t * r for t, r in enumerate(data.episodes[i].rewards)))
    fraction = 1.6 / n  # round keeps 2, floor keeps 1
    top = data.top_episodes(fraction, discount=gamma, count="floor")
    assert [e for e in top.episodes] == [data.episodes[by_discounted[0]]]
    top = data.top_episodes(fraction, discount=gamma, count="round")
    assert top.episodes == [data.episodes[i] for i in sorted(by_discounted[:2])]


# --- writing -----------------------------------------------------------------------------------------


def test_writer_checks_n_plus_one_observations(minari_root):
    bad = synthetic_episodes([3])[0]
    bad["observations"] = bad["observations"][:-1]
    with pytest.raises(UserError, match="N\\+1 observations"):
        save_episodes("test/bad/short-v0", [bad], None, observation_space=BOX_OBS, action_space=BOX_ACT)
    assert "test/bad/short-v0" not in local_dataset_ids()


def test_writer_refuses_existing_ids_and_leaves_no_staging(minari_root, synthetic_id):
    dataset_id, episodes = synthetic_id
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        save_episodes(dataset_id, episodes, None, observation_space=BOX_OBS, action_space=BOX_ACT)
    save_episodes(dataset_id, episodes[:2], None, observation_space=BOX_OBS, action_space=BOX_ACT,
                  overwrite=True, extra_metadata={"checksum": "abc", "recipe": {"seed": 3}})
    data = load_dataset(dataset_id)
    assert len(data.episodes) == 2
    assert data.metadata["checksum"] == "abc" and json.loads(data.metadata["recipe"]) == {"seed": 3}
    assert not [p for p in minari_root.iterdir() if p.name.startswith(".")]


# --- sampler -----------------------------------------------------------------------------------------


def test_sampler_is_seeded_and_restorable():
    grid = np.arange(100 * 6, dtype=np.float32).reshape(100, 2, 3)
    arrays = {"x": np.arange(100, dtype=np.float32), "y": np.arange(100, dtype=np.int64) * 2, "z": grid,
              "w": -np.arange(100, dtype=np.float32)[:, None]}
    a, b = TensorSampler(arrays, "cpu", seed=1), TensorSampler(arrays, "cpu", seed=1)
    first = a.sample(32)
    assert list(first) == ["x", "y", "z", "w"]
    assert first["x"].shape == (32,) and first["z"].shape == (32, 2, 3) and first["w"].shape == (32, 1)
    assert first["y"].dtype == torch.int64 and first["z"].dtype == torch.float32
    assert torch.equal(first["x"], b.sample(32)["x"])
    rows = first["x"].long()  # rows stay aligned across keys, dtypes and shapes (packed tables)
    assert torch.equal(first["y"], rows * 2)
    assert torch.equal(first["z"], torch.as_tensor(grid)[rows])
    assert torch.equal(first["w"][:, 0], -first["x"])
    state = a.state_dict()
    expected = a.sample(16)["x"]
    a.load_state_dict(state)
    assert torch.equal(a.sample(16)["x"], expected)
    assert not torch.equal(TensorSampler(arrays, "cpu", seed=2).sample(32)["x"], first["x"])


def test_embedded_default_is_built_on_first_use(minari_root, monkeypatch):
    """The core runs the builder as a command in a child process (it imports no tool), for the pendulum suite
    only; a failed build is one line."""
    import common.datasets as datasets

    calls = []

    def fake_run(command, env=None, **kwargs):
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 2)  # as a failed build would

    monkeypatch.setattr(datasets.subprocess, "run", fake_run)
    with pytest.raises(UserError, match="building the embedded default suite failed"):
        load_dataset("local/pendulum/medium-replay-v0")
    (command, env), = calls
    assert command[1:] == ["-P", "-m", "common.build", "pendulum", "--skip-existing"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # this copy's builder, wherever the user runs
    with pytest.raises(UserError, match="not built"):  # other local suites are never built implicitly
        load_dataset("local/hopper/medium-replay-v0")
    assert len(calls) == 1


def test_a_dataset_that_cannot_fit_is_refused_before_writing(minari_root):
    """`ulimit -f` (a file-size limit) or a full disk: one line, nothing written, no staging left (h5py used to
    crash after pages of errors)."""
    code = ("import resource, sys\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import numpy as np\n"
            "from common.datasets import save_episodes\n"
            "from common.errors import UserError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))\n"
            "n = 20_000\n"
            "episode = {'observations': np.zeros((n + 1, 3), np.float32), 'actions': np.zeros((n, 1), np.float32),\n"
            "           'rewards': np.zeros(n), 'terminations': np.zeros(n, bool),\n"
            "           'truncations': np.eye(1, n, n - 1)[0] > 0}\n"
            "try:\n"
            "    save_episodes('test/too-big/data-v0', [episode], 'Pendulum-v1')\n"
            "except UserError as err:\n"
            "    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ulimit -f" in proc.stdout and "nothing was written" in proc.stdout
    assert not (minari_root / "test" / "too-big").exists() and not list(minari_root.glob(".staging-*"))
