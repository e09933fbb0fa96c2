"""DAgger and HG-DAgger: schedule, discrepancy and gate maths, which states each variant aggregates, DAgger
against BC at equal labels, the gate's falling intervention rate, the beta = 1 reduction to BC, every --expert
form (common/experts.py) and the builder's exported policy, per-episode expert resets, `module:EnvId` envs,
the per-dataset settings, bad input, resume, determinism."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (ROOT, assert_one_line_error, assert_states_equal, load_algorithm, pendulum_expert,
                      rollout_episodes, run_algorithm_cli, run_config, train_straight_and_resumed)

from common.build import behavior_dqn, behavior_sac
from common.build.behavior_dqn import Config as DQNConfig
from common.build.behavior_dqn import DQNAgent
from common.build.behavior_sac import Config as SACConfig
from common.build.behavior_sac import SACAgent
from common.checkpoint import load_checkpoint, load_policy
from common.datasets import save_episodes
from common.envs.pendulum import pendulum_expert as scripted_pendulum
from common.errors import UserError
from common.experts import POLICY_FILE

dagger = load_algorithm("dagger")

SCRIPTED = "common.envs.pendulum:scripted_pendulum_expert"
FORK_ENV, FORK_EXPERT = "common.envs.fork:PointFork-v0", "common.envs.fork:make_expert"
# a small, quick learner for the learning tests: 5 rounds x 2 episodes x 200 steps = 2000 expert labels
SMALL = dict(max_steps=2000, steps_per_round=400, episodes_per_round=2, hidden_dims=(64, 64), eval_episodes=10,
             log_every=400)
BC_SCHEDULE = dict(beta_schedule="exponential", beta_decay=1.0)  # beta_i = 1^i = 1: expert rollouts only
DAGGER_SCHEDULE = dict(beta_schedule="linear", beta_rampdown_rounds=1)  # beta_i = 1[i = 0] (Ross et al.)


def pendulum_env(**overrides):
    return dagger.interactive_env(dagger.Config(env="Pendulum-v1", **overrides))


# --- maths ------------------------------------------------------------------------------------------------


def test_beta_schedules_start_at_one_and_follow_their_closed_forms():
    linear = dagger.Config(beta_schedule="linear", beta_rampdown_rounds=3)
    assert [dagger.beta(linear, i) for i in range(5)] == pytest.approx([1, 2 / 3, 1 / 3, 0, 0])
    exponential = dagger.Config(beta_schedule="exponential", beta_decay=0.7)
    assert [dagger.beta(exponential, i) for i in range(4)] == pytest.approx([1, 0.7, 0.49, 0.343])
    assert [dagger.beta(dagger.Config(**BC_SCHEDULE), i) for i in range(4)] == [1, 1, 1, 1]
    assert [dagger.beta(dagger.Config(**DAGGER_SCHEDULE), i) for i in range(3)] == [1, 0, 0]


def test_action_discrepancy_is_normalised_by_range_and_dimension():
    box = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    a = np.array([[2.0, 0.0], [0.0, 0.5], [-2.0, 1.0]])
    a_star = np.array([[-2.0, 1.0], [0.0, 0.5], [0.0, 0.5]])
    # ||(a - a*) / (high - low)||_2 / sqrt(2): (1, 1) -> 1; equal -> 0; (-0.5, 0.5) -> 0.5
    np.testing.assert_allclose(dagger.action_discrepancy(a, a_star, box), [1.0, 0.0, 0.5])
    discrete = gym.spaces.Discrete(3)
    np.testing.assert_array_equal(dagger.action_discrepancy(np.array([0, 1, 2]), np.array([0, 2, 2]), discrete),
                                  [0, 1, 0])


def test_gate_takes_over_above_threshold_and_hands_back_below_a_quarter_of_it():
    d = np.array([0.0, 0.25, 0.15, 0.1, 0.06, 0.04, 0.15, 0.19, 0.21, 0.02, 0.3])
    expected = [0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 1]  # take over at > 0.2, hand back at < 0.05, else hold
    gate = dagger.InterventionGate(1, threshold=0.2, release_ratio=0.25)
    assert [int(gate.step(np.array([x]))[0]) for x in d] == expected
    # a discrepancy hovering around the threshold: with hysteresis one intervention, without it flicker
    hover = np.array([0.21, 0.19, 0.22, 0.18, 0.21, 0.17, 0.01, 0.0])
    switches = lambda ratio: np.abs(np.diff([0] + [int(g.step(np.array([x]))[0]) for g in
                                                   [dagger.InterventionGate(1, 0.2, ratio)] for x in hover])).sum()
    assert switches(0.25) == 2 and switches(1.0) == 6
    # envs are gated independently
    gate = dagger.InterventionGate(2, threshold=0.2, release_ratio=0.25)
    assert gate.step(np.array([0.3, 0.1])).tolist() == [True, False]
    assert gate.step(np.array([0.1, 0.3])).tolist() == [True, True]


def test_onpolicy_error_and_cost_have_their_closed_form(tmp_path):
    """A learner that always outputs 0 against an expert that always outputs 2: d = |0 - 2| / 4 = 0.5 per
    step, so the error is 0.5 and the cost over an H-step episode 0.5 H."""
    env = pendulum_env(max_episode_steps=30)
    agent = dagger.Agent(dagger.Config(hidden_dims=(8,)), env.spec, torch.device("cpu"))
    torch.nn.init.zeros_(agent.policy[-1].weight)
    torch.nn.init.zeros_(agent.policy[-1].bias)
    expert = dagger.Expert(lambda obs: np.array([2.0], np.float32), "constant", env.action_space)
    result = dagger.evaluate_against_expert(agent, expert, env, 3, 0, "cpu")
    assert result["onpolicy_error"] == pytest.approx(0.5) and result["onpolicy_cost"] == pytest.approx(15.0)


# --- which states D receives ------------------------------------------------------------------------------


class RecordingExpert(dagger.Expert):
    """The scripted pendulum expert, recording every batch of states it is asked about (one per step)."""

    def __init__(self, space):
        super().__init__(scripted_pendulum, "scripted", space)
        self.queries = []

    def __call__(self, obs):
        self.queries.append(np.array(obs))
        return super().__call__(obs)


class RecordingGate(dagger.InterventionGate):
    """The gate, recording which envs the expert drove at each step."""

    def __init__(self, *args):
        super().__init__(*args)
        self.decisions = []

    def step(self, discrepancy):
        self.decisions.append(super().step(discrepancy))
        return self.decisions[-1]


def one_round(gated: bool):
    """One collection round on Pendulum-v1 (3 episodes of 40 steps) by an untrained learner: the round's
    output, the states visited (T, n, 3) and the gate's decisions (T, n) (None without a gate)."""
    env = pendulum_env(max_episode_steps=40)
    torch.manual_seed(0)
    agent = dagger.Agent(dagger.Config(hidden_dims=(8,)), env.spec, torch.device("cpu"))
    expert = RecordingExpert(env.action_space)
    gate = RecordingGate(3, 0.2, 0.25) if gated else None
    envs = dagger.make_eval_envs(env, 3)
    out = dagger.collect_round(envs, env, agent, expert, [11, 12, 13], 0.0, gate, np.random.default_rng(0))
    envs.close()
    return out, np.stack(expert.queries), None if gate is None else np.stack(gate.decisions)


