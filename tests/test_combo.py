"""COMBO: the regulariser (log-sum-exp over all 3n actions of a state, push-down on d_f, push-up on data only) and
the update against a hand computation, Q on model states ending below Q on dataset pairs, ensembles shared with
mopo.py, resume and determinism, bad input, and learning on a small pendulum set. The ensemble, its fit, the
termination rules and the rollouts are common/dynamics.py's: tests/test_dynamics.py."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from conftest import (assert_states_equal, behaviour_return, checkpoint_agent, load_algorithm, random_batch,
                      run_config, train_straight_and_resumed)

from common import dynamics, networks
from common.datasets import DataSpec
from common.errors import UserError
from common.runs import apply_dataset_settings

combo = load_algorithm("combo")
mopo = load_algorithm("mopo")

# a tiny ensemble and critic, for runs of a few seconds
TINY = dict(ensemble_size=3, num_elites=2, dynamics_hidden_dims=(32, 32), dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4),
            dynamics_min_epoch_steps=100, dynamics_max_epochs=4, dynamics_patience=2, hidden_dims=(32, 32),
            rollout_batch_size=200, rollout_length=3, rollout_every=50, cql_weight=1.0, real_ratio=0.5,
            cql_num_samples=4, eval_episodes=2)
SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)


# ---------------------------------------------------------------------------------------------------------
# The regulariser and the update
# ---------------------------------------------------------------------------------------------------------

def test_logsumexp_is_over_all_3n_actions_of_each_state():
    g = torch.Generator().manual_seed(0)
    critics, states, n = 2, 3, 4
    q_uniform, q_pi, q_next = (torch.randn(critics, states, n, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    log_pi, log_pi_next = (torch.randn(states, n, generator=g, dtype=torch.float64) for _ in range(2))
    log_uniform = math.log(0.25 ** 2)
    for temperature in (1.0, 0.5):
        got = combo.cql_logsumexp(q_uniform, q_pi, q_next, log_pi, log_pi_next, log_uniform, temperature)
        assert got.shape == (critics, states)
        for k in range(critics):
            for b in range(states):
                terms = ([q_uniform[k, b, j].item() - log_uniform for j in range(n)]
                         + [q_pi[k, b, j].item() - log_pi[b, j].item() for j in range(n)]
                         + [q_next[k, b, j].item() - log_pi_next[b, j].item() for j in range(n)])
                assert got[k, b].item() == pytest.approx(
                    temperature * math.log(sum(math.exp(t / temperature) for t in terms)), rel=1e-10)
    # OfflineRL-Kit's shape bug (log-sum-exp over the 3 proposals of each (state, sample), then the mean) gives
    # a different number: the fix is visible
    buggy = torch.logsumexp(torch.stack([q_pi - log_pi, q_next - log_pi_next, q_uniform - log_uniform], -1),
                            -1).mean(-1)
    assert not torch.allclose(buggy, combo.cql_logsumexp(q_uniform, q_pi, q_next, log_pi, log_pi_next, log_uniform))


def test_gap_pushes_down_on_every_state_of_d_f_and_up_on_dataset_pairs_only():
    logsumexp_q = torch.randn(2, 8, requires_grad=True)
    q_data = torch.randn(2, 8, requires_grad=True)
    gap = combo.conservative_gap(logsumexp_q, q_data, n_real=3)
    assert torch.allclose(gap, logsumexp_q.mean(1) - q_data[:, :3].mean(1))
    gap.sum().backward()
    assert torch.allclose(logsumexp_q.grad, torch.full((2, 8), 1 / 8))  # push-down: all 8 states (data + model)
    expected = torch.zeros(2, 8)
    expected[:, :3] = -1 / 3  # push-up: the 3 dataset pairs, never the model's
    assert torch.equal(q_data.grad, expected)


def _agent(**overrides) -> "combo.Agent":
    fields = dict(env="test/pendulum/mixed-v0", device="cpu", max_steps=1000, **{**TINY, **overrides})
    torch.manual_seed(0)
    return combo.Agent(combo.Config(**fields), SPEC, torch.device("cpu"))


def test_update_losses_match_a_hand_computation():
    agent = _agent(cql_weight=3.0, gamma=0.9)
    b = random_batch(16, 3, 2, 2.0, seed=1)
    n_real, n, cfg = 6, agent.config.cql_num_samples, agent.config
    critic, target_critic, actor = (copy.deepcopy(m) for m in (agent.critic, agent.target_critic, agent.actor))
    alpha = agent.log_entropy_alpha.exp().item()
    torch.manual_seed(5)
    logs = agent._update_impl(b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], n_real)
    torch.manual_seed(5)  # the same draws, in the update's order: pi at s, pi at s', uniform actions
    with torch.no_grad():
        def sample(obs):
            mean, log_std = actor(obs)
            u = mean.unsqueeze(1) + log_std.exp().unsqueeze(1) * torch.randn(16, n + 1, 2)
            return 2.0 * torch.tanh(u), networks.tanh_gaussian_log_prob(u, mean.unsqueeze(1), log_std.unsqueeze(1), 2.0)
        pi, log_pi = sample(b["obs"])
        pi_next, log_pi_next = sample(b["next_obs"])
        uniform = (2 * torch.rand(16, n, 2) - 1) * 2.0
        y = b["rewards"] + 0.9 * (1 - b["terminals"]) * target_critic(b["next_obs"], pi_next[:, 0]).min(0).values
        td, gaps = 0.0, []
        for k in range(2):
            q = lambda s, a: critic(s, a)[k]  # noqa: E731
            td = td + ((q(b["obs"], b["actions"]) - y) ** 2).mean()
            lse = []
            for i in range(16):
                s = b["obs"][i:i + 1].expand(n, 3)
                terms = torch.cat([q(s, uniform[i]) - math.log(1 / 16), q(s, pi_next[i, 1:]) - log_pi_next[i, 1:],
                                   q(s, pi[i, 1:]) - log_pi[i, 1:]])
                lse.append(torch.logsumexp(terms, 0))
            gaps.append(torch.stack(lse).mean() - q(b["obs"][:n_real], b["actions"][:n_real]).mean())
        critic_loss = td + 3.0 * sum(gaps)
        actor_loss = (alpha * log_pi[:, 0] - critic(b["obs"], pi[:, 0]).min(0).values).mean()
    assert torch.allclose(logs["train/td_loss"], td, rtol=1e-5)
    assert torch.allclose(logs["train/cql_gap"], torch.stack(gaps).mean(), rtol=1e-5)
    assert torch.allclose(logs["train/critic_loss"], critic_loss, rtol=1e-5)
    assert torch.allclose(logs["train/actor_loss"], actor_loss, rtol=1e-5)
    q_min = critic(b["obs"], b["actions"]).min(0).values
    assert torch.allclose(logs["train/q_model_minus_data"], q_min[n_real:].mean() - q_min[:n_real].mean())
    assert cfg.backup_entropy is False


def test_q_on_model_states_ends_below_q_on_dataset_pairs():
    # one fixed mixture: 64 dataset pairs near the origin and 64 model pairs away from it, the same rewards.
    # Without the regulariser both sit at the same value; with it Q on the model's pairs ends below.
    g = torch.Generator().manual_seed(0)
    real, model = random_batch(64, 3, 2, 2.0, seed=2), random_batch(64, 3, 2, 2.0, seed=3)
    model["obs"] = model["obs"] + 3.0
    batch = {k: torch.cat([real[k], model[k]]) for k in real}
    batch["rewards"] = torch.rand(128, generator=g)
    batch["terminals"] = torch.zeros(128)
    gaps = {}
    for beta in (0.0, 2.0):
        agent = _agent(cql_weight=beta, critic_lr=1e-3)
        for _ in range(300):
            logs = agent._update_impl(*(batch[k] for k in ("obs", "actions", "rewards", "next_obs", "terminals")), 64)
        gaps[beta] = float(logs["train/q_model_minus_data"])
    assert gaps[2.0] < -0.5 and gaps[2.0] < gaps[0.0] - 0.5, gaps


def test_q_data_is_q_on_the_dataset_rows_and_q_batch_the_mixture():
    # issue 20, item 5: train/q_data is Q on the dataset pairs, not the mean over the mixed batch
    agent = _agent(real_ratio=0.25)
    agent.model.buffer.add({**random_batch(40, 3, 2, 2.0, seed=4), "rewards": torch.full((40,), 7.0)})
    batch = random_batch(16, 3, 2, 2.0, seed=5)
    critic = copy.deepcopy(agent.critic)
    mixed = {}
    mix = agent.model.mix
    agent.model.mix = lambda b, n_real: mixed.setdefault("rows", mix(b, n_real))
    logs = agent.update(batch)
    obs, actions = mixed["rows"][:2]
    with torch.no_grad():
        q = critic(obs, actions).min(0).values  # the critics before the step, as the update logs them
    assert torch.equal(obs[:4], batch["obs"][:4])  # int(16 * 0.25) = 4 dataset rows first
    assert torch.allclose(logs["train/q_data"], q[:4].mean())
    assert torch.allclose(logs["train/q_batch"], q.mean())
    assert torch.allclose(logs["train/q_model"], q[4:].mean())
    assert torch.allclose(logs["train/q_model_minus_data"], q[4:].mean() - q[:4].mean())


def test_the_agent_state_is_tensors_and_plain_values():
    agent = _agent()
    agent.model.buffer.add(random_batch(40, 3, 2, 2.0, seed=4))
    agent.update(random_batch(16, 3, 2, 2.0, seed=5))
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    clone = _agent()
    clone.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(clone.model.buffer.table[:40], agent.model.buffer.table[:40])


def test_update_mixes_f_dataset_rows_with_model_rows():
    agent = _agent(real_ratio=0.25)
    rows = random_batch(40, 3, 2, 2.0, seed=4)
    agent.model.buffer.add({**rows, "rewards": torch.full((40,), 7.0)})  # model rows are recognisable by r = 7
    seen = {}
    agent._update = lambda obs, actions, rewards, next_obs, terminals, n_real: seen.update(rewards=rewards,
                                                                                          n_real=n_real) or {}
    batch = random_batch(16, 3, 2, 2.0, seed=5)
    agent.update(batch)
    assert seen["n_real"] == 4 and torch.equal(seen["rewards"][:4], batch["rewards"][:4])
    assert (seen["rewards"][4:] == 7.0).all() and len(seen["rewards"]) == 16


@pytest.mark.parametrize("env, h, beta", [
    ("hopper-medium-v2", 5, 5.0), ("local/walker2d/medium-replay-v0", 1, 0.5), ("mujoco/halfcheetah/medium-v0", 5, 0.5),
    ("local/hopper/medium-expert-v0", 5, 5.0), ("local/pendulum/medium-replay-v0", 5, 1.0)])
def test_dataset_settings_are_the_published_ones(env, h, beta):
    config = apply_dataset_settings(combo.Config(env=env), combo.DATASET_SETTINGS, quiet=True)
    assert (config.rollout_length, config.cql_weight, config.real_ratio) == (h, beta, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Runs: saved ensembles shared with mopo.py, resume, determinism, bad input, learning
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, pendulum_mixed_id) -> dict:
    """A short COMBO run that fits its own (tiny) ensemble on the mixed pendulum set: its summary."""
    return combo.train(run_config(combo.Config, pendulum_mixed_id, tmp_path_factory.mktemp("combo_fit"),
                                  max_steps=100, **TINY))


def test_an_ensemble_saved_by_combo_serves_mopo_and_back_bit_for_bit(fitted_run, pendulum_mixed_id, tmp_path):
    path = f"{fitted_run['run_dir']}/dynamics.pt"
    mopo_tiny = {k: v for k, v in TINY.items() if k not in ("cql_weight", "cql_num_samples", "real_ratio")}
    reused = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=20, dynamics=path,
                                   **mopo_tiny))
    in_combo, in_mopo = checkpoint_agent(fitted_run["run_dir"]), checkpoint_agent(reused["run_dir"])
    assert_states_equal(in_combo, in_mopo, ("dynamics",))
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], in_combo["dynamics"][k]) for k in saved["state_dict"])
    assert saved["dataset"] == "test/pendulum/mixed-v0" and len(saved["checksum"]) == 64
    rows = [json.loads(line) for line in open(f"{fitted_run['run_dir']}/metrics.jsonl")]
    assert "dynamics/holdout_mse_member_0" in rows[0] and "dynamics/elite_0" in rows[0]
    logged = [r for r in rows if "train/q_model_minus_data" in r]
    assert logged and all(k in logged[-1] for k in ("train/rollout_terminated_frac", "train/q_model", "train/q_data"))


def test_a_dynamics_file_from_another_dataset_is_refused(fitted_run, pendulum_expert_id, tmp_path):
    with pytest.raises(UserError, match="fitted on 'test/pendulum/mixed-v0'.*leave --dynamics out"):
        combo.train(run_config(combo.Config, pendulum_expert_id, tmp_path, max_steps=10,
                               dynamics=f"{fitted_run['run_dir']}/dynamics.pt", **TINY))
    assert not (tmp_path / "runs").exists()


def test_resume_continues_with_the_same_numbers(pendulum_mixed_id, fitted_run, tmp_path):
    straight, resumed, a, b = train_straight_and_resumed(
        combo, pendulum_mixed_id, tmp_path, 75, 150, dynamics=f"{fitted_run['run_dir']}/dynamics.pt",
        cosine_schedule=False, **TINY)
    assert_states_equal(a, b, ("actor", "critic", "target_critic", "dynamics"))
    assert torch.equal(a["model_buffer"]["rows"], b["model_buffer"]["rows"])
    assert straight["return_mean"] == resumed["return_mean"]


def test_a_run_killed_after_the_fit_resumes_without_refitting(pendulum_mixed_id, fitted_run, tmp_path, monkeypatch):
    original = combo.Agent.update

    def killed_at_step_60(self, batch):
        if self.step == 60:  # the fit and the step-50 checkpoint are on disk
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(combo.Agent, "update", killed_at_step_60)
    with pytest.raises(KeyboardInterrupt):
        combo.train(run_config(combo.Config, pendulum_mixed_id, tmp_path, max_steps=100, checkpoint_every=50, **TINY))
    monkeypatch.setattr(combo.Agent, "update", original)
    monkeypatch.setattr(dynamics, "fit_dynamics", lambda *a, **k: pytest.fail("the resumed run fitted again"))
    run_dir = next((tmp_path / "runs").glob("combo/*/*"))
    resumed = combo.train(run_config(combo.Config, pendulum_mixed_id, tmp_path, max_steps=100, resume=str(run_dir),
                                     **TINY))
    # the same run as the uninterrupted one that fitted the same ensemble
    assert_states_equal(checkpoint_agent(fitted_run["run_dir"]), checkpoint_agent(resumed["run_dir"]),
                        ("actor", "critic", "target_critic", "dynamics"))


def test_same_seed_same_run(pendulum_mixed_id, fitted_run, tmp_path):
    runs = [combo.train(run_config(combo.Config, pendulum_mixed_id, tmp_path / str(i), max_steps=60,
                                   dynamics=f"{fitted_run['run_dir']}/dynamics.pt", **TINY)) for i in range(2)]
    assert_states_equal(*(checkpoint_agent(r["run_dir"]) for r in runs), ("actor", "critic", "target_critic"))


def test_bad_input_is_refused_with_one_line(pendulum_no_reward_id, inverted_pendulum_random_id, pendulum_mixed_id,
                                            tmp_path):
    with pytest.raises(UserError, match="stores no rewards"):
        combo.train(run_config(combo.Config, pendulum_no_reward_id, tmp_path, **TINY))
    with pytest.raises(UserError, match="no termination rule for 'InvertedPendulum-v5'.*--termination learned"):
        combo.train(run_config(combo.Config, inverted_pendulum_random_id, tmp_path, **TINY))
    with pytest.raises(UserError, match="--real-ratio must lie in \\(0, 1\\)"):
        combo.train(run_config(combo.Config, pendulum_mixed_id, tmp_path, **{**TINY, "real_ratio": 1.0}))
    assert not (tmp_path / "runs").exists()


def test_combo_beats_the_behaviour_policy_on_mixed_data(pendulum_mixed_id, tmp_path):
    # 15 expert + 45 uniform-random Pendulum episodes (behaviour return about -955)
    summary = combo.train(run_config(combo.Config, pendulum_mixed_id, tmp_path, max_steps=3000,
                                     **{**TINY, "eval_episodes": 5, "hidden_dims": (64, 64),
                                        "dynamics_hidden_dims": (64, 64), "dynamics_min_epoch_steps": 500,
                                        "dynamics_max_epochs": 6, "rollout_batch_size": 1000, "rollout_length": 5,
                                        "rollout_every": 250, "actor_lr": 1e-3, "critic_lr": 1e-3,
                                        "alpha_lr": 1e-3}))
    behaviour = behaviour_return(pendulum_mixed_id)
    assert summary["return_mean"] > behaviour + 300, (summary["return_mean"], behaviour)
    # the regulariser's claim, at the end of training: Q on the model's pairs below Q on the dataset's
    rows = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl") if "train/q_model" in line]
    assert rows[-1]["train/q_model_minus_data"] < 0, rows[-1]
