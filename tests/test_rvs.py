"""RvS: average reward-to-go against brute force, target omegas, hindsight goals from the same trajectory's future,
the Gaussian NLL by hand, learning on mixed data (RvS-R at a high fraction beats BC) and on a goal-reaching set
(RvS-G), resume and determinism, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_states_equal, checkpoint_agent, load_algorithm, rollout_episodes,
                      run_algorithm_cli, run_config, train_straight_and_resumed)

from common.checkpoint import load_policy
from common.datasets import DataSpec, Episode, save_episodes
from common.errors import UserError
from common.runs import apply_dataset_settings

rvs = load_algorithm("rvs")


# ---------------------------------------------------------------------------------------------------
# Outcomes: average reward-to-go, target omegas, hindsight goals
# ---------------------------------------------------------------------------------------------------


def test_average_returns_to_go_match_brute_force():
    rng = np.random.default_rng(0)
    horizon = 9
    for length in (1, 4, 9):
        rewards = rng.normal(size=length).astype(np.float32)
        expected = [sum(rewards[t:]) / (horizon - t) for t in range(length)]  # omega_t = R^_t / (H - t)
        assert np.allclose(rvs.average_returns_to_go(rewards, horizon), expected, rtol=1e-5, atol=1e-6)


def test_target_omegas_interpolate_the_reference_scores_and_divide_by_h():
    dataset = SimpleNamespace(ref_min_score=-1000.0, ref_max_score=-200.0, ref_source="test",
                              episodes=[SimpleNamespace(total_return=-900.0)])
    # (ref_min + (ref_max - ref_min) * frac) / H
    assert np.allclose(rvs.target_omegas(dataset, (0.0, 0.5, 1.0, 1.2), 200), [-5.0, -3.0, -1.0, -0.2])
    no_reference = SimpleNamespace(ref_min_score=None, ref_max_score=None, ref_source=None,
                                   episodes=[SimpleNamespace(total_return=r) for r in (-30.0, 10.0, 50.0)])
    assert np.allclose(rvs.target_omegas(no_reference, (0.0, 1.0), 10), [-3.0, 5.0])  # worst and best episode


def _labelled_episode(episode_id: int, length: int) -> Episode:
    """Observations [episode id, time step, 0]: a goal's first two columns say where it came from."""
    t = np.arange(length + 1, dtype=np.float32)
    obs = np.stack([np.full(length + 1, episode_id, np.float32), t, np.zeros(length + 1, np.float32)], 1)
    return Episode(obs, np.zeros((length, 1), np.float32), np.zeros(length, np.float32),
                   np.zeros(length, bool), np.array([False] * (length - 1) + [True]))


def test_hindsight_goals_always_come_from_the_same_trajectorys_future():
    lengths = [2, 5, 30, 7]
    sampler = rvs.GoalSampler([_labelled_episode(i, n) for i, n in enumerate(lengths)], np.array([0, 1]),
                              torch.device("cpu"), seed=0)
    batch = sampler.sample(20_000)
    state, goal = batch["obs"], batch["omega"]
    assert torch.equal(goal[:, 0], state[:, 0])  # the same trajectory
    assert bool((goal[:, 1] >= state[:, 1]).all())  # its present or future (t1 <= t2)
    length = torch.tensor(lengths, dtype=torch.float32)[state[:, 0].long()]
    assert bool((goal[:, 1] <= length - 1).all())  # a state with an action, never past the trajectory
    assert float((goal[:, 1] > state[:, 1]).float().mean()) > 0.5
    # trajectories drawn uniformly (the authors' sampler), not in proportion to their length
    counts = torch.bincount(state[:, 0].long(), minlength=4).float() / len(state)
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.02)
    # the last state of a long trajectory is reachable as a goal
    assert bool(((state[:, 0] == 2) & (goal[:, 1] == 29)).any())


# ---------------------------------------------------------------------------------------------------
# The policy's initialisation and the training length (the authors' SB3 policy and epochs)
# ---------------------------------------------------------------------------------------------------


