"""Naive offline SAC: its pieces are SAC's, and (the lecture's claim) its Q-values run away offline.

"Can we just use off-policy methods to learn from static datasets? No!" (lecture: "Off-Policy Algorithms for
Offline RL?"): trained on a fixed dataset, SAC's critic is queried at the actions its actor prefers, which
the data never shows, and overestimates them without bound, while the policy-constrained TD3+BC and BEAR
keep Q near the data's Monte Carlo returns.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_states_equal, load_algorithm, random_batch, train_straight_and_resumed

from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset
from common.errors import UserError

sac_offline = load_algorithm("sac_offline")
td3_bc = load_algorithm("td3_bc")
bear = load_algorithm("bear")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def _batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(n, SPEC.obs_dim, SPEC.act_dim, SPEC.max_action, seed)


def test_log_prob_is_the_tanh_change_of_variables():
    torch.manual_seed(0)
    actor = sac_offline.TanhGaussianActor(3, 2, (32, 32), max_action=1.0)
    obs = torch.randn(64, 3)
    torch.manual_seed(1)
    actions, log_prob = actor.sample(obs)
    mean, log_std = actor.net(obs).chunk(2, dim=-1)
    torch.manual_seed(1)
    u = mean + log_std.exp() * torch.randn_like(mean)  # the same draw
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    assert torch.allclose(actions, torch.tanh(u), atol=1e-6)
    assert torch.allclose(log_prob, dist.log_prob(torch.tanh(u).clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1), atol=2e-3)


def test_critic_target_is_soft_min_of_the_twin_targets():
    torch.manual_seed(0)
    agent = sac_offline.Agent(sac_offline.Config(hidden_dims=(32, 32)), SPEC, torch.device("cpu"))
    batch = _batch()
    torch.manual_seed(5)
    with torch.no_grad():
        next_actions, next_log_prob = agent.actor.sample(batch["next_obs"])
        soft_v = agent.critic_target(batch["next_obs"], next_actions).min(0).values - 1.0 * next_log_prob
        y = batch["rewards"] + 0.99 * (1 - batch["terminals"]) * soft_v
        expected = ((agent.critic(batch["obs"], batch["actions"]) - y) ** 2).mean(1).sum()
    torch.manual_seed(5)  # update() draws a' ~ pi(.|s') first, with the same global RNG
    logs = agent.update(batch)
    assert logs["train/critic_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("target_entropy,direction", [(-10.0, -1), (10.0, 1)])
def test_temperature_moves_towards_the_entropy_target(target_entropy, direction):
    torch.manual_seed(0)
    agent = sac_offline.Agent(sac_offline.Config(hidden_dims=(32, 32), target_entropy=target_entropy), SPEC,
                              torch.device("cpu"))
    agent.update(_batch())
    # entropy above the target (-10): alpha falls; below an unreachable target (+10): alpha rises
    assert (agent.log_alpha.item() - math.log(1.0)) * direction > 0


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        sac_offline.Agent(sac_offline.Config(), DataSpec(3, 2, 1.0, True), torch.device("cpu"))


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, hidden_dims=(32, 32))
    _, _, a, b = train_straight_and_resumed(sac_offline, pendulum_mixed_id, tmp_path, 100, 200, **common)
    assert_states_equal(a, b, ("actor", "critic", "critic_target"))
    assert torch.equal(a["log_alpha"], b["log_alpha"])


# --- the lecture's claim -------------------------------------------------------------------------------
# Data: the 15 scripted-expert episodes of `test/pendulum/mixed-v0` (its best 25% by return, 3000 steps):
# near-optimal behaviour with action noise 0.1, so the data's Monte Carlo returns are about the true values
# of any good policy, and anything far above them is overestimation. (Pendulum's rewards are <= 0, so a
# positive Q is impossible.) The same short-run settings for all three: small networks, lr 1e-3, tau 0.05,
# gamma 0.99 as in the Monte Carlo returns, 2500 steps; BEAR's dual step at lr 1e-2 so that alpha reacts
# within the run. Every other hyperparameter is the file's default (TD3+BC alpha 2.5, BEAR epsilon 0.05).
STEPS = 2_500
SHORT_RUN = dict(hidden_dims=(64, 64), actor_lr=1e-3, critic_lr=1e-3, tau=0.05)
AGENTS = {
    "sac_offline": (sac_offline, {}),
    "td3_bc": (td3_bc, {}),
    "bear": (bear, dict(vae_hidden_dims=(128, 128), vae_lr=1e-3, warmup_steps=500, lagrange_lr=1e-2,
                        kernel="laplacian", mmd_sigma=10.0)),
}


def test_naive_q_overestimates_while_constrained_methods_do_not(pendulum_mixed_id):
    dataset = load_dataset(pendulum_mixed_id).top_episodes(0.25)
    data = dataset.transitions(returns_to_go_gamma=0.99)
    normalizer = ObsNormalizer.from_data(data["obs"])
    arrays = {"obs": normalizer(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
              "next_obs": normalizer(data["next_obs"]), "terminals": data["terminals"]}
    obs = torch.as_tensor(arrays["obs"])
    monte_carlo = float(data["returns_to_go"].mean())  # about -12: the expert keeps the pendulum upright
    gaps = {}
    for name, (module, extra) in AGENTS.items():
        torch.manual_seed(0)
        config = module.Config(max_steps=STEPS, device="cpu", gamma=0.99, **SHORT_RUN, **extra)
        agent = module.Agent(config, dataset.spec, torch.device("cpu"))
        sampler = TensorSampler(arrays, "cpu", seed=0)
        for _ in range(STEPS):
            agent.update(sampler.sample(config.batch_size))
        # mean over the dataset's states of Q(s, pi(s)) minus the mean discounted Monte Carlo return
        gaps[name] = agent.q_value(obs, agent.act(obs)).mean().item() - monte_carlo
    # observed: naive SAC about +290 (its Q even turns positive), TD3+BC about -5, BEAR about +10 to +40
    print(f"mean Q(s, pi(s)) - mean Monte Carlo return on the expert episodes after {STEPS} steps: {gaps}")
    others = max(gaps["td3_bc"], gaps["bear"], 10.0)
    assert gaps["sac_offline"] > 100.0 and gaps["sac_offline"] > 3.0 * others, gaps