def test_hg_dagger_adds_only_the_experts_takeover_steps_with_their_expert_labels():
    out, visited, expert_drove = one_round(gated=True)
    assert 0 < expert_drove.sum() < expert_drove.size  # the learner drove some steps, the expert others
    # episode order (env 0's steps, then env 1's...), only where the expert had control
    want = np.concatenate([visited[:, j][expert_drove[:, j]] for j in range(3)])
    np.testing.assert_array_equal(out["obs"], want)
    np.testing.assert_array_equal(out["actions"], scripted_pendulum(want))  # a*, not the learner's actions
    assert out["steps"] == expert_drove.size and out["intervention_rate"] == pytest.approx(expert_drove.mean())


def test_dagger_adds_every_visited_state_with_its_expert_label():
    out, visited, _ = one_round(gated=False)  # beta = 0: the learner drives every step
    want = np.concatenate([visited[:, j] for j in range(3)])
    np.testing.assert_array_equal(out["obs"], want)
    np.testing.assert_array_equal(out["actions"], scripted_pendulum(want))


# --- learning ---------------------------------------------------------------------------------------------


def test_dagger_onpolicy_error_is_below_bc_at_equal_expert_labels(tmp_path):
    common = dict(expert=SCRIPTED, **SMALL)
    bc = dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path, **common, **BC_SCHEDULE))
    dg = dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path, **common, **DAGGER_SCHEDULE))
    assert bc["expert_labels"] == dg["expert_labels"] == 2000
    # measured: BC 0.11 and DAgger 0.020 (seed 0); BC's errors compound on states the expert never visits
    assert dg["onpolicy_error"] < 0.5 * bc["onpolicy_error"]
    assert dg["return_mean"] > bc["return_mean"]


