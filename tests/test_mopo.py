"""MOPO: the ensemble fits a known linear-Gaussian system, its uncertainty grows off the data, the penalty, the
termination rules against the envs' own step, rollouts that stop exactly at terminations, saved ensembles,
resume (also mid-fit) and determinism, bad input, and learning on a small pendulum set."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (ROOT, assert_states_equal, behaviour_return, checkpoint_agent, env_step_samples,
                      load_algorithm, run_config, train_straight_and_resumed)

from common.datasets import DataSpec, load_dataset
from common.errors import UserError

mopo = load_algorithm("mopo")

# a tiny ensemble and SAC, for runs of a few seconds
TINY = dict(ensemble_size=3, num_elites=2, dynamics_hidden_dims=(32, 32), dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4),
            dynamics_min_epoch_steps=100, dynamics_max_epochs=4, dynamics_patience=2, hidden_dims=(32, 32),
            rollout_batch_size=200, rollout_length=3, rollout_every=50, penalty_coef=1.0, eval_episodes=2)


# ---------------------------------------------------------------------------------------------------------
# The dynamics ensemble
# ---------------------------------------------------------------------------------------------------------

LINEAR_A = np.array([[0.9, 0.2], [-0.1, 0.8]])
LINEAR_B = np.array([[0.5], [-0.3]])
LINEAR_R = np.array([1.0, -0.5, 0.7])  # r = w . (s, a)
NOISE_STD = np.array([0.05, 0.2, 0.1])  # of s'_1, s'_2 and r


def linear_gaussian(n: int, seed: int, low: float = -1.0, high: float = 1.0):
    """s' = A s + B a + eps, r = w.(s, a) + eps_r with known noise: (data dict of tensors, true mean of (ds, r))."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(low, high, (n, 2))
    a = rng.uniform(low, high, (n, 1))
    mean_next = s @ LINEAR_A.T + a @ LINEAR_B.T
    mean_r = np.concatenate([s, a], 1) @ LINEAR_R
    noise = rng.standard_normal((n, 3)) * NOISE_STD
    data = {"obs": s, "actions": a, "next_obs": mean_next + noise[:, :2], "rewards": mean_r + noise[:, 2],
            "terminals": np.zeros(n)}
    true_mean = np.concatenate([mean_next - s, mean_r[:, None]], 1)
    return ({k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.items()},
            torch.as_tensor(true_mean, dtype=torch.float32))


@pytest.fixture(scope="module")
def linear_ensemble():
    """A 4-member ensemble fitted on 6000 transitions of the linear-Gaussian system (a few seconds)."""
    config = mopo.Config(ensemble_size=4, num_elites=3, dynamics_hidden_dims=(64, 64),
                         dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4), dynamics_min_epoch_steps=500,
                         dynamics_max_epochs=8, dynamics_patience=3)
    data, _ = linear_gaussian(6000, seed=0)
    torch.manual_seed(0)
    ensemble = mopo.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    report = mopo.fit_dynamics(ensemble, data, config, seed=0)
    return ensemble, report, config


def test_ensemble_fits_a_known_linear_gaussian_system(linear_ensemble):
    ensemble, report, _ = linear_ensemble
    data, true_mean = linear_gaussian(2000, seed=1, low=-0.8, high=0.8)  # fresh points inside the data's range
    mean, logvar, _ = ensemble(torch.cat([data["obs"], data["actions"]], -1))
    elites = ensemble.elites
    mean_error = (mean[elites] - true_mean).abs().mean((0, 1))
    predicted_std = torch.exp(0.5 * logvar[elites]).mean((0, 1))
    assert (mean_error < torch.tensor(NOISE_STD) * 0.25).all(), (mean_error, NOISE_STD)
    assert torch.allclose(predicted_std, torch.tensor(NOISE_STD, dtype=torch.float32), rtol=0.25), predicted_std
    # held-out MSE is the noise variance averaged over the three targets, and the elites are the best members
    assert np.mean(report["holdout_mse"]) == pytest.approx(np.mean(NOISE_STD ** 2), rel=0.3)
    assert sorted(report["elites"]) == sorted(np.argsort(report["holdout_mse"])[:3].tolist())


