"""DAgger and HG-DAgger: imitation learning that asks the expert for labels at the states the learner visits.

Lecture sections: "What can go wrong in imitation learning?" (1. Compounding errors: the learner's states
p_pi(s) drift from the expert's p_expert(s), "covariate shift"), "Addressing Compounding Errors with DAgger"
(1. roll out pi_theta, 2. query the expert's a* at the visited states, 3. aggregate D <- D u {(s', a*)},
4. update min_theta L(pi_theta, D): "dataset aggregation"), the same title's second slide, "human gated
DAgger" (`--gated`: the learner drives, the expert takes control when the learner errs, and only the expert's
segments are aggregated), and the bounds C + H^2 eps (behaviour cloning, Theorem 2.1) against C + H eps
(DAgger, Theorem 2.2), which `python -m common.reporting.compounding` measures.
Papers: Ross, Gordon & Bagnell 2011 (DAgger, the beta-mixture pi_i = beta_i pi* + (1 - beta_i) pi_hat_i);
Kelly et al. 2019 (HG-DAgger).

Usage:
    python algorithms/dagger.py                                      # pendulum: expert = the local build's SAC
    python algorithms/dagger.py --env local/pendulum/expert-v0 --expert runs/datasets/pendulum-seed0 --gated
    python algorithms/dagger.py --env Pendulum-v1 --expert common.envs.pendulum:scripted_pendulum_expert
    python algorithms/dagger.py --env common.envs.fork:PointFork-v0 --expert common.envs.fork:make_expert

The environment: `--env` is a dataset (D4RL name, Minari id, local build), whose stored evaluation env is
the one the learner interacts with (its reference scores normalise the returns; its episodes can seed
round 0 with `--init-data`), or a Gymnasium env id (raw returns only): a registered one such as `Pendulum-v1`,
or `module:EnvId`, whose module registers the id when imported (Gymnasium's own form).
`--max-episode-steps H` sets the time limit H of collection and evaluation episodes.

The expert (`--expert`, the oracle pi* queried at visited states; `common/experts.py` loads it) is a run
directory of this library, a local dataset build folder (the builder's final SAC / Double DQN policy, the
policy behind the build's "expert" quality; left out, the build folder of the local build `--env` names), or
`package.module:factory` (a scripted expert). An expert that picks a mode per episode is reset at every
episode start.

Each round i (every `steps_per_round` gradient steps; `max_steps / steps_per_round` rounds):
  round 0: the expert drives (beta_0 = 1): behaviour cloning data (or `--init-data`: the dataset's episodes);
  DAgger, round i >= 1: each step executes the expert's action with probability beta_i, else the learner's;
    every visited state is labelled with a* and aggregated;
  HG-DAgger (`--gated`), round i >= 1: the learner drives; a simulated gate hands control to the expert when
    the normalised action discrepancy d(a, a*) = ||(a - a*) / (high - low)||_2 / sqrt(|A|) exceeds
    `threshold` and back once d < release_ratio * threshold (hysteresis); only the expert's steps are
    aggregated; the intervention rate per round is logged.
then `steps_per_round` BC steps on all of D (the policy is warm-started from the previous round, as in the
imitation library; Ross et al. retrain from scratch). The cost axis is the number of expert labels in D
(`dagger/expert_labels`); a simulated gate also queries the expert at every step (`dagger/expert_queries`),
which a human gate would not need to label.

Per-dataset settings (rounds via max_steps, episodes and steps per round, the beta schedule) follow the
imitation library's tuned DAgger settings for MuJoCo where they exist; they live in `DATASET_SETTINGS`.
The update is BC's (`bc.py`); collection steps envs and the expert on the host.
--compile compiles the whole update (common/optim.py); the observation statistics are tensors changed in place
(`set_normalizer`), so the compiled step reads their new values without a recompilation.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import (D4RL_TO_MINARI, DataSpec, OfflineDataset, TensorSampler, flat_dim,  # noqa: E402
                             flatten_observation, load_dataset)
from common.errors import fail  # noqa: E402
from common.evaluation import EVAL_SEED_OFFSET, evaluate, make_eval_envs  # noqa: E402
from common.experts import Expert, load_expert  # noqa: E402
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, merge_resumed, resolve_config, run_cli, saved_config, setup  # noqa: E402


@dataclass
class Config:
    # --- shared by every algorithm (same names, order and meaning in every file) ---
    env: str = "local/pendulum/expert-v0"
    """dataset whose evaluation env the learner interacts with (D4RL name, Minari id or local build such as
    local/pendulum/expert-v0), or a Gymnasium env id: registered (Pendulum-v1), or module:EnvId
    (common.envs.fork:PointFork-v0)"""
    seed: int = 0
    """seed for network initialisation, minibatch sampling and evaluation episodes"""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N"""
    threads: int = 1
    """torch CPU threads (1 is fastest for small MLPs and never stalls when another process holds a core)"""
    max_steps: int | None = None
    """gradient steps (None: from DATASET_SETTINGS)"""
    batch_size: int = 256
    """minibatch size (the papers' 256)"""
    eval_every: int = 1_000
    """evaluate every this many steps (0: only at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, stepped together in a vector env"""
    log_every: int = 1_000
    """write metrics every this many steps"""
    checkpoint_every: int = 10_000
    """write a checkpoint every this many steps (and at the end)"""
    checkpoint_dir: str | None = None
    """where checkpoint.pt goes (None: the run directory)"""
    resume: str | None = None
    """continue from this run directory (or checkpoint file) with the same --env and --seed"""
    track: bool = False
    """log to Weights & Biases (respects WANDB_MODE, e.g. offline)"""
    wandb_project: str = "offline-rl"
    """Weights & Biases project"""
    runs_dir: str = "runs"
    """runs go to <runs_dir>/<algo>/<dataset>/<seed>-<time>/"""
    download: bool = True
    """download Minari datasets that are not stored locally (when online)"""
    compile: bool = False
    """torch.compile the update (faster after a warm-up compilation)"""
    online_steps: int = 0
    """env steps of online fine-tuning after the offline phase, one update each (0: offline only; see
    common/online.py; a file whose Agent cannot explore refuses any other value)"""
    capture_video: bool = False
    """record the final evaluation's first episodes (and, with --eval-every, periodic ones) as MP4 in the run
    directory, and to W&B with --track"""
    # --- DAgger ---
    expert: str | None = None
    """pi_expert, queried for a* at visited states (common/experts.py): a run directory or checkpoint.pt of this
    library; a local build folder runs/datasets/<name>-seed<seed> (the build's final SAC/DQN policy); or
    package.module:factory, a zero-argument factory returning a callable from one flat observation to one
    action. None: the build folder of the local build --env names"""
    gated: bool = False
    """HG-DAgger: the learner drives, a simulated gate gives control to the expert when d(a, a*) > threshold;
    only the expert's segments are aggregated (no beta mixing)"""
    episodes_per_round: int | None = None
    """episodes rolled out per round, s'_1..s'_T of the slide (None: from DATASET_SETTINGS)"""
    steps_per_round: int | None = None
    """BC gradient steps per round on all of D, min_theta L(pi_theta, D) (None: from DATASET_SETTINGS);
    rounds = max_steps / steps_per_round"""
    beta_schedule: Literal["linear", "exponential"] | None = None
    """beta_i, the probability of executing the expert's action in round i (beta_0 = 1): linear
    min(1, max(0, (R - i) / R)) with R = beta_rampdown_rounds, or exponential p^i with p = beta_decay
    (None: from DATASET_SETTINGS)"""
    beta_rampdown_rounds: int | None = None
    """R of the linear schedule (imitation's default 15; 1 gives Ross et al.'s beta_i = 1[i = 0])"""
    beta_decay: float | None = None
    """p of the exponential schedule (imitation's MuJoCo setting 0.7; 1.0: beta = 1 in every round, i.e.
    behaviour cloning on expert rollouts with the same label budget)"""
    threshold: float = 0.2
    """tau of the gate (--gated): the expert takes control when d(a, a*) > tau, d in [0, 1] the action
    discrepancy normalised by the action range and sqrt(|A|) (discrete actions: d = 1[a != a*])"""
    release_ratio: float = 0.25
    """hysteresis of the gate: control returns to the learner once d(a, a*) < release_ratio * tau
    (LazyDAgger's tau_auto 0.25); between the two the gate keeps its current state (discrete actions: the
    expert takes over at the first disagreement and hands back at the first agreement)"""
    init_data: Literal["none", "dataset", "relabelled"] = "none"
    """round 0's data: expert rollouts (none), the --env dataset's (s, a) as stored (dataset), or its states
    labelled by the expert, (s, a*) (relabelled); dataset labels count as expert labels"""
    max_episode_steps: int | None = None
    """time limit H of collection and evaluation episodes (None: the env's own)"""
    policy: Literal["deterministic", "gaussian"] = "deterministic"
    """continuous-action head (as bc.py): deterministic pi(s) with the l2 loss, or Gaussian with the NLL"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the policy MLP"""
    lr: float = 1e-3
    """Adam learning rate (the imitation library's BC: 1e-3)"""
    normalize_obs: bool = True
    """standardise observations with the mean and std of round 0's data (eps 1e-3), then kept fixed"""


