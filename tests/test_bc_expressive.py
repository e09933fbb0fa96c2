"""Expressive BC heads: their likelihoods against closed forms, sampling, the two-mode fork (the l2 policy drives
into the obstacle, the mixture, CVAE and binned heads pass on both sides), resume, determinism, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (assert_one_line_error, assert_states_equal, load_algorithm, random_batch, run_algorithm_cli,
                      run_config, train_straight_and_resumed)

from common.checkpoint import load_policy
from common.datasets import DataSpec
from common.envs.fork import rollout_paths, summarize
from common.errors import UserError

expressive = load_algorithm("bc_expressive")
bc = load_algorithm("bc")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)
HEADS = ["gmm", "discrete", "vae"]


def _agent(**overrides) -> "expressive.Agent":
    fields = dict(env="test/x-v0", device="cpu", max_steps=100, hidden_dims=(16, 16))
    fields.update(overrides)
    torch.manual_seed(0)
    return expressive.Agent(expressive.Config(**fields), SPEC, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# Likelihoods and sampling
# ---------------------------------------------------------------------------------------------------


def test_gmm_log_prob_is_the_mixture_density():
    g = torch.Generator().manual_seed(0)
    logits, means = torch.randn(6, 5, generator=g), torch.randn(6, 5, 2, generator=g).tanh()
    scales, actions = torch.rand(6, 5, 2, generator=g) + 0.05, torch.rand(6, 2, generator=g) * 2 - 1
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(means, scales), 1))
    assert torch.allclose(expressive.gmm_log_prob(logits, means, scales, actions), mixture.log_prob(actions), atol=1e-5)
    # one component, unit scale: the Gaussian log-density in closed form
    a, mu = torch.tensor([[0.3, -0.2]]), torch.tensor([[[0.1, 0.4]]])
    expected = -0.5 * ((0.2 ** 2) + (0.6 ** 2)) - math.log(2 * math.pi)
    assert float(expressive.gmm_log_prob(torch.zeros(1, 1), mu, torch.ones(1, 1, 2), a)) == pytest.approx(expected)


def test_gmm_update_minimises_the_mixture_nll():
    agent = _agent(head="gmm", num_modes=3)
    batch = random_batch(64, SPEC.obs_dim, SPEC.act_dim, 2.0)
    with torch.no_grad():
        logits, means, scales = agent.policy(batch["obs"])
        assert bool((scales >= 1e-4).all()) and bool((means.abs() <= 1).all())  # softplus + min_std, tanh
        expected = -expressive.gmm_log_prob(logits, means, scales, batch["actions"] / 2.0).mean()
    assert torch.allclose(agent.update(batch)["train/nll"], expected)


def test_bins_cover_the_action_range_and_decode_to_their_centres():
    centres = expressive.bin_centres(4)
    assert torch.allclose(centres, torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    a = torch.tensor([-1.0, -0.51, -0.5, -0.01, 0.0, 0.49, 0.5, 0.999, 1.0])
    assert expressive.bin_index(a, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]  # a = 1 falls in the last bin
    fine = torch.linspace(-1, 1, 1001)
    assert float((expressive.bin_centres(64)[expressive.bin_index(fine, 64)] - fine).abs().max()) <= 1 / 64 + 1e-6


def test_discrete_update_is_the_summed_per_dimension_cross_entropy():
    agent = _agent(head="discrete", num_bins=8)
    batch = random_batch(64, SPEC.obs_dim, SPEC.act_dim, 2.0)
    with torch.no_grad():
        logits = agent.policy(batch["obs"])  # (B, A, K)
        target = expressive.bin_index(batch["actions"] / 2.0, 8)
        expected = sum(F.cross_entropy(logits[:, i], target[:, i]) for i in range(SPEC.act_dim))
    assert torch.allclose(agent.update(batch)["train/nll"], expected)


def test_vae_update_is_reconstruction_plus_weighted_kl():
    agent = _agent(head="vae", kl_weight=0.3)
    assert agent.latent_dim == 2 * SPEC.act_dim  # robomimic's 2 |A|
    batch = random_batch(64, SPEC.obs_dim, SPEC.act_dim, 2.0)
    a = batch["actions"] / 2.0
    torch.manual_seed(7)
    with torch.no_grad():
        mean, log_std = agent.policy.encode(batch["obs"], a)
        z = mean + log_std.exp() * torch.randn_like(mean)
        recon = ((agent.policy.decode(batch["obs"], z) - a) ** 2).mean()  # mean over batch and dimensions
        sigma2 = (2 * log_std).exp()
        kl = (0.5 * (mean ** 2 + sigma2 - 1 - sigma2.log()).sum(-1)).mean()  # summed over latent dimensions
    torch.manual_seed(7)
    logs = agent.update(batch)
    assert torch.allclose(logs["train/recon_loss"], recon) and torch.allclose(logs["train/kl"], kl)
    assert torch.allclose(logs["train/policy_loss"], recon + 0.3 * kl)


def test_inverse_cdf_draws_each_category_with_its_probability():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(10_000, 4)
    u = (torch.arange(10_000) + 0.5) / 10_000
    counts = torch.bincount(expressive.inverse_cdf(probs, u), minlength=4)
    assert counts.tolist() == [1000, 2000, 3000, 4000]


def test_low_noise_gmm_acts_with_a_component_mean_drawn_by_its_weight():
    agent = _agent(head="gmm", num_modes=2)
    net = agent.policy.net
    with torch.no_grad():  # state-independent mixture: w = (0.25, 0.75), means tanh(+-1), scales large
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        net[-1].bias.copy_(torch.tensor([0.0, math.log(3.0), 1.0, 1.0, -1.0, -1.0, 3.0, 3.0, 3.0, 3.0]))
    actions = agent.act(torch.zeros(4000, SPEC.obs_dim)) / SPEC.max_action
    first = (actions - math.tanh(1.0)).abs().max(-1).values < 1e-3
    second = (actions + math.tanh(1.0)).abs().max(-1).values < 1e-3
    assert bool((first | second).all())  # a mean (+- 1e-4 noise), never a draw from the wide Gaussians
    assert float(second.float().mean()) == pytest.approx(0.75, abs=0.03)
    wide = _agent(head="gmm", num_modes=2, low_noise_eval=False)
    wide.policy.load_state_dict(agent.policy.state_dict())
    spread = wide.act(torch.zeros(4000, SPEC.obs_dim)) / SPEC.max_action
    assert float(((spread.abs() - math.tanh(1.0)).abs() > 0.05).float().mean()) > 0.5


@pytest.mark.parametrize("head", HEADS)
def test_act_is_reproducible_after_reset_and_stays_in_bounds(head):
    agent = _agent(head=head)
    obs = torch.randn(64, SPEC.obs_dim)
    first = agent.act(obs)
    agent.reset_sampling()
    assert torch.equal(agent.act(obs), first)
    assert float(first.abs().max()) <= SPEC.max_action
    assert not torch.equal(agent.act(obs), first)  # fresh draws at every step
    argmax = _agent(head="discrete", decode="argmax")
    assert torch.equal(argmax.act(obs), argmax.centres[argmax.policy(obs).argmax(-1)] * SPEC.max_action)


def _state_independent(agent: "expressive.Agent", network: torch.nn.Sequential, bias: list[float]) -> None:
    """Zero every weight and bias of `network`, then set its output bias: its output is `bias` for every state."""
    with torch.no_grad():
        for layer in network:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        network[-1].bias.copy_(torch.tensor(bias))


def test_deterministic_mode_is_each_heads_mode_and_draws_nothing():
    obs = torch.randn(16, SPEC.obs_dim)
    # gmm, w = softmax(0, log 3) = (0.25, 0.75): the mode is the second component's mean tanh(-1, 0.5)
    gmm = _agent(head="gmm", num_modes=2)
    _state_independent(gmm, gmm.policy.net, [0.0, math.log(3.0), 1.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0])
    expected = SPEC.max_action * torch.tensor([math.tanh(-1.0), math.tanh(0.5)])
    # discrete, 4 bins per dimension (centres -0.75, -0.25, 0.25, 0.75): the largest logit is bin 3, then bin 0
    binned = _agent(head="discrete", num_bins=4)
    _state_independent(binned, binned.policy.net, [0.0, 1.0, 2.0, 3.0, 5.0, -1.0, 0.0, 2.0])
    expected_bins = SPEC.max_action * torch.tensor([0.75, -0.75])
    # vae: the decoder at z = 0, D(s, 0) = tanh(0.3, -0.6) when only its output bias is set
    vae = _agent(head="vae")
    _state_independent(vae, vae.policy.decoder, [0.3, -0.6])
    expected_vae = SPEC.max_action * torch.tensor([math.tanh(0.3), math.tanh(-0.6)])
    for agent, mode in ((gmm, expected), (binned, expected_bins), (vae, expected_vae)):
        before = agent.act_generator.get_state()
        first = agent.act_deterministic(obs)
        assert torch.allclose(first, mode.expand(16, 2), atol=1e-6), agent.config.head
        assert torch.equal(agent.act_deterministic(obs), first)
        assert torch.equal(agent.act_generator.get_state(), before)  # no random draw
    assert expressive.Agent.SAMPLES_ACTIONS
    # with state-dependent weights: the most probable component's mean for each row
    gmm = _agent(head="gmm", num_modes=3)
    with torch.no_grad():
        logits, means, _ = gmm.policy(obs)
    rows = [means[i, int(np.argmax(logits[i].numpy()))] for i in range(16)]
    assert torch.allclose(gmm.act_deterministic(obs), SPEC.max_action * torch.stack(rows))


# ---------------------------------------------------------------------------------------------------
# The two-mode fork (lecture: "Multimodal demonstration data")
# ---------------------------------------------------------------------------------------------------

FORK_RUN = dict(max_steps=2000, lr=1e-3, hidden_dims=(128, 128), eval_episodes=20)


def test_l2_policy_averages_the_two_modes_and_drives_into_the_obstacle(tmp_path, fork_expert_id):
    summary = bc.train(run_config(bc.Config, fork_expert_id, tmp_path, policy="deterministic", **FORK_RUN))
    policy = load_policy(summary["run_dir"])
    lateral, forward = policy(np.array([0.0, 0.0], np.float32))
    assert abs(lateral) < 0.4 and forward > 0.6  # between the modes' -0.8 and +0.8: straight ahead
    stats = summarize(rollout_paths(policy, 20, seed=0))
    assert stats["success_rate"] == summary["return_mean"] <= 0.25, stats
    assert stats["collision_rate"] >= 0.75, stats


@pytest.mark.parametrize("head", HEADS)
def test_expressive_head_passes_the_fork_on_both_sides(tmp_path, fork_expert_id, head):
    summary = expressive.train(run_config(expressive.Config, fork_expert_id, tmp_path, head=head, **FORK_RUN))
    # the sampling policy, seeded with the run's --seed: it replays the evaluation's draws exactly
    stats = summarize(rollout_paths(load_policy(summary["run_dir"], sample=True), 20, seed=0))
    assert stats["success_rate"] == summary["return_mean"]  # rollout_paths replays the evaluation exactly
    assert stats["success_rate"] >= 0.75, stats
    assert stats["left_success"] >= 0.2 and stats["right_success"] >= 0.2, stats
    # the default: the deterministic mode, the same action for the same state at every call
    policy = load_policy(summary["run_dir"])
    obs = np.random.default_rng(0).uniform(-1, 1, (50, 2)).astype(np.float32)
    assert np.array_equal(policy(obs), policy(obs)) and np.allclose(policy(obs[3]), policy(obs)[3], atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Runs and bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_resume_continues_with_the_same_numbers(tmp_path, fork_expert_id, head):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=3, hidden_dims=(32, 32), head=head)
    straight, resumed, a, b = train_straight_and_resumed(expressive, fork_expert_id, tmp_path, 100, 200, **common)
    assert_states_equal(a, b, ("policy",))
    losses = lambda d: [json.loads(l)["train/policy_loss"] for l in open(f"{d}/metrics.jsonl")  # noqa: E731
                        if "train/policy_loss" in l]
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])
    assert straight["return_mean"] == resumed["return_mean"]


@pytest.mark.parametrize("head", HEADS)
def test_same_seed_same_run_and_other_seed_differs(tmp_path, fork_expert_id, head):
    runs = [expressive.train(run_config(expressive.Config, fork_expert_id, tmp_path / str(i), max_steps=100, seed=s,
                                        log_every=50, eval_every=50, eval_episodes=3, hidden_dims=(32, 32), head=head))
            for i, s in enumerate([3, 3, 4])]
    weights = [torch.load(f"{r['run_dir']}/checkpoint.pt", weights_only=False)["agent"]["policy"] for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    evals = [[json.loads(l) for l in open(f"{r['run_dir']}/metrics.jsonl") if "eval/return_mean" in l] for r in runs]
    assert evals[0] == evals[1] and len(evals[0]) == 2


@pytest.mark.parametrize("overrides, message", [
    (dict(num_modes=0), "--num-modes must be at least 1"),
    (dict(min_std=0.0), "--min-std must be positive"),
    (dict(num_bins=1), "--num-bins must be at least 2"),
    (dict(latent_dim=0), "--latent-dim must be at least 1"),
    (dict(kl_weight=-0.1), "--kl-weight must be >= 0"),
])
def test_bad_settings_fail_with_one_line(tmp_path, overrides, message):
    config = run_config(expressive.Config, "test/never-read-v0", tmp_path, max_steps=10, **overrides)
    with pytest.raises(UserError, match=message):
        expressive.train(config)
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        expressive.Agent(expressive.Config(device="cpu"), DataSpec(4, 2, 1.0, True), torch.device("cpu"))


def test_command_line_bad_value_exits_2_with_one_line():
    proc = run_algorithm_cli("bc_expressive", "--head", "gmm", "--num-modes", "0", "--max-steps", "10", "--no-download")
    assert_one_line_error(proc, "--num-modes must be at least 1 (the mixture's components), got 0")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr