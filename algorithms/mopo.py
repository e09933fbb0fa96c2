"""Model-based Offline Policy Optimization (MOPO): SAC on model rollouts whose reward is penalised by uncertainty.

Lecture sections: "Model-based Offline Policy Optimization" (estimate r(s, a) and p(s'|s, a) from D with an
ensemble {T^i = N(mu^i, Sigma^i)}_{i=1..N}, learn an uncertainty u(s, a) = max_i ||Sigma^i(s, a)||_F, then run
reinforcement learning in the model with the pessimistic reward r~(s, a) = r(s, a) - lambda u(s, a)).
Paper: Yu, Thomas, Yu, Ermon, Zou, Levine, Finn & Ma 2020, "MOPO: Model-based Offline Policy Optimization".

Usage:
    python algorithms/mopo.py                                  # embedded default: local pendulum medium-replay
    python algorithms/mopo.py --env hopper-medium-v2
    python algorithms/mopo.py --env local/pendulum/medium-replay-v0 --dynamics runs/combo/.../dynamics.pt

The run (1) trains the dynamics ensemble once (or reuses one with `--dynamics PATH`, from this file or
combo.py, on the same dataset: the file names its dataset and a checksum of the data, and a mismatch is
refused) and saves it as `dynamics.pt` in the run directory; then (2) every `rollout_every` gradient steps
rolls the current (stochastic) policy out in the model for h steps from `rollout_batch_size` dataset states,
all starts in one batched forward pass, into a FIFO model buffer on the device that keeps the last
`model_retain_rounds` rounds; (3) each gradient step is a SAC step on a batch that is a fraction f
(`real_ratio`, 5%) real data and the rest model data, whose reward is already penalised.

The ensemble follows the MOPO code and OfflineRL-Kit: 7 Gaussian members over (delta s, r) with 4 Swish layers
of 200, learned soft bounds on the log-variance, per-layer weight decay, standardised inputs, a bootstrap
resample of the training split per member, early stopping on a held-out split (min(20%, 1000) transitions, MSE
of the mean), and the 5 members with the lowest held-out MSE as elites (a random elite draws each model step).
The penalty is the reference code's max over all 7 members of ||sigma_i(s, a)||_2 over the (delta s, r)
dimensions, i.e. ||Sigma_i^(1/2)||_F of the diagonal covariance: the slide writes ||Sigma_i||_F, the paper's
numbers come from the standard deviation. Model steps end where the env's own termination rule says so:
`TERMINATION_RULES` below writes them from the Gymnasium source (Hopper, Walker2d, Ant; HalfCheetah, Swimmer,
Reacher, Pusher and Pendulum never terminate); for any other env, `--termination learned` trains a
termination head on the dataset's terminals, else the run is refused.

Per-dataset settings (the rollout horizon h and the penalty lambda as OfflineRL-Kit publishes them for the
D4RL v2 sets, the original MOPO configs where it has none; the training length; the rollout batch; the cap on
ensemble epochs) live in `DATASET_SETTINGS` below; flags override them.

--compile compiles the SAC step (forward, the two backwards, the three Adam steps, the target update; static
shapes; pi's samples drawn on the device inside) and on CUDA replays it as CUDA graphs (mode reduce-overhead).
torch.optim breaks the graph around every optimizer.step() on purpose, so the step runs as 6 graphs (critic
forward+backward, its step, actor and temperature forward+backward, their two steps, the target update) back to
back; zero_grad, the draw from the model buffer that mixes real and model rows, and the cosine learning rate run
just before, outside the compiled step. The model rollouts run eagerly: which transitions a rollout keeps (those
up to its first termination) is a data-dependent shape, read with one host sync per round, and a round comes
only every `rollout_every` steps as h large batched forward passes, which compiling would barely speed up. The
ensemble's fit runs eagerly too: once per run, with one host sync per epoch for early stopping.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.checkpoint import save_checkpoint  # noqa: E402
from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.runs import Progress, Run, apply_dataset_settings, resolve_config, run_cli, setup  # noqa: E402


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
    """gradient steps (None: from DATASET_SETTINGS)"""
    batch_size: int = 256
    """minibatch size (the papers' 256)"""
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
    # --- MOPO: the pessimistic reward and the model rollouts ---
    penalty_coef: float | None = None
    """lambda in the penalised reward r~(s, a) = r(s, a) - lambda u(s, a) (None: from DATASET_SETTINGS)"""
    rollout_length: int | None = None
    """h, the length of each model rollout from a dataset state (None: from DATASET_SETTINGS; 1 or 5)"""
    real_ratio: float = 0.05
    """fraction of each minibatch drawn from the dataset D; the rest comes from the model buffer (paper: 0.05)"""
    rollout_every: int = 1_000
    """gradient steps between two rounds of model rollouts (reference code: 1000)"""
    rollout_batch_size: int | None = None
    """dataset states each rollout round starts from (None: from DATASET_SETTINGS; reference code: 50,000)"""
    model_retain_rounds: int = 5
    """the model buffer keeps the last this many rollout rounds (FIFO; reference code: 5 epochs)"""
    termination: Literal["env", "learned"] = "env"
    """when a model rollout ends: env = the env's own termination rule (TERMINATION_RULES; refused for an env
    without one), learned = a termination head of the ensemble trained on the dataset's terminals"""
    dynamics: str | None = None
    """reuse a saved dynamics ensemble (dynamics.pt of an earlier mopo or combo run on the same dataset)
    instead of training one"""
    # --- the dynamics ensemble T^i(s', r | s, a) = N(mu^i, Sigma^i) ---
    ensemble_size: int = 7
    """N, members of the ensemble {T^i}_{i=1..N} (paper: 7)"""
    num_elites: int = 5
    """members with the lowest held-out MSE (plus the head's cross-entropy, if learned) that draw the model's
    steps (paper: 5)"""
    dynamics_hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """hidden layers of each member, Swish activations (paper: 4 x 200)"""
    dynamics_weight_decay: tuple[float, ...] = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
    """per-layer weight decay wd_l, added as sum_l wd_l ||W_l||^2 / 2 (one per hidden layer and the output)"""
    dynamics_lr: float = 1e-3
    """Adam learning rate of the ensemble"""
    dynamics_batch_size: int = 256
    """minibatch of each member while fitting the ensemble"""
    dynamics_holdout_ratio: float = 0.2
    """fraction of the transitions held out for early stopping and elite selection (at most dynamics_max_holdout)"""
    dynamics_max_holdout: int = 1_000
    """cap on the held-out transitions (reference code: 1000)"""
    dynamics_patience: int = 5
    """stop fitting after this many epochs in which no member's held-out error improved by more than 1%"""
    dynamics_min_epoch_steps: int = 1_000
    """an epoch of the fit repeats passes over the training split until at least this many gradient steps. A
    D4RL-size set (>= 256k transitions) is unaffected (one pass is >= 1000 steps); without it a small set would
    stop after a few hundred steps, far too early (pendulum medium-replay, 2,400 training rows: held-out MSE
    0.19 after 210 steps against 0.0003 after 4,000)"""
    dynamics_max_epochs: int | None = None
    """cap on ensemble epochs (None: from DATASET_SETTINGS; early stopping usually ends far earlier)"""
    # --- SAC on the real / model mixture ---
    actor_lr: float = 1e-4
    """Adam learning rate of the actor pi (OfflineRL-Kit: 1e-4, cosine-decayed to 0 over the run)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics Q_1, Q_2"""
    alpha_lr: float = 1e-4
    """Adam learning rate of log alpha, the entropy temperature"""
    discount: float = 0.99
    """gamma in y = r~ + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s'))"""
    polyak: float = 0.005
    """target update Q' <- (1 - polyak) Q' + polyak Q (often called tau)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layers of the actor and of each critic (paper: 2 x 256)"""
    target_entropy: float | None = None
    """H-bar of the automatic entropy tuning (None: -|A|, as OfflineRL-Kit; the original MOPO uses -3)"""
    cosine_schedule: bool = True
    """decay the actor's learning rate to 0 along a cosine over max_steps (OfflineRL-Kit)"""
    normalize_obs: bool = True
    """standardise the policy's and critics' observations with the dataset's mean and std (eps 1e-3); the
    ensemble standardises its own inputs in any case"""


def _d4rl_rows(family: str, quality: str, settings: dict) -> list[tuple[str, dict]]:
    """The rows of one D4RL dataset under each of its names: D4RL, Minari (mujoco/, D4RL/) and local builds."""
    return [(f"{family}-{quality}-v*", settings), (f"mujoco/{family}/{quality}-v*", settings),
            (f"D4RL/{family}/{quality}-v*", settings), (f"local/{family}/{quality}-v*", settings)]


# h and lambda: OfflineRL-Kit's suggestions for the D4RL v2 sets (run_example/run_mopo.py), which it tuned on
# the v2 data; the random sets, which it does not list, take the original MOPO configs (v0). Training length:
# the original's 1000 epochs of 1000 steps for hopper and 3000 for halfcheetah and walker2d. Rollouts: 50,000
# starts every 1000 steps. Expert and other sets have no published values: the catch-all row (h 5, lambda 1).
_MUJOCO = {"rollout_batch_size": 50_000, "dynamics_max_epochs": 1_000}
_PUBLISHED = {  # family: {quality: (h, lambda)}
    "halfcheetah": {"random": (5, 0.5), "medium": (5, 0.5), "medium-replay": (5, 0.5), "medium-expert": (5, 2.5)},
    "hopper": {"random": (5, 1.0), "medium": (5, 5.0), "medium-replay": (5, 2.5), "medium-expert": (5, 5.0)},
    "walker2d": {"random": (1, 1.0), "medium": (5, 0.5), "medium-replay": (1, 2.5), "medium-expert": (1, 2.5)},
}
_TRAINING_STEPS = {"halfcheetah": 3_000_000, "hopper": 1_000_000, "walker2d": 3_000_000}

# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The small local sets get short runs and small rollout rounds.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    # the embedded Pendulum-v1 suite (200-step episodes, never terminates): short runs, 5,000 starts a round
    ("local/pendulum/*", {"rollout_length": 5, "penalty_coef": 1.0, "max_steps": 20_000,
                          "rollout_batch_size": 5_000, "dynamics_max_epochs": 10}),
    # reduced local hopper builds (python -m common.build hopper ...): hopper's h and lambda, a short budget
    ("local/hopper*/medium-replay-v*", {"rollout_length": 5, "penalty_coef": 2.5, "max_steps": 100_000,
                                        "rollout_batch_size": 10_000, "dynamics_max_epochs": 100}),
    ("local/hopper*/*", {"rollout_length": 5, "penalty_coef": 5.0, "max_steps": 100_000,
                         "rollout_batch_size": 10_000, "dynamics_max_epochs": 100}),
    ("test/*", {"rollout_length": 5, "penalty_coef": 1.0, "max_steps": 2_000, "rollout_batch_size": 1_000,
                "dynamics_max_epochs": 10}),
    *[row for family, qualities in _PUBLISHED.items() for quality, (h, lam) in qualities.items()
      for row in _d4rl_rows(family, quality, {**_MUJOCO, "rollout_length": h, "penalty_coef": lam,
                                              "max_steps": _TRAINING_STEPS[family]})],
    ("*", {**_MUJOCO, "rollout_length": 5, "penalty_coef": 1.0, "max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the SAC authors' clamp of the Gaussian's log std
MAX_LOGVAR_INIT, MIN_LOGVAR_INIT = 0.5, -10.0  # initial soft bounds on the ensemble's log-variance (MOPO code)
LOGVAR_BOUND_COEF = 0.01  # weight of sum(max_logvar) - sum(min_logvar) in the ensemble's loss (MOPO code)
IMPROVEMENT = 0.01  # a member's held-out error must drop by more than 1% to count as an improvement (MOPO code)
DIVERGENCE_FACTOR = 1e3  # held-out error above this multiple of max(initial error, MSE of predicting 0): diverged
DYNAMICS_SAVE_SECONDS = 60.0  # a run killed while fitting the ensemble loses at most about this much of it
DYNAMICS_FORMAT = "offline-rl probabilistic dynamics ensemble, v1"  # the saved file's kind (mopo.py, combo.py)


# ---------------------------------------------------------------------------------------------------------
# Termination rules, written from the Gymnasium sources (gymnasium/envs/mujoco/*_v5.py, classic_control)
# ---------------------------------------------------------------------------------------------------------

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hopper_termination(healthy_state_range=(-100.0, 100.0), healthy_z_range=(0.7, float("inf")),
                       healthy_angle_range=(-0.2, 0.2), exclude_current_positions_from_observation=True,
                       **_) -> TerminationFn:
    """Hopper-v5 `is_healthy`: z = qpos[1] in (0.7, inf), angle = qpos[2] in (-0.2, 0.2), and every entry of
    state_vector()[2:] (qpos[2:], qvel) in (-100, 100), all open intervals; terminated = not healthy.

    In the observation (qpos[1:], clip(qvel, -10, 10)) z is obs[0], the angle obs[1] and qpos[2:] obs[1:]. The
    velocities are clipped at 10 there, so a |qvel| >= 100 that ends the real episode is invisible in s': the
    one case this rule (like any rule on observations) cannot see. NaN fails every comparison: terminated.
    (The MOPO and OfflineRL-Kit versions write `np.abs(next_obs[:, 1:] < 100)`, checking the upper bound only.)
    """
    i = 0 if exclude_current_positions_from_observation else 1  # with x in the observation, z is obs[1]
    (s_lo, s_hi), (z_lo, z_hi), (a_lo, a_hi) = healthy_state_range, healthy_z_range, healthy_angle_range

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        z, angle, state = next_obs[:, i], next_obs[:, i + 1], next_obs[:, i + 1:]
        healthy = (((state > s_lo) & (state < s_hi)).all(-1) & (z > z_lo) & (z < z_hi)
                   & (angle > a_lo) & (angle < a_hi))
        return ~healthy

    return terminated


def walker2d_termination(healthy_z_range=(0.8, 2.0), healthy_angle_range=(-1.0, 1.0),
                         exclude_current_positions_from_observation=True, **_) -> TerminationFn:
    """Walker2d-v5 `is_healthy`: z = qpos[1] in (0.8, 2.0) and angle = qpos[2] in (-1, 1), open intervals, i.e.
    obs[0] and obs[1]; terminated = not healthy. (The docstring also names non-finite states; the code checks
    only these two, and so does this rule. NaN in z or the angle fails the comparisons: terminated.)"""
    i = 0 if exclude_current_positions_from_observation else 1
    (z_lo, z_hi), (a_lo, a_hi) = healthy_z_range, healthy_angle_range

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        z, angle = next_obs[:, i], next_obs[:, i + 1]
        return ~((z > z_lo) & (z < z_hi) & (angle > a_lo) & (angle < a_hi))

    return terminated


def ant_termination(healthy_z_range=(0.2, 1.0), exclude_current_positions_from_observation=True,
                    **_) -> TerminationFn:
    """Ant-v5 `is_healthy`: state_vector() (qpos, qvel) all finite and z = qpos[2] in [0.2, 1.0], a closed
    interval; terminated = not healthy. The observation holds qpos[2:], qvel (27 numbers), then the contact
    forces: z is obs[0] and the state is obs[:27] (obs[2] and obs[:29] with x, y included). The reference
    code's substring match also gave this rule to antmaze, whose obs[0] is a position: here the env id is
    matched exactly, so AntMaze gets no rule."""
    z_index, state_dims = (0, 27) if exclude_current_positions_from_observation else (2, 29)
    z_lo, z_hi = healthy_z_range

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        z = next_obs[:, z_index]
        return ~(torch.isfinite(next_obs[:, :state_dims]).all(-1) & (z >= z_lo) & (z <= z_hi))

    return terminated


def never_terminates(**_) -> TerminationFn:
    """Envs whose step() returns terminated=False always (only the time limit truncates): the rule is never."""

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)

    return terminated


def _unhealthy_rule(builder: Callable[..., TerminationFn]) -> Callable[..., TerminationFn]:
    """`terminate_when_unhealthy=False` (an env argument) turns a healthy-range rule into never."""
    def build(terminate_when_unhealthy: bool = True, **kwargs) -> TerminationFn:
        return builder(**kwargs) if terminate_when_unhealthy else never_terminates()
    return build


# env name -> (versions whose source was read, rule builder taking the env's kwargs). Hopper, Walker2d and
# Ant have the same rule in v2-v5; HalfCheetah's step returns terminated=False in every version, Pendulum-v1's
# too (it only truncates at 200 steps), Swimmer-v5, Reacher-v5 and Pusher-v5 as well.
TERMINATION_RULES: dict[str, tuple[tuple[int, ...], Callable[..., TerminationFn]]] = {
    "Hopper": ((2, 3, 4, 5), _unhealthy_rule(hopper_termination)),
    "Walker2d": ((2, 3, 4, 5), _unhealthy_rule(walker2d_termination)),
    "Ant": ((2, 3, 4, 5), _unhealthy_rule(ant_termination)),
    "HalfCheetah": ((2, 3, 4, 5), never_terminates),
    "Pendulum": ((1,), never_terminates),
    "Swimmer": ((5,), never_terminates),
    "Reacher": ((5,), never_terminates),
    "Pusher": ((5,), never_terminates),
}


def termination_function(env_spec, mode: str) -> TerminationFn | None:
    """The env's termination rule as a batched function (obs, actions, next_obs) -> bool (N,), from the env
    id and its kwargs in the dataset's env spec; None for `--termination learned` (the ensemble's head)."""
    if mode == "learned":
        return None
    env_id = getattr(env_spec, "id", None) or (env_spec if isinstance(env_spec, str) else None)
    if env_id is None:
        fail("the dataset stores no environment spec, so its termination rule is unknown; pass "
             "--termination learned to learn one from the dataset's terminals")
    match = re.fullmatch(r"(?:.*/)?([A-Za-z0-9_]+)-v(\d+)", env_id)
    name, version = (match.group(1), int(match.group(2))) if match else (env_id, -1)
    if name not in TERMINATION_RULES or version not in TERMINATION_RULES[name][0]:
        known = ", ".join(f"{n}-v{'/'.join(map(str, v))}" for n, (v, _) in TERMINATION_RULES.items())
        fail(f"no termination rule for '{env_id}' (known: {known}); pass --termination learned to learn one "
             f"from the dataset's terminals")
    kwargs = dict(getattr(env_spec, "kwargs", None) or {})
    return TERMINATION_RULES[name][1](**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The probabilistic dynamics ensemble: one network, members on a leading axis, batched matmuls
# ---------------------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """K independent linear layers as one batched matmul, (K, N, in) -> (K, N, out), with weight decay wd."""

    def __init__(self, in_dim: int, out_dim: int, ensemble_size: int, weight_decay: float):
        super().__init__()
        std = 1.0 / (2.0 * math.sqrt(in_dim))  # the MOPO code's truncated normal (cut at 2 std), zero bias
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(ensemble_size, in_dim, out_dim), std=std,
                                                         a=-2 * std, b=2 * std))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_dim))
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        if members is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[members], x, self.weight[members])

    def decay_loss(self) -> torch.Tensor:
        return self.weight_decay * 0.5 * self.weight.square().sum()


