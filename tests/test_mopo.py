"""MOPO: the uncertainty u(s, a) grows off the data, the pessimistic reward r~ = r - lambda u, saved ensembles,
resume (also mid-fit) and determinism, bad input, and learning on a small pendulum set. The ensemble, its fit,
the termination rules and the rollouts are common/dynamics.py's: tests/test_dynamics.py."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (ROOT, assert_one_line_error, assert_states_equal, behaviour_return, checkpoint_agent,
                      load_algorithm, random_batch, run_algorithm_cli, run_config, train_straight_and_resumed)
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from common import dynamics
from common.datasets import DataSpec, load_dataset
from common.errors import UserError

mopo = load_algorithm("mopo")

# a tiny ensemble and SAC, for runs of a few seconds
TINY = dict(ensemble_size=3, num_elites=2, dynamics_hidden_dims=(32, 32), dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4),
            dynamics_min_epoch_steps=100, dynamics_max_epochs=4, dynamics_patience=2, hidden_dims=(32, 32),
            rollout_batch_size=200, rollout_length=3, rollout_every=50, penalty_coef=1.0, eval_episodes=2)
SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)  # an action bound that is not 1


def _agent(**overrides) -> "mopo.Agent":
    fields = dict(env="test/pendulum/mixed-v0", device="cpu", max_steps=1000, **{**TINY, **overrides})
    torch.manual_seed(0)
    return mopo.Agent(mopo.Config(**fields), SPEC, torch.device("cpu"))


def _squashed_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor, max_action: float):
    """log pi(a|s) of a = max_action tanh(u), u ~ N(mean, exp(log_std)^2), by the change of variables written
    out here in float64: log N(u) - sum log |da/du|, da/du = max_action (1 - tanh(u)^2)."""
    mean, std, u = mean.double(), log_std.double().exp(), u.double()
    jacobian = max_action * (1.0 - torch.tanh(u) ** 2)
    return (Normal(mean, std).log_prob(u) - torch.log(jacobian)).sum(-1)


# ---------------------------------------------------------------------------------------------------------
# SAC's update (issue 20, items 3, 5 and 8)
# ---------------------------------------------------------------------------------------------------------

def test_log_pi_is_the_density_of_the_action_on_its_box():
    # a = 2 tanh(u) on [-2, 2]^2: log pi(a|s) must include -log 2 per dimension, else the entropy target -|A|
    # is off by |A| log 2 nats. Checked against torch.distributions (tanh, then the scale, as transforms).
    agent = _agent()
    obs = torch.randn(512, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        actions, log_prob = agent.actor.sample(obs)
        mean, log_std = agent.actor.net(obs).chunk(2, dim=-1)
        dist = TransformedDistribution(Normal(mean.double(), log_std.clamp(-20, 2).exp().double()),
                                       [TanhTransform(), AffineTransform(0.0, 2.0)])
    inside = (actions.abs() < 1.9).all(-1)  # away from the bound, where atanh of a float32 action is exact enough
    assert inside.float().mean() > 0.5
    expected = dist.log_prob(actions.double()).sum(-1)
    assert torch.allclose(log_prob.double()[inside], expected[inside], atol=1e-3), \
        float((log_prob.double() - expected)[inside].mean())


def test_critic_target_carries_the_entropy_term():
    # y = r~ + gamma (1 - d) ( min_i Q'_i(s', a') - alpha log pi(a'|s') ),  a' ~ pi(.|s'), checked by hand
    agent = _agent(gamma=0.9)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.5))
    b = random_batch(16, 3, 2, 2.0, seed=1)
    critic, critic_target, actor = (copy.deepcopy(m) for m in (agent.critic, agent.critic_target, agent.actor))
    torch.manual_seed(5)
    logs = agent._update_impl(b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], 16)
    torch.manual_seed(5)  # the update's first draw: a' ~ pi(.|s'), u = mu + sigma eps
    with torch.no_grad():
        mean, log_std = actor.net(b["next_obs"]).chunk(2, dim=-1)
        log_std = log_std.clamp(-20, 2)
        u = mean + log_std.exp() * torch.randn_like(mean)
        next_actions = 2.0 * torch.tanh(u)
        log_pi = _squashed_gaussian_log_prob(mean, log_std, u, 2.0).float()
        soft_q = critic_target(b["next_obs"], next_actions).min(0).values - 0.5 * log_pi
        y = b["rewards"] + 0.9 * (1 - b["terminals"]) * soft_q
        expected = ((critic(b["obs"], b["actions"]) - y) ** 2).mean(1).sum()
        y_without_entropy = b["rewards"] + 0.9 * (1 - b["terminals"]) * (soft_q + 0.5 * log_pi)
        without_entropy = ((critic(b["obs"], b["actions"]) - y_without_entropy) ** 2).mean(1).sum()
    assert torch.allclose(logs["train/critic_loss"], expected, rtol=1e-4), (logs["train/critic_loss"], expected)
    assert not torch.allclose(without_entropy, expected, rtol=1e-2)  # the term is large enough to be seen


@pytest.mark.parametrize("target_entropy", [20.0, -20.0])
def test_temperature_rises_when_the_entropy_is_below_its_target(target_entropy):
    # J(alpha) = E_a~pi [ -alpha (log pi(a|s) + H-bar) ]: dJ/d alpha = H(pi) - H-bar, so gradient descent raises
    # alpha while the policy's entropy is below the target H-bar, and lowers it above; Adam's first step moves
    # log alpha by its learning rate
    agent = _agent(target_entropy=target_entropy, alpha_lr=1e-3)
    b = random_batch(16, 3, 2, 2.0, seed=2)
    before = float(agent.log_alpha.detach())
    logs = agent._update_impl(b["obs"], b["actions"], b["rewards"], b["next_obs"], b["terminals"], 16)
    entropy = float(logs["train/entropy"])  # -E log pi
    assert -20.0 < entropy < 20.0
    expected_sign = 1.0 if entropy < target_entropy else -1.0
    assert float(agent.log_alpha.detach()) - before == pytest.approx(expected_sign * 1e-3, rel=1e-3)


def test_q_data_is_q_on_the_dataset_rows_and_q_batch_the_mixture():
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


def test_the_agent_state_is_tensors_and_plain_values():
    agent = _agent()
    agent.model.buffer.add(random_batch(40, 3, 2, 2.0, seed=4))
    agent.update(random_batch(16, 3, 2, 2.0, seed=5))
    buffer = io.BytesIO()
    torch.save(agent.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    clone = _agent()
    clone.load_state_dict(state)
    assert torch.equal(clone.model.buffer.table[:40], agent.model.buffer.table[:40])


# ---------------------------------------------------------------------------------------------------------
# The uncertainty u(s, a) and the pessimistic reward (the ensemble itself: tests/test_dynamics.py)
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pendulum_ensemble(pendulum_expert_id):
    """A 4-member ensemble fitted on the scripted pendulum expert's data (10k steps of deterministic physics
    along the swing-up), and random states and actions anywhere in the observation and action boxes."""
    data = {k: torch.as_tensor(v) for k, v in load_dataset(pendulum_expert_id).transitions().items()}
    config = mopo.Config(ensemble_size=4, num_elites=2, dynamics_hidden_dims=(64, 64),
                         dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4), dynamics_min_epoch_steps=500,
                         dynamics_max_epochs=6, dynamics_patience=3)
    torch.manual_seed(0)
    ensemble = dynamics.make_dynamics(config, DataSpec(3, 1, 2.0, False))
    dynamics.fit_dynamics(ensemble, data, config, seed=0)
    g = torch.Generator().manual_seed(0)
    theta, speed = torch.rand(2000, generator=g) * 2 * np.pi, torch.rand(2000, generator=g) * 16 - 8
    anywhere = {"obs": torch.stack([theta.cos(), theta.sin(), speed], 1),
                "actions": torch.rand(2000, 1, generator=g) * 4 - 2}
    return ensemble, data, anywhere


@torch.no_grad()
def test_uncertainty_is_larger_off_the_data_than_on_it(pendulum_ensemble):
    ensemble, data, anywhere = pendulum_ensemble
    u_on = mopo.uncertainty(ensemble(torch.cat([data["obs"][:2000], data["actions"][:2000]], -1))[1])
    _, logvar, _ = ensemble(torch.cat([anywhere["obs"], anywhere["actions"]], -1))
    u_off = mopo.uncertainty(logvar)
    assert float(u_off.mean()) > 2.0 * float(u_on.mean()), (float(u_on.mean()), float(u_off.mean()))
    # u is the max over all 4 members of ||sigma_i||_2 over (ds, r), computed here member by member
    by_hand = torch.stack([torch.exp(0.5 * logvar[i]).pow(2).sum(-1).sqrt() for i in range(4)]).max(0).values
    assert torch.allclose(u_off, by_hand)


def test_penalty_lowers_the_model_reward_most_where_members_disagree(pendulum_ensemble):
    ensemble, data, anywhere = pendulum_ensemble
    obs = torch.cat([data["obs"][:2000], anywhere["obs"]])  # on and off the data
    actions = torch.cat([data["actions"][:2000], anywhere["actions"]])
    rewards = {}
    for lam in (0.0, 2.0):
        torch.manual_seed(7)  # the same elites and noise draws for both
        out, stats = mopo.pessimistic_rollouts(lambda s: actions, ensemble, dynamics.never_terminates(), obs, 1, lam)
        rewards[lam] = out["rewards"]
    drop = rewards[0.0] - rewards[2.0]
    with torch.no_grad():
        mean, logvar, _ = ensemble(torch.cat([obs, actions], -1))
    assert torch.allclose(drop, 2.0 * mopo.uncertainty(logvar), atol=1e-5)  # r~ = r - lambda u exactly
    assert float(stats["train/model_reward_mean"]) == pytest.approx(float(rewards[2.0].mean()))  # the mean of r~
    # disagreement of the members' mean predictions: where it is largest, the reward drops most
    order = torch.argsort(mean.std(0).norm(dim=-1))
    assert float(drop[order[-400:]].mean()) > 3.0 * float(drop[order[:400]].mean())


# ---------------------------------------------------------------------------------------------------------
# Saved ensembles, runs, resume
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, pendulum_mixed_id) -> dict:
    """A short MOPO run that fits its own (tiny) ensemble on the mixed pendulum set: its summary."""
    tmp = tmp_path_factory.mktemp("mopo_fit")
    return mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp, max_steps=100, **TINY))


def test_saved_ensemble_loads_back_bit_for_bit(fitted_run, pendulum_mixed_id):
    path = f"{fitted_run['run_dir']}/dynamics.pt"
    dataset = load_dataset(pendulum_mixed_id)
    config = mopo.Config(**TINY)
    saved = dynamics.load_dynamics_file(path, dataset.minari_id, dynamics.data_checksum(dataset.transitions()),
                                        dynamics.dynamics_architecture(config, dataset.spec))
    in_run = checkpoint_agent(fitted_run["run_dir"])["dynamics"]
    assert saved["state_dict"].keys() == in_run.keys()
    assert all(torch.equal(saved["state_dict"][k], in_run[k]) for k in in_run)
    from_file, from_run = dynamics.make_dynamics(config, dataset.spec), dynamics.make_dynamics(config, dataset.spec)
    from_file.load_state_dict(saved["state_dict"])
    from_run.load_state_dict(in_run)
    x = torch.randn(64, 4)
    assert all(torch.equal(a, b) for a, b in zip(from_file(x)[:2], from_run(x)[:2]))
    report = saved["report"]
    assert len(report["holdout_mse"]) == 3 and len(report["elites"]) == 2 and report["train_seconds"] > 0
    assert fitted_run["dynamics"]["holdout_mse"] == report["holdout_mse"]
    rows = [json.loads(line) for line in open(f"{fitted_run['run_dir']}/metrics.jsonl")]
    assert "dynamics/holdout_mse_member_2" in rows[0] and "dynamics/elite_1" in rows[0]
    logged = [r for r in rows if "train/model_penalty_mean" in r]
    assert logged and all(r["train/model_penalty_mean"] > 0 for r in logged)
    assert all(k in logged[-1] for k in ("train/rollout_terminated_frac", "train/model_buffer_size"))


def test_reusing_the_saved_ensemble_gives_the_same_run(fitted_run, pendulum_mixed_id, tmp_path):
    # fitting draws from its own generator, so a run that loads the file is the run that fitted it
    reused = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=100,
                                   dynamics=f"{fitted_run['run_dir']}/dynamics.pt", **TINY))
    assert_states_equal(checkpoint_agent(fitted_run["run_dir"]), checkpoint_agent(reused["run_dir"]),
                        ("actor", "critic", "critic_target", "dynamics"))
    assert reused["return_mean"] == fitted_run["return_mean"]


def test_a_dynamics_file_from_another_dataset_or_shape_is_refused(fitted_run, pendulum_expert_id, pendulum_mixed_id,
                                                                   tmp_path):
    path = f"{fitted_run['run_dir']}/dynamics.pt"
    with pytest.raises(UserError, match=r"fitted on 'test/pendulum/mixed-v0' .* not on this run's "
                                        r"'test/pendulum/expert-v0'"):
        mopo.train(run_config(mopo.Config, pendulum_expert_id, tmp_path, max_steps=10, dynamics=path, **TINY))
    with pytest.raises(UserError, match="different ensemble: ensemble_size 3 \\(this run: 5\\)"):
        mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=10, dynamics=path,
                              **{**TINY, "ensemble_size": 5}))
    with pytest.raises(UserError, match="no such file"):
        mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=10, dynamics=str(tmp_path / "x"),
                              **TINY))
    assert not (tmp_path / "runs").exists()  # refused before any run folder is made
    # the command line: one line, exit status 2
    result = subprocess.run([sys.executable, str(ROOT / "algorithms" / "mopo.py"), "--env", pendulum_expert_id,
                             "--dynamics", path, "--no-download", "--runs-dir", str(tmp_path / "cli")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --dynamics")
    assert "Traceback" not in result.stderr


def test_a_resumed_run_needs_no_dynamics_file_once_its_checkpoint_holds_the_ensemble(fitted_run, pendulum_mixed_id,
                                                                                      tmp_path, monkeypatch):
    # issue 20, item 12: a run made with a relative --dynamics path, whose file then moves, still resumes
    monkeypatch.chdir(tmp_path)
    shutil.copy(f"{fitted_run['run_dir']}/dynamics.pt", tmp_path / "dynamics.pt")
    first = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=50, dynamics="dynamics.pt",
                                  **TINY))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dynamics.pt").rename(tmp_path / "elsewhere" / "dynamics.pt")
    resumed = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=100, resume=first["run_dir"],
                                    **TINY))
    assert resumed["run_dir"] == first["run_dir"]
    assert_states_equal(checkpoint_agent(fitted_run["run_dir"]), checkpoint_agent(resumed["run_dir"]), ("dynamics",))


class WritesAFile:
    """A pickled object whose unpickling would create a file: what a crafted --dynamics file could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_crafted_dynamics_file_is_refused_without_running_code(pendulum_mixed_id, tmp_path):
    # issue 20, item 2: --dynamics loads with weights_only=True, so nothing in the file runs
    marker = tmp_path / "written-by-the-file"
    crafted = tmp_path / "dynamics.pt"
    torch.save({"format": dynamics.DYNAMICS_FORMAT, "payload": WritesAFile(str(marker))}, crafted)
    with pytest.raises(UserError, match="--dynamics"):
        mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=10, dynamics=str(crafted), **TINY))
    assert not marker.exists()
    proc = run_algorithm_cli("mopo", "--env", pendulum_mixed_id, "--dynamics", str(crafted), "--no-download",
                             "--runs-dir", str(tmp_path / "cli"))
    assert_one_line_error(proc, "--dynamics")
    assert not marker.exists() and not (tmp_path / "cli").exists()


