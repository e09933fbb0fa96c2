"""BEAR-QL: Q-learning whose policy stays in the support of the data through a sampled-MMD constraint.

Lecture sections: "Bootstrapping Error Accumulation Reduction (BEAR)" (support instead of distribution
matching), "BEAR - Support Constraint" (max_phi Q(s, pi_phi(s)) s.t. MMD(pi_phi, pi_beta) small, estimated
from samples), "Dual Gradient Descent" (the Lagrange multiplier alpha), and "BEAR-Algorithm" (Algorithm 1,
BEAR Q-Learning, whose steps `Agent.update` follows in order).
Paper: Kumar, Fu, Tucker & Levine 2019, "Stabilizing Off-Policy Q-Learning via Bootstrapping Error
Reduction"; reference code github.com/aviralkumar2907/BEAR (`algos.py`), whose details are followed here.

Usage:
    python algorithms/bear.py                                 # embedded default: local pendulum data
    python algorithms/bear.py --env hopper-medium-v2

Pieces and conventions (each a `Config` field):
  * Q-ensemble of K critics (one batched matmul); target
    y = r + gamma (1 - d) max_{i=1..p} [ lambda min_j Q'_j(s', a_i) + (1 - lambda) max_j Q'_j(s', a_i) ],
    a_i ~ pi_phi'(.|s'), p = 10 samples, lambda = 0.75.
  * behaviour model pi_beta-hat: a conditional VAE (BCQ's: 750-unit layers, latent 2|A|, log-std clamped to
    [-4, 15], prior samples clamped to [-0.5, 0.5] when decoding), trained first in every step, as the
    reference code does (it is not a line of the algorithm box).
  * the constraint: sampled MMD between n = 5 actor samples and n = 5 VAE samples per state, computed on
    the raw (pre-tanh) actions as the reference does, with the biased estimator (all n^2 pairs, diagonal
    i = i' included): MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y), and the constrained value is
    MMD = sqrt(MMD^2 + 1e-6). The actor's samples for the MMD and the Q term use Gaussian noise clamped to
    [-0.5, 0.5] (the reference's "trick"); the target actor's samples are not clamped.
  * KERNELS AND SIGMA: the reference code divides by 2 sigma, NOT 2 sigma^2, and so does this file:
        laplacian  k(x, y) = exp( -||x - y||_1   / (2 sigma) ),  sigma = 10 (reference: hopper, halfcheetah)
        gaussian   k(x, y) = exp( -||x - y||_2^2 / (2 sigma) ),  sigma = 20 (reference: walker2d, ant)
    so "gaussian, sigma 20" is a Gaussian kernel of bandwidth sqrt(20) ~ 4.5 in the usual convention.
  * dual gradient descent on log alpha with threshold epsilon = 0.05, log alpha clamped to [-5, 10];
    during the first `warmup_steps` the actor minimises alpha * MMD only (support matching, a BC warm start).
    Beware: with the diagonal terms, the estimate's mean is at least (1/n)(1 - E k(y, y')), even for a
    policy equal to the behaviour; on data with widely spread actions sqrt(floor) can exceed 0.05, the
    constraint is never met, alpha climbs to e^10 and the actor clones the behaviour (the tests raise
    epsilon to 0.2 on a 75%-uniform-random pendulum set; see tests/test_bear.py).
  * the actor maximises E_{a~pi} [ min_j Q_j(s, a) ] as Equation (1) writes it (min inside the mean over the
    n samples); the reference code takes min_j of the sample mean. No ensemble-variance term (the
    reference's default, use_ensemble_variance=False), no entropy term.
Evaluation uses the mean action max_action * tanh(mu(s)) (deterministic, as `act` must be); the reference
instead picks the best of 10 sampled actions by Q_1.
Per-dataset settings (kernel, sigma, warm-up length, training length) live in `DATASET_SETTINGS` below;
flags override them.

--compile compiles the whole update (common/optim.py); the warm-up phase is a second graph.
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
import torch.nn.functional as F

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.networks import CriticEnsemble  # noqa: E402
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
    """minibatch size (256 as CORL and d3rlpy; BEAR's own code samples 100)"""
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
    # --- BEAR ---
    kernel: Literal["laplacian", "gaussian"] | None = None
    """MMD kernel k (None: from DATASET_SETTINGS). The reference's convention, dividing by 2 sigma:
    laplacian exp(-||x - y||_1 / (2 sigma)), gaussian exp(-||x - y||_2^2 / (2 sigma))"""
    mmd_sigma: float | None = None
    """sigma of the MMD kernel, in the reference's convention above (None: from DATASET_SETTINGS;
    laplacian 10, gaussian 20)"""
    mmd_threshold: float = 0.05
    """epsilon in the constraint E_s [ MMD(D(s), pi(.|s)) ] <= epsilon (the reference's thresh)"""
    num_mmd_samples: int = 5
    """n (= m): actions sampled from pi_phi and from the behaviour model per state for the MMD"""
    num_target_samples: int = 10
    """p: actions a_i ~ pi_phi'(.|s') over which the target takes its maximum"""
    target_lambda: float = 0.75
    """lambda in y = max_i [ lambda min_j Q'_j(s', a_i) + (1 - lambda) max_j Q'_j(s', a_i) ]"""
    num_critics: int = 2
    """K, the size of the Q-ensemble {Q_theta_i} (the reference code uses 2)"""
    warmup_steps: int | None = None
    """steps during which the actor minimises alpha * MMD only (None: from DATASET_SETTINGS)"""
    gamma: float = 0.99
    """gamma, the discount in r + gamma y(s, a)"""
    tau: float = 0.005
    """tau in theta'_i <- tau theta_i + (1 - tau) theta'_i and phi' <- tau phi + (1 - tau) phi'"""
    actor_lr: float = 1e-4
    """Adam learning rate of the actor pi_phi (d3rlpy's 1e-4; the reference uses Adam's default 1e-3)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the Q-ensemble (d3rlpy's 3e-4; the reference uses Adam's default 1e-3)"""
    vae_lr: float = 3e-4
    """Adam learning rate of the behaviour model, a conditional VAE (d3rlpy's imitator lr 3e-4; the reference
    uses Adam's default 1e-3)"""
    lagrange_lr: float = 1e-3
    """Adam learning rate of log alpha, the Lagrange multiplier's log (the reference's 1e-3)"""
    initial_log_alpha: float = 0.0
    """log alpha at the start (the reference draws it from N(0, 1))"""
    log_alpha_min: float = -5.0
    """lower clamp of log alpha (the reference's -5)"""
    log_alpha_max: float = 10.0
    """upper clamp of log alpha (the reference's lagrange_thresh = 10)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor and of each critic (the reference: 400, 300)"""
    vae_hidden_dims: tuple[int, ...] = (750, 750)
    """hidden layer sizes of the VAE's encoder and decoder (BCQ's and BEAR's 750, 750)"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3); the reference does not"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. Kernels follow the reference README (laplacian/10 for hopper and halfcheetah,
# gaussian/20 for walker2d and ant; laplacian/10 is its general recommendation). ~40k BC warm-up steps
# on D4RL (d3rlpy's 40k); the small local and test datasets need a short warm-up and few steps.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 30_000, "warmup_steps": 2_000, "kernel": "laplacian", "mmd_sigma": 10.0}),
    ("test/*", {"max_steps": 5_000, "warmup_steps": 500, "kernel": "laplacian", "mmd_sigma": 10.0}),
    ("*walker2d*", {"max_steps": 1_000_000, "warmup_steps": 40_000, "kernel": "gaussian", "mmd_sigma": 20.0}),
    ("ant-*", {"max_steps": 1_000_000, "warmup_steps": 40_000, "kernel": "gaussian", "mmd_sigma": 20.0}),
    ("mujoco/ant/*", {"max_steps": 1_000_000, "warmup_steps": 40_000, "kernel": "gaussian", "mmd_sigma": 20.0}),
    ("local/ant/*", {"max_steps": 1_000_000, "warmup_steps": 40_000, "kernel": "gaussian", "mmd_sigma": 20.0}),
    ("*", {"max_steps": 1_000_000, "warmup_steps": 40_000, "kernel": "laplacian", "mmd_sigma": 10.0}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps the actor's Gaussian in a sane range (the reference leaves it free)
VAE_LOG_STD_MIN, VAE_LOG_STD_MAX = -4.0, 15.0  # the VAE encoder's log-std clamp (BCQ / BEAR reference)
VAE_LATENT_CLIP = 0.5  # prior samples z ~ N(0, 1) clamped to [-0.5, 0.5] when decoding (BCQ / BEAR reference)
ACTOR_NOISE_CLIP = 0.5  # actor samples for the MMD and the Q term: N(0, 1) noise clamped (BEAR reference)
MMD_EPS = 1e-6  # MMD = sqrt(MMD^2 + 1e-6) (reference), keeps the square root differentiable at 0


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def mmd_squared(x: torch.Tensor, y: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    """Biased sampled MMD^2 per state between samples x (B, n, A) and y (B, m, A): shape (B,).

    MMD^2 = 1/n^2 sum_{i,i'} k(x_i, x_i') - 2/(nm) sum_{i,j} k(x_i, y_j) + 1/m^2 sum_{j,j'} k(y_j, y_j')
    (lecture: "Parenthesis: Maximum Mean Discrepancy"), all pairs including the diagonal i = i', j = j'
    (the V-statistic, as the reference code), with the reference's kernels that divide by 2 sigma:
    laplacian exp(-||x - y||_1 / (2 sigma)), gaussian exp(-||x - y||_2^2 / (2 sigma)).
    """
    def mean_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a.unsqueeze(2) - b.unsqueeze(1)  # (B, n, m, A)
        dist = diff.abs().sum(-1) if kernel == "laplacian" else diff.pow(2).sum(-1)
        return torch.exp(-dist / (2.0 * sigma)).mean(dim=(1, 2))

    return mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y)


def soft_clipped_target(next_q: torch.Tensor, target_lambda: float) -> torch.Tensor:
    """y(s, a) = max_i [ lambda min_j Q'_j(s', a_i) + (1 - lambda) max_j Q'_j(s', a_i) ].

    `next_q`: target critics' values (K, B, p) for p sampled actions a_i per next state; returns (B,).
    """
    mixed = target_lambda * next_q.min(0).values + (1.0 - target_lambda) * next_q.max(0).values  # (B, p)
    return mixed.max(-1).values


class TanhGaussianActor(nn.Module):
    """pi_phi(a|s): a = max_action * tanh(z), z ~ N(mu_phi(s), sigma_phi(s)^2) (the reference's RegularActor)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 2 * act_dim)
        self.max_action = max_action

    def _mean_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()

    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """One action per state with unclamped N(0, 1) noise (used by the target actor): (B, A)."""
        mean, std = self._mean_std(obs)
        return self.max_action * torch.tanh(mean + std * torch.randn_like(mean))

    def sample_multiple(self, obs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n actions per state with noise clamped to [-0.5, 0.5]: (actions, raw pre-tanh z), each (B, n, A)."""
        mean, std = self._mean_std(obs)
        noise = torch.randn(mean.shape[0], n, mean.shape[1], device=mean.device).clamp(-ACTOR_NOISE_CLIP,
                                                                                       ACTOR_NOISE_CLIP)
        raw = mean.unsqueeze(1) + std.unsqueeze(1) * noise
        return self.max_action * torch.tanh(raw), raw

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self._mean_std(obs)
        return self.max_action * torch.tanh(mean)


class BehaviorVAE(nn.Module):
    """Conditional VAE pi_beta-hat(a|s): encoder q(z|s, a), decoder a = max_action * tanh(D(s, z))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.latent_dim = 2 * act_dim  # latent size 2|A| (BCQ / BEAR)
        self.encoder = mlp(obs_dim + act_dim, hidden_dims, 2 * self.latent_dim)
        self.decoder = mlp(obs_dim + self.latent_dim, hidden_dims, act_dim)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        """Reconstruction of `actions` through a posterior sample z ~ q(z|s, a), and q's mean and std."""
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).chunk(2, dim=-1)
        std = log_std.clamp(VAE_LOG_STD_MIN, VAE_LOG_STD_MAX).exp()
        z = mean + std * torch.randn_like(std)
        return self.max_action * torch.tanh(self.decoder(torch.cat([obs, z], -1))), mean, std

    def decode_multiple(self, obs: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples a_j ~ pi_beta-hat(.|s) with z ~ N(0, 1) clamped to [-0.5, 0.5]: (actions, raw), (B, n, A)."""
        z = torch.randn(obs.shape[0], n, self.latent_dim, device=obs.device).clamp(-VAE_LATENT_CLIP,
                                                                                    VAE_LATENT_CLIP)
        raw = self.decoder(torch.cat([obs.unsqueeze(1).expand(-1, n, -1), z], -1))
        return self.max_action * torch.tanh(raw), raw


class Agent:
    """Q-ensemble, actor, their targets, the behaviour VAE, the Lagrange multiplier and the BEAR-QL update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("BEAR needs continuous (Box) actions; this dataset has discrete actions")
        self.config, self.spec, self.device = config, spec, device
        self.kernel = _per_dataset(config, "kernel")
        self.mmd_sigma = float(_per_dataset(config, "mmd_sigma"))
        self.warmup_steps = int(_per_dataset(config, "warmup_steps"))
        if self.kernel not in ("laplacian", "gaussian"):
            fail(f"--kernel must be laplacian or gaussian, got {self.kernel!r}")
        # 1: initialise the Q-ensemble, the actor, the Lagrange multiplier and the target networks
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims, config.num_critics).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.behavior_vae = BehaviorVAE(spec.obs_dim, spec.act_dim, config.vae_hidden_dims,
                                        spec.max_action).to(device)
        self.lagrange_log_alpha = torch.tensor(float(config.initial_log_alpha), device=device, requires_grad=True)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.vae_optimizer = adam(self.behavior_vae.parameters(), config.vae_lr, config)
        self.actor_and_lagrange = [*self.actor.parameters(), self.lagrange_log_alpha]  # what one backward trains
        self.lagrange_optimizer = adam([self.lagrange_log_alpha], config.lagrange_lr, config)
        self.total_it = 0  # python int: the warm-up switch needs no device sync
        # zero_grad of the four optimisers, then _update_impl (torch.compile'd whole under --compile); each loss
        # reaches only its own optimiser's parameters, so one reset before all equals one before each
        self._update = update_step(self._update_impl, config, self.vae_optimizer, self.critic_optimizer,
                                   self.actor_optimizer, self.lagrange_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.total_it += 1
        warmup = self.total_it <= self.warmup_steps  # a Python bool: compiled as two graphs, warm-up and main
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"], warmup)

    def _update_impl(self, obs, actions, rewards, next_obs, terminals, warmup: bool) -> dict[str, torch.Tensor]:
        c = self.config
        batch, n, p = obs.shape[0], c.num_mmd_samples, c.num_target_samples

        # Behaviour model pi_beta-hat (the reference trains it first each step): VAE loss
        # L = ||a - D(s, z)||^2 + 1/2 KL( q(z|s, a) || N(0, 1) )
        recon, mean, std = self.behavior_vae(obs, actions)
        kl = -0.5 * (1.0 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
        vae_loss = F.mse_loss(recon, actions) + 0.5 * kl
        # logged values are taken before each backward (which consumes the graph they hang on)
        logs = {"train/vae_loss": vae_loss.detach()}
        vae_loss.backward()
        self.vae_optimizer.step()

        # 4-7: Q-update   (lecture: "BEAR-Algorithm")
        with torch.no_grad():
            # 5: sample p actions {a_i ~ pi_phi'(.|s')}
            next_obs_rep = next_obs.repeat_interleave(p, dim=0)  # (B p, obs_dim), p copies of each s'
            next_q = self.critic_target(next_obs_rep, self.actor_target.sample(next_obs_rep)).view(-1, batch, p)
            # 6: y(s, a) := max_{a_i} [ lambda min_j Q_theta'_j(s', a_i) + (1 - lambda) max_j Q_theta'_j(s', a_i) ]
            y = rewards + c.gamma * (1.0 - terminals) * soft_clipped_target(next_q, c.target_lambda)
        q = self.critic(obs, actions)  # (K, B)
        # 7: for all i, theta_i <- argmin (Q_theta_i(s, a) - (r + gamma y(s, a)))^2   (summed over the ensemble)
        critic_loss = ((q - y) ** 2).mean(1).sum()
        logs.update({"train/critic_loss": critic_loss.detach(), "train/q_data": q.detach().min(0).values.mean()})
        critic_loss.backward()
        self.critic_optimizer.step()

        # 8-10: policy update
        # 9: sample {a^_i ~ pi_phi(.|s)}_{i=1..n} and {a_j ~ D(s)}_{j=1..n} (from the behaviour model)
        with torch.no_grad():
            _, behavior_raw = self.behavior_vae.decode_multiple(obs, n)
        actor_actions, actor_raw = self.actor.sample_multiple(obs, n)
        # MMD(D(s), pi(.|s)) on raw (pre-tanh) actions, as the reference (no vanishing gradient at saturation)
        mmd = (mmd_squared(behavior_raw, actor_raw, self.kernel, self.mmd_sigma) + MMD_EPS).sqrt()  # (B,)
        q_pi = self.critic(obs.repeat_interleave(n, dim=0), actor_actions.reshape(batch * n, -1),
                           detach_weights=True).view(-1, batch, n)
        # E_{a ~ pi(.|s)} [ min_{j=1..K} Q_j(s, a) ], the objective of Equation (1)
        q_term = q_pi.min(0).values.mean(-1)  # (B,)
        alpha = self.lagrange_log_alpha.detach().exp()
        # 10: minimise the Lagrangian of Eq. (1) in phi:  E_s [ -E_a min_j Q_j(s, a) + alpha MMD(D(s), pi(.|s)) ]
        # (warm-up: the support-matching term alone, as the reference's first epochs)
        actor_loss = (alpha * mmd).mean() if warmup else (-q_term + alpha * mmd).mean()
        # 10: ... and take a dual gradient step in alpha: alpha <- alpha + beta d/d alpha of the Lagrangian,
        # i.e. minimise -alpha (MMD - epsilon) over log alpha (alpha grows while the constraint is violated)
        lagrange_loss = -(self.lagrange_log_alpha.exp() * (mmd.detach() - c.mmd_threshold)).mean()
        logs.update({"train/actor_loss": actor_loss.detach(), "train/mmd": mmd.detach().mean(),
                     "train/lagrange_alpha": alpha, "train/q_policy": q_term.detach().mean()})
        # the two losses touch disjoint parameters (alpha enters the actor's detached): one backward serves both;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log alpha when the step is recompiled)
        (actor_loss + lagrange_loss).backward(inputs=self.actor_and_lagrange)
        self.actor_optimizer.step()
        self.lagrange_optimizer.step()
        with torch.no_grad():
            self.lagrange_log_alpha.clamp_(c.log_alpha_min, c.log_alpha_max)

        # 11: target networks: theta'_i <- tau theta_i + (1 - tau) theta'_i ;  phi' <- tau phi + (1 - tau) phi'
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), c.tau)
            torch._foreach_lerp_(list(self.actor_target.parameters()), list(self.actor.parameters()), c.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: the mean max_action * tanh(mu_phi(s))."""
        return self.actor.deterministic(obs)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_j Q_theta_j(s, a), shape (batch,): the estimate the policy objective (Eq. 1) maximises."""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
                "behavior_vae": self.behavior_vae.state_dict(),
                "lagrange_log_alpha": self.lagrange_log_alpha.detach().clone(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "vae_optimizer": self.vae_optimizer.state_dict(),
                "lagrange_optimizer": self.lagrange_optimizer.state_dict(), "total_it": self.total_it}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor.load_state_dict(state["actor"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.behavior_vae.load_state_dict(state["behavior_vae"])
        with torch.no_grad():
            self.lagrange_log_alpha.copy_(state["lagrange_log_alpha"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.vae_optimizer, state["vae_optimizer"])
        load_optimizer(self.lagrange_optimizer, state["lagrange_optimizer"])
        self.total_it = int(state["total_it"])


def _per_dataset(config: Config, name: str):
    """A per-dataset field's value; the catch-all row's (D4RL) value where nothing filled it (e.g. the bench)."""
    value = getattr(config, name)
    return DATASET_SETTINGS[-1][1][name] if value is None else value


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"BEAR needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    # 3: mini-batches of transitions (s, a, r, s') ~ D, drawn on the device
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("bear", config, dataset, device, normalizer)
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
