"""Off-policy evaluation: importance sampling recovers exact values within its intervals, FQE matches a known
value on a linear-quadratic problem, the behaviour model, a trained run evaluated end to end, resume,
determinism and bad input."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import assert_states_equal, load_algorithm, run_config, train_straight_and_resumed

from common.checkpoint import load_checkpoint, load_policy
from common.datasets import DataSpec, ObsNormalizer, load_dataset
from common.errors import UserError
from common.figures import importance_sampling as chain
from common.figures.tabular import finite_horizon_values, sample_episodes

ope = load_algorithm("ope")


# ---------------------------------------------------------------------------------------------------
# Importance sampling on a small MDP with exact values
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p_target", [0.5, 0.7])
def test_is_estimates_recover_the_exact_value_within_their_intervals(p_target):
    mdp = chain.chain_mdp()
    mdp.gamma = 0.95
    truth = float(finite_horizon_values(mdp, chain.policy(p_target), chain.HORIZON) @ mdp.start)
    data = sample_episodes(mdp, chain.policy(chain.P_BEHAVIOUR), 2000, chain.HORIZON, np.random.default_rng(1))
    right = data["actions"] == 1
    log_ratios = np.where(right, np.log(p_target / chain.P_BEHAVIOUR), np.log((1 - p_target) / (1 - chain.P_BEHAVIOUR)))
    point = ope.importance_sampling_estimates(log_ratios, data["rewards"], 0.95)
    interval = ope.bootstrap_interval(
        lambda idx: np.stack(list(ope.importance_sampling_estimates(log_ratios[idx], data["rewards"][idx],
                                                                    0.95).values()), -1),
        len(log_ratios), 300, 0.99, np.random.default_rng(2), row_size=chain.HORIZON)
    for k, name in enumerate(point):
        assert interval[0, k] <= truth <= interval[1, k], (name, interval[:, k], truth)
        assert interval[0, k] <= point[name] <= interval[1, k], name
    for name in ("weighted IS", "weighted per-decision IS"):  # biased but steady: close at this size
        assert abs(point[name] - truth) < 0.1 * truth, name


def test_on_policy_every_estimator_is_the_mean_discounted_return_and_ragged_episodes_pad():
    rewards = [np.array([1.0, 2.0, 3.0]), np.array([4.0]), np.array([0.5, 0.5])]
    r = ope.pad_episodes(rewards)
    assert r.shape == (3, 3) and r[1, 1:].tolist() == [0.0, 0.0]
    gamma = 0.9
    expected = np.mean([sum(gamma ** t * x for t, x in enumerate(ep)) for ep in rewards])
    for name, value in ope.importance_sampling_estimates(np.zeros_like(r), r, gamma).items():
        assert value == pytest.approx(expected), name


def test_importance_sampling_matches_brute_force_and_survives_huge_ratios():
    rng = np.random.default_rng(0)
    lr, r = 0.3 * rng.standard_normal((5, 4)), rng.uniform(-1, 1, (5, 4))
    gamma, rho_t = 0.9, np.exp(np.cumsum(lr, 1))
    disc = gamma ** np.arange(4)
    est = ope.importance_sampling_estimates(lr, r, gamma)
    assert est["ordinary IS"] == pytest.approx(np.mean(rho_t[:, -1] * (r * disc).sum(1)))
    assert est["per-decision IS"] == pytest.approx(np.mean((rho_t * r * disc).sum(1)))
    assert est["weighted IS"] == pytest.approx((rho_t[:, -1] * (r * disc).sum(1)).sum() / rho_t[:, -1].sum())
    assert est["weighted per-decision IS"] == pytest.approx(((rho_t * r).sum(0) / rho_t.sum(0) * disc).sum())
    huge = ope.importance_sampling_estimates(lr + 400.0, r, gamma)  # ratios e^1600: far beyond float64
    assert np.isfinite(huge["weighted IS"]) and huge["weighted IS"] == pytest.approx(est["weighted IS"])
    assert ope.effective_sample_size(np.array([0.0, 0.0, -1e4])) == pytest.approx(2.0)


def _brute_force_is(log_ratios: list, rewards: list, gamma: float) -> dict[str, float]:
    """The four IS estimates episode by episode, each over its own length T_i, in plain Python. An episode that
    has ended keeps its whole-episode weight rho_{0:T_i-1} in the per-decision denominators (it sits in an
    absorbing state where pi and pi_beta agree, earning 0)."""
    n = len(rewards)
    rho = [math.exp(sum(lr)) for lr in log_ratios]
    returns = [sum(gamma ** t * r for t, r in enumerate(ep)) for ep in rewards]
    rho_t = [[math.exp(sum(lr[:t + 1])) for t in range(len(lr))] for lr in log_ratios]
    horizon = max(len(ep) for ep in rewards)
    weight = lambda i, t: rho_t[i][min(t, len(rho_t[i]) - 1)]  # noqa: E731
    reward = lambda i, t: rewards[i][t] if t < len(rewards[i]) else 0.0  # noqa: E731
    return {
        "ordinary IS": sum(rho[i] * returns[i] for i in range(n)) / n,
        "per-decision IS": sum(gamma ** t * rho_t[i][t] * rewards[i][t] for i in range(n)
                               for t in range(len(rewards[i]))) / n,
        "weighted IS": sum(rho[i] * returns[i] for i in range(n)) / sum(rho),
        "weighted per-decision IS": sum(gamma ** t * sum(weight(i, t) * reward(i, t) for i in range(n))
                                        / sum(weight(i, t) for i in range(n)) for t in range(horizon)),
    }


def test_importance_sampling_of_ragged_episodes_matches_a_per_episode_brute_force():
    rng = np.random.default_rng(3)
    lengths = [1, 4, 7, 2, 7, 5]
    log_ratios = [0.4 * rng.standard_normal(n) for n in lengths]
    rewards = [rng.uniform(-1, 2, n) for n in lengths]
    got = ope.importance_sampling_estimates(ope.pad_episodes(log_ratios), ope.pad_episodes(rewards), 0.9)
    expected = _brute_force_is(log_ratios, rewards, 0.9)
    for name, value in expected.items():
        assert float(got[name]) == pytest.approx(value, rel=1e-10, abs=0), name


def _truncated_normal_mean(mean: float, std: float, low: float, high: float) -> float:
    """E[a] of N(mean, std^2) restricted to [low, high], by a fine midpoint sum."""
    a = np.linspace(low, high, 200_001)
    a = (a[1:] + a[:-1]) / 2
    density = np.exp(-0.5 * ((a - mean) / std) ** 2)
    return float((a * density).sum() / density.sum())


def test_is_densities_are_gaussians_renormalised_to_the_action_box():
    """The data's actions lie in the box, so both densities of the ratio must be densities there: a target at
    the bound (0.9, std 0.5, in [-1, 1]) has 42% of its Gaussian mass outside, a wide behaviour model 30%, and
    the raw ratio would scale every weight by Z_pi / Z_beta = 0.82. One-step episodes drawn from pi_beta_hat
    on the box, reward a: ordinary IS must give the mean action of the target restricted to the box, which
    the executed target (true_values' draws) has too."""
    grid = torch.linspace(-1, 1, 20_001, dtype=torch.float64)[:, None]
    for mean, std in ((1.0, 0.5), (-3.0, 0.5), (0.2, 3.0)):  # at the bound, below the box, wider than it
        density = ope.box_gaussian_log_prob(grid, torch.full_like(grid, mean), torch.full_like(grid, np.log(std)),
                                            torch.tensor([-1.0]), torch.tensor([1.0])).exp()
        assert float(torch.trapezoid(density, grid[:, 0])) == pytest.approx(1.0, abs=1e-4), (mean, std)
    rng = np.random.default_rng(0)
    for mean in (0.9, -3.0):
        draws = ope.sample_box_gaussian(np.full(200_000, mean), 0.5, np.array(-1.0), np.array(1.0), rng)
        assert draws.min() >= -1 and draws.max() <= 1
        assert draws.mean() == pytest.approx(_truncated_normal_mean(mean, 0.5, -1, 1), abs=0.005), mean

    config = ope.Config(env="test/box-v0", device="cpu", gamma=0.9, hidden_dims=(8,), behavior_hidden_dims=(8,),
                        target_std=0.5)
    spec = DataSpec(obs_dim=1, act_dim=1, max_action=1.0, discrete=False)
    agent = ope.Agent(config, spec, torch.device("cpu"), target_policy=lambda s: torch.full((len(s), 1), 0.9))
    with torch.no_grad():  # pi_beta_hat(.|s) = N(0.5, 0.8^2) for every s
        for layer in agent.behavior:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        agent.behavior[-1].bias.copy_(torch.tensor([np.arctanh(0.5), np.log(0.8)]))
    draws = 0.5 + 0.8 * rng.standard_normal(20_000)
    actions = draws[np.abs(draws) <= 1][:5000]  # pi_beta_hat on the box, by rejection
    episodes = {"obs": [np.zeros((1, 1), np.float32)] * len(actions),
                "actions": [np.array([[a]], np.float32) for a in actions], "rewards": [np.array([a]) for a in actions]}
    lr = ope.pad_episodes(ope.log_ratios(agent, episodes, 0.5, np.array([-1.0]), np.array([1.0]), "cpu"))
    estimate = ope.importance_sampling_estimates(lr, ope.pad_episodes(episodes["rewards"]), 0.9)["ordinary IS"]
    assert float(estimate) == pytest.approx(_truncated_normal_mean(0.9, 0.5, -1, 1), abs=0.03)  # 0.563


def _box_normal_log_density(a: np.ndarray, mean: np.ndarray, std: np.ndarray, low: float, high: float) -> np.ndarray:
    """log density of N(mean, std^2) restricted to [low, high], elementwise, with math.erf (not the file's code)."""
    cdf = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))
    mass = cdf((high - mean) / std) - cdf((low - mean) / std)
    return -0.5 * ((a - mean) / std) ** 2 - np.log(std) - 0.5 * math.log(2 * math.pi) - np.log(mass)


