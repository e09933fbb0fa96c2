"""The online phase (common/online.py): transitions stored exactly as stepped, the mixing of batches, exact
resume mid-online, fine-tuning that improves on the offline phase, and bad input."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_same_online_phase, assert_states_equal, checkpoint_agent,
                      load_algorithm, run_algorithm_cli, run_config)

from common.datasets import ObsNormalizer, TensorSampler, load_dataset
from common.errors import UserError
from common.online import ONLINE_SEED_OFFSET, OnlinePhase

iql = load_algorithm("iql")


class FixedActions:
    """An agent whose exploration is a known sequence of actions (and which records the switch)."""

    def __init__(self, actions: np.ndarray):
        self.actions, self.calls, self.switched = actions, 0, 0

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        action = self.actions[self.calls % len(self.actions)]
        self.calls += 1
        return torch.as_tensor(action, dtype=torch.float32)[None]

    def start_online(self) -> None:
        self.switched += 1


class Cfg:
    def __init__(self, **kw):
        self.__dict__.update(dict(max_steps=10, online_steps=0, seed=3, online_mix=None), **kw)


def offline_sampler(dataset, normalizer, transform="none", rtg=None, next_actions=False, seed=0):
    """The offline data as a file would sample it; `rtg` and `next_actions` add those columns (as Cal-QL and
    ReBRAC read them: the online buffer then fills them too; their offline values do not matter here)."""
    data = dataset.transitions(reward_transform=transform, returns_to_go_gamma=rtg)
    keys = {"obs": normalizer(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
            "next_obs": normalizer(data["next_obs"]), "terminals": data["terminals"], "timeouts": data["timeouts"]}
    if rtg is not None:
        keys["returns_to_go"] = data["returns_to_go"]
    if next_actions:
        keys["next_actions"] = data["actions"]
    return TensorSampler(keys, "cpu", seed)


def test_online_transitions_are_stored_exactly_as_stepped(inverted_pendulum_random_id):
    """InvertedPendulum terminates (|angle| > 0.2) under random actions: terminations and the 20-step time limit
    both occur. Each stored row equals the env stepped by hand with the same seeds and actions: observations
    normalised with the offline statistics, rewards transformed, terminals only on terminations, timeouts only
    on truncations, returns-to-go of finished episodes (truncation not bootstrapped), next actions."""
    dataset = load_dataset(inverted_pendulum_random_id)
    dataset.eval_env_spec = dataclasses.replace(dataset.eval_env_spec, max_episode_steps=20)  # truncations too
    normalizer = ObsNormalizer.from_data(dataset.transitions()["obs"])
    offline = offline_sampler(dataset, normalizer, "return-range", rtg=0.9, next_actions=True)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-3, 3, (200, 1)).astype(np.float32)
    phase = OnlinePhase(FixedActions(actions), dataset, offline, normalizer, Cfg(online_steps=200), "cpu",
                        reward_transform="return-range", returns_to_go_gamma=0.9)
    for _ in range(200):
        phase.interact()
    scale, _ = dataset.reward_affine("return-range")

    env = gym.make(dataset.eval_env_spec)
    rows, episode, ends = [], 0, []
    obs, _ = env.reset(seed=3 + ONLINE_SEED_OFFSET)
    for t in range(200):
        next_obs, reward, terminated, truncated, _ = env.step(actions[t])
        rows.append((obs, actions[t], reward * scale, next_obs, terminated, truncated and not terminated))
        if terminated or truncated:
            ends.append(t)
            episode += 1
            obs, _ = env.reset(seed=3 + ONLINE_SEED_OFFSET + episode)
        else:
            obs = next_obs
    stored = {k: v[:200].numpy() for k, v in phase.rows.items()}
    assert phase.size == 200 and len(phase.finished) == len(ends)
    np.testing.assert_allclose(stored["obs"], normalizer(np.array([r[0] for r in rows])), atol=1e-6)
    np.testing.assert_allclose(stored["next_obs"], normalizer(np.array([r[3] for r in rows])), atol=1e-6)
    np.testing.assert_array_equal(stored["actions"], actions)
    np.testing.assert_allclose(stored["rewards"], [r[2] for r in rows], rtol=1e-6)
    np.testing.assert_array_equal(stored["terminals"], [float(r[4]) for r in rows])
    np.testing.assert_array_equal(stored["timeouts"], [float(r[5]) for r in rows])
    assert stored["terminals"].sum() > 0 and stored["timeouts"].sum() > 0  # both kinds occurred
    # returns-to-go of the first finished episode, by hand; the unfinished last episode is -inf
    first = ends[0]
    expected, running = [], 0.0
    for t in range(first, -1, -1):
        running = rows[t][2] + 0.9 * (1.0 - rows[t][4]) * running
        expected.append(running)
    np.testing.assert_allclose(stored["returns_to_go"][:first + 1], expected[::-1], rtol=1e-5)
    assert np.all(np.isneginf(stored["returns_to_go"][ends[-1] + 1:]))
    # next actions: the next step's action within an episode, its own action at an episode's end
    inside = [t for t in range(199) if t not in ends]
    np.testing.assert_array_equal(stored["next_actions"][inside], actions[[t + 1 for t in inside]])
    np.testing.assert_array_equal(stored["next_actions"][ends], actions[ends])


def test_batches_mix_offline_and_online_rows_by_the_rule(pendulum_expert_id):
    """online_mix 0.5: half of every batch online rows, exactly; None: uniform over the union of offline and
    online rows (the online share of a batch is n_online / (n_offline + n_online))."""
    dataset = load_dataset(pendulum_expert_id)
    normalizer = ObsNormalizer.identity(3)
    for mix in (0.5, None):
        phase = OnlinePhase(FixedActions(np.zeros((1, 1), np.float32)), dataset, offline_sampler(dataset, normalizer),
                            normalizer, Cfg(online_steps=2000, online_mix=mix), "cpu")
        for _ in range(2000):
            phase.interact()
        phase.rows["rewards"][:phase.size] = 1e6  # marks online rows (every pendulum reward is <= 0)
        online = [float((phase.sample(256)["rewards"] == 1e6).float().mean()) for _ in range(40)]
        if mix == 0.5:
            assert online == [0.5] * 40
        else:
            expected = 2000 / (dataset.num_steps + 2000)  # 2000 / 12000
            assert abs(np.mean(online) - expected) < 4 * np.sqrt(expected * (1 - expected) / (256 * 40))


def test_the_switch_is_called_once_and_an_env_that_cannot_be_made_is_one_line(pendulum_expert_id, minari_root):
    dataset = load_dataset(pendulum_expert_id)
    agent = FixedActions(np.zeros((1, 1), np.float32))
    phase = OnlinePhase(agent, dataset, offline_sampler(dataset, ObsNormalizer.identity(3)), None,
                        Cfg(online_steps=50), "cpu")
    for _ in range(50):
        phase.interact()
    assert agent.switched == 1
    dataset.eval_env_spec = None  # a dataset that stores no env
    with pytest.raises(UserError, match="stores no environment spec"):
        OnlinePhase(agent, dataset, offline_sampler(dataset, ObsNormalizer.identity(3)), None, Cfg(online_steps=5),
                    "cpu")


FAST = dict(hidden_dims=(32, 32), eval_episodes=2, log_every=50, eval_every=100)


def test_resume_mid_online_equals_an_uninterrupted_run(pendulum_mixed_id, tmp_path):
    """Killed 150 env steps into the online phase (in the middle of an episode), resumed: the same weights,
    buffer and metrics as a run that never stopped."""
    straight = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path / "a", max_steps=100, online_steps=450,
                                    **FAST))
    first = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100, online_steps=150,
                                 **FAST))
    resumed = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path / "b", max_steps=100, online_steps=450,
                                   resume=first["run_dir"], **FAST))
    a, b = checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])
    assert_states_equal(a, b, ["actor", "value", "critic", "target_critic"])
    assert_same_online_phase(straight, resumed, rows=450)


def test_fine_tuning_raises_iql_above_its_offline_score(pendulum_mixed_id, tmp_path):
    """On the mixed pendulum set (15 expert and 45 random episodes) IQL's offline phase scores low; 3000 online
    env steps (15 episodes) with one update each raise the score well above the score at the switch."""
    summary = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path, max_steps=1000, online_steps=3000,
                                   hidden_dims=(64, 64), eval_episodes=5, eval_every=1000))
    assert summary["normalized_score_mean"] > summary["offline_normalized_score_mean"] + 30, summary
    assert summary["online_episodes"] == 15 and 0 < summary["online_regret"] < 1


def test_bad_online_input_is_one_line(pendulum_mixed_id, tmp_path):
    flags = ["--env", pendulum_mixed_id, "--device", "cpu", "--runs-dir", str(tmp_path), "--no-download"]
    assert_one_line_error(run_algorithm_cli("iql", *flags, "--online-steps", "-5"), "--online-steps must be 0")
    assert_one_line_error(run_algorithm_cli("bc", *flags, "--online-steps", "100"), "bc.py has no online phase")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_finished_offline_run_is_fine_tuned_with_online_settings_of_ones_choice(pendulum_mixed_id, tmp_path,
                                                                                  capsys):
    """`--resume RUN --online-steps N --online-...` on a finished offline run: the online_* settings may change
    until the online phase has begun, and not after."""
    from common.runs import run_cli

    offline = iql.train(run_config(iql.Config, pendulum_mixed_id, tmp_path, max_steps=60, **FAST))
    for online_steps, expected in ((100, 0), (150, 2)):
        import sys

        argv, sys.argv = sys.argv, ["iql.py", "--resume", offline["run_dir"], "--online-steps", str(online_steps),
                                    "--online-mix", "0.5" if online_steps == 100 else "0.25"]
        try:
            run_cli(iql.train, iql.Config)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            sys.argv = argv
        assert code == expected, capsys.readouterr().err
    assert "--online-mix 0.25 (the run has 0.5)" in capsys.readouterr().err
