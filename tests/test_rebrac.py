"""ReBRAC: each penalty enters where the paper puts it (beta_1 in the actor's loss only, beta_2 in the critic's
target only), both against hand computations, the authors' update schedule, next actions from episodes,
learning, resume and bad input; the online phase (CORL's beta schedule from the switch on, greedy exploration,
the compiled update's graphs, resume mid-online)."""

from __future__ import annotations

import copy
import functools
import re

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_same_online_phase, assert_same_train_logs, assert_states_equal,
                      behaviour_return, checkpoint_agent, load_algorithm, random_batch, run_algorithm_cli, run_config,
                      train_rows, train_straight_and_resumed)
from torch._dynamo.utils import counters

from common.datasets import DataSpec, Episode, OfflineDataset
from common.errors import UserError

rebrac = load_algorithm("rebrac")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def _batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    batch = random_batch(n, SPEC.obs_dim, SPEC.act_dim, SPEC.max_action, seed)
    g = torch.Generator().manual_seed(seed + 100)
    batch["next_actions"] = 2 * SPEC.max_action * torch.rand(n, SPEC.act_dim, generator=g) - SPEC.max_action
    return batch


def _agent(**overrides) -> rebrac.Agent:
    settings = dict(hidden_dims=(32, 32), actor_beta=0.1, critic_beta=0.1, gamma=0.99, actor_lr=1e-3,
                    critic_lr=1e-3, reward_scale=1.0)
    torch.manual_seed(0)
    return rebrac.Agent(rebrac.Config(**{**settings, **overrides}), SPEC, torch.device("cpu"))


def _update(agent, batch, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the same smoothing noise for every agent
    return agent.update(batch)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_actor_beta_changes_only_the_actors_update():
    # beta_1 sits in the actor's loss alone: with it zeroed, the first update (critic, then actor and targets)
    # leaves the critics and their targets exactly as with beta_1 = 0.5, and moves the actor differently
    batch = _batch()
    with_penalty, without = _agent(actor_beta=0.5), _agent(actor_beta=0.0)
    _update(with_penalty, batch), _update(without, batch)
    assert _equal(with_penalty.critic, without.critic) and _equal(with_penalty.critic_target, without.critic_target)
    assert not _equal(with_penalty.actor, without.actor)


def test_critic_beta_changes_only_the_critics_update():
    # beta_2 sits in the critic's target alone: zeroed, the critic's step differs, while the actor's step taken
    # from the same critics is exactly the same (the actor's loss has no beta_2 in it)
    batch = _batch()
    with_penalty, without = _agent(critic_beta=0.5), _agent(critic_beta=0.0)
    logs_with, logs_without = _update(with_penalty, batch), _update(without, batch)
    assert not _equal(with_penalty.critic, without.critic)
    assert logs_with["train/critic_loss"] != logs_without["train/critic_loss"]
    # the actor's step again, both agents from the same actor and critics: the same loss and gradient
    without.critic.load_state_dict(with_penalty.critic.state_dict())
    without.actor.load_state_dict(with_penalty.actor.state_dict())
    logs = []
    for agent in (with_penalty, without):
        agent.actor_optimizer.zero_grad(set_to_none=True)
        logs.append(agent._actor_step(batch["obs"], batch["actions"]))
    assert torch.equal(logs[0]["train/actor_loss"], logs[1]["train/actor_loss"])
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(with_penalty.actor.parameters(), without.actor.parameters()))


def _constant_actor(actor, action: list[float], max_action: float) -> None:
    """pi(s) = action for every s: the head's weight 0, its bias atanh(action / max_action)."""
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.atanh(torch.tensor(action) / max_action))


def _constant_critics(critic, values: list[float]) -> None:
    """Q_i(s, a) = values[i] for every (s, a): each member's head weight 0, its bias the value."""
    with torch.no_grad():
        critic.layers[-1].weight.zero_()
        critic.layers[-1].bias.copy_(torch.tensor(values).view(-1, 1, 1))


