"""Conservative Offline Model-Based Policy Optimization (COMBO): CQL on a mixture of dataset and model rollouts.

Lecture sections: "Conservative Offline Model Based Policy Optimization" (MOPO's u(s, a) is hard to get right for
neural networks; COMBO instead pushes Q down on state-action pairs from the model mixture d_f and up on dataset
pairs only, so it trusts the data more than the model) and "COMBO - Algorithm" (train the dynamics model once;
then repeatedly roll the policy out in the model, conservatively evaluate it by eq. 4 on D u D_model, and improve
it by eq. 5), building on "Conservative Q-Learning". Paper: Yu, Kumar, Rafailov, Rajeswaran, Levine & Finn 2021,
"COMBO: Conservative Offline Model-Based Policy Optimization".

Usage:
    python algorithms/combo.py                                 # embedded default: local pendulum medium-replay
    python algorithms/combo.py --env hopper-medium-v2
    python algorithms/combo.py --env local/pendulum/medium-replay-v0 --dynamics runs/mopo/.../dynamics.pt

The run (1) fits the dynamics ensemble once (or reuses one with `--dynamics PATH`, from this file or mopo.py, on
the same dataset: the file names its dataset and a checksum of the data, and a mismatch is refused) and saves it
as `dynamics.pt` in the run directory; then (2) every `rollout_every` gradient steps rolls the current
(stochastic) policy out in the model for h steps from `rollout_batch_size` dataset states, all starts in one
batched forward pass of the elite members, into a FIFO model buffer on the device that keeps the last
`model_retain_rounds` rounds (no reward penalty: COMBO's conservatism is in Q); (3) each gradient step draws a
fraction f (`real_ratio`) of its batch from D and the rest from the model buffer, and takes
    min_Q  beta ( E_s~d_f [ log sum_a exp Q(s, a) ] - E_(s,a)~D [ Q(s, a) ] ) + E_(s,a,s')~d_f [ (Q - B^pi Q)^2 ]
with CQL(H)'s importance-sampled log-sum-exp over 3 x n actions per state (uniform, pi(.|s), pi(.|s')), taken
over all 3n values of each state as reference CQL does (OfflineRL-Kit's COMBO drops a reshape and takes it over
3 values per (state, sample): a weaker regulariser, not reproduced here), then a SAC actor step on the mixture.
The Bellman error is the plain MSE, as in reference CQL and OfflineRL-Kit (for which beta was tuned): the slide's
eq. 4 has 1/2 before it. `train/q_data` is Q on the batch's dataset pairs, `train/q_model` on its model pairs,
`train/q_batch` the mean over both.

The ensemble, its fit, the termination rules, the rollouts and the model buffer are common/dynamics.py's (the
same as mopo.py's): 7 Gaussian members over (delta s, r), 4 Swish layers of 200, early stopping on a held-out
split, 5 elites; model steps end where the env's own termination rule says so (or a learned termination head).

Per-dataset settings (h and beta as OfflineRL-Kit publishes them for the D4RL v2 sets, f = 0.5 as the paper; the
training length; the rollout batch; the cap on ensemble epochs) live in `DATASET_SETTINGS` below; flags override
them. As in algorithms/cql.py every loss of a step is computed from the networks before the step (one backward);
OfflineRL-Kit steps the actor first and samples the critic's actions from the updated actor.

--compile compiles the whole conservative actor-critic step (common/optim.py); the rollouts and the ensemble's
fit run eagerly.
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
    # --- COMBO: the model mixture d_f and the conservative critic ---
    cql_weight: float | None = None
    """beta in eq. 4: beta ( E_s~d_f log sum_a exp Q(s,a) - E_(s,a)~D Q(s,a) ) (None: from DATASET_SETTINGS)"""
    real_ratio: float | None = None
    """f, the fraction of each minibatch drawn from the dataset D; the rest (1 - f) comes from the model buffer
    (None: from DATASET_SETTINGS; paper and OfflineRL-Kit: 0.5)"""
    rollout_length: int | None = None
    """h, the length of each model rollout from a dataset state (None: from DATASET_SETTINGS; 1 or 5)"""
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
    cql_num_samples: int = 10
    """n, actions sampled per state for each of the three proposals (uniform, pi(.|s), pi(.|s')) that estimate
    log sum_a exp Q(s, a) (reference code: 10)"""
    cql_temperature: float = 1.0
    """temperature T of the log-sum-exp, T log sum exp(Q / T) (reference code: 1)"""
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
    # --- the actor-critic (SAC's actor and temperature, CQL's critics) ---
    actor_lr: float = 1e-4
    """Adam learning rate of the actor pi (OfflineRL-Kit: 1e-4, cosine-decayed to 0 over the run)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics Q_1, Q_2"""
    alpha_lr: float = 1e-4
    """Adam learning rate of log alpha, the entropy temperature of the actor"""
    gamma: float = 0.99
    """gamma in the Bellman backup B^pi Q(s, a) = r + gamma (1 - d) min_i Q'_i(s', a'), a' ~ pi(.|s')"""
    tau: float = 0.005
    """tau in the target update Q' <- (1 - tau) Q' + tau Q"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layers of the actor and of each critic (OfflineRL-Kit: 3 x 256)"""
    target_entropy: float | None = None
    """H-bar of the automatic entropy tuning (None: -|A|)"""
    backup_entropy: bool = False
    """subtract alpha log pi(a'|s') in the backup (OfflineRL-Kit's COMBO does not: deterministic_backup)"""
    cosine_schedule: bool = True
    """decay the actor's learning rate to 0 along a cosine over max_steps (OfflineRL-Kit)"""
    normalize_obs: bool = True
    """standardise the policy's and critics' observations with the dataset's mean and std (eps 1e-3); the
    ensemble standardises its own inputs in any case"""


def _d4rl_rows(family: str, quality: str, settings: dict) -> list[tuple[str, dict]]:
    """The rows of one D4RL dataset under each of its names: D4RL, Minari (mujoco/, D4RL/) and local builds."""
    return [(f"{family}-{quality}-v*", settings), (f"mujoco/{family}/{quality}-v*", settings),
            (f"D4RL/{family}/{quality}-v*", settings), (f"local/{family}/{quality}-v*", settings)]


# h and beta: OfflineRL-Kit's suggestions for the D4RL v2 sets (run_example/run_combo.py), f = 0.5 everywhere
# (the paper's and OfflineRL-Kit's), 1000 epochs of 1000 steps, 50,000 rollout starts every 1000 steps. The
# random and expert sets have no published values: the catch-all row (h 5, beta 1, the middle of the paper's
# {0.5, 1, 5}).
_MUJOCO = {"real_ratio": 0.5, "rollout_batch_size": 50_000, "dynamics_max_epochs": 1_000, "max_steps": 1_000_000}
_PUBLISHED = {  # family: {quality: (h, beta)}
    "halfcheetah": {"medium": (5, 0.5), "medium-replay": (5, 0.5), "medium-expert": (5, 5.0)},
    "hopper": {"medium": (5, 5.0), "medium-replay": (5, 0.5), "medium-expert": (5, 5.0)},
    "walker2d": {"medium": (1, 5.0), "medium-replay": (1, 0.5), "medium-expert": (1, 5.0)},
}

# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The small local sets get short runs and small rollout rounds.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    # the embedded Pendulum-v1 suite (200-step episodes, never terminates): short runs, 5,000 starts a round
    ("local/pendulum/*", {"rollout_length": 5, "cql_weight": 1.0, "real_ratio": 0.5, "max_steps": 20_000,
                          "rollout_batch_size": 5_000, "dynamics_max_epochs": 10}),
    # reduced local hopper builds (python -m common.build hopper ...): hopper's h and beta, a short budget
    ("local/hopper*/medium-replay-v*", {"rollout_length": 5, "cql_weight": 0.5, "real_ratio": 0.5,
                                        "max_steps": 100_000, "rollout_batch_size": 10_000,
                                        "dynamics_max_epochs": 100}),
    ("local/hopper*/*", {"rollout_length": 5, "cql_weight": 5.0, "real_ratio": 0.5, "max_steps": 100_000,
                         "rollout_batch_size": 10_000, "dynamics_max_epochs": 100}),
    ("test/*", {"rollout_length": 5, "cql_weight": 1.0, "real_ratio": 0.5, "max_steps": 2_000,
                "rollout_batch_size": 1_000, "dynamics_max_epochs": 10}),
    *[row for family, qualities in _PUBLISHED.items() for quality, (h, beta) in qualities.items()
      for row in _d4rl_rows(family, quality, {**_MUJOCO, "rollout_length": h, "cql_weight": beta})],
    ("*", {**_MUJOCO, "rollout_length": 5, "cql_weight": 1.0}),
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the reference code's clamp of the Gaussian's log-std


# ---------------------------------------------------------------------------------------------------------
# Networks (the twin critics are common.networks.CriticEnsemble), and CQL(H)'s push-down term
# ---------------------------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi(a|s): a = max_action * tanh(u), u ~ N(mu(s), sigma(s)^2), mu and log sigma from one MLP (samples and
    log-densities: common.dynamics.sample_tanh_gaussian)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 2 * act_dim)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def uniform_log_density(act_dim: int, max_action: float) -> float:
    """log of the uniform density on the action box [-max_action, max_action]^|A| (the paper's log 0.5^|A|)."""
    return -act_dim * math.log(2.0 * max_action)


def cql_logsumexp(q_uniform: torch.Tensor, q_policy: torch.Tensor, q_policy_next: torch.Tensor,
                  log_pi: torch.Tensor, log_pi_next: torch.Tensor, log_uniform: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """log sum_a exp Q(s, a) per state, by importance sampling over the last dim (n samples per proposal).

    Q(s, a) at n uniform actions, n actions a ~ pi(.|s) and n actions a ~ pi(.|s') (all at the state s), each
    minus its proposal's log-density, concatenated to 3n values per state and log-sum-exp'd at `temperature`:
    T log sum_j exp((Q(s, a_j) - log p(a_j)) / T), over all 3n values of the state, as reference CQL.
    (OfflineRL-Kit's COMBO leaves its terms (B n, 1) and takes the log-sum-exp over 3 values per (state,
    sample): n times more terms at log 3 instead of one at log 3n, a different regulariser.)
    Shapes: q_* (K, B, n), log_pi* (B, n) -> (K, B).
    """
    weighted = torch.cat([q_uniform - log_uniform, q_policy_next - log_pi_next, q_policy - log_pi], dim=-1)
    return temperature * torch.logsumexp(weighted / temperature, dim=-1)


def conservative_gap(logsumexp_q: torch.Tensor, q_data: torch.Tensor, n_real: int) -> torch.Tensor:
    """COMBO's regulariser per critic (K,): E_s~d_f [ log sum_a exp Q(s, a) ] - E_(s,a)~D [ Q(s, a) ].

    The push-down term averages over every state of the mixed batch (rows from D and from the model: d_f), the
    push-up term over the dataset rows only (the first `n_real`): the model is trusted less than the data.
    logsumexp_q and q_data: (K, B), the batch's first n_real rows from D.
    """
    return logsumexp_q.mean(dim=1) - q_data[:, :n_real].mean(dim=1)


# ---------------------------------------------------------------------------------------------------------
# The agent: the conservative actor-critic on d_f, and the learned model (common/dynamics.py)
# ---------------------------------------------------------------------------------------------------------


class Agent:
    """The conservative actor-critic (SAC's actor and temperature, CQL's twin critics) on d_f = f D + (1 - f)
    D_model, and the learned model: dynamics ensemble, termination rule, model buffer (common/dynamics.py)."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("combo.py is for continuous (Box) actions; this dataset has discrete actions")
        # fields left at None (an Agent built straight from Config(), as the benchmark does) get the
        # per-dataset values of config.env, exactly as train() fills them
        config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.max_action, self.act_dim = spec.max_action, spec.act_dim
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, config.hidden_dims).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_entropy_alpha = nn.Parameter(torch.zeros((), device=device))
        self.target_entropy = float(-spec.act_dim if config.target_entropy is None else config.target_entropy)
        self.log_uniform = uniform_log_density(spec.act_dim, spec.max_action)
        # a tensor learning rate: the cosine schedule changes it in place, so a compiled update never retraces
        self.actor_lr = torch.tensor(config.actor_lr, device=device)
        self.actor_optimizer = adam(self.actor.parameters(), self.actor_lr, config)
        self.alpha_optimizer = adam([self.log_entropy_alpha], config.alpha_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        # what the update's one backward trains
        self.params = [*self.critic.parameters(), *self.actor.parameters(), self.log_entropy_alpha]
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

    # --- model rollouts (Algorithm 1, line 4) ------------------------------------------------------------
    def rollout_policy(self, obs: torch.Tensor) -> torch.Tensor:
        """The current stochastic policy a ~ pi(.|s) on raw model states (the reference code's rollouts)."""
        mean, log_std = self.actor(self.normalize(obs))
        return sample_tanh_gaussian(mean, log_std, self.max_action, 1)[0][:, 0]

    @torch.no_grad()
    def rollout_round(self, start_obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """h-step rollouts of the current policy from `start_obs` (raw dataset states) into the model buffer (no
        reward penalty: COMBO's conservatism is in Q)."""
        rollouts, stats = model_rollout(self.rollout_policy, self.model.ensemble, self.model.termination, start_obs,
                                        self.config.rollout_length)
        return self.model.add(rollouts, stats)

    # --- conservative evaluation (eq. 4) and policy improvement (eq. 5) on d_f ----------------------------
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step on the first f * B rows of `batch` (dataset rows) and (1 - f) B rows of the model buffer."""
        n_real = max(1, int(batch["obs"].shape[0] * self.config.real_ratio))  # the reference code's int(256 * 0.5)
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
        cfg, n = self.config, self.config.cql_num_samples
        obs, next_obs = self.normalize(obs), self.normalize(next_obs)
        batch, obs_dim = obs.shape
        entropy_alpha = self.log_entropy_alpha.exp().detach()

        # --- policy samples at s (n for the regulariser + 1 for the actor) and at s' (n + 1 for the backup)
        mean, log_std = self.actor(obs)
        pi_actions, pi_log_prob = sample_tanh_gaussian(mean, log_std, self.max_action, n + 1)
        with torch.no_grad():
            next_mean, next_log_std = self.actor(next_obs)
            next_actions, next_log_prob = sample_tanh_gaussian(next_mean, next_log_std, self.max_action, n + 1)
            # B^pi Q(s, a) = r + gamma (1 - d) min_i Q'_i(s', a'),  a' ~ pi(.|s')  on d_f (data and model rows)
            target_q = self.target_critic(next_obs, next_actions[:, 0]).min(0).values
            if cfg.backup_entropy:
                target_q = target_q - entropy_alpha * next_log_prob[:, 0]
            target = rewards + cfg.gamma * (1.0 - terminals) * target_q

        # --- one critic pass over every action the step needs, all at the state s: the batch's action, n uniform
        # actions, n from pi(.|s) and n from pi(.|s'), i.e. (1 + 3n) actions per state
        uniform_actions = (2.0 * torch.rand(batch, n, self.act_dim, device=obs.device) - 1.0) * self.max_action
        all_actions = torch.cat([actions.unsqueeze(1), uniform_actions, pi_actions[:, 1:].detach(),
                                 next_actions[:, 1:]], dim=1)
        per_state = all_actions.shape[1]
        q_all = self.critic(obs.unsqueeze(1).expand(batch, per_state, obs_dim).reshape(-1, obs_dim),
                            all_actions.reshape(-1, self.act_dim)).view(-1, batch, per_state)
        q_data = q_all[..., 0]  # (K, B): Q(s, a) of the batch's pairs, dataset rows first
        q_uniform, q_pi, q_pi_next = q_all[..., 1:].split(n, dim=-1)  # (K, B, n) each

        # beta ( E_s~d_f [ log sum_a exp Q(s, a) ] - E_(s,a)~D [ Q(s, a) ] )   (lecture: "Conservative Offline
        # Model Based Policy Optimization", eq. 4, rho = d_f); log pi detached: the regulariser trains Q, not pi
        logsumexp_q = cql_logsumexp(q_uniform, q_pi, q_pi_next, pi_log_prob[:, 1:].detach(), next_log_prob[:, 1:],
                                    self.log_uniform, cfg.cql_temperature)
        gap = conservative_gap(logsumexp_q, q_data, n_real)  # (K,)
        # 1/2 E_(s,a,s')~d_f [ (Q(s, a) - B^pi Q(s, a))^2 ]  per critic, without the 1/2: the plain MSE, as reference
        # CQL and OfflineRL-Kit, for which beta was tuned
        td_loss = ((q_data - target.unsqueeze(0)) ** 2).mean(dim=1).sum()
        critic_loss = td_loss + cfg.cql_weight * gap.sum()

        # --- policy improvement (eq. 5): pi <- argmax_pi E_s~d_f, a~pi [ Q(s, a) ], SAC's actor:
        #   min_pi E_s~d_f, a~pi [ alpha log pi(a|s) - min_i Q_i(s, a) ]   (critic weights detached)
        log_pi = pi_log_prob[:, 0]
        q_policy = self.critic(obs, pi_actions[:, 0], detach_weights=True).min(0).values
        actor_loss = (entropy_alpha * log_pi - q_policy).mean()
        # automatic entropy tuning:  min_{log alpha} -log alpha E[ log pi(a|s) + H-bar ]
        entropy_loss = -(self.log_entropy_alpha * (log_pi.detach() + self.target_entropy)).mean()

        q_min = q_data.detach().min(0).values  # Q on the dataset pairs (first n_real rows) and on the model's
        q_dataset, q_model = q_min[:n_real].mean(), q_min[n_real:].mean()
        logs = {  # read before the backward, which consumes the graph these values hang on
            "train/critic_loss": critic_loss.detach(), "train/td_loss": td_loss.detach(),
            "train/cql_gap": gap.detach().mean(), "train/actor_loss": actor_loss.detach(),
            "train/entropy_alpha": entropy_alpha, "train/entropy": -log_pi.detach().mean(),
            "train/q_data": q_dataset, "train/q_model": q_model, "train/q_model_minus_data": q_model - q_dataset,
            "train/q_batch": q_min.mean(), "train/q_policy": q_policy.detach().mean()}

        # each loss reaches only its own parameters (the rest enter it detached): one backward for all;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log alpha when the step is recompiled)
        (critic_loss + actor_loss + entropy_loss).backward(inputs=self.params)
        self.critic_optimizer.step()
        self.actor_optimizer.step()
        self.alpha_optimizer.step()
        with torch.no_grad():
            # Q' <- (1 - tau) Q' + tau Q
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action max_action * tanh(mu(s)) on normalised observations (as evaluate() gives)."""
        return self.max_action * torch.tanh(self.actor(obs)[0])

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
                "target_critic": self.target_critic.state_dict(),
                "log_entropy_alpha": self.log_entropy_alpha.detach().clone(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "alpha_optimizer": self.alpha_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), **self.model.state_dict(),
                "obs_mean": self.obs_mean, "obs_std": self.obs_std, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        with torch.no_grad():
            self.log_entropy_alpha.copy_(state["log_entropy_alpha"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.alpha_optimizer, state["alpha_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
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
    def need(ok: bool, message: str) -> None:
        if not ok:
            fail(message)

    need(0.0 < config.real_ratio < 1.0, f"--real-ratio must lie in (0, 1), got {config.real_ratio} (f = 1, no model "
         f"data, is CQL: algorithms/cql.py)")
    need(config.cql_weight >= 0, f"--cql-weight must be 0 or positive, got {config.cql_weight}")
    need(config.cql_num_samples >= 1, f"--cql-num-samples must be at least 1, got {config.cql_num_samples}")
    need(config.cql_temperature > 0, f"--cql-temperature must be positive, got {config.cql_temperature}")
    check_model_config(config)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    # the transitions, the env's termination rule and the --dynamics file, checked before anything is written
    data = model_data(config, dataset, "combo.py")
    normalizer = ObsNormalizer.from_data(data.transitions["obs"]) if config.normalize_obs else None
    # raw observations: the ensemble and the termination rule read them; the agent standardises for its networks
    sampler = TensorSampler(data.transitions, device, config.seed)
    agent = Agent(config, dataset.spec, device)
    agent.set_obs_normalizer(normalizer)
    agent.model.termination = data.termination

    run = Run("combo", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    # Algorithm 1, line 1, once: train the probabilistic dynamics model on D (or load the --dynamics file)
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
