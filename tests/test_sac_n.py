"""SAC-N / EDAC / LB-SAC: EDAC's diversity term against a brute-force sum of pairwise cosines, the min over the N
critics in the target and the actor, the eta L_ES term in the critic gradient, LB-SAC's mean loss, the published
settings per variant, compiled = eager for the second-order term, learning on pendulum data, resume, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import (assert_one_line_error, assert_same_train_logs, assert_states_equal, behaviour_return,
                      load_algorithm, random_batch, run_algorithm_cli, run_config, train_straight_and_resumed)

from common.datasets import DataSpec
from common.errors import UserError
from common.networks import CriticEnsemble

sac_n = load_algorithm("sac_n")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)
CPU = torch.device("cpu")


def _batch(n: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(n, SPEC.obs_dim, SPEC.act_dim, SPEC.max_action, seed)


def _agent(**overrides) -> "sac_n.Agent":
    fields = dict(env="test/pendulum/mixed-v0", device="cpu", hidden_dims=(16, 16), num_critics=4, eta=0.0,
                  max_steps=100)
    fields.update(overrides)
    torch.manual_seed(0)
    return sac_n.Agent(sac_n.Config(**fields), SPEC, CPU)


def member_q(critic: CriticEnsemble, k: int, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Critic k alone, written out with its own weights as a plain MLP (no LayerNorm): Q_k(s, a), shape (B,)."""
    x = torch.cat([obs, actions], -1)
    for i, layer in enumerate(critic.layers):
        x = x @ layer.weight[k] + layer.bias[k, 0]
        if i < len(critic.layers) - 1:
            x = torch.relu(x)
    return x.squeeze(-1)


# ---------------------------------------------------------------------------------------------------
# EDAC's ensemble gradient-diversity term L_ES
# ---------------------------------------------------------------------------------------------------


