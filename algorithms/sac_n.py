"""SAC-N, EDAC and LB-SAC: SAC with N critics and the min over them, EDAC's gradient diversity, LB-SAC's large batch.

Lecture section: "How else could we address uncertainty?" (under "BCQ and BEAR – Uncertainty Perspective"):
instead of keeping the policy where the data is (BCQ, BEAR) or learning a model and its uncertainty (MOPO),
learn N critics and trust their minimum. Where the data is dense the members agree; away from it they spread,
so min_i Q_i(s, a) ~ mean - c(N) * std is a lower confidence bound that punishes out-of-distribution actions,
and plain SAC ("Off-Policy Algorithms for Offline RL?", algorithms/sac_offline.py) becomes an offline method.
Papers: An, Moon, Kim & Song 2021, "Uncertainty-Based Offline Reinforcement Learning with Diversified
Q-Ensemble" (SAC-N, and EDAC: SAC-N plus eta * L_ES, which turns the members' action gradients apart, so that
far fewer members suffice); Nikulin, Kurenkov, Tarasov, Akimov & Kolesnikov 2022, "Q-Ensemble for Offline RL:
Don't Scale the Ensemble, Scale the Batch Size" (LB-SAC: SAC-N with batch 10,000 and a larger learning rate).

Usage:
    python algorithms/sac_n.py --env hopper-medium-v2                     # EDAC: N = 50, eta = 1 (the default)
    python algorithms/sac_n.py --env hopper-medium-v2 --variant sac-n     # SAC-N: N = 500, eta = 0
    python algorithms/sac_n.py --env hopper-medium-v2 --variant lb-sac    # LB-SAC: N = 25, batch 10,000, 200k steps
    python algorithms/sac_n.py --env halfcheetah-medium-v2 --variant sac-n --eta 1   # any N with the EDAC term
    python algorithms/sac_n.py                                            # embedded default: local pendulum

Which one: `--variant` picks the table of published per-dataset settings (`DATASET_SETTINGS` below is EDAC's,
the default; `SAC_N_SETTINGS`, `LB_SAC_SETTINGS`): N (`--num-critics`) and eta (`--eta`) for EDAC, N for SAC-N
(eta 0), and for LB-SAC N, the training length, batch 10,000 (taken when `--batch-size` is left at 256), learning
rates 1.8e-3, the critic loss averaged over the members instead of summed, LayerNorm in the critics (hopper-medium
only) and the EDAC initialisation (walker2d-expert only). Every value can be overridden by its flag; `--eta` > 0
adds EDAC's term to any variant. Sources: CORL's configs/offline/{sac_n,edac,lb-sac}/ (3M steps, 3000 epochs of
1000, for SAC-N and EDAC; LB-SAC's epochs as CORL's, the authors' differ); the pendulum and test rows are this
library's (short CPU budgets, no published value).

One gradient step, in CORL's sequential order (the authors' code computes all three losses before stepping any):
(1) the temperature alpha, on a sample a ~ pi(.|s) of its own, (2) the actor with the new alpha and the current
critics, (3) the critics, whose target samples a' from the freshly updated actor, (4) the target critics by Polyak
averaging; three draws in this order, as CORL's, so that one update matches CORL's given the same seed. Networks as both: 3x256
ReLU layers, the actor with separate heads for mu and log sigma (clipped to [-5, 2]), EDAC's initialisation
(hidden biases 0.1, critic head U(+-3e-3), actor heads U(+-1e-3)); no state or reward normalisation.
LB-SAC's LayerNorm here is the shared ensemble's (Linear -> ReLU -> LayerNorm, one per member); CORL's LB-SAC puts
it before the ReLU with one scale and shift shared by all members.

Diagnostics: `train/q_std` is the ensemble's spread, the std over the N members of Q_i(s, a) on the batch's
dataset pairs (batch mean), `train/q_std_policy` the same at the policy's actions (larger: the penalty at work);
`train/q_min_gap` is mean_i Q_i - min_i Q_i on dataset pairs; `train/diversity_loss` is L_ES (EDAC, eta > 0).

--compile compiles the whole update, the second-order EDAC term included (the action gradients are taken
with create_graph inside `q_and_diversity`, so nothing but torch.optim's steps breaks the graph).
"""

from __future__ import annotations