def test_actor_penalty_lambda_and_loss_on_a_hand_made_batch():
    # pi(s) = (0.5, -1) everywhere; the critics are constant in (s, a), Q_1 = -4 and Q_2 = -6, so
    # min_i Q_i = -6, lambda = 1/6, and the Q term's gradient is 0: the actor's gradient is beta_1's alone
    beta1 = 0.3
    agent = _agent(actor_beta=beta1)
    _constant_actor(agent.actor, [0.5, -1.0], SPEC.max_action)
    _constant_critics(agent.critic, [-4.0, -6.0])
    obs = torch.randn(3, SPEC.obs_dim)
    actions = torch.tensor([[1.5, -1.0], [0.5, 1.0], [0.0, -0.5]])  # ||pi - a||^2 = 1, 4, 0.5
    agent.actor_optimizer.zero_grad(set_to_none=True)
    logs = agent._actor_step(obs, actions)
    penalty = (1.0 + 4.0 + 0.5) / 3
    assert logs["train/actor_bc_penalty"].item() == pytest.approx(penalty, rel=1e-6)
    assert logs["train/lambda"].item() == pytest.approx(1 / 6, rel=1e-6)
    assert logs["train/q_policy"].item() == pytest.approx(-6.0, rel=1e-6)
    # beta_1 * mean ||pi - a||^2 - lambda * mean min Q = beta_1 * 11/6 + 1
    assert logs["train/actor_loss"].item() == pytest.approx(beta1 * penalty + 1.0, rel=1e-6)
    # d/db_j of beta_1 mean_n (pi_nj - a_nj)^2, pi_j = m tanh(b_j): beta_1 mean_n 2 (pi_nj - a_nj) m (1 - tanh(b_j)^2)
    pi = [0.5, -1.0]
    expected = [beta1 * sum(2 * (pi[j] - a[j]) for a in actions.tolist()) / 3 * SPEC.max_action
                * (1 - (pi[j] / SPEC.max_action) ** 2) for j in range(2)]
    # the actor's parameters were stepped by Adam; its gradient is kept until the next zero_grad
    assert agent.actor.net[-1].bias.grad.tolist() == pytest.approx(expected, rel=1e-5)


def test_critic_target_penalty_on_a_hand_made_batch():
    # no smoothing noise; the target actor gives a~' = (1, 0) everywhere, the target critics are constant
    # (min -2), the critics constant (Q_1 = 0.5, Q_2 = -0.5): y by hand, with the terminal row's penalty masked
    beta2, gamma = 0.25, 0.9
    agent = _agent(critic_beta=beta2, gamma=gamma, policy_noise=0.0)
    _constant_actor(agent.actor_target, [1.0, 0.0], SPEC.max_action)
    _constant_critics(agent.critic_target, [-2.0, -1.0])
    _constant_critics(agent.critic, [0.5, -0.5])
    batch = {"obs": torch.randn(3, SPEC.obs_dim), "actions": torch.zeros(3, SPEC.act_dim),
             "rewards": torch.tensor([1.0, -1.0, 2.0]), "next_obs": torch.randn(3, SPEC.obs_dim),
             "next_actions": torch.tensor([[1.0, 2.0], [-1.0, 0.0], [1.0, -2.0]]),  # ||a~' - a'||^2 = 4, 4, 4
             "terminals": torch.tensor([0.0, 0.0, 1.0])}
    batch["next_actions"][1] = torch.tensor([0.0, 1.0])  # row 1: ||(1, 0) - (0, 1)||^2 = 2
    logs = agent.update(batch)
    y = [1.0 + gamma * (-2.0 - beta2 * 4.0), -1.0 + gamma * (-2.0 - beta2 * 2.0), 2.0]  # the terminal: r alone
    loss = sum(sum((q - target) ** 2 for target in y) / 3 for q in (0.5, -0.5))
    assert logs["train/critic_bc_penalty"].item() == pytest.approx((4.0 + 2.0 + 4.0) / 3, rel=1e-6)
    assert logs["train/critic_loss"].item() == pytest.approx(loss, rel=1e-6)


def test_actor_trains_at_the_first_update_then_every_policy_freq_and_its_target_lags_one_step():
    agent = _agent(policy_freq=2)
    actor0 = copy.deepcopy(agent.actor)
    critic_target0 = copy.deepcopy(agent.critic_target)
    _update(agent, _batch(seed=1))  # update 1 (t = 0): critic, actor, targets
    actor1, critic_target1 = copy.deepcopy(agent.actor), copy.deepcopy(agent.critic_target)
    assert not _equal(actor1, actor0) and not _equal(critic_target1, critic_target0)
    # the target actor moved toward the actor before its step, which was its own initial copy: unchanged
    assert _equal(agent.actor_target, actor0)
    _update(agent, _batch(seed=2))  # update 2 (t = 1): the critic alone
    assert _equal(agent.actor, actor1) and _equal(agent.critic_target, critic_target1)
    _update(agent, _batch(seed=3))  # update 3 (t = 2): phi' <- tau phi_1 + (1 - tau) phi_0
    assert not _equal(agent.actor, actor1)
    tau = agent.config.tau
    for target, before, init in zip(agent.actor_target.parameters(), actor1.parameters(), actor0.parameters()):
        torch.testing.assert_close(target, tau * before + (1 - tau) * init, rtol=0, atol=1e-7)