def test_resume_continues_with_the_same_numbers(pendulum_mixed_id, fitted_run, tmp_path):
    # 175 + 175 steps, rollout rounds every 50: the resumed half starts between two rounds, the buffer carries over
    # (no cosine schedule: it spans max_steps, which the resumed run extends)
    straight, resumed, a, b = train_straight_and_resumed(
        mopo, pendulum_mixed_id, tmp_path, 175, 350, dynamics=f"{fitted_run['run_dir']}/dynamics.pt",
        cosine_schedule=False, **TINY)
    assert_states_equal(a, b, ("actor", "critic", "critic_target", "dynamics"))
    assert torch.equal(a["model_buffer"]["rows"], b["model_buffer"]["rows"])
    assert straight["return_mean"] == resumed["return_mean"]


def test_a_run_killed_while_fitting_or_after_resumes_without_refitting(pendulum_mixed_id, fitted_run, tmp_path,
                                                                       monkeypatch):
    original_update = dynamics.Progress.update
    monkeypatch.setattr(dynamics, "DYNAMICS_SAVE_SECONDS", 0.0)  # keep the fit's state after every epoch

    def killed_in_epoch_3(self, step):
        if self.name.startswith("dynamics") and step == 3:
            raise KeyboardInterrupt
        return original_update(self, step)

    monkeypatch.setattr(dynamics.Progress, "update", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=100, **TINY))
    monkeypatch.setattr(dynamics.Progress, "update", original_update)
    run_dir = next((tmp_path / "runs").glob("mopo/*/*"))
    assert (run_dir / "dynamics-partial.pt").is_file() and not (run_dir / "dynamics.pt").exists()
    # the resumed fit continues from epoch 2 and ends where the uninterrupted one (fitted_run) ended
    resumed = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=100, resume=str(run_dir),
                                    **TINY))
    assert_states_equal(checkpoint_agent(fitted_run["run_dir"]), checkpoint_agent(resumed["run_dir"]),
                        ("dynamics", "actor", "critic"))
    assert not (run_dir / "dynamics-partial.pt").exists()

    # killed after the fit: the resumed run never fits again
    def no_refit(*args, **kwargs):
        raise AssertionError("the resumed run fitted the ensemble again")

    monkeypatch.setattr(dynamics, "fit_dynamics", no_refit)
    extended = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=150, resume=str(run_dir),
                                     **TINY))
    assert extended["dynamics"]["holdout_mse"] == fitted_run["dynamics"]["holdout_mse"]


