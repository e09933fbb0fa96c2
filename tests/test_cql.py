"""CQL(H), continuous actions: the regulariser against brute force, the importance weights, the Lagrange
multiplier's direction, resume, the lecture's claim that the conservative Q-function does not overestimate, and
the online phase (tanh-Gaussian exploration inside the box, alpha <- online_cql_alpha at the switch, resume
mid-online)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (assert_same_online_phase, assert_states_equal, checkpoint_agent, load_algorithm, run_config,
                      train_straight_and_resumed)

from common.runs import apply_dataset_settings
from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset
from common.errors import UserError

cql = load_algorithm("cql")


def tiny_config(**overrides) -> "cql.Config":
    fields = dict(device="cpu", hidden_dims=(16, 16), cql_num_samples=3, cql_alpha=5.0, policy_lr=1e-3,
                  bc_steps=0, lagrange_threshold=-1.0, reward_transform="none", max_steps=100)
    fields.update(overrides)
    return cql.Config(**fields)


def random_batch(spec: DataSpec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(batch, spec.obs_dim, generator=g),
            "actions": (2 * torch.rand(batch, spec.act_dim, generator=g) - 1) * spec.max_action,
            "rewards": torch.randn(batch, generator=g), "next_obs": torch.randn(batch, spec.obs_dim, generator=g),
            "terminals": (torch.rand(batch, generator=g) < 0.2).float()}


# --- the maths ---------------------------------------------------------------------------------------------

def test_logsumexp_term_matches_brute_force():
    """cql_logsumexp = log sum_j exp(Q(s, a_j) - log p(a_j)) over the 3n concatenated samples, per critic/state."""
    g = torch.Generator().manual_seed(1)
    critics, states, n = 2, 3, 4
    q_uniform, q_pi, q_next = (torch.randn(critics, states, n, generator=g, dtype=torch.float64) * 3
                               for _ in range(3))
    log_pi, log_pi_next = (torch.randn(states, n, generator=g, dtype=torch.float64) for _ in range(2))
    log_uniform = math.log(0.5 ** 3)
    for temperature in (1.0, 0.5):
        got = cql.cql_logsumexp(q_uniform, q_pi, q_next, log_pi, log_pi_next, log_uniform, temperature)
        for k in range(critics):
            for b in range(states):
                terms = ([q_uniform[k, b, j].item() - log_uniform for j in range(n)]
                         + [q_pi[k, b, j].item() - log_pi[b, j].item() for j in range(n)]
                         + [q_next[k, b, j].item() - log_pi_next[b, j].item() for j in range(n)])
                expected = temperature * math.log(sum(math.exp(t / temperature) for t in terms))
                assert got[k, b].item() == pytest.approx(expected, rel=1e-10)


def test_uniform_importance_weight_is_scaled_to_the_action_bounds():
    # the paper's log(0.5^|A|) for actions in [-1, 1]^|A| ...
    assert cql.uniform_log_density(3, 1.0) == pytest.approx(math.log(0.5 ** 3))
    # ... and log((1/(2 max_action))^|A|) for a wider box: Pendulum's [-2, 2] has density 1/4 per dimension
    assert cql.uniform_log_density(1, 2.0) == pytest.approx(math.log(0.25))
    assert cql.uniform_log_density(6, 2.5) == pytest.approx(6 * math.log(1 / 5))
    # what the weight is for: mean_j exp(Q(a_j) - log p(a_j)), a_j ~ Unif([-m, m]), estimates int exp Q(a) da.
    # Q(a) = a on [-2, 2]: the integral is e^2 - e^-2. With the unscaled log(0.5) it would be off by a factor 2.
    m, n = 2.0, 400_000
    a = (2 * torch.rand(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 1) * m
    log_integral = torch.logsumexp(a[:, 0] - cql.uniform_log_density(1, m), 0).item() - math.log(n)
    assert log_integral == pytest.approx(math.log(math.exp(2) - math.exp(-2)), abs=0.01)


@pytest.mark.parametrize("max_action", [1.0, 2.0])
def test_policy_log_prob_is_a_density_on_the_action_box(max_action):
    """exp(log pi(a|s)) integrates to 1 over [-max_action, max_action]: same units as the uniform proposal."""
    mean, log_std = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.2]], dtype=torch.float64)
    a = torch.linspace(-max_action, max_action, 200_001, dtype=torch.float64)[1:-1, None]
    u = torch.atanh(a / max_action)
    density = cql.tanh_gaussian_log_prob(u, mean, log_std, max_action).exp()
    assert torch.trapezoid(density, a[:, 0]).item() == pytest.approx(1.0, abs=1e-4)


def test_update_gap_is_the_brute_force_regulariser():
    """train/cql_gap of one update equals the CQL(H) term recomputed by hand from the same random draws: uniform
    actions on [-2, 2]^|A| weighted by 4^|A|, pi(.|s) and pi(.|s') samples (both scored at s) weighted by
    1/pi, log-sum-exp'd, minus Q on the dataset action; averaged over states and the two critics."""
    spec = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)
    torch.manual_seed(0)
    agent = cql.Agent(tiny_config(), spec, torch.device("cpu"))
    batch = random_batch(spec, 5)
    critic = [p.detach().clone().double() for p in agent.critic.parameters()]  # before the update changes them
    actor = {k: v.detach().clone().double() for k, v in agent.actor.state_dict().items()}
    torch.manual_seed(123)
    logs = agent.update(batch)
    torch.manual_seed(123)  # the update draws, in order: pi(.|s) noise, pi(.|s') noise, uniform actions
    n, B, A, m = 3, 5, 2, 2.0
    eps_s, eps_next = torch.randn(B, n + 1, A).double(), torch.randn(B, n + 1, A).double()
    uniform = ((2 * torch.rand(B, n, A) - 1) * m).double()

    def q(k, s, a):  # critic k by hand: three layers, ReLU
        x = torch.cat([s, a])
        w = critic
        for layer in range(3):
            x = x @ w[2 * layer][k] + w[2 * layer + 1][k, 0]
            x = torch.relu(x) if layer < 2 else x
        return x.item()

    def policy(s):
        x = torch.relu(actor["net.0.weight"] @ s + actor["net.0.bias"])
        x = torch.relu(actor["net.2.weight"] @ x + actor["net.2.bias"])
        out = actor["net.4.weight"] @ x + actor["net.4.bias"]
        return out[:A], out[A:].clamp(-20, 2)

    def sample_and_log_prob(mean, log_std, eps):
        u = mean + log_std.exp() * eps
        log_p = sum(-0.5 * ((u[i] - mean[i]) / log_std[i].exp()) ** 2 - log_std[i] - 0.5 * math.log(2 * math.pi)
                    - math.log(1 - math.tanh(u[i]) ** 2) - math.log(m) for i in range(A))
        return m * torch.tanh(u), float(log_p)

    gaps = []
    for k in range(2):
        for b in range(B):
            s, s_next = batch["obs"][b].double(), batch["next_obs"][b].double()
            terms = [q(k, s, uniform[b, j]) + A * math.log(2 * m) for j in range(n)]
            for state, eps in ((s, eps_s), (s_next, eps_next)):
                mean, log_std = policy(state)
                for j in range(1, n + 1):  # sample 0 is the actor's / the target's own
                    action, log_p = sample_and_log_prob(mean, log_std, eps[b, j])
                    terms.append(q(k, s, action) - log_p)
            lse = math.log(sum(math.exp(t) for t in terms))
            gaps.append(lse - q(k, s, batch["actions"][b].double()))
    assert logs["train/cql_gap"].item() == pytest.approx(float(np.mean(gaps)), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("threshold, direction", [(1e4, -1), (-1e4, +1)])
def test_lagrange_multiplier_moves_towards_the_constraint(threshold, direction):
    """Dual descent: alpha' shrinks when alpha * gap is below tau and grows when it is above."""
    spec = DataSpec(obs_dim=3, act_dim=2, max_action=1.0, discrete=False)
    torch.manual_seed(0)
    agent = cql.Agent(tiny_config(lagrange=True), spec, torch.device("cpu"))
    agent.lagrange_threshold = threshold  # +-1e4: the gap is surely below / above it
    logs = agent.update(random_batch(spec, 8))
    assert agent.use_lagrange and logs["train/lagrange_alpha"].item() == pytest.approx(1.0)  # exp(0) first
    assert np.sign(agent.lagrange_log_alpha.item()) == direction
    # and the positive per-dataset tau switches the variant on by itself (antmaze)
    assert cql.resolve_lagrange(tiny_config(lagrange_threshold=5.0)) == (True, 5.0)
    assert cql.resolve_lagrange(tiny_config(lagrange_threshold=-1.0))[0] is False


def test_dataset_settings_are_the_reference_codes():
    config = apply_dataset_settings(cql.Config(env="antmaze-medium-play-v2"), cql.DATASET_SETTINGS)
    assert cql.resolve_lagrange(config) == (True, 5.0)
    assert (config.cql_alpha, config.bc_steps, config.policy_lr, config.reward_transform) == \
        (5.0, 40_000, 1e-4, "minus-one")
    # locomotion as the reference code's mujoco script: alpha 5, no Lagrange, policy_eval_start 40000
    config = apply_dataset_settings(cql.Config(env="hopper-medium-v2"), cql.DATASET_SETTINGS)
    assert (cql.resolve_lagrange(config)[0], config.cql_alpha, config.bc_steps) == (False, 5.0, 40_000)
    # the small local and test sets skip the warm-up
    for env in ("local/pendulum/medium-replay-v0", "test/pendulum/mixed-v0"):
        config = apply_dataset_settings(cql.Config(env=env), cql.DATASET_SETTINGS)
        assert config.bc_steps == 0, env


def test_orthogonal_init_gives_orthogonal_members():
    agent = cql.Agent(tiny_config(orthogonal_init=True, hidden_dims=(16, 16)), DataSpec(4, 2, 1.0, False),
                      torch.device("cpu"))
    first = agent.critic.layers[0].weight  # (K, in, out) with in = 6 < out = 16: orthonormal rows, times gain^2 = 2
    for member in first:
        assert torch.allclose(member @ member.T, 2.0 * torch.eye(member.shape[0]), atol=1e-5)
    assert torch.count_nonzero(agent.critic.layers[0].bias) == 0
    last = agent.actor.net[-1].weight
    assert last.abs().max() < 0.05  # output layer gain 1e-2


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="cql_discrete"):
        cql.Agent(tiny_config(), DataSpec(4, 2, 1.0, True), torch.device("cpu"))