@pytest.fixture(scope="module")
def pendulum_ensemble(pendulum_expert_id):
    """A 4-member ensemble fitted on the scripted pendulum expert's data (10k steps of deterministic physics
    along the swing-up), and random states and actions anywhere in the observation and action boxes."""
    data = {k: torch.as_tensor(v) for k, v in load_dataset(pendulum_expert_id).transitions().items()}
    config = mopo.Config(ensemble_size=4, num_elites=2, dynamics_hidden_dims=(64, 64),
                         dynamics_weight_decay=(2.5e-5, 5e-5, 1e-4), dynamics_min_epoch_steps=500,
                         dynamics_max_epochs=6, dynamics_patience=3)
    torch.manual_seed(0)
    ensemble = mopo.make_dynamics(config, DataSpec(3, 1, 2.0, False))
    mopo.fit_dynamics(ensemble, data, config, seed=0)
    g = torch.Generator().manual_seed(0)
    theta, speed = torch.rand(2000, generator=g) * 2 * np.pi, torch.rand(2000, generator=g) * 16 - 8
    anywhere = {"obs": torch.stack([theta.cos(), theta.sin(), speed], 1),
                "actions": torch.rand(2000, 1, generator=g) * 4 - 2}
    return ensemble, data, anywhere


def test_uncertainty_is_larger_off_the_data_than_on_it(pendulum_ensemble):
    ensemble, data, anywhere = pendulum_ensemble
    u_on = ensemble.uncertainty(data["obs"][:2000], data["actions"][:2000])
    u_off = ensemble.uncertainty(anywhere["obs"], anywhere["actions"])
    assert float(u_off.mean()) > 2.0 * float(u_on.mean()), (float(u_on.mean()), float(u_off.mean()))
    # u is the max over members of ||sigma_i||_2 over (ds, r), computed here member by member
    _, logvar, _ = ensemble(torch.cat([anywhere["obs"], anywhere["actions"]], -1))
    by_hand = torch.stack([torch.exp(0.5 * logvar[i]).pow(2).sum(-1).sqrt() for i in range(4)]).max(0).values
    assert torch.allclose(u_off, by_hand)


def test_penalty_lowers_the_model_reward_most_where_members_disagree(pendulum_ensemble):
    ensemble, data, anywhere = pendulum_ensemble
    obs = torch.cat([data["obs"][:2000], anywhere["obs"]])  # on and off the data
    actions = torch.cat([data["actions"][:2000], anywhere["actions"]])
    rewards = {}
    for lam in (0.0, 2.0):
        torch.manual_seed(7)  # the same elites and noise draws for both
        out, _ = mopo.model_rollout(lambda s: actions, ensemble, mopo.never_terminates(), obs, 1, lam)
        rewards[lam] = out["rewards"]
    drop = rewards[0.0] - rewards[2.0]
    assert torch.allclose(drop, 2.0 * ensemble.uncertainty(obs, actions), atol=1e-5)  # r~ = r - lambda u exactly
    # disagreement of the members' mean predictions: where it is largest, the reward drops most
    mean, _, _ = ensemble(torch.cat([obs, actions], -1))
    order = torch.argsort(mean.std(0).norm(dim=-1))
    assert float(drop[order[-400:]].mean()) > 3.0 * float(drop[order[:400]].mean())


def test_loss_is_the_gaussian_nll_with_decay_and_bounds_by_hand():
    torch.manual_seed(0)
    config = mopo.Config(ensemble_size=2, num_elites=1, dynamics_hidden_dims=(8,), dynamics_weight_decay=(0.1, 0.2))
    ensemble = mopo.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    x, y, d = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.zeros(2, 5)
    h = torch.nn.functional.silu(torch.baddbmm(ensemble.layers[0].bias, x, ensemble.layers[0].weight))
    out = torch.baddbmm(ensemble.layers[1].bias, h, ensemble.layers[1].weight)
    mean, raw = out[..., :3], out[..., 3:]
    hi, lo = ensemble.max_logvar, ensemble.min_logvar
    logvar = hi - torch.nn.functional.softplus(hi - raw)
    logvar = lo + torch.nn.functional.softplus(logvar - lo)
    nll = sum((((mean[i] - y[i]) ** 2) * torch.exp(-logvar[i]) + logvar[i]).mean() for i in range(2))
    decay = 0.1 * 0.5 * ensemble.layers[0].weight.square().sum() + 0.2 * 0.5 * ensemble.layers[1].weight.square().sum()
    expected = nll + decay + 0.01 * (hi.sum() - lo.sum())
    assert torch.allclose(ensemble.loss(x, y, d), expected, rtol=1e-5)
    assert (logvar <= hi + 1e-6).all() and (logvar >= lo - 1e-6).all()


