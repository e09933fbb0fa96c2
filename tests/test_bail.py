"""BAIL: augmented Monte Carlo returns by hand, the K-penalty loss, the upper envelope above the returns, the
selected fraction, learning on mixed data (beats BC), resume and determinism, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import (assert_states_equal, checkpoint_agent, load_algorithm, rollout_episodes, run_config,
                      train_straight_and_resumed)

from common.datasets import DataSpec, Episode, load_dataset, save_episodes
from common.errors import UserError

bail = load_algorithm("bail")


def _episode(observations, rewards, terminated: bool) -> Episode:
    n = len(rewards)
    return Episode(np.asarray(observations, np.float32).reshape(n + 1, -1), np.zeros((n, 1), np.float32),
                   np.asarray(rewards, np.float32), np.array([False] * (n - 1) + [terminated]),
                   np.array([False] * (n - 1) + [not terminated]))


# ---------------------------------------------------------------------------------------------------
# Step 1: Monte Carlo returns with the augmentation for time-limit-truncated episodes
# ---------------------------------------------------------------------------------------------------


def test_augmented_returns_of_a_hand_made_truncated_episode():
    # s_0..s_4 = 0, 3, 1, 7 and the cut state s_4 = 1.2; r = 1, 2, 3, 4; gamma 0.5.
    # Plain: G_3 = 4, G_2 = 5, G_1 = 4.5, G_0 = 3.25. Distances to s_4: 1.2, 1.8, 0.2, 5.8.
    # t=1: m = argmin over s_0..s_3 = 2: + gamma^3 (G_2 - gamma G_3) = 0.125 * 3       -> 4.875
    # t=2: m = argmin over s_0..s_2 = 2: + gamma^2 (G_2 - gamma^2 G_4) = 0.25 * 5      -> 6.25
    # t=3: m = argmin over s_0..s_1 = 0: + gamma (G_0 - gamma^3 G_3) = 0.5 * 2.75      -> 5.375
    episode = _episode([0.0, 3.0, 1.0, 7.0, 1.2], [1.0, 2.0, 3.0, 4.0], terminated=False)
    assert np.allclose(bail.monte_carlo_returns(episode, 0.5), [3.25, 4.875, 6.25, 5.375])
    assert np.allclose(bail.monte_carlo_returns(episode, 0.5, augment=False), [3.25, 4.5, 5.0, 4.0])
    # the same episode ended by a termination has no missing tail: never augmented
    terminated = _episode([0.0, 3.0, 1.0, 7.0, 1.2], [1.0, 2.0, 3.0, 4.0], terminated=True)
    assert np.allclose(bail.monte_carlo_returns(terminated, 0.5), [3.25, 4.5, 5.0, 4.0])


def test_augmented_returns_equal_the_brute_force_sum_over_the_horizon():
    # every augmented G_t is sum_{k=t}^{T-1} gamma^(k-t) r_k + gamma^(T-t) sum_{j<t} gamma^j r_(m_t+j), with m_t the
    # first state among s_0..s_(T-t) nearest to the cut state s_T (2-d observations, ties impossible)
    rng = np.random.default_rng(0)
    for length in (2, 5, 17):
        obs, rewards, gamma = rng.normal(size=(length + 1, 2)), rng.normal(size=length), 0.9
        got = bail.monte_carlo_returns(_episode(obs, rewards, terminated=False), gamma)
        dist = np.linalg.norm(obs[:length] - obs[length], axis=1)
        for t in range(length):
            expected = sum(gamma ** (k - t) * rewards[k] for k in range(t, length))
            if t > 0:
                m = int(np.argmin(dist[: length - t + 1]))
                expected += gamma ** (length - t) * sum(gamma ** j * rewards[m + j] for j in range(t))
            assert got[t] == pytest.approx(expected, rel=1e-5, abs=1e-5), (length, t)


# ---------------------------------------------------------------------------------------------------
# Step 2: the K-penalty loss and the upper envelope
# ---------------------------------------------------------------------------------------------------


def test_envelope_loss_weighs_underestimates_k_times():
    v = torch.tensor([3.0, 1.0, 2.0, -1.0])
    g = torch.tensor([1.0, 3.0, 2.0, 0.5])
    # V >= G: (V - G)^2 ; V < G: K (G - V)^2
    assert torch.allclose(bail.envelope_loss(v, g, 10.0), torch.tensor([4.0, 40.0, 0.0, 22.5]))


@pytest.fixture(scope="module")
def mixed_data(pendulum_mixed_id):
    dataset = load_dataset(pendulum_mixed_id)
    obs = torch.as_tensor(dataset.transitions()["obs"])
    returns = torch.as_tensor(np.concatenate([bail.monte_carlo_returns(e, 0.99) for e in dataset.episodes]),
                              dtype=torch.float32)
    return dataset, obs, returns


def _fitted_agent(dataset, obs, returns, k: float) -> "bail.Agent":
    torch.manual_seed(0)
    agent = bail.Agent(bail.Config(env=dataset.name, device="cpu", max_steps=10, envelope_k=k), dataset.spec,
                       torch.device("cpu"))
    agent.fit_envelope(obs, returns)
    return agent


def test_upper_envelope_lies_above_the_returns_when_k_is_large(mixed_data):
    dataset, obs, returns = mixed_data
    stats = _fitted_agent(dataset, obs, returns, k=10_000.0).envelope_stats
    assert stats["envelope/under_fraction"] >= 0.95, stats
    assert stats["envelope/under_fraction_val"] >= 0.9, stats  # it generalises to the held-out points
    # K = 1 is plain least squares: a mean, with a large share of the returns above it
    assert _fitted_agent(dataset, obs, returns, k=1.0).envelope_stats["envelope/under_fraction"] < 0.8


def _overfitting_envelope(**overrides) -> tuple["bail.Agent", dict, list[dict]]:
    """An envelope fit whose validation loss first falls, then rises: one state for every point, all returns
    1.0 but a single 10.0 (always in the training split). V starts near 0, below every return; K = 10^4 pulls
    it up to about 9.9 (the 10.0 outweighs the 1.0s), so on the validation points (all 1.0) the loss falls
    until V passes 1 and rises from there on."""
    returns = torch.ones(200)
    returns[17] = 10.0
    obs = torch.zeros(200, 2)
    config = bail.Config(env="test/x-v0", device="cpu", max_steps=10, envelope_k=10_000.0, envelope_epochs=40,
                         envelope_patience=3, envelope_batch_size=20, envelope_hidden_dims=(8, 8), **overrides)
    torch.manual_seed(0)
    agent = bail.Agent(config, DataSpec(obs_dim=2, act_dim=1, max_action=1.0, discrete=False), torch.device("cpu"))
    logged = []
    stats = agent.fit_envelope(obs, returns, log=logged.append)
    return agent, stats, logged


def test_early_stopping_stops_after_patience_epochs_and_restores_the_best_envelope():
    agent, stats, logged = _overfitting_envelope()
    val = [entry["envelope/val_loss"] for entry in logged]
    best = int(np.argmin(val)) + 1
    assert 1 < best < 30 and stats["envelope/best_epoch"] == best
    assert stats["envelope/epochs"] == len(val) == best + 3  # stopped after 3 epochs without improvement
    assert val[-1] > val[best - 1]  # the last epoch's envelope is worse than the best on validation
    # the envelope kept is the best one: its validation loss (every validation return is 1.0) is the best epoch's
    v = float(agent.values(torch.zeros(1, 2)))
    assert float(bail.envelope_loss(torch.tensor(v), torch.tensor(1.0), 10_000.0)) == pytest.approx(val[best - 1],
                                                                                                   rel=1e-5)


def test_without_early_stopping_every_epoch_runs_and_the_last_envelope_is_kept_as_the_authors_code_does():
    agent, stats, logged = _overfitting_envelope(envelope_early_stopping=False)
    val = [entry["envelope/val_loss"] for entry in logged]
    assert stats["envelope/epochs"] == len(val) == 40 and min(val) < val[-1]
    v = float(agent.values(torch.zeros(1, 2)))
    assert float(bail.envelope_loss(torch.tensor(v), torch.tensor(1.0), 10_000.0)) == pytest.approx(val[-1], rel=1e-5)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_selected_fraction_is_p_and_every_kept_point_beats_x_times_its_envelope(fraction):
    rng = np.random.default_rng(1)
    n = 1001
    returns = torch.as_tensor(rng.normal(size=n), dtype=torch.float32)  # negative returns included
    values = returns + torch.as_tensor(rng.uniform(0.0, 2.0, n), dtype=torch.float32)
    selected, x = bail.select_top_ratios(returns, values, fraction)
    assert int(selected.sum()) == round(fraction * n)
    shift = float(returns.min())  # some returns are negative: both are shifted by the lowest return
    ratio = (returns - shift) / (values - shift)
    assert float(ratio[selected].min()) == pytest.approx(x) and float(ratio[~selected].max()) <= x


def test_selection_is_the_papers_ratio_on_positive_returns_and_safe_where_v_is_not_above_them():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    values = torch.tensor([1.1, 10.0, 3.3, 8.0])  # ratios G / V: 0.909, 0.2, 0.909, 0.5
    selected, x = bail.select_top_ratios(returns, values, 0.5)
    assert selected.tolist() == [True, False, True, False] and x == pytest.approx(3.0 / 3.3)
    # an envelope below the lowest return (V - c <= 0) ranks its point first instead of dividing by V <= 0
    returns = torch.tensor([-5.0, -3.0, -1.0])
    values = torch.tensor([-2.0, -9.0, 0.0])
    selected, _ = bail.select_top_ratios(returns, values, 1 / 3)
    assert selected.tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------------------
# Runs: logging, learning, resume, determinism
# ---------------------------------------------------------------------------------------------------

FAST = dict(envelope_epochs=5, hidden_dims=(32, 32), envelope_hidden_dims=(32, 32), batch_size=64, eval_episodes=2)


def test_run_logs_the_envelope_fit_and_the_selection(tmp_path, pendulum_expert_id):
    summary = bail.train(run_config(bail.Config, pendulum_expert_id, tmp_path, max_steps=20, log_every=10, **FAST))
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    epochs = [r for r in rows if "envelope/epoch" in r]
    assert len(epochs) >= 1 and all(r["step"] == 0 and "envelope/val_loss" in r for r in epochs)
    final = next(r for r in rows if "envelope/selected_fraction" in r)
    assert final["envelope/selected_fraction"] == pytest.approx(0.25, abs=1e-4)
    # the share of returns under the envelope, on the training and the validation split, against the share
    # over all points computed from the saved envelope and the returns (the splits are 80% and 20%)
    dataset = load_dataset(pendulum_expert_id)
    returns = np.concatenate([bail.monte_carlo_returns(e, 0.99) for e in dataset.episodes])
    envelope = bail.mlp(dataset.obs_dim, FAST["envelope_hidden_dims"], 1)
    envelope.load_state_dict(checkpoint_agent(summary["run_dir"])["envelope"])
    with torch.no_grad():
        values = envelope(torch.as_tensor(dataset.transitions()["obs"])).squeeze(-1).numpy()
    n = len(returns)
    n_val = int(0.2 * n)
    both = ((n - n_val) * final["envelope/under_fraction"] + n_val * final["envelope/under_fraction_val"]) / n
    assert both == pytest.approx(float(np.mean(values >= returns.astype(np.float32))), abs=0.5 / n)
    assert summary["envelope_selected_fraction"] == final["envelope/selected_fraction"]
    assert [r["step"] for r in rows if "train/policy_loss" in r] == [10, 20]


def test_bail_beats_bc_on_mixed_data(tmp_path, pendulum_mixed_id):
    # 15 expert + 45 uniform-random Pendulum episodes: cloning everything fails (about -1500); BAIL keeps the
    # points whose return reaches their envelope (nearly all of them the expert's) and clones those.
    common = dict(max_steps=3000, batch_size=256, hidden_dims=(64, 64), lr=1e-3, eval_episodes=5)
    result = bail.train(run_config(bail.Config, pendulum_mixed_id, tmp_path, **common))
    bc = load_algorithm("bc")
    cloned = bc.train(run_config(bc.Config, pendulum_mixed_id, tmp_path, **common))
    assert result["return_mean"] > cloned["return_mean"] + 500, (result["return_mean"], cloned["return_mean"])
    assert result["envelope_under_fraction"] >= 0.9


def test_resume_continues_with_the_same_envelope_selection_and_numbers(tmp_path, pendulum_expert_id):
    common = dict(log_every=50, checkpoint_every=100, **FAST)
    straight, resumed, a, b = train_straight_and_resumed(bail, pendulum_expert_id, tmp_path, 100, 200, **common)
    assert_states_equal(a, b, ("policy", "envelope"))
    assert torch.equal(a["selected"], b["selected"]) and a["envelope_stats"] == b["envelope_stats"]
    losses = lambda d: [json.loads(line)["train/policy_loss"] for line in open(f"{d}/metrics.jsonl")
                        if "train/policy_loss" in line]
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])
    assert straight["return_mean"] == resumed["return_mean"]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_selection(tmp_path, pendulum_expert_id,
                                                                            monkeypatch):
    common = dict(max_steps=60, log_every=20, checkpoint_every=1000, **FAST)
    straight = bail.train(run_config(bail.Config, pendulum_expert_id, tmp_path / "a", **common))
    original = bail.Agent.update
    calls = []

    def killed_at_step_30(self, batch):
        calls.append(1)
        if len(calls) == 30:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(bail.Agent, "update", killed_at_step_30)
    with pytest.raises(KeyboardInterrupt):
        bail.train(run_config(bail.Config, pendulum_expert_id, tmp_path / "b", **common))
    monkeypatch.setattr(bail.Agent, "update", original)
    run_dir = next((tmp_path / "b" / "runs").glob("bail/*/*"))
    assert torch.load(f"{run_dir}/checkpoint.pt", weights_only=False)["step"] == 0  # written after the selection
    resumed = bail.train(run_config(bail.Config, pendulum_expert_id, tmp_path / "b", resume=str(run_dir), **common))
    assert_states_equal(checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"]),
                        ("policy", "envelope"))


def test_same_seed_same_run_and_other_seed_differs(tmp_path, pendulum_expert_id):
    runs = [bail.train(run_config(bail.Config, pendulum_expert_id, tmp_path / str(i), max_steps=50, seed=s, **FAST))
            for i, s in enumerate([3, 3, 4])]
    states = [checkpoint_agent(r["run_dir"]) for r in runs]
    assert_states_equal(states[0], states[1], ("policy", "envelope"))
    assert torch.equal(states[0]["selected"], states[1]["selected"])
    assert not torch.equal(states[0]["selected"], states[2]["selected"])  # another split, another envelope
    assert runs[0]["return_mean"] == runs[1]["return_mean"]


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_episodes_shorter_than_two_steps_are_refused(tmp_path, minari_root):
    episodes = rollout_episodes("Pendulum-v1", None, 3, seed=7)
    short = [{**{k: v[:2] if k == "observations" else v[:1] for k, v in e.items() if k != "seed"},
              "truncations": np.array([True])} for e in episodes]
    save_episodes("test/pendulum/one-step-v0", short, "Pendulum-v1", overwrite=True)
    with pytest.raises(UserError, match="shorter than 2 steps"):
        bail.train(run_config(bail.Config, "test/pendulum/one-step-v0", tmp_path, max_steps=10, **FAST))
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made


@pytest.mark.parametrize("field, value", [("select_fraction", 0.0), ("select_fraction", 1.5),
                                          ("val_fraction", 1.0), ("envelope_k", 0.0)])
def test_settings_out_of_range_are_refused_before_the_run(tmp_path, pendulum_expert_id, field, value):
    with pytest.raises(UserError, match=field.replace("_", "-")):
        bail.train(run_config(bail.Config, pendulum_expert_id, tmp_path, max_steps=10, **{**FAST, field: value}))
    assert not (tmp_path / "runs").exists()