import copy
import dataclasses
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
    # --- the Q-ensemble family ---
    variant: Literal["edac", "sac-n", "lb-sac"] = "edac"
    """whose published per-dataset settings fill the fields left at None: edac (SAC-N + eta L_ES, the paper's
    method), sac-n (eta 0, larger N) or lb-sac (batch 10,000, lr 1.8e-3, critic loss averaged over members)"""
    num_critics: int | None = None
    """N, the number of critics Q_theta_1..Q_theta_N (None: from the variant's table; at least 2)"""
    eta: float | None = None
    """eta, the weight of the ensemble gradient-diversity term L_ES in the critic loss (EDAC); 0 is SAC-N
    (None: from the variant's table)"""
    gamma: float = 0.99
    """gamma, the discount in y = r + gamma (1 - d) (min_i Q_theta'_i(s', a') - alpha log pi(a'|s'))"""
    tau: float = 0.005
    """tau in the target update theta'_i <- tau theta_i + (1 - tau) theta'_i"""
    actor_lr: float | None = None
    """Adam learning rate of the actor pi_phi (None: from the table; 3e-4, LB-SAC 1.8e-3)"""
    critic_lr: float | None = None
    """Adam learning rate of the critics Q_theta_i (None: from the table; 3e-4, LB-SAC 1.8e-3)"""
    alpha_lr: float | None = None
    """Adam learning rate of log alpha, the entropy temperature (None: from the table; 3e-4, LB-SAC 1.8e-3)"""
    target_entropy: float | None = None
    """H-bar, the entropy target of automatic temperature tuning (None: -|A|); alpha starts at 1"""
    critic_loss: Literal["sum", "mean"] | None = None
    """how the N members' mean squared TD errors combine into L_Q: sum over i (SAC-N, EDAC) or mean over i
    (LB-SAC) (None: from the table)"""
    critic_layer_norm: bool | None = None
    """LayerNorm in each critic's hidden layers (None: from the table; LB-SAC on hopper-medium only)"""
    edac_init: bool | None = None
    """EDAC's initialisation: hidden biases 0.1, critic head U(+-3e-3), actor heads U(+-1e-3); else PyTorch's
    default (None: from the table; LB-SAC uses it on walker2d-expert only)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the actor and of each critic (the papers' 3 x 256)"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (eps 1e-3); off in the authors' code and CORL"""


# ---------------------------------------------------------------------------------------------------------
# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the --env
# name or its Minari id, from the table of the chosen --variant. D4RL names first, then Minari's ids (a name-only
# match: Minari regenerated the data), then the local D4RL-recipe builds (local/hopper/medium-v0,
# local/hopper-150k/...). Source: CORL's configs/offline/{edac,sac_n,lb-sac}/<family>/<dataset>.yaml.
# ---------------------------------------------------------------------------------------------------------

PAPER = {"actor_lr": 3e-4, "critic_lr": 3e-4, "alpha_lr": 3e-4, "critic_loss": "sum", "critic_layer_norm": False,
         "edac_init": True, "max_steps": 3_000_000}  # SAC-N and EDAC: 3000 epochs of 1000 steps
LOCOMOTION_QUALITIES = ("medium", "medium-replay", "medium-expert")
ADROIT_TASKS = ("pen", "door", "hammer", "relocate")


def _locomotion(family: str, quality: str, settings: dict) -> list[tuple[str, dict]]:
    return [(pattern, settings) for pattern in (f"{family}-{quality}-v*", f"mujoco/{family}/{quality}-v*",
                                                f"local/{family}*/{quality}-v*")]


def _adroit(task: str, quality: str, settings: dict) -> list[tuple[str, dict]]:
    return [(f"{task}-{quality}-v*", settings), (f"D4RL/{task}/{quality}-v*", settings)]


def _mazes(antmaze: dict, maze2d: dict) -> list[tuple[str, dict]]:
    return [("antmaze-*", antmaze), ("D4RL/antmaze/*", antmaze), ("maze2d-*", maze2d), ("D4RL/pointmaze/*", maze2d)]


