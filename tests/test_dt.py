"""Decision Transformer: the causal mask, returns-to-go, windows and padding, the test-time loop, warm-up and
clipping, settings, bad input, resume, determinism, and learning on mixed data (DT at the expert target
beats BC, and its return rises with the target)."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import (assert_one_line_error, assert_states_equal, checkpoint_agent, load_algorithm, rollout_episodes,
                      run_algorithm_cli, run_config, train_straight_and_resumed)

from common.datasets import DataSpec, Episode, OfflineDataset, load_dataset, save_episodes
from common.errors import UserError
from common.evaluation import evaluate, evaluate_stateful
from common.runs import apply_dataset_settings

dt = load_algorithm("dt")

SPEC = DataSpec(obs_dim=3, act_dim=2, max_action=2.0, discrete=False)
K = 5


def _config(**overrides) -> "dt.Config":
    fields = dict(env="test/pendulum/mixed-v0", device="cpu", max_steps=100, context_len=K, embed_dim=16,
                  n_layers=2, n_heads=2, target_returns=(10.0, 5.0), return_scale=0.1, max_episode_len=50,
                  warmup_steps=10)
    fields.update(overrides)
    return dt.Config(**fields)


def _agent(**overrides) -> "dt.Agent":
    torch.manual_seed(0)
    return dt.Agent(_config(**overrides), SPEC, torch.device("cpu"))


def _window_batch(batch: int = 4, steps: int = K, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"returns_to_go": torch.randn(batch, steps, generator=g), "obs": torch.randn(batch, steps, 3, generator=g),
            "actions": 4 * torch.rand(batch, steps, 2, generator=g) - 2,
            "timesteps": torch.randint(0, 40, (batch, steps), generator=g), "mask": torch.ones(batch, steps)}


def _inputs(b: dict) -> tuple:
    return b["returns_to_go"], b["obs"], b["actions"], b["timesteps"]


# ---------------------------------------------------------------------------------------------------
# The transformer (lecture: "Transformer structure": the causal mask)
# ---------------------------------------------------------------------------------------------------


def test_causal_mask_a_later_token_never_changes_an_earlier_output():
    model = _agent(dropout=0.0).model.eval()
    b = _window_batch()
    with torch.no_grad():
        base = model.hidden_states(*_inputs(b))  # (B, 3K, d), tokens R^_1, s_1, a_1, R^_2, ...
        for position in range(3 * K):
            step, modality = divmod(position, 3)
            changed = {k: v.clone() for k, v in b.items()}
            key = ("returns_to_go", "obs", "actions")[modality]
            changed[key][:, step] += 1.0
            out = model.hidden_states(*_inputs(changed))
            assert torch.allclose(out[:, :position], base[:, :position], atol=1e-6), position
            assert (out[:, position] - base[:, position]).abs().max() > 1e-3, position


def test_predicted_action_sees_its_state_and_the_past_but_never_its_own_action():
    model = _agent(dropout=0.0).model.eval()
    b = _window_batch()
    with torch.no_grad():
        base = model(*_inputs(b))
        for t in range(K):
            own = {k: v.clone() for k, v in b.items()}
            own["actions"][:, t] += 1.0  # a_t: invisible to the prediction of a_<=t, visible to a_>t
            out = model(*_inputs(own))
            assert torch.allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-6), t
            if t < K - 1:
                assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-5, t
            state = {k: v.clone() for k, v in b.items()}
            state["obs"][:, t] += 1.0  # s_t: visible to the prediction of a_t
            out = model(*_inputs(state))
            assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-5, t


def test_actions_stay_within_the_bound_and_timesteps_past_the_table_are_clipped():
    model = _agent(dropout=0.0, max_episode_len=50).model.eval()
    b = _window_batch()
    with torch.no_grad():
        assert model(*_inputs(b)).abs().max() <= 2.0
        at = lambda t: model(b["returns_to_go"], b["obs"], b["actions"], torch.full((4, K), t))
        assert torch.equal(at(49), at(500))  # past the table: its last row
        assert not torch.allclose(at(48), at(49))


# ---------------------------------------------------------------------------------------------------
# Returns-to-go and windows (lecture: "Return-conditioned policies")
# ---------------------------------------------------------------------------------------------------


def _synthetic_dataset(lengths: list[int], seed: int = 0) -> OfflineDataset:
    """Episodes whose observation is (episode id, t, noise), so that a window shows where it came from."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i, n in enumerate(lengths):
        obs = np.stack([np.full(n + 1, i), np.arange(n + 1), rng.standard_normal(n + 1)], 1).astype(np.float32)
        truncations = np.zeros(n, bool)
        truncations[-1] = True
        episodes.append(Episode(obs, rng.uniform(-2, 2, (n, 2)).astype(np.float32),
                                (3 * rng.standard_normal(n)).astype(np.float32), np.zeros(n, bool), truncations))
    box = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    return OfflineDataset("synthetic", "synthetic", episodes, box, gym.spaces.Box(-2, 2, (2,), np.float32), None)