def test_critics_have_layer_norm_and_the_authors_initialisation():
    agent = _agent(hidden_dims=(16, 16))
    assert agent.critic.norms is not None and len(agent.critic.norms) == 2
    assert all(torch.all(layer.bias == 0.1) for layer in agent.critic.layers[:-1])
    assert agent.critic.layers[-1].weight.abs().max() <= 3e-3
    linears = [m for m in agent.actor.net if isinstance(m, torch.nn.Linear)]
    assert all(torch.all(layer.bias == 0.1) for layer in linears[:-1])
    assert linears[-1].weight.abs().max() <= 1e-3 and linears[-1].bias.abs().max() <= 1e-3
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in agent.actor.net)


def _episode(actions, terminated: bool, truncated: bool) -> Episode:
    n = len(actions)
    return Episode(observations=np.arange((n + 1) * 2, dtype=np.float32).reshape(n + 1, 2),
                   actions=np.asarray(actions, dtype=np.float32).reshape(n, 1),
                   rewards=np.ones(n, np.float32), terminations=np.array([False] * (n - 1) + [terminated]),
                   truncations=np.array([False] * (n - 1) + [truncated]))


def test_next_actions_come_from_the_same_episode_and_truncated_last_steps_are_dropped():
    box = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    episodes = [_episode([0.1, 0.2, 0.3], terminated=True, truncated=False),
                _episode([0.4, 0.5], terminated=False, truncated=True),
                _episode([0.6, 0.7], terminated=False, truncated=False)]  # the data ends mid-episode
    dataset = OfflineDataset("toy", "toy/x-v0", episodes, gym.spaces.Box(-9, 9, (2,), np.float32), box, None)
    data = rebrac.transitions_with_next_actions(dataset, reward_scale=100.0)
    assert data["actions"][:, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.6])
    # a'_D = a_{t+1} within the episode; the terminal step keeps a placeholder its (1 - d) never reads
    assert data["next_actions"][:, 0].tolist() == pytest.approx([0.2, 0.3, 0.0, 0.5, 0.7])
    assert data["terminals"].tolist() == [0, 0, 1, 0, 0]
    assert data["rewards"].tolist() == [100.0] * 5


def test_rebrac_beats_the_behaviour_policy_on_mixed_data(tmp_path, pendulum_mixed_id):
    # `test/pendulum/mixed-v0`: 15 expert + 45 uniform-random episodes, behaviour return about -955.
    # beta_1 = 0.003: lambda = 1 / mean|Q| divides by Pendulum's large cost baseline, so the Q term pulls with
    # ~1e-2 and beta_1 = 0.05 leaves the actor cloning the mixture's mean action (about -1400, measured).
    # Short-run settings: small networks, batch 256, gamma 0.95, tau 0.05.
    config = run_config(rebrac.Config, pendulum_mixed_id, tmp_path, max_steps=3_000, batch_size=256,
                        hidden_dims=(64, 64), actor_beta=0.003, critic_beta=0.01, gamma=0.95, tau=0.05)
    summary = rebrac.train(config)
    behaviour = behaviour_return(pendulum_mixed_id)
    # observed: -280 (seed 0) and -230 (seed 1)
    assert summary["return_mean"] > behaviour + 400, (summary["return_mean"], behaviour)


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, hidden_dims=(32, 32), batch_size=64)
    straight, resumed, a, b = train_straight_and_resumed(rebrac, pendulum_mixed_id, tmp_path, 101, 201, **common)
    assert_states_equal(a, b, ("actor", "actor_target", "critic", "critic_target"))
    assert a["total_it"] == b["total_it"] == 201

    assert_same_train_logs(straight, resumed, steps=[50, 100, 150, 200, 201])


@pytest.mark.parametrize("field, value, message", [
    ("actor_beta", -0.1, "--actor-beta (beta_1"), ("critic_beta", -0.1, "--critic-beta (beta_2"),
    ("online_critic_beta", -0.1, "--online-critic-beta (beta_2 online"),
    ("online_actor_beta_floor", 1.5, "--online-actor-beta-floor"), ("online_mix", -0.5, "--online-mix"),
    ("online_explore_noise", -0.1, "--online-explore-noise")])