def test_hg_dagger_intervention_rate_falls_over_rounds(tmp_path):
    summary = dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path, expert=SCRIPTED, gated=True,
                                      threshold=0.2, **SMALL))
    rates = [r["intervention_rate"] for r in summary["round_history"]]
    assert rates[0] == 1.0  # round 0: expert rollouts
    assert rates[-1] < 0.5 * rates[1]  # measured: 0.42 in round 1, 0.03 in round 4
    # only the expert's segments are aggregated: fewer labels than the states the gate watched
    assert summary["expert_labels"] < summary["expert_queries"] == 2000
    logged = [json.loads(line) for line in open(f"{summary['run_dir']}/metrics.jsonl")]
    assert [r["dagger/intervention_rate"] for r in logged if "dagger/intervention_rate" in r] == rates


def test_beta_one_in_every_round_is_bc_on_expert_rollouts(tmp_path):
    """With beta = 1 the expert drives every step: D holds exactly the expert's own episodes on the
    collection seeds, labelled with its actions, which is behaviour cloning's data."""
    summary = dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path, expert=SCRIPTED, max_steps=60,
                                      steps_per_round=20, episodes_per_round=2, hidden_dims=(8,), eval_episodes=1,
                                      **BC_SCHEDULE))
    data = load_checkpoint(summary["run_dir"])["sampler"]
    episodes = rollout_episodes("Pendulum-v1", pendulum_expert, 6, seed=dagger.COLLECT_SEED_OFFSET + 0)
    np.testing.assert_array_equal(data["obs"], np.concatenate([e["observations"][:-1] for e in episodes]))
    np.testing.assert_array_equal(data["actions"], np.concatenate([e["actions"] for e in episodes]))
    assert [r["beta"] for r in summary["round_history"]] == [1.0, 1.0, 1.0]


def test_init_data_takes_the_dataset_as_stored_or_relabelled(tmp_path, pendulum_expert_id):
    from common.datasets import load_dataset

    stored = load_dataset(pendulum_expert_id).transitions()
    for mode, labels in (("dataset", stored["actions"]), ("relabelled", pendulum_expert(stored["obs"]))):
        summary = dagger.train(run_config(dagger.Config, pendulum_expert_id, tmp_path, expert=SCRIPTED, max_steps=10,
                                          steps_per_round=10, episodes_per_round=1, hidden_dims=(8,),
                                          eval_episodes=1, init_data=mode))
        data = load_checkpoint(summary["run_dir"])["sampler"]
        np.testing.assert_array_equal(data["obs"], stored["obs"])
        np.testing.assert_array_equal(data["actions"], labels)
        assert summary["expert_queries"] == (0 if mode == "dataset" else len(stored["obs"]))


# --- the expert's three forms -------------------------------------------------------------------------------


def make_build_folder(folder, agent_cls, config_cls, env_id):
    """A build folder as `python -m common.build` leaves it: <folder>/agent/agent_state.pt."""
    agent = agent_cls(config_cls(env=env_id, max_steps=20, warmup_steps=10, checkpoint_every=20, hidden=16,
                                 eval_episodes=1, save_every=20, checkpoint_dir=str(folder / "agent")))
    agent.train()
    return agent


