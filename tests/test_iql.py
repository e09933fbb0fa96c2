"""IQL: the expectile loss and expectile regression, the update's losses by hand, clipped weights, the
cosine schedule, paper settings, resume, and learning on mixed data (beats BC and the behaviour policy)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (assert_states_equal, behaviour_return, checkpoint_agent, load_algorithm, random_batch,
                      run_config)

from common.datasets import DataSpec
from common.errors import UserError

iql = load_algorithm("iql")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


# ---------------------------------------------------------------------------------------------------
# The expectile loss and expectile regression (lecture: "Aside: Expectile regression")
# ---------------------------------------------------------------------------------------------------


def test_expectile_loss_matches_hand_computed_values():
    u = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    # l2^tau(u) = |tau - 1(u < 0)| u^2: negative u weigh 1 - tau, the others tau
    expected = {0.7: [0.3 * 4, 0.3 * 0.25, 0.0, 0.7 * 1, 0.7 * 9],
                0.9: [0.1 * 4, 0.1 * 0.25, 0.0, 0.9 * 1, 0.9 * 9],
                0.5: [0.5 * 4, 0.5 * 0.25, 0.0, 0.5 * 1, 0.5 * 9]}
    for tau, values in expected.items():
        assert torch.allclose(iql.expectile_loss(u, tau), torch.tensor(values)), tau


def _expectile_by_bisection(x: np.ndarray, tau: float) -> float:
    """The tau-expectile e of the empirical distribution x: tau E[(x - e)+] = (1 - tau) E[(e - x)+]."""
    lo, hi = float(x.min()), float(x.max())
    for _ in range(200):  # f(e) = tau E(x-e)+ - (1-tau) E(e-x)+ decreases in e
        mid = 0.5 * (lo + hi)
        f = tau * np.maximum(x - mid, 0).mean() - (1 - tau) * np.maximum(mid - x, 0).mean()
        lo, hi = (mid, hi) if f > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _fit_expectile(x: np.ndarray, tau: float, max_steps: int = 5000) -> float:
    """Minimise E[l2^tau(x - v)] over a scalar v by gradient descent from v = 0, as V's loss does per state."""
    samples = torch.tensor(x, dtype=torch.float64)
    v = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([v], lr=0.45 / max(tau, 1 - tau))  # below 1 / curvature: no overshoot
    for _ in range(max_steps):
        optimizer.zero_grad()
        iql.expectile_loss(samples - v, tau).mean().backward()
        if abs(float(v.grad)) < 1e-10:
            break
        optimizer.step()
    return float(v.detach())


@pytest.mark.parametrize("tau", [0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
def test_expectile_regression_recovers_the_expectiles_of_a_fixed_distribution(tau):
    # a skewed distribution (exponential plus a Gaussian bump), where expectiles differ from quantiles
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.exponential(2.0, 3000), rng.normal(-1.0, 0.3, 1000)])
    assert _fit_expectile(x, tau) == pytest.approx(_expectile_by_bisection(x, tau), abs=1e-6)


def test_expectile_of_a_fair_coin_is_tau():
    # x in {0, 1} with probability 1/2 each: tau (1 - e) = (1 - tau) e  gives  e = tau exactly
    x = np.array([0.0, 1.0] * 50)
    for tau in (0.1, 0.5, 0.7, 0.9):
        assert _fit_expectile(x, tau) == pytest.approx(tau, abs=1e-6)


def test_expectile_half_is_the_mean_and_expectiles_grow_with_tau():
    x = np.random.default_rng(1).gamma(2.0, 1.5, 2000)
    assert _fit_expectile(x, 0.5) == pytest.approx(x.mean(), abs=1e-6)
    fitted = [_fit_expectile(x, tau) for tau in (0.1, 0.5, 0.7, 0.9, 0.99)]
    assert all(a < b for a, b in zip(fitted, fitted[1:]))
    assert fitted[-1] < x.max()


# ---------------------------------------------------------------------------------------------------
# The update rule
# ---------------------------------------------------------------------------------------------------


def test_advantage_weights_clip_at_the_configured_max():
    advantage = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 1e4])
    weights = iql.advantage_weights(advantage, beta=3.0, max_weight=100.0)
    expected = torch.minimum(torch.exp(3.0 * torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 0.0])), torch.tensor(100.0))
    expected[-1] = 100.0  # exp(3e4) overflows to inf and must still come out as the clip, not NaN
    assert torch.allclose(weights, expected)
    assert float(weights.max()) == 100.0 and torch.isfinite(weights).all()
    assert float(iql.advantage_weights(torch.tensor([2.0]), beta=3.0, max_weight=7.5)) == 7.5