# (N, eta) of EDAC
EDAC_LOCOMOTION = {"halfcheetah": {"medium": (10, 1.0), "medium-replay": (10, 1.0), "medium-expert": (10, 5.0)},
                   "hopper": {"medium": (50, 1.0), "medium-replay": (50, 1.0), "medium-expert": (50, 1.0)},
                   "walker2d": {"medium": (10, 1.0), "medium-replay": (10, 1.0), "medium-expert": (10, 5.0)}}
EDAC_ADROIT = {"pen": {"human": (20, 1000.0), "cloned": (20, 10.0), "expert": (20, 10.0)},
               **{task: {quality: (50, 200.0) for quality in ("human", "cloned", "expert")}
                  for task in ("door", "hammer", "relocate")}}


def _edac(n: int, eta: float, **extra) -> dict:
    return {**PAPER, "num_critics": n, "eta": eta, **extra}


# The embedded Pendulum-v1 suite and the tests' sets: no published values, this library's for a CPU: lr 1e-3 and
# 10,000 steps (3 x 256 layers, gamma 0.99, tau 5e-3 as published). On local/pendulum/medium-replay-v0 (3,000
# transitions, behaviour score 5) EDAC with 5 critics scored 25, 90, 90, 90, 92 after 2k, 4k, 6k, 8k, 10k steps,
# SAC-N with 10 critics 25, 90, 90 after 2k, 4k, 6k (seed 0, measured).
SMALL = {"actor_lr": 1e-3, "critic_lr": 1e-3, "alpha_lr": 1e-3}
PENDULUM = {**SMALL, "max_steps": 10_000}
TEST = {**SMALL, "max_steps": 3_000}

DATASET_SETTINGS: list[tuple[str, dict]] = [  # EDAC (--variant edac, the default)
    *[row for family, rows in EDAC_LOCOMOTION.items() for quality, (n, eta) in rows.items()
      for row in _locomotion(family, quality, _edac(n, eta))],
    *[row for task, rows in EDAC_ADROIT.items() for quality, (n, eta) in rows.items()
      for row in _adroit(task, quality, _edac(n, eta))],
    *_mazes(antmaze=_edac(10, 1.0), maze2d=_edac(10, 0.1)),
    ("local/pendulum/*", _edac(5, 1.0, **PENDULUM)),
    ("test/*", _edac(5, 1.0, **TEST)),
    ("*", _edac(10, 1.0)),  # the paper's default (CORL's edac.py defaults)
]

SAC_N_LOCOMOTION = {"halfcheetah": {"medium": 10, "medium-replay": 10, "medium-expert": 10},
                    "hopper": {"medium": 500, "medium-replay": 200, "medium-expert": 200},
                    "walker2d": {"medium": 20, "medium-replay": 20, "medium-expert": 20}}

SAC_N_SETTINGS: list[tuple[str, dict]] = [  # --variant sac-n: eta 0
    *[row for family, rows in SAC_N_LOCOMOTION.items() for quality, n in rows.items()
      for row in _locomotion(family, quality, _edac(n, 0.0))],
    *[row for task in ADROIT_TASKS for quality in ("human", "cloned", "expert")
      for row in _adroit(task, quality, _edac(100, 0.0))],
    *_mazes(antmaze=_edac(25, 0.0), maze2d=_edac(25, 0.0)),
    ("local/pendulum/*", _edac(10, 0.0, **PENDULUM)),
    ("test/*", _edac(10, 0.0, **TEST)),
    ("*", _edac(10, 0.0)),  # CORL's sac_n.py default
]

# LB-SAC: (N, epochs of 1000 steps) as CORL's configs (the authors' configs train 350-500 epochs, and use N = 10
# on halfcheetah- and walker2d-medium-replay); batch 10,000 and lr 3e-4 * sqrt(10000 / 256) ~ 1.8e-3
LB_SAC_LOCOMOTION = {
    "halfcheetah": {"random": (2, 300), "medium": (4, 300), "medium-replay": (4, 300), "medium-expert": (8, 300),
                    "expert": (6, 350), "full-replay": (4, 300)},
    "hopper": {"random": (25, 250), "medium": (25, 200), "medium-replay": (20, 150), "medium-expert": (40, 150),
               "expert": (50, 450), "full-replay": (25, 150)},
    "walker2d": {"random": (15, 150), "medium": (10, 150), "medium-replay": (4, 350), "medium-expert": (10, 300),
                 "expert": (30, 350), "full-replay": (4, 350)},
}
LB_SAC = {"eta": 0.0, "actor_lr": 1.8e-3, "critic_lr": 1.8e-3, "alpha_lr": 1.8e-3, "critic_loss": "mean",
          "critic_layer_norm": False, "edac_init": False, "batch_size": 10_000}