@pytest.fixture(scope="module")
def sac_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build") / "pendulum-seed0"
    return folder, make_build_folder(folder, SACAgent, SACConfig, "Pendulum-v1")


@pytest.fixture(scope="module")
def dqn_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("build") / "cartpole-seed0"
    return folder, make_build_folder(folder, DQNAgent, DQNConfig, "CartPole-v1")


def observations(env_id: str, n: int = 20) -> np.ndarray:
    return np.stack([o for e in rollout_episodes(env_id, None, 1, seed=5) for o in e["observations"][:n]])


def hundred_observations(env_id: str) -> np.ndarray:
    """100 observations from random-action episodes of `env_id`."""
    return np.concatenate([e["observations"] for e in rollout_episodes(env_id, None, 10, seed=5)])[:100]


@pytest.mark.parametrize("form", ["folder", "agent state file", "policy file"])
def test_build_expert_equals_the_builders_final_policy(sac_build, dqn_build, form):
    """The expert of a build folder is the builder's own final policy (`final_policy`, the builder's networks):
    equal on 100 observations, and as the builder's NumPy rollout policy acts."""
    for (folder, agent), env_id, builder in ((sac_build, "Pendulum-v1", behavior_sac),
                                             (dqn_build, "CartPole-v1", behavior_dqn)):
        path = {"folder": folder, "agent state file": folder / "agent" / "agent_state.pt",
                "policy file": folder / "agent" / POLICY_FILE}[form]
        expert = dagger.load_expert(str(path), dagger.interactive_env(dagger.Config(env=env_id)))
        obs = hundred_observations(env_id)
        network = builder.final_policy(folder)
        with torch.no_grad():
            own = network.deterministic(torch.as_tensor(obs)) if env_id == "Pendulum-v1" else \
                network(torch.as_tensor(obs)).argmax(-1)
        assert len(obs) == 100
        np.testing.assert_array_equal(expert(obs), own.numpy())
        rollout_policy = agent.make_policy(agent.checkpoints[-1].policy, stochastic=False)  # NumPy, per state
        rollout = np.array([rollout_policy(o) for o in obs]).reshape(expert(obs).shape)
        np.testing.assert_allclose(expert(obs), rollout, atol=1e-6)


def test_build_made_before_policy_files_is_refused_with_the_export_command(sac_build, tmp_path):
    """A build folder without its policy file: one line naming the builder's command, which writes it."""
    old = tmp_path / "pendulum-seed0"
    shutil.copytree(sac_build[0], old)
    (old / "agent" / POLICY_FILE).unlink()
    env = pendulum_env()
    command = f"python -m common.build.behavior_sac --export-expert {old}"
    with pytest.raises(UserError, match=re.escape(command)):
        dagger.load_expert(str(old), env)
    proc = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and (old / "agent" / POLICY_FILE).is_file(), proc.stderr
    obs = hundred_observations("Pendulum-v1")
    np.testing.assert_array_equal(dagger.load_expert(str(old), env)(obs),
                                  dagger.load_expert(str(sac_build[0]), env)(obs))


def test_policy_file_holds_plain_tensors_only(sac_build):
    state = torch.load(sac_build[0] / "agent" / POLICY_FILE, weights_only=True)  # refuses anything else
    assert state["head"] == "tanh_box" and state["info"]["agent"] == "SAC" and len(state["layers"]) == 3


def test_library_run_and_factory_experts_load(tmp_path, pendulum_expert_id):
    bc = load_algorithm("bc")
    run = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path, max_steps=20, eval_episodes=1))
    env = pendulum_env()
    obs = observations("Pendulum-v1")
    for path in (run["run_dir"], f"{run['run_dir']}/checkpoint.pt"):
        np.testing.assert_allclose(dagger.load_expert(path, env)(obs), load_policy(path)(obs), atol=1e-6)
    np.testing.assert_array_equal(dagger.load_expert(SCRIPTED, env)(obs), pendulum_expert(obs))
    # a DAgger run is a library run too: its policy normalises observations itself
    dg = dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path, expert=run["run_dir"], max_steps=20,
                                 steps_per_round=10, episodes_per_round=1, hidden_dims=(8,), eval_episodes=1))
    assert dagger.load_expert(dg["run_dir"], env)(obs).shape == (len(obs), 1)