LENGTHS = [3, 12, 1, 40, 7, 25]  # some shorter than K = 5: padded windows from every start


def _sampled_windows(lengths=LENGTHS, n: int = 4000, scale: float = 0.25):
    dataset = _synthetic_dataset(lengths)
    config = _config(return_scale=scale, max_episode_len=max(lengths))
    sampler = dt.sequence_sampler(dataset, None, config, torch.device("cpu"))
    return dataset, sampler.sample(n)


def test_returns_to_go_are_exact_per_episode_against_a_brute_force_sum():
    dataset, b = _sampled_windows()
    checked = 0
    for i in range(len(b["mask"])):
        for j in range(K):
            if b["mask"][i, j] == 0:
                continue
            episode, t = int(b["obs"][i, j, 0]), int(b["obs"][i, j, 1])
            rewards = dataset.episodes[episode].rewards
            brute = 0.0
            for k in range(t, len(rewards)):  # R^_t = sum_(t' >= t) r_t', never past the episode's end
                brute += float(rewards[k])
            assert float(b["returns_to_go"][i, j]) == pytest.approx(0.25 * brute, rel=1e-5, abs=1e-6)
            checked += 1
    assert checked > 10_000


def test_windows_never_cross_episodes_and_padding_follows_the_real_steps():
    dataset, b = _sampled_windows()
    for i in range(len(b["mask"])):
        episode, start = int(b["obs"][i, 0, 0]), int(b["obs"][i, 0, 1])
        ep = dataset.episodes[episode]
        real = min(K, len(ep) - start)
        assert b["mask"][i].tolist() == [1.0] * real + [0.0] * (K - real)
        assert b["obs"][i, :real, 0].eq(episode).all()  # one episode
        assert b["obs"][i, :real, 1].tolist() == list(range(start, start + real))  # consecutive steps
        assert b["timesteps"][i, :real].tolist() == list(range(start, start + real))  # absolute timesteps
        assert torch.equal(b["actions"][i, :real], torch.as_tensor(ep.actions[start:start + real]))
        assert b["obs"][i, real:].eq(0).all() and b["actions"][i, real:].eq(0).all()
        assert b["returns_to_go"][i, real:].eq(0).all()
        assert (b["timesteps"][i] < max(LENGTHS)).all()  # padded timesteps clipped into the table


def test_episodes_are_drawn_in_proportion_to_their_length_and_every_start_occurs():
    n = 20_000
    dataset, b = _sampled_windows(n=n)
    episode, start = b["obs"][:, 0, 0].long(), b["obs"][:, 0, 1].long()
    counts = torch.bincount(episode, minlength=len(LENGTHS)).double()
    expected = torch.tensor(LENGTHS, dtype=torch.double) / sum(LENGTHS) * n
    assert ((counts - expected).abs() <= 4 * expected.sqrt() + 1).all(), (counts, expected)
    starts = {(int(e), int(s)) for e, s in zip(episode, start)}
    assert starts == {(e, s) for e, length in enumerate(LENGTHS) for s in range(length)}


