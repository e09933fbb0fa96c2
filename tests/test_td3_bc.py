"""TD3+BC: lambda = alpha / mean|Q|, the loss without its Q term is pure BC, TD3's target and delay, learning, and
the online phase (TD3's Gaussian exploration inside the box; resume mid-online continues exactly)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_same_train_logs, assert_states_equal, behaviour_return, checkpoint_agent, load_algorithm,
                      random_batch, run_config, train_straight_and_resumed)

from common.datasets import DataSpec
from common.errors import UserError

td3_bc = load_algorithm("td3_bc")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def _batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(n, SPEC.obs_dim, SPEC.act_dim, SPEC.max_action, seed)


def _agent(**overrides) -> td3_bc.Agent:
    torch.manual_seed(0)
    return td3_bc.Agent(td3_bc.Config(hidden_dims=(32, 32), **overrides), SPEC, torch.device("cpu"))


def test_lambda_is_alpha_over_mean_abs_q_and_the_actor_loss_matches():
    agent = _agent(alpha=2.5, policy_freq=1)
    batch = _batch()
    agent.update(batch)  # one critic + actor step, so the critics are not at their initialisation
    batch = _batch(seed=1)
    critic_before, actor_before = copy.deepcopy(agent.critic), copy.deepcopy(agent.actor)
    logs = agent.update(batch)
    # the actor step sees the critics after this step's critic update: recompute that update's result
    critic_after = agent.critic
    pi = actor_before(batch["obs"])
    q1 = critic_after(batch["obs"], pi)[0]
    lmbda = 2.5 / q1.abs().mean().detach()  # a constant: no gradient flows through the normaliser
    expected_loss = -lmbda * q1.mean() + F.mse_loss(pi, batch["actions"])
    expected_grads = torch.autograd.grad(expected_loss, list(actor_before.parameters()))
    assert not torch.equal(critic_before.layers[0].weight, critic_after.layers[0].weight)
    assert logs["train/lambda"].item() == pytest.approx(lmbda.item(), rel=1e-5)
    assert logs["train/actor_loss"].item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for p, g in zip(agent.actor.parameters(), expected_grads):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)


def test_q1_is_the_first_critic_and_its_gradient_stops_at_the_action():
    agent = _agent()
    batch = _batch()
    actions = batch["actions"].clone().requires_grad_(True)
    q1 = agent.critic.q1(batch["obs"], actions)
    assert torch.allclose(q1, agent.critic(batch["obs"], batch["actions"])[0], rtol=1e-5, atol=1e-6)
    q1.sum().backward()
    assert actions.grad is not None and actions.grad.abs().sum() > 0
    assert all(p.grad is None for p in agent.critic.parameters())


def test_actor_loss_without_the_q_term_is_pure_mse():
    agent = _agent(alpha=0.0, policy_freq=1)  # alpha = 0: lambda = 0, only the BC term is left
    batch = _batch()
    actor_before = copy.deepcopy(agent.actor)
    logs = agent.update(batch)
    bc = F.mse_loss(actor_before(batch["obs"]), batch["actions"])
    expected_grads = torch.autograd.grad(bc, list(actor_before.parameters()))
    assert logs["train/actor_loss"].item() == pytest.approx(bc.item(), rel=1e-6)
    assert logs["train/bc_loss"].item() == pytest.approx(bc.item(), rel=1e-6)
    for p, g in zip(agent.actor.parameters(), expected_grads):
        assert torch.allclose(p.grad, g, atol=1e-7), "the actor's gradient must be the MSE's alone"


def test_critic_target_is_the_min_of_the_twin_targets_at_the_target_action():
    agent = _agent(policy_noise=0.0)  # no smoothing noise: a~ = pi_phi'(s') exactly
    batch = _batch()
    with torch.no_grad():
        target_q = agent.critic_target(batch["next_obs"], agent.actor_target(batch["next_obs"])).min(0).values
        y = batch["rewards"] + 0.99 * (1 - batch["terminals"]) * target_q
        expected = ((agent.critic(batch["obs"], batch["actions"]) - y) ** 2).mean(1).sum()
    logs = agent.update(batch)
    assert logs["train/critic_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_actor_and_targets_move_only_every_policy_freq_steps():
    agent = _agent(policy_freq=2)
    actor0, target0 = copy.deepcopy(agent.actor.state_dict()), copy.deepcopy(agent.critic_target.state_dict())
    agent.update(_batch(seed=1))
    assert all(torch.equal(actor0[k], v) for k, v in agent.actor.state_dict().items())
    assert all(torch.equal(target0[k], v) for k, v in agent.critic_target.state_dict().items())
    agent.update(_batch(seed=2))
    assert not all(torch.equal(actor0[k], v) for k, v in agent.actor.state_dict().items())
    assert not all(torch.equal(target0[k], v) for k, v in agent.critic_target.state_dict().items())


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        td3_bc.Agent(td3_bc.Config(), DataSpec(3, 2, 1.0, True), torch.device("cpu"))


def test_td3_bc_beats_the_behaviour_policy_on_mixed_data(tmp_path, pendulum_mixed_id):
    # `test/pendulum/mixed-v0`: 15 expert + 45 uniform-random episodes, behaviour return about -955.
    # alpha = 200, not the paper's 2.5: lambda = alpha / mean|Q| normalises by the size of Q, and on Pendulum
    # (dense costs in [-16, 0]) mean|Q| is a large baseline (~70 at gamma 0.95) while the actions change Q by
    # about 1, so with alpha = 2.5 the BC term wins and the actor clones the mixture's mean action (zero
    # torque: about -1500). Short-run settings: small networks, lr 1e-3, tau 0.05, gamma 0.95.
    config = run_config(td3_bc.Config, pendulum_mixed_id, tmp_path, max_steps=3_000, alpha=200.0, gamma=0.95,
                        tau=0.05, actor_lr=1e-3, critic_lr=1e-3, hidden_dims=(64, 64))
    summary = td3_bc.train(config)
    behaviour = behaviour_return(pendulum_mixed_id)  # about -955 (normalised score about 24)
    # observed (seeds 0 and 1): about -290 (normalised score about 86)
    assert summary["return_mean"] > behaviour + 300, (summary["return_mean"], behaviour)


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, hidden_dims=(32, 32))
    straight, resumed, a, b = train_straight_and_resumed(td3_bc, pendulum_mixed_id, tmp_path, 101, 201, **common)
    assert_states_equal(a, b, ("actor", "actor_target", "critic", "critic_target"))
    assert a["total_it"] == b["total_it"] == 201
    assert_same_train_logs(straight, resumed, steps=[50, 100, 150, 200, 201])


# --- online fine-tuning -------------------------------------------------------------------------------------

def test_explore_adds_gaussian_noise_of_expl_noise_times_max_action_inside_the_box():
    """TD3's exploration: pi(s) + N(0, (sigma max_action)^2), sigma = online_explore_noise, clipped to the box.
    With 0.1 and max_action 2 the spread around pi(s) is 0.2; with a noise far wider than the box the actions reach the
    bounds and never pass them."""
    agent = _agent(online_explore_noise=0.1)
    obs = torch.zeros(4000, SPEC.obs_dim)
    first, second = agent.explore(obs), agent.explore(obs)
    assert not torch.equal(first, second)  # stochastic
    deviation = first - agent.act(obs)
    assert abs(float(deviation.mean())) < 0.01 and float(deviation.std()) == pytest.approx(0.2, rel=0.05)
    wide = _agent(online_explore_noise=5.0).explore(obs)
    assert wide.abs().max() <= SPEC.max_action and (wide.abs() == SPEC.max_action).any()


def test_resume_mid_online_equals_an_uninterrupted_run(pendulum_mixed_id, tmp_path):
    """100 offline updates, then stopped 150 env steps into the online phase (mid-episode) and resumed to 450:
    the same weights, online buffer, delayed-update counter and scores as a run that never stopped."""
    fast = dict(hidden_dims=(32, 32), batch_size=64, eval_episodes=2, log_every=50, eval_every=100)
    straight = td3_bc.train(run_config(td3_bc.Config, pendulum_mixed_id, tmp_path / "a", max_steps=100,
                                       online_steps=450, **fast))
    first = td3_bc.train(run_config(td3_bc.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100,
                                    online_steps=150, **fast))
    resumed = td3_bc.train(run_config(td3_bc.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100,
                                      online_steps=450, resume=first["run_dir"], **fast))
    assert resumed["run_dir"] == first["run_dir"]
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ("actor", "actor_target", "critic", "critic_target"))
    assert a["total_it"] == b["total_it"] == 550
    buffers = [torch.load(f"{r['run_dir']}/checkpoint.pt", weights_only=True)["sampler"]["rows"]
               for r in (straight, resumed)]
    assert buffers[0]["obs"].shape[0] == 450
    for key in buffers[0]:
        assert torch.equal(buffers[0][key], buffers[1][key]), key
    for key in ("normalized_score_mean", "offline_normalized_score_mean", "online_regret", "online_episodes"):
        assert straight[key] == resumed[key], key