def test_same_seed_same_run_other_seed_other_run(pendulum_mixed_id, fitted_run, tmp_path):
    path = f"{fitted_run['run_dir']}/dynamics.pt"
    runs = [mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path / str(i), max_steps=60, seed=seed,
                                  dynamics=path, **TINY)) for i, seed in enumerate((3, 3, 4))]
    states = [checkpoint_agent(r["run_dir"]) for r in runs]
    assert_states_equal(states[0], states[1], ("actor", "critic", "critic_target"))
    assert not torch.equal(states[0]["actor"]["net.0.weight"], states[2]["actor"]["net.0.weight"])


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

def test_a_dataset_without_rewards_or_next_observations_is_refused(pendulum_no_reward_id, pendulum_mixed_id,
                                                                   tmp_path, monkeypatch):
    with pytest.raises(UserError, match="stores no rewards"):
        mopo.train(run_config(mopo.Config, pendulum_no_reward_id, tmp_path, **TINY))

    real_load = mopo.load_dataset

    def without_next_obs(name, download=True):
        dataset = real_load(name, download)
        transitions = dataset.transitions
        dataset.transitions = lambda *a, **k: {k2: v for k2, v in transitions(*a, **k).items() if k2 != "next_obs"}
        return dataset

    monkeypatch.setattr(mopo, "load_dataset", without_next_obs)
    with pytest.raises(UserError, match="has no next observations"):
        mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, **TINY))
    assert not (tmp_path / "runs").exists()


