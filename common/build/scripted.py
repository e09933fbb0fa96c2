"""The builder's path for presets whose behaviour policy is scripted (no agent to train), e.g. `fork`.

    python -m common.build fork            # local/fork/{random,medium,expert,medium-expert}-v0, seconds

D4RL's recipe (common/build/recipe.py) with the trained agent replaced by a scripted expert:
  expert        = the scripted expert with Gaussian action noise of std EXPERT_NOISE (a behaviour policy that
                  acts with noise, as D4RL's SAC experts sample their actions),
  medium        = the scripted expert with more action noise: the level of MEDIUM_NOISE_GRID whose return is
                  nearest one third of the way from random to expert (D4RL's "about one third of the expert"),
                  measured on --ref-episodes x 5 episodes per level,
  random        = uniform actions in the action box,
  medium-expert = the medium episodes followed by the expert episodes.
A scripted expert has no training history, so there is no medium-replay: it is skipped by default and refused
when asked for. Reference scores are the mean returns of random and expert over --ref-episodes fresh episodes,
as in the recipe. Datasets store the eval env spec, the recipe, seed, noise levels, sizes, the sha256 checksum
and `expert_policy`, the factory that rebuilds the expert (`package.module:factory`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import gymnasium as gym
import numpy as np

import common.envs  # noqa: F401  (registers the toy envs)
from common.build.episodes import (MEDIUM_FRACTION, MEDIUM_RATIO_BAND, REFERENCE_SEED_OFFSET, ROLLOUT_SEED_OFFSET,
                                   ProgressBar, dataset_checksum, returns_of, rollout, to_minari)
from common.datasets import minari_root, save_episodes
from common.errors import fail

# The scripted experts, by env id: the factory `package.module:factory(seed, noise)` returning a policy
# obs -> action with `reset()` (called at every episode start).
SCRIPTED_EXPERTS = {"PointFork-v0": "common.envs.fork:make_expert"}
EXPERT_NOISE = 0.1  # std of the expert's Gaussian action noise (actions in [-1, 1])
MEDIUM_NOISE_GRID = tuple(round(0.5 + 0.1 * i, 1) for i in range(21))  # 0.5 .. 2.5
MEDIUM_SEARCH_EPISODES_FACTOR = 5  # episodes per noise level = --ref-episodes x this (scripted rollouts are cheap)


class ResetsPolicy(gym.Wrapper):
    """Calls `policy.reset()` at every env reset, so that a scripted expert starts each episode afresh (draws
    its side) while the builder's `rollout` drives the env as for any other policy."""

    def __init__(self, env: gym.Env, policy):
        super().__init__(env)
        self.policy = policy

    def reset(self, **kwargs):
        self.policy.reset()
        return self.env.reset(**kwargs)


