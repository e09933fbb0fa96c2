"""Calibrated Q-Learning (Cal-QL): CQL whose push-down is lower-bounded by the behaviour policy's Monte Carlo value.

Lecture sections: "Reinforcement Learning with Online Interactions" (pre-train offline, then fine-tune with the
policy's own interaction), "Conservative Evaluation" (push Q down on actions a ~ mu(a|s), up on dataset actions),
"Conservative Control" (alternate conservative evaluation with an actor's policy improvement) and "Conservative
Q-Learning" (E_pi[Q_CQL] lower-bounds the true value). The paper's observation (antmaze, Adroit, Kitchen):
CQL's lower bound can sit far below the truth; when fine-tuning starts, the new online data drags Q up to its
real scale, and while it unlearns, the policy follows a wrong Q: the score dips (on the small pendulum sets
this library tests with, no such dip shows reliably for either method). Cal-QL keeps Q *calibrated*: never
pushed below V^mu(s), the value of the behaviour policy, estimated by the Monte Carlo return-to-go G of the
dataset trajectory through s. The only change to CQL is one elementwise max in the push-down term:
    alpha ( E_s~D, a~pi [ max(Q(s,a), G(s)) ] - E_(s,a)~D [ Q(s,a) ] ) + 1/2 E [ (Q - T^pi Q)^2 ].
Paper: Nakamoto, Zhai, Singh, Sobol Mark, Ma, Finn, Kumar, Levine 2023, "Cal-QL: Calibrated Offline RL
Pre-Training for Efficient Online Fine-Tuning" (github.com/nakamotoo/Cal-QL, JAX); CORL's
algorithms/finetune/cal_ql.py and d3rlpy's CalQL reproduce it.

Usage:
    python algorithms/cal_ql.py                                             # local pendulum data, offline only
    python algorithms/cal_ql.py --env local/pendulum/medium-replay-v0 --max-steps 20000 --online-steps 20000
    python algorithms/cal_ql.py --env antmaze-medium-diverse-v2 --online-steps 1000000
    python algorithms/cal_ql.py --env pen-cloned-v1 --online-steps 1000000 \\
        --actor-hidden-dims 256 256 256 --critic-hidden-dims 256 256 256        # CORL's adroit networks
    python algorithms/cal_ql.py --env antmaze-umaze-v2 --online-steps 1000000 --no-online-calibration  # CORL's

Returns-to-go G (the `returns_to_go` column, `monte_carlo_returns` below), as the paper computes them:
- dense rewards: G_t = sum_{k>=t} gamma^(k-t) r'_k to the episode's end, on the transformed rewards r'; a
  time-limit truncation is not bootstrapped (the sum simply stops);
- sparse rewards (antmaze): an episode whose rewards *all* equal the failure reward r_neg' (it never reached
  the goal) gets G_t = r_neg' / (1 - gamma) at every step, the value of failing forever (no horizon cut-off);
  any other episode the dense sum. This is the authors' rule (replay_buffer.py `calc_return_to_go`, used for
  the dataset and for every online trajectory); CORL tests only the episode's *last* reward, which differs for
  an episode that touched the goal and left it, and whose earlier successes then count for nothing.
Online (--online-steps): calibration stays on, with G of every online episode computed when it ends (the
authors' `enable_calql` in both phases; d3rlpy likewise); until an episode ends its rows carry G = -inf, so
max(Q, G) leaves them unbounded. `--no-online-calibration` is CORL's variant: plain CQL from the switch on.
Batches are half offline, half online (`online_mix` 0.5, the authors' and CORL's mixing_ratio); each env step
is one update; the policy explores by sampling pi(a|s).

Per-dataset settings live in `DATASET_SETTINGS` below (flags override them): antmaze follows the authors'
script (scripts/run_antmaze.sh): alpha 5 with the Lagrange variant (target gap 0.8, log alpha' from 1),
rewards 10 r - 5, the sparse rule with r_neg = 0 -> -5 (G = -500 for failures), 1M offline steps. Adroit
cloned follows CORL (configs/finetune/cal_ql/*/cloned_v1.yaml: the authors train Adroit on other data):
alpha 1, no Lagrange, raw dense rewards, the CQL difference clipped at -200. Networks are the authors'
antmaze ones (actor 2 x 256, critics 4 x 256, orthogonal initialisation, output layers gain 1e-2); CORL uses 3 x
256 actors, 5 x 256 antmaze / 3 x 256 adroit critics and output gain sqrt 2. Every published setting uses the
max-Q backup (the max over 10 actions a' ~ pi(.|s') of min_k Q'_k), no entropy in the target, policy lr 1e-4,
critic lr 3e-4 and no observation normalisation.

--compile compiles the whole update (common/optim.py); calibration off (CORL's online phase) is a second graph.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import (DataSpec, ObsNormalizer, OfflineDataset, TensorSampler,  # noqa: E402
                             discounted_returns_to_go, load_dataset)
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.networks import CriticEnsemble, VectorizedLinear, sample_tanh_gaussian  # noqa: E402
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
    common/online.py)"""
    capture_video: bool = False
    """record the final evaluation's first episodes (and, with --eval-every, periodic ones) as MP4 in the run
    directory, and to W&B with --track"""
    # --- calibrated conservative Q-learning ---
    cql_alpha: float | None = None
    """alpha, the weight of the push-down term alpha (E_s~D,a~pi [max(Q(s,a), G)] - E_(s,a)~D [Q(s,a)])
    (None: from DATASET_SETTINGS: 5 antmaze, 1 adroit; the authors' cql_min_q_weight)"""
    calibrate: bool = True
    """Cal-QL's lower bound max(Q(s,a), G(s)) on the policy's actions in the push-down (False: plain CQL)"""
    sparse_reward: bool | None = None
    """returns-to-go by the sparse rule (an episode that never left r_neg gets r_neg' / (1 - gamma) everywhere)
    rather than the dense discounted sum (None: from DATASET_SETTINGS; True on antmaze)"""
    failure_reward: float = 0.0
    """r_neg, the raw reward of a step that is not a success in a sparse-reward env (antmaze: 0); used only
    with the sparse rule, after the reward transform (r_neg' = reward_scale * r_neg + reward_bias)"""
    reward_scale: float | None = None
    """rewards r' = reward_scale * r + reward_bias, in both phases (None: from DATASET_SETTINGS; antmaze 10 r - 5)"""
    reward_bias: float | None = None
    """see reward_scale (None: from DATASET_SETTINGS)"""
    cql_num_samples: int = 10
    """n, actions per state for each of the three proposals (uniform, pi(.|s), pi(.|s')) that estimate
    log sum_a exp Q(s,a), and actions a' ~ pi(.|s') of the max-Q backup (paper and reference code: 10)"""
    cql_temperature: float = 1.0
    """temperature of the logsumexp (the authors' cql_temp: 1)"""
    cql_clip_diff_min: float | None = None
    """the per-state difference logsumexp Q - Q(s,a) is clipped below at this (None: from DATASET_SETTINGS;
    CORL's -200 on adroit, the authors' -inf, i.e. no clip, elsewhere)"""
    lagrange: bool | None = None
    """the Lagrange variant: alpha' alpha (gap - target_action_gap), alpha' tuned by dual descent so that the
    gap stays near target_action_gap (None: from DATASET_SETTINGS; on for antmaze)"""
    target_action_gap: float = 0.8
    """tau, the target of the CQL gap in the Lagrange variant (the authors' cql_target_action_gap on antmaze)"""
    max_target_backup: bool = True
    """the Bellman target takes max over n actions a' ~ pi(.|s') of min_k Q'_k(s', a') (the authors' and every
    published setting); False: one sample a' ~ pi(.|s')"""
    backup_entropy: bool = False
    """subtract alpha_ent * log pi(a'|s') in the Bellman target (the authors do not: False)"""
    policy_lr: float = 1e-4
    """Adam learning rate of the actor and of the entropy temperature (the authors': 1e-4)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics and of log alpha' (the authors': 3e-4)"""
    gamma: float = 0.99
    """gamma, the discount of the Bellman target r + gamma (1 - done) Q'(s', a') and of the returns-to-go G"""
    tau: float = 5e-3
    """Polyak rate tau of the target critics: Q' <- (1 - tau) Q' + tau Q every step"""
    actor_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor (the authors' antmaze policy: 256-256; CORL: 3 x 256)"""
    critic_hidden_dims: tuple[int, ...] = (256, 256, 256, 256)
    """hidden layer sizes of each critic (the authors' antmaze Q: 4 x 256; CORL: 5 x 256 antmaze, 3 x 256 adroit)"""
    target_entropy: float | None = None
    """target entropy H-bar of the automatic entropy tuning (None: -|A|, as in SAC)"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (eps 1e-3); the authors and CORL do not"""
    orthogonal_init: bool = True
    """the authors' initialisation: orthogonal weights (hidden gain sqrt 2, output gain 1e-2), zero biases
    (False: PyTorch's default uniform initialisation)"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = 0.5
    """fraction of each online-phase batch drawn from the offline data (the authors' and CORL's mixing_ratio
    0.5; None: uniform over the offline and online rows, one growing buffer)"""
    online_cql_alpha: float | None = None
    """alpha from the first online step on (None: cql_alpha, as every published setting)"""
    online_calibration: bool = True
    """keep the bound online, with G of each online episode computed when it ends (the authors, d3rlpy);
    False: CORL's switch_calibration, plain CQL from the first online step"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. Antmaze: the authors' scripts/run_antmaze.sh (cql_min_q_weight 5, Lagrange with
# gap 0.8, reward_scale 10, reward_bias -5, 1000 x 1000 offline steps; the JaxCQL default cql_clip_diff_min
# -inf). Adroit cloned: CORL's configs/finetune/cal_ql/<task>/cloned_v1.yaml (cql_alpha 1, no Lagrange,
# is_sparse_reward false, raw rewards, cql_clip_diff_min -200, 1M offline steps); CORL configures no other
# Adroit set, and the authors' Adroit runs use their binary-reward data. No locomotion setting is published:
# the catch-all row is the dense CQL setting of the CQL reference code (alpha 5, no Lagrange), untuned here.
# The local pendulum and test sets have dense (-16..0 per step) rewards and train for far fewer steps.
_ANTMAZE = {"cql_alpha": 5.0, "lagrange": True, "sparse_reward": True, "reward_scale": 10.0, "reward_bias": -5.0,
            "cql_clip_diff_min": -math.inf, "max_steps": 1_000_000}
_ADROIT_CLONED = {"cql_alpha": 1.0, "lagrange": False, "sparse_reward": False, "reward_scale": 1.0,
                  "reward_bias": 0.0, "cql_clip_diff_min": -200.0, "max_steps": 1_000_000}
_DENSE = {"cql_alpha": 5.0, "lagrange": False, "sparse_reward": False, "reward_scale": 1.0, "reward_bias": 0.0,
          "cql_clip_diff_min": -math.inf}
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("antmaze-*", _ANTMAZE),
    ("D4RL/antmaze/*", _ANTMAZE),
    *[(pattern, _ADROIT_CLONED) for task in ("pen", "door", "hammer", "relocate")
      for pattern in (f"{task}-cloned-*", f"D4RL/{task}/cloned-*")],
    ("local/pendulum/*", {**_DENSE, "max_steps": 20_000}),
    ("test/*", {**_DENSE, "max_steps": 3_000}),
    ("*", {**_DENSE, "max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the authors' clip of the policy's log-std (JaxCQL model.py)
LAGRANGE_ALPHA_MAX = 1e6  # the authors clip alpha' to [0, 1e6]
LAGRANGE_LOG_ALPHA_INIT = 1.0  # the authors' (and CORL's) Scalar(1.0): log alpha' starts at 1, alpha' at e
HIDDEN_GAIN, OUTPUT_GAIN = math.sqrt(2.0), 1e-2  # the authors' orthogonal gains (JaxCQL FullyConnectedNetwork)


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a|s): a = max_action * tanh(u), u ~ N(mu(s), sigma(s)^2). One MLP gives mu and a raw log-std;
    log sigma = m * raw + b with learnable scalars m (from 1) and b (from -1), clipped to [-20, 2]: the authors'
    policy (its log_std_multiplier and log_std_offset), which starts with sigma near e^-1."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 2 * act_dim)
        self.log_std_multiplier = nn.Parameter(torch.tensor(1.0))
        self.log_std_offset = nn.Parameter(torch.tensor(-1.0))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_log_std = self.net(obs).chunk(2, dim=-1)
        log_std = self.log_std_multiplier * raw_log_std + self.log_std_offset
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


@torch.no_grad()
def orthogonal_init_(network: nn.Module) -> None:
    """The authors' initialisation of one network: every weight matrix orthogonal, gain sqrt 2 for hidden
    layers and 1e-2 for the output layer, biases zero. A `VectorizedLinear` (K critics at once, weight
    (K, in, out) used as x @ W) gets one orthogonal (out, in) matrix per member, as K nn.Linear layers would."""
    layers = [m for m in network.modules() if isinstance(m, (nn.Linear, VectorizedLinear))]
    for i, layer in enumerate(layers):
        gain = OUTPUT_GAIN if i == len(layers) - 1 else HIDDEN_GAIN
        members = [layer.weight] if isinstance(layer, nn.Linear) else [w.T for w in layer.weight]
        for weight in members:  # (out, in) views
            weight.copy_(nn.init.orthogonal_(torch.empty(weight.shape), gain=gain))
        layer.bias.zero_()


def uniform_log_density(act_dim: int, max_action: float) -> float:
    """log of the uniform density on the action box [-max_action, max_action]^|A|: the authors' log(0.5^|A|)
    for max_action 1."""
    return -act_dim * math.log(2.0 * max_action)


class Agent:
    """Tanh-Gaussian actor, twin critics (one ensemble), their targets, the temperatures and Cal-QL's update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("cal_ql.py is for continuous (Box) actions; for a discrete dataset use algorithms/cql_discrete.py")
        config = _with_catch_all_settings(config)
        self.config, self.spec, self.device = config, spec, device
        self.max_action, self.act_dim = spec.max_action, spec.act_dim
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, config.actor_hidden_dims).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.critic_hidden_dims).to(device)
        if config.orthogonal_init:
            orthogonal_init_(self.actor)
            orthogonal_init_(self.critic)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_entropy_alpha = nn.Parameter(torch.zeros((), device=device))
        self.lagrange_log_alpha = nn.Parameter(torch.full((), LAGRANGE_LOG_ALPHA_INIT, device=device))
        self.target_entropy = -float(spec.act_dim) if config.target_entropy is None else float(config.target_entropy)
        self.log_uniform = uniform_log_density(spec.act_dim, spec.max_action)
        # alpha as a device tensor: the switch to the online phase may change it without recompiling the update
        self.cql_alpha = torch.full((), float(config.cql_alpha), device=device)
        self.calibrated = bool(config.calibrate)  # turned off at the switch by --no-online-calibration
        # Each loss below reaches only its own parameters (the others enter it detached), so the actor shares an
        # optimiser with log alpha_ent (both at policy_lr, as the authors) and the critics with log alpha' (both
        # at critic_lr): per-parameter Adam makes this the same as separate optimisers.
        self.actor_optimizer = adam([*self.actor.parameters(), self.log_entropy_alpha], config.policy_lr, config)
        self.critic_optimizer = adam([*self.critic.parameters(), self.lagrange_log_alpha], config.critic_lr, config)
        self.params = [*self.critic.parameters(), *self.actor.parameters(), self.log_entropy_alpha,
                       *([self.lagrange_log_alpha] if config.lagrange else [])]
        self.step = 0
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.step += 1
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["terminals"],
                            batch["returns_to_go"], self.calibrated)  # a Python bool: one graph per value

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor, next_obs: torch.Tensor,
                     terminals: torch.Tensor, returns_to_go: torch.Tensor, calibrated: bool) -> dict[str, torch.Tensor]:
        cfg, n = self.config, self.config.cql_num_samples
        batch, obs_dim = obs.shape
        entropy_alpha = self.log_entropy_alpha.exp().detach()
        n_backup = n if cfg.max_target_backup else 1

        # --- sample from the current policy: at s, 1 action for the actor loss and n for the push-down; at s',
        # n_backup for the Bellman target and n for the push-down (one network pass per state)
        mean, log_std = self.actor(obs)
        pi_actions, pi_log_prob = sample_tanh_gaussian(mean, log_std, self.max_action, 1 + n)
        with torch.no_grad():
            next_mean, next_log_std = self.actor(next_obs)
            next_actions, next_log_prob = sample_tanh_gaussian(next_mean, next_log_std, self.max_action, n_backup + n)

            # Bellman target  T^pi Q(s,a) = r + gamma (1 - done) max_j min_k Q'_k(s', a'_j),  a'_j ~ pi(.|s')
            # (max-Q backup over n samples; with one sample it is SAC's target). Terminals: true terminations only.
            next_q = self.target_critic(next_obs.unsqueeze(1).expand(batch, n_backup, obs_dim).reshape(-1, obs_dim),
                                        next_actions[:, :n_backup].reshape(-1, self.act_dim))
            next_q, best = next_q.view(-1, batch, n_backup).min(0).values.max(1)
            if cfg.backup_entropy:
                next_q = next_q - entropy_alpha * next_log_prob[:, :n_backup].gather(1, best[:, None])[:, 0]
            target = rewards + cfg.gamma * (1.0 - terminals) * next_q

        # --- one critic pass over every action the push-down needs, all at the state s: the dataset action,
        # n uniform actions, n from pi(.|s) and n from pi(.|s'), i.e. (1 + 3n) actions per state
        uniform_actions = (2.0 * torch.rand(batch, n, self.act_dim, device=obs.device) - 1.0) * self.max_action
        all_actions = torch.cat([actions.unsqueeze(1), uniform_actions, pi_actions[:, 1:].detach(),
                                 next_actions[:, n_backup:]], dim=1)
        per_state = all_actions.shape[1]
        q_all = self.critic(obs.unsqueeze(1).expand(batch, per_state, obs_dim).reshape(-1, obs_dim),
                            all_actions.reshape(-1, self.act_dim)).view(-1, batch, per_state)
        q_data = q_all[..., 0]  # (K, B)
        q_uniform, q_pi, q_pi_next = q_all[..., 1:].split(n, dim=-1)  # (K, B, n) each

        # 1/2 E_(s,a,s')~D [ (Q(s,a) - T^pi Q(s,a))^2 ] per critic, as the plain mean squared error the authors
        # use (alpha was tuned against it: with the slides' 1/2 the same alpha would weigh twice as much)
        td_loss = ((q_data - target.unsqueeze(0)) ** 2).mean(dim=1).sum()

        # Cal-QL's calibrated push-down  (paper eq. 5.1; lecture: "Conservative Evaluation"):
        #   E_s~D, a~pi [ max(Q(s,a), G(s)) ]   with G(s) the Monte Carlo return-to-go of the data through s,
        # applied to the policy's actions (from pi(.|s) and pi(.|s'), both scored at s) before the importance
        # weights; the uniform actions stay unbounded. Where Q(s,a) < G the max is the constant G: no gradient
        # pushes that Q lower, so Q never sinks below the behaviour policy's value.
        bound = returns_to_go.view(1, batch, 1)
        bound_rate = (torch.cat([q_pi, q_pi_next], dim=-1).detach() < bound).to(q_all.dtype).mean()
        if calibrated:
            q_pi, q_pi_next = torch.maximum(q_pi, bound), torch.maximum(q_pi_next, bound)
        # log sum_a exp Q(s,a), estimated from the 3n samples each divided by its proposal density (log pi
        # detached: the push-down trains Q, not pi), at temperature T:  T log sum_j exp((Q(s,a_j) - log p(a_j)) / T)
        weighted = torch.cat([q_uniform - self.log_uniform, q_pi_next - next_log_prob[:, n_backup:].unsqueeze(0),
                              q_pi - pi_log_prob[:, 1:].detach().unsqueeze(0)], dim=-1)
        logsumexp_q = cfg.cql_temperature * torch.logsumexp(weighted / cfg.cql_temperature, dim=-1)
        # the CQL gap per critic: E_s [ log sum_a exp Q(s,a) - Q(s, a_data) ], each state's term clipped below
        cql_gap = (logsumexp_q - q_data).clamp(min=cfg.cql_clip_diff_min).mean(dim=1)  # (K,)

        if cfg.lagrange:
            # Lagrange variant:  min_Q max_{alpha' >= 0}  alpha' alpha (gap - tau) + TD; Q sees alpha' as a constant,
            # log alpha' ascends alpha' alpha (gap - tau): alpha' grows while the gap is above tau, shrinks below it
            lagrange_alpha = self.lagrange_log_alpha.exp().clamp(0.0, LAGRANGE_ALPHA_MAX)
            violation = self.cql_alpha * (cql_gap - cfg.target_action_gap)
            cql_loss = (lagrange_alpha.detach() * violation).sum()
            lagrange_loss = -(lagrange_alpha * violation.detach()).mean()
            cql_weight = lagrange_alpha.detach() * self.cql_alpha
        else:
            # min_Q alpha ( E_s~D, a~pi [max(Q(s,a), G)] - E_(s,a)~D [Q(s,a)] ) + 1/2 E [(Q - T^pi Q)^2]
            cql_loss = (self.cql_alpha * cql_gap).sum()
            lagrange_loss = torch.zeros((), device=obs.device)
            cql_weight = self.cql_alpha.clone()
        critic_loss = td_loss + cql_loss

        # --- policy improvement  (lecture: "Conservative Control"), SAC's actor on the critics before their step:
        #   min_pi E_s~D, a~pi [ alpha_ent log pi(a|s) - min_k Q_k(s, a) ]
        log_pi = pi_log_prob[:, 0]
        q_policy = self.critic(obs, pi_actions[:, 0], detach_weights=True).min(0).values
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
            "train/bound_rate": bound_rate,
            "train/q_data": q_data.detach().mean(),
            "train/q_policy": q_policy.detach().mean(),
        }
        if cfg.lagrange:
            logs["train/lagrange_alpha"] = lagrange_alpha.detach()

        # one backward of the sum gives every parameter the gradient of its own loss (each loss reaches only its
        # own parameters); inputs: the parameters trained, named (a recompiled traced backward needs them)
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
        """The online phase's action: a sample a ~ pi(a|s) (the authors' and CORL's exploration)."""
        mean, log_std = self.actor(obs)
        return sample_tanh_gaussian(mean, log_std, self.max_action, 1)[0][:, 0]

    def start_online(self) -> None:
        """The switch to fine-tuning: alpha becomes online_cql_alpha, and with --no-online-calibration (CORL) the
        bound goes off. Both are part of the agent's state, so a resumed run does not switch twice."""
        if self.config.online_cql_alpha is not None:
            self.cql_alpha.fill_(self.config.online_cql_alpha)
        if not self.config.online_calibration:
            self.calibrated = False

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_k Q_k(s, a): the estimate the actor maximises. (batch,)"""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(),
                "log_entropy_alpha": self.log_entropy_alpha.detach().clone(),
                "lagrange_log_alpha": self.lagrange_log_alpha.detach().clone(),
                "cql_alpha": self.cql_alpha.clone(), "calibrated": self.calibrated,
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_entropy_alpha.copy_(state["log_entropy_alpha"])
            self.lagrange_log_alpha.copy_(state["lagrange_log_alpha"])
            self.cql_alpha.copy_(state["cql_alpha"])
        self.calibrated = bool(state["calibrated"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        self.step = int(state["step"])


def _with_catch_all_settings(config: Config) -> Config:
    """Fill per-dataset fields still at None from the catch-all row (agents built without a dataset: bench)."""
    catch_all = DATASET_SETTINGS[-1][1]
    return dataclasses.replace(config, **{k: v for k, v in catch_all.items() if getattr(config, k) is None})


def monte_carlo_returns(rewards: np.ndarray, lengths: list[int], gamma: float,
                        failure_reward: float | None = None) -> np.ndarray:
    """G_t, the Monte Carlo return-to-go of every step of consecutive whole episodes (float32, (sum(lengths),)).

    `rewards`: the transformed rewards r' of the episodes one after another; `lengths`: each episode's length.
    Dense rule (failure_reward None): G_t = sum_{k>=t} gamma^(k-t) r'_k to the episode's end, never bootstrapped.
    Sparse rule (failure_reward = r_neg', the transformed failure reward): an episode whose rewards all equal
    r_neg' never succeeded and gets G_t = r_neg' / (1 - gamma) at every step (failing forever); any other
    episode the dense sum (the Cal-QL authors' `calc_return_to_go`).
    """
    out, start = np.zeros(len(rewards), dtype=np.float32), 0
    for length in lengths:
        r = rewards[start:start + length]
        if failure_reward is not None and np.allclose(r, failure_reward, rtol=1e-6, atol=1e-6):
            out[start:start + length] = failure_reward / (1.0 - gamma)
        else:
            out[start:start + length] = discounted_returns_to_go(r, gamma)
        start += length
    return out


def transformed_failure_reward(config: Config) -> float | None:
    """r_neg' = reward_scale * r_neg + reward_bias with the sparse rule, None (the dense rule) without it."""
    return config.failure_reward * config.reward_scale + config.reward_bias if config.sparse_reward else None


def offline_arrays(dataset: OfflineDataset, config: Config) -> tuple[dict[str, np.ndarray], ObsNormalizer | None]:
    """The offline rows the sampler draws: observations (normalised if asked), actions, transformed rewards
    r' = reward_scale r + reward_bias, terminals and the returns-to-go G of each row's episode; and the
    normaliser (None without --normalize-obs)."""
    data = dataset.transitions()
    rewards = (data["rewards"] * config.reward_scale + config.reward_bias).astype(np.float32)
    returns_to_go = monte_carlo_returns(rewards, [len(e) for e in dataset.episodes], config.gamma,
                                        transformed_failure_reward(config))
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    arrays = {"obs": norm(data["obs"]), "actions": data["actions"], "rewards": rewards,
              "next_obs": norm(data["next_obs"]), "terminals": data["terminals"], "returns_to_go": returns_to_go}
    return arrays, normalizer


def online_returns_to_go(config: Config):
    """G of an online episode when it ends, by the rule the offline rows follow (common.online.OnlinePhase's
    `returns_to_go`): its (transformed) rewards -> the dense discounted sum, or with the sparse rule
    r_neg' / (1 - gamma) for every step of an episode that never left r_neg'."""
    failure = transformed_failure_reward(config)

    def returns_to_go(rewards: np.ndarray, terminals: np.ndarray) -> np.ndarray:
        return monte_carlo_returns(rewards.astype(np.float32), [len(rewards)], config.gamma, failure)

    return returns_to_go


def check_config(config: Config) -> None:
    """One clear line for settings Cal-QL cannot run with (before anything is read or written)."""
    checks = [
        (config.cql_alpha >= 0 and (config.online_cql_alpha is None or config.online_cql_alpha >= 0),
         f"--cql-alpha and --online-cql-alpha must be >= 0, got {config.cql_alpha}, {config.online_cql_alpha}"),
        (config.cql_num_samples >= 1, f"--cql-num-samples must be at least 1, got {config.cql_num_samples}"),
        (config.cql_temperature > 0, f"--cql-temperature must be positive, got {config.cql_temperature}"),
        (0.0 <= config.gamma <= 1.0, f"--gamma must lie in [0, 1], got {config.gamma}"),
        (not config.sparse_reward or config.gamma < 1.0,
         f"--gamma must lie in [0, 1) with the sparse rule (G = r_neg / (1 - gamma)), got {config.gamma}"),
        (0.0 < config.tau <= 1.0, f"--tau must lie in (0, 1], got {config.tau}"),
        (config.policy_lr > 0 and config.critic_lr > 0,
         f"--policy-lr and --critic-lr must be positive, got {config.policy_lr}, {config.critic_lr}"),
        (config.online_mix is None or 0.0 <= config.online_mix <= 1.0,
         f"--online-mix must lie in [0, 1] (the offline share of a batch), got {config.online_mix}"),
        (all(math.isfinite(v) for v in (config.reward_scale, config.reward_bias, config.failure_reward)),
         "--reward-scale, --reward-bias and --failure-reward must be finite"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"'{config.env}' has discrete actions; cal_ql.py needs continuous ones (algorithms/cql_discrete.py)")
    arrays, normalizer = offline_arrays(dataset, config)
    sampler = TensorSampler(arrays, device, config.seed)
    agent = Agent(config, dataset.spec, device)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py): online rows
    # get the same reward transform r' = reward_scale r + reward_bias, and their G by the same rule when each
    # episode ends
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device,
                        reward_affine=(config.reward_scale, config.reward_bias),
                        returns_to_go=online_returns_to_go(config))

    run = Run("cal_ql", config, dataset, device, normalizer)
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