def test_diverging_fit_stops_with_the_member_and_the_step():
    data, _ = linear_gaussian(600, seed=5)
    config = dataclasses.replace(mopo.Config(**{k: v for k, v in TINY.items() if k.startswith(("ensemble", "num_e",
                                                                                             "dynamics"))}),
                                 dynamics_lr=50.0)
    torch.manual_seed(0)
    ensemble = mopo.make_dynamics(config, DataSpec(2, 1, 1.0, False))
    with pytest.raises(UserError, match=r"dynamics member \d diverged: held-out error .* at epoch 1 \(gradient step "
                                        r"\d+\).*--dynamics-lr"):
        mopo.fit_dynamics(ensemble, data, config, seed=0)


# ---------------------------------------------------------------------------------------------------------
# Termination rules and rollouts
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env_id, kwargs", [
    ("Hopper-v5", {}), ("Hopper-v5", {"exclude_current_positions_from_observation": False}),
    ("Walker2d-v5", {}), ("HalfCheetah-v5", {}), ("Ant-v5", {}), ("Ant-v5", {"include_cfrc_ext_in_observation": False}),
    ("Pendulum-v1", {}),
])
def test_termination_rule_agrees_with_the_envs_own_step(env_id, kwargs):
    samples, spec = env_step_samples(env_id, 400, seed=0, **kwargs)
    rule = mopo.termination_function(spec, "env")
    got = rule(*(torch.as_tensor(samples[k]) for k in ("obs", "actions", "next_obs"))).numpy()
    expected = samples["terminated"]
    mismatch = got != expected
    if env_id.startswith("Hopper"):
        # the one case no rule on observations can see: |qvel| >= 100 ends the episode, but the observation clips
        # velocities at 10 (the docstring says so); every other step must agree
        invisible = (np.abs(samples["state"][:, 6:]) >= 100).any(1)
        assert not (mismatch & ~invisible).any() and invisible.sum() < 0.05 * len(got)
    else:
        assert not mismatch.any(), np.nonzero(mismatch)
    if env_id in ("HalfCheetah-v5", "Pendulum-v1"):
        assert not expected.any()  # these envs never terminate: the rule is "never" because the env's is
    else:
        assert 0.1 < expected.mean() < 0.9  # both outcomes were exercised


def test_envs_without_a_rule_are_refused_and_antmaze_is_not_ant():
    with pytest.raises(UserError, match="no termination rule for 'InvertedPendulum-v5'.*--termination learned"):
        mopo.termination_function("InvertedPendulum-v5", "env")
    with pytest.raises(UserError, match="AntMaze_UMaze-v4"):
        mopo.termination_function("AntMaze_UMaze-v4", "env")
    with pytest.raises(UserError, match="Hopper-v9"):
        mopo.termination_function("Hopper-v9", "env")
    assert mopo.termination_function("InvertedPendulum-v5", "learned") is None


class FallingHopper:
    """A stand-in model: the hopper's height obs[0] drops by 0.1 every step, reward 1, no uncertainty."""

    def step(self, obs, actions):
        next_obs = obs.clone()
        next_obs[:, 0] -= 0.1
        return next_obs, torch.ones(len(obs)), torch.zeros(len(obs)), None


def test_rollouts_stop_exactly_at_the_first_termination():
    start = torch.zeros(5, 11)
    start[:, 0] = torch.tensor([1.03, 0.98, 0.84, 0.75, 5.0])  # heights: done (z <= 0.7) after 4, 3, 2, 1, never
    rule = mopo.termination_function("Hopper-v5", "env")
    out, stats = mopo.model_rollout(lambda obs: torch.zeros(len(obs), 3), FallingHopper(), rule, start, 5, 0.0)
    kept = sorted(zip(out["start"].tolist(), out["step"].tolist(), out["terminals"].tolist()))
    expected = ([(0, t, float(t == 3)) for t in range(4)] + [(1, t, float(t == 2)) for t in range(3)]
                + [(2, t, float(t == 1)) for t in range(2)] + [(3, 0, 1.0)] + [(4, t, 0.0) for t in range(5)])
    assert kept == expected
    assert torch.equal(out["terminals"].bool(), rule(out["obs"], out["actions"], out["next_obs"]))
    assert float(stats["train/rollout_terminated_frac"]) == pytest.approx(0.8)
    assert float(stats["train/rollout_length_mean"]) == pytest.approx(15 / 5)


