"""common/dynamics.py: the ensemble fits a known linear-Gaussian system, its loss by hand, a diverging fit stops
with one line, the termination rules against the envs' own step, rollouts that stop exactly at terminations, the
elites-only model step draws what the all-members step draws, the model buffer, the mixed batch, and the
tanh-Gaussian policy's log-density against torch.distributions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import env_step_samples

from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from common import dynamics, networks
from common.datasets import DataSpec
from common.errors import UserError

# the dynamics fields of an algorithm's Config (this module reads only these)
TINY = dict(ensemble_size=3, num_elites=2, dynamics_hidden_dims=(32, 32), dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4),
            dynamics_lr=1e-3, dynamics_batch_size=256, dynamics_holdout_ratio=0.2, dynamics_max_holdout=1_000,
            dynamics_min_epoch_steps=100, dynamics_max_epochs=4, dynamics_patience=2, termination="env",
            rollout_batch_size=200, rollout_length=3, model_retain_rounds=5)


def model_config(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{**TINY, **overrides})


# ---------------------------------------------------------------------------------------------------------
# The ensemble and its fit
# ---------------------------------------------------------------------------------------------------------

LINEAR_A = np.array([[0.9, 0.2], [-0.1, 0.8]])
LINEAR_B = np.array([[0.5], [-0.3]])
LINEAR_R = np.array([1.0, -0.5, 0.7])  # r = w . (s, a)
NOISE_STD = np.array([0.05, 0.2, 0.1])  # of s'_1, s'_2 and r


def linear_gaussian(n: int, seed: int, low: float = -1.0, high: float = 1.0):
    """s' = A s + B a + eps, r = w.(s, a) + eps_r with known noise: (data dict of tensors, true mean of (ds, r))."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(low, high, (n, 2))
    a = rng.uniform(low, high, (n, 1))
    mean_next = s @ LINEAR_A.T + a @ LINEAR_B.T
    mean_r = np.concatenate([s, a], 1) @ LINEAR_R
    noise = rng.standard_normal((n, 3)) * NOISE_STD
    data = {"obs": s, "actions": a, "next_obs": mean_next + noise[:, :2], "rewards": mean_r + noise[:, 2],
            "terminals": np.zeros(n)}
    true_mean = np.concatenate([mean_next - s, mean_r[:, None]], 1)
    return ({k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.items()},
            torch.as_tensor(true_mean, dtype=torch.float32))


@pytest.fixture(scope="module")
def linear_ensemble():
    """A 4-member ensemble fitted on 6000 transitions of the linear-Gaussian system (a few seconds)."""
    config = model_config(ensemble_size=4, num_elites=3, dynamics_hidden_dims=(64, 64), dynamics_min_epoch_steps=500,
                          dynamics_max_epochs=8, dynamics_patience=3)
    data, _ = linear_gaussian(6000, seed=0)
    torch.manual_seed(0)
    ensemble = dynamics.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    report = dynamics.fit_dynamics(ensemble, data, config, seed=0)
    return ensemble, report, config


def test_ensemble_fits_a_known_linear_gaussian_system(linear_ensemble):
    ensemble, report, _ = linear_ensemble
    data, true_mean = linear_gaussian(2000, seed=1, low=-0.8, high=0.8)  # fresh points inside the data's range
    mean, logvar, _ = ensemble(torch.cat([data["obs"], data["actions"]], -1))
    elites = ensemble.elites
    mean_error = (mean[elites] - true_mean).abs().mean((0, 1))
    predicted_std = torch.exp(0.5 * logvar[elites]).mean((0, 1))
    assert (mean_error < torch.tensor(NOISE_STD) * 0.25).all(), (mean_error, NOISE_STD)
    assert torch.allclose(predicted_std, torch.tensor(NOISE_STD, dtype=torch.float32), rtol=0.25), predicted_std
    # held-out MSE is the noise variance averaged over the three targets, and the elites are the best members
    assert np.mean(report["holdout_mse"]) == pytest.approx(np.mean(NOISE_STD ** 2), rel=0.3)
    assert sorted(report["elites"]) == sorted(np.argsort(report["holdout_mse"])[:3].tolist())


