"""SPOT: TD3 whose actor is kept inside the data's support by a density penalty from a pretrained behaviour VAE.

Lecture sections: "Offline RL solution approaches" (policy-constrained methods: "Match the support"), the BEAR
slides "Bootstrapping Error Accumulation Reduction (BEAR)" (why a support constraint, pi(a|s) > 0 =>
pi_beta(a|s) > eps, can recover the optimal policy where distribution matching cannot) and "BEAR – Support
Constraint" (max_phi Q(s, pi_phi(s)) s.t. the support constraint, which needs a measure of its violation: BEAR's
is MMD, SPOT's the behaviour density itself), and "Idea: TD3+BC" (the TD3 it is built on: twin critics, target
policy smoothing, delayed policy updates, Q normalised by mean|Q|, state normalisation); for the online phase
"Reinforcement Learning with Online Interactions".
Paper: Wu, Wu, Long, Wang, Long 2022, "Supported Policy Optimization for Offline Reinforcement Learning"
(NeurIPS; authors' code github.com/thuml/SPOT; CORL's algorithms/finetune/spot.py).

Usage:
    python algorithms/spot.py                                   # embedded default: local pendulum data
    python algorithms/spot.py --env hopper-medium-v2
    python algorithms/spot.py --env antmaze-umaze-v2 --online-steps 1000000     # CORL's fine-tuning protocol
    python algorithms/spot.py --resume RUN --online-steps 20000 --no-online-reset-optimizers   # the authors'

The support constraint log pi_beta(pi(s)|s) >= log eps is relaxed into a penalty, and -log pi_beta is estimated by
the ELBO loss of a conditional VAE fitted to the data once, at the start of the run, then frozen:
    (0) VAE: min E_(s,a)~D [ ||D(s, z) - a||^2 / |A| + beta_KL KL(q(z|s,a) || N(0, I)) / d_z ],  z ~ q(z|s,a)
    (1) critics (TD3): y = r + gamma (1 - d) min_i Q'_i(s', clip(pi'(s') + clip(N(0, sigma~^2), -c, c)))
    (2) actor, every 2nd step with the just-updated critics:
        min_phi E_s~D [ -Q_1(s, pi(s)) / stop_grad(mean_B |Q_1(s, pi(s))|) + lambda ELBOloss(s, pi(s)) ]
    then the Polyak targets. The VAE's `vae_steps` iterations (100k in both codes) run before the first TD3 update
    and do not count toward max_steps; the fitted VAE is checkpointed (also every checkpoint_every iterations
    while it fits), so a resumed run never refits it, and a run killed mid-fit continues the fit exactly.

Per-dataset settings, in `DATASET_SETTINGS` below (flags override them): lambda is the authors' per dataset
(configs/offline/*.yml of thuml/SPOT; CORL's finetune configs agree on antmaze and add Adroit-cloned lambda = 1).
Locomotion follows the authors' offline code: state normalisation, raw rewards, actor and critic lr 3e-4, actor
dropout 0.1, PyTorch's default init. Antmaze: no normalisation, rewards r - 1, actor lr 1e-4, no dropout, the
output layers initialised U(+-1e-3) (actor) and U(+-3e-3) (critics) (thuml and CORL). Adroit-cloned: CORL's
(as antmaze, raw rewards). Another quality of halfcheetah, hopper or walker2d (random, expert, a user's data) has
no published lambda and takes its family's medium value; any other dataset asks for --support-lambda.

Online fine-tuning (--online-steps; common/online.py), as CORL's finetune/spot.py: the policy explores with
pi(s) + clip(N(0, (0.1 max_action)^2), +-c max_action), online transitions join the offline data in one buffer
sampled uniformly, one update per env step, and at the switch
  * lambda cools linearly: lambda_t = lambda max(lambda_end, 1 - t / online_steps), t the online update count
    (lambda_end 0.2 antmaze, 0.5 Adroit: CORL's; --online-lambda-end 1 keeps lambda fixed). The schedule follows
    --online-steps: extending a run's online phase on resume stretches the rest of it;
  * gamma becomes online_gamma (0.995 on every antmaze set, as CORL; the authors only on antmaze-large);
  * the actor's and critics' Adam states are reset (CORL re-creates the optimisers; the default here). The
    authors instead load the offline optimiser states and continue: --no-online-reset-optimizers.
The VAE stays frozen online (both codes). Locomotion and the local sets have no published fine-tuning settings:
lambda_end 0.2 (both codes' default) and the offline gamma. The authors' own exploration noise is not clipped (CORL
clips it at c = 0.5, 5 sigma). Settings only the online phase reads are named online_* and may change on resume
until the online phase has begun.
The authors' offline code stops a run whose mean Q exceeds 1e4 ("kill for diverging"); here a run stops only on a
non-finite value (common/runs.py).

--compile compiles the VAE step and the whole TD3 update (static shapes; noise and latents drawn on the device
inside). The delayed actor update is a Python bool, so the TD3 step compiles twice (with and without the actor);
lambda_t and gamma are device tensors changed in place and the Adam reset zeroes the optimisers' state in place,
so neither the schedule nor the switch retraces.
"""

