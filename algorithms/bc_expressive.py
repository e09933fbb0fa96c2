"""Expressive behaviour cloning: fit a multimodal p(a|s) with a Gaussian mixture, per-dimension bins or a CVAE.

Lecture sections: "Behavior Cloning / Imitation Learning" (min_theta -E_(s,a)~D [log pi_theta(a|s)]) and
"What can go wrong in imitation learning? 2. Multimodal demonstration data", whose answer this file is:
"Use expressive distribution class to fit p(a|s) ... e.g. Gaussian mixture, Categorical, VAEs, diffusion
models" (the diffusion policy is `algorithms/diffusion_bc.py`). An l2 policy (bc.py) fits the mean of the
demonstrated actions; where the data takes two different actions, that mean is neither (see
`common/envs/fork.py`, where it drives into the obstacle both modes avoid).
Papers: Mandlekar et al. 2021, "What Matters in Learning from Offline Human Demonstrations for Robot
Manipulation" (robomimic: BC-GMM, BC-VAE); Brohan et al. 2022, "RT-1" (per-dimension action bins);
Kingma & Welling 2014 and Sohn et al. 2015 (the conditional VAE).

Usage:
    python algorithms/bc_expressive.py --env local/fork/expert-v0 --head gmm
    python algorithms/bc_expressive.py --env local/pendulum/expert-v0 --head discrete --num-bins 64
    python algorithms/bc_expressive.py --head vae --kl-weight 0.1

Heads (`--head`), each trained by maximum likelihood on (s, a) pairs, actions scaled to [-1, 1]:
  gmm       pi(a|s) = sum_k w_k(s) N(a; mu_k(s), diag sigma_k(s)^2), M = 5 modes, mu_k = tanh(.),
            sigma_k = softplus(.) + min_std (1e-4), as robomimic's GMMActorNetwork. Evaluation is robomimic's
            low-noise mode: draw a component k with probability w_k(s), return mu_k(s) (+ 1e-4 noise).
  discrete  each action dimension i independently: p(a_i|s) = softmax over K uniform bins on [-1, 1],
            cross-entropy on the bin holding a_i; act by drawing a bin per dimension (or `--decode argmax`)
            and returning its centre. Independence across dimensions cannot express correlated modes.
  vae       a conditional VAE: encoder q(z|s,a) = N(mu, sigma), decoder a = D(s, z), latent size 2|A| (as
            robomimic's 14 for 7-d actions), loss = mean squared reconstruction + kl_weight * KL (robomimic's
            reductions: KL summed over latent dimensions). At test time z ~ N(0, I) from the prior.

Random choices at evaluation (mixture component, bins, latent) are fresh at every step and come from a private
device generator, seeded with --seed when the agent is built and reseeded by `reset_sampling()` before every
evaluation: the same weights and seed give the same evaluation episodes, and act() leaves the training RNG
(and so resumed training) untouched. Evaluation samples (act()); a loaded policy (`common.checkpoint.load_policy`)
is the deterministic mode (`act_deterministic`: the most probable component's mean, each dimension's most
probable bin, the decoder at z = 0) unless loaded with `sample=True`, which replays the evaluation's draws.
Per-dataset settings (training length) live in `DATASET_SETTINGS`; robomimic trains with lr 1e-4 and
1024-1024 MLPs on robot demonstrations; here every head uses bc.py's 256-256 and 3e-4, so that the heads
and bc.py's l2 head differ only in the distribution class.

--compile compiles the whole update (common/optim.py); act() is not compiled (its draws use the private generator).
"""

from __future__ import annotations

import math
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
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, resolve_config, run_cli, setup  # noqa: E402