def _batch(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(n, SPEC.obs_dim, SPEC.act_dim, 1.0, seed)


def _agent(**overrides) -> "iql.Agent":
    fields = dict(env="test/pendulum/mixed-v0", device="cpu", max_steps=100, hidden_dims=(32, 32),
                  expectile=0.7, beta=3.0, reward_transform="none", actor_dropout=0.0)
    fields.update(overrides)
    torch.manual_seed(0)
    return iql.Agent(iql.Config(**fields), SPEC, torch.device("cpu"))


@pytest.mark.parametrize("policy", ["gaussian", "deterministic"])
def test_update_losses_match_the_paper_computed_by_hand(policy):
    # a large beta and a small clip, so that many weights are clipped and the clip is visible in the loss
    agent = _agent(policy=policy, beta=50.0, max_weight=2.0, gamma=0.9)
    b = _batch()
    with torch.no_grad():
        q_target = agent.target_critic(b["obs"], b["actions"])  # (2, n)
        q_min = torch.minimum(q_target[0], q_target[1])
        v = agent.value(b["obs"]).squeeze(-1)
        u = q_min - v
        value_loss = (torch.where(u < 0, 0.3, 0.7) * u ** 2).mean()
        y = b["rewards"] + 0.9 * (1 - b["terminals"]) * agent.value(b["next_obs"]).squeeze(-1)
        q = agent.critic(b["obs"], b["actions"])
        q_loss = ((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean()
        weights = torch.minimum(torch.exp(50.0 * u), torch.tensor(2.0))
        mean = 2.0 * torch.tanh(agent.actor(b["obs"]))
        if policy == "gaussian":
            dist = torch.distributions.Normal(mean, agent.log_std.exp())
            per_sample = -dist.log_prob(b["actions"]).sum(-1)
        else:
            per_sample = ((mean - b["actions"]) ** 2).sum(-1)
        actor_loss = (weights * per_sample).mean()
    logs = agent.update(b)
    assert torch.allclose(logs["train/value_loss"], value_loss, rtol=1e-5)
    assert torch.allclose(logs["train/q_loss"], q_loss, rtol=1e-5)
    assert torch.allclose(logs["train/actor_loss"], actor_loss, rtol=1e-5)
    assert torch.allclose(logs["train/weight_clipped_frac"], (50.0 * u >= math.log(2.0)).float().mean())
    assert 0.1 < float(logs["train/weight_clipped_frac"]) < 0.9
    assert torch.allclose(logs["train/q_data"], q_min.mean())
    assert torch.allclose(logs["train/adv_mean"], u.mean())


def test_update_moves_every_network_and_targets_by_polyak():
    agent = _agent(tau=0.25)
    before = {name: [p.detach().clone() for p in net.parameters()]
              for name, net in [("actor", agent.actor), ("value", agent.value), ("critic", agent.critic)]}
    target_before = [p.detach().clone() for p in agent.target_critic.parameters()]
    agent.update(_batch())
    for name, net in [("actor", agent.actor), ("value", agent.value), ("critic", agent.critic)]:
        assert any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())), name
    for old, new, online in zip(target_before, agent.target_critic.parameters(), agent.critic.parameters()):
        assert torch.allclose(new, 0.75 * old + 0.25 * online.detach())


def test_actor_learning_rate_follows_a_cosine_to_zero():
    agent = _agent(max_steps=40, lr=1e-3)
    for step in range(40):
        agent.update(_batch(8))  # update number `step` (from 0) runs at lr (1 + cos(pi step / 40)) / 2
        expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 40))
        assert float(agent.actor_optimizer.param_groups[0]["lr"]) == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert agent.critic_optimizer.param_groups[0]["lr"] == 1e-3
    constant = _agent(max_steps=40, lr=1e-3, cosine_schedule=False)
    for _ in range(30):
        constant.update(_batch(8))
    assert float(constant.actor_optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3)


