"""Each figure's claim as a test, on the figure code's own functions with small sizes (common/figures/)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import load_algorithm

from common.envs.fork import summarize
from common.figures import (bcq_tabular, bear_gridworld, compounding_error, cql_lower_bound, expectiles,
                            importance_sampling, multimodal, naive_divergence, stitching, toy_control)
from common.figures.offline_training import train_and_track
from common.figures.tabular import value_iteration

# ---------------------------------------------------------------------------------------------------
# Figure 1: tabular BCQ
# ---------------------------------------------------------------------------------------------------


def test_restricted_mdp_keeps_exactly_the_observed_transitions():
    mdp = bcq_tabular.lattice_mdp(bcq_tabular.SLIP)
    data = bcq_tabular.collect(mdp, 6, np.random.default_rng(0))
    t = bcq_tabular.counts(data, mdp.n_states)
    restricted, allowed = bcq_tabular.restricted_mdp(t, mdp)
    assert np.array_equal(allowed, t.sum(2) > 0)
    rows = restricted.P[allowed]
    assert np.allclose(rows.sum(1), 1.0)  # estimated probabilities t(s,a,s') / t(s,a)
    assert np.all((rows > 0) == (t[allowed] > 0))  # only observed next states


def test_bcq_deterministic_estimate_is_exact_and_never_leaves_the_data():
    res = bcq_tabular.run(0.0)
    finite = np.isfinite(res.q_exact_restricted)
    assert np.allclose(res.q_bcq[finite], res.q_exact_restricted[finite], atol=1e-4)  # Q-learning converged
    assert res.estimate_bcq == pytest.approx(res.true_bcq, abs=1e-4)
    assert res.unknown_bcq == 0.0
    assert res.estimate_naive > res.true_naive + 0.5  # naive Q-learning trusts its arbitrary unseen values
    assert res.unknown_naive > 0.5


def test_bcq_stochastic_policy_is_swept_into_the_unknown():
    res = bcq_tabular.run(bcq_tabular.SLIP)
    assert res.unknown_bcq > 0.1
    assert abs(res.estimate_bcq - res.true_bcq) > 0.05  # only as good as the estimated probabilities


# ---------------------------------------------------------------------------------------------------
# Figure 2: BEAR's 1-D grid-world
# ---------------------------------------------------------------------------------------------------


def test_support_constraint_succeeds_where_distribution_matching_fails():
    sizes = (10, 30, 60)
    curves = bear_gridworld.success_curves(sizes, alphas=(1.0, 0.1, 0.01))
    assert np.allclose(curves["support"], 1.0)
    for name in ("alpha=1", "alpha=0.1", "alpha=0.01"):
        assert np.all(np.diff(curves[name]) < 0), name  # shrinks as the grid grows
        assert curves[name][-1] < 1e-6, name  # and approaches 0
    assert curves["alpha=1"][0] < 1e-3  # a tight penalty fails already on a small grid


def test_support_constraint_policy_always_goes_right_and_matching_copies_behaviour_far_from_goal():
    size = 30
    _, start, goal, pi_beta = bear_gridworld.grid(size)
    support = bear_gridworld.support_constraint_policy(size)
    assert np.all(support[start:goal, bear_gridworld.RIGHT] == 1.0)
    matching = bear_gridworld.distribution_matching_policy(size, 0.1)
    assert matching[start, bear_gridworld.RIGHT] == pytest.approx(pi_beta[start, bear_gridworld.RIGHT], abs=0.01)
    assert np.all(matching[:start, bear_gridworld.RIGHT] == 0.0)  # no weight outside pi_beta's support


# ---------------------------------------------------------------------------------------------------
# Figure 3: expectile regression
# ---------------------------------------------------------------------------------------------------


def test_expectile_half_is_mean():
    x, y = expectiles.sample(300)
    phi = expectiles.features(x)
    assert np.allclose(expectiles.fit_expectile(phi, y, 0.5), np.linalg.lstsq(phi, y, rcond=None)[0], atol=1e-9)
    assert expectiles.scalar_expectile(y, 0.5) == pytest.approx(y.mean(), abs=1e-12)


def test_expectiles_increase_with_tau_towards_the_max():
    x, y = expectiles.sample(300)
    phi = expectiles.features(np.linspace(-1, 1, 50))
    fits = [phi @ expectiles.fit_expectile(expectiles.features(x), y, tau) for tau in (0.1, 0.5, 0.9, 0.99)]
    assert all(np.all(a < b) for a, b in zip(fits[:-1], fits[1:]))
    values = [expectiles.scalar_expectile(y, tau) for tau in (0.5, 0.9, 0.99, 0.999)]
    assert all(a < b for a, b in zip(values[:-1], values[1:])) and values[-1] < y.max()
    assert y.max() - values[-1] < 0.1 * (y.max() - y.mean())


def test_expectile_fit_is_a_minimum_of_iqls_loss():
    expectile_loss = load_algorithm("iql").expectile_loss
    x, y = expectiles.sample(200)
    phi = expectiles.features(x)
    for tau in (0.1, 0.7, 0.9):
        w = torch.tensor(expectiles.fit_expectile(phi, y, tau), requires_grad=True)
        loss = expectile_loss(torch.tensor(y) - torch.tensor(phi) @ w, tau).sum()
        loss.backward()
        assert torch.abs(w.grad).max() < 1e-5, tau  # a stationary point (a step of 0.01 gives gradients ~1)


# ---------------------------------------------------------------------------------------------------
# Figure 4: naive off-policy divergence; figure 8: CQL's lower bound (the library's algorithm files)
# ---------------------------------------------------------------------------------------------------


def test_vector_pendulum_matches_gymnasium():
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=7)
    vec = toy_control.VectorPendulum(1, 0)
    vec.reset(env.unwrapped.state[None])
    rng = np.random.default_rng(0)
    for _ in range(200):
        action = (toy_control.pendulum_expert(obs[None])[0] + 0.3 * rng.standard_normal(1)).astype(np.float32)
        obs, reward, *_ = env.step(action)
        vec_obs, vec_reward = vec.step(action[None])
        assert np.array_equal(vec_obs[0], obs) and vec_reward[0] == reward


def test_naive_q_diverges_above_true_return_while_td3_bc_does_not():
    data = toy_control.rollout_dataset(10_000, noise=naive_divergence.NOISE, seed=0)
    gaps = {}
    for name, (algo, cfg) in naive_divergence.METHODS.items():
        rec = train_and_track(algo, data, 1_500, 500, **cfg)
        gaps[algo] = rec["q"] - rec["true"]
    assert gaps["sac_offline"][-1] > 3.0 and gaps["sac_offline"][-1] > gaps["sac_offline"][1]  # above, growing
    assert abs(gaps["td3_bc"][-1]) < 2.5 and abs(gaps["td3_bc"][-1]) < abs(gaps["td3_bc"][0])  # closing in
    assert gaps["sac_offline"][-1] > 3 * abs(gaps["td3_bc"][-1])


def test_cql_estimate_below_true_value_and_naive_above():
    res = cql_lower_bound.run(alphas=(0.0, 10.0), steps=1_000, eval_every=1_000)
    assert res[0.0]["q"][-1] > res[0.0]["true"][-1]  # naive: over-estimates
    assert res[10.0]["q"][-1] < res[10.0]["true"][-1]  # CQL: a lower bound


# ---------------------------------------------------------------------------------------------------
# Figure 5: multimodal demonstrations
# ---------------------------------------------------------------------------------------------------


def test_l2_policy_drives_into_the_obstacle_and_the_mixture_and_diffusion_pass_on_both_sides():
    paths = multimodal.run(episodes=40)["paths"]  # the figure's own training and rollouts, 40 episodes
    stats = {name: summarize(p) for name, p in paths.items()}
    assert stats["l2 BC"]["collision_rate"] >= 0.75, stats["l2 BC"]  # the mean of the two modes: straight ahead
    for name in ("Gaussian mixture BC", "diffusion BC", "expert (demonstrator)"):
        assert stats[name]["success_rate"] >= 0.75, (name, stats[name])
        assert stats[name]["left_success"] >= 0.2 and stats[name]["right_success"] >= 0.2, (name, stats[name])


def test_figure_5_demonstrations_are_the_built_fork_expert_dataset(fork_expert_id):
    from common.datasets import load_dataset

    data = multimodal.demonstrations()
    built = load_dataset(fork_expert_id, download=False).transitions()
    assert np.array_equal(data["obs"], built["obs"]) and np.array_equal(data["actions"], built["actions"])
    assert multimodal.first_action_left(data) == pytest.approx(0.5, abs=0.1)  # both modes, about half each


# ---------------------------------------------------------------------------------------------------
# Figure 6: compounding error (algorithms/dagger.py through common/reporting/compounding.py)
# ---------------------------------------------------------------------------------------------------


def test_bc_errors_compound_with_the_horizon_and_daggers_do_not():
    _, _, fits = compounding_error.run(horizons=(25, 200), seeds=(0,), eval_episodes=10)
    bc, dagger = fits["BC"], fits["DAgger"]
    assert bc["cost"][-1].mean() > 3 * dagger["cost"][-1].mean()
    assert bc["cost_exponent_means"] > dagger["cost_exponent_means"] + 0.5


# ---------------------------------------------------------------------------------------------------
# Figure 7: importance sampling
# ---------------------------------------------------------------------------------------------------


def test_weighted_is_has_lower_variance_than_ordinary_at_large_mismatch():
    res = importance_sampling.sweep(targets=(importance_sampling.P_BEHAVIOUR, 0.6, 0.9), episodes=50, repeats=200)
    ordinary, weighted = res["ordinary IS"], res["weighted IS"]
    assert weighted["std"][-1] < ordinary["std"][-1] / 10
    assert ordinary["std"][-1] > 100 * ordinary["std"][0]  # the variance explodes with the mismatch
    for name in ("ordinary IS", "per-decision IS"):  # unbiased at a moderate mismatch
        assert abs(res[name]["bias"][1]) < 3 * res[name]["bias_se"][1], name
    assert weighted["bias"][-1] < -3 * weighted["bias_se"][-1]  # weighted IS trades it for a bias
    for name in importance_sampling.ESTIMATORS:  # on-policy, every ratio is 1: all four are the same mean
        assert res[name]["bias"][0] == pytest.approx(res["ordinary IS"]["bias"][0], abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Figure 9: stitching
# ---------------------------------------------------------------------------------------------------


def test_iql_stitches_s1_to_s9_and_bc_does_not():
    data = stitching.dataset()
    _, _, pi_iql = stitching.tabular_iql(data)
    pi_bc = stitching.behaviour_cloning(data)
    assert stitching.greedy_path(pi_iql) == stitching.STITCHED
    assert stitching.success_probability(stitching.most_likely(pi_iql)) == 1.0
    assert stitching.success_probability(pi_bc) == pytest.approx(0.5)
    assert stitching.path_probability(pi_bc, stitching.STITCHED) == pytest.approx(0.25)
    assert pi_iql["s3"]["up"] > 0.9 > pi_bc["s3"]["up"]  # the advantage weights at s3 pick the way to s7


def test_tabular_iql_value_is_an_expectile_of_q():
    data = stitching.dataset()
    q, v, _ = stitching.tabular_iql(data, tau=0.5)
    # at s3 two dataset actions: tau = 0.5 gives their mean, tau -> 1 their max
    assert v["s3"] == pytest.approx(0.5 * (q[("s3", "up")] + q[("s3", "right")]))
    q9, v9, _ = stitching.tabular_iql(data, tau=0.999)
    assert v9["s3"] == pytest.approx(max(q9[("s3", "up")], q9[("s3", "right")]), rel=0.05)


# ---------------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------------


def test_runner_draws_a_figure_and_its_caption(tmp_path):
    from common.figures.__main__ import main

    assert main(["expectile", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "3-expectile-regression.png").stat().st_size > 10_000
    readme = (tmp_path / "README.md").read_text()
    assert "Aside: Expectile regression" in readme and "tau = 0.5 is the mean" in readme
    from common.runs import git_commit

    assert f"at commit {git_commit()[:12]}" in readme  # the caption names the commit that drew it
    assert main(["no-such-figure", "--output", str(tmp_path)]) == 2


def test_value_iteration_respects_the_allowed_actions():
    mdp = bcq_tabular.lattice_mdp(0.0)
    allowed = np.zeros(mdp.R.shape, bool)
    allowed[:, bcq_tabular.DOWN] = True
    q = value_iteration(mdp, allowed)
    assert np.all(np.isinf(q[:, bcq_tabular.UP])) and np.all(np.isfinite(q[:, bcq_tabular.DOWN]))