def test_an_env_without_a_rule_needs_the_learned_head(inverted_pendulum_random_id, tmp_path):
    # InvertedPendulum-v5 terminates (|angle| > 0.2) but has no rule here: refused unless the head is learned
    with pytest.raises(UserError, match="no termination rule for 'InvertedPendulum-v5'"):
        mopo.train(run_config(mopo.Config, inverted_pendulum_random_id, tmp_path, **TINY))
    summary = mopo.train(run_config(mopo.Config, inverted_pendulum_random_id, tmp_path, max_steps=50,
                                    termination="learned", **{**TINY, "dynamics_max_epochs": 10,
                                                               "dynamics_min_epoch_steps": 200,
                                                               "dynamics_patience": 3}))
    # the learned head predicts the dataset's terminations
    data = load_dataset(inverted_pendulum_random_id).transitions()
    saved = torch.load(f"{summary['run_dir']}/dynamics.pt", weights_only=True)
    ensemble = dynamics.make_dynamics(mopo.Config(**TINY, termination="learned"), DataSpec(4, 1, 3.0, False))
    ensemble.load_state_dict(saved["state_dict"])
    _, _, logit = ensemble(torch.cat([torch.as_tensor(data["obs"]), torch.as_tensor(data["actions"])], -1))
    predicted = (logit[ensemble.elites] > 0).float().mean(0) > 0.5
    truth = torch.as_tensor(data["terminals"]).bool()
    assert 0.05 < float(truth.float().mean()) < 0.5
    assert float((predicted == truth).float().mean()) > 0.9 and float(predicted[truth].float().mean()) > 0.6


# ---------------------------------------------------------------------------------------------------------
# Learning
# ---------------------------------------------------------------------------------------------------------

def test_mopo_beats_the_behaviour_policy_on_mixed_data(pendulum_mixed_id, tmp_path):
    # 15 expert + 45 uniform-random Pendulum episodes (behaviour return about -955): the model covers the
    # swing-up, and SAC in the model finds it
    summary = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=3000,
                                    **{**TINY, "eval_episodes": 5, "hidden_dims": (64, 64),
                                       "dynamics_hidden_dims": (64, 64),
                                       "dynamics_min_epoch_steps": 500, "dynamics_max_epochs": 6,
                                       "rollout_batch_size": 1000, "rollout_length": 5, "rollout_every": 250,
                                       "actor_lr": 1e-3, "critic_lr": 1e-3, "alpha_lr": 1e-3}))
    behaviour = behaviour_return(pendulum_mixed_id)
    assert summary["return_mean"] > behaviour + 300, (summary["return_mean"], behaviour)