def _lb_sac(family: str, quality: str, n: int, epochs: int) -> dict:
    return {**LB_SAC, "num_critics": n, "max_steps": epochs * 1000,
            "critic_layer_norm": (family, quality) == ("hopper", "medium"),
            "edac_init": (family, quality) == ("walker2d", "expert")}


LB_SAC_SETTINGS: list[tuple[str, dict]] = [  # --variant lb-sac: locomotion only is published
    *[row for family, rows in LB_SAC_LOCOMOTION.items() for quality, (n, epochs) in rows.items()
      for row in _locomotion(family, quality, _lb_sac(family, quality, n, epochs))],
    # the small sets: a batch that fits them (medium-replay holds 3,000 transitions) and the pendulum rows' lr 1e-3
    # scaled by the same square root, 1e-3 * sqrt(2048 / 256) ~ 2.8e-3; on local/pendulum/medium-replay-v0 it scored
    # -2, 38, 89 after 1k, 2k, 3k steps (seed 0, measured)
    *[(pattern, {**LB_SAC, "num_critics": 4, "batch_size": 2048, "actor_lr": 2.8e-3, "critic_lr": 2.8e-3,
                 "alpha_lr": 2.8e-3, "max_steps": steps}) for pattern, steps in (("local/pendulum/*", 3_000),
                                                                                 ("test/*", 1_000))],
    ("*", {**LB_SAC, "num_critics": 10, "max_steps": 300_000}),  # no published value: the locomotion rows' middle
]

VARIANT_SETTINGS = {"edac": DATASET_SETTINGS, "sac-n": SAC_N_SETTINGS, "lb-sac": LB_SAC_SETTINGS}

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # EDAC's clip of the actor's log sigma (SAC's is [-20, 2])
HIDDEN_BIAS, ACTOR_HEAD_BOUND = 0.1, 1e-3  # EDAC's initialisation of the actor (the critics': edac_init_())
COSINE_EPS = 1e-10  # g_i = grad_a Q_i / (||grad_a Q_i|| + eps), as the authors' code


# ---------------------------------------------------------------------------------------------------------
# Networks (the N critics are common.networks.CriticEnsemble, one batched network)
# ---------------------------------------------------------------------------------------------------------


class Actor(nn.Module):
    """pi_phi(a|s): a = max_action * tanh(u), u ~ N(mu_phi(s), sigma_phi(s)^2), with separate heads for mu and
    log sigma on a shared ReLU trunk (CORL: "with separate layers works better")."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float, edac_init: bool):
        super().__init__()
        layers, last = [], obs_dim
        for width in hidden_dims:
            layers += [nn.Linear(last, width), nn.ReLU()]
            last = width
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(last, act_dim)
        self.log_std = nn.Linear(last, act_dim)
        self.max_action = max_action
        if edac_init:
            with torch.no_grad():
                for layer in self.trunk[::2]:
                    layer.bias.fill_(HIDDEN_BIAS)
                for head in (self.mu, self.log_std):
                    nn.init.uniform_(head.weight, -ACTOR_HEAD_BOUND, ACTOR_HEAD_BOUND)
                    nn.init.uniform_(head.bias, -ACTOR_HEAD_BOUND, ACTOR_HEAD_BOUND)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mu (B, A) and log sigma (B, A), the latter clipped to [LOG_STD_MIN, LOG_STD_MAX]."""
        hidden = self.trunk(obs)
        return self.mu(hidden), self.log_std(hidden).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised a ~ pi(.|s) and log pi(a|s), shapes (B, A) and (B,)."""
        actions, log_prob = sample_tanh_gaussian(*self(obs), self.max_action, 1)
        return actions[:, 0], log_prob[:, 0]

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self(obs)[0])


def q_and_diversity(critic: CriticEnsemble, obs: torch.Tensor, actions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Q_i(s, a) on dataset pairs, shape (N, B), and EDAC's diversity term L_ES (a scalar), differentiable
    twice: its gradient reaches the critics' weights through the action gradients (create_graph)."""
    n = critic.ensemble_size
    member_actions = actions.unsqueeze(0).expand(n, -1, -1).clone().requires_grad_(True)  # a copy per member
    q = critic(obs.unsqueeze(0).expand(n, -1, -1), member_actions)  # member i reads its own copy of a
    grads, = torch.autograd.grad(q.sum(), member_actions, create_graph=True)  # (N, B, A): grad_a Q_i(s, a)
    g = grads / (grads.norm(dim=-1, keepdim=True) + COSINE_EPS)  # g_i = grad_a Q_i / ||grad_a Q_i||
    g = g.transpose(0, 1)  # (B, N, A)
    cosines = g @ g.transpose(1, 2)  # (B, N, N): <g_i, g_j>
    off_diagonal = 1.0 - torch.eye(n, device=obs.device)
    # L_ES = 1/(N-1) E_(s,a)~D [ sum_{i != j} <g_i, g_j> ]   (An et al. 2021: EDAC's ensemble similarity)
    return q, (cosines * off_diagonal).sum((1, 2)).mean() / (n - 1)


