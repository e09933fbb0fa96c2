"""Build D4RL-recipe offline datasets (random, medium, medium-replay, expert, medium-expert) for any Gymnasium
env, locally and reproducibly, as Minari datasets `local/<name>/<quality>-v0`.

Usage:
    python -m common.build pendulum        # the library's default suite (a few minutes on one core)
    python -m common.build cartpole        # discrete actions (Double DQN behaviour agent)
    python -m common.build hopper          # D4RL sizes: 1M SAC steps, 1M transitions per quality
    python -m common.build InvertedPendulum-v5 --agent-steps 50000 --dataset-size 50000
    python -m common.build pendulum --qualities medium expert --overwrite
    python -m common.build --help          # every flag, and the presets

The recipe is D4RL's for gym-mujoco (Fu et al. 2020; lecture "Offline Reinforcement Learning", D4RL slide):
  1. Train a behaviour agent online, keeping a policy checkpoint every --checkpoint-every env steps with
     the mean return of its deterministic policy on --eval-episodes evaluation episodes (the same env seeds
     for every checkpoint), and recording every episode it collects. Box actions: SAC
     (`common/build/behavior_sac.py`); Discrete actions: Double DQN (`common/build/behavior_dqn.py`).
  2. random = the randomly initialised policy network (the step-0 checkpoint, not uniform noise);
     expert = the final policy;
     medium = the checkpoint, strictly between random and expert, whose evaluation return is nearest
     R_random + (R_expert - R_random) / 3: D4RL's "about one third of the expert". Here R is the return
     of the deterministic policy (as checkpoints are evaluated), R_random and R_expert over --ref-episodes
     episodes. The achieved ratio (R_medium - R_random) / (R_expert - R_random), R_medium re-measured on
     --ref-episodes episodes, is printed and stored as `medium_ratio`.
  3. random / medium / expert datasets: --dataset-size transitions each, rolled out with the stochastic
     behaviour policy as D4RL did (SAC: actions sampled from the tanh-Gaussian; DQN: epsilon-greedy), as
     whole episodes; the last episode is cut at the budget and then marked truncated (`last_episode_cut`).
     medium-replay = the agent's recorded episodes up to the medium checkpoint's step (its replay buffer
     at that step; an episode running then is cut there and marked truncated).
     medium-expert = the medium episodes followed by the expert episodes, exactly.
  4. Reference scores (stored as Minari's ref_min_score / ref_max_score): the mean return of the random
     and of the expert behaviour policy, acting as they do in the datasets (stochastic), over
     --ref-episodes fresh evaluation episodes (not the datasets), so that 100 * (R - ref_min) /
     (ref_max - ref_min) is about 0 for the random data and about 100 for the expert data. (The
     deterministic random policy of a fresh network is nearly a constant action, not "random"; a
     deterministic offline agent that matches the deterministic expert may score a little above 100.)

Each dataset stores the eval env spec, algorithm_name, a description (recipe, seed, sizes) and extra
metadata: `recipe`, `seed`, `sizes`, `medium_ratio`, `medium_step`, `last_episode_cut` and `sha256`, a
checksum of its arrays as `common.datasets.load_dataset` returns them (`dataset_checksum`).

Same command, same datasets: everything is seeded from --seed, so a rebuild on the same device, thread count
and library versions gives the same checksums. Resumable: the agent's state is saved under --build-dir (at
episode ends) and finished rollouts are cached there; rerunning the interrupted command (add --skip-existing
if some datasets were already written) continues where it stopped and gives the same datasets as an
uninterrupted build. Datasets are written atomically, so an interrupted write never leaves a dataset under a
valid id.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch

from common.datasets import LOCAL_QUALITIES as QUALITIES  # random, medium, medium-replay, expert, medium-expert
from common.datasets import minari_root, save_episodes
from common.build.episodes import (MEDIUM_FRACTION, MEDIUM_RATIO_BAND, REFERENCE_SEED_OFFSET,  # noqa: F401
                                   ROLLOUT_SEED_OFFSET, ProgressBar, dataset_checksum, returns_of, rollout,
                                   to_minari)
from common.errors import UserError, fail

QUALITIES = tuple(QUALITIES)
EXPERT_MARGIN_SE = 3.0  # the expert must beat random by this many standard errors of the return gap...
EXPERT_MARGIN_REL = 0.05  # ...and by this fraction of |random return| (a scale-free floor for noiseless envs)
# Rollout seeds (env resets and policy sampling): a fixed offset from --seed per policy.


@dataclass(frozen=True)
class Preset:
    env: str
    agent_steps: int
    dataset_size: int
    checkpoint_every: int
    warmup_steps: int
    about: str
    scripted: bool = False  # a scripted expert instead of a trained agent: common/build/scripted.py


PRESETS: dict[str, Preset] = {
    # The library's embedded default: SAC solves Pendulum (about -150) in ~5k steps; 10k steps leave
    # margin for other seeds. Checkpoints every 500 steps give medium candidates on the steep part.
    "pendulum": Preset("Pendulum-v1", 10_000, 50_000, 500, 1_000, "default suite, ~3 min on one core"),
    # Double DQN on CartPole: greedy returns rise from ~10 to 500 (seeds 0-2) within 25k steps.
    "cartpole": Preset("CartPole-v1", 25_000, 50_000, 500, 1_000, "discrete actions, ~1.5 min on one core"),
    # D4RL's gym-mujoco sizes: 1M SAC steps and 1M transitions per quality (2M for medium-expert).
    # Time: SAC makes ~90 env steps per CPU-second here, so 1M steps take ~3 h on one core.
    "hopper": Preset("Hopper-v5", 1_000_000, 1_000_000, 10_000, 10_000, "D4RL sizes, ~3 h"),
    "halfcheetah": Preset("HalfCheetah-v5", 1_000_000, 1_000_000, 10_000, 10_000, "D4RL sizes, ~3 h"),
    "walker2d": Preset("Walker2d-v5", 1_000_000, 1_000_000, 10_000, 10_000, "D4RL sizes, ~3 h"),
    # The lecture's two-mode demonstrations (common/envs/fork.py): a scripted expert passes the obstacle on the
    # left or the right, 50/50; no agent is trained (no medium-replay). ~425 expert episodes.
    "fork": Preset("PointFork-v0", 0, 5_000, 0, 0, "scripted two-mode expert, seconds", scripted=True),
}
# Budgets for an env id that is not a preset (override with the flags).
CUSTOM_DEFAULTS = Preset("", 100_000, 100_000, 0, 5_000, "")  # checkpoint_every 0: agent_steps // 50


# --------------------------------------------------------------------------------------------------
# Small helpers: progress bar, checksum, rollouts
# --------------------------------------------------------------------------------------------------


def save_rollout(path: Path, episodes: list[dict], cut: bool) -> None:
    """Cache rolled-out episodes in the build folder (atomic: temporary file, then rename)."""
    tmp = path.with_name(path.stem + ".tmp.npz")
    try:
        np.savez(tmp, lengths=np.array([len(e["rewards"]) for e in episodes]), cut=np.array(cut),
                 **{k: np.concatenate([e[k] for e in episodes]) for k in episodes[0]})
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        fail(f"cannot write {path}: {err.strerror or err} (is the disk full?)")


def load_rollout(path: Path) -> tuple[list[dict], bool]:
    data = np.load(path)
    episodes, start, obs_start = [], 0, 0
    for n in data["lengths"]:
        n = int(n)
        ep = {k: data[k][start:start + n] for k in ("actions", "rewards", "terminations", "truncations")}
        ep["observations"] = data["observations"][obs_start:obs_start + n + 1]
        episodes.append(ep)
        start, obs_start = start + n, obs_start + n + 1
    return episodes, bool(data["cut"])


def check_expert_beats_random(random_returns: np.ndarray, expert_returns: np.ndarray, det_random: float,
                              det_expert: float, agent_steps: int) -> None:
    """Refuse (`UserError`, nothing written) unless the expert beats the random policy clearly.

    Clearly: the behaviour returns' mean gap exceeds EXPERT_MARGIN_SE standard errors of that gap (the
    return noise over the reference episodes) and EXPERT_MARGIN_REL of the random return's magnitude, and
    the deterministic expert beats the deterministic random policy. Otherwise the reference scores would
    be noise and normalised scores meaningless (a random dataset scoring thousands).
    """
    gap = float(expert_returns.mean() - random_returns.mean())
    n_r, n_e = len(random_returns), len(expert_returns)
    se = float(np.sqrt(random_returns.var(ddof=1) / n_r + expert_returns.var(ddof=1) / n_e)) if min(n_r, n_e) > 1 \
        else 0.0
    needed = max(EXPERT_MARGIN_SE * se, EXPERT_MARGIN_REL * abs(float(random_returns.mean())), 1e-6)
    if det_expert <= det_random or gap <= needed:
        fail(f"after {agent_steps} agent steps the expert (behaviour return {expert_returns.mean():.1f}, "
             f"deterministic {det_expert:.1f}) does not clearly beat the random policy ({random_returns.mean():.1f}, "
             f"{det_random:.1f}): gap {gap:.1f}, needed {needed:.1f} ({EXPERT_MARGIN_SE:g} standard errors of the "
             f"return noise, and {EXPERT_MARGIN_REL:.0%} of the random return): budget too small; raise "
             f"--agent-steps (nothing was written)")


def select_medium(checkpoints: Sequence, ref_min: float, ref_max: float) -> tuple[int | None, float]:
    """Index of the medium checkpoint and the target return R_random + (R_expert - R_random) / 3.

    Candidates are the checkpoints other than the first (random) and the last (expert) whose evaluation
    return lies strictly between `ref_min` and `ref_max`; the nearest to the target wins (the earliest on a
    tie). None when there is no candidate.
    """
    target = ref_min + MEDIUM_FRACTION * (ref_max - ref_min)
    best, best_gap = None, float("inf")
    for i in range(1, len(checkpoints) - 1):
        r = checkpoints[i].eval_return
        if ref_min < r < ref_max and abs(r - target) < best_gap:
            best, best_gap = i, abs(r - target)
    return best, target


# --------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------


def resolve_target(target: str) -> tuple[str, str, Preset]:
    """(dataset name, env id, budgets) for a preset name or a registered Gymnasium env id."""
    if target in PRESETS:
        return target, PRESETS[target].env, PRESETS[target]
    if target in gym.registry:
        name = re.sub(r"[^a-z0-9_-]+", "-", target.lower()).strip("-")
        return name, target, CUSTOM_DEFAULTS
    close = difflib.get_close_matches(target, list(PRESETS) + sorted(gym.registry), n=3, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    fail(f"unknown preset or env id '{target}'{hint} (presets: {', '.join(PRESETS)}; or any registered "
         f"Gymnasium env id)")


def make_agent(args, env_id: str, preset: Preset, build_dir: Path):
    """The behaviour agent for the env's action space: SAC for Box, Double DQN for Discrete."""
    try:
        probe = gym.make(env_id)
    except Exception as err:  # missing extra (box2d, mujoco), bad kwargs...
        fail(f"cannot create env '{env_id}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    obs_space, act_space = probe.observation_space, probe.action_space
    probe.close()
    if not isinstance(obs_space, gym.spaces.Box):
        fail(f"env '{env_id}' has observation space {obs_space}: only Box observations are supported")
    if isinstance(act_space, gym.spaces.Box):
        from common.build import behavior_sac as module
        agent_cls = module.SACAgent
    elif isinstance(act_space, gym.spaces.Discrete):
        from common.build import behavior_dqn as module
        agent_cls = module.DQNAgent
    else:
        fail(f"env '{env_id}' has action space {act_space}: only Box (SAC) and Discrete (DQN) are supported")

    agent_steps = args.agent_steps or preset.agent_steps
    # custom envs: 50 checkpoints over training, unless given
    checkpoint_every = args.checkpoint_every or preset.checkpoint_every or max(1, agent_steps // 50)
    checkpoint_every = min(checkpoint_every, agent_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(preset.warmup_steps, agent_steps // 10)
    if warmup >= agent_steps:
        fail(f"--warmup-steps {warmup} is not below --agent-steps {agent_steps}: the agent would never learn; "
             f"raise --agent-steps")
    overrides = {k: v for k, v in (("hidden", args.hidden), ("batch_size", args.batch_size)) if v}
    config = module.Config(env=env_id, max_episode_steps=args.max_episode_steps, seed=args.seed,
                           device=args.device, threads=args.threads, max_steps=agent_steps,
                           eval_episodes=args.eval_episodes,
                           checkpoint_every=checkpoint_every, checkpoint_dir=str(build_dir / "agent"),
                           resume=True, save_every=max(1_000, agent_steps // 20), warmup_steps=warmup,
                           **overrides)
    return agent_cls(config), module


def build(args: argparse.Namespace) -> dict:
    """Run the whole recipe; return per-quality results (used by the tests). Raises `UserError`."""
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    name, env_id, preset = resolve_target(args.target)
    if args.name:
        if not re.fullmatch(r"[\w-]+", args.name):
            fail(f"--name '{args.name}' may hold only letters, digits, '_' and '-'")
        name = args.name
    qualities = list(dict.fromkeys(args.qualities or QUALITIES))
    for flag in ("agent_steps", "dataset_size", "checkpoint_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            fail(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_episodes < 1 or args.ref_episodes < 1:
        fail("--eval-episodes and --ref-episodes must be >= 1")
    dataset_size = args.dataset_size or preset.dataset_size
    ids = {q: f"local/{name}/{q}-v0" for q in qualities}
    existing = [q for q in qualities if (minari_root() / ids[q]).exists()]
    if existing and args.skip_existing:
        print(f"already built, left as they are: {', '.join(ids[q] for q in existing)}", file=sys.stderr)
        qualities = [q for q in qualities if q not in existing]
        ids = {q: ids[q] for q in qualities}
        if not qualities:
            return {"results": {}, "skipped": existing}
    elif existing and not args.overwrite:
        listed = ", ".join(ids[q] for q in existing)
        fail(f"{listed} already exist{'s' if len(existing) == 1 else ''} under {minari_root()}; pass --overwrite "
             f"to replace, --skip-existing to keep, or --name to build under another name")

    if preset.scripted:  # no behaviour agent to train: common/build/scripted.py rolls the scripted expert out
        from common.build import scripted
        return scripted.build(args, name, env_id, qualities, ids, dataset_size, t_start)

    build_dir = Path(args.build_dir) if args.build_dir else Path("runs") / "datasets" / f"{name}-seed{args.seed}"
    if args.fresh:  # remove only what this builder wrote there
        for stale in [build_dir / "agent" / "agent_state.pt", *build_dir.glob("rollout-*.npz")]:
            stale.unlink(missing_ok=True)
    agent, module = make_agent(args, env_id, preset, build_dir)
    cfg = agent.config
    print(f"building {', '.join(ids.values())}\n  env {env_id}, behaviour agent {agent.algorithm_name} "
          f"({cfg.max_steps} env steps, checkpoint every {cfg.checkpoint_every}), {dataset_size} transitions "
          f"per rollout quality, seed {args.seed}, build folder {build_dir}", file=sys.stderr, flush=True)

    # 1. Train (or resume) the behaviour agent.
    bar = ProgressBar(f"train {agent.algorithm_name}", cfg.max_steps)
    checkpoints = agent.train(progress=bar)
    agent_rate = bar.close() if bar.first is not None else None
    random_ckpt, expert_ckpt = checkpoints[0], checkpoints[-1]

    # 2. Policy returns for choosing medium: the deterministic policies (as checkpoints were evaluated).
    def det_return(ckpt) -> float:
        return float(np.mean(agent.evaluate(ckpt.policy, args.ref_episodes)))

    det_random, det_expert = det_return(random_ckpt), det_return(expert_ckpt)
    # Reference scores: the random and expert behaviour policies as they generate the data (stochastic).
    random_returns = np.asarray(agent.evaluate(random_ckpt.policy, args.ref_episodes, stochastic=True,
                                               seed=args.seed + REFERENCE_SEED_OFFSET), dtype=np.float64)
    expert_returns = np.asarray(agent.evaluate(expert_ckpt.policy, args.ref_episodes, stochastic=True,
                                               seed=args.seed + REFERENCE_SEED_OFFSET), dtype=np.float64)
    ref_min, ref_max = float(random_returns.mean()), float(expert_returns.mean())
    print(f"over {args.ref_episodes} evaluation episodes: random {det_random:.1f} (deterministic) "
          f"{ref_min:.1f} (behaviour), expert {det_expert:.1f} (deterministic) {ref_max:.1f} (behaviour)",
          file=sys.stderr, flush=True)
    check_expert_beats_random(random_returns, expert_returns, det_random, det_expert, cfg.max_steps)

    # 3. Medium: the checkpoint nearest one third of the way from random to expert.
    chosen = {"random": random_ckpt, "expert": expert_ckpt}
    medium_ratio = None
    if {"medium", "medium-replay", "medium-expert"} & set(qualities):
        index, target = select_medium(checkpoints, det_random, det_expert)
        if index is None:
            evals = ", ".join(f"{c.step}: {c.eval_return:.1f}" for c in checkpoints)
            fail(f"no checkpoint lies between random ({det_random:.1f}) and expert ({det_expert:.1f}) "
                 f"(checkpoint returns {evals}): budget too small for a medium policy to exist; raise "
                 f"--agent-steps or lower --checkpoint-every")
        chosen["medium"] = checkpoints[index]
        det_medium = det_return(chosen["medium"])
        medium_ratio = (det_medium - det_random) / (det_expert - det_random)
        print(f"medium = checkpoint at step {chosen['medium'].step} (eval {chosen['medium'].eval_return:.1f}, "
              f"target {target:.1f}); over {args.ref_episodes} episodes it returns {det_medium:.1f}: ratio "
              f"(medium - random) / (expert - random) = {medium_ratio:.3f} (D4RL: about 1/3)",
              file=sys.stderr, flush=True)
        if not MEDIUM_RATIO_BAND[0] <= medium_ratio <= MEDIUM_RATIO_BAND[1]:
            fail(f"the medium checkpoint (step {chosen['medium'].step}) re-measured at ratio {medium_ratio:.2f}, "
                 f"outside [{MEDIUM_RATIO_BAND[0]}, {MEDIUM_RATIO_BAND[1]}] around D4RL's 1/3: its return is too "
                 f"noisy or the checkpoints too coarse; raise --agent-steps or lower --checkpoint-every "
                 f"(nothing was written)")

    # 4. Rollouts of the stochastic behaviour policies (cached in the build folder).
    env = module.make_env(env_id, args.max_episode_steps)
    obs_space, act_space = env.observation_space, env.action_space
    needed = {"random": ["random"], "medium": ["medium"], "expert": ["expert"],
              "medium-expert": ["medium", "expert"], "medium-replay": []}
    rollouts: dict[str, tuple[list[dict], bool]] = {}
    for policy_name in dict.fromkeys(p for q in qualities for p in needed[q]):
        ckpt = chosen[policy_name]
        cache = build_dir / f"rollout-{policy_name}-step{ckpt.step}-n{dataset_size}.npz"
        if cache.exists():
            rollouts[policy_name] = load_rollout(cache)
            continue
        seed = args.seed + ROLLOUT_SEED_OFFSET[policy_name]
        act = agent.make_policy(ckpt.policy, stochastic=True, seed=seed)
        bar = ProgressBar(f"rollout {policy_name}", dataset_size)
        rollouts[policy_name] = rollout(env, act, dataset_size, seed, bar)
        bar.close()
        save_rollout(cache, *rollouts[policy_name])

    # 5. Assemble and write each quality.
    recipe = {
        "behavior_agent": agent.algorithm_name,
        "agent_config": {k: getattr(cfg, k) for k in module.RECIPE_FIELDS},
        "behavior_policy": agent.behavior_note, "medium_fraction": MEDIUM_FRACTION,
        "reference_episodes": args.ref_episodes, "reference_policy": "behaviour (stochastic), as in the datasets",
        "deterministic_returns": {"random": det_random, "expert": det_expert},
        "rollout_seeds": {k: args.seed + v for k, v in ROLLOUT_SEED_OFFSET.items()},
    }
    results = {}
    for quality in qualities:
        if quality == "medium-replay":
            step = chosen["medium"].step
            episodes = agent.stream_episodes(step)
            # cut: the training episode running at the medium step went on after it
            cut = not bool(agent.buffer["terminations"][step - 1] or agent.buffer["truncations"][step - 1])
        elif quality == "medium-expert":
            episodes = rollouts["medium"][0] + rollouts["expert"][0]
            cut = rollouts["medium"][1] or rollouts["expert"][1]
        else:
            episodes, cut = rollouts[quality]
        returns = returns_of(episodes)
        steps = int(sum(len(e["rewards"]) for e in episodes))
        checksum = dataset_checksum(episodes, getattr(act_space, "start", 0))
        source = {
            "random": f"{dataset_size} transitions of the randomly initialised policy (step-0 checkpoint)",
            "medium": f"{dataset_size} transitions of the medium policy (checkpoint at step "
                      f"{chosen.get('medium', expert_ckpt).step})",
            "expert": f"{dataset_size} transitions of the expert (final) policy at step {expert_ckpt.step}",
            "medium-replay": f"the behaviour agent's replay buffer up to the medium checkpoint's step "
                             f"{chosen.get('medium', expert_ckpt).step} ({steps} transitions)",
            "medium-expert": "the medium dataset's episodes followed by the expert dataset's",
        }[quality]
        description = (
            f"D4RL-recipe '{quality}' dataset for {env_id}, built locally by common/build/recipe.py: {source}. "
            f"Behaviour agent {agent.algorithm_name}, {cfg.max_steps} env steps, checkpoints every "
            f"{cfg.checkpoint_every} steps; rollouts use {agent.behavior_note}; whole episodes, the last one cut "
            f"at the budget and marked truncated. medium = checkpoint nearest 1/3 of the way from random to "
            f"expert (ratio {medium_ratio if medium_ratio is None else round(medium_ratio, 3)}). Reference "
            f"scores: mean return of the random ({ref_min:.2f}) and expert ({ref_max:.2f}) behaviour policies "
            f"(stochastic, as in the datasets) over {args.ref_episodes} evaluation episodes. Seed {args.seed}; "
            f"{len(episodes)} episodes, {steps} steps; sha256 {checksum}.")
        extra = {
            "recipe": recipe, "seed": args.seed, "quality": quality,
            "sizes": {"dataset_size": dataset_size, "agent_steps": cfg.max_steps, "episodes": len(episodes),
                      "steps": steps},
            "medium_ratio": medium_ratio, "medium_step": chosen["medium"].step if "medium" in chosen else None,
            "expert_step": expert_ckpt.step, "last_episode_cut": cut, "sha256": checksum,
        }
        save_episodes(ids[quality], [to_minari(e, obs_space, act_space) for e in episodes], env.spec,
                      eval_env_spec=env.spec, ref_min_score=ref_min, ref_max_score=ref_max,
                      algorithm_name=f"{agent.algorithm_name} (D4RL recipe: {quality})",
                      description=description, extra_metadata=extra, overwrite=args.overwrite)
        results[quality] = {"id": ids[quality], "episodes": len(episodes), "steps": steps,
                            "return_mean": float(returns.mean()), "return_min": float(returns.min()),
                            "return_max": float(returns.max()),
                            "normalized": 100 * (float(returns.mean()) - ref_min) / (ref_max - ref_min),
                            "sha256": checksum}

    # 6. Summary.
    print(f"\n{'quality':<14} {'episodes':>8} {'steps':>9} {'return mean':>12} {'min':>10} {'max':>10} "
          f"{'normalised':>10}  dataset id")
    for quality, r in results.items():
        print(f"{quality:<14} {r['episodes']:>8} {r['steps']:>9} {r['return_mean']:>12.1f} "
              f"{r['return_min']:>10.1f} {r['return_max']:>10.1f} {r['normalized']:>10.1f}  {r['id']}")
    print(f"reference scores (behaviour policies, {args.ref_episodes} episodes): random {ref_min:.1f}, expert "
          f"{ref_max:.1f}; deterministic policies: random {det_random:.1f}, expert {det_expert:.1f}"
          + (f", medium {det_medium:.1f} = ratio {medium_ratio:.3f} (step {chosen['medium'].step})"
             if medium_ratio is not None else ""))
    for quality, r in results.items():
        print(f"sha256 {quality:<14} {r['sha256']}")
    elapsed = time.perf_counter() - t_start
    rate = f", agent {agent_rate:.0f} env steps/s" if agent_rate else ", agent restored from the build folder"
    print(f"built in {elapsed:.0f} s{rate}; datasets under {minari_root()}")
    return {"results": results, "ref_min": ref_min, "ref_max": ref_max, "medium_ratio": medium_ratio,
            "deterministic_returns": {"random": det_random, "expert": det_expert},
            "medium_step": chosen["medium"].step if "medium" in chosen else None, "agent": agent,
            "elapsed_s": elapsed, "agent_steps_per_s": agent_rate}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    presets = "\n".join(f"  {k:<12} {p.env:<15} {p.agent_steps:>9,} agent steps, {p.dataset_size:>9,} "
                        f"transitions per quality, checkpoint every {p.checkpoint_every:,} ({p.about})"
                        for k, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        prog="python -m common.build",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build D4RL-recipe datasets (random, medium, medium-replay, expert, medium-expert) as Minari "
                    "datasets local/<name>/<quality>-v0, with reference scores. Trains a behaviour agent (SAC for "
                    "Box actions, Double DQN for Discrete), keeps checkpoints, picks medium at ~1/3 of the way "
                    "from random to expert, rolls the policies out, and writes the datasets.",
        epilog=f"presets:\n{presets}\n\nAny other registered Gymnasium env id works too (defaults "
               f"{CUSTOM_DEFAULTS.agent_steps:,} agent steps, {CUSTOM_DEFAULTS.dataset_size:,} transitions, 50 "
               f"checkpoints).\n"
               f"Datasets go to $MINARI_DATASETS_PATH (else ~/.minari/datasets). Rerun an interrupted command to "
               f"resume it.")
    parser.add_argument("target", metavar="PRESET_OR_ENV_ID", help=f"a preset ({', '.join(PRESETS)}) or a "
                        "Gymnasium env id with Box observations and Box or Discrete actions")
    parser.add_argument("--qualities", nargs="+", choices=QUALITIES, metavar="Q",
                        help=f"build only these qualities (default: all of {' '.join(QUALITIES)})")
    parser.add_argument("--agent-steps", type=int,
                        help="env steps of behaviour-agent training (default: preset's)")
    parser.add_argument("--dataset-size", type=int,
                        help="transitions per random/medium/expert dataset (default: preset's)")
    parser.add_argument("--checkpoint-every", type=int,
                        help="env steps between policy checkpoints, the medium candidates (default: preset's)")
    parser.add_argument("--warmup-steps", type=int,
                        help="uniform random env steps before learning (default: preset's, at most 10%% of "
                             "--agent-steps)")
    parser.add_argument("--eval-episodes", type=int, default=5,
                        help="evaluation episodes per checkpoint (default 5)")
    parser.add_argument("--ref-episodes", type=int, default=20,
                        help="evaluation episodes for the reference scores and the medium ratio (default 20)")
    parser.add_argument("--hidden", type=int, help="hidden layer width of the agent's networks (default 256)")
    parser.add_argument("--batch-size", type=int, help="agent minibatch size (default: SAC 256, DQN 64)")
    parser.add_argument("--max-episode-steps", type=int,
                        help="time limit for the env (default: the env's registered one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="torch device of the agent (default cpu)")
    parser.add_argument("--name", help="dataset name in local/<name>/<quality>-v0 (default: preset, or the "
                        "lowercased env id)")
    parser.add_argument("--build-dir", help="folder for the agent's resumable state and cached rollouts "
                        "(default runs/datasets/<name>-seed<seed>)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace datasets that already exist")
    existing.add_argument("--skip-existing", action="store_true",
                          help="keep datasets that already exist and build only the missing ones (exit 0 when "
                               "all exist)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard the build folder's saved agent and cached rollouts instead of resuming")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        build(args)
    except UserError as err:
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end a progress line
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the build folder (add --skip-existing if "
              "some datasets were already written)", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