def test_policy_is_initialised_as_the_authors_sb3_policy():
    spec = DataSpec(obs_dim=5, act_dim=3, max_action=1.0, discrete=False)
    torch.manual_seed(0)
    agent = rvs.Agent(rvs.Config(env="test/x-v0", device="cpu", max_steps=10, hidden_dims=(64, 32)), spec,
                      torch.device("cpu"))
    linears = [m for m in agent.policy if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(64, 6), (32, 64), (3, 32)]
    # orthogonal_(gain g): the rows (when fewer) or the columns are orthogonal with norm g
    for layer, gain in zip(linears, (2 ** 0.5, 2 ** 0.5, 0.01)):
        w = layer.weight.detach().double()
        gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
        assert torch.allclose(gram, gain ** 2 * torch.eye(len(gram), dtype=torch.float64), atol=1e-6 * gain ** 2)
        assert not layer.bias.detach().any()
    assert not agent.log_std.detach().any()


def test_training_length_is_the_authors_epochs_of_the_batch_used(tmp_path, pendulum_mixed_id, capsys):
    # steps = epochs * ceil(N / batch): D4RL hopper-medium-replay (402,000 transitions) at the authors' batch,
    # kitchen's fixed goal-sampler epoch of 2,450,000 pairs at their batch 256 and at 16384
    assert rvs.steps_for_epochs(2000, 402_000, 16_384) == 2000 * 25 == 50_000
    assert rvs.steps_for_epochs(50, rvs.GOAL_EPOCH_EXAMPLES, 256) == 50 * 9571
    assert rvs.steps_for_epochs(50, rvs.GOAL_EPOCH_EXAMPLES, 16_384) == 50 * 150
    table = {env: apply_dataset_settings(rvs.Config(env=env), rvs.DATASET_SETTINGS, quiet=True)
             for env in ("hopper-medium-v2", "local/hopper/medium-expert-v0", "kitchen-mixed-v0", "antmaze-umaze-v2")}
    assert [(c.epochs, c.max_steps) for c in table.values()] == [(2000, None), (2000, None), (50, None),
                                                                 (None, 20_000)]
    # a small dataset: 12,000 transitions in batches of 5,000 are 3 steps per epoch (the last one smaller)
    n = sum(len(e) for e in rvs.load_dataset(pendulum_mixed_id).episodes)
    summary = rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path, epochs=2, **{**FAST, "batch_size": 5000}))
    assert n == 12_000 and summary["steps"] == 2 * 3
    assert json.loads(open(f"{summary['run_dir']}/config.json").read())["max_steps"] == 6
    assert "training length: 2 epochs x ceil(12000 / 5000) = 6 steps" in capsys.readouterr().err
    with pytest.raises(UserError, match="--epochs 2 and --max-steps 10 both set"):
        rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path / "both", epochs=2, max_steps=10, **FAST))
    assert not (tmp_path / "both").exists()


# ---------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------


def test_policy_loss_is_the_gaussian_nll_of_the_action_given_state_and_omega():
    spec = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)
    torch.manual_seed(0)
    agent = rvs.Agent(rvs.Config(env="test/x-v0", device="cpu", max_steps=10, hidden_dims=(16, 16)), spec,
                      torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(64, 3, generator=g), "omega": torch.randn(64, generator=g),
             "actions": torch.rand(64, 2, generator=g) * 4 - 2}
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([0.3, -0.4]))
        mean = agent.policy(torch.cat([batch["obs"], batch["omega"][:, None]], 1))
        normal = torch.distributions.Normal(mean, torch.tensor([0.3, -0.4]).exp())
        expected = -normal.log_prob(batch["actions"]).sum(-1).mean()
    logs = agent.update(batch)
    assert torch.allclose(logs["train/policy_loss"], expected, rtol=1e-5)
    # act() conditions on the target omega it was given; act_conditioned on any other
    agent.target_omega = torch.tensor([0.7])
    obs = batch["obs"][:5]
    assert torch.equal(agent.act(obs), agent.act_conditioned(obs, torch.full((5, 1), 0.7)))
    assert not torch.equal(agent.act(obs), agent.act_conditioned(obs, torch.full((5, 1), -3.0)))


