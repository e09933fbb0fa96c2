"""Conservative Q-Learning, CQL(H), on a soft actor-critic (SAC) backbone, for continuous actions.

Lecture sections: "Conservative Q-Learning" (learn a Q-function whose value for the learned policy lower-bounds
the true value), "Conservative Evaluation" (push Q down on actions a ~ mu(a|s), up on dataset actions) and
"Conservative Control" (alternate conservative evaluation with policy improvement by an actor).
Paper: Kumar, Zhou, Tucker, Levine 2020, "Conservative Q-Learning for Offline Reinforcement Learning" (CQL(H):
mu is the soft-maximum over actions, so the push-down term becomes log sum_a exp Q(s, a)).

Usage:
    python algorithms/cql.py                                   # embedded default: local pendulum data
    python algorithms/cql.py --env hopper-medium-replay-v2
    python algorithms/cql.py --env antmaze-medium-play-v2      # Lagrange variant, BC warm-up: per dataset
    python algorithms/cql.py --env hopper-medium-v2 --lagrange --lagrange-threshold 10
    python algorithms/cql.py --online-steps 20000              # then 20k env steps of online fine-tuning

The discrete-action version (a double-DQN critic) is algorithms/cql_discrete.py.
Per-dataset settings (alpha, the Lagrange threshold tau, the policy learning rate, BC warm-up steps, the reward
transform, training length) live in `DATASET_SETTINGS` below; flags override them. Locomotion follows the
reference code (github.com/aviralkumar2907/CQL, d4rl/examples/cql_mujoco_new.py): alpha 5 (its comment: "5.0 or
10.0 if not using lagrange"), raw rewards, policy lr 1e-4, and a BC warm-up of 40k steps (its default
`policy_eval_start` 40000, "40000 or 10000 work similarly"). CORL's locomotion configs differ: alpha 10, policy lr
3e-5, no BC warm-up, raw rewards (every locomotion config but hopper-medium-v2, which rescales by the return
range) and orthogonal initialisation (`--orthogonal-init`). Antmaze uses the Lagrange variant with tau 5,
alpha 5, 40k BC warm-up steps and policy lr 1e-4 (the reference README).

Online fine-tuning (--online-steps; common/online.py) as CORL's finetune/cql.py: the policy acts by sampling its
tanh-Gaussian, online transitions join the offline data in one buffer sampled uniformly, one update per env step,
and at the switch alpha becomes online_cql_alpha (CORL's configs set it equal to the offline alpha: 5 antmaze,
1 adroit; so None here keeps cql_alpha).

--compile compiles the whole update (common/optim.py); the BC warm-up is a second graph, and so is the online
phase's update (its alpha).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.networks import (CriticEnsemble, VectorizedLinear, sample_tanh_gaussian,  # noqa: E402
                             tanh_gaussian_log_prob)
from common.online import OnlinePhase  # noqa: E402
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, resolve_config, run_cli, setup  # noqa: E402


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
    # --- conservative Q-learning ---
    cql_alpha: float | None = None
    """alpha, the trade-off in alpha * (E_s log sum_a exp Q(s,a) - E_(s,a)~D Q(s,a)): how conservative Q is
    (None: from DATASET_SETTINGS; 0 turns CQL off and leaves offline SAC)"""
    cql_num_samples: int = 10
    """n, actions sampled per state for each of the three proposals (uniform, pi(.|s), pi(.|s')) that
    estimate log sum_a exp Q(s,a) (paper and reference code: 10)"""
    cql_temperature: float = 1.0
    """temperature of the logsumexp (the paper's CQL(H) uses 1)"""
    lagrange: bool = False
    """the Lagrange variant on any dataset: alpha' tuned by dual descent so that the CQL gap stays near tau
    (it is on anyway where DATASET_SETTINGS gives a positive lagrange_threshold, i.e. antmaze)"""
    lagrange_threshold: float | None = None
    """tau, the target action gap of the Lagrange variant, in the reference code's form cql_alpha * gap <= tau.
    A positive value switches the variant on (None: from DATASET_SETTINGS: 5.0 on antmaze, -1 = off elsewhere;
    --lagrange with a non-positive tau uses 10.0, the reference code's default)"""
    bc_steps: int | None = None
    """BC warm-up: for the first this many steps the actor maximises log pi(a_data|s) instead of Q
    (None: from DATASET_SETTINGS; the reference code's 40k, 0 on the small local sets)"""
    policy_lr: float | None = None
    """Adam learning rate of the actor and of the entropy temperature (None: from DATASET_SETTINGS, 1e-4)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics and of log alpha' (paper: 3e-4)"""
    gamma: float = 0.99
    """gamma, the discount in the Bellman target r + gamma * (1 - done) * Q'(s', a')"""
    tau: float = 5e-3
    """Polyak rate tau of the target critics: Q' <- (1 - tau) Q' + tau Q every step (reference code: 5e-3; not
    the Lagrange threshold: that is --lagrange-threshold)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the actor and of each critic (reference code: 3 x 256)"""
    target_entropy: float | None = None
    """target entropy H-bar of the automatic entropy tuning (None: -|A|, as in SAC)"""
    backup_entropy: bool = False
    """subtract alpha_ent * log pi(a'|s') in the Bellman target (the reference code does not: False)"""
    reward_transform: Literal["none", "return-range", "minus-one"] | None = None
    """reward shaping before training (None: from DATASET_SETTINGS; minus-one on antmaze, none elsewhere)"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3)"""
    orthogonal_init: bool = False
    """CORL's initialisation: orthogonal hidden weights (gain sqrt 2), zero biases, output layers orthogonal
    with gain 1e-2 (False: PyTorch's default uniform initialisation)"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = None
    """fraction of each online-phase batch drawn from the offline data (None: uniform over the offline and online
    rows, one growing buffer, as CORL's CQL fine-tuning; the Cal-QL paper's CQL baseline mixes 0.5)"""
    online_cql_alpha: float | None = None
    """alpha of the online phase, set at the switch (None: the offline cql_alpha, as CORL's fine-tuning configs:
    online_cql_alpha = cql_alpha, 5 antmaze and 1 adroit)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The reference code (github.com/aviralkumar2907/CQL): locomotion alpha 5 (or 10),
# policy lr 1e-4, no Lagrange, BC warm-up for the first 40k of 1M steps (policy_eval_start 40000); antmaze the
# Lagrange variant with tau 5 and alpha 5, 40k BC warm-up steps, policy lr 1e-4. The reference antmaze code
# centres the sparse reward as (r - 0.5) * 4 and CORL uses 10 r - 5; this library offers IQL's r - 1
# ("minus-one"), the same idea (every non-goal step costs, the goal is worth 1 more). CORL's antmaze setting for
# comparison: Lagrange with a gap of 0.8 subtracted before multiplying by alpha = 5 (equivalent tau 4), policy lr
# 1e-4, no BC warm-up, max-Q backups, 5 hidden layers. The small local and test sets train for far fewer steps,
# so they skip the warm-up (40k steps would be most or all of their budget).
_LOCOMOTION = {"cql_alpha": 5.0, "lagrange_threshold": -1.0, "bc_steps": 40_000, "policy_lr": 1e-4,
               "reward_transform": "none"}
_SMALL = {**_LOCOMOTION, "bc_steps": 0}
_ANTMAZE = {"cql_alpha": 5.0, "lagrange_threshold": 5.0, "bc_steps": 40_000, "policy_lr": 1e-4,
            "reward_transform": "minus-one", "max_steps": 1_000_000}
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {**_SMALL, "max_steps": 50_000}),
    ("test/*", {**_SMALL, "max_steps": 5_000}),
    ("antmaze-*", _ANTMAZE),
    ("D4RL/antmaze/*", _ANTMAZE),
    ("*", {**_LOCOMOTION, "max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the reference code's clamp of the log-std (rlkit policies.py; CORL: -20)
LAGRANGE_THRESHOLD_DEFAULT = 10.0  # tau of `--lagrange` when the dataset gives none (reference code default)
LAGRANGE_ALPHA_MAX = 1e6  # the reference code clamps alpha' to [0, 1e6]
ATANH_EPS = 1e-6  # dataset actions at the bound would give atanh = inf in the BC warm-up log-likelihood


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a|s): a = max_action * tanh(u), u ~ N(mu(s), sigma(s)^2), mu and log sigma from one MLP."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 2 * act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def orthogonal_init_(module: nn.Module) -> None:
    """CORL's initialisation of one network: hidden weights orthogonal with gain sqrt(2), the output layer's
    with gain 1e-2, biases zero (`VectorizedLinear` members one by one, as if each were an nn.Linear)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, VectorizedLinear))]
    for i, layer in enumerate(layers):
        gain = 1e-2 if i == len(layers) - 1 else math.sqrt(2.0)
        with torch.no_grad():
            if isinstance(layer, nn.Linear):
                nn.init.orthogonal_(layer.weight, gain=gain)
            else:  # weight (K, in, out), used as x @ W: initialise each member's (out, in) matrix
                for member in layer.weight:
                    matrix = torch.empty(member.shape[1], member.shape[0])
                    nn.init.orthogonal_(matrix, gain=gain)
                    member.copy_(matrix.T)
            layer.bias.zero_()


def uniform_log_density(act_dim: int, max_action: float) -> float:
    """log of the uniform density on the action box [-max_action, max_action]^|A|: log((1 / (2 max_action))^|A|).

    For max_action = 1 this is the paper's log(0.5^|A|); a box twice as wide has half the density per dim.
    """
    return -act_dim * math.log(2.0 * max_action)


def cql_logsumexp(q_uniform: torch.Tensor, q_policy: torch.Tensor, q_policy_next: torch.Tensor,
                  log_pi: torch.Tensor, log_pi_next: torch.Tensor, log_uniform: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """CQL(H)'s push-down term log sum_a exp Q(s, a), estimated by importance sampling (last dim: samples).

    Q(s, a) at n actions a ~ Unif(action box) (density exp(log_uniform)), n actions a ~ pi(.|s) and n actions
    a ~ pi(.|s') (all evaluated at the state s), each divided by its proposal density (subtract the log-density),
    concatenated (3n values) and log-sum-exp'd at `temperature`:
        T * log sum_j exp( (Q(s, a_j) - log p(a_j)) / T ).
    As in the reference code this is a log-SUM, not a log-mean, over the 3n samples: it exceeds the
    importance-sampling estimate of log int exp Q(s,a) da by the constant log(3n), which moves no gradient
    but is part of the logged gap and of what the Lagrange threshold tau was tuned against.
    Shapes: q_* (..., n) (e.g. (K, B, n) for K critics), log_pi* broadcastable to them (e.g. (B, n)).
    """
    weighted = torch.cat([q_uniform - log_uniform, q_policy_next - log_pi_next, q_policy - log_pi], dim=-1)
    return temperature * torch.logsumexp(weighted / temperature, dim=-1)


class Agent:
    """Tanh-Gaussian actor, twin critics (one ensemble), their targets, the temperatures and the CQL(H) update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("cql.py is for continuous (Box) actions; for a discrete dataset use algorithms/cql_discrete.py")
        config = _with_catch_all_settings(config)
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.act_dim = spec.act_dim
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, config.hidden_dims).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims).to(device)
        if config.orthogonal_init:
            orthogonal_init_(self.actor)
            orthogonal_init_(self.critic)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # log alpha_ent of the automatic entropy tuning, and log alpha' of the Lagrange variant (both start at 0)
        self.log_entropy_alpha = nn.Parameter(torch.zeros((), device=device))
        self.lagrange_log_alpha = nn.Parameter(torch.zeros((), device=device))
        self.target_entropy = (-float(spec.act_dim) if config.target_entropy is None
                               else float(config.target_entropy))
        self.use_lagrange, self.lagrange_threshold = resolve_lagrange(config)
        self.log_uniform = uniform_log_density(spec.act_dim, spec.max_action)
        # Each loss below touches only its own parameters (the others enter it detached), so the actor shares an
        # optimiser with log alpha_ent (both at policy_lr, as in the reference code) and the critics share one
        # with log alpha' (both at critic_lr): per-parameter Adam makes this the same as separate optimisers.
        self.actor_optimizer = adam([*self.actor.parameters(), self.log_entropy_alpha], config.policy_lr, config)
        self.critic_optimizer = adam([*self.critic.parameters(), self.lagrange_log_alpha], config.critic_lr, config)
        self.step = 0
        # alpha after the switch to the online phase; `online` is set by start_online and kept in the state
        self.online_cql_alpha = config.cql_alpha if config.online_cql_alpha is None else config.online_cql_alpha
        self.online = False
        # what the update's one backward trains (log alpha' only in the Lagrange variant)
        self.params = [*self.critic.parameters(), *self.actor.parameters(), self.log_entropy_alpha,
                       *([self.lagrange_log_alpha] if self.use_lagrange else [])]
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bc_warmup = self.step < self.config.bc_steps  # a Python bool: compiled as two graphs, warm-up and main
        self.step += 1
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"], bc_warmup, self.online)

    def start_online(self) -> None:
        """The switch to the online phase (common/online.py calls it once): alpha <- online_cql_alpha."""
        self.online = True

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     next_obs: torch.Tensor, terminals: torch.Tensor, bc_warmup: bool,
                     online: bool = False) -> dict[str, torch.Tensor]:
        cfg, n = self.config, self.config.cql_num_samples
        cql_alpha = self.online_cql_alpha if online else cfg.cql_alpha  # a Python bool: one graph per phase
        batch, obs_dim = obs.shape
        entropy_alpha = self.log_entropy_alpha.exp().detach()

        # --- sample from the current policy: at s (n for CQL + 1 for the actor loss) and at s' (n for CQL + 1
        # for the Bellman target); one network pass per state, the samples share it
        mean, log_std = self.actor(obs)
        pi_actions, pi_log_prob = sample_tanh_gaussian(mean, log_std, self.max_action, n + 1)
        with torch.no_grad():
            next_mean, next_log_std = self.actor(next_obs)
            next_actions, next_log_prob = sample_tanh_gaussian(next_mean, next_log_std, self.max_action, n + 1)

            # Bellman target  T^pi Q(s,a) = r + gamma (1 - done) min_k Q'_k(s', a'),  a' ~ pi(.|s')
            # (terminals: true terminations only; time-limit truncations bootstrap)
            target_q = self.target_critic(next_obs, next_actions[:, 0]).min(0).values
            if cfg.backup_entropy:
                target_q = target_q - entropy_alpha * next_log_prob[:, 0]
            target = rewards + cfg.gamma * (1.0 - terminals) * target_q

        # --- one critic pass over every action CQL needs, all at the state s: the dataset action, n uniform
        # actions, n actions from pi(.|s) and n from pi(.|s'), i.e. (1 + 3n) actions per state, obs repeated
        uniform_actions = (2.0 * torch.rand(batch, n, self.act_dim, device=obs.device) - 1.0) * self.max_action
        all_actions = torch.cat([actions.unsqueeze(1), uniform_actions, pi_actions[:, 1:].detach(),
                                 next_actions[:, 1:]], dim=1)
        per_state = all_actions.shape[1]
        q_all = self.critic(obs.unsqueeze(1).expand(batch, per_state, obs_dim).reshape(-1, obs_dim),
                            all_actions.reshape(-1, self.act_dim)).view(-1, batch, per_state)
        q_data = q_all[..., 0]  # (K, B)
        q_uniform, q_pi, q_pi_next = q_all[..., 1:].split(n, dim=-1)  # (K, B, n) each

        # 1/2 E_(s,a,s')~D [ (Q(s,a) - T^pi Q(s,a))^2 ]  per critic; like the reference code (and CORL) we use the
        # plain mean squared error, for which alpha and tau were tuned (with the slides' 1/2, the same alpha would
        # weigh twice as much against the TD term)
        td_loss = ((q_data - target.unsqueeze(0)) ** 2).mean(dim=1).sum()

        # CQL(H) regulariser per critic  (lecture: "Conservative Evaluation", mu = soft-max over actions):
        #   E_s~D [ log sum_a exp Q(s,a) ] - E_(s,a)~D [ Q(s,a) ]
        # with log sum_a exp Q(s,a) from uniform, pi(.|s) and pi(.|s') samples weighted by 1/density (log pi
        # detached: the regulariser trains Q, not pi)
        logsumexp_q = cql_logsumexp(q_uniform, q_pi, q_pi_next, pi_log_prob[:, 1:].detach(), next_log_prob[:, 1:],
                                    self.log_uniform, cfg.cql_temperature)
        cql_gap = (logsumexp_q - q_data).mean(dim=1)  # (K,)

        if self.use_lagrange:
            # Lagrange variant:  min_Q max_{alpha' >= 0}  alpha' ( alpha * gap - tau ) + TD  (the paper's automatic
            # alpha, with the reference code's fixed alpha inside). Q sees alpha' as a constant; log alpha' ascends
            # alpha' (alpha * gap - tau): alpha' grows while the gap is above tau / alpha, shrinks below it (dual
            # descent).
            lagrange_alpha = self.lagrange_log_alpha.exp().clamp(0.0, LAGRANGE_ALPHA_MAX)
            violation = cql_alpha * cql_gap - self.lagrange_threshold
            cql_loss = (lagrange_alpha.detach() * violation).sum()
            lagrange_loss = -(lagrange_alpha * violation.detach()).mean()
            cql_weight = lagrange_alpha.detach() * cql_alpha
        else:
            # min_Q alpha ( E_s~D [log sum_a exp Q(s,a)] - E_(s,a)~D [Q(s,a)] ) + 1/2 E [(Q - T^pi Q)^2]
            # (lecture: "Conservative Evaluation"; alpha = cql_alpha)
            cql_loss = cql_alpha * cql_gap.sum()
            lagrange_loss = torch.zeros((), device=obs.device)
            cql_weight = torch.full((), cql_alpha, device=obs.device)
        critic_loss = td_loss + cql_loss

        # --- policy improvement  (lecture: "Conservative Control": pi <- argmax_pi E_pi [Q_CQL]), SAC's actor:
        #   min_pi E_s~D, a~pi [ alpha_ent log pi(a|s) - min_k Q_k(s, a) ]
        # BC warm-up (first bc_steps): min_pi E_(s,a)~D [ alpha_ent log pi(a~pi|s) - log pi(a|s) ]
        # The critic is read with detached weights (the actor loss must not train Q) and before its update, as in
        # the reference code; so all losses share one backward pass (and one compiled graph with --compile).
        log_pi = pi_log_prob[:, 0]
        q_policy = self.critic(obs, pi_actions[:, 0], detach_weights=True).min(0).values
        if bc_warmup:
            data_u = torch.atanh((actions / self.max_action).clamp(-1.0 + ATANH_EPS, 1.0 - ATANH_EPS))
            actor_loss = (entropy_alpha * log_pi - tanh_gaussian_log_prob(data_u, mean, log_std,
                                                                          self.max_action)).mean()
        else:
            actor_loss = (entropy_alpha * log_pi - q_policy).mean()
        # automatic entropy tuning:  min_{log alpha_ent} -log alpha_ent * E[ log pi(a|s) + H-bar ]
        entropy_loss = -(self.log_entropy_alpha * (log_pi.detach() + self.target_entropy)).mean()

        logs = {  # read before the backward, which consumes the graph these values hang on
            "train/critic_loss": critic_loss.detach(),
            "train/td_loss": td_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/entropy_alpha": entropy_alpha,
            "train/entropy": -log_pi.detach().mean(),
            "train/cql_gap": cql_gap.detach().mean(),
            "train/cql_alpha": cql_weight,
            "train/q_data": q_data.detach().mean(),
            "train/q_policy": q_policy.detach().mean(),
        }
        if self.use_lagrange:
            logs["train/lagrange_alpha"] = lagrange_alpha.detach()

        # Each loss reaches only its own parameters (everything else enters it detached), so one backward of the
        # sum gives every parameter the gradient of its own loss. inputs: the parameters trained, named (with
        # --compile, torch 2.13's traced backward loses bare tensors such as log alpha_ent when the step is recompiled)
        (critic_loss + lagrange_loss + actor_loss + entropy_loss).backward(inputs=self.params)
        self.critic_optimizer.step()
        self.actor_optimizer.step()

        # Q' <- (1 - tau) Q' + tau Q
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: max_action * tanh(mu(s))."""
        return self.max_action * torch.tanh(self.actor(obs)[0])

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The online phase's action: a ~ pi(.|s), a sample of the tanh-Gaussian (CORL's fine-tuning), inside the
        action bounds by construction (torch's global RNG, saved in checkpoints)."""
        mean, log_std = self.actor(obs)
        actions, _ = sample_tanh_gaussian(mean, log_std, self.max_action, 1)
        return actions[:, 0]

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_k Q_k(s, a): the estimate the actor maximises. (batch,)"""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(),
                "log_entropy_alpha": self.log_entropy_alpha.detach().clone(),
                "lagrange_log_alpha": self.lagrange_log_alpha.detach().clone(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "step": self.step, "online": self.online}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_entropy_alpha.copy_(state["log_entropy_alpha"])
            self.lagrange_log_alpha.copy_(state["lagrange_log_alpha"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        self.step = int(state["step"])
        self.online = bool(state.get("online", False))  # checkpoints made before online phases have no switch


def resolve_lagrange(config: Config) -> tuple[bool, float]:
    """(Lagrange variant on?, tau): on with --lagrange or with a positive per-dataset lagrange_threshold."""
    threshold = config.lagrange_threshold
    if threshold is not None and threshold > 0:
        return True, float(threshold)
    return bool(config.lagrange), LAGRANGE_THRESHOLD_DEFAULT


def _with_catch_all_settings(config: Config) -> Config:
    """Fill per-dataset fields still at None from the catch-all row (agents built without a dataset: bench)."""
    catch_all = DATASET_SETTINGS[-1][1]
    return dataclasses.replace(config, **{k: v for k, v in catch_all.items() if getattr(config, k) is None})


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"'{config.env}' has discrete actions; cql.py needs continuous ones: use algorithms/cql_discrete.py")
    data = dataset.transitions(reward_transform=config.reward_transform)
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs, next_obs = (normalizer(data["obs"]), normalizer(data["next_obs"])) if normalizer else \
        (data["obs"], data["next_obs"])
    sampler = TensorSampler({"obs": obs, "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": next_obs, "terminals": data["terminals"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device)
    if agent.use_lagrange:
        print(f"CQL Lagrange variant: alpha' tuned towards cql_alpha * gap = tau = {agent.lagrange_threshold}",
              file=sys.stderr)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py)
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_transform=config.reward_transform)

    run = Run("cql", config, dataset, device, normalizer)
    start = run.resume(agent, phase)
    envs = make_eval_envs(dataset, config.eval_episodes)
    for step in run.steps(start):
        if phase.online(step):  # the online phase: the current policy acts once in the env, the step is stored
            episode = phase.interact()
            if episode:
                run.log(step, episode)
        logs = agent.update(phase.sample(config.batch_size))
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                run.log_eval(step, evaluate(agent.act, dataset, normalizer, config.eval_episodes,
                                            config.seed, device, envs, video=run.video_for(step)))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, phase)
    result = evaluate(agent.act, dataset, normalizer, config.eval_episodes, config.seed, device, envs,
                      video=run.video_for(run.total_steps))
    run.log_eval(run.total_steps, result)
    envs.close()
    return run.finish(result, phase.summary())


if __name__ == "__main__":
    run_cli(train, Config)