def test_loss_is_the_gaussian_nll_with_decay_and_bounds_by_hand():
    torch.manual_seed(0)
    config = model_config(ensemble_size=2, num_elites=1, dynamics_hidden_dims=(8,), dynamics_weight_decay=(0.1, 0.2))
    ensemble = dynamics.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    x, y, d = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.zeros(2, 5)
    h = torch.nn.functional.silu(torch.baddbmm(ensemble.layers[0].bias, x, ensemble.layers[0].weight))
    out = torch.baddbmm(ensemble.layers[1].bias, h, ensemble.layers[1].weight)
    mean, raw = out[..., :3], out[..., 3:]
    hi, lo = ensemble.max_logvar, ensemble.min_logvar
    logvar = hi - torch.nn.functional.softplus(hi - raw)
    logvar = lo + torch.nn.functional.softplus(logvar - lo)
    nll = sum((((mean[i] - y[i]) ** 2) * torch.exp(-logvar[i]) + logvar[i]).mean() for i in range(2))
    decay = 0.1 * 0.5 * ensemble.layers[0].weight.square().sum() + 0.2 * 0.5 * ensemble.layers[1].weight.square().sum()
    expected = nll + decay + 0.01 * (hi.sum() - lo.sum())
    assert torch.allclose(ensemble.loss(x, y, d), expected, rtol=1e-5)
    assert (logvar <= hi + 1e-6).all() and (logvar >= lo - 1e-6).all()


def test_diverging_fit_stops_with_the_member_and_the_step():
    data, _ = linear_gaussian(600, seed=5)
    config = model_config(dynamics_lr=50.0)
    torch.manual_seed(0)
    ensemble = dynamics.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    with pytest.raises(UserError, match=r"dynamics member \d diverged: held-out error .* at epoch 1 \(gradient step "
                                        r"\d+\).*--dynamics-lr"):
        dynamics.fit_dynamics(ensemble, data, config, seed=0)


def test_fitting_leaves_the_global_rng_alone():
    data, _ = linear_gaussian(600, seed=6)
    config = model_config(dynamics_max_epochs=1)
    torch.manual_seed(0)
    ensemble = dynamics.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    before = torch.get_rng_state()
    dynamics.fit_dynamics(ensemble, data, config, seed=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_elites_only_step_draws_what_the_all_members_step_draws():
    # COMBO's rollouts evaluate the elites only, MOPO's every member (for u): the same model, the same draws
    torch.manual_seed(0)
    ensemble = dynamics.make_dynamics(model_config(ensemble_size=4, num_elites=2), DataSpec(3, 2, 1.0, False))
    with torch.no_grad():
        ensemble.elites.copy_(torch.tensor([3, 1]))
    obs, actions = torch.randn(64, 3), torch.rand(64, 2)
    torch.manual_seed(1)
    elites_only = ensemble.step(obs, actions)
    torch.manual_seed(1)
    every_member = ensemble.step(obs, actions, all_members=True)
    assert torch.allclose(elites_only.next_obs, every_member.next_obs, atol=1e-6)
    assert torch.allclose(elites_only.reward, every_member.reward, atol=1e-6)
    assert elites_only.logvar is None and every_member.logvar.shape == (4, 64, 4)


# ---------------------------------------------------------------------------------------------------------
# Termination rules
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id, kwargs", [
    ("Hopper-v5", {}), ("Hopper-v5", {"exclude_current_positions_from_observation": False}),
    ("Walker2d-v5", {}), ("HalfCheetah-v5", {}), ("Ant-v5", {}), ("Ant-v5", {"include_cfrc_ext_in_observation": False}),
    ("Pendulum-v1", {}),
])
def test_termination_rule_agrees_with_the_envs_own_step(env_id, kwargs):
    samples, spec = env_step_samples(env_id, 400, seed=0, **kwargs)
    rule = dynamics.termination_function(spec, "env")
    got = rule(*(torch.as_tensor(samples[k]) for k in ("obs", "actions", "next_obs"))).numpy()
    expected = samples["terminated"]
    mismatch = got != expected
    if env_id.startswith("Hopper"):
        # the one case no rule on observations can see: |qvel| >= 100 ends the episode, but the observation clips
        # velocities at 10 (the docstring says so); every other step must agree
        invisible = (np.abs(samples["state"][:, 6:]) >= 100).any(1)
        assert not (mismatch & ~invisible).any() and invisible.sum() < 0.05 * len(got)
    else:
        assert not mismatch.any(), np.nonzero(mismatch)
    if env_id in ("HalfCheetah-v5", "Pendulum-v1"):
        assert not expected.any()  # these envs never terminate: the rule is "never" because the env's is
    else:
        assert 0.1 < expected.mean() < 0.9  # both outcomes were exercised