# ---------------------------------------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------------------------------------


class Agent:
    """Actor, N critics and their targets, the temperature, and the SAC-N / EDAC / LB-SAC update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("sac_n.py (SAC-N, EDAC, LB-SAC) needs continuous (Box) actions; this dataset has discrete actions")
        # fields left at None (an Agent built straight from Config()) get the values train() would give them
        config = apply_dataset_settings(config, VARIANT_SETTINGS[config.variant], quiet=True)
        check_config(config)
        self.config, self.spec, self.device = config, spec, device
        self.actor = Actor(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action,
                           config.edac_init).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims, config.num_critics,
                                     layer_norm=config.critic_layer_norm).to(device)
        if config.edac_init:
            self.critic.edac_init_()
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)  # alpha = 1 at the start
        self.target_entropy = float(-spec.act_dim if config.target_entropy is None else config.target_entropy)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.alpha_optimizer = adam([self.log_alpha], config.alpha_lr, config)
        self.actor_params, self.critic_params = list(self.actor.parameters()), list(self.critic.parameters())
        # zero_grad of the three optimisers, then _update_impl (torch.compile'd whole under --compile); each loss
        # reaches only its own optimiser's parameters, so one reset up front equals one before each backward
        self._update = update_step(self._update_impl, config, self.alpha_optimizer, self.actor_optimizer,
                                   self.critic_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])

    def _update_impl(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        c = self.config
        # --- 1. temperature: J(alpha) = E_s~D, a~pi [ -alpha (log pi(a|s) + H-bar) ]  (through log alpha) ---
        with torch.no_grad():  # a sample of its own, as CORL (nothing that needs a gradient crosses the step)
            _, alpha_log_prob = self.actor.sample(obs)
        alpha_loss = -(self.log_alpha * (alpha_log_prob + self.target_entropy)).mean()
        # logged values are taken before each backward (which consumes the graph they hang on)
        logs = {"train/alpha_loss": alpha_loss.detach()}
        # inputs named: with --compile, the traced backward loses bare tensors such as log_alpha otherwise
        alpha_loss.backward(inputs=[self.log_alpha])
        self.alpha_optimizer.step()
        alpha = self.log_alpha.detach().exp()  # the new alpha, for the actor and the target (CORL's order)

        # --- 2. actor: J_pi = E_s~D, a~pi [ alpha log pi(a|s) - min_i Q_theta_i(s, a) ] ---
        pi_actions, log_prob = self.actor.sample(obs)
        q_pi = self.critic(obs, pi_actions, detach_weights=True)  # (N, B); trains the actor only
        actor_loss = (alpha * log_prob - q_pi.min(0).values).mean()
        logs.update({"train/alpha": alpha, "train/entropy": -log_prob.detach().mean(),
                     "train/actor_loss": actor_loss.detach(), "train/q_policy": q_pi.detach().min(0).values.mean(),
                     "train/q_std_policy": q_pi.detach().std(0).mean()})
        actor_loss.backward(inputs=self.actor_params)
        self.actor_optimizer.step()

        # --- 3. critics ---
        with torch.no_grad():
            next_actions, next_log_prob = self.actor.sample(next_obs)  # a' ~ the updated pi(.|s')
            # y = r + gamma (1 - d) ( min_{j=1..N} Q_theta'_j(s', a') - alpha log pi(a'|s') )
            target_q = self.critic_target(next_obs, next_actions).min(0).values
            y = rewards + c.gamma * (1.0 - terminals) * (target_q - alpha * next_log_prob)
        if c.eta > 0:  # Q_theta_i(s, a) (N, B) and L_ES, below
            q, diversity = q_and_diversity(self.critic, obs, actions)
        else:
            q, diversity = self.critic(obs, actions), None
        # L_Q = sum_{i=1..N} E_(s,a,r,s')~D [ (Q_theta_i(s, a) - y)^2 ]   (LB-SAC: the mean over i instead)
        squared_errors = ((q - y) ** 2).mean(1)
        td_loss = squared_errors.sum() if c.critic_loss == "sum" else squared_errors.mean()
        # EDAC: min_theta L_Q + eta L_ES   (SAC-N and LB-SAC: eta = 0, no L_ES)
        critic_loss = td_loss + c.eta * diversity if diversity is not None else td_loss
        q_data = q.detach()
        logs.update({"train/critic_loss": td_loss.detach(), "train/q_data": q_data.min(0).values.mean(),
                     "train/q_std": q_data.std(0).mean(),
                     "train/q_min_gap": (q_data.mean(0) - q_data.min(0).values).mean()})
        if diversity is not None:
            logs["train/diversity_loss"] = diversity.detach()
        critic_loss.backward(inputs=self.critic_params)
        self.critic_optimizer.step()

        # --- 4. theta'_i <- tau theta_i + (1 - tau) theta'_i ---
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), self.critic_params, c.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: max_action * tanh(mu_phi(s))."""
        return self.actor.deterministic(obs)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_i Q_theta_i(s, a), shape (batch,): the pessimistic estimate the target and the actor use."""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        load_optimizer(self.alpha_optimizer, state["alpha_optimizer"])


# ---------------------------------------------------------------------------------------------------------
# Settings and training
# ---------------------------------------------------------------------------------------------------------


def check_config(config: Config) -> None:
    """This file's settings, checked before anything is written (one line each)."""
    if config.num_critics is not None and config.num_critics < 2:
        fail(f"--num-critics must be at least 2 (N critics: the min over one critic is no ensemble), "
             f"got {config.num_critics}")
    if config.eta is not None and not config.eta >= 0:
        fail(f"--eta must be >= 0 (the weight of EDAC's diversity term; 0 is SAC-N), got {config.eta}")
    for name in ("actor_lr", "critic_lr", "alpha_lr"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0.0 <= config.gamma <= 1.0:
        fail(f"--gamma must lie in [0, 1], got {config.gamma}")
    if not 0.0 < config.tau <= 1.0:
        fail(f"--tau must lie in (0, 1], got {config.tau}")


def settings_table(config: Config) -> list[tuple[str, dict]]:
    """The per-dataset table of --variant (EDAC's, SAC-N's or LB-SAC's): what train() and the tools resolve with."""
    return VARIANT_SETTINGS[config.variant]


def resolve_settings(config: Config) -> Config:
    """`resolve_config` with the --variant's table; LB-SAC's large batch when --batch-size is left at 256."""
    check_config(config)
    config = resolve_config(config, settings_table(config))
    default_batch = next(f.default for f in dataclasses.fields(Config) if f.name == "batch_size")
    if config.variant == "lb-sac" and config.batch_size == default_batch and not config.resume:
        config = apply_dataset_settings(dataclasses.replace(config, batch_size=None), LB_SAC_SETTINGS)
    check_config(config)
    return config


def train(config: Config) -> dict:
    config = resolve_settings(config)  # resumed settings, checks, the variant's per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"sac_n.py (SAC-N, EDAC, LB-SAC) needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    if config.batch_size > len(data["obs"]):
        fail(f"--batch-size {config.batch_size} is larger than the dataset's {len(data['obs'])} transitions "
             f"(--variant {config.variant})")
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("sac_n", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    envs = make_eval_envs(dataset, config.eval_episodes)
    for step in run.steps(start):
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
    return run.finish(result)


if __name__ == "__main__":
    run_cli(train, Config)