def test_behaviour_model_fits_the_box_restricted_density_near_a_bound():
    """pi_beta = N(0.9, 0.5^2) restricted to [-1, 1]: 42% of the Gaussian's mass lies beyond the bound. The
    ratios divide by a box-restricted pi_beta_hat, so it must be fitted with that likelihood: an unrestricted
    Gaussian fit converges to about N(0.56, 0.33^2), and ordinary IS of a one-step problem (target
    N(0.2, 0.3^2) on the box, reward a: true value 0.197, by numerical integration) then gives about 0.08."""
    rng = np.random.default_rng(0)
    draws = 0.9 + 0.5 * rng.standard_normal(60_000)
    actions = draws[np.abs(draws) <= 1.0][:20_000].astype(np.float32)  # pi_beta on the box, by rejection
    n = len(actions)
    config = ope.Config(env="test/box-v0", device="cpu", gamma=0.9, hidden_dims=(8,), behavior_hidden_dims=(16,),
                        lr=3e-3, target_std=0.3)
    torch.manual_seed(0)
    agent = ope.Agent(config, DataSpec(obs_dim=1, act_dim=1, max_action=1.0, discrete=False), torch.device("cpu"),
                      target_policy=lambda s: torch.full((len(s), 1), 0.2))
    data = {"obs": torch.zeros(n, 1), "actions": torch.as_tensor(actions)[:, None],
            "rewards": torch.as_tensor(actions), "next_obs": torch.zeros(n, 1), "terminals": torch.ones(n)}
    g = torch.Generator().manual_seed(1)
    for _ in range(2000):
        idx = torch.randint(0, n, (256,), generator=g)
        agent.update({k: v[idx] for k, v in data.items()})
    with torch.no_grad():
        mean, log_std = agent.behavior_distribution(torch.zeros(1, 1))
    assert float(mean) == pytest.approx(0.9, abs=0.05) and float(log_std.exp()) == pytest.approx(0.5, abs=0.05)
    episodes = {"obs": [np.zeros((1, 1), np.float32)] * n, "actions": [np.array([[a]], np.float32) for a in actions],
                "rewards": [np.array([a], np.float64) for a in actions]}
    lr = ope.pad_episodes(ope.log_ratios(agent, episodes, 0.3, np.array([-1.0]), np.array([1.0]), "cpu"))
    estimate = float(ope.importance_sampling_estimates(lr, ope.pad_episodes(episodes["rewards"]), 0.9)["ordinary IS"])
    assert estimate == pytest.approx(_truncated_normal_mean(0.2, 0.3, -1.0, 1.0), abs=0.03)  # 0.197