def _schedule(rounds: int, steps: int, episodes: int, schedule: str, ramp: int = 15, decay: float = 0.7) -> dict:
    return {"max_steps": rounds * steps, "steps_per_round": steps, "episodes_per_round": episodes,
            "beta_schedule": schedule, "beta_rampdown_rounds": ramp, "beta_decay": decay}


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name (dataset or Gymnasium id) or its Minari id. MuJoCo rows: the imitation library's tuned DAgger
# settings for seals (rollout_round_min_episodes and the beta schedule of tuned_hps/dagger_seals_*: Hopper
# Exp(0.7) with 10 episodes per round; HalfCheetah, Walker Exp(0.7) with 5; Ant Linear(15) with 5; Swimmer
# Linear(15) with SimpleDAggerTrainer.train's default of 3), 20 rounds of 5000 steps. Pendulum / CartPole
# (200 / 500-step episodes): 10 rounds of 1000 steps, 5 episodes per round, beta linear over R=3 rounds
# (learner-driven from round 3).
SMALL = _schedule(10, 1_000, 5, "linear", ramp=3)
HOPPER = _schedule(20, 5_000, 10, "exponential", decay=0.7)
CHEETAH_WALKER = _schedule(20, 5_000, 5, "exponential", decay=0.7)
ANT = _schedule(20, 5_000, 5, "linear", ramp=15)
SWIMMER = _schedule(20, 5_000, 3, "linear", ramp=15)
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", SMALL), ("Pendulum-v*", SMALL),
    ("local/cartpole/*", SMALL), ("CartPole-v*", SMALL),
    ("test/*", SMALL),
    ("hopper-*", HOPPER), ("mujoco/hopper/*", HOPPER), ("local/hopper*/*", HOPPER), ("Hopper-v*", HOPPER),
    ("halfcheetah-*", CHEETAH_WALKER), ("mujoco/halfcheetah/*", CHEETAH_WALKER),
    ("local/halfcheetah*/*", CHEETAH_WALKER), ("HalfCheetah-v*", CHEETAH_WALKER),
    ("walker2d-*", CHEETAH_WALKER), ("mujoco/walker2d/*", CHEETAH_WALKER),
    ("local/walker2d*/*", CHEETAH_WALKER), ("Walker2d-v*", CHEETAH_WALKER),
    ("ant-*", ANT), ("mujoco/ant/*", ANT), ("Ant-v*", ANT),
    ("mujoco/swimmer/*", SWIMMER), ("Swimmer-v*", SWIMMER),
    ("*", _schedule(20, 5_000, 5, "linear", ramp=15)),  # the imitation library's defaults: Linear(15)
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps the Gaussian head's variance in a sane range (as bc.py)
# Collection episode k of a run (counted over all rounds) resets its env with seed COLLECT_SEED_OFFSET +
# seed + k: disjoint from the evaluation seeds 100_000 + seed + i (common.evaluation.EVAL_SEED_OFFSET).
COLLECT_SEED_OFFSET = 1_000_000
NORMALIZER_EPS = 1e-3  # as common.datasets.ObsNormalizer


