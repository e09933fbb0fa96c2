"""Cal-QL: the bound max(Q, G) on the pushed-down policy actions against a hand computation, returns-to-go of
dense and sparse episodes by hand, the published settings, the switch to fine-tuning, compiled = eager, resume
mid-online, fine-tuning that improves on the offline phase, and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_same_online_phase, assert_states_equal, checkpoint_agent,
                      load_algorithm, run_algorithm_cli, run_config)

from common.datasets import DataSpec, load_dataset
from common.runs import apply_dataset_settings

cal_ql = load_algorithm("cal_ql")


def tiny_config(**overrides) -> "cal_ql.Config":
    fields = dict(device="cpu", actor_hidden_dims=(16, 16), critic_hidden_dims=(16, 16), cql_num_samples=3,
                  cql_alpha=5.0, lagrange=False, sparse_reward=False, reward_scale=1.0, reward_bias=0.0,
                  cql_clip_diff_min=-math.inf, max_steps=100)
    fields.update(overrides)
    return cal_ql.Config(**fields)


def random_batch(spec: DataSpec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(batch, spec.obs_dim, generator=g),
            "actions": (2 * torch.rand(batch, spec.act_dim, generator=g) - 1) * spec.max_action,
            "rewards": torch.randn(batch, generator=g), "next_obs": torch.randn(batch, spec.obs_dim, generator=g),
            "terminals": (torch.rand(batch, generator=g) < 0.2).float(),
            "returns_to_go": torch.zeros(batch)}


# --- the bound on the push-down, by hand ---------------------------------------------------------------------

class HandNetworks:
    """The agent's critics and actor before an update, evaluated one sample at a time in float64 from copies of
    their weights (three layers, ReLU), and the tanh-Gaussian log-density written out per dimension."""

    def __init__(self, agent):
        self.w = [p.detach().clone().double() for p in agent.critic.parameters()]
        self.actor = {k: v.detach().clone().double() for k, v in agent.actor.state_dict().items()}
        self.m, self.act_dim = agent.max_action, agent.act_dim

    def q(self, k: int, s: torch.Tensor, a: torch.Tensor) -> float:
        x = torch.cat([s, a])
        for layer in range(3):
            x = x @ self.w[2 * layer][k] + self.w[2 * layer + 1][k, 0]
            x = torch.relu(x) if layer < 2 else x
        return x.item()

    def policy_sample(self, s: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, float]:
        p, A = self.actor, self.act_dim
        x = torch.relu(p["net.0.weight"] @ s + p["net.0.bias"])
        x = torch.relu(p["net.2.weight"] @ x + p["net.2.bias"])
        out = p["net.4.weight"] @ x + p["net.4.bias"]
        mean = out[:A]
        log_std = (p["log_std_multiplier"] * out[A:] + p["log_std_offset"]).clamp(-20, 2)
        u = mean + log_std.exp() * eps
        log_p = sum(-0.5 * ((u[i] - mean[i]) / log_std[i].exp()) ** 2 - log_std[i] - 0.5 * math.log(2 * math.pi)
                    - math.log(1 - math.tanh(u[i]) ** 2) - math.log(self.m) for i in range(A))
        return self.m * torch.tanh(u), float(log_p)


@pytest.mark.parametrize("calibrate", [True, False])
def test_bound_holds_on_every_pushed_down_policy_action(calibrate, monkeypatch):
    """Every Q-value of a policy action (from pi(.|s) and pi(.|s'), scored at s) that enters the push-down's
    logsumexp is >= G of its transition, and equals max(Q, G) recomputed by hand; the uniform actions stay
    unbounded; a row with G = -inf (an unfinished online episode) is not bounded; train/cql_gap is the hand
    computation's gap and train/bound_rate its share of policy Q-values below G. Without calibration the same
    values enter unbounded (CQL). G is set between the policy actions' Q-values, so about half are raised."""
    spec = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)
    torch.manual_seed(0)
    agent = cal_ql.Agent(tiny_config(calibrate=calibrate), spec, torch.device("cpu"))
    hand = HandNetworks(agent)
    n, B, A, m = 3, 6, 2, 2.0
    batch = random_batch(spec, B)
    torch.manual_seed(123)  # the update draws, in order: pi(.|s) (1 + n), pi(.|s') (n backup + n), uniform
    eps_s, eps_next, uniform = torch.randn(B, 1 + n, A), torch.randn(B, 2 * n, A), torch.rand(B, n, A)
    uniform = ((2 * uniform - 1) * m).double()
    q_hand, q_data, q_uniform = {}, {}, {}  # q_hand[k, b]: [(Q, log p)] of the 2n policy actions, s' ones first
    for b in range(B):
        s = batch["obs"][b].double()
        samples = ([hand.policy_sample(batch["next_obs"][b].double(), eps_next[b, n + j].double()) for j in range(n)]
                   + [hand.policy_sample(s, eps_s[b, 1 + j].double()) for j in range(n)])
        for k in range(2):
            q_hand[k, b] = [(hand.q(k, s, a), log_p) for a, log_p in samples]
            q_data[k, b] = hand.q(k, s, batch["actions"][b].double())
            q_uniform[k, b] = [hand.q(k, s, uniform[b, j]) for j in range(n)]
    bound = [float(np.median([q for k in range(2) for q, _ in q_hand[k, b]])) for b in range(B)]
    bound[-1] = -math.inf
    batch["returns_to_go"] = torch.tensor(bound, dtype=torch.float32)

    entering = []
    real_logsumexp = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp",
                        lambda x, dim: entering.append(x.detach().clone()) or real_logsumexp(x, dim))
    torch.manual_seed(123)
    logs = agent.update(batch)
    assert len(entering) == 1  # the push-down's logsumexp: (critics, states, 3n) of Q - log p
    weighted = entering[0].double()

    raised, gaps, below = 0, [], []
    for k in range(2):
        for b in range(B):
            for j, (q, log_p) in enumerate(q_hand[k, b]):
                q_in = weighted[k, b, n + j].item() + log_p  # what entered, with its importance weight undone
                expected = max(q, bound[b]) if calibrate else q
                assert q_in == pytest.approx(expected, rel=1e-4, abs=1e-4), (k, b, j)
                if calibrate:
                    assert q_in >= bound[b] - 1e-4
                raised += q < bound[b]
                below.append(q < bound[b])
            for j, q in enumerate(q_uniform[k, b]):  # the uniform actions: never bounded
                assert weighted[k, b, j].item() - A * math.log(2 * m) == pytest.approx(q, rel=1e-4, abs=1e-4)
            terms = ([q + A * math.log(2 * m) for q in q_uniform[k, b]]
                     + [(max(q, bound[b]) if calibrate else q) - log_p for q, log_p in q_hand[k, b]])
            gaps.append(math.log(sum(math.exp(t) for t in terms)) - q_data[k, b])
    assert 0.3 * 2 * B * 2 * n < raised < 2 * B * 2 * n  # the bound was active for many, not all
    assert not any(q < bound[-1] for k in range(2) for q, _ in q_hand[k, B - 1])  # -inf bounds nothing
    assert logs["train/cql_gap"].item() == pytest.approx(float(np.mean(gaps)), rel=1e-4, abs=1e-4)
    assert logs["train/bound_rate"].item() == pytest.approx(float(np.mean(below)), abs=1e-6)