def test_padding_is_masked_loss_and_gradients_ignore_padded_values():
    agent = _agent(dropout=0.0, max_episode_len=40)
    dataset, b = _sampled_windows(n=32)
    assert (b["mask"] == 0).any() and (b["mask"] == 1).any()

    def loss_and_grads(batch):
        agent.model.zero_grad(set_to_none=True)
        loss = dt.masked_mse(agent.model(*_inputs(batch)), batch["actions"], batch["mask"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in agent.model.parameters()]

    base_loss, base_grads = loss_and_grads(b)
    padded = b["mask"] == 0
    g = torch.Generator().manual_seed(1)
    garbage = {k: v.clone() for k, v in b.items()}
    garbage["obs"][padded] = 50 * torch.randn(int(padded.sum()), 3, generator=g)
    garbage["actions"][padded] = torch.rand(int(padded.sum()), 2, generator=g)
    garbage["returns_to_go"][padded] = 50 * torch.randn(int(padded.sum()), generator=g)
    garbage["timesteps"][padded] = torch.randint(0, 40, (int(padded.sum()),), generator=g)
    loss, grads = loss_and_grads(garbage)
    assert torch.allclose(loss, base_loss, rtol=1e-6)
    assert all(torch.allclose(a, b_, atol=1e-7) for a, b_ in zip(grads, base_grads))
    # ... while a real position counts
    real = {k: v.clone() for k, v in b.items()}
    real["actions"][b["mask"] == 1] = 0.5
    assert not torch.allclose(loss_and_grads(real)[0], base_loss)


def test_masked_mse_is_the_mean_over_real_positions_and_action_dimensions():
    predicted, actions = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    keep = mask.bool()
    expected = ((predicted[keep] - actions[keep]) ** 2).mean()
    assert torch.allclose(dt.masked_mse(predicted, actions, mask), expected)


# ---------------------------------------------------------------------------------------------------
# The update: AdamW, linear warm-up, gradient clipping
# ---------------------------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_and_gradients_are_clipped():
    agent = _agent(warmup_steps=4, lr=1e-3, grad_clip=0.25, weight_decay=1e-4)
    # AdamW: Adam with decoupled weight decay (what torch.optim.AdamW builds)
    assert agent.optimizer.param_groups[0]["decoupled_weight_decay"] is True
    assert agent.optimizer.param_groups[0]["weight_decay"] == 1e-4
    norms = []
    for step in range(6):
        logs = agent.update(_window_batch(16, seed=step))
        # step t (from 0) runs at lr * min((t + 1) / warmup, 1)
        assert float(agent.optimizer.param_groups[0]["lr"]) == pytest.approx(1e-3 * min((step + 1) / 4, 1.0))
        assert float(logs["train/lr"]) == pytest.approx(1e-3 * min((step + 1) / 4, 1.0))
        # the gradient the step used (left in .grad) has norm min(pre-clip norm, 0.25)
        used = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in agent.model.parameters()]))
        norms.append(float(logs["train/grad_norm"]))
        assert float(used) == pytest.approx(min(norms[-1], 0.25), rel=1e-4)
    assert max(norms) > 0.25  # clipping was exercised


# ---------------------------------------------------------------------------------------------------
# The test-time loop (lecture: "Return-conditioned policies: At test stage")
# ---------------------------------------------------------------------------------------------------


def test_rollout_decrements_the_target_by_each_reward_and_feeds_the_last_k_steps():
    agent = _agent(dropout=0.0, context_len=3, return_scale=0.1)
    targets = torch.tensor([10.0, 4.0])
    rollout = agent.rollout(targets)
    g = torch.Generator().manual_seed(0)
    rtg, obs, actions, received = [], [], [], []
    for t in range(7):
        o = torch.randn(2, 3, generator=g)
        previous = received[-1] if received else torch.zeros(2)  # zeros at the first step
        action = rollout(o, previous)
        # R^_t = R^_0 - sum_(t' < t) r_t', fed scaled
        rtg.append((targets - sum(received, torch.zeros(2))) * 0.1)
        obs.append(o)
        # the model on the explicit history: the last min(t + 1, K) steps, the current action slot zero
        first = max(0, t - 2)
        window_actions = torch.stack(actions[first:] + [torch.zeros(2, 2)], 1)
        with torch.no_grad():
            expected = agent.model.eval()(torch.stack(rtg[first:], 1), torch.stack(obs[first:], 1),
                                          window_actions, torch.arange(first, t + 1).expand(2, -1))[:, -1]
        assert torch.allclose(action, expected, atol=1e-6), t
        assert torch.allclose(rollout.returns_to_go[:, min(t, 2)], rtg[-1])
        actions.append(action)
        received.append(torch.randn(2, generator=g))


