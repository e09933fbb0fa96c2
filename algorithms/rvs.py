"""RvS: reinforcement learning via supervised learning, an MLP policy pi(a | s, omega) conditioned on an outcome.

Lecture sections: "Return-conditioned policies" (imitate the entire dataset, max_pi sum log pi(a | s, R^),
then condition on a desired return at test time) in the "Variant Behavior Cloning" branch, after
"Filtered Behavior Cloning": instead of discarding the poor trajectories, condition on how good they were.
Paper: Emmons, Eysenbach, Kostrikov & Levine 2022, "RvS: What is Essential for Offline RL via Supervised
Learning?" (ICLR 2022); the authors' code is scottemmons/rvs.

Usage:
    python algorithms/rvs.py                                   # embedded default: local pendulum medium-replay
    python algorithms/rvs.py --env hopper-medium-replay-v2     # RvS-R
    python algorithms/rvs.py --env antmaze-umaze-v2            # RvS-G (from DATASET_SETTINGS)
    python algorithms/rvs.py --batch-size 256 --max-steps 20000  # a cheaper run on one CPU core

Two conditionings omega, concatenated to the state (no observation normalisation, as the paper):
  * RvS-R (`--conditioning reward`): omega_t = (sum_{t' >= t} r_t') / (H - t), the average reward-to-go,
    with H the longest trajectory in the dataset (a trajectory that terminates early counts as earning 0
    for the rest of H). At test time omega is fixed for the whole episode at
    target = (ref_min + (ref_max - ref_min) * frac) / H, with ref_min / ref_max the dataset's reference
    scores (D4RL's table, or Minari metadata; without them the dataset's worst and best episode returns).
  * RvS-G (`--conditioning goal`): omega is a goal: the achieved goal of a state drawn from the same
    trajectory's future (GCSL-style pairs t1 <= t2, trajectories drawn uniformly, as the authors' code). It
    needs goal information: a Dict observation with `achieved_goal` and `desired_goal` (the gymnasium-robotics
    convention of the Minari mazes); `--goal-columns 0 1` keeps only those components (xy). The
    `desired_goal` part of the observation is zeroed in the policy's input (in the data it is the goal the
    behaviour policy chased, not the hindsight goal omega); at test time omega is the env's desired goal.

The policy is a diagonal Gaussian with a state-independent learned log-std (the authors' stable-baselines3
ActorCriticPolicy with the value head removed), initialised as that policy is (SB3's ortho_init: orthogonal
weights with gain sqrt(2) in the hidden layers and 0.01 in the action head, zero biases, log-std 0), trained
by negative log-likelihood with Adam at a constant learning rate; evaluation acts with the mean.
Minibatches are drawn iid (uniformly with replacement, every step), where the authors' PyTorch Lightning loader
iterates the data in order without shuffling (RvS-R; RvS-G's goal sampler draws at random in both): the same
number of samples per epoch, not the same order.

THE PAPER TUNES THE TARGET FRACTION ONLINE. Its RvS-R scores are the best over a sweep of fractions
(0.3, 0.4, ..., 1.2), each chosen by evaluating in the environment. This file evaluates the whole sweep at
once (all fractions' episodes stepped together, the same evaluation seeds for every fraction) and logs each
fraction's score as `eval/frac_<f>/return_mean` and `eval/frac_<f>/normalized_score_mean`; `eval/return_mean`
and the summary report only the fixed `--main-fraction` (1.0: the reference expert score), and the final
line says which fraction scored best. Picking the best of the sweep is online tuning: say so if you do.

Per-dataset settings (the authors' configs, experiments/config/d4rl/*.cfg) live in `DATASET_SETTINGS`:
conditioning reward on gym locomotion, goal on antmaze and kitchen; dropout 0 (0.1 on kitchen); training
length, in the authors' unit: 2000 epochs on gym, 50 on kitchen (`--epochs`), 20k steps on antmaze. An
epoch is ceil(N / batch) steps of the batch actually used (`--batch-size`), as the authors' loader counts
it, N being the examples of one epoch: the dataset's transitions for RvS-R, and for RvS-G the fixed 2,450,000
pairs per epoch of the authors' goal sampler (D4RLIterableDataset's epoch_size, whatever the dataset's size).
So a smaller batch trains more steps on the same samples: hopper-medium-replay (402k transitions) gets
2000 x 25 = 50k steps of batch 16384; kitchen 50 x 150 = 7,500 steps of 16384, or the authors' 50 x 9,571 =
478,550 steps with their `--batch-size 256`. Fixed for every dataset as the paper: hidden 1024x1024, lr 1e-3,
batch 16384 (gym and antmaze; kitchen used 256). On one CPU core a batch-16384 update of the 1024-wide MLP
takes about 0.8 s, so the local pendulum rows train for a fixed few steps; `--batch-size 256` is 75x cheaper
per step.

--compile compiles the whole update (common/optim.py), dropout's mask drawn on the device inside.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import (DataSpec, OfflineDataset, TensorSampler, discounted_returns_to_go, flat_dim,  # noqa: E402
                             load_dataset)
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, evaluate_stateful, make_eval_envs  # noqa: E402
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, apply_dataset_settings, resolve_config, run_cli, setup  # noqa: E402

PAPER_BATCH_SIZE = 16_384  # the authors' batch for gym RvS-R and antmaze RvS-G (kitchen: 256)
GOAL_EPOCH_EXAMPLES = 2_450_000  # examples in one epoch of the authors' RvS-G sampler (D4RLIterableDataset)
PAPER_FRACTIONS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)  # the sweep of the authors' analysis
FRACTION_RANGE = (0.0, 2.0)  # accepted target fractions: from the reference minimum to twice its range


@dataclass
class Config:
    # --- shared by every algorithm (same names, order and meaning in every file) ---
    env: str = "local/pendulum/medium-replay-v0"
    """dataset: a D4RL name (hopper-medium-v2), a Minari id (mujoco/hopper/expert-v0) or a local build
    (local/pendulum/medium-replay-v0); `python -m common.datasets --list` shows what is stored locally"""
    seed: int = 0
    """seed for network initialisation, minibatch sampling and evaluation episodes"""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N"""
    threads: int = 1
    """torch CPU threads (1 is fastest for small MLPs and never stalls when another process holds a core)"""
    max_steps: int | None = None
    """gradient steps (None: from --epochs, or from DATASET_SETTINGS)"""
    batch_size: int = PAPER_BATCH_SIZE
    """minibatch size (the paper's 16384 for gym and antmaze; 256 for kitchen)"""
    eval_every: int = 5_000
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
    # --- RvS ---
    epochs: int | None = None
    """training length in the authors' unit: max_steps = epochs * ceil(N / batch_size), N the examples of one
    epoch (the transitions for RvS-R, 2,450,000 for RvS-G) (None: from DATASET_SETTINGS, where the authors give
    epochs; give --epochs or --max-steps, not both)"""
    conditioning: Literal["reward", "goal"] | None = None
    """omega: reward (RvS-R, the average reward-to-go) or goal (RvS-G, an achieved goal from the same
    trajectory's future) (None: from DATASET_SETTINGS; reward on locomotion, goal on antmaze and kitchen)"""
    target_fractions: tuple[float, ...] = PAPER_FRACTIONS
    """RvS-R evaluation sweep: target = (ref_min + (ref_max - ref_min) * frac) / H for each frac, all
    evaluated at once; the paper reports the best of 0.3..1.2, i.e. tunes it online"""
    main_fraction: float = 1.0
    """RvS-R: the fraction reported as eval/return_mean and in the summary, and the omega of a reloaded
    policy (1.0: the reference expert score); always evaluated with the sweep"""
    goal_columns: tuple[int, ...] | None = None
    """RvS-G: components of the achieved goal that form omega (e.g. 0 1 for xy; None: all of them)"""
    hidden_dims: tuple[int, ...] = (1024, 1024)
    """hidden layer sizes of the policy MLP (the paper's 1024x1024)"""
    dropout: float | None = None
    """dropout after each hidden ReLU (None: from DATASET_SETTINGS; the paper's 0, 0.1 on kitchen)"""
    lr: float = 1e-3
    """Adam learning rate, constant (the paper's 1e-3)"""


