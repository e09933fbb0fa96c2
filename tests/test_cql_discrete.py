"""Discrete CQL(H) on a double-DQN critic: the regulariser by hand, the update's wiring, and learning on the
mixed CartPole set."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import behaviour_return, load_algorithm, run_config

from common.datasets import DataSpec
from common.errors import UserError

cql_discrete = load_algorithm("cql_discrete")


def test_cql_term_is_logsumexp_minus_the_dataset_action_q():
    q = torch.tensor([[1.0, 2.0, 0.5], [-3.0, 0.0, 4.0]])
    actions = torch.tensor([1, 0])
    by_hand = [math.log(math.exp(1.0) + math.exp(2.0) + math.exp(0.5)) - 2.0,
               math.log(math.exp(-3.0) + math.exp(0.0) + math.exp(4.0)) - (-3.0)]
    got = cql_discrete.discrete_cql_gap(q, actions)
    assert got.tolist() == pytest.approx(by_hand, rel=1e-6)
    # not logsumexp - mean_a Q (BY571/CQL #5): that version would not depend on which action the data took
    mean_version = torch.logsumexp(q, 1) - q.mean(1)
    assert not torch.allclose(got, mean_version)
    assert cql_discrete.discrete_cql_gap(q, torch.tensor([0, 2])).tolist() != got.tolist()


def test_update_logs_the_hand_computed_losses():
    """One update: TD (Huber, double-DQN target) and the gap, recomputed from the pre-update networks."""
    spec = DataSpec(obs_dim=4, act_dim=3, max_action=1.0, discrete=True)
    torch.manual_seed(0)
    config = cql_discrete.Config(device="cpu", hidden_dims=(8,), max_steps=10)
    agent = cql_discrete.Agent(config, spec, torch.device("cpu"))
    with torch.no_grad():  # make the target network differ from the online one, so double DQN matters
        for p in agent.target_network.parameters():
            p.add_(0.3 * torch.randn_like(p))
    online, target_net = [{k: v.clone() for k, v in net.state_dict().items()}
                          for net in (agent.q_network, agent.target_network)]
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(6, 4, generator=g), "actions": torch.randint(0, 3, (6,), generator=g),
             "rewards": torch.randn(6, generator=g), "next_obs": torch.randn(6, 4, generator=g),
             "terminals": torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])}
    logs = agent.update(batch)

    def q(weights, s):
        return weights["2.weight"] @ torch.relu(weights["0.weight"] @ s + weights["0.bias"]) + weights["2.bias"]

    td, gap = [], []
    for b in range(6):
        s, a, s_next = batch["obs"][b], int(batch["actions"][b]), batch["next_obs"][b]
        q_s = q(online, s)
        a_next = int(q(online, s_next).argmax())  # the online network chooses ...
        # ... and the target network rates it
        y = batch["rewards"][b] + 0.99 * (1 - batch["terminals"][b]) * q(target_net, s_next)[a_next]
        err = abs(float(q_s[a] - y))
        td.append(0.5 * err ** 2 if err < 1 else err - 0.5)
        gap.append(math.log(sum(math.exp(float(v)) for v in q_s)) - float(q_s[a]))
    assert logs["train/td_loss"].item() == pytest.approx(sum(td) / 6, rel=1e-5)
    assert logs["train/cql_gap"].item() == pytest.approx(sum(gap) / 6, rel=1e-5)
    assert logs["train/critic_loss"].item() == pytest.approx(sum(td) / 6 + config.cql_alpha * sum(gap) / 6,
                                                             rel=1e-5)


def test_target_network_hard_copy_period():
    spec = DataSpec(obs_dim=4, act_dim=2, max_action=1.0, discrete=True)
    config = cql_discrete.Config(device="cpu", hidden_dims=(8,), target_update_period=3, max_steps=10)
    agent = cql_discrete.Agent(config, spec, torch.device("cpu"))
    batch = {"obs": torch.randn(5, 4), "actions": torch.randint(0, 2, (5,)), "rewards": torch.randn(5),
             "next_obs": torch.randn(5, 4), "terminals": torch.zeros(5)}
    same = lambda: all(torch.equal(p, t) for p, t in zip(agent.q_network.parameters(),
                                                         agent.target_network.parameters()))
    agent.update(batch)
    assert not same()  # no Polyak drift in between: the target stays put ...
    agent.update(batch), agent.update(batch)
    assert same()  # ... until the copy at step 3


def test_continuous_actions_are_refused():
    with pytest.raises(UserError, match="cql.py"):
        cql_discrete.Agent(cql_discrete.Config(), DataSpec(3, 1, 2.0, False), torch.device("cpu"))


def test_discrete_cql_beats_the_behaviour_policy_on_cartpole(tmp_path, cartpole_mixed_id):
    """Behaviour return ~90 (epsilon-greedy mixture); the conservative greedy policy balances to the limit.

    Measured with these settings: 500 on seeds 0-4; plain double DQN (cql_alpha 0) 281, the regulariser with
    mean_a Q in place of Q(s, a_data) 139, the regulariser's sign flipped 9 (seed 0)."""
    config = run_config(cql_discrete.Config, cartpole_mixed_id, tmp_path, max_steps=1500, hidden_dims=(64, 64),
                        batch_size=64, lr=1e-3)
    summary = cql_discrete.train(config)
    assert behaviour_return(cartpole_mixed_id) < 100
    assert summary["return_mean"] >= 400