def test_evaluate_stateful_runs_every_group_on_the_same_episodes_and_passes_the_rewards(pendulum_mixed_id):
    dataset = load_dataset(pendulum_mixed_id, download=False)
    seen = []

    def policy(obs, rewards):  # stateless in its actions, so every group must score alike
        seen.append(rewards.clone())
        return torch.clamp(-3.0 * obs[:, 1:2] - obs[:, 2:3], -2.0, 2.0)

    results = evaluate_stateful(policy, dataset, None, episodes=3, seed=7, groups=2)
    assert len(results) == 2 and np.array_equal(results[0]["returns"], results[1]["returns"])
    calls = list(seen)  # the stateful loop's calls only
    plain = evaluate(lambda obs: policy(obs, torch.zeros(len(obs))), dataset, None, episodes=3, seed=7)
    assert np.allclose(results[0]["returns"], plain["returns"])
    assert results[0]["normalized_mean"] == pytest.approx(float(dataset.normalized_score(plain["returns"]).mean()))
    # the rewards handed to the policy: zeros first, then the previous step's reward (200-step episodes): all
    # but the last reward add up to the return (a Pendulum reward lies in [-16.3, 0])
    assert calls[0].eq(0).all() and len(calls) == 200
    received = torch.stack(calls[1:]).sum(0).double().numpy()
    returns = np.concatenate([results[0]["returns"], results[1]["returns"]])
    assert np.all(received >= returns) and np.all(received - returns <= 16.3)


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------


def test_defaults_are_the_papers():
    c = dt.Config()
    assert (c.context_len, c.embed_dim, c.n_layers, c.n_heads, c.dropout) == (20, 128, 3, 1, 0.1)
    assert (c.lr, c.weight_decay, c.grad_clip, c.batch_size) == (1e-4, 1e-4, 0.25, 64)
    assert dt.PAPER_BATCH_SIZE == 64
    d4rl = apply_dataset_settings(dt.Config(env="hopper-medium-v2"), dt.DATASET_SETTINGS)
    assert (d4rl.warmup_steps, d4rl.max_steps) == (10_000, 100_000)


@pytest.mark.parametrize("env, targets, scale", [
    ("hopper-medium-v2", (3600.0, 1800.0), 1e-3),
    ("hopper-expert-v2", (3600.0, 1800.0), 1e-3),
    ("mujoco/hopper/expert-v0", (3600.0, 1800.0), 1e-3),
    ("halfcheetah-medium-v2", (12000.0, 6000.0), 1e-3),
    ("walker2d-medium-v2", (5000.0, 2500.0), 1e-3),
    ("mujoco/walker2d/medium-v0", (5000.0, 2500.0), 1e-3),
    ("antmaze-umaze-v2", (1.0, 0.5), 1.0),
])
def test_dataset_settings_are_the_papers(env, targets, scale):
    config = apply_dataset_settings(dt.Config(env=env), dt.DATASET_SETTINGS)
    assert (config.target_returns, config.return_scale, config.max_steps) == (targets, scale, 100_000)


def test_local_datasets_take_targets_scale_and_table_size_from_the_data(pendulum_mixed_id, pendulum_refs):
    config = apply_dataset_settings(dt.Config(env=pendulum_mixed_id), dt.DATASET_SETTINGS)
    assert config.target_returns == () and config.return_scale == 0.0  # "from the data"
    assert config.warmup_steps == config.max_steps // 10
    dataset = load_dataset(pendulum_mixed_id, download=False)
    filled = dt.dataset_values(config, dataset)
    expert, random = pendulum_refs["expert"], pendulum_refs["random"]
    assert filled.target_returns == pytest.approx((expert, 0.5 * (expert + random)), abs=1e-3)
    largest = max(abs(e.total_return) for e in dataset.episodes)
    assert filled.return_scale == pytest.approx(1.0 / largest)
    assert filled.max_episode_len == 200  # Pendulum-v1's time limit and longest episode
    given = dt.Config(env=pendulum_mixed_id, target_returns=(-100.0,), return_scale=0.01, max_episode_len=300)
    assert dt.dataset_values(given, dataset) == given  # flags win


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line, before any run directory
# ---------------------------------------------------------------------------------------------------

SMALL = dict(embed_dim=16, n_layers=1, n_heads=1, context_len=5)


def _episodes_with(lengths: list[int], end_flags: bool = True) -> list[dict]:
    episodes = rollout_episodes("Pendulum-v1", None, len(lengths), seed=0)
    out = []
    for episode, n in zip(episodes, lengths):
        cut = {"observations": episode["observations"][:n + 1], "seed": episode["seed"],
               **{k: episode[k][:n].copy() for k in ("actions", "rewards", "terminations", "truncations")}}
        cut["truncations"][-1] = end_flags
        out.append(cut)
    return out


@pytest.fixture(scope="module")
def short_episode_id(minari_root) -> str:
    save_episodes("test/dt/short-episode-v0", _episodes_with([30, 1, 20]), "Pendulum-v1")
    return "test/dt/short-episode-v0"


@pytest.fixture(scope="module")
def no_boundary_id(minari_root) -> str:
    save_episodes("test/dt/no-boundary-v0", _episodes_with([60, 50], end_flags=False), "Pendulum-v1")
    return "test/dt/no-boundary-v0"