# Each row gives the training length one way, the other field None: epochs where the authors count epochs
# (gym: 2000, kitchen: 50; max_steps then follows from the data in train()), max_steps where they count steps
# (antmaze: 20k, the authors' config) or where this file sets a budget (the local and test sets).
GYM = {"conditioning": "reward", "dropout": 0.0, "epochs": 2_000, "max_steps": None}
ANTMAZE = {"conditioning": "goal", "dropout": 0.0, "epochs": None, "max_steps": 20_000}
KITCHEN = {"conditioning": "goal", "dropout": 0.1, "epochs": 50, "max_steps": None}

# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The local pendulum sets hold 3k-100k transitions: 500 steps of batch 16384 are
# 80 (medium-expert) to 2700 (medium-replay) epochs, about 5 minutes on one free CPU core.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("antmaze-*", ANTMAZE),
    ("D4RL/antmaze/*", ANTMAZE),
    ("D4RL/pointmaze/*", ANTMAZE),
    ("kitchen-*", KITCHEN),
    ("D4RL/kitchen/*", KITCHEN),
    ("local/pendulum/*", {**GYM, "epochs": None, "max_steps": 500}),
    ("test/*", {**GYM, "epochs": None, "max_steps": 2_000}),
    ("*", GYM),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps the Gaussian's variance in a sane range (as bc.py)


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear-ReLU(-Dropout) blocks, then a linear output (the authors' DropoutActivation order)."""
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


@torch.no_grad()
def sb3_orthogonal_init(policy: nn.Sequential) -> None:
    """The authors' initialisation, stable-baselines3's ActorCriticPolicy with ortho_init (SB3 <= 1.2, which
    their setup pins): orthogonal weights with gain sqrt(2) in the hidden layers (the mlp_extractor) and 0.01
    in the action head (action_net), every bias 0."""
    linears = [m for m in policy if isinstance(m, nn.Linear)]
    for layer in linears:
        nn.init.orthogonal_(layer.weight, gain=0.01 if layer is linears[-1] else math.sqrt(2))
        nn.init.zeros_(layer.bias)


# --------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------


class Agent:
    """The outcome-conditioned Gaussian policy pi(a | s, omega), its optimiser and the update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("rvs.py is for continuous actions (Box); this dataset has discrete actions")
        # fields left at None (an Agent built straight from Config(), as the benchmark does) get the
        # per-dataset values of config.env, exactly as train() fills them
        config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.goal_conditioned = config.conditioning == "goal"
        if self.goal_conditioned and config.goal_columns is None:
            fail("rvs.py --conditioning goal: the Agent needs --goal-columns (train() fills them from the dataset)")
        omega_dim = len(config.goal_columns) if self.goal_conditioned else 1
        self.max_action = spec.max_action
        self.policy = mlp(spec.obs_dim + omega_dim, config.hidden_dims, spec.act_dim, config.dropout).to(device)
        sb3_orthogonal_init(self.policy)
        self.log_std = nn.Parameter(torch.zeros(spec.act_dim, device=device))  # state-independent, init 0 (SB3)
        self.params = [*self.policy.parameters(), self.log_std]
        self.optimizer = adam(self.params, config.lr, config)
        # what act() conditions on, set by train(): RvS-R's omega for --main-fraction; RvS-G's observation
        # layout (zeroed desired goal in the state, its columns as omega). Saved with the networks.
        self.target_omega = torch.zeros(1, device=device)
        self.state_mask = torch.ones(spec.obs_dim, device=device)
        self.desired_columns = torch.zeros(omega_dim, dtype=torch.long, device=device)
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def policy_input(self, obs: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        """[s, omega]: the state (desired goal zeroed for RvS-G) with the outcome concatenated."""
        state = obs * self.state_mask if self.goal_conditioned else obs
        return torch.cat([state, omega.reshape(obs.shape[0], -1)], dim=-1)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["omega"], batch["actions"])

    def _update_impl(self, obs: torch.Tensor, omega: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = self.policy(self.policy_input(obs, omega))
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        # log pi(a | s, omega) = sum_i [ -(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi) / 2 ]
        log_prob = (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # max_pi sum_(s,a)~D log pi(a | s, omega)   (lecture: "Return-conditioned policies"; omega = R^ / (H - t)
        # for RvS-R, a future achieved goal for RvS-G)
        loss = -log_prob.mean()
        # taken before the backward, which consumes loss's graph
        logs = {"train/policy_loss": loss.detach(), "train/mse": (mean.detach() - actions).square().mean(),
                "train/log_std_mean": log_std.detach().mean()}
        # inputs: the parameters the loss trains, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_std when the step is recompiled)
        loss.backward(inputs=self.params)
        self.optimizer.step()
        return logs

    @torch.no_grad()
    def act_conditioned(self, obs: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        """The Gaussian's mean for each row's omega, clipped to the action bounds; dropout off."""
        self.policy.eval()
        action = self.policy(self.policy_input(obs, omega)).clamp(-self.max_action, self.max_action)
        self.policy.train()
        return action

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action from the observation alone: omega = the main fraction's target (RvS-R) or
        the observation's desired goal (RvS-G)."""
        if self.goal_conditioned:
            omega = obs[:, self.desired_columns]
        else:
            omega = self.target_omega.expand(obs.shape[0], 1)
        return self.act_conditioned(obs, omega)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "log_std": self.log_std.detach().clone(),
                "optimizer": self.optimizer.state_dict(), "target_omega": self.target_omega.clone(),
                "state_mask": self.state_mask.clone(), "desired_columns": self.desired_columns.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.target_omega = state["target_omega"].to(self.device)
        self.state_mask = state["state_mask"].to(self.device)
        self.desired_columns = state["desired_columns"].to(self.device)


# --------------------------------------------------------------------------------------------------
# What train() uses: the outcomes (average reward-to-go for RvS-R, hindsight goals for RvS-G), the data
# checks and the target omegas
# --------------------------------------------------------------------------------------------------


def average_returns_to_go(rewards: np.ndarray, horizon: int) -> np.ndarray:
    """omega_t = (sum_{t' >= t} r_t') / (H - t) for one trajectory of N <= H steps, shape (N,)."""
    cumulative = discounted_returns_to_go(rewards, 1.0).astype(np.float64)
    return (cumulative / (horizon - np.arange(len(rewards)))).astype(np.float32)


def check_episodes(dataset: OfflineDataset) -> None:
    """One clear line for data RvS cannot use: no episode boundaries, or episodes under 2 steps."""
    episodes = dataset.episodes
    if not any(bool(e.terminations[-1] or e.truncations[-1]) for e in episodes):
        fail(f"'{dataset.name}' has no episode boundaries (no episode ends in a termination or truncation): "
             f"RvS conditions on what happens later in a trajectory; store the data episode by episode")
    short = [i for i, e in enumerate(episodes) if len(e) < 2]
    if short:
        fail(f"'{dataset.name}' has {len(short)} episode(s) shorter than 2 steps (episode {short[0]} has "
             f"{len(episodes[short[0]])}); RvS conditions on a trajectory's future: drop them or use another "
             f"dataset")


def steps_for_epochs(epochs: int, examples: int, batch_size: int) -> int:
    """Gradient steps of `epochs` passes over `examples` in minibatches of `batch_size`, the last one smaller:
    epochs * ceil(examples / batch_size), as the authors' data loader counts an epoch."""
    return epochs * math.ceil(examples / batch_size)


def epoch_examples(config: Config, dataset: OfflineDataset) -> int:
    """N, the examples of one of the authors' epochs: every transition (RvS-R's TensorDataset), or the fixed
    epoch size of their goal sampler (RvS-G), whatever the dataset's size."""
    return GOAL_EPOCH_EXAMPLES if config.conditioning == "goal" else sum(len(e) for e in dataset.episodes)


def check_fractions(config: Config) -> None:
    lo, hi = FRACTION_RANGE
    fractions = (*config.target_fractions, config.main_fraction)
    bad = [f for f in fractions if not (math.isfinite(f) and lo <= f <= hi)]
    if bad:
        fail(f"target fraction(s) {', '.join(f'{f:g}' for f in bad)} outside [{lo:g}, {hi:g}] (0: the dataset's "
             f"reference minimum score, 1: its reference maximum); the paper sweeps 0.3 to 1.2")


def reference_scores(dataset: OfflineDataset) -> tuple[float, float, str]:
    """(min, max, source) of the returns the fractions interpolate: reference scores, else the data's."""
    if dataset.ref_min_score is not None and dataset.ref_max_score is not None:
        return dataset.ref_min_score, dataset.ref_max_score, f"reference scores ({dataset.ref_source})"
    returns = [e.total_return for e in dataset.episodes]
    return min(returns), max(returns), "the dataset's worst and best episode returns (no reference scores)"


def target_omegas(dataset: OfflineDataset, fractions: tuple[float, ...], horizon: int) -> list[float]:
    """omega = (ref_min + (ref_max - ref_min) * frac) / H for each fraction (the authors' get_reward_targets)."""
    lo, hi, _ = reference_scores(dataset)
    return [(lo + (hi - lo) * f) / horizon for f in fractions]


def warn_uncovered_targets(dataset: OfflineDataset, fractions: tuple[float, ...]) -> None:
    """One line when a target return lies outside the data's episode returns (RvS extrapolates in omega)."""
    returns = [e.total_return for e in dataset.episodes]
    lo, hi, source = reference_scores(dataset)
    outside = [f for f in fractions if not min(returns) <= lo + (hi - lo) * f <= max(returns)]
    if outside:
        print(f"warning: target fraction(s) {', '.join(f'{f:g}' for f in outside)} of {source} ask for returns "
              f"outside the data's episode returns [{min(returns):.1f}, {max(returns):.1f}]; RvS extrapolates in "
              f"omega there (still evaluated)", file=sys.stderr, flush=True)


def _leaf_columns(space: gym.Space, start: int = 0) -> dict[str, tuple[int, int]]:
    """Top-level key -> [start, end) columns of a Dict observation in the flattened vector."""
    columns = {}
    for key, sub in space.spaces.items():
        columns[key] = (start, start + flat_dim(sub))
        start += flat_dim(sub)
    return columns


def goal_layout(dataset: OfflineDataset, goal_columns: tuple[int, ...] | None) -> dict:
    """Flattened-observation columns of the achieved goal used as omega, of the matching desired goal, and
    the state mask (0 on the desired goal); one clear line when the dataset carries no goal information."""
    space = dataset.observation_space
    keys = set(space.spaces) if isinstance(space, gym.spaces.Dict) else set()
    if not {"achieved_goal", "desired_goal"} <= keys:
        fail(f"--conditioning goal (RvS-G) needs goal information: a Dict observation with achieved_goal and "
             f"desired_goal (e.g. the Minari mazes D4RL/antmaze/*, D4RL/pointmaze/*); '{dataset.name}' has "
             f"{type(space).__name__} observations{' with keys ' + ', '.join(sorted(keys)) if keys else ''}. "
             f"Use --conditioning reward (RvS-R)")
    columns = _leaf_columns(space)
    (a0, a1), (d0, d1) = columns["achieved_goal"], columns["desired_goal"]
    if a1 - a0 != d1 - d0:
        fail(f"'{dataset.name}': achieved_goal has {a1 - a0} components but desired_goal {d1 - d0}; RvS-G "
             f"needs goals of the same layout")
    chosen = tuple(range(a1 - a0)) if goal_columns is None else tuple(goal_columns)
    if not chosen or any(not 0 <= c < a1 - a0 for c in chosen):
        fail(f"--goal-columns {' '.join(map(str, chosen)) or '(none)'}: the goal of '{dataset.name}' has "
             f"components 0..{a1 - a0 - 1}")
    state_mask = np.ones(dataset.obs_dim, dtype=np.float32)
    state_mask[d0:d1] = 0.0
    return {"goal_columns": chosen, "achieved": np.array([a0 + c for c in chosen]),
            "desired": np.array([d0 + c for c in chosen]), "state_mask": state_mask}


class GoalSampler:
    """RvS-G minibatches on the device: (s_t1, a_t1, achieved goal of s_t2) with t1 <= t2 in one trajectory.

    As the authors' D4RLIterableDataset (after GCSL): a trajectory uniformly, then two times
    floor(u1 (L - 1)) and floor(u2 L); the earlier one gives the state and action, the later one the goal.
    Random numbers come from a device generator whose state is saved in checkpoints.
    """

    def __init__(self, episodes: list, achieved: np.ndarray, device: torch.device, seed: int):
        self.device = device
        lengths = np.array([len(e) for e in episodes])
        self.obs = torch.as_tensor(np.concatenate([e.observations[:-1] for e in episodes]), device=device)
        self.actions = torch.as_tensor(np.concatenate([e.actions for e in episodes]), device=device)
        self.starts = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)[:-1]]), device=device)
        self.lengths = torch.as_tensor(lengths, device=device)
        self.achieved = torch.as_tensor(achieved, device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        g = self.generator
        episode = torch.randint(0, len(self.lengths), (batch_size,), device=self.device, generator=g)
        u = torch.rand(2, batch_size, device=self.device, generator=g, dtype=torch.float64)
        length = self.lengths[episode]
        t1 = torch.minimum((u[0] * (length - 1)).long(), length - 1)
        t2 = torch.minimum((u[1] * length).long(), length - 1)
        now = self.starts[episode] + torch.minimum(t1, t2)
        future = self.starts[episode] + torch.maximum(t1, t2)
        return {"obs": self.obs[now], "omega": self.obs[future][:, self.achieved], "actions": self.actions[now]}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def synthetic_batch_source(spec: DataSpec, config: Config, device: torch.device, seed: int = 0) -> TensorSampler:
    """Random (obs, omega, actions) rows kept on `device`: the benchmark's batches (common/reporting/bench.py)."""
    rng = np.random.default_rng(seed)
    n = 100_000
    omega_dim = len(config.goal_columns) if config.conditioning == "goal" else 1
    return TensorSampler({"obs": rng.standard_normal((n, spec.obs_dim)).astype(np.float32),
                          "omega": rng.standard_normal((n, omega_dim)).astype(np.float32).squeeze(-1),
                          "actions": rng.uniform(-1, 1, (n, spec.act_dim)).astype(np.float32)}, device, seed)


# --------------------------------------------------------------------------------------------------
# Evaluation and training
# --------------------------------------------------------------------------------------------------


def evaluate_fractions(agent: Agent, dataset: OfflineDataset, fractions: tuple[float, ...], horizon: int,
                       config: Config, device: torch.device, envs, video=None) -> list[dict]:
    """Every fraction's episodes stepped together (env g * E + i plays evaluation episode i with fraction g's
    omega, fixed for the whole episode); one result per fraction (`video`: records its group's episodes)."""
    omegas = torch.tensor(target_omegas(dataset, fractions, horizon), device=device, dtype=torch.float32)
    omega = omegas.repeat_interleave(config.eval_episodes).unsqueeze(-1)
    return evaluate_stateful(lambda obs, _rewards: agent.act_conditioned(obs, omega), dataset, None,
                             config.eval_episodes, config.seed, device, envs, groups=len(fractions), video=video)


def fraction_log_entries(fractions: tuple[float, ...], results: list[dict]) -> dict[str, float]:
    out = {}
    for f, r in zip(fractions, results):
        out[f"eval/frac_{f:g}/return_mean"] = r["return_mean"]
        if r["normalized_mean"] is not None:
            out[f"eval/frac_{f:g}/normalized_score_mean"] = r["normalized_mean"]
    return out


def train(config: Config) -> dict:
    # --epochs given on this command line (a resumed run keeps the max_steps it derived)
    given_epochs = None if config.resume else config.epochs
    if given_epochs is not None and config.max_steps is not None:
        fail(f"--epochs {config.epochs} and --max-steps {config.max_steps} both set the training length: give one")
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    if config.epochs is not None and config.epochs < 1:
        fail(f"--epochs must be at least 1, got {config.epochs}")
    check_fractions(config)
    if config.dropout is not None and not 0.0 <= config.dropout < 1.0:
        fail(f"--dropout must lie in [0, 1), got {config.dropout}")
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"rvs.py is for continuous actions; '{config.env}' has discrete actions")
    check_episodes(dataset)
    if config.max_steps is None or given_epochs is not None:
        # the authors' training length: epochs of ceil(N / batch) steps of the batch used here
        examples = epoch_examples(config, dataset)
        config = replace(config, max_steps=steps_for_epochs(config.epochs, examples, config.batch_size))
        print(f"training length: {config.epochs} epochs x ceil({examples} / {config.batch_size}) = {config.max_steps} "
              f"steps", file=sys.stderr, flush=True)
    fractions = tuple(sorted({*config.target_fractions, config.main_fraction}))
    horizon = max(len(e) for e in dataset.episodes)  # H: the longest trajectory (the authors' max_episode_steps)
    if config.conditioning == "goal":
        layout = goal_layout(dataset, config.goal_columns)
        config = replace(config, goal_columns=layout["goal_columns"])  # saved, so a reloaded policy has them
        sampler = GoalSampler(dataset.episodes, layout["achieved"], device, config.seed)
    else:
        warn_uncovered_targets(dataset, fractions)
        omega = np.concatenate([average_returns_to_go(e.rewards, horizon) for e in dataset.episodes])
        sampler = TensorSampler({"obs": np.concatenate([e.observations[:-1] for e in dataset.episodes]),
                                 "omega": omega, "actions": np.concatenate([e.actions for e in dataset.episodes])},
                                device, config.seed)
    agent = Agent(config, dataset.spec, device)
    if config.conditioning == "goal":
        agent.state_mask = torch.as_tensor(layout["state_mask"], device=device)
        agent.desired_columns = torch.as_tensor(layout["desired"], device=device)
    else:
        agent.target_omega = torch.tensor(target_omegas(dataset, (config.main_fraction,), horizon), device=device)

    run = Run("rvs", config, dataset, device)
    start = run.resume(agent, sampler)
    reward_conditioned = config.conditioning == "reward"
    envs = make_eval_envs(dataset, config.eval_episodes * (len(fractions) if reward_conditioned else 1))
    main = fractions.index(config.main_fraction) if reward_conditioned else 0

    def evaluate_all(step: int) -> list[dict]:
        video = run.video_for(step, group=main)  # the main fraction's episodes: those of the reported score
        if reward_conditioned:
            return evaluate_fractions(agent, dataset, fractions, horizon, config, device, envs, video)
        return [evaluate(agent.act, dataset, None, config.eval_episodes, config.seed, device, envs, video=video)]

    for step in run.steps(start):
        logs = agent.update(sampler.sample(config.batch_size))
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                results = evaluate_all(step)
                run.log_eval(step, results[main])
                if reward_conditioned:
                    run.log(step, fraction_log_entries(fractions, results))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, sampler)
    results = evaluate_all(run.total_steps)
    run.log_eval(config.max_steps, results[main])
    envs.close()
    if not reward_conditioned:
        return run.finish(results[0], extra={"conditioning": "goal", "goal_columns": list(config.goal_columns)})
    run.log(config.max_steps, fraction_log_entries(fractions, results))
    per_fraction = [{"fraction": f, "target_return": omega * horizon, "return_mean": r["return_mean"],
                     "return_std": r["return_std"], "normalized_score_mean": r["normalized_mean"]}
                    for f, omega, r in zip(fractions, target_omegas(dataset, fractions, horizon), results)]
    best = max(per_fraction, key=lambda entry: entry["return_mean"])
    summary = run.finish(results[main], extra={"conditioning": "reward", "main_fraction": config.main_fraction,
                                               "fractions": per_fraction, "best_fraction": best["fraction"]})
    for entry in per_fraction:
        print(f"  fraction {entry['fraction']:g} (target return {entry['target_return']:.1f}): return "
              f"{entry['return_mean']:.1f} +- {entry['return_std']:.1f}"
              + ("" if entry["normalized_score_mean"] is None else
                 f", normalized score {entry['normalized_score_mean']:.1f}"), file=sys.stderr)
    print(f"reported: --main-fraction {config.main_fraction:g} (return {results[main]['return_mean']:.1f}); the best "
          f"of the sweep was fraction {best['fraction']:g} (return {best['return_mean']:.1f}). The paper tunes the "
          f"fraction online, by these evaluations: a best-of-sweep score is tuned on the test environment.",
          flush=True)
    return summary


if __name__ == "__main__":
    run_cli(train, Config)