# --------------------------------------------------------------------------------------------------
# The learner pi_theta: BC's policy (repeated from bc.py) with the observation normaliser inside
# --------------------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Agent:
    """pi_theta, its optimiser and BC's update; observations are normalised inside (statistics of round 0's
    data, `set_normalizer`), so `act` takes raw flat observations."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        self.config, self.spec, self.device = config, spec, device
        self.discrete = spec.discrete
        self.gaussian = config.policy == "gaussian" and not spec.discrete
        self.policy = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        self.log_std = nn.Parameter(torch.zeros(spec.act_dim, device=device))  # Gaussian head only
        self.obs_mean = torch.zeros(spec.obs_dim, device=device)
        self.obs_std = torch.ones(spec.obs_dim, device=device)
        self.params = list(self.policy.parameters()) + ([self.log_std] if self.gaussian else [])
        self.optimizer = adam(self.params, config.lr, config)
        self.max_action = spec.max_action
        self._update = update_step(self._update_impl, config, self.optimizer)

    def set_normalizer(self, obs: np.ndarray) -> None:
        """Standardise with the mean and std of `obs` (N, obs_dim) from now on (in place: compiled graphs stay)."""
        obs = torch.as_tensor(obs, device=self.device)
        self.obs_mean.copy_(obs.mean(0))
        self.obs_std.copy_(obs.std(0, unbiased=False) + NORMALIZER_EPS)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(s) = max_action * tanh(MLP((s - mean) / std))."""
        return self.max_action * torch.tanh(self.policy((obs - self.obs_mean) / self.obs_std))

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.discrete:
            # min_theta -E_(s',a*)~D [ log pi_theta(a*|s') ]   (lecture: "Addressing Compounding Errors with DAgger", step 4)
            loss = F.cross_entropy(self.policy((obs - self.obs_mean) / self.obs_std), actions)
        elif self.gaussian:
            mean = self.mean_action(obs)
            log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
            # log pi_theta(a*|s') = sum_i [ -(a*_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi) / 2 ]
            log_prob = (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std
                        - 0.5 * math.log(2 * math.pi)).sum(-1)
            # min_theta -E_(s',a*)~D [ log pi_theta(a*|s') ]   (lecture: "Addressing Compounding Errors with DAgger")
            loss = -log_prob.mean()
        else:
            # min_theta L(pi_theta, D) = E_(s',a*)~D || pi_theta(s') - a* ||^2   (lecture: "Addressing Compounding Errors with DAgger")
            loss = F.mse_loss(self.mean_action(obs), actions)
        logs = {"train/policy_loss": loss.detach()}  # taken before the backward, which consumes loss's graph
        # inputs: the parameters the loss trains, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_std when the step is recompiled)
        loss.backward(inputs=self.params)
        self.optimizer.step()
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action for raw flat observations: the argmax (discrete) or the mean pi(s)."""
        if self.discrete:
            return self.policy((obs - self.obs_mean) / self.obs_std).argmax(-1)
        return self.mean_action(obs)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "log_std": self.log_std.detach().clone(),
                "obs_mean": self.obs_mean.clone(), "obs_std": self.obs_std.clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.obs_mean.copy_(state["obs_mean"])
        self.obs_std.copy_(state["obs_std"])
        load_optimizer(self.optimizer, state["optimizer"])


# --------------------------------------------------------------------------------------------------
# DAgger / HG-DAgger: the beta schedule, the gate, D, and one round (the slide's steps 1-3)
# --------------------------------------------------------------------------------------------------


def beta(config: Config, round_index: int) -> float:
    """beta_i: probability that a step executes the expert's action in round i (beta_0 = 1)."""
    if config.beta_schedule == "linear":  # imitation's LinearBetaSchedule(R)
        return min(1.0, max(0.0, (config.beta_rampdown_rounds - round_index) / config.beta_rampdown_rounds))
    return float(config.beta_decay ** round_index)  # imitation's ExponentialBetaSchedule(p); Ross et al.