def load_factory(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def mean_return(env_id: str, policy, episodes: int, seed: int) -> float:
    """Mean return of `policy` over `episodes` episodes (env reset with seed, seed + 1, ...)."""
    env = gym.make(env_id)
    total = 0.0
    for i in range(episodes):
        if hasattr(policy, "reset"):
            policy.reset()
        obs, _ = env.reset(seed=seed + i)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(policy(obs))
            total += float(reward)
            done = terminated or truncated
    env.close()
    return total / episodes


def uniform_policy(space: gym.spaces.Box, seed: int):
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(space.low, space.high).astype(space.dtype)


def build(args: argparse.Namespace, name: str, env_id: str, qualities: list[str], ids: dict[str, str],
          dataset_size: int, t_start: float) -> dict:
    """Write the scripted preset's datasets; return per-quality results as `recipe.build` does."""
    if env_id not in SCRIPTED_EXPERTS:
        fail(f"no scripted expert for '{env_id}' (have: {', '.join(SCRIPTED_EXPERTS)})")
    if "medium-replay" in qualities:
        if args.qualities and "medium-replay" in args.qualities:
            fail(f"'{name}' has a scripted expert and no training history, so no medium-replay dataset; choose "
                 f"from random, medium, expert, medium-expert")
        qualities = [q for q in qualities if q != "medium-replay"]
        print(f"note: '{name}' has a scripted expert (no training history): no medium-replay dataset",
              file=sys.stderr)
        if not qualities:
            return {"results": {}}
    factory = load_factory(SCRIPTED_EXPERTS[env_id])
    env = gym.make(env_id)
    obs_space, act_space = env.observation_space, env.action_space
    print(f"building {', '.join(ids[q] for q in qualities)}\n  env {env_id}, scripted expert "
          f"{SCRIPTED_EXPERTS[env_id]} (action noise {EXPERT_NOISE}), {dataset_size} transitions per rollout "
          f"quality, seed {args.seed}", file=sys.stderr, flush=True)

    # Reference scores: random and expert behaviour policies over fresh episodes.
    ref_seed = args.seed + REFERENCE_SEED_OFFSET
    ref_min = mean_return(env_id, uniform_policy(act_space, ref_seed), args.ref_episodes, ref_seed)
    ref_max = mean_return(env_id, factory(ref_seed, EXPERT_NOISE), args.ref_episodes, ref_seed)
    if ref_max <= ref_min:
        fail(f"the scripted expert ({ref_max:.3f}) does not beat random actions ({ref_min:.3f}) on {env_id}")

    # Medium: the noise level whose return is nearest one third of the way from random to expert.
    noise_of = {"expert": EXPERT_NOISE}
    medium_ratio = None
    if {"medium", "medium-expert"} & set(qualities):
        search = args.ref_episodes * MEDIUM_SEARCH_EPISODES_FACTOR
        target = ref_min + MEDIUM_FRACTION * (ref_max - ref_min)
        returns = {n: mean_return(env_id, factory(ref_seed, n), search, ref_seed) for n in MEDIUM_NOISE_GRID}
        noise_of["medium"] = min(MEDIUM_NOISE_GRID, key=lambda n: (abs(returns[n] - target), n))
        medium_ratio = (returns[noise_of["medium"]] - ref_min) / (ref_max - ref_min)
        print(f"medium = the expert with action noise {noise_of['medium']}: return {returns[noise_of['medium']]:.3f} "
              f"over {search} episodes, ratio (medium - random) / (expert - random) = {medium_ratio:.3f} "
              f"(D4RL: about 1/3)", file=sys.stderr, flush=True)
        if not MEDIUM_RATIO_BAND[0] <= medium_ratio <= MEDIUM_RATIO_BAND[1]:
            fail(f"no noise level in {MEDIUM_NOISE_GRID[0]}..{MEDIUM_NOISE_GRID[-1]} gives a medium policy "
                 f"(ratio {medium_ratio:.2f} outside {MEDIUM_RATIO_BAND})")

    # Rollouts (whole episodes, the last one cut at the budget and marked truncated).
    rollouts = {}
    for policy_name in dict.fromkeys(p for q in qualities for p in
                                     {"random": ["random"], "medium": ["medium"], "expert": ["expert"],
                                      "medium-expert": ["medium", "expert"]}[q]):
        seed = args.seed + ROLLOUT_SEED_OFFSET[policy_name]
        if policy_name == "random":
            act, rollout_env = uniform_policy(act_space, seed), gym.make(env_id)
        else:
            act = factory(seed, noise_of[policy_name])
            rollout_env = ResetsPolicy(gym.make(env_id), act)
        bar = ProgressBar(f"rollout {policy_name}", dataset_size)
        rollouts[policy_name] = rollout(rollout_env, act, dataset_size, seed, bar)
        bar.close()
        rollout_env.close()

    recipe = {"behavior_policy": f"scripted expert {SCRIPTED_EXPERTS[env_id]} with Gaussian action noise",
              "expert_noise": EXPERT_NOISE, "medium_noise": noise_of.get("medium"),
              "medium_noise_grid": list(MEDIUM_NOISE_GRID), "medium_fraction": MEDIUM_FRACTION,
              "random_policy": "uniform actions in the action box", "reference_episodes": args.ref_episodes,
              "rollout_seeds": {k: args.seed + v for k, v in ROLLOUT_SEED_OFFSET.items()}}
    results = {}
    for quality in qualities:
        if quality == "medium-expert":
            episodes = rollouts["medium"][0] + rollouts["expert"][0]
            cut = rollouts["medium"][1] or rollouts["expert"][1]
        else:
            episodes, cut = rollouts[quality]
        returns = returns_of(episodes)
        steps = int(sum(len(e["rewards"]) for e in episodes))
        checksum = dataset_checksum(episodes)
        source = {"random": "uniform random actions",
                  "medium": f"the scripted expert with action noise {noise_of.get('medium')}",
                  "expert": f"the scripted expert with action noise {EXPERT_NOISE}",
                  "medium-expert": "the medium dataset's episodes followed by the expert dataset's"}[quality]
        description = (f"'{quality}' dataset for {env_id}, built locally by common/build/scripted.py: {source}; "
                       f"whole episodes, the last one cut at the budget and marked truncated. Reference scores: "
                       f"mean return of uniform random actions ({ref_min:.3f}) and of the expert ({ref_max:.3f}) "
                       f"over {args.ref_episodes} episodes. Seed {args.seed}; {len(episodes)} episodes, {steps} "
                       f"steps; sha256 {checksum}.")
        extra = {"recipe": recipe, "seed": args.seed, "quality": quality,
                 "sizes": {"dataset_size": dataset_size, "episodes": len(episodes), "steps": steps},
                 "medium_ratio": medium_ratio, "last_episode_cut": cut, "sha256": checksum,
                 "expert_policy": SCRIPTED_EXPERTS[env_id], "expert_noise": EXPERT_NOISE}
        save_episodes(ids[quality], [to_minari(e, obs_space, act_space) for e in episodes], env.spec,
                      eval_env_spec=env.spec, ref_min_score=ref_min, ref_max_score=ref_max,
                      algorithm_name=f"scripted expert (D4RL recipe: {quality})", description=description,
                      extra_metadata=extra, overwrite=args.overwrite)
        results[quality] = {"id": ids[quality], "episodes": len(episodes), "steps": steps,
                            "return_mean": float(returns.mean()), "return_min": float(returns.min()),
                            "return_max": float(returns.max()),
                            "normalized": 100 * (float(returns.mean()) - ref_min) / (ref_max - ref_min),
                            "sha256": checksum}
    env.close()

    print(f"\n{'quality':<14} {'episodes':>8} {'steps':>9} {'return mean':>12} {'normalised':>10}  dataset id")
    for quality, r in results.items():
        print(f"{quality:<14} {r['episodes']:>8} {r['steps']:>9} {r['return_mean']:>12.3f} {r['normalized']:>10.1f}  "
              f"{r['id']}")
    print(f"reference scores ({args.ref_episodes} episodes): random {ref_min:.3f}, expert {ref_max:.3f}"
          + (f"; medium = expert with action noise {noise_of['medium']}, ratio {medium_ratio:.3f}"
             if medium_ratio is not None else ""))
    for quality, r in results.items():
        print(f"sha256 {quality:<14} {r['sha256']}")
    elapsed = time.perf_counter() - t_start
    print(f"built in {elapsed:.0f} s; datasets under {minari_root()}")
    return {"results": results, "ref_min": ref_min, "ref_max": ref_max, "medium_ratio": medium_ratio,
            "medium_noise": noise_of.get("medium"), "elapsed_s": elapsed}