def test_expert_defaults_to_the_build_folder_of_a_local_build(tmp_path, monkeypatch, minari_root, sac_build):
    folder, agent = sac_build
    save_episodes("local/daggertest/expert-v0", rollout_episodes("Pendulum-v1", pendulum_expert, 1, seed=0),
                  "Pendulum-v1", extra_metadata={"seed": 0}, overwrite=True)
    (tmp_path / "runs" / "datasets").mkdir(parents=True)
    (tmp_path / "runs" / "datasets" / "daggertest-seed0").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    env = dagger.interactive_env(dagger.Config(env="local/daggertest/expert-v0", download=False))
    expert = dagger.load_expert(None, env)
    obs = observations("Pendulum-v1")
    final = agent.make_policy(agent.checkpoints[-1].policy, stochastic=False)
    np.testing.assert_allclose(expert(obs), np.array([final(o) for o in obs]), atol=1e-6)


def test_an_ope_run_is_refused_as_an_expert(tmp_path, pendulum_expert_id):
    """An ope.py run estimates a policy's value; its checkpoint holds a placeholder policy, not an expert."""
    bc, ope = load_algorithm("bc"), load_algorithm("ope")
    policy_run = bc.train(run_config(bc.Config, pendulum_expert_id, tmp_path / "bc", max_steps=20, eval_episodes=1))
    ope_run = ope.train(run_config(ope.Config, pendulum_expert_id, tmp_path / "ope", policy=policy_run["run_dir"],
                                   max_steps=5, eval_episodes=1, bootstrap=10))
    with pytest.raises(UserError, match="an ope.py run estimates the value of a policy and is not one"):
        dagger.load_expert(ope_run["run_dir"], pendulum_env())


# --- a scripted expert with a mode per episode, a module:EnvId env -------------------------------------------


def test_fork_expert_is_reset_every_episode_so_its_labels_take_both_paths(tmp_path):
    """The fork's scripted expert picks a side per episode: reset at every episode start, the expert's
    episodes in D pass left and right (never reset, it always took the right-hand path)."""
    summary = dagger.train(run_config(dagger.Config, FORK_ENV, tmp_path, expert=FORK_EXPERT, max_steps=20,
                                      steps_per_round=10, episodes_per_round=8, hidden_dims=(8,), eval_episodes=2,
                                      **BC_SCHEDULE))
    data = load_checkpoint(summary["run_dir"])["sampler"]
    obs, actions = np.asarray(data["obs"]), np.asarray(data["actions"])
    starts = obs[:, 0] == 0.0  # every episode starts on the axis, x = 0
    assert starts.sum() == 16
    first_moves = actions[starts]  # the side chosen: (-0.8, 0.8) left or (+0.8, 0.8) right
    np.testing.assert_allclose(np.abs(first_moves), 0.8, atol=1e-6)
    assert (first_moves[:, 0] < 0).sum() >= 3 and (first_moves[:, 0] > 0).sum() >= 3
    assert summary["env"] == "PointFork-v0"