@dataclass
class Config:
    # --- shared by every algorithm (same names, order and meaning in every file) ---
    env: str = "local/pendulum/expert-v0"
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
    # --- expressive behaviour cloning ---
    head: Literal["gmm", "discrete", "vae"] = "gmm"
    """the distribution class of p(a|s): Gaussian mixture, per-dimension categorical bins, conditional VAE"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the policy MLP (and of the VAE's encoder and decoder each)"""
    lr: float = 3e-4
    """Adam learning rate"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3)"""
    num_modes: int = 5
    """gmm: M, the number of mixture components w_k, mu_k, sigma_k (robomimic: 5)"""
    min_std: float = 1e-4
    """gmm: sigma_k = softplus(.) + min_std (robomimic's config: 1e-4)"""
    low_noise_eval: bool = True
    """gmm: act with the drawn component's mean mu_k (scale 1e-4, robomimic's low_noise_eval); off: sample
    a ~ N(mu_k, sigma_k^2)"""
    num_bins: int = 64
    """discrete: K, uniform bins per action dimension on [-1, 1] (RT-1: 256 with far more data)"""
    decode: Literal["sample", "argmax"] = "sample"
    """discrete: draw each dimension's bin from p(bin|s), or take the most likely one; returns its centre"""
    latent_dim: int | None = None
    """vae: size of z (None: 2 |A|, robomimic's rule)"""
    kl_weight: float = 0.1
    """vae: beta in recon + beta KL(q(z|s,a) || N(0, I)). robomimic's BC-VAE default 1.0 lets the summed KL
    outweigh the mean-squared reconstruction and the decoder then ignores z (it becomes the l2 policy); its
    BCQ configs use 0.05 (proficient-human data) and 0.5 (mixed); 0.1 here"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. D4RL-scale sets: 1M steps as bc.py; the small local sets need far fewer.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("local/fork/*", {"max_steps": 10_000}),
    ("*", {"max_steps": 1_000_000}),
]

LOW_NOISE_STD = 1e-4  # robomimic's low_noise_eval: every component's scale is set to this at evaluation
VAE_LOG_STD_MIN, VAE_LOG_STD_MAX = -10.0, 2.0  # keeps the encoder's sigma in a sane range


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------
# The three distribution classes; each maps actions scaled to [-1, 1]
# ---------------------------------------------------------------------------------------------------


def gmm_log_prob(logits: torch.Tensor, means: torch.Tensor, scales: torch.Tensor,
                 actions: torch.Tensor) -> torch.Tensor:
    """log sum_k w_k N(a; mu_k, diag sigma_k^2) with w = softmax(logits): logits (B, M), means and scales
    (B, M, A), actions (B, A) -> (B,)."""
    z = (actions.unsqueeze(1) - means) / scales
    # log N(a; mu_k, diag sigma_k^2) = sum_i [ -(a_i - mu_ki)^2 / (2 sigma_ki^2) - log sigma_ki - log(2 pi) / 2 ]
    component = (-0.5 * z.square() - scales.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    return torch.logsumexp(F.log_softmax(logits, dim=-1) + component, dim=-1)


def bin_centres(num_bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The centres -1 + (2j + 1) / K, j = 0..K-1, of K equal bins covering [-1, 1]."""
    return -1.0 + (2.0 * torch.arange(num_bins, device=device) + 1.0) / num_bins


def bin_index(actions: torch.Tensor, num_bins: int) -> torch.Tensor:
    """The bin j holding each action component a in [-1, 1]: floor((a + 1) / 2 * K), with a = 1 in the last."""
    return ((actions + 1.0) * (0.5 * num_bins)).floor().long().clamp(0, num_bins - 1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from the categorical `probs` (..., n) by the uniform `u` (...,): the first j whose
    cumulative probability exceeds u."""
    below = (probs.cumsum(-1) <= u.unsqueeze(-1)).sum(-1)
    return below.clamp(max=probs.shape[-1] - 1)


class GaussianMixturePolicy(nn.Module):
    """robomimic's GMM head: one MLP gives M logits, M means (tanh) and M scales (softplus + min_std)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num_modes: int, min_std: float):
        super().__init__()
        self.act_dim, self.num_modes, self.min_std = act_dim, num_modes, min_std
        self.net = mlp(obs_dim, hidden_dims, num_modes * (1 + 2 * act_dim))

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(obs)
        m, a = self.num_modes, self.act_dim
        logits = out[:, :m]
        means = torch.tanh(out[:, m:m + m * a]).view(-1, m, a)
        scales = (F.softplus(out[:, m + m * a:]) + self.min_std).view(-1, m, a)
        return logits, means, scales


class BinnedPolicy(nn.Module):
    """Per-dimension categorical head: logits (B, A, K) over K uniform bins for each action dimension."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], num_bins: int):
        super().__init__()
        self.act_dim, self.num_bins = act_dim, num_bins
        self.net = mlp(obs_dim, hidden_dims, act_dim * num_bins)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).view(-1, self.act_dim, self.num_bins)


class ConditionalVAE(nn.Module):
    """Encoder q(z|s,a) = N(mu, diag sigma^2) and decoder a = tanh(D(s, z)); prior p(z) = N(0, I)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = mlp(obs_dim + act_dim, hidden_dims, 2 * latent_dim)
        self.decoder = mlp(obs_dim + latent_dim, hidden_dims, act_dim)

    def encode(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).chunk(2, -1)
        return mean, log_std.clamp(VAE_LOG_STD_MIN, VAE_LOG_STD_MAX)

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))