# --- resume -----------------------------------------------------------------------------------------------

def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    """Step counter (BC warm-up boundary), both temperatures, optimisers and targets are all checkpointed."""
    common = dict(hidden_dims=(16, 16), cql_num_samples=2, batch_size=32, bc_steps=30, lagrange=True,
                  log_every=20, checkpoint_every=40, eval_episodes=1)
    straight, resumed, a, b = train_straight_and_resumed(cql, pendulum_mixed_id, tmp_path, 40, 80, **common)
    assert_states_equal(a, b, ("actor", "critic", "target_critic"))
    assert torch.equal(a["lagrange_log_alpha"], b["lagrange_log_alpha"]) and a["step"] == b["step"] == 80
    rows = lambda d: [json.loads(line) for line in open(f"{d}/metrics.jsonl") if "train/cql_gap" in line]
    assert [r["train/cql_gap"] for r in rows(straight["run_dir"])] == [r["train/cql_gap"] for r in
                                                                        rows(resumed["run_dir"])]


# --- online fine-tuning ------------------------------------------------------------------------------------

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def test_explore_samples_the_tanh_gaussian_inside_the_action_box():
    """a = max_action tanh(u), u ~ N(mu(s), sigma(s)^2): atanh(a / max_action) has the actor's mean and std, and
    with a very wide Gaussian (log sigma at its clamp 2) the actions saturate at the bounds, never past them."""
    torch.manual_seed(0)
    agent = cql.Agent(tiny_config(), SPEC, torch.device("cpu"))
    obs = torch.zeros(4000, SPEC.obs_dim)
    first, second = agent.explore(obs), agent.explore(obs)
    assert first.shape == (4000, SPEC.act_dim) and not torch.equal(first, second)  # stochastic
    with torch.no_grad():
        mean, log_std = agent.actor(obs[:1])
    u = torch.atanh((first / SPEC.max_action).double())
    assert torch.allclose(u.mean(0), mean[0].double(), atol=4 * float(log_std.exp().max()) / math.sqrt(4000))
    assert torch.allclose(u.std(0), log_std[0].exp().double(), rtol=0.05)
    with torch.no_grad():
        agent.actor.net[-1].bias[SPEC.act_dim:] = 10.0  # log sigma clamped to 2: sigma = 7.4
    wide = agent.explore(obs)
    assert wide.abs().max() <= SPEC.max_action and (wide.abs() == SPEC.max_action).any()