def test_env_registered_by_a_module_runs_and_the_bare_id_names_that_form(tmp_path):
    """`--env common.envs.fork:PointFork-v0` (Gymnasium's module:EnvId) works in a fresh process, where the
    bare `PointFork-v0` is not registered and is refused in one line that names the working form."""
    proc = run_algorithm_cli("dagger", "--env", "PointFork-v0", "--expert", FORK_EXPERT)
    assert_one_line_error(proc, "common.envs.fork:PointFork-v0")
    proc = run_algorithm_cli("dagger", "--env", FORK_ENV, "--expert", FORK_EXPERT, "--max-steps", "10",
                             "--steps-per-round", "10", "--episodes-per-round", "2", "--eval-episodes", "1",
                             "--hidden-dims", "8", "--runs-dir", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    resumed = run_algorithm_cli("dagger", "--resume", str(next((tmp_path / "runs" / "dagger").glob("*/*"))),
                                "--max-steps", "20")
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("env, episodes, schedule", [
    ("Hopper-v5", 10, "exponential"), ("HalfCheetah-v5", 5, "exponential"), ("Walker2d-v5", 5, "exponential"),
    ("Ant-v5", 5, "linear"), ("Swimmer-v5", 3, "linear")])
def test_mujoco_settings_are_the_imitation_librarys_tuned_episodes_per_round(env, episodes, schedule):
    """imitation's tuned_hps/dagger_seals_*: rollout_round_min_episodes 10 (Hopper), 5 (HalfCheetah, Walker,
    Ant); Swimmer's sets none, so SimpleDAggerTrainer.train's default of 3 applies."""
    config = dagger.resolve_dagger_config(dagger.Config(env=env, expert=SCRIPTED, device="cpu"))
    assert (config.episodes_per_round, config.beta_schedule) == (episodes, schedule)


# --- bad input ----------------------------------------------------------------------------------------------


gym.register("DaggerTestUnmakeable-v0", entry_point="no_such_module_anywhere:Env", max_episode_steps=10)


@pytest.mark.parametrize("overrides, message", [
    (dict(expert="/no/such/folder"), "no such file or folder"),
    (dict(expert="no_such_package.mod:factory"), "cannot import no_such_package.mod"),
    (dict(expert="common.reporting.compounding:ENV"), "no callable ENV"),
    (dict(expert=SCRIPTED, env="CartPole-v1"), "action space does not match"),
    (dict(expert="DQN", env="Pendulum-v1"), "discrete actions; the env"),
    (dict(expert="SAC", env="CartPole-v1"), "-d actions; the env"),
    (dict(expert=SCRIPTED, threshold=0.0), "--threshold must lie in (0, 1)"),
    (dict(expert=SCRIPTED, threshold=1.5), "--threshold must lie in (0, 1)"),
    (dict(expert=SCRIPTED, release_ratio=0.0), "--release-ratio must lie in (0, 1]"),
    (dict(expert=SCRIPTED, env="NoSuchEnv-v0"), "neither a registered Gymnasium env id nor a dataset"),
    (dict(expert=SCRIPTED, env="DaggerTestUnmakeable-v0"), "cannot create env 'DaggerTestUnmakeable-v0'"),
    (dict(expert=SCRIPTED, env="Blackjack-v1"), "unsupported observation space"),
    (dict(expert=SCRIPTED, init_data="dataset"), "--init-data dataset needs --env to name a dataset"),
])
def test_bad_input_is_one_clear_line_before_any_run_folder(tmp_path, sac_build, dqn_build, overrides, message):
    overrides = dict(overrides)
    builds = {"SAC": sac_build[0], "DQN": dqn_build[0]}
    overrides["expert"] = str(builds.get(overrides["expert"], overrides["expert"]))
    env = overrides.pop("env", "Pendulum-v1")
    with pytest.raises(UserError, match=re.escape(message)):
        dagger.train(run_config(dagger.Config, env, tmp_path, max_steps=10, **overrides))
    assert not (tmp_path / "runs").exists()


def test_library_expert_for_another_env_is_refused(tmp_path, cartpole_mixed_id):
    bc = load_algorithm("bc")
    run = bc.train(run_config(bc.Config, cartpole_mixed_id, tmp_path, max_steps=10, eval_episodes=1))
    with pytest.raises(UserError, match="4-d observations, 2 discrete actions; the env"):
        dagger.load_expert(run["run_dir"], pendulum_env())


def test_a_history_dependent_expert_is_refused(tmp_path, pendulum_expert_id):
    diffusion = load_algorithm("diffusion_bc")
    run = diffusion.train(run_config(diffusion.Config, pendulum_expert_id, tmp_path, max_steps=5, eval_episodes=1,
                                     action_horizon=4, execute_steps=2, diffusion_steps=5))
    with pytest.raises(UserError, match="depends on the episode so far"):
        dagger.load_expert(run["run_dir"], pendulum_env())


def test_a_sampling_expert_without_a_deterministic_mode_labels_with_its_samples(tmp_path, pendulum_expert_id,
                                                                               capsys):
    """A diffusion_bc run (single actions) has no deterministic mode: the expert samples its labels, says so, and
    its labels are actions inside the box."""
    diffusion = load_algorithm("diffusion_bc")
    run = diffusion.train(run_config(diffusion.Config, pendulum_expert_id, tmp_path, max_steps=5, eval_episodes=1,
                                     diffusion_steps=5))
    expert = dagger.load_expert(run["run_dir"], pendulum_env())
    assert "samples its labels" in capsys.readouterr().err
    labels = expert(np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32))
    assert labels.shape == (6, 1) and np.all(np.abs(labels) <= 2.0)


