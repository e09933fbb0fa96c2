"""SPOT: the VAE's ELBO loss as a density estimate (it ranks the data's actions above random ones, and is the ELBO
rescaled), the actor loss against an independent computation, lambda's online schedule by hand, the switch
(online gamma, Adam reset), compiled = eager, resume (mid-online, and mid-fit of the VAE, which a resumed run never
refits), fine-tuning on the mixed pendulum set, and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import (assert_one_line_error, assert_same_online_phase, assert_states_equal, checkpoint_agent,
                      load_algorithm, random_batch, run_algorithm_cli, run_config)
from torch.distributions import Normal, kl_divergence

from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset
from common.errors import UserError

spot = load_algorithm("spot")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


def _config(**overrides) -> "spot.Config":
    fields = dict(device="cpu", hidden_dims=(32, 32), vae_hidden_dims=(32, 32), support_lambda=0.5, max_steps=100,
                  vae_steps=10)
    fields.update(overrides)
    return spot.Config(**fields)


def _agent(**overrides) -> "spot.Agent":
    torch.manual_seed(0)
    return spot.Agent(_config(**overrides), SPEC, torch.device("cpu"))


def _batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(n, SPEC.obs_dim, SPEC.act_dim, SPEC.max_action, seed)


# --- the density estimate --------------------------------------------------------------------------------------

def test_vae_density_ranks_dataset_actions_above_uniform_random_ones(pendulum_expert_id):
    """Fitted on the expert pendulum set (scripted controller, action noise 0.1), the ELBO loss, SPOT's estimate of
    -log pi_beta(a|s), is far lower for the data's actions than for uniform random actions at the same states
    (held-out draws), and lower at most single states. The unfitted VAE already favours the data's small torques
    (its decoder outputs about 0) but fails both bounds."""
    dataset = load_dataset(pendulum_expert_id)
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"])
    sampler = TensorSampler({"obs": normalizer(data["obs"]), "actions": data["actions"]}, "cpu", 0)
    torch.manual_seed(0)
    agent = spot.Agent(_config(vae_hidden_dims=(64, 64), vae_lr=3e-3), dataset.spec, torch.device("cpu"))
    held_out = sampler.sample(2000)
    uniform = (2 * torch.rand_like(held_out["actions"]) - 1) * dataset.spec.max_action

    def ranking() -> tuple[float, float]:
        """(mean ELBO loss of the data's actions / of uniform ones, share of states where the data's is lower)"""
        torch.manual_seed(1)
        with torch.no_grad():
            data_loss = agent.elbo_loss(held_out["obs"], held_out["actions"])
            uniform_loss = agent.elbo_loss(held_out["obs"], uniform)
        return float(data_loss.mean() / uniform_loss.mean()), float((data_loss < uniform_loss).float().mean())

    ratio, share = ranking()
    assert ratio > 0.2 and share < 0.9  # measured before the fit: 0.35 and 84%
    for _ in range(1500):
        agent.vae_update(sampler.sample(256))
    ratio, share = ranking()
    assert ratio < 0.1 and share > 0.9, (ratio, share)  # measured: 0.025 (0.043 against 1.68) and 94%


def test_elbo_loss_is_the_negative_elbo_rescaled():
    """With d_z = 2|A| the ELBO loss ||D(s,z) - a||^2 / |A| + beta KL / d_z is (beta / 2|A|) (-ELBO) plus a constant,
    where the ELBO is E_q[log N(a; D(s,z), beta/4)] - KL(q(z|s,a) || N(0, I)) (the authors' `elbo_estimator`): so
    it ranks actions as -log pi_beta does. Checked with torch.distributions, over L = 3 latent samples."""
    agent = _agent(elbo_samples=3)
    batch = _batch(64)
    beta, act_dim = agent.config.kl_weight, SPEC.act_dim
    torch.manual_seed(5)
    got = agent.elbo_loss(batch["obs"], batch["actions"])
    torch.manual_seed(5)
    with torch.no_grad():
        mean, std = agent.vae.encode(batch["obs"], batch["actions"])
        z = mean[:, None] + std[:, None] * torch.randn(64, 3, mean.shape[1])
        decoded = torch.stack([agent.vae.decode(batch["obs"], z[:, i]) for i in range(3)], 1)
        sigma = math.sqrt(beta / 4)
        log_likelihood = Normal(decoded, sigma).log_prob(batch["actions"][:, None]).sum(-1).mean(1)
        elbo = log_likelihood - kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).sum(-1)
        expected = beta / (2 * act_dim) * (-elbo) - beta / 2 * math.log(sigma * math.sqrt(2 * math.pi))
    assert mean.shape[1] == 2 * act_dim
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)


# --- the actor loss and the update order ---------------------------------------------------------------------------

def test_actor_loss_matches_an_independent_computation():
    """L = -mean Q_1(s, pi(s)) / stop_grad(mean |Q_1|) + lambda mean ELBOloss(s, pi(s)), with Q_1 of the critics as
    this step's critic update left them, the penalty's latents the ones drawn after the smoothing noise; the
    actor's gradient equals the one of that loss (so the normaliser is a constant), and the frozen VAE and the
    critics get no gradient from it."""
    agent = _agent(policy_freq=1, support_lambda=0.3)
    agent.update(_batch(seed=1))  # the critics and actor away from their initialisation
    batch = _batch(seed=2)
    actor_before, vae = copy.deepcopy(agent.actor), agent.vae
    critic_before = copy.deepcopy(agent.critic)
    torch.manual_seed(7)
    logs = agent.update(batch)
    assert not torch.equal(critic_before.layers[0].weight, agent.critic.layers[0].weight)
    torch.manual_seed(7)
    torch.randn(32, SPEC.act_dim)  # the target policy smoothing noise, drawn first
    eps = torch.randn(32, 1, 2 * SPEC.act_dim)  # then the penalty's latent noise
    pi = actor_before(batch["obs"])
    q1 = agent.critic(batch["obs"], pi)[0]  # the updated critics
    mean, std = vae.encode(batch["obs"], pi)
    recon = vae.decode(batch["obs"], mean + std * eps[:, 0])
    kl = kl_divergence(Normal(mean, std), Normal(0.0, 1.0)).mean(-1)
    penalty = (recon - pi).pow(2).mean(-1) + 0.5 * kl
    expected = -q1.mean() / q1.abs().mean().detach() + 0.3 * penalty.mean()
    grads = torch.autograd.grad(expected, list(actor_before.parameters()))
    assert logs["train/actor_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["train/density_penalty"].item() == pytest.approx(penalty.mean().item(), rel=1e-5)
    assert logs["train/q_scale"].item() == pytest.approx(q1.abs().mean().item(), rel=1e-5)
    for p, g in zip(agent.actor.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in agent.vae.parameters())


def test_actor_and_targets_move_only_every_policy_freq_steps():
    agent = _agent(policy_freq=2)
    actor0, target0 = copy.deepcopy(agent.actor.state_dict()), copy.deepcopy(agent.critic_target.state_dict())
    agent.update(_batch(seed=1))
    assert all(torch.equal(actor0[k], v) for k, v in agent.actor.state_dict().items())
    assert all(torch.equal(target0[k], v) for k, v in agent.critic_target.state_dict().items())
    agent.update(_batch(seed=2))
    assert not any(torch.equal(actor0[k], v) for k, v in agent.actor.state_dict().items())
    assert not all(torch.equal(target0[k], v) for k, v in agent.critic_target.state_dict().items())


def test_output_layers_are_initialised_small_where_the_settings_say():
    """Antmaze and Adroit: U(+-1e-3) on the actor's output layer, U(+-3e-3) on each critic's; locomotion: PyTorch's
    default init (the authors' offline runs)."""
    small = spot.Agent(spot.Config(env="antmaze-umaze-v2", device="cpu"), SPEC, torch.device("cpu"))
    head = small.actor.net[-1]
    assert head.weight.abs().max() <= 1e-3 and head.bias.abs().max() <= 1e-3 and head.weight.abs().max() > 5e-4
    critic_head = small.critic.layers[-1]
    assert critic_head.weight.abs().max() <= 3e-3 and critic_head.weight.abs().max() > 1.5e-3
    default = spot.Agent(spot.Config(env="hopper-medium-v2", device="cpu"), SPEC, torch.device("cpu"))
    assert default.actor.net[-1].weight.abs().max() > 1e-2  # nn.Linear's U(+-1/sqrt(256))


def test_dataset_settings_are_the_published_ones():
    from common.runs import apply_dataset_settings

    def settings(env):
        return apply_dataset_settings(spot.Config(env=env), spot.DATASET_SETTINGS, quiet=True)

    for env, lam in (("local/halfcheetah/medium-expert-v0", 1.0), ("local/walker2d/medium-replay-v0", 0.2),
                     ("walker2d-medium-v2", 0.2), ("local/hopper-150k/medium-replay-v0", 0.1),
                     ("local/hopper-60k/expert-v0", 0.1), ("halfcheetah-expert-v2", 0.05),
                     ("antmaze-medium-diverse-v2", 0.025), ("antmaze-umaze-v2", 0.25), ("pen-cloned-v1", 1.0)):
        assert settings(env).support_lambda == lam, env
    hopper, maze, pen = settings("hopper-medium-v2"), settings("antmaze-large-play-v2"), settings("door-cloned-v1")
    assert (hopper.actor_lr, hopper.actor_dropout, hopper.normalize_obs, hopper.online_gamma) == (3e-4, 0.1, True, None)
    assert (maze.actor_lr, maze.actor_init_w, maze.critic_init_w, maze.normalize_obs, maze.reward_transform,
            maze.online_gamma, maze.online_lambda_end) == (1e-4, 1e-3, 3e-3, False, "minus-one", 0.995, 0.2)
    assert (pen.online_gamma, pen.online_lambda_end, pen.reward_transform) == (0.99, 0.5, "none")
    assert hopper.vae_steps == maze.vae_steps == 100_000 and hopper.max_steps == 1_000_000


# --- the online phase ------------------------------------------------------------------------------------------

def test_lambda_cools_online_as_written_by_hand():
    """lambda_t = lambda max(lambda_end, 1 - t / online_steps), t the online updates so far including this one:
    lambda 0.5, lambda_end 0.2, 10 online steps: 0.45, 0.40, ..., 0.15, then 0.1 from t = 8 on; offline it stays
    0.5. The logged lambda is the one the actor step used; a state round trip mid-online keeps the schedule and the
    online gamma."""
    agent = _agent(support_lambda=0.5, online_lambda_end=0.2, online_steps=10, policy_freq=1, online_gamma=0.9)
    for seed in range(3):
        assert agent.update(_batch(seed=seed))["train/lambda"].item() == 0.5
    agent.start_online()
    expected = [0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15, 0.10, 0.10, 0.10, 0.10]
    got = []
    for t in range(1, 12):
        got.append(agent.update(_batch(seed=10 + t))["train/lambda"].item())
        if t == 4:
            clone = spot.Agent(_config(support_lambda=0.5, online_lambda_end=0.2, online_steps=10, policy_freq=1,
                                       online_gamma=0.9), SPEC, torch.device("cpu"))
            clone.load_state_dict(copy.deepcopy(agent.state_dict()))
            assert clone.online and clone.online_it == 4 and clone.gamma.item() == pytest.approx(0.9)
            assert clone.update(_batch(seed=99))["train/lambda"].item() == pytest.approx(0.25)
    assert got == pytest.approx(expected)
    fixed = _agent(support_lambda=0.5, online_lambda_end=1.0, online_steps=10, policy_freq=1)
    fixed.start_online()
    assert [fixed.update(_batch(seed=t))["train/lambda"].item() for t in range(3)] == [0.5] * 3


def test_the_switch_uses_the_online_gamma_in_the_critic_target():
    agent = _agent(policy_noise=0.0, gamma=0.9, online_gamma=0.5)
    batch = _batch()

    def expected_critic_loss(gamma):
        with torch.no_grad():
            target_q = agent.critic_target(batch["next_obs"], agent.actor_target(batch["next_obs"])).min(0).values
            y = batch["rewards"] + gamma * (1 - batch["terminals"]) * target_q
            return ((agent.critic(batch["obs"], batch["actions"]) - y) ** 2).mean(1).sum().item()

    want = expected_critic_loss(0.9)
    assert agent.update(batch)["train/critic_loss"].item() == pytest.approx(want, rel=1e-5)
    agent.start_online()
    want = expected_critic_loss(0.5)
    assert agent.update(batch)["train/critic_loss"].item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("reset", [True, False])
def test_the_switch_resets_adam_as_a_fresh_optimizer_or_keeps_it(reset):
    """online_reset_optimizers (CORL): the critics' first online step is a newly built Adam's first step; off (the
    authors): it continues the offline Adam. Replayed on a copy of the critics with torch.optim.Adam."""
    agent = _agent(policy_freq=1, online_reset_optimizers=reset)
    for seed in range(3):
        agent.update(_batch(seed=seed))
    critic, critic_target, actor_target = (copy.deepcopy(net) for net in (agent.critic, agent.critic_target,
                                                                          agent.actor_target))
    optimizer = torch.optim.Adam(critic.parameters(), lr=agent.config.critic_lr)
    if not reset:
        optimizer.load_state_dict(copy.deepcopy(agent.critic_optimizer.state_dict()))
    agent.start_online()
    batch = _batch(seed=9)
    torch.manual_seed(3)
    agent.update(batch)
    torch.manual_seed(3)  # the same smoothing noise
    noise = (torch.randn(32, SPEC.act_dim) * 0.2 * SPEC.max_action).clamp(-1.0, 1.0)
    with torch.no_grad():
        next_actions = (actor_target(batch["next_obs"]) + noise).clamp(-2.0, 2.0)
        target_q = critic_target(batch["next_obs"], next_actions).min(0).values
        y = batch["rewards"] + 0.99 * (1 - batch["terminals"]) * target_q
    ((critic(batch["obs"], batch["actions"]) - y) ** 2).mean(1).sum().backward()
    optimizer.step()
    for mine, replayed in zip(agent.critic.parameters(), critic.parameters()):
        torch.testing.assert_close(mine, replayed, rtol=1e-5, atol=1e-7)
    steps = {float(state["step"]) for state in agent.critic_optimizer.state.values()}
    assert steps == ({1.0} if reset else {4.0})


def test_reset_adam_in_place_equals_a_new_adam():
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(5, 4, generator=g)
    a, b = weights.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    used = torch.optim.Adam([a], lr=1e-2)
    for _ in range(3):
        used.zero_grad()
        (a.sin().sum() * torch.randn((), generator=g)).backward()
        used.step()
    with torch.no_grad():
        b.copy_(a)
    spot.reset_adam_(used)
    fresh = torch.optim.Adam([b], lr=1e-2)
    for optimizer, p in ((used, a), (fresh, b)):
        optimizer.zero_grad()
        (p.cos().sum() * 3).backward()
        optimizer.step()
    assert torch.equal(a, b)


def test_explore_adds_clipped_gaussian_noise_inside_the_box():
    agent = _agent(online_explore_noise=0.1)
    obs = torch.zeros(4000, SPEC.obs_dim)
    deviation = agent.explore(obs) - agent.act(obs)
    assert abs(float(deviation.mean())) < 0.01 and float(deviation.std()) == pytest.approx(0.2, rel=0.05)
    wide = _agent(online_explore_noise=5.0).explore(obs) - _agent().act(obs)
    assert wide.abs().max() <= 0.5 * SPEC.max_action + 1e-6  # clipped at c max_action (CORL's noise_clip)


def test_compiled_vae_step_and_updates_equal_eager_across_the_switch(monkeypatch):
    """The VAE step, the offline update and the online update (gamma switched, Adam reset, lambda cooling, all in
    place) compiled (aot_eager) give the eager numbers, with no graph breaks besides torch.optim's, and the switch
    compiles nothing new."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    agents, logs = [], [[], []]
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        torch._dynamo.reset()
        counters.clear()
        for compiled in (False, True):
            # policy_freq 1: one TD3 graph (tests/test_compile.py checks the step without the actor)
            agents.append(_agent(compile=compiled, online_steps=4, online_gamma=0.5, actor_dropout=0.1,
                                 policy_freq=1))
        for step in range(8):
            batch = _batch(8, seed=step)
            if step == 5:
                graphs_before_the_switch = counters["stats"]["unique_graphs"]
            for agent, out in zip(agents, logs):
                if step == 5:
                    agent.start_online()
                torch.manual_seed(100 + step)
                result = agent.vae_update(batch) if step < 2 else agent.update(batch)
                out.append({k: v.detach().clone() for k, v in result.items()})
        assert counters["stats"]["unique_graphs"] == graphs_before_the_switch
    breaks = {k: v for k, v in {**counters["graph_break"], **counters["unimplemented"]}.items()
              if not k.startswith("Call to `torch._dynamo.graph_break()`")}
    assert not breaks, breaks
    for a, b in zip(*logs):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert logs[0][7]["train/lambda"].item() == pytest.approx(0.5 * 0.25)  # t = 3 of 4
    eager, compiled = (agent.state_dict() for agent in agents)
    for net in ("vae", "actor", "actor_target", "critic", "critic_target"):
        for key in eager[net]:
            torch.testing.assert_close(compiled[net][key], eager[net][key], rtol=1e-4, atol=1e-5)
    assert agents[1].gamma.item() == 0.5  # and its Adam restarted at the switch: 3 steps since
    assert all(float(state["step"]) == 3 for state in agents[1].critic_optimizer.state.values())


# --- runs --------------------------------------------------------------------------------------------------------

FAST = dict(hidden_dims=(32, 32), vae_hidden_dims=(32, 32), vae_steps=50, support_lambda=0.1, batch_size=64,
            eval_episodes=2, log_every=50, eval_every=100)


class Killed(Exception):
    """Stands for a kill of the process (raised by a patched method at a chosen point)."""


def kill_at(monkeypatch, method: str, counter: str, value: int) -> None:
    """Make `Agent.<method>` raise Killed when the agent's `<counter>` equals `value` (before that step runs)."""
    real = getattr(spot.Agent, method)

    def killed(self, batch):
        if getattr(self, counter) == value:
            raise Killed
        return real(self, batch)

    monkeypatch.setattr(spot.Agent, method, killed)


def test_resume_mid_online_equals_an_uninterrupted_run_and_never_refits_the_vae(pendulum_mixed_id, tmp_path,
                                                                                 monkeypatch):
    """100 offline updates and 450 online env steps; one run killed 150 env steps into the online phase (mid-episode,
    last checkpoint at step 250) and resumed: the same VAE, weights, Adam states, online buffer, lambda schedule,
    counters and scores as the run that never stopped; the resumed run does not touch the VAE."""
    settings = dict(FAST, max_steps=100, online_steps=450, checkpoint_every=250)
    straight = spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path / "a", **settings))
    kill_at(monkeypatch, "update", "total_it", 260)
    with pytest.raises(Killed):
        spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path / "b", **settings))
    run_dir = next((tmp_path / "b" / "runs" / "spot").glob("*/*"))
    assert checkpoint_agent(run_dir)["online_it"] == 150
    monkeypatch.undo()
    kill_at(monkeypatch, "vae_update", "vae_step", 0)  # any VAE step now fails the test
    resumed = spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path / "b", resume=str(run_dir), **settings))
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ("vae", "actor", "actor_target", "critic", "critic_target"))
    for name in ("actor_optimizer", "critic_optimizer"):
        for key, value in a[name]["state"].items():
            assert all(torch.equal(value[k], b[name]["state"][key][k]) for k in value), name
    assert (a["total_it"], a["online_it"], a["vae_step"]) == (b["total_it"], b["online_it"], b["vae_step"]) == \
        (550, 450, 50)
    assert_same_online_phase(straight, resumed, rows=450, summary_keys=(
        "normalized_score_mean", "offline_normalized_score_mean", "online_regret", "behaviour_vae"))


