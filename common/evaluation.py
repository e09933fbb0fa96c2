"""Evaluation: N episodes stepped together in a Gymnasium vector env, deterministic actions.

Reports mean and std of the raw return and of the normalised score
`100 * (R - ref_min) / (ref_max - ref_min)` when the dataset has reference scores (Minari metadata, or
D4RL's table for D4RL names); otherwise raw returns only, and the result says so (`normalized: None`).
Evaluation env seeds are `EVAL_SEED_OFFSET + seed + i`, disjoint from training seeds. With `video=` (a
`common.video.VideoRecorder`), the first episodes are also written as MP4: the same episodes and numbers, in
envs of the evaluation's own whose recorded ones render (see common/video.py for what the frames are).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from common.datasets import ObsNormalizer, OfflineDataset, flatten_observation

if TYPE_CHECKING:
    from common.video import VideoRecorder

EVAL_SEED_OFFSET = 100_000  # evaluation episodes never reuse a training seed


def make_eval_envs(dataset: OfflineDataset, num_envs: int, render: Sequence[int] = ()) -> gym.vector.VectorEnv:
    """`num_envs` copies of the dataset's evaluation env in a synchronous vector env.

    `render`: the indices of the envs that draw frames for a video (made with render_mode="rgb_array" and
    wrapped in `common.video.FrameCapture`); the others are made as always."""
    def maker(i: int) -> Callable[[], gym.Env]:
        if i not in render:
            return dataset.make_env
        from common.video import FrameCapture, headless

        headless()
        return lambda: FrameCapture(dataset.make_env(render_mode="rgb_array"))

    return gym.vector.SyncVectorEnv([maker(i) for i in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)


@torch.no_grad()
def evaluate(policy: Callable[[torch.Tensor], torch.Tensor], dataset: OfflineDataset,
             normalizer: ObsNormalizer | None, episodes: int, seed: int,
             device: torch.device | str = "cpu", envs: gym.vector.VectorEnv | None = None,
             video: VideoRecorder | None = None) -> dict:
    """Run `episodes` episodes at once and return their statistics.

    `policy` maps a float32 tensor `(episodes, obs_dim)` of flattened, normalised observations on
    `device` to actions `(episodes, act_dim)` (or `(episodes,)` integer actions for discrete datasets),
    deterministically. Each env runs exactly one episode (the first one it finishes); envs that finished
    keep stepping but are ignored. Returns a dict with `returns` (np.ndarray), `return_mean`,
    `return_std`, `normalized_mean`, `normalized_std` (None without reference scores) and `lengths`.
    `video`: record the first `video.episodes` episodes (see `evaluate_stateful`).
    """
    return evaluate_stateful(lambda obs, rewards: policy(obs), dataset, normalizer, episodes, seed, device,
                             envs, video=video)[0]


@torch.no_grad()
def evaluate_stateful(policy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dataset: OfflineDataset,
                      normalizer: ObsNormalizer | None, episodes: int, seed: int,
                      device: torch.device | str = "cpu", envs: gym.vector.VectorEnv | None = None,
                      groups: int = 1, video: VideoRecorder | None = None) -> list[dict]:
    """Run `groups` x `episodes` episodes at once for a policy that keeps state and sees rewards.

    `policy(obs, rewards)` is called once per step with the flattened, normalised observations
    `(groups * episodes, obs_dim)` and the rewards of the previous step `(groups * episodes,)` (zeros at the
    first step), float32 on `device`, and returns actions as `evaluate`'s policy does. A fresh policy object
    per call (e.g. a return-conditioned one that decrements its target by each reward). Env
    `g * episodes + i` runs evaluation episode i (seed `EVAL_SEED_OFFSET + seed + i`), so every group sees
    the same episodes. Returns one dict per group, with `evaluate`'s keys.

    `video` (a `common.video.VideoRecorder`): the first `video.episodes` episodes of group `video.group` are
    also written as MP4, one frame per state (T + 1 for T steps). The evaluation then steps envs of its own, made
    afresh with those rows rendering (the given `envs` are left alone): the same seeds, so the same episodes and
    the same numbers as without a video.
    """
    n = groups * episodes
    recorded = video.env_indices(episodes, groups) if video is not None else []
    own_envs = envs is None or video is not None
    envs = make_eval_envs(dataset, n, render=recorded) if own_envs else envs
    if envs.num_envs != n:
        raise ValueError(f"evaluate_stateful needs {n} envs ({groups} groups x {episodes}), got {envs.num_envs}")
    if video is not None:
        video.attach(envs, recorded)
    try:
        returns, lengths = _run_episodes(policy, dataset, normalizer, episodes, seed, device, envs)
    except BaseException:
        if video is not None:
            video.close(ok=False)
        raise
    finally:
        if own_envs:
            envs.close()
    if video is not None:
        video.close()
    results = []
    for g in range(groups):
        part = slice(g * episodes, (g + 1) * episodes)
        normalized = dataset.normalized_score(returns[part])
        results.append({
            "returns": returns[part], "lengths": lengths[part],
            "return_mean": float(returns[part].mean()), "return_std": float(returns[part].std()),
            "normalized_mean": None if normalized is None else float(normalized.mean()),
            "normalized_std": None if normalized is None else float(normalized.std()),
        })
    return results


def _run_episodes(policy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dataset: OfflineDataset,
                  normalizer: ObsNormalizer | None, episodes: int, seed: int, device: torch.device | str,
                  envs: gym.vector.VectorEnv) -> tuple[np.ndarray, np.ndarray]:
    """Step all `envs.num_envs` envs until each has finished its first episode: (returns, lengths), each (n,)."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=[EVAL_SEED_OFFSET + seed + i % episodes for i in range(n)])
    returns = np.zeros(n, dtype=np.float64)
    lengths = np.zeros(n, dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    rewards = torch.zeros(n, device=device)
    low = high = None
    if isinstance(dataset.action_space, gym.spaces.Box):
        low, high = dataset.action_space.low, dataset.action_space.high
    while not done.all():
        flat = flatten_observation(obs, dataset.observation_space)
        if normalizer is not None:
            flat = normalizer(flat)
        action = policy(torch.as_tensor(flat, device=device), rewards).cpu().numpy()
        if low is not None:
            action = np.clip(action.reshape(n, *dataset.action_space.shape), low, high)
        else:
            action = action.reshape(n).astype(np.int64) + int(dataset.action_space.start)
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += np.where(done, 0.0, reward)
        lengths += ~done
        done |= np.asarray(terminated) | np.asarray(truncated)
        rewards = torch.as_tensor(np.asarray(reward, dtype=np.float32), device=device)
    return returns, lengths


def eval_log_entries(result: dict) -> dict[str, float]:
    """The common log keys for an evaluation result (`eval/return_mean`, `eval/normalized_score_mean`...)."""
    out = {"eval/return_mean": result["return_mean"], "eval/return_std": result["return_std"]}
    if result["normalized_mean"] is not None:
        out["eval/normalized_score_mean"] = result["normalized_mean"]
        out["eval/normalized_score_std"] = result["normalized_std"]
    return out


def format_result(result: dict, dataset: OfflineDataset) -> str:
    """One line: return and normalised score (or why there is none)."""
    line = f"return {result['return_mean']:.1f} +- {result['return_std']:.1f}"
    if result["normalized_mean"] is not None:
        line += (f", normalized score {result['normalized_mean']:.1f} +- {result['normalized_std']:.1f} "
                 f"(reference scores: {dataset.ref_source})")
    else:
        line += " (no reference scores for this dataset: raw return only)"
    return line