class Agent:
    """The chosen head, its optimiser, the maximum-likelihood update, the sampling act() (evaluation) and the
    deterministic act_deterministic() (`common.checkpoint.load_policy`'s default)."""

    SAMPLES_ACTIONS = True  # act() draws from pi(a|s): load_policy returns act_deterministic unless sample=True

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("bc_expressive.py is for continuous (Box) actions; for discrete actions bc.py's categorical head "
                 "already fits any p(a|s)")
        check_config(config)
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.latent_dim = config.latent_dim or 2 * spec.act_dim
        if config.head == "gmm":
            self.policy = GaussianMixturePolicy(spec.obs_dim, spec.act_dim, config.hidden_dims, config.num_modes,
                                                config.min_std)
        elif config.head == "discrete":
            self.policy = BinnedPolicy(spec.obs_dim, spec.act_dim, config.hidden_dims, config.num_bins)
        elif config.head == "vae":
            self.policy = ConditionalVAE(spec.obs_dim, spec.act_dim, config.hidden_dims, self.latent_dim)
        else:
            fail(f"unknown --head '{config.head}' (gmm, discrete or vae)")
        self.policy.to(device)
        self.centres = bin_centres(config.num_bins, device)
        self.params = list(self.policy.parameters())
        self.optimizer = adam(self.params, config.lr, config)
        # act() draws from this private generator (see the docstring), never from the training RNG
        self.act_generator = torch.Generator(device=device)
        self.reset_sampling()
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        a = (actions / self.max_action).clamp(-1.0, 1.0)  # every head models actions scaled to [-1, 1]
        head = self.config.head
        if head == "gmm":
            logits, means, scales = self.policy(obs)
            # min_theta -E_(s,a)~D [ log sum_k w_k(s) N(a; mu_k(s), diag sigma_k(s)^2) ]
            #   (lecture: "Use expressive distribution class to fit p(a|s)": Gaussian mixture)
            loss = -gmm_log_prob(logits, means, scales, a).mean()
            logs = {"train/nll": loss.detach()}
        elif head == "discrete":
            logits = self.policy(obs)  # (B, A, K)
            target = bin_index(a, self.config.num_bins)
            # min_theta -E_(s,a)~D [ sum_i log p_theta(bin(a_i) | s) ]   (cross-entropy per action dimension;
            #   lecture: "Use expressive distribution class to fit p(a|s)": Categorical)
            loss = F.cross_entropy(logits.reshape(-1, self.config.num_bins), target.reshape(-1),
                                   reduction="sum") / obs.shape[0]
            logs = {"train/nll": loss.detach()}
        else:
            mean, log_std = self.policy.encode(obs, a)
            z = mean + log_std.exp() * torch.randn_like(mean)  # reparameterised z ~ q(z|s,a)
            recon = self.policy.decode(obs, z)
            recon_loss = F.mse_loss(recon, a)  # the mean over batch and action dimensions (robomimic)
            # KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum_j ( mu_j^2 + sigma_j^2 - 1 - log sigma_j^2 ), batch mean
            kl = 0.5 * (mean.square() + (2 * log_std).exp() - 1.0 - 2 * log_std).sum(-1).mean()
            # min_theta E_(s,a)~D [ ||a - D(s, z)||^2 + beta KL(q(z|s,a) || p(z)) ], z ~ q(z|s,a)
            #   (lecture: "Use expressive distribution class to fit p(a|s)": VAEs)
            loss = recon_loss + self.config.kl_weight * kl
            logs = {"train/recon_loss": recon_loss.detach(), "train/kl": kl.detach()}
        logs = {"train/policy_loss": loss.detach(), **logs}  # taken before the backward, which consumes the graph
        loss.backward(inputs=self.params)
        self.optimizer.step()
        return logs

    def reset_sampling(self) -> None:
        """Reseed act()'s generator with --seed: the evaluation that follows is reproducible."""
        self.act_generator.manual_seed(self.config.seed)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """a ~ pi(a|s), the random draws taken from the private generator."""
        batch, act_dim = obs.shape[0], self.spec.act_dim
        g = self.act_generator
        head = self.config.head
        if head == "gmm":
            logits, means, scales = self.policy(obs)
            u = torch.rand(batch, device=obs.device, generator=g)
            noise = torch.randn(batch, act_dim, device=obs.device, generator=g)
            k = inverse_cdf(logits.softmax(-1), u)  # component k with probability w_k(s)
            chosen = means[torch.arange(batch, device=obs.device), k]
            scale = LOW_NOISE_STD if self.config.low_noise_eval else scales[torch.arange(batch, device=obs.device), k]
            action = chosen + scale * noise
        elif head == "discrete":
            logits = self.policy(obs)
            if self.config.decode == "argmax":
                index = logits.argmax(-1)
            else:
                index = inverse_cdf(logits.softmax(-1), torch.rand(batch, act_dim, device=obs.device, generator=g))
            action = self.centres[index]
        else:
            z = torch.randn(batch, self.latent_dim, device=obs.device, generator=g)  # z ~ p(z) = N(0, I)
            action = self.policy.decode(obs, z)
        return self.max_action * action.clamp(-1.0, 1.0)

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The head's deterministic mode, no random draw: gmm, the mean mu_k(s) of the most probable component
        (largest w_k(s)); discrete, the centre of each dimension's most probable bin; vae, the decoder at the
        prior's mean and mode, D(s, z = 0)."""
        head = self.config.head
        if head == "gmm":
            logits, means, _ = self.policy(obs)
            action = means[torch.arange(obs.shape[0], device=obs.device), logits.argmax(-1)]
        elif head == "discrete":
            action = self.centres[self.policy(obs).argmax(-1)]
        else:
            action = self.policy.decode(obs, torch.zeros(obs.shape[0], self.latent_dim, device=obs.device))
        return self.max_action * action.clamp(-1.0, 1.0)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        load_optimizer(self.optimizer, state["optimizer"])