# ---------------------------------------------------------------------------------------------------
# Runs on the mixed pendulum set: learning, the fraction sweep, resume, determinism
# ---------------------------------------------------------------------------------------------------

FAST = dict(hidden_dims=(32, 32), batch_size=64, eval_episodes=2, target_fractions=(0.5, 1.0))


def test_rvs_at_a_high_fraction_beats_bc_on_mixed_data(tmp_path, pendulum_mixed_id):
    # 15 expert + 45 uniform-random Pendulum episodes. Cloning the mixture fails (about -1500); conditioned on
    # the expert's average reward-to-go, the policy imitates the expert's part of the data.
    common = dict(max_steps=3000, batch_size=256, hidden_dims=(64, 64), lr=1e-3, eval_episodes=5)
    result = rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path, target_fractions=(0.3, 1.0),
                                  main_fraction=1.0, **common))
    bc = load_algorithm("bc")
    cloned = bc.train(run_config(bc.Config, pendulum_mixed_id, tmp_path, **common))
    assert result["return_mean"] > cloned["return_mean"] + 400, (result["return_mean"], cloned["return_mean"])
    # the outcome steers the policy: asking for the reference expert return does better than asking for 30%
    by_fraction = {entry["fraction"]: entry["return_mean"] for entry in result["fractions"]}
    assert by_fraction[1.0] > by_fraction[0.3] + 100, by_fraction
    rows = [json.loads(line) for line in open(f"{result['run_dir']}/metrics.jsonl")]
    final = [r for r in rows if "eval/frac_1/return_mean" in r][-1]
    assert final["eval/frac_0.3/return_mean"] == by_fraction[0.3]
    assert any(r.get("eval/return_mean") == result["return_mean"] for r in rows)


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    common = dict(log_every=50, checkpoint_every=100, **FAST)
    straight, resumed, a, b = train_straight_and_resumed(rvs, pendulum_mixed_id, tmp_path, 100, 200, **common)
    assert_states_equal(a, b, ("policy",))
    assert torch.equal(a["log_std"], b["log_std"]) and torch.equal(a["target_omega"], b["target_omega"])
    losses = lambda d: [json.loads(line)["train/policy_loss"] for line in open(f"{d}/metrics.jsonl")
                        if "train/policy_loss" in line]
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"])
    assert straight["fractions"] == resumed["fractions"]


def test_same_seed_same_run_and_other_seed_differs(tmp_path, pendulum_mixed_id):
    runs = [rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path / str(i), max_steps=100, seed=s, **FAST))
            for i, s in enumerate([3, 3, 4])]
    states = [checkpoint_agent(r["run_dir"]) for r in runs]
    assert_states_equal(states[0], states[1], ("policy",))
    assert not all(torch.equal(states[0]["policy"][k], states[2]["policy"][k]) for k in states[0]["policy"])
    assert runs[0]["fractions"] == runs[1]["fractions"]


@pytest.fixture(scope="module")
def ragged_id(minari_root) -> str:
    """`test/pendulum/ragged-v0`: three uniform-random Pendulum episodes cut to 50, 160 and 120 steps."""
    episodes = rollout_episodes("Pendulum-v1", None, 3, seed=21)
    for episode, length in zip(episodes, (50, 160, 120)):
        for key in ("actions", "rewards", "terminations", "truncations"):
            episode[key] = episode[key][:length]
        episode["observations"] = episode["observations"][:length + 1]
        episode["truncations"][-1] = True
    save_episodes("test/pendulum/ragged-v0", episodes, "Pendulum-v1", overwrite=True)
    return "test/pendulum/ragged-v0"


def test_horizon_h_is_the_longest_trajectory(tmp_path, ragged_id):
    # omega = R / (H - t) with H the longest trajectory (the authors' max_episode_steps = np.max(lengths)): 160
    # here, neither the shortest (50) nor the env's time limit (200). Without reference scores the main
    # fraction 1.0 targets the best episode return: omega = best / 160.
    episodes = rvs.load_dataset(ragged_id).episodes
    assert sorted(len(e) for e in episodes) == [50, 120, 160]
    summary = rvs.train(run_config(rvs.Config, ragged_id, tmp_path, max_steps=2, **FAST))
    best = max(float(np.sum(e.rewards, dtype=np.float64)) for e in episodes)
    assert float(checkpoint_agent(summary["run_dir"])["target_omega"]) == pytest.approx(best / 160, rel=1e-5)
    main = next(entry for entry in summary["fractions"] if entry["fraction"] == 1.0)
    assert main["target_return"] == pytest.approx(best, rel=1e-5)