def test_lagrange_multiplier_starts_at_e_and_moves_towards_the_target_gap():
    """alpha' = exp(1) at the first step (the authors' log alpha' = 1); dual descent lowers it when the gap is
    below tau and raises it above."""
    spec = DataSpec(obs_dim=3, act_dim=2, max_action=1.0, discrete=False)
    for gap, direction in ((1e4, -1), (-1e4, +1)):
        torch.manual_seed(0)
        agent = cal_ql.Agent(tiny_config(lagrange=True, target_action_gap=gap), spec, torch.device("cpu"))
        logs = agent.update(random_batch(spec, 8))
        assert logs["train/lagrange_alpha"].item() == pytest.approx(math.e, rel=1e-6)
        assert np.sign(agent.lagrange_log_alpha.item() - 1.0) == direction


# --- returns-to-go ---------------------------------------------------------------------------------------------

def test_returns_to_go_of_a_dense_episode_by_hand():
    """Two episodes back to back, gamma 0.5: each summed to its own end, never across, never bootstrapped."""
    rewards = np.array([1.0, 2.0, 3.0, 4.0, -2.0], np.float32)
    got = cal_ql.monte_carlo_returns(rewards, [3, 2], gamma=0.5)
    np.testing.assert_allclose(got, [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3, 4 + 0.5 * -2, -2], rtol=1e-6)