def check_config(config: Config) -> None:
    """One clear line for head settings that cannot work (before any data is read or folder made)."""
    if config.num_modes < 1:
        fail(f"--num-modes must be at least 1 (the mixture's components), got {config.num_modes}")
    if config.min_std <= 0:
        fail(f"--min-std must be positive (the mixture's smallest scale), got {config.min_std}")
    if config.num_bins < 2:
        fail(f"--num-bins must be at least 2 (bins per action dimension), got {config.num_bins}")
    if config.latent_dim is not None and config.latent_dim < 1:
        fail(f"--latent-dim must be at least 1 (or left unset for 2 |A|), got {config.latent_dim}")
    if config.kl_weight < 0:
        fail(f"--kl-weight must be >= 0, got {config.kl_weight}")
    if config.lr <= 0:
        fail(f"--lr must be positive, got {config.lr}")


def train(config: Config) -> dict:
    check_config(config)  # this file's settings, before anything is printed, read or written
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"bc_expressive.py is for continuous actions; '{config.env}' has discrete actions (use bc.py)")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    sampler = TensorSampler({"obs": obs, "actions": data["actions"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("bc_expressive", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    envs = make_eval_envs(dataset, config.eval_episodes)
    for step in run.steps(start):
        logs = agent.update(sampler.sample(config.batch_size))
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                agent.reset_sampling()
                run.log_eval(step, evaluate(agent.act, dataset, normalizer, config.eval_episodes,
                                            config.seed, device, envs, video=run.video_for(step)))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, sampler)
    agent.reset_sampling()
    result = evaluate(agent.act, dataset, normalizer, config.eval_episodes, config.seed, device, envs,
                      video=run.video_for(run.total_steps))
    run.log_eval(config.max_steps, result)
    envs.close()
    return run.finish(result)


if __name__ == "__main__":
    run_cli(train, Config)