def test_the_switch_sets_alpha_to_online_cql_alpha_and_is_kept_in_the_state():
    """After start_online an agent with cql_alpha 1 and online_cql_alpha 7 takes the very step an offline agent
    with cql_alpha 7 takes (same initialisation, batch and samples); before it, the step of cql_alpha 1. The
    switch survives a state round trip; online_cql_alpha None follows cql_alpha (CORL's configs)."""
    batch = random_batch(SPEC, 32)

    def step(agent):
        torch.manual_seed(1)
        logs = agent.update(batch)
        return logs, [p.detach().clone() for p in agent.critic.parameters()]

    def agent(**overrides):
        torch.manual_seed(0)
        return cql.Agent(tiny_config(**overrides), SPEC, torch.device("cpu"))

    switching = agent(cql_alpha=1.0, online_cql_alpha=7.0)
    offline_logs, offline_critic = step(switching)
    reference_logs, reference_critic = step(agent(cql_alpha=1.0))
    assert float(offline_logs["train/cql_alpha"]) == 1.0
    assert torch.equal(offline_logs["train/critic_loss"], reference_logs["train/critic_loss"])
    assert all(torch.equal(a, b) for a, b in zip(offline_critic, reference_critic))

    switching = agent(cql_alpha=1.0, online_cql_alpha=7.0)
    switching.start_online()
    online_logs, online_critic = step(switching)
    seven_logs, seven_critic = step(agent(cql_alpha=7.0))
    assert float(online_logs["train/cql_alpha"]) == 7.0
    assert torch.equal(online_logs["train/critic_loss"], seven_logs["train/critic_loss"])
    assert all(torch.equal(a, b) for a, b in zip(online_critic, seven_critic))
    assert not torch.equal(online_logs["train/critic_loss"], offline_logs["train/critic_loss"])

    restored = agent(cql_alpha=1.0, online_cql_alpha=7.0)
    restored.load_state_dict(switching.state_dict())
    assert restored.online and not agent(cql_alpha=1.0, online_cql_alpha=7.0).online
    assert agent(cql_alpha=3.0).online_cql_alpha == 3.0