def _refused(tmp_path, env: str, match: str, **overrides) -> None:
    config = run_config(dt.Config, env, tmp_path, max_steps=5, **{**SMALL, **overrides})
    with pytest.raises(UserError, match=match):
        dt.train(config)
    assert not (tmp_path / "runs").exists(), "refused before any run directory was made"


def test_context_longer_than_every_episode_is_refused(tmp_path, pendulum_mixed_id):
    _refused(tmp_path, pendulum_mixed_id, "longer than the longest episode", context_len=201)


def test_episodes_shorter_than_two_steps_are_refused(tmp_path, short_episode_id):
    _refused(tmp_path, short_episode_id, "shorter than 2 steps")


def test_a_dataset_without_episode_boundaries_is_refused(tmp_path, no_boundary_id):
    _refused(tmp_path, no_boundary_id, "no episode boundaries")


def test_bad_model_sizes_are_refused(tmp_path, pendulum_mixed_id):
    _refused(tmp_path, pendulum_mixed_id, "must divide", embed_dim=16, n_heads=3)


def test_discrete_actions_are_refused():
    with pytest.raises(UserError, match="continuous"):
        dt.Agent(_config(), DataSpec(4, 2, 1.0, True), torch.device("cpu"))


@pytest.mark.parametrize("target, match", [(float("nan"), "must be finite"), (float("inf"), "must be finite"),
                                           (1e30, "more than 100 times the largest")])
def test_a_nan_or_absurd_target_is_refused_before_the_run(tmp_path, pendulum_mixed_id, target, match):
    # before: a warning, then training, NaN actions at the first evaluation and a run without a summary
    _refused(tmp_path, pendulum_mixed_id, match, target_returns=(-150.0, target))


def test_the_cli_refuses_a_nan_target_in_one_line(tmp_path, pendulum_mixed_id):
    proc = run_algorithm_cli("dt", "--env", pendulum_mixed_id, "--target-returns", "nan", "--no-download",
                             "--runs-dir", str(tmp_path / "runs"), "--device", "cpu")
    assert_one_line_error(proc, "--target-returns must be finite numbers, got nan")
    assert not (tmp_path / "runs").exists()


def test_the_cli_prints_one_line_and_exits_2(tmp_path, short_episode_id):
    proc = run_algorithm_cli("dt", "--env", short_episode_id, "--no-download", "--runs-dir", str(tmp_path / "runs"),
                             "--device", "cpu")
    assert_one_line_error(proc, "shorter than 2 steps")


def test_a_target_outside_the_data_warns_and_still_runs(tmp_path, pendulum_mixed_id, capfd):
    summary = dt.train(run_config(dt.Config, pendulum_mixed_id, tmp_path, max_steps=3, eval_episodes=1,
                                  target_returns=(500.0,), **SMALL))
    assert "warning: target return 500 lies outside the episode returns" in capfd.readouterr().err
    assert summary["targets"][0]["target_return"] == 500.0


# ---------------------------------------------------------------------------------------------------
# Runs: resume, determinism, per-target logs, loading the policy
# ---------------------------------------------------------------------------------------------------


def test_resume_continues_with_the_same_numbers(tmp_path, pendulum_mixed_id):
    # dropout is on (0.1): the resumed run must restore the torch RNG as well as the sampler's generator
    common = dict(log_every=50, checkpoint_every=100, eval_episodes=2, **SMALL)
    straight, resumed, a, b = train_straight_and_resumed(dt, pendulum_mixed_id, tmp_path, 100, 200, **common)
    assert a["step"] == b["step"] == 200
    assert_states_equal(a, b, ("model",))
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg"], y["exp_avg"]) and torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    losses = lambda d: [json.loads(line)["train/action_loss"] for line in open(f"{d}/metrics.jsonl")
                        if "train/action_loss" in line]
    assert losses(straight["run_dir"]) == losses(resumed["run_dir"]) and len(losses(straight["run_dir"])) == 4
    assert straight["targets"] == resumed["targets"]