def test_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, pendulum_expert_id, field, value,
                                                                      message):
    config = run_config(rebrac.Config, pendulum_expert_id, tmp_path, max_steps=10, **{field: value})
    with pytest.raises(UserError, match=re.escape(message)):
        rebrac.train(config)
    assert not (tmp_path / "runs").exists()


def test_a_batch_larger_than_the_dataset_is_one_line(tmp_path, pendulum_expert_id):
    proc = run_algorithm_cli("rebrac", "--env", pendulum_expert_id, "--device", "cpu", "--runs-dir",
                             str(tmp_path / "runs"), "--max-steps", "10", "--batch-size", "20000")
    assert_one_line_error(proc, "larger than the dataset")
    assert not (tmp_path / "runs").exists()


def test_discrete_actions_are_one_line(tmp_path, cartpole_mixed_id):
    proc = run_algorithm_cli("rebrac", "--env", cartpole_mixed_id, "--device", "cpu", "--runs-dir",
                             str(tmp_path / "runs"), "--max-steps", "10", "--batch-size", "64")
    assert_one_line_error(proc, "continuous actions")
    assert not (tmp_path / "runs").exists()


def test_a_dataset_without_published_betas_asks_for_them(tmp_path):
    # a dataset only the "*" row covers: no published beta_1 / beta_2 to offer, one line naming them
    config = rebrac.Config(env="mujoco/inverted-pendulum/x-v0", runs_dir=str(tmp_path / "runs"))
    with pytest.raises(UserError, match="actor_beta, critic_beta"):
        rebrac.resolve_config(config, rebrac.DATASET_SETTINGS)
    settings = rebrac.resolve_config(rebrac.Config(env="local/hopper-150k/medium-replay-v0"), rebrac.DATASET_SETTINGS)
    assert (settings.actor_beta, settings.critic_beta, settings.critic_lr) == (0.05, 0.5, 1e-3)
    settings = rebrac.resolve_config(rebrac.Config(env="antmaze-medium-play-v2"), rebrac.DATASET_SETTINGS)
    assert (settings.actor_beta, settings.critic_beta, settings.gamma, settings.critic_lr, settings.reward_scale) == (
        0.001, 0.0005, 0.999, 5e-5, 100.0)


# --- online fine-tuning -------------------------------------------------------------------------------------

def test_online_betas_follow_corls_schedule_from_the_switch():
    """CORL's switch with N_on = 10: beta_1 = 0.4 keeps its value at the first online update, loses 0.04 per update
    down to 0.2 (half, min_decay_coef) at the 6th and stays there, past N_on too; beta_2 = 0.3 becomes 0. Each online
    update equals an offline update whose config holds those betas (by hand), from the same state and batch."""
    agent = _agent(actor_beta=0.4, critic_beta=0.3, online_steps=10, policy_freq=1)
    logs = _update(agent, _batch(seed=1))  # offline: the configured betas
    assert (logs["train/actor_beta"].item(), logs["train/critic_beta"].item()) == pytest.approx((0.4, 0.3))
    agent.start_online()
    by_hand = [0.4, 0.36, 0.32, 0.28, 0.24, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]
    for k, beta_1 in enumerate(by_hand):
        twin = _agent(actor_beta=beta_1, critic_beta=0.0, policy_freq=1)  # offline, those betas configured
        twin.load_state_dict(copy.deepcopy({**agent.state_dict(), "online": False}))  # Adam's moments not shared
        batch = _batch(seed=10 + k)
        logs = _update(agent, batch, seed=k)
        _update(twin, batch, seed=k)
        assert logs["train/actor_beta"].item() == pytest.approx(beta_1, rel=1e-6), k
        assert logs["train/critic_beta"].item() == 0.0
        assert _equal(agent.actor, twin.actor) and _equal(agent.critic, twin.critic), k
    assert agent.online_it == len(by_hand) and agent.total_it == 1 + len(by_hand)


def test_explore_is_greedy_by_default_and_gaussian_with_online_explore_noise():
    """CORL's expl_noise 0.0: explore is act, and draws no random number. With online_explore_noise 0.1 and
    max_action 2 the spread around pi(s) is 0.2; a noise far wider than the box reaches its bounds, never past."""
    obs = torch.randn(4000, SPEC.obs_dim)
    greedy = _agent()
    rng = torch.get_rng_state()
    assert torch.equal(greedy.explore(obs), greedy.act(obs))
    assert torch.equal(torch.get_rng_state(), rng)
    noisy = _agent(online_explore_noise=0.1)
    first, second = noisy.explore(obs), noisy.explore(obs)
    assert not torch.equal(first, second)
    deviation = first - noisy.act(obs)
    assert abs(float(deviation.mean())) < 0.01 and float(deviation.std()) == pytest.approx(0.2, rel=0.05)
    wide = _agent(online_explore_noise=5.0).explore(obs)
    assert wide.abs().max() <= SPEC.max_action and (wide.abs() == SPEC.max_action).any()