def test_resume_mid_online_equals_an_uninterrupted_run(pendulum_mixed_id, tmp_path):
    """100 offline updates, then stopped 150 env steps into the online phase (mid-episode) and resumed to 450:
    the same weights, temperatures, online buffer and scores as a run that never stopped. online_cql_alpha
    differs from cql_alpha, so a resumed run that lost the switch (or switched again) would differ."""
    fast = dict(hidden_dims=(16, 16), cql_num_samples=2, batch_size=32, cql_alpha=5.0, online_cql_alpha=1.0,
                eval_episodes=2, log_every=50, eval_every=100)
    straight = cql.train(run_config(cql.Config, pendulum_mixed_id, tmp_path / "a", max_steps=100, online_steps=450,
                                    **fast))
    first = cql.train(run_config(cql.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100, online_steps=150,
                                 **fast))
    resumed = cql.train(run_config(cql.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100, online_steps=450,
                                   resume=first["run_dir"], **fast))
    assert resumed["run_dir"] == first["run_dir"]
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ("actor", "critic", "target_critic"))
    assert torch.equal(a["log_entropy_alpha"], b["log_entropy_alpha"])
    assert a["online"] and b["online"] and a["step"] == b["step"] == 550
    assert_same_online_phase(straight, resumed, rows=450)
    rows = lambda d: [json.loads(line) for line in open(f"{d}/metrics.jsonl") if "train/cql_alpha" in line]
    assert [(r["step"], r["train/cql_alpha"]) for r in rows(straight["run_dir"])] == \
        [(50, 5.0), (100, 5.0), *[(s, 1.0) for s in range(150, 551, 50)]]