def test_omega_stays_fixed_for_the_whole_evaluation_episode(pendulum_mixed_id):
    # RvS-R's average-return conditioning: omega is the target for the whole episode (the authors'
    # eval_reward_conditioning), unlike DT's return-to-go, which drops by every reward
    dataset = rvs.load_dataset(pendulum_mixed_id)
    config = rvs.Config(env=pendulum_mixed_id, device="cpu", max_steps=10, hidden_dims=(16,), eval_episodes=2,
                        target_fractions=(0.5, 1.0))
    agent = rvs.Agent(config, dataset.spec, torch.device("cpu"))
    seen, original = [], agent.act_conditioned

    def recording(obs, omega):
        seen.append(omega.clone())
        return original(obs, omega)

    agent.act_conditioned = recording
    envs = rvs.make_eval_envs(dataset, 4)
    rvs.evaluate_fractions(agent, dataset, (0.5, 1.0), 200, config, torch.device("cpu"), envs)
    envs.close()
    expected = torch.tensor(rvs.target_omegas(dataset, (0.5, 1.0), 200)).repeat_interleave(2).unsqueeze(-1)
    assert len(seen) == 200  # one call per step of the 200-step episodes
    assert all(torch.allclose(omega, expected) for omega in seen)


def test_reloaded_policy_conditions_on_the_main_fraction(tmp_path, pendulum_mixed_id):
    summary = rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path, max_steps=20, **FAST))
    agent_state = checkpoint_agent(summary["run_dir"])
    refs = rvs.reference_scores(rvs.load_dataset(pendulum_mixed_id))
    assert float(agent_state["target_omega"]) == pytest.approx(refs[1] / 200, rel=1e-5)  # fraction 1.0, H = 200
    policy = load_policy(summary["run_dir"])
    assert policy(np.zeros((3, 3), np.float32)).shape == (3, 1)


# ---------------------------------------------------------------------------------------------------
# RvS-G on a small goal-reaching set
# ---------------------------------------------------------------------------------------------------