def test_same_seed_same_run_other_seed_differs_and_every_target_is_logged(tmp_path, pendulum_mixed_id):
    runs = [dt.train(run_config(dt.Config, pendulum_mixed_id, tmp_path / str(i), max_steps=60, seed=seed,
                                log_every=30, eval_episodes=2, **SMALL)) for i, seed in enumerate([3, 3, 4])]
    weights = [checkpoint_agent(r["run_dir"])["model"] for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert runs[0]["targets"] == runs[1]["targets"] and len(runs[0]["targets"]) == 2
    rows = [json.loads(line) for line in open(f"{runs[0]['run_dir']}/metrics.jsonl")]
    final = {k: v for r in rows if r["step"] == 60 for k, v in r.items()}
    for entry in runs[0]["targets"]:
        tag = f"eval/target_{entry['target_return']:g}"
        assert final[f"{tag}/return_mean"] == entry["return_mean"]
        assert final[f"{tag}/normalized_score_mean"] == entry["normalized_score_mean"]
    assert final["eval/return_mean"] == runs[0]["targets"][0]["return_mean"]  # the first target's


def test_loaded_policy_keeps_the_history_and_replays_the_evaluation_loop(tmp_path, pendulum_mixed_id):
    from common.checkpoint import load_agent, load_policy
    from common.datasets import ObsNormalizer
    from common.evaluation import EVAL_SEED_OFFSET

    summary = dt.train(run_config(dt.Config, pendulum_mixed_id, tmp_path, max_steps=30, eval_episodes=1, **SMALL))
    agent, ckpt = load_agent(summary["run_dir"])
    # the evaluation loop (evaluate_stateful, the run's first target) for one episode, its actions recorded
    rollout, recorded = agent.rollout(torch.tensor([agent.config.target_returns[0]])), []

    def recording(obs, rewards):
        recorded.append(rollout(obs, rewards).numpy().copy())
        return torch.as_tensor(recorded[-1])

    result = evaluate_stateful(recording, load_dataset(pendulum_mixed_id), ObsNormalizer.from_state_dict(
        ckpt["normalizer"]), episodes=1, seed=0)[0]
    # load_policy's object stepped by hand through the same episode: raw observations, the previous reward
    policy = load_policy(summary["run_dir"])
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=EVAL_SEED_OFFSET)
    reward, total, actions = 0.0, 0.0, []
    for _ in range(200):
        actions.append(policy(obs, reward))
        obs, reward, terminated, truncated, _ = env.step(np.clip(actions[-1], -2.0, 2.0))
        total += reward
        if terminated or truncated:
            break
    assert len(actions) == len(recorded) == 200
    np.testing.assert_allclose(np.stack(actions), np.concatenate(recorded), atol=1e-6)
    assert total == pytest.approx(result["return_mean"], rel=1e-6)
    # reset() starts a new episode: the target again, an empty history; batches of rows work alike
    policy.reset()
    assert np.allclose(policy(env.reset(seed=EVAL_SEED_OFFSET)[0], 0.0), recorded[0][0], atol=1e-6)
    policy.reset()
    assert policy(np.zeros((4, 3), np.float32), np.zeros(4)).shape == (4, 1)
    with pytest.raises(UserError, match="call policy.reset"):
        policy(np.zeros((2, 3), np.float32))


# ---------------------------------------------------------------------------------------------------
# Learning on mixed data (lecture: "Return-conditioned policies")
# ---------------------------------------------------------------------------------------------------


def test_dt_at_the_expert_target_beats_bc_and_its_return_rises_with_the_target(tmp_path, pendulum_mixed_id,
                                                                                  pendulum_refs):
    # 15 expert + 45 uniform-random Pendulum episodes. Cloning the mixture averages the expert's torques with
    # random ones and fails (about -1300); conditioned on the expert's return DT imitates the expert part of the
    # data, conditioned on the random policy's return the random part. A small transformer (embedding 64,
    # 2 layers, K = 5, no dropout, lr 1e-3) for 5000 steps keeps the test short; it does not yet swing up as
    # reliably as the expert (about -1000 at the expert target, 10 episodes per target).
    high, low = round(pendulum_refs["expert"]), round(pendulum_refs["random"])  # about -145 and -1215
    budget = dict(max_steps=5000, lr=1e-3, eval_episodes=10)
    result = dt.train(run_config(dt.Config, pendulum_mixed_id, tmp_path, embed_dim=64, n_layers=2, n_heads=1,
                                 context_len=5, dropout=0.0, warmup_steps=100, target_returns=(high, low),
                                 **budget))
    at = {entry["target_return"]: entry["return_mean"] for entry in result["targets"]}
    bc = load_algorithm("bc")
    cloned = bc.train(run_config(bc.Config, pendulum_mixed_id, tmp_path, **budget))
    assert at[high] > cloned["return_mean"] + 150, (at, cloned["return_mean"])
    assert at[high] > at[low] + 150, at