def test_learned_ensemble_rollouts_keep_nothing_after_a_done():
    torch.manual_seed(0)
    config = mopo.Config(**{k: v for k, v in TINY.items() if k.startswith(("ensemble", "num_e", "dynamics"))})
    ensemble = mopo.make_dynamics(config, DataSpec(11, 3, 1.0, False))
    with torch.no_grad():
        ensemble.max_logvar.fill_(-5.0)  # an untrained model whose noise (std <= 0.08) ends about half the rollouts
    start = torch.randn(500, 11) * 0.05
    start[:, 0] = 0.72 + 0.3 * torch.rand(500)
    rule = mopo.termination_function("Hopper-v5", "env")
    out, stats = mopo.model_rollout(lambda obs: torch.rand(len(obs), 3) * 2 - 1, ensemble, rule, start, 5, 1.0)
    assert torch.equal(out["terminals"].bool(), rule(out["obs"], out["actions"], out["next_obs"]))
    done_at = {}
    for s, t, d in zip(out["start"].tolist(), out["step"].tolist(), out["terminals"].tolist()):
        assert s not in done_at, "a transition after the rollout's termination was kept"
        if d:
            done_at[s] = t
    assert 0.1 < float(stats["train/rollout_terminated_frac"]) < 1.0
    # each rollout is contiguous from step 0
    for s in set(out["start"].tolist()):
        steps = sorted(out["step"][out["start"] == s].tolist())
        assert steps == list(range(len(steps)))


def test_model_buffer_is_a_fifo_of_the_last_rounds():
    buffer = mopo.ModelBuffer(10, 1, 1, torch.device("cpu"))
    for first in (0, 4, 8):  # three rounds of 4 rows: the last 10 rows stay
        rows = torch.arange(first, first + 4, dtype=torch.float32)
        buffer.add({"obs": rows[:, None], "actions": rows[:, None], "rewards": rows, "next_obs": rows[:, None],
                    "terminals": torch.zeros(4)})
    assert buffer.size == 10 and sorted(buffer.table[:, 0].tolist()) == list(range(2, 12))
    clone = mopo.ModelBuffer(10, 1, 1, torch.device("cpu"))
    clone.load_state_dict(buffer.state_dict())
    assert torch.equal(clone.table, buffer.table) and clone.pointer == buffer.pointer


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
    saved = mopo.load_dynamics_file(path, dataset.minari_id, mopo.data_checksum(dataset.transitions()),
                                    mopo.dynamics_architecture(config, dataset.spec))
    in_run = checkpoint_agent(fitted_run["run_dir"])["dynamics"]
    assert saved["state_dict"].keys() == in_run.keys()
    assert all(torch.equal(saved["state_dict"][k], in_run[k]) for k in in_run)
    from_file, from_run = mopo.make_dynamics(config, dataset.spec), mopo.make_dynamics(config, dataset.spec)
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
    original_update, original_fit = mopo.Progress.update, mopo.fit_dynamics
    monkeypatch.setattr(mopo, "DYNAMICS_SAVE_SECONDS", 0.0)  # keep the fit's state after every epoch

    def killed_in_epoch_3(self, step):
        if self.name.startswith("dynamics") and step == 3:
            raise KeyboardInterrupt
        return original_update(self, step)

    monkeypatch.setattr(mopo.Progress, "update", killed_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=100, **TINY))
    monkeypatch.setattr(mopo.Progress, "update", original_update)
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

    monkeypatch.setattr(mopo, "fit_dynamics", no_refit)
    extended = mopo.train(run_config(mopo.Config, pendulum_mixed_id, tmp_path, max_steps=150, resume=str(run_dir),
                                     **TINY))
    assert extended["dynamics"]["holdout_mse"] == fitted_run["dynamics"]["holdout_mse"]
    monkeypatch.setattr(mopo, "fit_dynamics", original_fit)


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
    saved = torch.load(f"{summary['run_dir']}/dynamics.pt", weights_only=False)
    ensemble = mopo.make_dynamics(mopo.Config(**TINY, termination="learned"), DataSpec(4, 1, 3.0, False))
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