def test_envs_without_a_rule_are_refused_and_antmaze_is_not_ant():
    with pytest.raises(UserError, match="no termination rule for 'InvertedPendulum-v5'.*--termination learned"):
        dynamics.termination_function("InvertedPendulum-v5", "env")
    with pytest.raises(UserError, match="AntMaze_UMaze-v4"):
        dynamics.termination_function("AntMaze_UMaze-v4", "env")
    with pytest.raises(UserError, match="Hopper-v9"):
        dynamics.termination_function("Hopper-v9", "env")
    assert dynamics.termination_function("InvertedPendulum-v5", "learned") is None


# ---------------------------------------------------------------------------------------------------------
# Rollouts, the model buffer, the mixed batch
# ---------------------------------------------------------------------------------------------------------

class FallingHopper:
    """A stand-in model: the hopper's height obs[0] drops by 0.1 every step, reward 1."""

    def step(self, obs, actions, all_members=False):
        next_obs = obs.clone()
        next_obs[:, 0] -= 0.1
        return dynamics.ModelStep(next_obs, torch.ones(len(obs)), None, None)


def test_rollouts_stop_exactly_at_the_first_termination():
    start = torch.zeros(5, 11)
    start[:, 0] = torch.tensor([1.03, 0.98, 0.84, 0.75, 5.0])  # heights: done (z <= 0.7) after 4, 3, 2, 1, never
    rule = dynamics.termination_function("Hopper-v5", "env")
    out, stats = dynamics.model_rollout(lambda obs: torch.zeros(len(obs), 3), FallingHopper(), rule, start, 5)
    kept = sorted(zip(out["start"].tolist(), out["step"].tolist(), out["terminals"].tolist()))
    expected = ([(0, t, float(t == 3)) for t in range(4)] + [(1, t, float(t == 2)) for t in range(3)]
                + [(2, t, float(t == 1)) for t in range(2)] + [(3, 0, 1.0)] + [(4, t, 0.0) for t in range(5)])
    assert kept == expected
    assert torch.equal(out["terminals"].bool(), rule(out["obs"], out["actions"], out["next_obs"]))
    assert float(stats["train/rollout_terminated_frac"]) == pytest.approx(0.8)
    assert float(stats["train/rollout_length_mean"]) == pytest.approx(15 / 5)
    assert "uncertainty" not in out and "train/model_penalty_mean" not in stats


def test_learned_ensemble_rollouts_keep_nothing_after_a_done():
    torch.manual_seed(0)
    ensemble = dynamics.make_dynamics(model_config(), DataSpec(11, 3, 1.0, False))
    with torch.no_grad():
        ensemble.max_logvar.fill_(-5.0)  # an untrained model whose noise (std <= 0.08) ends about half the rollouts
    start = torch.randn(500, 11) * 0.05
    start[:, 0] = 0.72 + 0.3 * torch.rand(500)
    rule = dynamics.termination_function("Hopper-v5", "env")
    out, stats = dynamics.model_rollout(lambda obs: torch.rand(len(obs), 3) * 2 - 1, ensemble, rule, start, 5)
    assert torch.equal(out["terminals"].bool(), rule(out["obs"], out["actions"], out["next_obs"]))
    done_at = {}
    for s, t, d in zip(out["start"].tolist(), out["step"].tolist(), out["terminals"].tolist()):
        assert s not in done_at, "a transition after the rollout's termination was kept"
        if d:
            done_at[s] = t
    assert 0.1 < float(stats["train/rollout_terminated_frac"]) < 1.0
    # each rollout is contiguous from step 0
    for s in set(out["start"].tolist()):
        steps = sorted(out["step"][out["start"] == s].tolist())
        assert steps == list(range(len(steps)))