from __future__ import annotations

import copy
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
from common.networks import CriticEnsemble  # noqa: E402
from common.online import OnlinePhase  # noqa: E402
from common.optim import adam, keep, load_optimizer, update_step  # noqa: E402
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
    online_steps: int = 0
    """env steps of online fine-tuning after the offline phase, one update each (0: offline only; see
    common/online.py; a file whose Agent cannot explore refuses any other value)"""
    capture_video: bool = False
    """record the final evaluation's first episodes (and, with --eval-every, periodic ones) as MP4 in the run
    directory, and to W&B with --track"""
    # --- SPOT ---
    support_lambda: float | None = None
    """lambda, the weight of the support penalty lambda * ELBOloss(s, pi(s)) (the estimate of -log pi_beta) in the
    actor loss (None: from DATASET_SETTINGS, the authors' per-dataset values)"""
    gamma: float = 0.99
    """gamma, the discount in y = r + gamma (1 - d) min_i Q_theta'_i(s', a~)"""
    tau: float = 0.005
    """tau in the target updates theta' <- tau theta + (1 - tau) theta'"""
    policy_noise: float = 0.2
    """sigma~ of the target policy smoothing noise eps ~ clip(N(0, sigma~), -c, c), times max_action"""
    noise_clip: float = 0.5
    """c, the clip of the target policy smoothing noise (and of the online exploration noise), times max_action"""
    policy_freq: int = 2
    """d: the actor and the target networks are updated every d critic updates ("if t mod d")"""
    actor_lr: float | None = None
    """Adam learning rate of the actor pi_phi (None: from DATASET_SETTINGS; 3e-4 locomotion, 1e-4 antmaze and
    Adroit)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics Q_theta1, Q_theta2"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor and of each critic (both codes: 2 x 256)"""
    actor_dropout: float | None = None
    """dropout after each hidden layer of the actor while training (None: from DATASET_SETTINGS; the authors' 0.1
    on locomotion, 0 on antmaze; CORL none)"""
    actor_init_w: float | None = None
    """the actor's output layer drawn from U(-w, w) (None: from DATASET_SETTINGS; 1e-3 antmaze and Adroit; 0:
    PyTorch's default init, the authors' locomotion runs)"""
    critic_init_w: float | None = None
    """each critic's output layer drawn from U(-w, w) (None: from DATASET_SETTINGS; 3e-3 antmaze and Adroit; 0:
    PyTorch's default init)"""
    normalize_obs: bool | None = None
    """state normalisation s_i = (s_i - mu_i) / (sigma_i + 1e-3) for the VAE, actor and critics (None: from
    DATASET_SETTINGS; on for locomotion, off for antmaze and Adroit)"""
    reward_transform: Literal["none", "return-range", "minus-one"] | None = None
    """reward preprocessing, the same online (None: from DATASET_SETTINGS; none locomotion and Adroit, minus-one
    r - 1 antmaze)"""
    vae_steps: int | None = None
    """gradient steps of the behaviour VAE, fitted once before the first TD3 update and not counted in max_steps
    (None: from DATASET_SETTINGS; 100k in both codes)"""
    vae_lr: float = 1e-3
    """Adam learning rate of the behaviour VAE"""
    vae_hidden_dims: tuple[int, ...] = (750, 750)
    """hidden layer sizes of the VAE's encoder q(z|s,a) and decoder D(s, z)"""
    latent_dim: int | None = None
    """d_z, the size of the VAE's latent z (None: 2 |A|)"""
    kl_weight: float = 0.5
    """beta_KL, the weight of KL(q(z|s,a) || N(0, I)) in the VAE loss and in the ELBO estimate"""
    elbo_samples: int = 1
    """L, latent samples z ~ q(z|s,a) averaged in the ELBO estimate of -log pi_beta(a|s) (1 in every published
    config)"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = None
    """fraction of each online-phase batch drawn from the offline data (None: uniform over the offline and online
    rows, one growing buffer, as CORL's SPOT fine-tuning)"""
    online_explore_noise: float = 0.1
    """sigma of the exploration noise when acting online, a = clip(pi(s) + clip(N(0, (sigma max_action)^2), -c max,
    c max)) (CORL's and the authors' expl_noise 0.1)"""
    online_lambda_end: float | None = None
    """lambda_end in the online schedule lambda_t = lambda max(lambda_end, 1 - t / online_steps) (None: from
    DATASET_SETTINGS; 0.2 antmaze, 0.5 Adroit (CORL); 1: no cooling)"""
    online_gamma: float | None = None
    """gamma of the online phase (None: from DATASET_SETTINGS; CORL's 0.995 on antmaze, elsewhere the offline
    gamma)"""
    online_reset_optimizers: bool = True
    """reset the actor's and critics' Adam states at the switch (CORL); off: continue with the offline ones
    (the authors' fine-tuning loads them)"""


# lambda of the authors' offline configs (thuml/SPOT configs/offline/*.yml); CORL's finetune configs use the same
# antmaze values and lambda = 1 on Adroit-cloned
LOCOMOTION_LAMBDAS = {
    "halfcheetah": {"medium": 0.05, "medium-replay": 0.05, "medium-expert": 1.0},
    "hopper": {"medium": 0.1, "medium-replay": 0.1, "medium-expert": 0.2},
    "walker2d": {"medium": 0.2, "medium-replay": 0.2, "medium-expert": 0.5},
}
ANTMAZE_LAMBDAS = {"umaze": 0.25, "umaze-diverse": 0.25, "medium-play": 0.05, "medium-diverse": 0.025,
                   "large-play": 0.025, "large-diverse": 0.025}
# the authors' offline defaults for MuJoCo locomotion (main.py): lr 3e-4 for both, dropout 0.1, default init
LOCOMOTION = {"actor_lr": 3e-4, "actor_dropout": 0.1, "actor_init_w": 0.0, "critic_init_w": 0.0,
              "normalize_obs": True, "reward_transform": "none", "vae_steps": 100_000, "max_steps": 1_000_000,
              "online_lambda_end": 0.2, "online_gamma": None}
# antmaze: the authors' configs and CORL's finetune configs agree (CORL: gamma 0.995 online on every maze)
ANTMAZE = {"actor_lr": 1e-4, "actor_dropout": 0.0, "actor_init_w": 1e-3, "critic_init_w": 3e-3,
           "normalize_obs": False, "reward_transform": "minus-one", "vae_steps": 100_000, "max_steps": 1_000_000,
           "online_lambda_end": 0.2, "online_gamma": 0.995}
# Adroit-cloned: CORL's finetune configs (the authors have none)
ADROIT = {**ANTMAZE, "support_lambda": 1.0, "reward_transform": "none", "online_lambda_end": 0.5,
          "online_gamma": 0.99}
# the small local and test sets (Pendulum: 200-step episodes, costs in [-16, 0]); measured here, see the comment
# at their rows
SMALL = {**LOCOMOTION, "actor_dropout": 0.0}

# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id (D4RL names, Minari's ids, and the local D4RL-recipe builds local/hopper-150k/...).
DATASET_SETTINGS: list[tuple[str, dict]] = [
    *[(pattern, {**LOCOMOTION, "support_lambda": lam})
      for family, rows in LOCOMOTION_LAMBDAS.items() for quality, lam in rows.items()
      for pattern in (f"{family}-{quality}-v*", f"mujoco/{family}/{quality}-v*", f"local/{family}*/{quality}-v*")],
    # other qualities of these families (random, expert, a user's own data): no published lambda; the family's
    # medium and medium-replay value (the authors use one value for both)
    *[(pattern, {**LOCOMOTION, "support_lambda": rows["medium"]}) for family, rows in LOCOMOTION_LAMBDAS.items()
      for pattern in (f"{family}-*", f"mujoco/{family}/*", f"local/{family}*/*")],
    *[(pattern, {**ANTMAZE, "support_lambda": lam}) for maze, lam in ANTMAZE_LAMBDAS.items()
      for pattern in (f"antmaze-{maze}-v*", f"D4RL/antmaze/{maze}-v*")],
    *[(pattern, ADROIT) for task in ("pen", "door", "hammer", "relocate")
      for pattern in (f"{task}-cloned-v*", f"D4RL/{task}/cloned-v*")],
    # Pendulum: as in TD3+BC, the Q term is divided by mean|Q|, a large baseline here (hundreds at gamma 0.99)
    # next to the few units by which the action changes Q, so lambda must be small for the actor to leave the
    # data's densest actions. Measured: lambda 0.01 scores 96 on local/pendulum/medium-replay-v0 with this row
    # (seed 0; the data's own score is 5); on the mixed test set (short-run settings, 3000 steps) 0.001 and 0.01
    # reach 87, 0.1 only 56
    ("local/pendulum/*", {**SMALL, "support_lambda": 0.01, "max_steps": 30_000, "vae_steps": 10_000}),
    ("test/*", {**SMALL, "support_lambda": 0.01, "max_steps": 5_000, "vae_steps": 2_000}),
    # anything else: the locomotion settings; lambda has no published value there, so such a run asks for
    # --support-lambda (one line, before anything is written)
    ("*", LOCOMOTION),
]

LOG_STD_MIN, LOG_STD_MAX = -4.0, 15.0  # both codes clamp the encoder's log-std to this range
NUM_CRITICS = 2  # TD3's twin critics Q_theta1, Q_theta2


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy pi_phi(s) = max_action * tanh(MLP(s)); dropout after each hidden layer (training only)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float,
                 dropout: float, init_w: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, act_dim, dropout)
        if init_w > 0:
            nn.init.uniform_(self.net[-1].weight, -init_w, init_w)
            nn.init.uniform_(self.net[-1].bias, -init_w, init_w)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class BehaviourVAE(nn.Module):
    """Conditional VAE of the behaviour policy pi_beta(a|s): encoder q(z|s,a) = N(mu, sigma), decoder D(s, z)."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.encoder = mlp(obs_dim + act_dim, hidden_dims[:-1], hidden_dims[-1])
        self.mean = nn.Linear(hidden_dims[-1], latent_dim)
        self.log_std = nn.Linear(hidden_dims[-1], latent_dim)
        self.decoder = mlp(obs_dim + latent_dim, hidden_dims, act_dim)
        self.max_action = max_action

    def encode(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, sigma) of q(z|s,a), each (B, d_z); log sigma clamped to [-4, 15]."""
        hidden = torch.relu(self.encoder(torch.cat([obs, actions], -1)))
        return self.mean(hidden), self.log_std(hidden).clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """a = max_action * tanh(D(s, z)); any leading dimensions."""
        return self.max_action * torch.tanh(self.decoder(torch.cat([obs, z], -1)))

    def elbo_terms(self, obs: torch.Tensor, actions: torch.Tensor, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (s, a): the reconstruction error ||D(s, z) - a||^2 / |A| averaged over `samples` draws z ~ q(z|s,a)
        (not clipped), and KL(q(z|s,a) || N(0, I)) / d_z; each (B,)."""
        mean, std = self.encode(obs, actions)
        z = mean.unsqueeze(1) + std.unsqueeze(1) * torch.randn(mean.shape[0], samples, mean.shape[1],
                                                                device=mean.device, dtype=mean.dtype)  # (B, L, d_z)
        recon = self.decode(obs.unsqueeze(1).expand(-1, samples, -1), z)  # (B, L, |A|)
        recon_error = (recon - actions.unsqueeze(1)).square().mean(dim=(1, 2))
        # KL(N(mu, sigma) || N(0, 1)) = -1/2 (1 + log sigma^2 - mu^2 - sigma^2), averaged over the latent dims
        kl = -0.5 * (1.0 + torch.log(std.square()) - mean.square() - std.square()).mean(-1)
        return recon_error, kl


class Agent:
    """SPOT's behaviour VAE, actor, twin critics, their targets and optimisers, and the update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("SPOT needs continuous (Box) actions; this dataset has discrete actions (use a discrete method "
                 "such as bcq_discrete or cql_discrete on it)")
        # fields left at None (an Agent built straight from Config(), as the benchmark does) get the per-dataset
        # values of config.env, exactly as train() fills them
        config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        obs_dim, act_dim = spec.obs_dim, spec.act_dim
        self.vae = BehaviourVAE(obs_dim, act_dim, config.latent_dim or 2 * act_dim, config.vae_hidden_dims,
                                spec.max_action).to(device)
        self.actor = Actor(obs_dim, act_dim, config.hidden_dims, spec.max_action, config.actor_dropout,
                           config.actor_init_w).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = CriticEnsemble(obs_dim, act_dim, config.hidden_dims, NUM_CRITICS).to(device)
        if config.critic_init_w > 0:
            head = self.critic.layers[-1]
            nn.init.uniform_(head.weight, -config.critic_init_w, config.critic_init_w)
            nn.init.uniform_(head.bias, -config.critic_init_w, config.critic_init_w)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.vae_optimizer = adam(self.vae.parameters(), config.vae_lr, config)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.actor_params = list(self.actor.parameters())  # the only parameters the actor loss trains
        self.vae_step = 0  # VAE gradient steps done (the fit is over at config.vae_steps)
        self.vae_report: dict[str, float] = {}  # the fitted VAE's diagnostics (summary.json)
        self.total_it = 0  # TD3 updates (python int: choosing whether to update the actor needs no device sync)
        self.online, self.online_it = False, 0  # set by start_online; online updates so far (t in lambda_t)
        # lambda_t and gamma on the device, changed in place by the online schedule and the switch (a compiled
        # update never retraces)
        self.support_lambda = torch.tensor(float(config.support_lambda), device=device)
        self.gamma = torch.tensor(config.gamma, device=device)
        zero = torch.zeros((), device=device)
        # the actor's logs from its last update (TD3 updates it every `policy_freq` steps)
        self.actor_logs = {"train/actor_loss": zero, "train/density_penalty": zero,
                           "train/density_penalty_max": zero, "train/lambda": zero, "train/q_scale": zero,
                           "train/q_policy": zero}
        # zero_grad of the optimisers, then the step (each torch.compile'd whole under --compile)
        self._vae_update = update_step(self._vae_update_impl, config, self.vae_optimizer)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    # --- the ELBO estimate of -log pi_beta(a|s), the support penalty -----------------------------------------------
    def elbo_loss(self, obs: torch.Tensor, actions: torch.Tensor, samples: int | None = None) -> torch.Tensor:
        """ELBOloss(s, a) = ||D(s, z) - a||^2 / |A| + beta_KL KL(q(z|s,a) || N(0, I)) / d_z, z ~ q(z|s,a): an
        upper estimate of -log pi_beta(a|s) up to scale and shift; (B,). Differentiable in
        `actions` (the actor's gradient flows through the frozen VAE)."""
        recon_error, kl = self.vae.elbo_terms(obs, actions, samples or self.config.elbo_samples)
        return recon_error + self.config.kl_weight * kl

    # --- step 0: the behaviour VAE (fitted once, before the first TD3 update; see fit_behaviour_vae) -----------------
    def vae_update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.vae_step += 1
        return self._vae_update(batch["obs"], batch["actions"])

    def _vae_update_impl(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        # min E_(s,a)~D [ ||D(s, z) - a||^2 / |A| + beta_KL KL(q(z|s,a) || N(0, I)) / d_z ],  one z ~ q(z|s,a) per
        # pair: the batch mean of ELBOloss(s, a) (the VAE of BCQ, with both codes' averaging)
        recon_error, kl = self.vae.elbo_terms(obs, actions, samples=1)
        vae_loss = (recon_error + self.config.kl_weight * kl).mean()
        logs = {"vae/loss": vae_loss.detach(), "vae/recon_loss": recon_error.detach().mean(),
                "vae/kl": kl.detach().mean()}
        vae_loss.backward()
        self.vae_optimizer.step()
        return logs

    # --- TD3 with the support penalty ------------------------------------------------------------------------------
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.total_it += 1
        if self.online:  # lambda_t from the online update count, at every online update (a resumed run's too)
            self.online_it += 1
            self.support_lambda.fill_(self.lambda_at(self.online_it))
        # Delayed policy updates: "if t mod d then" update phi and the target networks   (lecture: "Idea: TD3+BC")
        # (a Python bool: --compile compiles the step twice, with and without the actor update)
        update_actor = self.total_it % self.config.policy_freq == 0
        logs = self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["terminals"],
                            update_actor)
        if update_actor:
            self.actor_logs = keep({key: logs[key] for key in self.actor_logs})  # logged until the next
        return {**logs, **self.actor_logs}

    def _update_impl(self, obs, actions, rewards, next_obs, terminals, update_actor: bool) -> dict[str, torch.Tensor]:
        logs = self._critic_step(obs, actions, rewards, next_obs, terminals)
        if update_actor:  # with the critics this step has just updated (both codes)
            logs.update(self._actor_step(obs))
        return logs

    def _critic_step(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        c = self.config
        with torch.no_grad():
            # a~ <- pi_phi'(s') + eps,  eps ~ clip(N(0, sigma~), -c, c)   (target policy smoothing)
            noise = (torch.randn_like(actions) * c.policy_noise * self.max_action).clamp(
                -c.noise_clip * self.max_action, c.noise_clip * self.max_action)
            next_actions = (self.actor_target(next_obs) + noise).clamp(-self.max_action, self.max_action)
            # y = r + gamma (1 - d) min_{i=1,2} Q_theta'_i(s', a~)   (lecture: "Idea: TD3+BC", TD3's target)
            y = rewards + self.gamma * (1.0 - terminals) * self.critic_target(next_obs, next_actions).min(0).values
        q = self.critic(obs, actions)  # (2, B)
        # theta_i <- argmin_theta_i N^-1 sum (y - Q_theta_i(s, a))^2, both critics (summed)
        critic_loss = ((q - y) ** 2).mean(1).sum()
        # logged values are taken before the backward (which consumes the graph they hang on)
        logs = {"train/critic_loss": critic_loss.detach(), "train/q_data": q.detach()[0].mean()}
        critic_loss.backward()
        self.critic_optimizer.step()
        return logs

    def _actor_step(self, obs) -> dict[str, torch.Tensor]:
        pi = self.actor(obs)
        q1 = self.critic.q1(obs, pi)  # Q_theta1(s, pi(s)); the actor's gradient stops at the action
        # -log pi_beta(pi(s)|s), estimated by the frozen VAE's ELBO loss at (s, pi(s)): the support penalty, large
        # where the data has no actions like pi(s)   (lecture: "BEAR – Support Constraint", a density in place
        # of MMD)
        density_penalty = self.elbo_loss(obs, pi)
        # Q normalised by its scale, a constant: stop_grad(1/N sum_i |Q_1(s_i, pi(s_i))|)   (as TD3+BC's lambda)
        q_scale = q1.abs().mean().detach()
        # L_pi = E_s~D [ -Q_1(s, pi(s)) / stop_grad(mean|Q_1|) + lambda ELBOloss(s, pi(s)) ]   (SPOT's actor loss)
        actor_loss = -q1.mean() / q_scale + self.support_lambda * density_penalty.mean()
        logs = {"train/actor_loss": actor_loss.detach(), "train/density_penalty": density_penalty.detach().mean(),
                "train/density_penalty_max": density_penalty.detach().max(),
                "train/lambda": self.support_lambda.clone(), "train/q_scale": q_scale,
                "train/q_policy": q1.detach().mean()}
        # inputs: the actor's parameters alone (the VAE is frozen: no gradient is accumulated into it)
        actor_loss.backward(inputs=self.actor_params)
        self.actor_optimizer.step()
        with torch.no_grad():
            # theta'_i <- tau theta_i + (1 - tau) theta'_i ;  phi' <- tau phi + (1 - tau) phi'
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.config.tau)
            torch._foreach_lerp_(list(self.actor_target.parameters()), list(self.actor.parameters()), self.config.tau)
        return logs

    # --- the online phase ----------------------------------------------------------------------------------------
    def lambda_at(self, t: int) -> float:
        """lambda_t = lambda max(lambda_end, 1 - t / online_steps) after t online updates (CORL's and the authors'
        cooling; the offline phase keeps lambda)."""
        c = self.config
        return c.support_lambda * max(c.online_lambda_end, 1.0 - t / max(c.online_steps, 1))

    def start_online(self) -> None:
        """The switch to the online phase (common/online.py calls it once): gamma <- online_gamma, lambda starts
        cooling, and (online_reset_optimizers) the actor's and critics' Adam states start afresh."""
        self.online = True
        if self.config.online_gamma is not None:
            self.gamma.fill_(self.config.online_gamma)
        if self.config.online_reset_optimizers:
            reset_adam_(self.actor_optimizer)
            reset_adam_(self.critic_optimizer)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action pi_phi(s), dropout off."""
        self.actor.eval()
        action = self.actor(obs)
        self.actor.train()
        return action

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The online phase's action: pi_phi(s) + clip(N(0, (sigma max_action)^2), -c max_action, c max_action) with
        sigma = online_explore_noise and c = noise_clip (CORL's), clipped to the action bounds (torch's global RNG,
        saved in checkpoints)."""
        action = self.act(obs)
        limit = self.config.noise_clip * self.max_action
        noise = (torch.randn_like(action) * self.config.online_explore_noise * self.max_action).clamp(-limit, limit)
        return (action + noise).clamp(-self.max_action, self.max_action)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q_theta1, Q_theta2)(s, a), shape (batch,): the estimate TD3's target trusts."""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict(), "actor": self.actor.state_dict(),
                "actor_target": self.actor_target.state_dict(), "critic": self.critic.state_dict(),
                "critic_target": self.critic_target.state_dict(), "vae_optimizer": self.vae_optimizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "vae_step": self.vae_step,
                "vae_report": dict(self.vae_report), "total_it": self.total_it, "online": self.online,
                "online_it": self.online_it, "actor_logs": {k: v.clone() for k, v in self.actor_logs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.actor.load_state_dict(state["actor"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        load_optimizer(self.vae_optimizer, state["vae_optimizer"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        self.vae_step, self.vae_report = int(state["vae_step"]), dict(state["vae_report"])
        self.total_it, self.online_it = int(state["total_it"]), int(state["online_it"])
        self.online = bool(state["online"])
        online_gamma = self.config.online_gamma
        self.gamma.fill_(online_gamma if self.online and online_gamma is not None else self.config.gamma)
        self.actor_logs = {k: v.to(self.device) for k, v in state["actor_logs"].items()}


def reset_adam_(optimizer: torch.optim.Optimizer) -> None:
    """A fresh Adam's state, in place: every step count and moment zeroed, so the next step is a first step (the
    same tensors: a compiled update keeps reading them, and no graph is recompiled)."""
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                value.zero_()


def fit_behaviour_vae(agent: Agent, sampler: TensorSampler, config: Config, run: Run, phase: OnlinePhase) -> None:
    """SPOT's step 0, once per run: `vae_steps` VAE updates on minibatches of the offline data, before the first TD3
    update. Checkpointed (at step 0) before, every checkpoint_every VAE steps, and after: a resumed run continues a
    fit it was killed in, and never refits a fitted VAE. Logs the fitted VAE's losses and how its ELBO loss ranks
    the data's actions against uniform random ones at the same states (`vae/elbo_loss_data` < `_uniform`)."""
    if agent.vae_step >= config.vae_steps:
        return
    run.save_checkpoint(0, agent, phase)
    progress = Progress(f"spot behaviour VAE {run.dataset.name}", config.vae_steps, agent.vae_step)
    while agent.vae_step < config.vae_steps:
        logs = agent.vae_update(sampler.sample(config.batch_size))
        progress.update(agent.vae_step)
        if config.checkpoint_every and agent.vae_step % config.checkpoint_every == 0 \
                and agent.vae_step < config.vae_steps:
            run.save_checkpoint(0, agent, phase)
    progress.close()
    with torch.no_grad():
        batch = sampler.sample(config.batch_size)
        uniform = (2 * torch.rand_like(batch["actions"]) - 1) * agent.max_action
        logs = {**logs, "vae/elbo_loss_data": agent.elbo_loss(batch["obs"], batch["actions"]).mean(),
                "vae/elbo_loss_uniform": agent.elbo_loss(batch["obs"], uniform).mean()}
    agent.vae_report = {**run.log(0, logs), "vae/steps": float(config.vae_steps)}
    run.save_checkpoint(0, agent, phase)  # from here on a resumed run never fits the VAE again


def check_config(config: Config) -> None:
    """One clear line for SPOT's settings outside their range (before anything is read or written)."""
    checks = [
        (config.support_lambda >= 0, f"--support-lambda (lambda, the weight of the support penalty) must be 0 or "
                                     f"positive, got {config.support_lambda}"),
        (0.0 <= config.online_lambda_end <= 1.0,
         f"--online-lambda-end (the floor of lambda's online schedule, a fraction of lambda) must lie in [0, 1], got "
         f"{config.online_lambda_end}"),
        (0.0 <= config.gamma <= 1.0, f"--gamma must lie in [0, 1], got {config.gamma}"),
        (config.online_gamma is None or 0.0 <= config.online_gamma <= 1.0,
         f"--online-gamma must lie in [0, 1], got {config.online_gamma}"),
        (config.online_mix is None or 0.0 <= config.online_mix <= 1.0,
         f"--online-mix must lie in [0, 1] (the offline share of a batch), got {config.online_mix}"),
        (config.online_explore_noise >= 0, f"--online-explore-noise must be 0 or positive, got "
                                           f"{config.online_explore_noise}"),
        (config.vae_steps >= 1, f"--vae-steps must be at least 1 (SPOT's penalty needs a fitted VAE), got "
                                f"{config.vae_steps}"),
        (config.elbo_samples >= 1, f"--elbo-samples must be at least 1, got {config.elbo_samples}"),
        (config.latent_dim is None or config.latent_dim >= 1, f"--latent-dim must be at least 1, got "
                                                              f"{config.latent_dim}"),
        (config.policy_freq >= 1, f"--policy-freq must be at least 1, got {config.policy_freq}"),
        (0.0 <= config.actor_dropout < 1.0, f"--actor-dropout must lie in [0, 1), got {config.actor_dropout}"),
        (config.actor_init_w >= 0 and config.critic_init_w >= 0,
         f"--actor-init-w and --critic-init-w must be 0 (default init) or positive, got {config.actor_init_w} and "
         f"{config.critic_init_w}"),
        (config.actor_lr > 0 and config.critic_lr > 0 and config.vae_lr > 0,
         f"--actor-lr, --critic-lr and --vae-lr must be positive, got {config.actor_lr}, {config.critic_lr} and "
         f"{config.vae_lr}"),
    ]
    for ok, message in checks:
        if not ok:  # a NaN fails too
            fail(message)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"SPOT needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions(reward_transform=config.reward_transform)
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py)
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_transform=config.reward_transform)

    run = Run("spot", config, dataset, device, normalizer)
    start = run.resume(agent, phase)
    fit_behaviour_vae(agent, sampler, config, run, phase)  # step 0: pi_beta's density model, fitted once, frozen
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
    return run.finish(result, {**phase.summary(), "behaviour_vae": agent.vae_report})


if __name__ == "__main__":
    run_cli(train, Config)
