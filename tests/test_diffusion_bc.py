"""Diffusion policy: the DDPM closed forms on 1-D examples, the exact EMA, action chunks, learning both modes of
the two-mode fork, resume, determinism and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_states_equal, load_algorithm, random_batch, run_algorithm_cli,
                      run_config, train_straight_and_resumed)

from common.checkpoint import load_agent, load_checkpoint, load_policy
from common.datasets import DataSpec, ObsNormalizer
from common.envs.fork import rollout_paths, summarize
from common.errors import UserError

diffusion = load_algorithm("diffusion_bc")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def _schedule(name: str = "cosine", steps: int = 10) -> "diffusion.NoiseSchedule":
    return diffusion.NoiseSchedule(diffusion.make_betas(name, steps), "cpu", torch.float64)


# ---------------------------------------------------------------------------------------------------
# Noise schedules and the DDPM closed forms
# ---------------------------------------------------------------------------------------------------


def test_schedules_match_their_formulas():
    T = 100
    cosine = diffusion.make_betas("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    # squaredcos_cap_v2: beta_t = min(1 - f(t + 1) / f(t), 0.999), so prod_{i<=t} (1 - beta_i) = f(t + 1) / f(0)
    # until the cap, which only the last beta reaches
    assert torch.allclose(torch.cumprod(1 - cosine, 0)[:-1], torch.tensor([f(t + 1) / f(0) for t in range(T - 1)],
                                                                          dtype=torch.float64), atol=1e-12)
    assert float(cosine[-1]) == 0.999 and float(cosine[:-1].max()) < 0.999
    linear = diffusion.make_betas("linear", T)
    assert float(linear[0]) == pytest.approx(1e-4) and float(linear[-1]) == pytest.approx(2e-2)
    vp = diffusion.make_betas("vp", 5)  # Diffusion-QL: 1 - exp(-b_min/T - (b_max - b_min)(2t - 1)/(2 T^2))
    expected = [1 - math.exp(-0.1 / 5 - 0.5 * 9.9 * (2 * t - 1) / 25) for t in range(1, 6)]
    assert torch.allclose(vp, torch.tensor(expected, dtype=torch.float64))
    for betas in (cosine, linear, vp):
        assert bool(((betas > 0) & (betas < 1)).all())


@pytest.mark.parametrize("name", ["cosine", "linear", "vp"])
def test_forward_noising_is_the_composed_one_step_chain(name):
    # q(x_t | x_0) in closed form must be the law of x_k = sqrt(1 - beta_k) x_{k-1} + sqrt(beta_k) n_k composed
    # t + 1 times from x_0 (1-D, x_0 = 0.6): mean sqrt(abar_t) x_0 and variance 1 - abar_t, both exactly
    schedule, x0 = _schedule(name, 10), 0.6
    mean, var = x0, 0.0
    for t in range(schedule.steps):
        beta = float(schedule.betas[t])
        mean, var = math.sqrt(1 - beta) * mean, (1 - beta) * var + beta  # one step of the chain
        assert float(schedule.sqrt_alpha_bar[t]) * x0 == pytest.approx(mean, rel=1e-12)
        assert float(schedule.sqrt_one_minus_alpha_bar[t]) ** 2 == pytest.approx(var, rel=1e-12)
    # and add_noise is that closed form, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per row's t
    eps = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64)
    t = torch.tensor([0, 4, 9])
    x_t = schedule.add_noise(torch.full((3, 1), x0, dtype=torch.float64), eps, t)
    abar = torch.cumprod(1 - schedule.betas, 0)[t].unsqueeze(-1)
    assert torch.allclose(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    # Monte Carlo of the stepwise chain agrees with the closed form's moments
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), x0, dtype=torch.float64)
    for k in range(schedule.steps):
        x = (1 - schedule.betas[k]).sqrt() * x + schedule.betas[k].sqrt() * torch.randn(x.shape, generator=g,
                                                                                         dtype=torch.float64)
    assert float(x.mean()) == pytest.approx(float(schedule.sqrt_alpha_bar[-1]) * x0, abs=0.01)
    assert float(x.var()) == pytest.approx(float(1 - schedule.alpha_bar[-1]), abs=0.01)


@pytest.mark.parametrize("t", [1, 4, 9])
def test_reverse_step_is_the_gaussian_posterior_with_the_exact_noise(t):
    # 1-D, data x_0 = 0.6: with the true eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), x0_hat = x_0 and one
    # reverse step must draw from q(x_{t-1} | x_t, x_0), computed here by Bayes' rule from its two Gaussians:
    # prior q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}),
    # likelihood q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t)
    schedule, x0, x_t = _schedule("cosine", 10), 0.6, torch.tensor([[0.25]], dtype=torch.float64)
    abar = torch.cumprod(1 - schedule.betas, 0)
    eps = (x_t - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
    beta, prior_mean, prior_var = schedule.betas[t], abar[t - 1].sqrt() * x0, 1 - abar[t - 1]
    post_var = 1 / (1 / prior_var + (1 - beta) / beta)
    post_mean = post_var * (prior_mean / prior_var + (1 - beta).sqrt() * x_t / beta)
    zero, one = torch.zeros_like(x_t), torch.ones_like(x_t)
    mean = schedule.reverse_step(x_t, eps, t, zero)
    assert torch.allclose(schedule.predict_x0(x_t, eps, t), torch.tensor([[x0]], dtype=torch.float64))
    assert torch.allclose(mean, post_mean, rtol=1e-10)
    assert torch.allclose(schedule.reverse_step(x_t, eps, t, one) - mean, post_var.sqrt(), rtol=1e-10)
    # at t = 0 the step returns x0_hat itself, without noise
    assert torch.allclose(schedule.reverse_step(x_t, (x_t - abar[0].sqrt() * x0) / (1 - abar[0]).sqrt(), 0, one),
                          torch.tensor([[x0]], dtype=torch.float64))


def test_x0_prediction_is_clamped_to_the_action_bounds():
    schedule = _schedule("cosine", 10)
    x_t, eps = torch.tensor([[3.0]], dtype=torch.float64), torch.tensor([[-2.0]], dtype=torch.float64)
    assert float(schedule.predict_x0(x_t, eps, 5)) > 1.0  # unclamped x0_hat leaves [-1, 1]
    clamped = schedule.reverse_step(x_t, eps, 5, torch.zeros_like(x_t))
    assert torch.allclose(clamped, schedule.coef_x0[5] * 1.0 + schedule.coef_xt[5] * x_t)


def test_sampler_with_the_exact_denoiser_of_two_modes_draws_both():
    # data: two points -0.8 and +0.8, equally likely. The exact eps-predictor is
    # (x_t - sqrt(abar_t) E[x_0 | x_t]) / sqrt(1 - abar_t) with E[x_0 | x_t] the posterior mean over the two points;
    # DDPM's sampling loop with it must return both points, about half each, and nothing in between
    schedule = _schedule("cosine", 100)
    modes = torch.tensor([-0.8, 0.8], dtype=torch.float64)

    def exact_eps(x, t):
        s, sigma = schedule.sqrt_alpha_bar[t].unsqueeze(-1), schedule.sqrt_one_minus_alpha_bar[t].unsqueeze(-1)
        logits = -(x - s * modes) ** 2 / (2 * sigma ** 2)  # (B, 2): log N(x_t; sqrt(abar) m, 1 - abar)
        posterior_mean = (logits.softmax(-1) * modes).sum(-1, keepdim=True)
        return (x - s * posterior_mean) / sigma

    noise = torch.randn(100, 4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = diffusion.reverse_process(schedule, exact_eps, noise).squeeze(-1)
    near = lambda m: ((samples - m).abs() < 0.05).double().mean()  # noqa: E731
    assert float(near(-0.8) + near(0.8)) > 0.99
    assert 0.45 < float(near(0.8)) < 0.55


# ---------------------------------------------------------------------------------------------------
# The update: EMA, loss, chunks
# ---------------------------------------------------------------------------------------------------


def _agent(**overrides) -> "diffusion.Agent":
    fields = dict(env="test/x-v0", device="cpu", max_steps=100, hidden_dims=(16, 16), diffusion_steps=10)
    fields.update(overrides)
    torch.manual_seed(0)
    return diffusion.Agent(diffusion.Config(**fields), SPEC, torch.device("cpu"))


def test_ema_follows_diffusion_policys_warmup_exactly():
    # decay before update k: 0 for k <= 1, then min(0.9999, 1 - k^-0.75) (EMAModel, inv_gamma 1)
    assert [diffusion.ema_decay(k, 0.75, 0.9999) for k in range(4)] == [0.0, 0.0, 1 - 2 ** -0.75, 1 - 3 ** -0.75]
    assert diffusion.ema_decay(10 ** 9, 0.75, 0.9999) == 0.9999
    agent = _agent(lr=1e-2)
    ema = [p.detach().double().clone() for p in agent.ema_denoiser.parameters()]
    for k in range(6):
        agent.update(random_batch(32, SPEC.obs_dim, SPEC.act_dim, 2.0, seed=k))
        decay = diffusion.ema_decay(k, 0.75, 0.9999)
        # theta_ema <- decay theta_ema + (1 - decay) theta, after the optimiser step
        ema = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(ema, agent.denoiser.parameters())]
        for expected, got in zip(ema, agent.ema_denoiser.parameters()):
            assert torch.allclose(got.double(), expected, atol=1e-6, rtol=1e-6)
        if k <= 1:  # the first two updates copy the weights
            assert all(torch.equal(e, p) for e, p in zip(agent.ema_denoiser.parameters(), agent.denoiser.parameters()))
    assert agent.ema_updates == 6
    assert not all(torch.equal(e, p) for e, p in zip(agent.ema_denoiser.parameters(), agent.denoiser.parameters()))


def test_update_loss_is_the_noise_regression_computed_by_hand():
    agent = _agent()
    batch = random_batch(64, SPEC.obs_dim, SPEC.act_dim, 2.0)
    torch.manual_seed(5)
    t = torch.randint(0, 10, (64,))
    eps = torch.randn(64, SPEC.act_dim)
    with torch.no_grad():
        x_t = agent.schedule.add_noise(batch["actions"] / 2.0, eps, t)  # actions scaled to [-1, 1]
        expected = ((agent.denoiser(x_t, t, batch["obs"]) - eps) ** 2).mean()
    torch.manual_seed(5)  # the update draws t, then eps, from the training RNG
    logs = agent.update(batch)
    assert torch.allclose(logs["train/diffusion_loss"], expected)


def test_action_chunks_are_padded_with_the_last_action():
    actions = np.arange(8, dtype=np.float32).reshape(4, 2)  # a_0..a_3, 2-d
    chunks = diffusion.action_chunks(actions, 3)
    assert chunks.shape == (4, 6)
    assert chunks[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert chunks[3].tolist() == [6, 7, 6, 7, 6, 7]  # a_3 repeated past the episode's end


def test_receding_horizon_executes_the_first_actions_of_each_plan():
    agent = _agent(action_horizon=4, execute_steps=2)
    calls = []
    original = agent.sample

    def counted(obs):
        calls.append(obs.shape[0])
        return original(obs)

    agent.sample = counted
    obs = torch.randn(3, SPEC.obs_dim)
    actions = [agent.act(obs) for _ in range(5)]
    assert len(calls) == 3  # plans at calls 1, 3 and 5
    assert all(a.shape == (3, SPEC.act_dim) for a in actions)
    plan = agent.plan
    assert torch.equal(actions[4], plan[:, 0])
    agent.reset_sampling()
    assert agent.plan is None
    again = [agent.act(obs) for _ in range(2)]
    assert torch.equal(again[0], actions[0]) and torch.equal(again[1], actions[1])  # reseeded: same plan


def test_a_loaded_chunked_policy_keeps_its_plan_and_replays_act(tmp_path, fork_expert_id):
    summary = diffusion.train(run_config(diffusion.Config, fork_expert_id, tmp_path, max_steps=20, eval_episodes=2,
                                         hidden_dims=(32, 32), diffusion_steps=5, action_horizon=4, execute_steps=2))
    policy = load_policy(summary["run_dir"], sample=True)
    agent, _ = load_agent(summary["run_dir"])  # act(), as evaluation calls it, on the same observations
    obs = np.random.default_rng(0).uniform(-1, 1, (5, 3, 2)).astype(np.float32)
    normalizer = ObsNormalizer.from_state_dict(load_checkpoint(summary["run_dir"])["normalizer"])
    expected = [agent.act(torch.as_tensor(normalizer(o))).numpy() for o in obs]
    assert np.array_equal(np.stack([policy(o) for o in obs]), np.stack(expected))
    policy.reset()  # a new episode: a new plan from the reseeded generator, the same draws again
    assert np.array_equal(policy(obs[0]), expected[0])


def test_act_is_reproducible_after_reset_and_stays_in_bounds():
    agent = _agent()
    obs = torch.randn(16, SPEC.obs_dim)
    first = agent.act(obs)
    assert not torch.equal(agent.act(obs), first)  # fresh draws each call
    agent.reset_sampling()
    assert torch.equal(agent.act(obs), first)
    assert float(first.abs().max()) <= SPEC.max_action


# ---------------------------------------------------------------------------------------------------
# Learning on the two-mode fork, runs, bad input
# ---------------------------------------------------------------------------------------------------


def test_diffusion_policy_passes_the_fork_on_both_sides(tmp_path, fork_expert_id):
    # two-mode data: the l2 policy drives into the obstacle (tests/test_bc_expressive.py); sampled actions
    # take one side or the other, each in a good share of the episodes
    summary = diffusion.train(run_config(diffusion.Config, fork_expert_id, tmp_path, max_steps=4000, lr=1e-3,
                                         hidden_dims=(128, 128, 128), eval_episodes=20))
    with pytest.raises(UserError, match=r"samples its actions and has no deterministic mode.*sample=True"):
        load_policy(summary["run_dir"])
    paths = rollout_paths(load_policy(summary["run_dir"], sample=True), 20, seed=0)
    stats = summarize(paths)
    assert stats["success_rate"] == summary["return_mean"]  # rollout_paths replays the evaluation exactly
    assert stats["success_rate"] >= 0.7, stats
    assert stats["left_success"] >= 0.2 and stats["right_success"] >= 0.2, stats


def test_resume_continues_with_the_same_numbers(tmp_path, fork_expert_id):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, hidden_dims=(32, 32), diffusion_steps=10,
                  action_horizon=2, execute_steps=2)
    straight, resumed, a, b = train_straight_and_resumed(diffusion, fork_expert_id, tmp_path, 100, 200, **common)
    assert_states_equal(a, b, ("denoiser", "ema_denoiser"))
    assert a["ema_updates"] == b["ema_updates"] == 200
    losses = lambda d: [json.loads(l)["train/diffusion_loss"] for l in open(f"{d}/metrics.jsonl")  # noqa: E731
                        if "train/diffusion_loss" in l]
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])
    assert straight["return_mean"] == resumed["return_mean"]


def test_same_seed_same_run_and_other_seed_differs(tmp_path, fork_expert_id):
    runs = [diffusion.train(run_config(diffusion.Config, fork_expert_id, tmp_path / str(i), max_steps=100, seed=s,
                                       log_every=50, eval_every=50, eval_episodes=3, hidden_dims=(32, 32),
                                       diffusion_steps=10)) for i, s in enumerate([3, 3, 4])]
    weights = [torch.load(f"{r['run_dir']}/checkpoint.pt", weights_only=False)["agent"]["ema_denoiser"] for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    evals = [[json.loads(l) for l in open(f"{r['run_dir']}/metrics.jsonl") if "eval/return_mean" in l] for r in runs]
    assert evals[0] == evals[1] and len(evals[0]) == 2


@pytest.mark.parametrize("overrides, message", [
    (dict(diffusion_steps=0), "--diffusion-steps must be at least 1"),
    (dict(action_horizon=0), "--action-horizon must be at least 1"),
    (dict(action_horizon=4, execute_steps=5), "--execute-steps must lie in"),
    (dict(time_embed_dim=5), "--time-embed-dim must be even"),
    (dict(ema_max_decay=1.0), "--ema-max-decay must lie in"),
])
def test_bad_settings_fail_with_one_line(tmp_path, overrides, message):
    config = run_config(diffusion.Config, "test/never-read-v0", tmp_path, max_steps=10, **overrides)
    with pytest.raises(UserError, match=message):
        diffusion.train(config)
    assert not (tmp_path / "runs").exists()  # refused before any run folder


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        diffusion.Agent(diffusion.Config(device="cpu"), DataSpec(4, 2, 1.0, True), torch.device("cpu"))


def test_command_line_bad_value_exits_2_with_one_line():
    proc = run_algorithm_cli("diffusion_bc", "--diffusion-steps", "0", "--max-steps", "10", "--no-download")
    assert_one_line_error(proc, "--diffusion-steps must be at least 1")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr