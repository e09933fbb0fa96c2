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
(`real_ratio`, 5%) real data and the rest model data, whose reward is already penalised. `train/q_data` is Q on
the batch's dataset pairs, `train/q_model` on its model pairs, `train/q_batch` the mean over both.

The ensemble, its fit, the termination rules, the rollouts and the model buffer are common/dynamics.py's (the
same as combo.py's): 7 Gaussian members over (delta s, r), 4 Swish layers of 200, early stopping on a held-out
split, the 5 members with the lowest held-out MSE as elites (a random elite draws each model step); model steps
end where the env's own termination rule says so. The penalty is the reference code's max over all 7 members of
||sigma_i(s, a)||_2 over the (delta s, r) dimensions, i.e. ||Sigma_i^(1/2)||_F of the diagonal covariance: the
slide writes ||Sigma_i||_F, the paper's numbers come from the standard deviation (`uncertainty` below).

Per-dataset settings (the rollout horizon h and the penalty lambda as OfflineRL-Kit publishes them for the
D4RL v2 sets, the original MOPO configs where it has none; the training length; the rollout batch; the cap on
ensemble epochs) live in `DATASET_SETTINGS` below; flags override them.

--compile compiles the whole SAC step (common/optim.py); the rollouts and the ensemble's fit run eagerly.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset  # noqa: E402
from common.dynamics import (LearnedModel, check_model_config, dynamics_summary, fit_or_load_dynamics,  # noqa: E402
                             model_data, model_rollout, termination_function)
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.networks import CriticEnsemble, sample_tanh_gaussian  # noqa: E402
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, apply_dataset_settings, resolve_config, run_cli, setup  # noqa: E402


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
    online_steps: int = 0
    """env steps of online fine-tuning after the offline phase, one update each (0: offline only; see
    common/online.py; a file whose Agent cannot explore refuses any other value)"""
    capture_video: bool = False
    """record the final evaluation's first episodes (and, with --eval-every, periodic ones) as MP4 in the run
    directory, and to W&B with --track"""
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
    """when a model rollout ends: env = the env's own termination rule (common/dynamics.py; refused for an env
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
    gamma: float = 0.99
    """gamma in y = r~ + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s'))"""
    tau: float = 0.005
    """tau in the target update Q' <- (1 - tau) Q' + tau Q"""
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


# ---------------------------------------------------------------------------------------------------------
# Networks: the SAC actor (the twin critics are common.networks.CriticEnsemble)
# ---------------------------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a|s): a = max_action * tanh(u), u ~ N(mu(s), sigma(s)^2), mu and log sigma from one MLP."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 2 * act_dim)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised sample a ~ pi(.|s) and its log-density log pi(a|s) on the action box (the -log
        max_action of the scaling included: common.dynamics.tanh_gaussian_log_prob), shapes (B, A) and (B,)."""
        actions, log_prob = sample_tanh_gaussian(*self(obs), self.max_action, 1)
        return actions[:, 0], log_prob[:, 0]

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self(obs)[0])


# ---------------------------------------------------------------------------------------------------------
# MOPO's steps 2 and 3: the uncertainty u(s, a), and model rollouts with the pessimistic reward r~
# (step 1, the ensemble fitted on D, is common/dynamics.py's, called from train())
# ---------------------------------------------------------------------------------------------------------


def uncertainty(logvar: torch.Tensor) -> torch.Tensor:
    """u(s, a) from every member's log-variance: logvar (K, N, S + 1) over (delta s, r) -> (N,).

    u(s, a) = max_{i=1..N} ||Sigma_i(s, a)||_F   (lecture: "Model-based Offline Policy Optimization"),
    computed as the reference code does: max_i ||sigma_i(s, a)||_2, the largest standard-deviation vector
    (||Sigma_i^(1/2)||_F of the diagonal covariance), over all K members, not only the elites."""
    return torch.exp(0.5 * logvar).norm(dim=-1).amax(0)


@torch.no_grad()
def pessimistic_rollouts(policy: Callable[[torch.Tensor], torch.Tensor], dynamics, termination, start_obs: torch.Tensor,
                         horizon: int, penalty_coef: float) -> tuple[dict, dict]:
    """h-step rollouts of `policy` in the model from dataset states (common.dynamics.model_rollout, every member
    evaluated for u), each model reward replaced by the pessimistic r~. Returns (transitions, statistics)."""
    rollouts, stats = model_rollout(policy, dynamics, termination, start_obs, horizon, uncertainty)
    # r~(s, a) = r(s, a) - lambda u(s, a)   (lecture: "Model-based Offline Policy Optimization", step 3)
    rollouts["rewards"] = rollouts["rewards"] - penalty_coef * rollouts["uncertainty"]
    stats["train/model_reward_mean"] = rollouts["rewards"].mean()  # of r~
    return rollouts, stats


# ---------------------------------------------------------------------------------------------------------
# The agent: SAC on the mixture of dataset rows and penalised model rows
# ---------------------------------------------------------------------------------------------------------


class Agent:
    """SAC (actor, twin critics, temperature) on f D + (1 - f) D_model, and the learned model (common/dynamics.py)."""

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
        self.actor_optimizer = adam(self.actor.parameters(), self.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.alpha_optimizer = adam([self.log_alpha], config.alpha_lr, config)
        # what each of the update's two backwards trains
        self.critic_params = list(self.critic.parameters())
        self.actor_and_alpha = [*self.actor.parameters(), self.log_alpha]
        # the dynamics ensemble, the env's termination rule and the model buffer D_model
        self.model = LearnedModel(config, spec, device)
        # observation standardisation of the policy and critics (identity until train() sets the dataset's)
        self.obs_mean = torch.zeros(spec.obs_dim, device=device)
        self.obs_std = torch.ones(spec.obs_dim, device=device)
        self.step = 0
        # zero_grad of the three optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer,
                                   self.alpha_optimizer)

    def set_obs_normalizer(self, normalizer: ObsNormalizer | None) -> None:
        if normalizer is not None:
            self.obs_mean = torch.as_tensor(normalizer.mean, device=self.device)
            self.obs_std = torch.as_tensor(normalizer.std, device=self.device)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    # --- model rollouts with r~ into D_model -------------------------------------------------------------
    def rollout_policy(self, obs: torch.Tensor) -> torch.Tensor:
        """The current stochastic policy a ~ pi(.|s) on raw model states (the reference code's rollouts)."""
        return self.actor.sample(self.normalize(obs))[0]

    @torch.no_grad()
    def rollout_round(self, start_obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """h-step rollouts of the current policy from `start_obs` (raw dataset states) into the model buffer."""
        rollouts, stats = pessimistic_rollouts(self.rollout_policy, self.model.ensemble, self.model.termination,
                                               start_obs, self.config.rollout_length, self.config.penalty_coef)
        return self.model.add(rollouts, stats)

    # --- SAC on the real / model mixture --------------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One SAC step on the first f * B rows of `batch` (real data) and (1 - f) B rows of the model buffer."""
        # the reference code's int(256 * 0.05) = 12; at least one dataset row when f > 0 (small batches)
        n_real = max(1, int(batch["obs"].shape[0] * self.config.real_ratio)) if self.config.real_ratio > 0 else 0
        obs, actions, rewards, next_obs, terminals = self.model.mix(batch, n_real)
        if self.config.cosine_schedule:
            # lr_t = lr (1 + cos(pi t / T)) / 2, reaching 0 at T = max_steps (OfflineRL-Kit's CosineAnnealingLR)
            progress = min(self.step / self.config.max_steps, 1.0)
            self.actor_lr.fill_(self.config.actor_lr * 0.5 * (1.0 + math.cos(math.pi * progress)))
        self.step += 1
        # n_real: a Python int, the same every step of a run (one compiled graph)
        return {**self._update(obs, actions, rewards, next_obs, terminals, n_real), **self.model.stats}

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
                     terminals: torch.Tensor, n_real: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        obs, next_obs = self.normalize(obs), self.normalize(next_obs)
        alpha = self.log_alpha.detach().exp()

        # --- critics: soft policy evaluation on the mixture; model rows carry r~ = r - lambda u(s, a) ---
        with torch.no_grad():
            next_actions, next_log_prob = self.actor.sample(next_obs)
            target_q = self.critic_target(next_obs, next_actions).min(0).values
            # y = r~ + gamma (1 - d) ( min_i Q'_i(s', a') - alpha log pi(a'|s') ),  a' ~ pi(.|s')
            y = rewards + cfg.gamma * (1.0 - terminals) * (target_q - alpha * next_log_prob)
        q = self.critic(obs, actions)  # (2, B)
        # J_Q = E_(s,a,r~,s')~(f D + (1-f) D_model) [ (Q_i(s, a) - y)^2 ], both critics (summed)
        critic_loss = ((q - y) ** 2).mean(1).sum()
        # logged values are taken before each backward (which consumes the graph they hang on): Q on the dataset
        # pairs (the first n_real rows), on the model's, and over the whole mixed batch
        q_min = q.detach().min(0).values
        logs = {"train/critic_loss": critic_loss.detach(), "train/q_batch": q_min.mean()}
        if n_real > 0:
            logs["train/q_data"] = q_min[:n_real].mean()
        if n_real < q_min.shape[0]:
            logs["train/q_model"] = q_min[n_real:].mean()
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
            # Q' <- (1 - tau) Q' + tau Q
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), cfg.tau)
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
        self.model.termination = termination_function("HalfCheetah-v5", self.config.termination)
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
                "alpha_optimizer": self.alpha_optimizer.state_dict(), **self.model.state_dict(),
                "obs_mean": self.obs_mean, "obs_std": self.obs_std, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        load_optimizer(self.alpha_optimizer, state["alpha_optimizer"])
        # the optimiser's saved lr replaced our tensor: point it back, so the schedule keeps driving it
        self.actor_optimizer.param_groups[0]["lr"] = self.actor_lr
        self.model.load_state_dict(state)
        self.obs_mean, self.obs_std = state["obs_mean"].to(self.device), state["obs_std"].to(self.device)
        self.step = int(state["step"])


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def check_config(config: Config) -> None:
    """This file's own fields, then the model's (common.dynamics.check_model_config), before anything is written."""
    if not 0.0 <= config.real_ratio <= 1.0:
        fail(f"--real-ratio must lie in [0, 1], got {config.real_ratio}")
    if config.penalty_coef < 0:
        fail(f"--penalty-coef must be 0 or positive, got {config.penalty_coef}")
    check_model_config(config)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    # the transitions, the env's termination rule and the --dynamics file, checked before anything is written
    data = model_data(config, dataset, "mopo.py")
    normalizer = ObsNormalizer.from_data(data.transitions["obs"]) if config.normalize_obs else None
    # raw observations: the ensemble and the termination rule read them; the agent standardises for its networks
    sampler = TensorSampler(data.transitions, device, config.seed)
    agent = Agent(config, dataset.spec, device)
    agent.set_obs_normalizer(normalizer)
    agent.model.termination = data.termination

    run = Run("mopo", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    # MOPO's step 1, once: estimate r(s, a) and p(s'|s, a) from D (or load the --dynamics file)
    fit_or_load_dynamics(agent.model, data, config, dataset, run, lambda: run.save_checkpoint(0, agent, sampler))
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
                                            config.seed, device, envs, video=run.video_for(step)))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, sampler)
    result = evaluate(agent.act, dataset, normalizer, config.eval_episodes, config.seed, device, envs,
                      video=run.video_for(run.total_steps))
    run.log_eval(config.max_steps, result)
    envs.close()
    return run.finish(result, dynamics_summary(agent.model.report))


if __name__ == "__main__":
    run_cli(train, Config)