def brute_force_diversity(critic: CriticEnsemble, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """1/(N-1) mean_b sum_{i != j} cos(grad_a Q_i(s_b, a_b), grad_a Q_j(s_b, a_b)): each member's action gradient
    taken alone (torch.autograd.grad on member k's Q, one member at a time), pairs summed in Python loops."""
    n = critic.ensemble_size
    grads = []
    for k in range(n):
        a = actions.clone().requires_grad_(True)
        q_k = critic(obs, a)[k]  # the shared forward; only member k's output is differentiated
        grads.append(torch.autograd.grad(q_k.sum(), a, create_graph=True)[0])  # (B, A)
    total = torch.zeros(())
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + torch.nn.functional.cosine_similarity(grads[i], grads[j], dim=-1, eps=1e-30).mean()
    return total / (n - 1)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_diversity_term_equals_the_brute_force_sum_of_pairwise_cosines(layer_norm):
    torch.manual_seed(0)
    critic = CriticEnsemble(3, 2, (16, 16), 5, layer_norm=layer_norm)
    b = _batch(24)
    q, diversity = sac_n.q_and_diversity(critic, b["obs"], b["actions"])
    expected = brute_force_diversity(critic, b["obs"], b["actions"])
    assert torch.allclose(diversity, expected, rtol=1e-5, atol=1e-6), (diversity, expected)
    assert abs(expected.item()) > 1e-3  # not a trivially zero case
    # Q on the per-member copies is the ensemble's ordinary output
    assert torch.allclose(q, critic(b["obs"], b["actions"]), rtol=1e-5, atol=1e-6)
    # second order: the term's gradient reaches every weight matrix (the head's bias does not move grad_a Q),
    # and equals the brute force's
    params = list(critic.parameters())
    got = torch.autograd.grad(diversity, params, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(expected, params, allow_unused=True, materialize_grads=True)
    assert all(g.abs().sum() > 0 for g in got[:len(critic.layers) * 2:2])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_identical_members_have_the_largest_diversity_term():
    # N copies of one critic: every pair has cosine 1, so L_ES = N (N - 1) / (N - 1) = N
    torch.manual_seed(0)
    critic = CriticEnsemble(3, 2, (16, 16), 4)
    with torch.no_grad():
        for layer in critic.layers:
            layer.weight.copy_(layer.weight[:1].expand_as(layer.weight))
            layer.bias.copy_(layer.bias[:1].expand_as(layer.bias))
    b = _batch(16)
    assert sac_n.q_and_diversity(critic, b["obs"], b["actions"])[1].item() == pytest.approx(4.0, rel=1e-5)


def test_update_adds_eta_times_the_diversity_gradient_to_the_critics():
    # eta enters the critic loss only: the alpha and actor steps (and all random draws) are the same in both runs,
    # so the critics' gradients differ by exactly eta * grad L_ES at the critics before the step
    plain, edac = _agent(eta=0.0), _agent(eta=0.5)
    b = _batch()
    critic_before = copy.deepcopy(edac.critic)
    torch.manual_seed(7)
    plain.update(b)
    torch.manual_seed(7)
    logs = edac.update(b)
    diversity = brute_force_diversity(critic_before, b["obs"], b["actions"])
    expected = torch.autograd.grad(0.5 * diversity, list(critic_before.parameters()), allow_unused=True,
                                   materialize_grads=True)
    for p_plain, p_edac, g in zip(plain.critic.parameters(), edac.critic.parameters(), expected):
        assert torch.allclose(p_edac.grad - p_plain.grad, g, rtol=1e-4, atol=1e-6)
    assert float(logs["train/diversity_loss"]) == pytest.approx(diversity.item(), rel=1e-5)
    for p_plain, p_edac in zip(plain.actor.parameters(), edac.actor.parameters()):
        assert torch.equal(p_plain, p_edac)
    assert "train/diversity_loss" not in plain.update(b)


# ---------------------------------------------------------------------------------------------------
# The min over the N critics; the losses by hand
# ---------------------------------------------------------------------------------------------------


def hand_sample(actor, obs: torch.Tensor, eps: torch.Tensor, max_action: float) -> tuple[torch.Tensor, torch.Tensor]:
    """a = max_action tanh(mu + sigma eps) and log pi(a|s) by torch.distributions and the tanh/scale Jacobian."""
    mean, log_std = actor(obs)
    u = mean + log_std.exp() * eps
    log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(-1)
    log_prob = log_prob - torch.log(max_action * (1 - torch.tanh(u) ** 2)).sum(-1)
    return max_action * torch.tanh(u), log_prob


@pytest.mark.parametrize("critic_loss", ["sum", "mean"])
def test_target_and_actor_take_the_min_over_the_n_critics(critic_loss):
    n, gamma = 5, 0.9
    agent = _agent(num_critics=n, gamma=gamma, critic_loss=critic_loss)
    b = _batch(64)
    with torch.no_grad():  # members that disagree, so that the min, the mean and any single member differ
        for net in (agent.critic, agent.critic_target):
            net.layers[-1].bias.copy_(torch.arange(n, dtype=torch.float32).view(n, 1, 1) * 3.0)
    critic, target, actor_before = (copy.deepcopy(agent.critic), copy.deepcopy(agent.critic_target),
                                    copy.deepcopy(agent.actor))
    torch.manual_seed(3)
    logs = agent.update(b)
    # the update's three draws of eps ~ N(0, I): alpha's sample at s, the actor's at s, a' at s'
    torch.manual_seed(3)
    eps = [torch.randn(64, 1, 2)[:, 0] for _ in range(3)]
    alpha = float(logs["train/alpha"])
    assert alpha == pytest.approx(math.exp(agent.log_alpha.item()))
    with torch.no_grad():
        # the target uses the actor after its step (the final one) and the new alpha
        next_actions, next_log_prob = hand_sample(agent.actor, b["next_obs"], eps[2], 2.0)
        next_q = torch.stack([member_q(target, k, b["next_obs"], next_actions) for k in range(n)])
        y = b["rewards"] + gamma * (1 - b["terminals"]) * (next_q.min(0).values - alpha * next_log_prob)
        q = torch.stack([member_q(critic, k, b["obs"], b["actions"]) for k in range(n)])
        per_member = ((q - y) ** 2).mean(1)
        critic_expected = per_member.sum() if critic_loss == "sum" else per_member.mean()
        # the actor: its own parameters before the step, the critics before theirs, the new alpha
        pi, log_prob = hand_sample(actor_before, b["obs"], eps[1], 2.0)
        q_pi = torch.stack([member_q(critic, k, b["obs"], pi) for k in range(n)])
        actor_expected = (alpha * log_prob - q_pi.min(0).values).mean()
        actor_with_mean = (alpha * log_prob - q_pi.mean(0)).mean()
    assert float(logs["train/critic_loss"]) == pytest.approx(float(critic_expected), rel=1e-5)
    assert float(logs["train/actor_loss"]) == pytest.approx(float(actor_expected), rel=1e-5, abs=1e-6)
    assert abs(float(actor_with_mean - actor_expected)) > 1e-3  # the test tells min from mean
    assert torch.allclose(logs["train/q_data"], q.min(0).values.mean(), rtol=1e-5)
    assert torch.allclose(logs["train/q_std"], q.std(0).mean(), rtol=1e-5)
    assert torch.allclose(logs["train/q_min_gap"], (q.mean(0) - q.min(0).values).mean(), rtol=1e-5)
    # q_value, what figures and OPE read: the min over the members
    with torch.no_grad():
        per_member_now = torch.stack([member_q(agent.critic, k, b["obs"], b["actions"]) for k in range(n)])
    assert torch.allclose(agent.q_value(b["obs"], b["actions"]), per_member_now.min(0).values, rtol=1e-5, atol=1e-6)


def test_lb_sac_critic_loss_is_the_sum_divided_by_n():
    summed, averaged = _agent(num_critics=6, critic_loss="sum"), _agent(num_critics=6, critic_loss="mean")
    b = _batch()
    torch.manual_seed(1)
    a = summed.update(b)
    torch.manual_seed(1)
    m = averaged.update(b)
    assert float(a["train/critic_loss"]) == pytest.approx(6 * float(m["train/critic_loss"]), rel=1e-6)
    for p, q in zip(summed.critic.parameters(), averaged.critic.parameters()):
        assert torch.allclose(p.grad, 6 * q.grad, rtol=1e-4, atol=1e-7)


def test_edac_initialisation_and_log_sigma_clip():
    agent = _agent(edac_init=True)
    for layer in agent.actor.trunk[::2]:
        assert torch.all(layer.bias == 0.1)
    for head in (agent.actor.mu, agent.actor.log_std):
        assert head.weight.abs().max() <= 1e-3 and head.bias.abs().max() <= 1e-3
    assert all(torch.all(layer.bias == 0.1) for layer in agent.critic.layers[:-1])
    assert agent.critic.layers[-1].weight.abs().max() <= 3e-3
    plain = _agent(edac_init=False)
    assert plain.actor.mu.weight.abs().max() > 1e-2 and not torch.all(plain.actor.trunk[0].bias == 0.1)
    with torch.no_grad():
        agent.actor.log_std.bias.fill_(50.0)
        assert torch.all(agent.actor(_batch()["obs"])[1] == 2.0)
        agent.actor.log_std.bias.fill_(-50.0)
        assert torch.all(agent.actor(_batch()["obs"])[1] == -5.0)


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, env, expected", [
    ("edac", "hopper-medium-v2", dict(num_critics=50, eta=1.0, critic_loss="sum", max_steps=3_000_000)),
    ("edac", "local/halfcheetah/medium-expert-v0", dict(num_critics=10, eta=5.0)),
    ("edac", "D4RL/pen/human-v2", dict(num_critics=20, eta=1000.0)),
    ("edac", "D4RL/antmaze/umaze-v1", dict(num_critics=10, eta=1.0)),
    ("sac-n", "hopper-medium-v2", dict(num_critics=500, eta=0.0, max_steps=3_000_000)),
    ("sac-n", "local/walker2d/medium-replay-v0", dict(num_critics=20, eta=0.0)),
    ("lb-sac", "hopper-medium-v2", dict(num_critics=25, eta=0.0, critic_loss="mean", critic_layer_norm=True,
                                        edac_init=False, actor_lr=1.8e-3, max_steps=200_000, batch_size=10_000)),
    ("lb-sac", "walker2d-expert-v2", dict(num_critics=30, edac_init=True, critic_layer_norm=False,
                                          max_steps=350_000, batch_size=10_000)),
])
def test_each_variant_takes_its_published_settings(variant, env, expected):
    config = sac_n.resolve_settings(sac_n.Config(env=env, variant=variant, device="cpu"))
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.hidden_dims == (256, 256, 256) and config.gamma == 0.99 and config.tau == 0.005