# ---------------------------------------------------------------------------------------------------
# FQE and the behaviour model on a linear-quadratic problem with a closed-form value
# ---------------------------------------------------------------------------------------------------

K_TARGET, K_BEHAVIOUR, NOISE, GAMMA = 0.5, 0.2, 0.3, 0.9


def _lq_batch_source(n: int = 20_000, seed: int = 0):
    """s ~ U(-1, 1), a = -K_BEHAVIOUR s + NOISE eps, s' = s + a, r = -(s^2 + a^2), never terminal."""
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.rand(n, 1, generator=g) - 1
    a = -K_BEHAVIOUR * s + NOISE * torch.randn(n, 1, generator=g)
    return {"obs": s, "actions": a, "rewards": -(s.square() + a.square()).squeeze(-1), "next_obs": s + a,
            "terminals": torch.zeros(n)}


def test_fqe_matches_the_closed_form_value_of_a_linear_policy():
    torch.manual_seed(0)
    config = ope.Config(env="test/lq-v0", device="cpu", gamma=GAMMA, hidden_dims=(64, 64), lr=1e-3, tau=0.02,
                        behavior_hidden_dims=(32, 32))
    spec = DataSpec(obs_dim=1, act_dim=1, max_action=3.0, discrete=False)
    agent = ope.Agent(config, spec, torch.device("cpu"), target_policy=lambda s: -K_TARGET * s)
    data = _lq_batch_source()
    g = torch.Generator().manual_seed(1)
    for _ in range(3000):
        idx = torch.randint(0, len(data["obs"]), (256,), generator=g)
        agent.update({k: v[idx] for k, v in data.items()})
    # V(s) = -P s^2 for a = -k s, s' = (1 - k) s: P = (1 + k^2) / (1 - gamma (1 - k)^2)
    p = (1 + K_TARGET ** 2) / (1 - GAMMA * (1 - K_TARGET) ** 2)
    s0 = torch.linspace(-0.9, 0.9, 13)[:, None]
    fqe = agent.q_value(s0, agent.act(s0))
    true = -p * s0.squeeze(-1).square()
    assert torch.max(torch.abs(fqe - true)) < 0.1 * p, (fqe, true)
    # the behaviour model recovers pi_beta = N(-K_BEHAVIOUR s, NOISE^2)
    mean, log_std = agent.behavior_distribution(s0)
    assert torch.allclose(mean.squeeze(-1), -K_BEHAVIOUR * s0.squeeze(-1), atol=0.05)
    assert torch.allclose(log_std.exp(), torch.full_like(log_std, NOISE), atol=0.05)