def test_a_run_killed_while_fitting_the_vae_continues_the_fit_exactly(pendulum_mixed_id, tmp_path, monkeypatch):
    """Checkpointed every 20 VAE steps while it fits: killed at VAE step 30, resumed, the run ends with the weights
    of a run that was never killed."""
    settings = dict(FAST, vae_steps=50, checkpoint_every=20, max_steps=30)
    straight = spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path / "a", **settings))
    kill_at(monkeypatch, "vae_update", "vae_step", 30)
    with pytest.raises(Killed):
        spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path / "b", **settings))
    monkeypatch.undo()
    run_dir = next((tmp_path / "b" / "runs" / "spot").glob("*/*"))
    assert checkpoint_agent(run_dir)["vae_step"] == 20
    resumed = spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path / "b", resume=str(run_dir), **settings))
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ("vae", "actor", "critic"))
    assert straight["behaviour_vae"] == resumed["behaviour_vae"]


def test_fine_tuning_raises_the_pendulum_score_above_the_offline_phase(pendulum_mixed_id, tmp_path):
    """On the mixed pendulum set (15 expert and 45 random episodes) a short offline phase with a conservative lambda
    leaves the policy low; 2000 online env steps (10 episodes, one update each, lambda cooling to a fifth) raise
    the score far above the score at the switch. Short-run settings: small networks, lr 1e-3, tau 0.05, gamma 0.95."""
    summary = spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path, max_steps=1000, online_steps=2000,
                                    hidden_dims=(64, 64), vae_hidden_dims=(64, 64), vae_steps=1000,
                                    support_lambda=0.1, gamma=0.95, online_gamma=0.95, tau=0.05, actor_lr=1e-3,
                                    critic_lr=1e-3, eval_every=1000))
    # measured: about -20 at the switch, about 85 after the online phase (behaviour policy: about 24)
    assert summary["normalized_score_mean"] > summary["offline_normalized_score_mean"] + 30, summary
    assert summary["normalized_score_mean"] > 60, summary
    assert summary["online_episodes"] == 10 and 0 < summary["online_regret"] < 1


# --- bad input ------------------------------------------------------------------------------------------------

def test_bad_input_is_one_line_and_writes_nothing(pendulum_mixed_id, cartpole_mixed_id, tmp_path):
    flags = ["--device", "cpu", "--runs-dir", str(tmp_path), "--no-download"]
    assert_one_line_error(run_algorithm_cli("spot", "--env", pendulum_mixed_id, *flags, "--support-lambda", "-0.1"),
                          "--support-lambda (lambda, the weight of the support penalty) must be 0 or positive")
    for overrides, message in ((dict(online_lambda_end=1.5), "--online-lambda-end"),
                               (dict(online_lambda_end=-0.1), "must lie in [0, 1]"),
                               (dict(support_lambda=float("nan")), "--support-lambda")):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            spot.train(run_config(spot.Config, pendulum_mixed_id, tmp_path, **overrides))
    with pytest.raises(UserError, match="discrete actions"):
        spot.train(run_config(spot.Config, cartpole_mixed_id, tmp_path))
    with pytest.raises(UserError, match="continuous"):
        spot.Agent(_config(), DataSpec(3, 2, 1.0, True), torch.device("cpu"))
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