def test_returns_to_go_of_sparse_episodes_by_hand():
    """Antmaze's rewards 10 r - 5, gamma 0.9: a failed episode (every reward r_neg' = -5) gets -5 / 0.1 = -50
    at every step; an episode that reached the goal once and left it is summed as a dense one (the authors'
    rule "all rewards equal r_neg"; CORL's "last reward equals r_neg" would call it failed); one ending at
    the goal likewise; the dense rule would give the failed episode -5 (1 - 0.9^(T - t)) / 0.1 instead."""
    failed, touched, succeeded = [-5.0] * 4, [-5.0, 5.0, -5.0], [-5.0, -5.0, 5.0]
    rewards = np.array(failed + touched + succeeded, np.float32)
    got = cal_ql.monte_carlo_returns(rewards, [4, 3, 3], gamma=0.9, failure_reward=-5.0)
    np.testing.assert_allclose(got[:4], [-50.0] * 4, rtol=1e-6)
    np.testing.assert_allclose(got[4:7], [-5 + 0.9 * 5 + 0.81 * -5, 5 + 0.9 * -5, -5], rtol=1e-6)
    np.testing.assert_allclose(got[7:], [-5 - 0.9 * 5 + 0.81 * 5, -5 + 0.9 * 5, 5], rtol=1e-6)
    dense = cal_ql.monte_carlo_returns(rewards, [4, 3, 3], gamma=0.9)
    np.testing.assert_allclose(dense[:4], [-5 * (1 - 0.9 ** (4 - t)) / 0.1 for t in range(4)], rtol=1e-6)
    # the config's r_neg is the raw failure reward, transformed as the rewards are: 10 * 0 - 5
    config = apply_dataset_settings(cal_ql.Config(env="antmaze-large-diverse-v2"), cal_ql.DATASET_SETTINGS)
    assert cal_ql.transformed_failure_reward(config) == -5.0
    assert cal_ql.transformed_failure_reward(tiny_config()) is None


def test_online_episodes_get_the_sparse_rule_when_they_end():
    """The online phase asks the file for an ended episode's G: with the sparse rule an episode whose every reward
    was r_neg' gets r_neg' / (1 - gamma) at every step; one that touched the goal gets the dense sum."""
    config = apply_dataset_settings(cal_ql.Config(env="antmaze-large-diverse-v2"), cal_ql.DATASET_SETTINGS)
    returns_to_go = cal_ql.online_returns_to_go(config)  # gamma 0.99, r_neg' = -5
    failed = returns_to_go(np.array([-5.0, -5.0, -5.0]), np.zeros(3))
    np.testing.assert_allclose(failed, [-500.0] * 3, rtol=1e-6)
    touched = returns_to_go(np.array([1.0, -5.0, -5.0, -5.0]), np.zeros(4))
    g3, g2 = -5.0, -5.0 + 0.99 * -5.0
    g1 = -5.0 + 0.99 * g2
    np.testing.assert_allclose(touched, [1.0 + 0.99 * g1, g1, g2, g3], rtol=1e-6)