class DynamicsEnsemble(nn.Module):
    """T^i(s', r | s, a) = N(mu^i(s, a), Sigma^i(s, a)), i = 1..K, over the target (s' - s, r).

    Inputs (s, a) are standardised with the training split's mean and std. Each member outputs the mean and a
    log-variance softly bounded between learned limits: logvar = max - softplus(max - x), then
    min + softplus(logvar - min) (Chua et al. 2018, the MOPO code); optionally a termination logit.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], ensemble_size: int,
                 num_elites: int, weight_decay: tuple[float, ...], learned_termination: bool):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.target_dim = obs_dim + 1  # (delta s, r)
        self.ensemble_size, self.num_elites = ensemble_size, num_elites
        self.learned_termination = learned_termination
        dims = [obs_dim + act_dim, *hidden_dims, 2 * self.target_dim + int(learned_termination)]
        self.layers = nn.ModuleList(EnsembleLinear(i, o, ensemble_size, wd)
                                    for i, o, wd in zip(dims[:-1], dims[1:], weight_decay))
        self.max_logvar = nn.Parameter(torch.full((self.target_dim,), MAX_LOGVAR_INIT))
        self.min_logvar = nn.Parameter(torch.full((self.target_dim,), MIN_LOGVAR_INIT))
        self.register_buffer("input_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("input_std", torch.ones(obs_dim + act_dim))
        self.register_buffer("elites", torch.arange(num_elites))

    def forward(self, inputs: torch.Tensor, members: torch.Tensor | None = None):
        """Raw inputs (s, a): (N, in) for every member alike, or (K, N, in) one set per member.
        Returns mean (K', N, obs+1), logvar (K', N, obs+1) and the termination logit (K', N) or None, for all
        K members or only those in `members`."""
        x = (inputs - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.ensemble_size if members is None else len(members), -1, -1)
        for layer in self.layers[:-1]:
            x = F.silu(layer(x, members))  # Swish
        out = self.layers[-1](x, members)
        d = self.target_dim
        mean, raw_logvar = out[..., :d], out[..., d:2 * d]
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar, (out[..., 2 * d] if self.learned_termination else None)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, terminals: torch.Tensor) -> torch.Tensor:
        """Sum over members of the Gaussian NLL (up to constants), the weight decay and the bounds' term.

        L = sum_i mean_(batch, dim) [ (mu_i - y)^2 exp(-logvar_i) + logvar_i ] + sum_l wd_l ||W_l||^2 / 2
            + 0.01 (sum max_logvar - sum min_logvar)   [+ sum_i BCE(termination logit_i, d)]
        inputs (K, B, in), targets (K, B, obs+1), terminals (K, B): one bootstrap minibatch per member.
        """
        mean, logvar, done_logit = self(inputs)
        nll = (((mean - targets) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
        decay = sum(layer.decay_loss() for layer in self.layers)
        bounds = LOGVAR_BOUND_COEF * (self.max_logvar.sum() - self.min_logvar.sum())
        loss = nll + decay + bounds
        if done_logit is not None:
            loss = loss + F.binary_cross_entropy_with_logits(done_logit, terminals, reduction="none").mean(1).sum()
        return loss

    @torch.no_grad()
    def holdout_loss(self, inputs: torch.Tensor, targets: torch.Tensor, terminals: torch.Tensor) -> torch.Tensor:
        """Per-member held-out error (K,): the MSE of the mean on (s, a) -> (delta s, r), no variance term (the
        MOPO code's validation metric), plus the termination head's binary cross-entropy when it has one."""
        mean, _, done_logit = self(inputs)
        loss = ((mean - targets) ** 2).mean(dim=(1, 2))
        if done_logit is not None:
            loss = loss + F.binary_cross_entropy_with_logits(done_logit, terminals.expand_as(done_logit),
                                                             reduction="none").mean(1)
        return loss

    @torch.no_grad()
    def uncertainty(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """u(s, a) = max_i ||sigma_i(s, a)||_2 over all K members and the (delta s, r) dimensions: (N,)."""
        _, logvar, _ = self(torch.cat([obs, actions], -1))
        return torch.exp(0.5 * logvar).norm(dim=-1).amax(0)

    @torch.no_grad()
    def step(self, obs: torch.Tensor, actions: torch.Tensor):
        """One model step for a batch: (s' , r, u(s, a), termination logit or None), each row drawn from a
        random elite's Gaussian. u needs every member's variance, so all K members are evaluated."""
        mean, logvar, done_logit = self(torch.cat([obs, actions], -1))
        n = obs.shape[0]
        rows = torch.arange(n, device=obs.device)
        member = self.elites[torch.randint(self.num_elites, (n,), device=obs.device)]
        mu, std = mean[member, rows], torch.exp(0.5 * logvar[member, rows])
        sample = mu + std * torch.randn_like(mu)
        penalty = torch.exp(0.5 * logvar).norm(dim=-1).amax(0)
        logit = done_logit[member, rows] if done_logit is not None else None
        return obs + sample[:, :self.obs_dim], sample[:, self.obs_dim], penalty, logit


def dynamics_architecture(config: Config, spec: DataSpec) -> dict:
    """What a saved ensemble must match to be used by a run (the shapes of its network)."""
    return {"obs_dim": spec.obs_dim, "act_dim": spec.act_dim, "ensemble_size": config.ensemble_size,
            "num_elites": config.num_elites, "hidden_dims": list(config.dynamics_hidden_dims),
            "learned_termination": config.termination == "learned"}


def make_dynamics(config: Config, spec: DataSpec) -> DynamicsEnsemble:
    return DynamicsEnsemble(spec.obs_dim, spec.act_dim, tuple(config.dynamics_hidden_dims), config.ensemble_size,
                            config.num_elites, tuple(config.dynamics_weight_decay), config.termination == "learned")


def data_checksum(data: dict[str, np.ndarray]) -> str:
    """sha256 over the transitions the ensemble is fitted on (obs, actions, rewards, next_obs, terminals)."""
    digest = hashlib.sha256()
    for key in ("obs", "actions", "rewards", "next_obs", "terminals"):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(data[key], dtype=np.float32).tobytes())
    return digest.hexdigest()


def fit_dynamics(ensemble: DynamicsEnsemble, data: dict[str, torch.Tensor], config: Config, seed: int,
                 partial_path: Path | None = None, label: str = "dynamics") -> dict:
    """Fit the ensemble on (s, a) -> (s' - s, r) (and the terminals) with early stopping; returns a report.

    A random split holds out min(ratio N, max_holdout) transitions. Each member trains on its own bootstrap
    resample of the rest (drawn once, reshuffled every pass), Adam at dynamics_lr, minibatches of
    dynamics_batch_size per member; an epoch is as many passes as make dynamics_min_epoch_steps. After every
    epoch each member's held-out error is measured (the MSE of the mean; plus the termination head's
    cross-entropy when it has one); a member whose error fell by more than 1% keeps a snapshot; fitting stops
    after `dynamics_patience` epochs without any such gain (or at dynamics_max_epochs). The snapshots are
    restored and the `num_elites` members with the lowest held-out error become the elites. A held-out error
    that is not finite or above DIVERGENCE_FACTOR x max(the member's error before training, the MSE of
    predicting 0) stops with the member and the step.
    Randomness comes from its own generator (seeded with `seed`), so fitting leaves the global RNG as it was.
    With `partial_path`, the fit's state is saved there about every DYNAMICS_SAVE_SECONDS (at an epoch's end)
    and a killed fit continues from it exactly. `data` holds device tensors obs, actions, rewards, next_obs,
    terminals.
    """
    device = data["obs"].device
    inputs = torch.cat([data["obs"], data["actions"]], -1)
    targets = torch.cat([data["next_obs"] - data["obs"], data["rewards"].unsqueeze(-1)], -1)
    terminals = data["terminals"].float()
    n = inputs.shape[0]
    n_holdout = min(int(n * config.dynamics_holdout_ratio), config.dynamics_max_holdout)
    if n_holdout < 1 or n - n_holdout < 2:
        fail(f"{n} transitions are too few to fit and validate a dynamics ensemble (held out: {n_holdout}); "
             f"use a larger dataset or --dynamics-holdout-ratio")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    permutation = torch.randperm(n, generator=generator, device=device)
    holdout, train_rows = permutation[:n_holdout], permutation[n_holdout:]
    n_train = train_rows.shape[0]
    with torch.no_grad():
        train_inputs = inputs[train_rows]
        ensemble.input_mean.copy_(train_inputs.mean(0))
        std = train_inputs.std(0, unbiased=False)
        ensemble.input_std.copy_(torch.where(std < 1e-12, torch.ones_like(std), std))
    k = ensemble.ensemble_size
    bootstrap = torch.randint(n_train, (k, n_train), generator=generator, device=device)  # per-member resample
    holdout_inputs, holdout_targets, holdout_terminals = inputs[holdout], targets[holdout], terminals[holdout]
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=config.dynamics_lr)
    member_params = [p for layer in ensemble.layers for p in (layer.weight, layer.bias)]
    limit = DIVERGENCE_FACTOR * torch.maximum(ensemble.holdout_loss(holdout_inputs, holdout_targets,
                                                                    holdout_terminals),
                                              holdout_targets.square().mean()).cpu()
    state = {"epoch": 0, "step": 0, "stale": 0, "seconds": 0.0, "history": [],
             "best_mse": torch.full((k,), 1e10, dtype=torch.float64),
             "best_params": [p.detach().clone() for p in member_params]}
    if partial_path is not None and partial_path.is_file():
        saved = torch.load(partial_path, map_location=device, weights_only=False)
        ensemble.load_state_dict(saved["ensemble"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"].cpu())
        state = saved["fit"]
        limit = saved["limit"]
        print(f"{label}: continuing the ensemble's fit from epoch {state['epoch']} ({partial_path})",
              file=sys.stderr, flush=True)
    passes = max(1, math.ceil(config.dynamics_min_epoch_steps / math.ceil(n_train / config.dynamics_batch_size)))
    progress = Progress(f"{label} epochs", config.dynamics_max_epochs, state["epoch"])
    started, last_save = time.perf_counter() - state["seconds"], time.perf_counter()
    while True:
        state["epoch"] += 1
        for _ in range(passes):
            # each member's bootstrap sample, reshuffled: (K, n_train) row numbers into the training split
            order = torch.gather(bootstrap, 1, torch.argsort(torch.rand(k, n_train, generator=generator,
                                                                        device=device), dim=1))
            for start in range(0, n_train, config.dynamics_batch_size):
                rows = train_rows[order[:, start:start + config.dynamics_batch_size]]  # (K, B)
                loss = ensemble.loss(inputs[rows], targets[rows], terminals[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["step"] += 1
        mse = ensemble.holdout_loss(holdout_inputs, holdout_targets, holdout_terminals).double().cpu()
        bad = ~torch.isfinite(mse) | (mse > limit)
        if bool(bad.any()):
            member = int(bad.nonzero()[0])
            progress.close()
            fail(f"dynamics member {member} diverged: held-out error {float(mse[member]):.3g} at epoch "
                 f"{state['epoch']} (gradient step {state['step']}), above {float(limit[member]):.3g}; lower "
                 f"--dynamics-lr (now {config.dynamics_lr:g}) or check the dataset for outliers")
        improved = (state["best_mse"] - mse) / state["best_mse"] > IMPROVEMENT
        state["best_mse"] = torch.where(improved, mse, state["best_mse"])
        with torch.no_grad():
            mask = improved.to(device)
            for best, p in zip(state["best_params"], member_params):
                best.copy_(torch.where(mask.view(-1, *[1] * (p.dim() - 1)), p, best))
        state["stale"] = 0 if bool(improved.any()) else state["stale"] + 1
        state["history"].append([round(float(v), 6) for v in mse])
        progress.extra = (f" | held-out error best {float(state['best_mse'].min()):.4g} mean "
                          f"{float(state['best_mse'].mean()):.4g}, {state['stale']}/{config.dynamics_patience} "
                          f"epochs without gain")
        progress.update(state["epoch"])
        if state["stale"] >= config.dynamics_patience or state["epoch"] >= config.dynamics_max_epochs:
            break
        if partial_path is not None and time.perf_counter() - last_save >= DYNAMICS_SAVE_SECONDS:
            state["seconds"] = time.perf_counter() - started
            save_checkpoint(partial_path, {"ensemble": ensemble.state_dict(), "optimizer": optimizer.state_dict(),
                                           "generator": generator.get_state(), "fit": state, "limit": limit})
            last_save = time.perf_counter()
    progress.close()
    with torch.no_grad():
        for best, p in zip(state["best_params"], member_params):
            p.copy_(best)
        mse = ensemble.holdout_loss(holdout_inputs, holdout_targets, holdout_terminals).cpu()
        ensemble.elites.copy_(torch.argsort(mse)[:ensemble.num_elites].to(device))
    seconds = time.perf_counter() - started
    elites = ensemble.elites.tolist()
    return {"holdout_mse": [float(v) for v in mse], "elites": elites,
            "elite_holdout_mse": float(mse[elites].mean()), "epochs": state["epoch"], "gradient_steps": state["step"],
            "train_seconds": seconds, "holdout_size": n_holdout, "history": state["history"],
            "stopped": "early stopping" if state["stale"] >= config.dynamics_patience else "max epochs"}


def save_dynamics(path: Path, ensemble: DynamicsEnsemble, report: dict, dataset_id: str, checksum: str,
                  architecture: dict, config: Config) -> None:
    """Write the fitted ensemble with what it was fitted on (dataset, checksum), its shapes and its report."""
    training = {k: getattr(config, k) for k in ("dynamics_weight_decay", "dynamics_lr", "dynamics_batch_size",
                                                "dynamics_holdout_ratio", "dynamics_max_holdout",
                                                "dynamics_patience", "dynamics_min_epoch_steps",
                                                "dynamics_max_epochs", "seed")}
    save_checkpoint(path, {"format": DYNAMICS_FORMAT, "dataset": dataset_id, "checksum": checksum,
                           "architecture": architecture, "training": training, "report": report,
                           "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()}})


def load_dynamics_file(path: str, dataset_id: str, checksum: str, architecture: dict) -> dict:
    """Read a saved ensemble and check it was fitted on this dataset with these shapes (one line if not)."""
    file = Path(path)
    if not file.is_file():
        fail(f"--dynamics {path}: no such file (a dynamics.pt written by an earlier mopo or combo run)")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        fail(f"--dynamics {path}: cannot read it: {type(err).__name__}: {err}")
    if not isinstance(saved, dict) or saved.get("format") != DYNAMICS_FORMAT:
        fail(f"--dynamics {path} is not a saved dynamics ensemble (dynamics.pt of a mopo or combo run)")
    if saved["dataset"] != dataset_id or saved["checksum"] != checksum:
        fail(f"--dynamics {path} was fitted on '{saved['dataset']}' (data checksum {saved['checksum'][:12]}), "
             f"not on this run's '{dataset_id}' (checksum {checksum[:12]}); leave --dynamics out to fit one")
    if saved["architecture"] != architecture:
        diff = ", ".join(f"{k} {saved['architecture'].get(k)} (this run: {v})" for k, v in architecture.items()
                         if saved["architecture"].get(k) != v)
        fail(f"--dynamics {path} has a different ensemble: {diff}; pass matching flags or leave --dynamics out")
    return saved


# ---------------------------------------------------------------------------------------------------------
# Model rollouts and the model buffer
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def model_rollout(policy: Callable[[torch.Tensor], torch.Tensor], dynamics, termination: TerminationFn | None,
                  start_obs: torch.Tensor, horizon: int, penalty_coef: float) -> tuple[dict, dict]:
    """Roll `policy` out in the model for `horizon` steps from every row of `start_obs`, all rows together.

    Each step: a ~ policy(s); (s', r, u) from a random elite (dynamics.step); r~ = r - penalty_coef u;
    done = termination(s, a, s') (or the learned head's logit > 0 when termination is None). A rollout stops
    after its first done step: that transition is kept (with done = 1), none after it. Returns the kept
    transitions (obs, actions, rewards [penalised], next_obs, terminals, and `step`/`start`, the step
    number and start row of each) and statistics (tensors). One host sync: the number of kept rows.
    """
    n = start_obs.shape[0]
    obs, alive = start_obs, torch.ones(n, dtype=torch.bool, device=start_obs.device)
    columns = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "terminals", "alive", "penalty")}
    for _ in range(horizon):
        actions = policy(obs)
        next_obs, reward, penalty, done_logit = dynamics.step(obs, actions)
        done = termination(obs, actions, next_obs) if termination is not None else done_logit > 0
        for key, value in (("obs", obs), ("actions", actions), ("rewards", reward - penalty_coef * penalty),
                           ("next_obs", next_obs), ("terminals", done.float()), ("alive", alive),
                           ("penalty", penalty)):
            columns[key].append(value)
        alive = alive & ~done
        obs = next_obs
    stacked = {k: torch.stack(v) for k, v in columns.items()}  # (h, n, ...)
    kept = stacked["alive"].reshape(-1).nonzero().squeeze(-1)  # the host sync
    out = {k: stacked[k].reshape(horizon * n, *stacked[k].shape[2:]).index_select(0, kept)
           for k in ("obs", "actions", "rewards", "next_obs", "terminals")}
    out["step"], out["start"] = kept // n, kept % n
    alive_mask = stacked["alive"].float()
    ended = (stacked["terminals"] * alive_mask).amax(0)
    stats = {"train/model_penalty_mean": (stacked["penalty"] * alive_mask).sum() / alive_mask.sum(),
             "train/model_reward_mean": out["rewards"].mean(),
             "train/rollout_terminated_frac": ended.mean(),
             "train/rollout_length_mean": alive_mask.sum(0).mean()}
    return out, stats


class ModelBuffer:
    """FIFO buffer of model transitions kept on the device: one (capacity, width) table, oldest rows overwritten.

    Columns: obs | actions | reward | next_obs | terminal. Sampling is one row gather with the global RNG of
    the device (saved in checkpoints), so resumed runs draw the same rows.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.widths = [obs_dim, act_dim, 1, obs_dim, 1]
        self.capacity, self.device = capacity, device
        self.table = torch.empty(capacity, sum(self.widths), device=device)  # pages touched only when filled
        self.size, self.pointer = 0, 0

    def add(self, transitions: dict[str, torch.Tensor]) -> None:
        rows = torch.cat([transitions["obs"], transitions["actions"], transitions["rewards"].unsqueeze(-1),
                          transitions["next_obs"], transitions["terminals"].unsqueeze(-1)], -1)
        rows = rows[-self.capacity:]
        first = min(len(rows), self.capacity - self.pointer)
        self.table[self.pointer:self.pointer + first] = rows[:first]
        self.table[:len(rows) - first] = rows[first:]
        self.pointer = (self.pointer + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """(obs, actions, rewards, next_obs, terminals) of `batch_size` rows drawn uniformly with replacement."""
        if self.size == 0:
            fail("the model buffer is empty: a rollout round must come before the first update")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        obs, actions, rewards, next_obs, terminals = self.table.index_select(0, idx).split(self.widths, 1)
        return obs, actions, rewards.squeeze(-1), next_obs, terminals.squeeze(-1)

    def state_dict(self) -> dict:
        return {"rows": self.table[:self.size].clone(), "pointer": self.pointer}

    def load_state_dict(self, state: dict) -> None:
        rows = state["rows"].to(self.device)
        self.size, self.pointer = len(rows), int(state["pointer"])
        self.table[:self.size] = rows


# ---------------------------------------------------------------------------------------------------------
# SAC networks
# ---------------------------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a|s): a = max_action * tanh(u), u ~ N(mu(s), sigma(s)^2)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 2 * act_dim)
        self.max_action = max_action

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample a ~ pi(.|s) and its log-density log pi(a|s), shapes (B, A) and (B,)."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        u = mean + log_std.exp() * torch.randn_like(mean)
        # log N(u; mu, sigma^2) - sum log(1 - tanh(u)^2), with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return self.max_action * torch.tanh(u), log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self.net(obs).chunk(2, dim=-1)
        return self.max_action * torch.tanh(mean)


class VectorizedLinear(nn.Module):
    """K independent linear layers applied as one batched matmul: (K, B, in) -> (K, B, out)."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features).uniform_(-bound, bound))


class CriticEnsemble(nn.Module):
    """Twin critics Q_1, Q_2(s, a) evaluated together: every layer is one `baddbmm` over the members."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], ensemble_size: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims, 1]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_weights: bool = False) -> torch.Tensor:
        """Q-values (K, B); `detach_weights`: the actor's loss reaches the action only, never the critics."""
        x = torch.cat([obs, actions], -1).unsqueeze(0).expand(self.ensemble_size, -1, -1)
        for i, layer in enumerate(self.layers):
            weight, bias = (layer.weight.detach(), layer.bias.detach()) if detach_weights else (layer.weight,
                                                                                                 layer.bias)
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


# ---------------------------------------------------------------------------------------------------------
# The agent: ensemble, model buffer, SAC
# ---------------------------------------------------------------------------------------------------------


class Agent:
    """The dynamics ensemble, the model buffer, the rollouts, and SAC (actor, twin critics, temperature)."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("mopo.py is for continuous (Box) actions; this dataset has discrete actions")
        # fields left at None (an Agent built straight from Config(), as the benchmark does) get the
        # per-dataset values of config.env, exactly as train() fills them
        config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        self.target_entropy = float(-spec.act_dim if config.target_entropy is None else config.target_entropy)
        # a tensor learning rate: the cosine schedule changes it in place, so a compiled update never retraces
        self.actor_lr = torch.tensor(config.actor_lr, device=device)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=self.actor_lr,
                                                **_fast_adam(device, config.compile))
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr,
                                                 **_fast_adam(device, config.compile))
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=config.alpha_lr,
                                                **_fast_adam(device, config.compile))
        # what each of the update's two backwards trains
        self.critic_params = list(self.critic.parameters())
        self.actor_and_alpha = [*self.actor.parameters(), self.log_alpha]
        self.dynamics = make_dynamics(config, spec).to(device)
        self.dynamics_report: dict | None = None  # set once the ensemble is fitted or loaded
        self.termination: TerminationFn | None = None  # the env's rule (train() sets it); None: learned head
        self.model_buffer = ModelBuffer(config.rollout_batch_size * config.rollout_length
                                        * config.model_retain_rounds, spec.obs_dim, spec.act_dim, device)
        self.rollout_stats: dict[str, torch.Tensor] = {}
        # observation standardisation of the policy and critics (identity until train() sets the dataset's)
        self.obs_mean = torch.zeros(spec.obs_dim, device=device)
        self.obs_std = torch.ones(spec.obs_dim, device=device)
        self.step = 0
        if config.compile:
            torch._dynamo.config.trace_autograd_ops = True  # trace loss.backward() into the compiled step too
        compile_mode = "reduce-overhead" if device.type == "cuda" else None  # on CUDA: replayed as CUDA graphs
        self._update = (torch.compile(self._update_impl, mode=compile_mode, dynamic=False) if config.compile
                        else self._update_impl)

    @property
    def dynamics_ready(self) -> bool:
        return self.dynamics_report is not None

    def set_obs_normalizer(self, normalizer: ObsNormalizer | None) -> None:
        if normalizer is not None:
            self.obs_mean = torch.as_tensor(normalizer.mean, device=self.device)
            self.obs_std = torch.as_tensor(normalizer.std, device=self.device)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    # --- model rollouts ------------------------------------------------------------------------------------
    def rollout_policy(self, obs: torch.Tensor) -> torch.Tensor:
        """The current stochastic policy a ~ pi(.|s) on raw model states (the reference code's rollouts)."""
        return self.actor.sample(self.normalize(obs))[0]

    @torch.no_grad()
    def rollout_round(self, start_obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """h-step rollouts of the current policy from `start_obs` (raw dataset states) into the model buffer."""
        transitions, stats = model_rollout(self.rollout_policy, self.dynamics, self.termination, start_obs,
                                           self.config.rollout_length, self.config.penalty_coef)
        self.model_buffer.add(transitions)
        self.rollout_stats = {**stats, "train/model_buffer_size": torch.tensor(float(self.model_buffer.size))}
        return self.rollout_stats

    # --- SAC on the real / model mixture --------------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One SAC step on the first f * B rows of `batch` (real data) and (1 - f) B rows of the model buffer."""
        n = batch["obs"].shape[0]
        n_real = int(n * self.config.real_ratio)  # the reference code's int(256 * 0.05) = 12
        model = self.model_buffer.sample(n - n_real)
        obs, actions, rewards, next_obs, terminals = (
            torch.cat([batch[key][:n_real], part]) for key, part in
            zip(("obs", "actions", "rewards", "next_obs", "terminals"), model))
        if self.config.cosine_schedule:
            # lr_t = lr (1 + cos(pi t / T)) / 2, reaching 0 at T = max_steps (OfflineRL-Kit's CosineAnnealingLR)
            progress = min(self.step / self.config.max_steps, 1.0)
            self.actor_lr.fill_(self.config.actor_lr * 0.5 * (1.0 + math.cos(math.pi * progress)))
        self.step += 1
        # outside the compiled step (torch.compile skips zero_grad); each loss below reaches only its own
        # optimiser's parameters, so resetting all of them here equals resetting each before its backward
        self.critic_optimizer.zero_grad(set_to_none=True)
        self.actor_optimizer.zero_grad(set_to_none=True)
        self.alpha_optimizer.zero_grad(set_to_none=True)
        return {**self._update(obs, actions, rewards, next_obs, terminals), **self.rollout_stats}

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
                     terminals: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        obs, next_obs = self.normalize(obs), self.normalize(next_obs)
        alpha = self.log_alpha.detach().exp()

        # --- critics: soft policy evaluation on the mixture; model rows carry r~ = r - lambda u(s, a) ---
        with torch.no_grad():
            next_actions, next_log_prob = self.actor.sample(next_obs)
            target_q = self.critic_target(next_obs, next_actions).min(0).values
            # y = r~ + gamma (1 - d) ( min_i Q'_i(s', a') - alpha log pi(a'|s') ),  a' ~ pi(.|s')
            y = rewards + cfg.discount * (1.0 - terminals) * (target_q - alpha * next_log_prob)
        q = self.critic(obs, actions)  # (2, B)
        # J_Q = E_(s,a,r~,s')~(f D + (1-f) D_model) [ (Q_i(s, a) - y)^2 ], both critics (summed)
        critic_loss = ((q - y) ** 2).mean(1).sum()
        # logged values are taken before each backward (which consumes the graph they hang on)
        logs = {"train/critic_loss": critic_loss.detach(), "train/q_data": q.detach().min(0).values.mean()}
        critic_loss.backward(inputs=self.critic_params)  # inputs: the parameters trained, named (see below)
        self.critic_optimizer.step()

        # --- actor: J_pi = E_s [ alpha log pi(a|s) - min_i Q_i(s, a) ],  a ~ pi(.|s) (the updated critics) ---
        pi_actions, log_prob = self.actor.sample(obs)
        q_pi = self.critic(obs, pi_actions, detach_weights=True).min(0).values
        actor_loss = (alpha * log_prob - q_pi).mean()

        # --- temperature: J(alpha) = E_a~pi [ -alpha (log pi(a|s) + H-bar) ] (through log alpha) ---
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        logs.update({"train/actor_loss": actor_loss.detach(), "train/alpha": alpha,
                     "train/entropy": -log_prob.detach().mean(), "train/q_policy": q_pi.detach().mean()})
        # the two losses touch disjoint parameters (alpha enters the actor's detached): one backward serves both;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare tensors
        # such as log_alpha when the step is recompiled)
        (actor_loss + alpha_loss).backward(inputs=self.actor_and_alpha)
        self.actor_optimizer.step()
        self.alpha_optimizer.step()

        with torch.no_grad():
            # Q' <- (1 - polyak) Q' + polyak Q
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), cfg.polyak)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action max_action * tanh(mu(s)) on normalised observations (as evaluate() gives)."""
        return self.actor.deterministic(obs)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q_1, Q_2)(s, a) on normalised observations, shape (batch,)."""
        return self.critic(obs, actions).min(0).values

    # --- the benchmark's hooks (common/reporting/bench.py) ----------------------------------------------
    def prepare_bench(self, source: TensorSampler) -> None:
        """Give the synthetic benchmark agent a model and a model buffer: the bench's data has halfcheetah's
        sizes, so HalfCheetah's rule (never terminates); one small rollout round fills the buffer."""
        self.termination = termination_function("HalfCheetah-v5", self.config.termination)
        self.rollout_round(source.sample(1_024)["obs"])

    def bench_phases(self, source: TensorSampler) -> dict[str, Callable[[], object]]:
        """Operations the benchmark times besides the update: one rollout round at the configured size."""
        starts = source.sample(self.config.rollout_batch_size)["obs"]
        return {"rollout round": lambda: self.rollout_round(starts)}

    # --- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict(), "dynamics": self.dynamics.state_dict(),
                "dynamics_report": self.dynamics_report, "model_buffer": self.model_buffer.state_dict(),
                "rollout_stats": dict(self.rollout_stats), "obs_mean": self.obs_mean, "obs_std": self.obs_std,
                "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        _use_this_runs_adam([self.actor_optimizer, self.critic_optimizer, self.alpha_optimizer],
                            self.device, self.config.compile)
        # the optimiser's saved lr replaced our tensor: point it back, so the schedule keeps driving it
        self.actor_optimizer.param_groups[0]["lr"] = self.actor_lr
        self.dynamics.load_state_dict(state["dynamics"])
        self.dynamics_report = state["dynamics_report"]
        self.model_buffer.load_state_dict(state["model_buffer"])
        self.rollout_stats = {k: v.to(self.device) for k, v in state["rollout_stats"].items()}
        self.obs_mean, self.obs_std = state["obs_mean"].to(self.device), state["obs_std"].to(self.device)
        self.step = int(state["step"])


def _fast_adam(device: torch.device, compiled: bool) -> dict:
    """Fused Adam (one kernel for all parameters) where this torch build has it, else foreach. Under --compile
    the foreach Adam, which torch.compile traces into the step (it runs the fused one outside the graph), and
    capturable: its step count stays a device tensor, as a CUDA graph needs."""
    if compiled:
        return {"foreach": True, "capturable": True}
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def _use_this_runs_adam(optimizers: list, device: torch.device, compiled: bool) -> None:
    """Set this run's Adam implementation on loaded optimisers: they keep the flags they were saved with, and
    --compile may differ on resume (both implementations keep the step count on the parameters' device)."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group.update({"fused": None, "foreach": None, "capturable": False, **_fast_adam(device, compiled)})


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def check_transitions(data: dict[str, np.ndarray], name: str) -> None:
    """A model needs (s, a, r, s') with real rewards and next observations: one clear line if they are missing."""
    for key, what in (("rewards", "rewards"), ("next_obs", "next observations"), ("obs", "observations"),
                      ("actions", "actions")):
        if key not in data or data[key] is None or len(data[key]) == 0:
            fail(f"dataset '{name}' has no {what}: a dynamics model is fitted on (s, a, r, s') transitions")
        if not np.isfinite(data[key]).all():
            bad = int((~np.isfinite(data[key])).reshape(len(data[key]), -1).any(1).sum())
            fail(f"dataset '{name}' has {bad} transitions whose {what} are not finite (NaN or inf); a dynamics "
                 f"model needs every (s, a, r, s')")
    if not np.any(data["rewards"]):
        fail(f"dataset '{name}' stores no rewards (every reward is 0): model-based RL needs the reward of "
             f"each transition")


def check_config(config: Config) -> None:
    """This file's own fields, before anything is written."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            fail(message)

    need(0.0 <= config.real_ratio <= 1.0, f"--real-ratio must lie in [0, 1], got {config.real_ratio}")
    need(config.rollout_length >= 1, f"--rollout-length must be at least 1, got {config.rollout_length}")
    need(config.penalty_coef >= 0, f"--penalty-coef must be 0 or positive, got {config.penalty_coef}")
    for name in ("rollout_every", "rollout_batch_size", "model_retain_rounds", "ensemble_size",
                 "dynamics_batch_size", "dynamics_min_epoch_steps", "dynamics_max_holdout", "dynamics_patience",
                 "dynamics_max_epochs"):
        need(getattr(config, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    need(1 <= config.num_elites <= config.ensemble_size,
         f"--num-elites must lie in [1, --ensemble-size {config.ensemble_size}], got {config.num_elites}")
    need(len(config.dynamics_weight_decay) == len(config.dynamics_hidden_dims) + 1,
         f"--dynamics-weight-decay needs {len(config.dynamics_hidden_dims) + 1} values (one per hidden layer "
         f"and the output), got {len(config.dynamics_weight_decay)}")
    need(0.0 < config.dynamics_holdout_ratio < 1.0,
         f"--dynamics-holdout-ratio must lie in (0, 1), got {config.dynamics_holdout_ratio}")
    need(config.dynamics_lr > 0, f"--dynamics-lr must be positive, got {config.dynamics_lr}")


def dynamics_logs(report: dict) -> dict[str, float]:
    """The ensemble's diagnostics as metrics: held-out MSE per member, which are elites, fit time."""
    logs = {f"dynamics/holdout_mse_member_{i}": v for i, v in enumerate(report["holdout_mse"])}
    logs.update({f"dynamics/elite_{rank}": float(member) for rank, member in enumerate(report["elites"])})
    logs.update({"dynamics/elite_holdout_mse": report["elite_holdout_mse"], "dynamics/epochs": report["epochs"],
                 "dynamics/train_seconds": report["train_seconds"]})
    return logs


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"mopo.py needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    check_transitions(data, config.env)
    termination = termination_function(dataset.eval_env_spec, config.termination)
    checksum = data_checksum(data)
    architecture = dynamics_architecture(config, dataset.spec)
    reused = load_dynamics_file(config.dynamics, dataset.minari_id, checksum, architecture) if config.dynamics \
        else None
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    # raw observations: the ensemble and the termination rule read them; the agent standardises for its networks
    sampler = TensorSampler({k: data[k] for k in ("obs", "actions", "rewards", "next_obs", "terminals")},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)
    agent.set_obs_normalizer(normalizer)
    agent.termination = termination

    run = Run("mopo", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    if not agent.dynamics_ready:
        dynamics_path = run.dir / "dynamics.pt"
        if reused is not None:
            agent.dynamics.load_state_dict(reused["state_dict"])
            agent.dynamics_report = {**reused["report"], "path": str(Path(config.dynamics).resolve())}
            print(f"dynamics ensemble from {config.dynamics} (fitted on {reused['dataset']})", file=sys.stderr)
        else:
            run.save_checkpoint(0, agent, sampler)  # a run killed while fitting can be resumed from here
            fit_data = {k: torch.as_tensor(v, device=device) for k, v in data.items() if k in (
                "obs", "actions", "rewards", "next_obs", "terminals")}
            report = fit_dynamics(agent.dynamics, fit_data, config, config.seed,
                                  partial_path=run.dir / "dynamics-partial.pt", label=f"dynamics {dataset.name}")
            save_dynamics(dynamics_path, agent.dynamics, report, dataset.minari_id, checksum, architecture, config)
            (run.dir / "dynamics-partial.pt").unlink(missing_ok=True)
            agent.dynamics_report = {**report, "path": str(dynamics_path.resolve())}
            print(f"dynamics ensemble: {report['epochs']} epochs ({report['stopped']}) in "
                  f"{report['train_seconds']:.1f} s; held-out MSE per member "
                  f"{', '.join(f'{v:.4g}' for v in report['holdout_mse'])}; elites {report['elites']} "
                  f"(mean {report['elite_holdout_mse']:.4g}); saved to {dynamics_path} (reuse it with "
                  f"--dynamics {dynamics_path})", file=sys.stderr, flush=True)
        run.log(0, dynamics_logs(agent.dynamics_report))
        run.save_checkpoint(0, agent, sampler)  # from here on a resumed run never fits the ensemble again

    envs = make_eval_envs(dataset, config.eval_episodes)
    for step in run.steps(start):
        if (step - 1) % config.rollout_every == 0:
            agent.rollout_round(sampler.sample(config.rollout_batch_size)["obs"])
        logs = agent.update(sampler.sample(config.batch_size))
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                run.log_eval(step, evaluate(agent.act, dataset, normalizer, config.eval_episodes,
                                            config.seed, device, envs))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, sampler)
    result = evaluate(agent.act, dataset, normalizer, config.eval_episodes, config.seed, device, envs)
    run.log_eval(config.max_steps, result)
    envs.close()
    report = agent.dynamics_report
    return run.finish(result, {"dynamics": {k: report.get(k) for k in (
        "path", "holdout_mse", "elites", "elite_holdout_mse", "epochs", "train_seconds")}})


if __name__ == "__main__":
    run_cli(train, Config)