def test_model_buffer_is_a_fifo_of_the_last_rounds():
    buffer = dynamics.ModelBuffer(10, 1, 1, torch.device("cpu"))
    for first in (0, 4, 8):  # three rounds of 4 rows: the last 10 rows stay
        rows = torch.arange(first, first + 4, dtype=torch.float32)
        buffer.add({"obs": rows[:, None], "actions": rows[:, None], "rewards": rows, "next_obs": rows[:, None],
                    "terminals": torch.zeros(4)})
    assert buffer.size == 10 and sorted(buffer.table[:, 0].tolist()) == list(range(2, 12))
    clone = dynamics.ModelBuffer(10, 1, 1, torch.device("cpu"))
    clone.load_state_dict(buffer.state_dict())
    assert torch.equal(clone.table, buffer.table) and clone.pointer == buffer.pointer
    with pytest.raises(UserError, match="model buffer is empty"):
        dynamics.ModelBuffer(10, 1, 1, torch.device("cpu")).sample(4)


def test_the_mixed_batch_is_n_real_dataset_rows_then_model_rows():
    model = dynamics.LearnedModel(model_config(), DataSpec(2, 1, 1.0, False), torch.device("cpu"))
    rows = torch.arange(20, dtype=torch.float32)
    model.add({"obs": rows[:, None].expand(20, 2), "actions": rows[:, None], "rewards": torch.full((20,), 7.0),
               "next_obs": rows[:, None].expand(20, 2), "terminals": torch.zeros(20)}, {})
    batch = {"obs": torch.randn(8, 2), "actions": torch.randn(8, 1), "rewards": torch.randn(8),
             "next_obs": torch.randn(8, 2), "terminals": torch.zeros(8)}
    obs, actions, rewards, next_obs, terminals = model.mix(batch, 3)
    assert obs.shape == (8, 2) and torch.equal(obs[:3], batch["obs"][:3])
    assert torch.equal(rewards[:3], batch["rewards"][:3])
    assert (rewards[3:] == 7.0).all()  # model rows are recognisable by r = 7
    assert model.stats["train/model_buffer_size"] == 20
    state = model.state_dict()
    assert set(state) == {"dynamics", "dynamics_report", "model_buffer", "rollout_stats"}


def test_model_config_checks_name_the_flag():
    for field, value, message in (("num_elites", 4, "--num-elites must lie in \\[1, --ensemble-size 3\\]"),
                                  ("dynamics_weight_decay", (0.1,), "--dynamics-weight-decay needs 3 values"),
                                  ("rollout_length", 0, "--rollout-length must be at least 1"),
                                  ("dynamics_holdout_ratio", 1.0, "--dynamics-holdout-ratio must lie in \\(0, 1\\)")):
        config = model_config(**{field: value}, rollout_every=1, dynamics_lr=1e-3)
        with pytest.raises(UserError, match=message):
            dynamics.check_model_config(config)
    dynamics.check_model_config(model_config(rollout_every=1))


# ---------------------------------------------------------------------------------------------------------
# The policy's samples and log-density (mopo.py's and combo.py's actors both use these)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_action", [1.0, 2.0, 0.4])
def test_tanh_gaussian_log_prob_is_the_density_of_the_action_on_its_box(max_action):
    # a = max_action tanh(u), u ~ N(mean, std^2): the change of variables (torch.distributions' transforms)
    g = torch.Generator().manual_seed(0)
    mean, log_std = torch.randn(256, 3, generator=g, dtype=torch.float64), 0.3 * torch.randn(256, 3, generator=g,
                                                                                               dtype=torch.float64)
    torch.manual_seed(1)
    actions, log_prob = networks.sample_tanh_gaussian(mean, log_std, max_action, 4)
    assert actions.shape == (256, 4, 3) and log_prob.shape == (256, 4)
    assert (actions.abs() <= max_action).all()
    dist = TransformedDistribution(Normal(mean.unsqueeze(1), log_std.exp().unsqueeze(1)),
                                   [TanhTransform(), AffineTransform(0.0, max_action)])
    inside = (actions.abs() < 0.999 * max_action).all(-1)
    assert torch.allclose(log_prob[inside], dist.log_prob(actions).sum(-1)[inside], atol=1e-6)
