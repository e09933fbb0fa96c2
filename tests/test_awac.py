"""AWAC: the official batch-softmax weights by hand, the whole update by hand (TD target with a' ~ pi,
V from policy samples), learning on mixed data (beats the behaviour policy), and the online phase (exploration
samples the Gaussian inside the box; resume mid-online continues exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (assert_same_online_phase, assert_states_equal, behaviour_return, checkpoint_agent,
                      load_algorithm, random_batch, run_config)

from common.datasets import DataSpec
from common.errors import UserError

awac = load_algorithm("awac")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def test_weights_are_batch_size_times_softmax_of_advantage_over_lambda():
    advantage = np.array([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    for temperature in (0.3, 1.0, 5.0):
        e = np.exp(advantage / temperature)
        expected = len(advantage) * e / e.sum()
        weights = awac.awac_weights(torch.tensor(advantage), temperature)
        assert np.allclose(weights.numpy(), expected, rtol=1e-10)
        assert float(weights.mean()) == pytest.approx(1.0)  # the batch's weights always average 1
    # a shift of every advantage (e.g. a biased V) changes nothing; a large one does not overflow
    assert torch.allclose(awac.awac_weights(torch.tensor(advantage) + 1e4, 1.0),
                          awac.awac_weights(torch.tensor(advantage), 1.0))


def _batch(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(n, SPEC.obs_dim, SPEC.act_dim, SPEC.max_action, seed)


@pytest.mark.parametrize("weighting", ["batch-softmax", "exp"])
def test_update_losses_match_the_paper_computed_by_hand(weighting):
    torch.manual_seed(0)
    config = awac.Config(env="test/pendulum/mixed-v0", device="cpu", max_steps=10, actor_hidden_dims=(32, 32),
                         critic_hidden_dims=(32, 32), temperature=0.1, weighting=weighting, max_weight=3.0,
                         gamma=0.9)
    agent = awac.Agent(config, SPEC, torch.device("cpu"))
    b = _batch()
    # replay the update's two draws from the global RNG: a' ~ pi(.|s'), then a ~ pi(.|s) for V(s)
    torch.manual_seed(123)
    with torch.no_grad():
        std = agent.log_std.exp()
        mean = 2.0 * torch.tanh(agent.actor(b["obs"]))
        next_mean = 2.0 * torch.tanh(agent.actor(b["next_obs"]))
        next_actions = (next_mean + std * torch.randn_like(next_mean)).clamp(-2, 2)
        y = b["rewards"] + 0.9 * (1 - b["terminals"]) * agent.target_critic(b["next_obs"], next_actions).min(0).values
        policy_actions = (mean + std * torch.randn_like(mean)).clamp(-2, 2)
        v = agent.critic(b["obs"], policy_actions).min(0).values
        q = agent.critic(b["obs"], b["actions"])
        critic_loss = ((q[0] - y) ** 2).mean() + ((q[1] - y) ** 2).mean()
        advantage = q.min(0).values - v
        if weighting == "batch-softmax":
            weights = len(advantage) * torch.softmax(advantage / 0.1, dim=0)
        else:
            weights = torch.exp(advantage / 0.1).clamp(max=3.0)
        log_prob = torch.distributions.Normal(mean, std).log_prob(b["actions"]).sum(-1)
        actor_loss = -(weights * log_prob).mean()
    torch.manual_seed(123)
    logs = agent.update(b)
    assert torch.allclose(logs["train/critic_loss"], critic_loss, rtol=1e-5)
    assert torch.allclose(logs["train/actor_loss"], actor_loss, rtol=1e-5)
    assert torch.allclose(logs["train/weight_max"], weights.max(), rtol=1e-5)
    assert torch.allclose(logs["train/q_policy"], v.mean(), rtol=1e-5)
    assert torch.allclose(logs["train/q_data"], q.min(0).values.mean(), rtol=1e-5)
    if weighting == "batch-softmax":
        assert float(logs["train/weight_mean"]) == pytest.approx(1.0, rel=1e-5)
        assert float(logs["train/weight_max"]) > 3.0  # sharp at lambda 0.1: a few samples carry the batch


def test_sampled_actions_stay_inside_the_bounds_and_targets_move_by_polyak():
    torch.manual_seed(0)
    agent = awac.Agent(awac.Config(env="test/pendulum/mixed-v0", device="cpu", max_steps=10, tau=0.5,
                                   actor_hidden_dims=(16,), critic_hidden_dims=(16,)), SPEC, torch.device("cpu"))
    with torch.no_grad():
        agent.log_std.fill_(2.0)  # a very wide Gaussian
    samples = agent.sample_action(torch.zeros(1000, 2))
    assert samples.abs().max() <= 2.0 and (samples.abs() == 2.0).any()
    target_before = [p.detach().clone() for p in agent.target_critic.parameters()]
    agent.update(_batch())
    for old, new, online in zip(target_before, agent.target_critic.parameters(), agent.critic.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * online.detach())


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        awac.Agent(awac.Config(env="test/x-v0", device="cpu", max_steps=10), DataSpec(4, 2, 1.0, True),
                   torch.device("cpu"))


def test_awac_beats_the_behaviour_policy_on_mixed_data(tmp_path, pendulum_mixed_id):
    # 15 expert + 45 uniform-random Pendulum episodes; behaviour cloning the mixture fails (about -1500).
    # Small networks and lr 1e-3 for a short run; the official weights (batch softmax, lambda 1).
    result = awac.train(run_config(awac.Config, pendulum_mixed_id, tmp_path, max_steps=3000, lr=1e-3,
                                   actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64)))
    behaviour = behaviour_return(pendulum_mixed_id)  # about -955
    assert result["return_mean"] > behaviour + 200, (result["return_mean"], behaviour)


# --- online fine-tuning -------------------------------------------------------------------------------------

def test_explore_samples_the_gaussian_inside_the_action_box():
    """a ~ N(mean(s), sigma^2) clipped to [-max_action, max_action]: with sigma 0.1 the spread around the
    deterministic action is sigma; with a very wide Gaussian the samples reach the bounds and never pass them."""
    torch.manual_seed(0)
    agent = awac.Agent(awac.Config(env="test/pendulum/mixed-v0", device="cpu", max_steps=10,
                                   actor_hidden_dims=(16,), critic_hidden_dims=(16,)), SPEC, torch.device("cpu"))
    obs = torch.zeros(4000, SPEC.obs_dim)
    with torch.no_grad():
        agent.log_std.fill_(np.log(0.1))
    first, second = agent.explore(obs), agent.explore(obs)
    assert not torch.equal(first, second)  # stochastic
    deviation = first - agent.act(obs)
    assert abs(float(deviation.mean())) < 0.01 and float(deviation.std()) == pytest.approx(0.1, rel=0.05)
    with torch.no_grad():
        agent.log_std.fill_(2.0)
    wide = agent.explore(obs)
    assert wide.abs().max() <= SPEC.max_action and (wide.abs() == SPEC.max_action).any()


def test_resume_mid_online_equals_an_uninterrupted_run(pendulum_mixed_id, tmp_path):
    """100 offline updates, then stopped 150 env steps into the online phase (mid-episode) and resumed to 450:
    the same weights, online buffer and scores as a run that never stopped."""
    fast = dict(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=64, eval_episodes=2,
                log_every=50, eval_every=100)
    straight = awac.train(run_config(awac.Config, pendulum_mixed_id, tmp_path / "a", max_steps=100,
                                     online_steps=450, **fast))
    first = awac.train(run_config(awac.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100, online_steps=150,
                                  **fast))
    resumed = awac.train(run_config(awac.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100,
                                    online_steps=450, resume=first["run_dir"], **fast))
    assert resumed["run_dir"] == first["run_dir"]
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ["actor", "critic", "target_critic"])
    assert torch.equal(a["log_std"], b["log_std"])
    assert_same_online_phase(straight, resumed, rows=450)