def test_lb_sac_batch_only_replaces_the_default_and_the_tools_see_edac():
    config = sac_n.resolve_settings(sac_n.Config(env="hopper-medium-v2", variant="lb-sac", batch_size=512,
                                                 device="cpu"))
    assert config.batch_size == 512
    assert sac_n.DATASET_SETTINGS is sac_n.VARIANT_SETTINGS["edac"] and sac_n.Config().variant == "edac"
    assert sac_n.resolve_settings(sac_n.Config(env="hopper-medium-v2", device="cpu")).batch_size == 256


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="at least 2"):
        _agent(num_critics=1)
    with pytest.raises(UserError, match="eta must be >= 0"):
        _agent(eta=-0.1)
    with pytest.raises(UserError, match="continuous"):
        sac_n.Agent(sac_n.Config(device="cpu"), DataSpec(3, 2, 1.0, True), CPU)


# ---------------------------------------------------------------------------------------------------
# --compile: the second-order term compiled equals eager
# ---------------------------------------------------------------------------------------------------


def test_compiled_edac_update_equals_eager_on_the_first_update():
    """tests/test_compile.py compares 4 updates at its tiny sizes; this pins the first one, where both start from
    the same weights: the compiled double backward (aot_eager) gives the eager gradients (see the report: after
    the first step the fused/foreach Adam's last-bit differences are amplified by L_ES's 1/||grad_a Q|| at the
    8-wide sizes)."""
    from torch._dynamo.utils import counters

    def build(compiled: bool):
        torch._dynamo.reset()
        return _agent(eta=1.0, num_critics=3, hidden_dims=(8, 8), compile=compiled, edac_init=True)

    b = _batch(8)
    eager = build(False)
    torch.manual_seed(5)
    eager_logs = eager.update(b)
    real = torch.compile
    torch.compile = lambda fn, **kw: real(fn, **{**kw, "backend": "aot_eager"})
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=False):
            counters.clear()
            compiled = build(True)
            torch.manual_seed(5)
            compiled_logs = compiled.update(b)
    finally:
        torch.compile = real
    breaks = {r.splitlines()[0] for r in {**counters["graph_break"], **counters["unimplemented"]}}
    assert breaks <= {"Call to `torch._dynamo.graph_break()`"}, breaks  # torch.optim's around step() only
    assert eager_logs.keys() == compiled_logs.keys()
    for key in eager_logs:
        torch.testing.assert_close(compiled_logs[key], eager_logs[key], rtol=1e-6, atol=1e-7)
    for p, q in zip(eager.critic.parameters(), compiled.critic.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Runs: learning, resume, bad input on the command line
# ---------------------------------------------------------------------------------------------------


def test_edac_beats_the_behaviour_policy_on_mixed_data(tmp_path, pendulum_mixed_id):
    # `test/pendulum/mixed-v0`: 15 expert + 45 uniform-random episodes, behaviour return about -955. Short-run
    # settings: 5 critics of 64 x 64, lr 1e-3, tau 0.05, gamma 0.95; eta 1 (EDAC).
    config = run_config(sac_n.Config, pendulum_mixed_id, tmp_path, max_steps=3_000, num_critics=5, eta=1.0,
                        hidden_dims=(64, 64), gamma=0.95, tau=0.05, actor_lr=1e-3, critic_lr=1e-3, alpha_lr=1e-3)
    summary = sac_n.train(config)
    behaviour = behaviour_return(pendulum_mixed_id)
    # observed (seed 0): about -280 (normalised score about 87)
    assert summary["return_mean"] > behaviour + 300, (summary["return_mean"], behaviour)


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, hidden_dims=(16, 16), num_critics=3,
                  eta=1.0, batch_size=64)
    straight, resumed, a, b = train_straight_and_resumed(sac_n, pendulum_mixed_id, tmp_path, 101, 201, **common)
    assert_states_equal(a, b, ("actor", "critic", "critic_target"))
    assert torch.equal(a["log_alpha"], b["log_alpha"])
    for name in ("actor_optimizer", "critic_optimizer", "alpha_optimizer"):
        for index, moments in a[name]["state"].items():
            assert all(torch.equal(value, b[name]["state"][index][key]) for key, value in moments.items()), name

    assert_same_train_logs(straight, resumed, "train/diversity_loss", steps=[50, 100, 150, 200, 201])
    assert straight["return_mean"] == resumed["return_mean"]


@pytest.mark.parametrize("flags, message", [
    (["--num-critics", "1"], "--num-critics must be at least 2"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--batch-size", "20000"], "is larger than the dataset's"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, pendulum_expert_id, flags, message):
    runs = tmp_path / "runs"
    proc = run_algorithm_cli("sac_n", "--env", pendulum_expert_id, "--runs-dir", str(runs), "--no-download",
                             "--device", "cpu", *flags)
    assert_one_line_error(proc, message)
    assert not runs.exists()


def test_discrete_data_is_one_line(tmp_path, cartpole_mixed_id):
    runs = tmp_path / "runs"
    proc = run_algorithm_cli("sac_n", "--env", cartpole_mixed_id, "--runs-dir", str(runs), "--no-download",
                             "--device", "cpu")
    assert_one_line_error(proc, "has discrete actions")
    assert not runs.exists()