def test_compiled_online_updates_reuse_the_offline_graphs_and_equal_the_eager_ones(monkeypatch):
    """--compile (aot_eager on CPU): the online betas are device tensors changed in place, so beta_1's decay and
    beta_2's switch compile nothing new: the graphs of the offline phase's two update variants (with and without
    the actor) serve every online update, whose numbers equal the eager agent's."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        agents = [_agent(online_steps=6, compile=compiled) for compiled in (False, True)]
        logs = [[], []]
        for step in range(8):
            if step == 2:
                graphs = counters["stats"]["unique_graphs"]  # after one update of each variant
                assert graphs > 0
                for agent in agents:
                    agent.start_online()
            for agent, out in zip(agents, logs):
                out.append({k: v.clone() for k, v in _update(agent, _batch(seed=step), seed=step).items()})
        assert counters["stats"]["unique_graphs"] == graphs
    # beta_1 = 0.1: two offline updates, then 0.1 max(0.5, 1 - k / 6) for k = 0 .. 5
    assert [row["train/actor_beta"].item() for row in logs[1]] == pytest.approx(
        [0.1, 0.1, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.05, 0.05, 0.05])
    for eager, compiled in zip(*logs):
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


class Killed(Exception):
    """Stands for a kill of the process (raised by a patched Agent.update at a chosen update)."""


def test_resume_mid_online_equals_an_uninterrupted_run(pendulum_mixed_id, tmp_path, monkeypatch):
    """100 offline updates and 450 online env steps; one run killed 160 env steps into the online phase (mid-episode,
    in the middle of beta_1's decay; last checkpoint at 150) and resumed: the same weights, Adam states, online
    buffer, counters, logged betas and scores as the run that never stopped. The logged beta_1 follows the schedule
    by hand: 0.004 (1 - k / 450) after k online updates, 0.002 from k = 225 on; beta_2 0.01 offline, 0 online."""
    settings = dict(hidden_dims=(32, 32), batch_size=64, eval_episodes=2, log_every=50, eval_every=100,
                    checkpoint_every=250, max_steps=100, online_steps=450, actor_beta=0.004, critic_beta=0.01)
    straight = rebrac.train(run_config(rebrac.Config, pendulum_mixed_id, tmp_path / "a", **settings))
    real_update = rebrac.Agent.update

    def killed(self, batch):
        if self.total_it == 260:
            raise Killed
        return real_update(self, batch)

    monkeypatch.setattr(rebrac.Agent, "update", killed)
    with pytest.raises(Killed):
        rebrac.train(run_config(rebrac.Config, pendulum_mixed_id, tmp_path / "b", **settings))
    monkeypatch.undo()
    run_dir = next((tmp_path / "b" / "runs" / "rebrac").glob("*/*"))
    assert checkpoint_agent(run_dir)["online_it"] == 150
    resumed = rebrac.train(run_config(rebrac.Config, pendulum_mixed_id, tmp_path / "b", resume=str(run_dir),
                                      **settings))
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ("actor", "actor_target", "critic", "critic_target"))
    for name in ("actor_optimizer", "critic_optimizer"):
        for key, value in a[name]["state"].items():
            assert all(torch.equal(value[k], b[name]["state"][key][k]) for k in value), name
    assert (a["total_it"], a["online_it"], a["online"]) == (b["total_it"], b["online_it"], b["online"]) == \
        (550, 450, True)
    assert "next_actions" in assert_same_online_phase(straight, resumed, rows=450)

    assert_same_train_logs(straight, resumed)
    want = train_rows(straight["run_dir"])
    # step s is online update k = s - 101 (the first online update, step 101, keeps beta_1)
    steps = (100, 150, 200, 350)
    assert [want[step]["train/actor_beta"] for step in steps] == pytest.approx(
        [0.004, 0.004 * (1 - 49 / 450), 0.004 * 0.78, 0.002])
    assert [want[step]["train/critic_beta"] for step in steps] == pytest.approx([0.01, 0.0, 0.0, 0.0])