def test_cli_bad_threshold_exits_2_with_one_line():
    proc = run_algorithm_cli("dagger", "--env", "Pendulum-v1", "--expert", SCRIPTED, "--gated", "--threshold", "2")
    assert_one_line_error(proc, "--threshold must lie in (0, 1)")


# --- resume and determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("env, extra", [("Pendulum-v1", dict(gated=False)),
                                        ("dataset", dict(gated=True, init_data="relabelled"))])
def test_killed_run_resumes_to_the_same_data_and_weights(tmp_path, pendulum_expert_id, env, extra):
    env = pendulum_expert_id if env == "dataset" else env
    config = dict(expert=SCRIPTED, steps_per_round=40, episodes_per_round=2, max_episode_steps=50,
                  hidden_dims=(32, 32), log_every=10, checkpoint_every=20, eval_every=40, eval_episodes=2,
                  beta_schedule="linear", beta_rampdown_rounds=2, **extra)
    # the first run stops at step 60, in the middle of round 1; the resumed one collects rounds 2 and 3
    straight, resumed, a, b = train_straight_and_resumed(dagger, env, tmp_path, 60, 160, **config)
    assert_states_equal(a, b, ("policy",))
    assert torch.equal(a["obs_mean"], b["obs_mean"]) and torch.equal(a["obs_std"], b["obs_std"])
    data = [load_checkpoint(s["run_dir"])["sampler"] for s in (straight, resumed)]
    np.testing.assert_array_equal(data[0]["obs"], data[1]["obs"])
    np.testing.assert_array_equal(data[0]["actions"], data[1]["actions"])
    assert straight["round_history"] == resumed["round_history"] and len(straight["round_history"]) == 4
    # round statistics and losses as logged (the first run's final evaluation at step 60 is its own)
    logged = lambda s: [{k: v for k, v in json.loads(l).items() if not k.startswith("perf/")}
                        for l in open(f"{s['run_dir']}/metrics.jsonl") if "dagger/" in l or "train/" in l]
    assert logged(straight) == logged(resumed)


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    config = dict(expert=SCRIPTED, max_steps=60, steps_per_round=20, episodes_per_round=2, max_episode_steps=50,
                  hidden_dims=(16,), eval_episodes=2, **DAGGER_SCHEDULE)
    runs = [dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path / str(i), seed=s, **config))
            for i, s in enumerate([3, 3, 4])]
    states = [load_checkpoint(r["run_dir"]) for r in runs]
    assert_states_equal(states[0]["agent"], states[1]["agent"], ("policy",))
    np.testing.assert_array_equal(states[0]["sampler"]["obs"], states[1]["sampler"]["obs"])
    assert runs[0]["return_mean"] == runs[1]["return_mean"]
    assert not np.array_equal(states[0]["sampler"]["obs"], states[2]["sampler"]["obs"])


def test_final_policy_loads_and_acts_on_raw_observations(tmp_path):
    summary = dagger.train(run_config(dagger.Config, "Pendulum-v1", tmp_path, expert=SCRIPTED, max_steps=20,
                                      steps_per_round=10, episodes_per_round=1, hidden_dims=(8,), eval_episodes=1))
    policy = load_policy(summary["run_dir"])
    state = load_checkpoint(summary["run_dir"])["agent"]
    assert not torch.equal(state["obs_std"], torch.ones(3))  # round 0's statistics, kept with the policy
    assert policy(np.zeros((4, 3), np.float32)).shape == (4, 1)