class PointGoalEnv(gym.Env):
    """A point in [-1, 1]^2 moves by 0.1 * action per step; reward -||p - g||; Dict observations as the mazes."""

    def __init__(self):
        box = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Dict({"achieved_goal": box, "desired_goal": box, "observation": box})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def _obs(self) -> dict:
        return {"achieved_goal": self.pos.copy(), "desired_goal": self.goal.copy(), "observation": self.pos.copy()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        self.goal = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return self._obs(), {}

    def step(self, action):
        self.pos = np.clip(self.pos + 0.1 * np.clip(action, -1, 1), -1, 1).astype(np.float32)
        return self._obs(), -float(np.linalg.norm(self.pos - self.goal)), False, False, {}


POINT_ENV = "RvsTestPointGoal-v0"
if POINT_ENV not in gym.registry:
    gym.register(POINT_ENV, entry_point=f"{__name__}:PointGoalEnv", max_episode_steps=30)


@pytest.fixture(scope="module")
def point_goal_id(minari_root) -> str:
    """`test/point-goal/waypoints-v0`: 150 episodes heading with noise to a random waypoint, not to the goal."""
    env = gym.make(POINT_ENV)
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(150):
        obs, _ = env.reset(seed=i)
        waypoint = rng.uniform(-1, 1, 2)
        keys = ("achieved_goal", "desired_goal", "observation")
        o, a, r, te, tr = {k: [obs[k]] for k in keys}, [], [], [], []
        while True:
            action = np.clip(5 * (waypoint - obs["achieved_goal"]) + 0.5 * rng.standard_normal(2), -1, 1)
            obs, reward, terminated, truncated, _ = env.step(action.astype(np.float32))
            for k in keys:
                o[k].append(obs[k])
            a.append(action), r.append(reward), te.append(terminated), tr.append(truncated)
            if terminated or truncated:
                break
        episodes.append({"observations": {k: np.asarray(v, np.float32) for k, v in o.items()},
                         "actions": np.asarray(a, np.float32), "rewards": np.asarray(r), "terminations": np.asarray(te),
                         "truncations": np.asarray(tr), "seed": i})
    env.close()
    save_episodes("test/point-goal/waypoints-v0", episodes, POINT_ENV, overwrite=True)
    return "test/point-goal/waypoints-v0"


def test_rvs_g_reaches_the_desired_goal_from_hindsight_goals(tmp_path, point_goal_id):
    # The data never heads for its desired goal; relabelled with goals from each trajectory's own future,
    # RvS-G learns to reach whatever goal it is given, and at test time is given the env's desired goal.
    config = run_config(rvs.Config, point_goal_id, tmp_path, conditioning="goal", max_steps=1500, batch_size=256,
                        hidden_dims=(64, 64), eval_episodes=10)
    summary = rvs.train(config)
    behaviour = float(np.mean([e.total_return for e in rvs.load_dataset(point_goal_id).episodes]))
    assert summary["goal_columns"] == [0, 1] and summary["normalized_score_mean"] is None
    assert summary["return_mean"] > behaviour + 15, (summary["return_mean"], behaviour)
    state = checkpoint_agent(summary["run_dir"])
    # the flattened observation is [achieved_goal, desired_goal, observation]: desired goal zeroed in the state
    assert state["state_mask"].tolist() == [1, 1, 0, 0, 1, 1] and state["desired_columns"].tolist() == [2, 3]
    x_only = rvs.train(run_config(rvs.Config, point_goal_id, tmp_path, conditioning="goal", goal_columns=(0,),
                                  max_steps=5, **FAST))
    assert x_only["goal_columns"] == [0]


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


def test_goal_conditioning_without_goal_information_is_one_line_and_exit_2(tmp_path, pendulum_mixed_id, minari_root):
    with pytest.raises(UserError, match="needs goal information"):
        rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path, conditioning="goal", max_steps=10, **FAST))
    assert not (tmp_path / "runs").exists()
    proc = run_algorithm_cli("rvs", "--env", pendulum_mixed_id, "--conditioning", "goal", "--no-download",
                             "--runs-dir", str(tmp_path / "cli"))
    assert_one_line_error(proc, "--conditioning reward")


def test_episodes_shorter_than_two_steps_are_refused(tmp_path, minari_root):
    episodes = rollout_episodes("Pendulum-v1", None, 3, seed=7)
    short = [{**{k: v[:2] if k == "observations" else v[:1] for k, v in e.items() if k != "seed"},
              "truncations": np.array([True])} for e in episodes]
    save_episodes("test/pendulum/one-step-v0", short, "Pendulum-v1", overwrite=True)
    with pytest.raises(UserError, match="shorter than 2 steps"):
        rvs.train(run_config(rvs.Config, "test/pendulum/one-step-v0", tmp_path, max_steps=10, **FAST))


@pytest.mark.parametrize("overrides", [dict(target_fractions=(0.5, 2.5)), dict(main_fraction=-0.1),
                                       dict(target_fractions=(float("nan"),))])
def test_fractions_out_of_range_are_refused_before_the_run(tmp_path, pendulum_mixed_id, overrides):
    with pytest.raises(UserError, match="outside"):
        rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path, max_steps=10, **{**FAST, **overrides}))
    assert not (tmp_path / "runs").exists()


def test_a_target_beyond_the_data_warns_and_still_runs(tmp_path, pendulum_mixed_id, capsys):
    summary = rvs.train(run_config(rvs.Config, pendulum_mixed_id, tmp_path, max_steps=5,
                                   **{**FAST, "target_fractions": (0.5, 1.2)}))
    err = capsys.readouterr().err
    assert "warning: target fraction(s) 1.2 " in err and "1.2" in [f"{e['fraction']:g}" for e in summary["fractions"]]