# ---------------------------------------------------------------------------------------------------
# A trained run evaluated end to end; resume, determinism; bad input
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pendulum_policy_run(pendulum_expert_id, tmp_path_factory):
    bc = load_algorithm("bc")
    summary = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path_factory.mktemp("policy"), max_steps=300))
    return summary["run_dir"]


def test_ope_evaluates_a_trained_run_beside_its_true_value(pendulum_expert_id, pendulum_policy_run, tmp_path,
                                                          capsys):
    summary = ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, policy=pendulum_policy_run,
                                   max_steps=300, eval_episodes=3, bootstrap=200, log_every=100))
    out = capsys.readouterr().out
    for name in ("ordinary IS", "per-decision IS", "weighted IS", "weighted per-decision IS", "FQE"):
        assert name in out and name in summary["estimates"]
        row = summary["estimates"][name]
        assert row["low"] <= row["estimate"] <= row["high"] or not np.isfinite(row["estimate"])
    truth = summary["true_values"]
    assert truth["deterministic"] < 0 and truth["return"] < truth["deterministic"]  # discounted vs raw
    assert summary["gamma"] == 0.97 and summary["policy"] == pendulum_policy_run
    assert summary["policy_algo"] == "bc" and summary["policy_step"] == 300
    assert "checkpoint step 300" in out
    metrics = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert any("train/fqe_estimate" in m for m in metrics)

    # every estimate again, independently of the file's estimators: the evaluated policy through load_policy
    # on raw observations, pi_beta_hat's (mean, std) from the run's weights, the box-restricted densities with
    # math.erf, and the estimators episode by episode in plain Python
    dataset = load_dataset(pendulum_expert_id)
    normalizer = ObsNormalizer.from_state_dict(load_checkpoint(pendulum_policy_run)["normalizer"])
    policy = load_policy(pendulum_policy_run)
    agent = ope.Agent(ope.Config(env=pendulum_expert_id, device="cpu", gamma=0.97), dataset.spec, torch.device("cpu"))
    agent.load_state_dict(load_checkpoint(summary["run_dir"])["agent"])
    sigma, bound = 0.2 * dataset.max_action, dataset.max_action
    log_ratios, rewards = [], []
    for episode in dataset.episodes:
        raw = episode.observations[:-1]
        with torch.no_grad():
            mean, log_std = agent.behavior_distribution(torch.as_tensor(normalizer(raw)))
        a = episode.actions.astype(np.float64)
        target = _box_normal_log_density(a, policy(raw).astype(np.float64), np.full_like(a, sigma), -bound, bound)
        behaviour = _box_normal_log_density(a, mean.double().numpy(), log_std.double().exp().numpy(), -bound, bound)
        log_ratios.append((target - behaviour).sum(-1))
        rewards.append(episode.rewards.astype(np.float64))
    for name, value in _brute_force_is(log_ratios, rewards, 0.97).items():
        assert summary["estimates"][name]["estimate"] == pytest.approx(value, rel=1e-6, abs=0), name
    s0 = np.stack([e.observations[0] for e in dataset.episodes])
    with torch.no_grad():
        q0 = agent.q_value(torch.as_tensor(normalizer(s0)), torch.as_tensor(policy(s0)))
    assert summary["estimates"]["FQE"]["estimate"] == pytest.approx(float(q0.double().mean()), rel=1e-5)