# --- the lecture's claim and learning ----------------------------------------------------------------------

# Settings for the short runs below: small networks and batches so that a run costs seconds, and a faster
# target network (tau 0.1) and learning rates so that Q travels from its initial 0 to the scale of the
# returns (about -260 with gamma = 0.99) within ~1000 steps.
FAST = dict(hidden_dims=(64, 64), batch_size=64, policy_lr=1e-3, critic_lr=1e-3, tau=0.1)


def q_on_policy_actions(dataset_id: str, steps: int, seed: int = 0, **overrides) -> tuple[float, float]:
    """Train CQL for `steps` updates; return (mean over dataset states of Q(s, pi(s)), mean MC return-to-go)."""
    dataset = load_dataset(dataset_id)
    data = dataset.transitions(returns_to_go_gamma=0.99)
    normalizer = ObsNormalizer.from_data(data["obs"])
    sampler = TensorSampler({"obs": normalizer(data["obs"]), "actions": data["actions"],
                             "rewards": data["rewards"], "next_obs": normalizer(data["next_obs"]),
                             "terminals": data["terminals"]}, "cpu", seed)
    torch.manual_seed(seed)
    config = tiny_config(**{**FAST, "gamma": 0.99, **overrides})
    agent = cql.Agent(config, dataset.spec, torch.device("cpu"))
    for _ in range(steps):
        agent.update(sampler.sample(config.batch_size))
    obs = torch.as_tensor(normalizer(data["obs"]))
    return agent.q_value(obs, agent.act(obs)).mean().item(), float(data["returns_to_go"].mean())


def test_cql_q_stays_below_monte_carlo_while_the_plain_critic_overestimates(pendulum_mixed_id):
    """Lecture, "Conservative Q-Learning": E_pi[Q_CQL] lower-bounds the true value. On the small mixed pendulum
    set, after the same 1500 updates, CQL's Q at the policy's actions is at or below the discounted Monte Carlo
    returns on average, while the same critic without the regulariser (cql_alpha = 0: offline SAC) is above
    them, and climbing. Measured on seeds 0-3: CQL -320 to -357, plain -112 to -197, Monte Carlo -264.

    The Monte Carlo returns are the behaviour policy's; they stand in for Q^pi only while pi is not much better
    than the behaviour, which holds this early (a CQL policy that swings the pendulum up, after ~8k updates,
    has a true value above them, and its Q rises towards it)."""
    q_cql, monte_carlo = q_on_policy_actions(pendulum_mixed_id, 1500, cql_alpha=5.0)
    # cql_alpha = 0 multiplies the regulariser away; one sample per proposal only makes that run cheaper
    q_plain, _ = q_on_policy_actions(pendulum_mixed_id, 1500, cql_alpha=0.0, cql_num_samples=1)
    assert q_cql <= monte_carlo
    assert q_plain > monte_carlo