def test_q_value_is_the_min_of_the_target_twins():
    agent = _agent()
    b = _batch(16)
    q = agent.target_critic(b["obs"], b["actions"])
    assert torch.allclose(agent.q_value(b["obs"], b["actions"]), q.min(dim=0).values)
    assert agent.q_value(b["obs"], b["actions"]).shape == (16,)


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        iql.Agent(iql.Config(env="test/x-v0", device="cpu", max_steps=10), DataSpec(4, 2, 1.0, True),
                  torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env, expectile, beta, reward, dropout", [
    ("halfcheetah-medium-v2", 0.7, 3.0, "return-range", 0.0),
    ("hopper-medium-v2", 0.7, 3.0, "return-range", 0.0),
    ("antmaze-large-play-v2", 0.9, 10.0, "minus-one", 0.0),
    ("D4RL/antmaze/umaze-v1", 0.9, 10.0, "minus-one", 0.0),
    ("pen-human-v1", 0.7, 0.5, "none", 0.1),
    ("kitchen-mixed-v0", 0.7, 0.5, "none", 0.1),
    ("local/pendulum/medium-replay-v0", 0.7, 3.0, "return-range", 0.0),
    ("walker2d-medium-v2", 0.7, 3.0, "return-range", 0.0),
    ("mujoco/hopper/expert-v0", 0.7, 3.0, "return-range", 0.0),
    ("local/hopper-150k/medium-replay-v0", 0.7, 3.0, "return-range", 0.0),
    # the return-range rescaling is for halfcheetah, hopper and walker2d only (official code, CORL)
    ("maze2d-umaze-v1", 0.7, 3.0, "none", 0.0),
    ("mujoco/ant/expert-v0", 0.7, 3.0, "none", 0.0),
    ("mujoco/humanoid/medium-v0", 0.7, 3.0, "none", 0.0),
])
def test_dataset_settings_are_the_papers(env, expectile, beta, reward, dropout):
    from common.runs import apply_dataset_settings

    config = apply_dataset_settings(iql.Config(env=env), iql.DATASET_SETTINGS)
    assert (config.expectile, config.beta, config.reward_transform, config.actor_dropout) == \
        (expectile, beta, reward, dropout)
    assert config.max_steps is not None and config.lr == 3e-4 and config.hidden_dims == (256, 256)


def test_no_default_reduces_iql_to_sarsa_weighted_bc():
    # expectile 0.5 makes V the mean of Q (SARSA); with beta ~1 the actor is almost plain BC (TorchRL's pitfall)
    for _, row in iql.DATASET_SETTINGS:
        assert row["expectile"] >= 0.7 and row["beta"] >= 0.5
    assert iql.Config().max_weight == 100.0 and iql.Config().policy == "gaussian"


# ---------------------------------------------------------------------------------------------------
# Runs: resume and learning
# ---------------------------------------------------------------------------------------------------


def test_resume_after_a_kill_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id, monkeypatch):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, hidden_dims=(32, 32), max_steps=200)
    straight = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path / "a", **common))

    original = iql.Agent.update

    def killed_after_step_150(self, batch):
        if self.step == 150:  # the checkpoint of step 100 is on disk; 50 steps of progress are lost
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(iql.Agent, "update", killed_after_step_150)
    with pytest.raises(KeyboardInterrupt):
        iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path / "b", **common))
    monkeypatch.setattr(iql.Agent, "update", original)
    run_dir = next((tmp_path / "b" / "runs").glob("iql/*/*"))
    assert checkpoint_agent(run_dir)["step"] == 100
    resumed = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path / "b", resume=str(run_dir), **common))

    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ("actor", "value", "critic", "target_critic"))
    rows = lambda d: [json.loads(line) for line in open(f"{d}/metrics.jsonl") if "train/q_loss" in line]
    assert [r["train/actor_loss"] for r in rows(straight["run_dir"])] == \
        [r["train/actor_loss"] for r in rows(resumed["run_dir"])]
    assert straight["return_mean"] == resumed["return_mean"]


def test_iql_beats_bc_and_the_behaviour_policy_on_mixed_data(tmp_path, pendulum_mixed_id):
    # 15 expert + 45 uniform-random Pendulum episodes. Cloning the mixture averages the expert's swing-up
    # torque with random torque and fails (about -1500); IQL's advantage weights pick the expert's actions.
    # Small networks and lr 1e-3 for a short run; the paper's tau 0.7, beta 3 and return-range rewards.
    common = dict(max_steps=3000, hidden_dims=(64, 64), lr=1e-3)
    result = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path, **common))
    bc = load_algorithm("bc")
    cloned = bc.train(run_config(bc.Config, pendulum_mixed_id, tmp_path, **common))
    behaviour = behaviour_return(pendulum_mixed_id)  # about -955
    assert result["return_mean"] > behaviour + 200, (result["return_mean"], behaviour)
    assert result["return_mean"] > cloned["return_mean"] + 400, (result["return_mean"], cloned["return_mean"])