def action_discrepancy(a: np.ndarray, a_star: np.ndarray, space: gym.Space) -> np.ndarray:
    """d(a, a*) in [0, 1] per row: ||(a - a*) / (high - low)||_2 / sqrt(|A|) for Box actions (n, act_dim);
    1[a != a*] for discrete actions (n,)."""
    if isinstance(space, gym.spaces.Discrete):
        return (np.asarray(a) != np.asarray(a_star)).astype(np.float64)
    width = (space.high - space.low).reshape(-1).astype(np.float64)
    diff = (np.asarray(a, np.float64) - np.asarray(a_star, np.float64)) / width
    return np.sqrt((diff ** 2).sum(-1) / diff.shape[-1])


class InterventionGate:
    """The simulated human of HG-DAgger, one per env: the expert takes control when d(a, a*) > threshold and
    hands it back once d(a, a*) < release_ratio * threshold; in between nothing changes (hysteresis, so the
    gate does not flicker around the threshold). `step(d)` returns which envs the expert drives now."""

    def __init__(self, num_envs: int, threshold: float, release_ratio: float):
        self.threshold, self.release = threshold, release_ratio * threshold
        self.expert_in_control = np.zeros(num_envs, dtype=bool)

    def step(self, discrepancy: np.ndarray) -> np.ndarray:
        take = ~self.expert_in_control & (discrepancy > self.threshold)
        hand_back = self.expert_in_control & (discrepancy < self.release)
        self.expert_in_control = (self.expert_in_control | take) & ~hand_back
        return self.expert_in_control.copy()