def test_ope_without_a_policy_takes_the_newest_run_it_can_evaluate(pendulum_expert_id, tmp_path, capsys):
    bc = load_algorithm("bc")
    expressive = load_algorithm("bc_expressive")
    older = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=20))["run_dir"]
    newer = expressive.train(run_config(expressive.Config, pendulum_expert_id, tmp_path, max_steps=5,
                                        eval_episodes=1))["run_dir"]
    os.utime(f"{older}/config.json", (1e9, 1e9))  # the bc run is the older one, whatever the clock's resolution
    capsys.readouterr()
    summary = ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, max_steps=10, eval_episodes=1,
                                   bootstrap=10))
    err = capsys.readouterr().err
    assert summary["policy"] == older and summary["policy_algo"] == "bc" and summary["policy_step"] == 20
    assert f"skipping a newer run: {newer}" in err and "samples its action" in err
    assert f"evaluating {older} (the newest run on {pendulum_expert_id} that ope.py can evaluate): bc, checkpoint " \
           f"step 20" in err
    # only runs it cannot evaluate: one line saying why, nothing written
    only_sampling = tmp_path / "only"
    expressive.train(run_config(expressive.Config, pendulum_expert_id, only_sampling, max_steps=5, eval_episodes=1))
    with pytest.raises(UserError, match="none of the 1 run.*samples its action.*--policy RUN_DIR"):
        ope.train(run_config(ope.Config, pendulum_expert_id, only_sampling, max_steps=10))
    assert not (only_sampling / "runs" / "ope").exists()


def test_ope_resume_equals_straight_run_and_is_deterministic(pendulum_expert_id, pendulum_policy_run, tmp_path):
    straight, resumed, a, b = train_straight_and_resumed(ope, pendulum_expert_id, tmp_path, 60, 120,
                                                         policy=pendulum_policy_run, eval_episodes=2, bootstrap=50,
                                                         checkpoint_every=60, log_every=60)
    assert_states_equal(a, b, ["critic", "target_critic", "behavior"])
    assert straight["estimates"] == resumed["estimates"]


def test_ope_bad_input_gives_one_clear_line(pendulum_expert_id, cartpole_mixed_id, tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, policy=str(tmp_path / "missing"), max_steps=5))
    bc = load_algorithm("bc")
    cartpole_run = bc.train(run_config(bc.Config, cartpole_mixed_id, tmp_path / "cp", max_steps=20))["run_dir"]
    with pytest.raises(UserError, match="trained on 'test/cartpole/mixed-v0'.*environment it was trained for"):
        ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, policy=cartpole_run, max_steps=5))
    with pytest.raises(UserError, match="discrete actions"):
        ope.train(run_config(ope.Config, cartpole_mixed_id, tmp_path, policy=cartpole_run, max_steps=5))
    with pytest.raises(UserError, match="no trained run for"):
        ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path / "empty", max_steps=5))
    with pytest.raises(UserError, match="--target-std"):
        ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, policy=cartpole_run, target_std=0.0))
    expressive = load_algorithm("bc_expressive")
    sampled_run = expressive.train(run_config(expressive.Config, pendulum_expert_id, tmp_path / "gmm", max_steps=5,
                                              eval_episodes=1))["run_dir"]
    with pytest.raises(UserError, match="samples its action.*one deterministic action per state"):
        ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path, policy=sampled_run, max_steps=5))
    assert not (tmp_path / "runs" / "ope").exists()  # nothing written before the input was checked