def test_offline_rows_carry_the_discounted_returns_to_go(pendulum_mixed_id):
    """On the dense pendulum set the sampler's G is the dataset's own discounted return-to-go
    (common.datasets' `transitions(returns_to_go_gamma=...)`), rewards untransformed."""
    dataset = load_dataset(pendulum_mixed_id)
    config = apply_dataset_settings(tiny_config(env=pendulum_mixed_id, gamma=0.97), cal_ql.DATASET_SETTINGS)
    arrays, _ = cal_ql.offline_arrays(dataset, config)
    expected = dataset.transitions(returns_to_go_gamma=0.97)
    np.testing.assert_allclose(arrays["returns_to_go"], expected["returns_to_go"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(arrays["rewards"], expected["rewards"])


# --- settings and the switch --------------------------------------------------------------------------------------

def test_dataset_settings_are_the_published_ones():
    for env in ("antmaze-medium-diverse-v2", "D4RL/antmaze/large-play-v1"):  # the authors' run_antmaze.sh
        c = apply_dataset_settings(cal_ql.Config(env=env), cal_ql.DATASET_SETTINGS)
        assert (c.cql_alpha, c.lagrange, c.target_action_gap, c.sparse_reward, c.reward_scale, c.reward_bias,
                c.max_steps) == (5.0, True, 0.8, True, 10.0, -5.0, 1_000_000), env
    for env in ("pen-cloned-v1", "D4RL/relocate/cloned-v2"):  # CORL's cloned_v1.yaml
        c = apply_dataset_settings(cal_ql.Config(env=env), cal_ql.DATASET_SETTINGS)
        assert (c.cql_alpha, c.lagrange, c.sparse_reward, c.reward_scale, c.cql_clip_diff_min) == \
            (1.0, False, False, 1.0, -200.0), env
    c = cal_ql.Config()
    assert (c.online_mix, c.online_calibration, c.max_target_backup, c.policy_lr, c.critic_lr, c.normalize_obs) == \
        (0.5, True, True, 1e-4, 3e-4, False)


def test_compiled_update_equals_eager_across_the_switch(monkeypatch):
    """The switch to fine-tuning (alpha 5 -> 2, CORL's calibration off) inside a compiled update: the compiled
    agent (aot_eager) takes the same numbers as the eager one before and after it, and the state keeps it."""
    spec = DataSpec(obs_dim=3, act_dim=2, max_action=1.0, discrete=False)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": "aot_eager"}))
    agents = []
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        torch._dynamo.reset()
        for compiled in (False, True):
            torch.manual_seed(0)
            agents.append(cal_ql.Agent(tiny_config(compile=compiled, lagrange=True, online_cql_alpha=2.0,
                                                   online_calibration=False), spec, torch.device("cpu")))
        logs = [[], []]
        for step in range(4):
            if step == 2:
                for agent in agents:
                    agent.start_online()
            batch = random_batch(spec, 8, seed=step)
            batch["returns_to_go"] = torch.randn(8)
            for agent, out in zip(agents, logs):
                torch.manual_seed(100 + step)
                out.append({k: v.detach().clone() for k, v in agent.update(batch).items()})
    for a, b in zip(*logs):
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert logs[0][3]["train/cql_alpha"] != logs[0][1]["train/cql_alpha"]  # alpha' alpha with alpha 2 now
    eager, compiled = (agent.state_dict() for agent in agents)
    assert eager["calibrated"] is False and eager["cql_alpha"].item() == 2.0
    for net in ("actor", "critic", "target_critic"):
        for key in eager[net]:
            torch.testing.assert_close(compiled[net][key], eager[net][key], rtol=1e-4, atol=1e-5)
    clone = cal_ql.Agent(tiny_config(), spec, torch.device("cpu"))
    clone.load_state_dict(agents[0].state_dict())  # a resumed run keeps the switched state: no second switch
    assert clone.calibrated is False and clone.cql_alpha.item() == 2.0


# --- runs --------------------------------------------------------------------------------------------------------

SMALL = dict(actor_hidden_dims=(32, 32), critic_hidden_dims=(32, 32), batch_size=32, cql_num_samples=2,
             eval_episodes=2, log_every=50, eval_every=100)




@pytest.mark.parametrize("online_mix", [None, 0.5])
def test_resume_mid_online_equals_an_uninterrupted_run(online_mix, pendulum_mixed_id, tmp_path):
    """Killed 150 env steps into the online phase (mid-episode), resumed: the same weights, temperatures,
    buffer (returns-to-go of the finished episodes included) and metrics as a run that never stopped."""
    kw = dict(SMALL, online_mix=online_mix, max_steps=100)
    straight = cal_ql.train(run_config(cal_ql.Config, pendulum_mixed_id, tmp_path / "a", online_steps=450, **kw))
    first = cal_ql.train(run_config(cal_ql.Config, pendulum_mixed_id, tmp_path / "b", online_steps=150, **kw))
    resumed = cal_ql.train(run_config(cal_ql.Config, pendulum_mixed_id, tmp_path / "b", online_steps=450,
                                      resume=first["run_dir"], **kw))
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ["actor", "critic", "target_critic"])
    assert torch.equal(a["log_entropy_alpha"], b["log_entropy_alpha"]) and a["step"] == b["step"] == 550
    buffer = assert_same_online_phase(straight, resumed, rows=450)
    finished = torch.isfinite(buffer["returns_to_go"])
    assert 400 <= int(finished.sum()) < 450  # two finished episodes carry their G, the running one -inf
    rows = lambda d: [json.loads(line) for line in open(f"{d}/metrics.jsonl") if "train/bound_rate" in line]
    assert [r["train/bound_rate"] for r in rows(straight["run_dir"])] == \
        [r["train/bound_rate"] for r in rows(resumed["run_dir"])]
    assert straight["normalized_score_mean"] == resumed["normalized_score_mean"]
    assert straight["online_regret"] == resumed["online_regret"]


def test_fine_tuning_raises_the_pendulum_score_above_the_offline_phase(pendulum_mixed_id, tmp_path):
    """On the mixed pendulum set (15 expert and 45 random episodes) a short offline phase leaves Cal-QL's policy
    low; 2000 online env steps (10 episodes, each step one update on a half-online batch) raise the score well
    above the score at the switch."""
    summary = cal_ql.train(run_config(cal_ql.Config, pendulum_mixed_id, tmp_path, max_steps=1000, online_steps=2000,
                                      actor_hidden_dims=(64, 64), critic_hidden_dims=(64, 64), batch_size=128,
                                      cql_num_samples=4, policy_lr=1e-3, critic_lr=1e-3, tau=0.05, eval_every=1000))
    assert summary["normalized_score_mean"] > summary["offline_normalized_score_mean"] + 30, summary
    assert summary["online_episodes"] == 10 and 0 < summary["online_regret"] < 1


# --- bad input ------------------------------------------------------------------------------------------------

def test_bad_input_is_one_line(pendulum_mixed_id, cartpole_mixed_id, tmp_path):
    flags = ["--device", "cpu", "--runs-dir", str(tmp_path), "--no-download"]
    assert_one_line_error(run_algorithm_cli("cal_ql", "--env", pendulum_mixed_id, *flags, "--online-mix", "1.5"),
                          "--online-mix must lie in [0, 1]")
    assert_one_line_error(run_algorithm_cli("cal_ql", "--env", pendulum_mixed_id, *flags, "--gamma", "1.0",
                                            "--sparse-reward", "True"), "--gamma must lie in [0, 1)")
    assert_one_line_error(run_algorithm_cli("cal_ql", "--env", cartpole_mixed_id, *flags), "discrete actions")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())