class AggregatedData:
    """D of the slide: every (s', a*) gathered so far, with a device sampler over it, the rounds done and
    their statistics. Its `state_dict` holds all of it (the arrays too), so a killed run resumes exactly."""

    def __init__(self, spec: DataSpec, device: torch.device, seed: int):
        self.device = device
        self.obs = np.zeros((0, spec.obs_dim), np.float32)
        self.actions = np.zeros(0, np.int64) if spec.discrete else np.zeros((0, spec.act_dim), np.float32)
        self.generator_state = torch.Generator(device=device).manual_seed(seed).get_state()
        self.sampler: TensorSampler | None = None
        self.rounds: list[dict] = []  # per round: beta, labels, queries, rollout return, errors, interventions
        self.queries = 0

    def __len__(self) -> int:
        return len(self.obs)

    def aggregate(self, obs: np.ndarray, actions: np.ndarray) -> None:
        """D <- D u {(s', a*)}; the sampler's random stream continues across rounds."""
        self.obs = np.concatenate([self.obs, obs.astype(np.float32)])
        self.actions = np.concatenate([self.actions, actions.astype(self.actions.dtype)])
        self._new_sampler()

    def _new_sampler(self) -> None:
        if self.sampler is not None:
            self.generator_state = self.sampler.generator.get_state()
        self.sampler = TensorSampler({"obs": self.obs, "actions": self.actions}, self.device, 0)
        self.sampler.generator.set_state(self.generator_state)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self.sampler.sample(batch_size)

    def state_dict(self) -> dict:
        generator = self.sampler.generator.get_state() if self.sampler is not None else self.generator_state
        return {"obs": torch.from_numpy(self.obs.copy()), "actions": torch.from_numpy(self.actions.copy()),
                "generator": generator, "rounds": [dict(r) for r in self.rounds], "queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        as_array = lambda x: x.numpy() if torch.is_tensor(x) else np.asarray(x)  # numpy before checkpoint format 2
        self.obs, self.actions = as_array(state["obs"]), as_array(state["actions"])
        self.rounds, self.queries = [dict(r) for r in state["rounds"]], state["queries"]
        self.generator_state, self.sampler = state["generator"], None
        if len(self.obs):
            self._new_sampler()


def learner_actions(agent: Agent, obs: np.ndarray, space: gym.Space) -> np.ndarray:
    """pi_theta(s') for flat observations (n, obs_dim) as numpy: clipped (n, act_dim), or (n,) indices."""
    action = agent.act(torch.as_tensor(obs, device=agent.device)).cpu().numpy()
    if isinstance(space, gym.spaces.Discrete):
        return action.astype(np.int64)
    return np.clip(action.reshape(len(obs), -1), space.low.reshape(-1), space.high.reshape(-1))


def collect_round(envs: gym.vector.VectorEnv, dataset: OfflineDataset, agent: Agent, expert: Expert,
                  seeds: list[int], beta_i: float, gate: InterventionGate | None,
                  rng: np.random.Generator) -> dict:
    """Run one episode in each env and return the labelled states to aggregate and the round's statistics.

    Each step: pi_theta proposes a, the expert gives a* = pi*(s'); the expert's action is executed with
    probability beta_i (DAgger) or while the gate gives it control (HG-DAgger). DAgger keeps (s', a*) for
    every visited state; HG-DAgger only for the steps the expert drove. Returns `obs` (N, obs_dim) and
    `actions` (N, act_dim) or (N,) in episode order, `steps` (states visited), `return_mean` (of the
    executed policy), `onpolicy_error` (mean d(a, a*) over visited states) and `intervention_rate`.
    """
    space = dataset.action_space
    n = envs.num_envs
    obs, _ = envs.reset(seed=seeds)
    expert.reset(n, seeds[0])  # a new episode in every env: a stateful expert starts afresh (picks its mode)
    done = np.zeros(n, dtype=bool)
    returns = np.zeros(n)
    states, labels, keep, errors, expert_drove = [], [], [], [], []
    while not done.all():
        flat = flatten_observation(obs, dataset.observation_space)
        proposed = learner_actions(agent, flat, space)  # 1. roll out pi_theta: a_hat_t
        a_star = expert(flat)  # 2. query the expert at the visited state: a*_t = pi*(s'_t)
        discrepancy = action_discrepancy(proposed, a_star, space)
        expert_acts = gate.step(discrepancy) if gate is not None else rng.random(n) < beta_i
        executed = np.where(expert_acts.reshape(-1, *[1] * (a_star.ndim - 1)), a_star, proposed)
        states.append(flat)
        labels.append(a_star)
        keep.append(~done & (expert_acts if gate is not None else True))
        errors.append(np.where(done, np.nan, discrepancy))
        expert_drove.append(np.where(done, np.nan, expert_acts))
        env_action = executed + int(space.start) if isinstance(space, gym.spaces.Discrete) else \
            executed.reshape(n, *space.shape)
        obs, reward, terminated, truncated, _ = envs.step(env_action)
        returns += np.where(done, 0.0, reward)
        done |= np.asarray(terminated) | np.asarray(truncated)
    # episode order: env 0's steps, then env 1's... (time-major arrays transposed)
    keep_em = np.stack(keep).T
    states_em = np.stack(states).transpose(1, 0, 2)[keep_em]
    labels_all = np.stack(labels)
    labels_em = labels_all.transpose(1, 0, *range(2, labels_all.ndim))[keep_em]
    errors, expert_drove = np.stack(errors), np.stack(expert_drove)
    return {"obs": states_em, "actions": labels_em, "steps": int(np.isfinite(errors).sum()),
            "return_mean": float(returns.mean()), "onpolicy_error": float(np.nanmean(errors)),
            "intervention_rate": float(np.nanmean(expert_drove))}


def dagger_round(config: Config, i: int, dataset: OfflineDataset, agent: Agent, expert: Expert,
                 data: AggregatedData, envs: gym.vector.VectorEnv) -> dict:
    """Round i: roll out pi_i (the beta_i mixture, or the learner under the gate) and label with the expert
    (steps 1-2; round 0: the expert, or --init-data), then aggregate into D (step 3). Returns the round's
    statistics (kept in `data.rounds`)."""
    if i == 0 and config.init_data != "none":
        out, beta_i = round_zero_from_dataset(config, dataset, expert), 1.0
    else:
        beta_i = 1.0 if i == 0 else (0.0 if config.gated else beta(config, i))
        gate = InterventionGate(config.episodes_per_round, config.threshold, config.release_ratio) \
            if config.gated and i > 0 else None
        first = COLLECT_SEED_OFFSET + config.seed + i * config.episodes_per_round
        seeds = list(range(first, first + config.episodes_per_round))
        out = collect_round(envs, dataset, agent, expert, seeds, beta_i, gate, np.random.default_rng([config.seed, i]))
    data.aggregate(out["obs"], out["actions"])  # 3. D <- D u {(s', a*)}
    data.queries += out["steps"] if config.init_data != "dataset" or i > 0 else 0
    if i == 0 and config.normalize_obs:
        agent.set_normalizer(data.obs)
    stats = {"round": i, "beta": beta_i, "new_labels": len(out["obs"]), "expert_labels": len(data),
             "expert_queries": data.queries, "rollout_return": out["return_mean"],
             "onpolicy_error": out["onpolicy_error"] if i > 0 or config.init_data == "none" else None,
             "intervention_rate": out["intervention_rate"] if config.gated else None}
    data.rounds.append(stats)
    print(f"round {i}: beta {beta_i:.2f}, +{stats['new_labels']} labels ({len(data)} in D), rollout return "
          f"{out['return_mean']:.1f}"
          + (f", on-policy error {stats['onpolicy_error']:.3f}" if stats["onpolicy_error"] is not None else "")
          + (f", interventions {100 * out['intervention_rate']:.1f}%" if config.gated and i > 0 else ""),
          file=sys.stderr, flush=True)
    return stats


# --------------------------------------------------------------------------------------------------
# Helpers train() uses: the environment, DAgger's checks, round 0 from a dataset, evaluation
# --------------------------------------------------------------------------------------------------


def gym_env_id(name: str) -> str | None:
    """The Gymnasium env id `--env` names, or None when it names a dataset: a registered id (`Pendulum-v1`), or
    Gymnasium's `module:EnvId`, whose module is imported first to register the id (`common.envs.fork:PointFork-v0`)."""
    module, colon, env_id = name.rpartition(":")
    if colon and re.fullmatch(r"[A-Za-z_][\w.]*", module):
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            importlib.import_module(module)
        except Exception as err:
            fail(f"--env {name}: cannot import {module}, which should register '{env_id}': {type(err).__name__}: {err}")
        if env_id not in gym.registry:
            fail(f"--env {name}: importing {module} registers no env '{env_id}'")
        return env_id
    return name if name in gym.registry and name not in D4RL_TO_MINARI else None


def resolve_dagger_config(config: Config) -> Config:
    """`common.runs.resolve_config`, after refusing an --env that is neither a dataset nor a Gymnasium id. A
    Gymnasium id has no dataset row of its own: DATASET_SETTINGS patterns match the registered id, and the run
    keeps --env as given (`module:EnvId` registers the id again when the run is resumed)."""
    if config.resume and not getattr(config, "_resume_merged", False):
        config = merge_resumed(config, *saved_config(config.resume))  # the resumed run's --env
    env_id = gym_env_id(config.env)
    if env_id is None and "/" not in config.env and config.env not in D4RL_TO_MINARI \
            and re.search(r"-v\d+$", config.env):
        close = ", ".join(difflib.get_close_matches(config.env, list(gym.registry), 3))
        fail(f"--env '{config.env}' is neither a registered Gymnasium env id nor a dataset name"
             + (f"; did you mean: {close}?" if close else "")
             + "; an env that a module registers is named module:EnvId (e.g. common.envs.fork:PointFork-v0)")
    resolved = resolve_config(dataclasses.replace(config, env=env_id or config.env, resume=None), DATASET_SETTINGS)
    return dataclasses.replace(resolved, env=config.env, resume=config.resume)


def interactive_env(config: Config) -> OfflineDataset:
    """The env the learner interacts with, as an `OfflineDataset` (evaluation and Run need its spaces, env
    spec and reference scores). A dataset keeps its episodes (for --init-data); a Gymnasium id has none and
    no reference scores. A new time limit H drops the dataset's reference scores (made for its own H)."""
    env_id = gym_env_id(config.env)
    if env_id is not None:
        spec = gym.spec(env_id)
        try:
            probe = gym.make(spec)
        except Exception as err:  # a missing extra (box2d, mujoco), bad kwargs...
            fail(f"cannot create env '{config.env}' for interactive collection: {type(err).__name__}: "
                 f"{str(err).splitlines()[0] if str(err) else ''}")
        dataset = OfflineDataset(name=env_id, minari_id=env_id, episodes=[],
                                 observation_space=probe.observation_space, action_space=probe.action_space,
                                 eval_env_spec=spec)
        probe.close()
    else:
        dataset = load_dataset(config.env, download=config.download)
        dataset.make_env().close()  # one clear line when the stored env cannot be made
    if not isinstance(dataset.action_space, (gym.spaces.Box, gym.spaces.Discrete)):
        fail(f"env of '{config.env}' has action space {dataset.action_space}; DAgger needs Box or Discrete")
    flat_dim(dataset.observation_space)  # one clear line for an unsupported observation space
    spec = dataset.eval_env_spec
    if config.max_episode_steps is not None:
        if config.max_episode_steps < 1:
            fail(f"--max-episode-steps must be at least 1, got {config.max_episode_steps}")
        if spec.max_episode_steps != config.max_episode_steps and dataset.ref_source is not None:
            print(f"note: time limit H={config.max_episode_steps} instead of {spec.max_episode_steps}: the "
                  f"dataset's reference scores no longer apply; raw returns only", file=sys.stderr)
            dataset = dataclasses.replace(dataset, ref_min_score=None, ref_max_score=None, ref_source=None)
        spec = dataclasses.replace(spec, max_episode_steps=config.max_episode_steps)
    elif spec.max_episode_steps is None:
        fail(f"env '{spec.id}' has no time limit: give one with --max-episode-steps so episodes end")
    return dataclasses.replace(dataset, eval_env_spec=spec)


def check_dagger_config(config: Config, dataset: OfflineDataset) -> None:
    """One clear line for DAgger's own bad settings (before any run folder is made)."""
    if config.episodes_per_round < 1 or config.steps_per_round < 1:
        fail(f"--episodes-per-round and --steps-per-round must be at least 1, got {config.episodes_per_round} "
             f"and {config.steps_per_round}")
    if not 0.0 < config.threshold < 1.0:
        fail(f"--threshold must lie in (0, 1) (d(a, a*) is normalised to [0, 1]), got {config.threshold}")
    if not 0.0 < config.release_ratio <= 1.0:
        fail(f"--release-ratio must lie in (0, 1], got {config.release_ratio}")
    if config.beta_rampdown_rounds < 1:
        fail(f"--beta-rampdown-rounds must be at least 1, got {config.beta_rampdown_rounds}")
    if not 0.0 <= config.beta_decay <= 1.0:
        fail(f"--beta-decay must lie in [0, 1], got {config.beta_decay}")
    if config.init_data != "none" and not dataset.episodes:
        fail(f"--init-data {config.init_data} needs --env to name a dataset; '{config.env}' is a Gymnasium id")


def round_zero_from_dataset(config: Config, dataset: OfflineDataset, expert: Expert) -> dict:
    """--init-data: the dataset's states with their stored actions, or labelled by the expert."""
    data = dataset.transitions()
    if config.init_data == "relabelled":
        expert.reset(len(data["obs"]), config.seed)  # a stateful expert: one episode per state
    actions = expert(data["obs"]) if config.init_data == "relabelled" else data["actions"]
    returns = [e.total_return for e in dataset.episodes]
    return {"obs": data["obs"], "actions": actions, "steps": len(data["obs"]),
            "return_mean": float(np.mean(returns)), "onpolicy_error": None, "intervention_rate": 1.0}


@torch.no_grad()
def evaluate_against_expert(agent: Agent, expert: Expert, dataset: OfflineDataset, episodes: int, seed: int,
                            device: torch.device, envs: gym.vector.VectorEnv | None = None, video=None) -> dict:
    """`common.evaluation.evaluate` of the learner alone, plus its on-policy action error against the
    expert at the states it visits: `onpolicy_error` (mean d(a, a*) per step) and `onpolicy_cost` (the sum
    over each episode, averaged: the cost l(pi) of Theorems 2.1 / 2.2 with d as the per-step loss), and
    `error_by_step` (T,), the mean d(a_t, a*_t) at each step t over the episodes still running."""
    record = []
    expert.reset(episodes, EVAL_SEED_OFFSET + seed)  # the evaluation episodes start together

    def policy(obs: torch.Tensor) -> torch.Tensor:
        flat = obs.cpu().numpy()
        record.append(action_discrepancy(learner_actions(agent, flat, dataset.action_space), expert(flat),
                                         dataset.action_space))
        return agent.act(obs)

    result = evaluate(policy, dataset, None, episodes, seed, device, envs, video=video)
    d = np.stack(record)  # (T, episodes); rows past an episode's end belong to the next one: masked
    live = np.arange(len(d))[:, None] < result["lengths"][None, :]
    result["onpolicy_error"] = float(d[live].mean())
    result["onpolicy_cost"] = float((d * live).sum(0).mean())
    result["error_by_step"] = (d * live).sum(1) / np.maximum(live.sum(1), 1)  # (T,): mean over live episodes
    return result


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(config: Config) -> dict:
    config = resolve_dagger_config(config)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = interactive_env(config)
    check_dagger_config(config, dataset)
    expert = load_expert(config.expert, dataset)
    print(f"expert: {expert.description}", file=sys.stderr)

    data = AggregatedData(dataset.spec, device, config.seed)
    agent = Agent(config, dataset.spec, device)
    run = Run("dagger", config, dataset, device)
    start = run.resume(agent, data)
    envs = make_eval_envs(dataset, config.eval_episodes)
    collect_envs = make_eval_envs(dataset, config.episodes_per_round)
    for step in run.steps(start):
        if (step - 1) % config.steps_per_round == 0:  # a new round: steps 1-3 of the slide
            with run.timed():
                stats = dagger_round(config, (step - 1) // config.steps_per_round, dataset, agent, expert, data,
                                     collect_envs)
                run.log(step, {f"dagger/{k}": v for k, v in stats.items() if v is not None})
        logs = agent.update(data.sample(config.batch_size))  # 4. min_theta L(pi_theta, D)
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                result = evaluate_against_expert(agent, expert, dataset, config.eval_episodes, config.seed,
                                                 device, envs, run.video_for(step))
                run.log_eval(step, result)
                run.log(step, {"eval/onpolicy_error": result["onpolicy_error"]})
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, data)
    result = evaluate_against_expert(agent, expert, dataset, config.eval_episodes, config.seed, device, envs,
                                     run.video_for(run.total_steps))
    run.log_eval(config.max_steps, result)
    run.log(config.max_steps, {"eval/onpolicy_error": result["onpolicy_error"]})
    envs.close()
    collect_envs.close()
    return run.finish(result, extra={
        "expert": expert.description, "gated": config.gated, "rounds": len(data.rounds),
        "expert_labels": len(data), "expert_queries": data.queries, "onpolicy_error": result["onpolicy_error"],
        "onpolicy_cost": result["onpolicy_cost"], "round_history": data.rounds})


if __name__ == "__main__":
    run_cli(train, Config)