"""Batch-Constrained deep Q-learning (BCQ), continuous actions: Q-learning over actions the data supports.

Lecture sections: "BCQ with Function Approximation – Continuous Case", "BCQ – Sampling from the Behaviour
Policy" (a conditional VAE G_omega samples actions like the data's), "BCQ – Perturbation Model" (xi_phi
nudges each sampled action within [-Phi, Phi]), "BCQ – Soft Clipped Double Q-Learning" (the target) and
"Continuous BCQ–Algorithm" (Algorithm 1, whose order `Agent._update_impl` follows).
Paper: Fujimoto, Meger, Precup 2019, "Off-Policy Deep Reinforcement Learning without Exploration" (ICML).

Usage:
    python algorithms/bcq.py                                  # embedded default: local pendulum data
    python algorithms/bcq.py --env hopper-medium-v2

The paper uses one set of hyperparameters for every task (Phi = 0.05, lambda = 0.75, n = 10, Adam 1e-3,
tau = 0.005, batch 100); only the training length is per dataset, in `DATASET_SETTINGS` below. Batch size
is the library's 256. The decode-time latent clip (`--latent-clip`, 0.5 in the reference code) can be too
narrow on some data (NeoRL issue #9): widen it there.

--compile compiles the whole update, latents drawn on the device inside (common/optim.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

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
    """minibatch size (256 as CORL and the other files; the authors' BCQ code uses 100)"""
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
    # --- BCQ ---
    gamma: float = 0.99
    """discount gamma in the target y = r + gamma * max_a' Q_theta'(s', a')"""
    tau: float = 0.005
    """target network update rate tau: theta' <- tau * theta + (1 - tau) * theta' (also phi')"""
    max_perturbation: float = 0.05
    """max perturbation Phi, as a fraction of max_action: xi_phi(s, a, Phi) in [-Phi, Phi] * max_action"""
    num_sampled_actions: int = 10
    """n, actions sampled from G_omega per state, for the target and when acting (reference acts with 100)"""
    min_weight: float = 0.75
    """minimum weighting lambda in y = lambda * min_i Q_theta'_i + (1 - lambda) * max_i Q_theta'_i"""
    latent_dim: int | None = None
    """size of the VAE latent z (None: 2 * |A|, as in the paper)"""
    latent_clip: float = 0.5
    """decode-time clip of the prior sample z ~ N(0, I) to [-c, c] (reference 0.5; too narrow on some data)"""
    kl_weight: float = 0.5
    """weight of D_KL(N(mu, sigma) || N(0, 1)) in the VAE loss (reference code: 0.5)"""
    vae_hidden_dims: tuple[int, ...] = (750, 750)
    """hidden layer sizes of the VAE encoder E_omega1 and decoder D_omega2"""
    actor_hidden_dims: tuple[int, ...] = (400, 300)
    """hidden layer sizes of the perturbation model xi_phi"""
    critic_hidden_dims: tuple[int, ...] = (400, 300)
    """hidden layer sizes of each critic Q_theta1, Q_theta2"""
    actor_lr: float = 1e-3
    """Adam learning rate of the perturbation model xi_phi (paper: 1e-3)"""
    critic_lr: float = 1e-3
    """Adam learning rate of the twin critics Q_theta (paper: 1e-3)"""
    vae_lr: float = 1e-3
    """Adam learning rate of the VAE G_omega (paper: 1e-3)"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (the reference code does not)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The paper trains 300k (Mujoco buffers) and the reference code 1M steps.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 1_000_000}),
]

NUM_CRITICS = 2  # the twin critics Q_theta1, Q_theta2 of clipped double Q-learning
LOG_STD_MIN, LOG_STD_MAX = -4.0, 15.0  # the reference VAE clamps the encoder's log-std to this range


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Perturbation(nn.Module):
    """xi_phi(s, a, Phi) in [-Phi, Phi] * max_action; forward gives a + xi, clipped to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float,
                 max_perturbation: float):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, hidden_dims, act_dim)
        self.max_action, self.max_perturbation = max_action, max_perturbation

    def xi(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return self.max_perturbation * self.max_action * torch.tanh(self.net(torch.cat([obs, actions], -1)))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return (actions + self.xi(obs, actions)).clamp(-self.max_action, self.max_action)


class BehaviourVAE(nn.Module):
    """Conditional VAE G_omega = {E_omega1, D_omega2} of the behaviour policy pi_beta(a|s)."""

    def __init__(self, obs_dim: int, act_dim: int, latent_dim: int, hidden_dims: tuple[int, ...],
                 max_action: float, latent_clip: float):
        super().__init__()
        self.encoder = mlp(obs_dim + act_dim, hidden_dims[:-1], hidden_dims[-1])
        self.mean = nn.Linear(hidden_dims[-1], latent_dim)
        self.log_std = nn.Linear(hidden_dims[-1], latent_dim)
        self.decoder = mlp(obs_dim + latent_dim, hidden_dims, act_dim)
        self.latent_dim, self.max_action, self.latent_clip = latent_dim, max_action, latent_clip

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        """a~ = D(s, z), z ~ N(mu, sigma) with (mu, sigma) = E(s, a); returns (a~, mu, sigma)."""
        hidden = F.relu(self.encoder(torch.cat([obs, actions], -1)))
        mean = self.mean(hidden)
        std = self.log_std(hidden).clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        z = mean + std * torch.randn_like(std)
        return self.decode(obs, z), mean, std

    def decode(self, obs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """a = max_action * tanh(D(s, z)); without z, z ~ N(0, I) clipped to [-latent_clip, latent_clip]."""
        if z is None:
            z = torch.randn(obs.shape[0], self.latent_dim, device=obs.device)
            z = z.clamp(-self.latent_clip, self.latent_clip)
        return self.max_action * torch.tanh(self.decoder(torch.cat([obs, z], -1)))


class Agent:
    """BCQ's VAE, perturbation model and twin critics (with targets), their optimisers and the update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("bcq.py is for continuous actions; for a discrete dataset use algorithms/bcq_discrete.py")
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.latent_dim = config.latent_dim or 2 * spec.act_dim
        obs_dim, act_dim = spec.obs_dim, spec.act_dim
        self.vae = BehaviourVAE(obs_dim, act_dim, self.latent_dim, config.vae_hidden_dims, self.max_action,
                                config.latent_clip).to(device)
        self.perturbation = Perturbation(obs_dim, act_dim, config.actor_hidden_dims, self.max_action,
                                         config.max_perturbation).to(device)
        self.critic = CriticEnsemble(obs_dim, act_dim, config.critic_hidden_dims, NUM_CRITICS).to(device)
        self.perturbation_target = Perturbation(obs_dim, act_dim, config.actor_hidden_dims, self.max_action,
                                                config.max_perturbation).to(device)
        self.critic_target = CriticEnsemble(obs_dim, act_dim, config.critic_hidden_dims, NUM_CRITICS).to(device)
        self.perturbation_target.load_state_dict(self.perturbation.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        for p in [*self.perturbation_target.parameters(), *self.critic_target.parameters()]:
            p.requires_grad_(False)
        self.vae_optimizer = adam(self.vae.parameters(), config.vae_lr, config)
        self.actor_optimizer = adam(self.perturbation.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        # act() draws its latents from this private generator, reseeded on every call: the policy is then
        # a deterministic function of the state, and evaluation leaves the training RNG untouched.
        self.act_generator = torch.Generator(device=device)
        # zero_grad of the three optimisers, then _update_impl (torch.compile'd whole under --compile); each
        # loss reaches only its own optimiser's parameters, so one reset before all equals one before each
        self._update = update_step(self._update_impl, config, self.vae_optimizer, self.critic_optimizer,
                                   self.actor_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])

    def soft_clipped_q(self, q: torch.Tensor) -> torch.Tensor:
        """lambda * min_i Q_i + (1 - lambda) * max_i Q_i over the ensemble dimension 0: (2, N) -> (N,)."""
        lam = self.config.min_weight
        return lam * q.min(0).values + (1.0 - lam) * q.max(0).values

    def value_target(self, rewards: torch.Tensor, next_obs: torch.Tensor,
                     terminals: torch.Tensor) -> torch.Tensor:
        """The soft clipped double-Q target y (Eqn. 13); (1 - d) cuts the bootstrap at terminals: (B,)."""
        n = self.config.num_sampled_actions
        with torch.no_grad():
            # Sample n actions {a_i ~ G_omega(s')} and perturb each: a_i + xi_phi'(s', a_i, Phi)
            next_obs_rep = next_obs.repeat_interleave(n, 0)  # (B*n, obs): row b*n + i is candidate i of s'_b
            candidates = self.perturbation_target(next_obs_rep, self.vae.decode(next_obs_rep))
            # all B*n candidates through both target critics in one batched pass: (2, B*n)
            q_next = self.soft_clipped_q(self.critic_target(next_obs_rep, candidates))
            # y = r + gamma * max_{a_i} [ lambda min_j Q_theta'_j(s', a_i)
            #                             + (1 - lambda) max_j Q_theta'_j(s', a_i) ]
            # (lecture: "BCQ – Soft Clipped Double Q-Learning"); no bootstrap past a true termination
            v_next = q_next.view(-1, n).max(1).values
            return rewards + self.config.gamma * (1.0 - terminals) * v_next

    def _update_impl(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        # --- train CVAE: mu, sigma = E_omega1(s, a), a~ = D_omega2(s, z), z ~ N(mu, sigma)
        recon, mean, std = self.vae(obs, actions)
        recon_loss = F.mse_loss(recon, actions)
        # D_KL(N(mu, sigma) || N(0, 1)) = -1/2 (1 + log sigma^2 - mu^2 - sigma^2), averaged as the reference
        kl = -0.5 * (1.0 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
        # omega <- argmin_omega sum (a - a~)^2 + D_KL(N(mu, sigma) || N(0, 1))
        #   (lecture: "Continuous BCQ–Algorithm")
        vae_loss = recon_loss + self.config.kl_weight * kl
        # logged values are taken before each backward (which consumes the graph they hang on)
        logs = {"train/vae_loss": vae_loss.detach()}
        vae_loss.backward()
        self.vae_optimizer.step()

        # --- sample from CVAE and perturb, clipped target (Eqn. 13)
        y = self.value_target(rewards, next_obs, terminals)

        # --- train Q: theta <- argmin_theta sum (y - Q_theta(s, a))^2, for both critics
        q_data = self.critic(obs, actions)  # (2, B)
        critic_loss = ((q_data - y.unsqueeze(0)) ** 2).mean(1).sum()
        logs.update({"train/critic_loss": critic_loss.detach(), "train/q_data": q_data[0].detach().mean()})
        critic_loss.backward()
        self.critic_optimizer.step()

        # --- train perturbation: phi <- argmax_phi sum Q_theta1(s, a + xi_phi(s, a, Phi)), a ~ G_omega(s)
        with torch.no_grad():
            sampled = self.vae.decode(obs)
        q_policy = self.critic.q1(obs, self.perturbation(obs, sampled))
        actor_loss = -q_policy.mean()
        logs.update({"train/actor_loss": actor_loss.detach(), "train/q_policy": q_policy.detach().mean()})
        actor_loss.backward()
        self.actor_optimizer.step()

        # --- update targets: theta'_i <- tau theta_i + (1 - tau) theta'_i ;  phi' <- tau phi + (1 - tau) phi'
        with torch.no_grad():
            soft_update(self.critic_target, self.critic, self.config.tau)
            soft_update(self.perturbation_target, self.perturbation, self.config.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(s) = the a_i + xi_phi(s, a_i, Phi) of largest Q_theta1; a_i = D(s, z_i), z_i ~ clip N(0, I).

        The n latents are the same on every call (a private generator, reseeded), so the action is a
        deterministic function of s.
        """
        n, batch = self.config.num_sampled_actions, obs.shape[0]
        self.act_generator.manual_seed(self.config.seed)
        z = torch.randn(n, self.latent_dim, device=obs.device, generator=self.act_generator)
        z = z.clamp(-self.config.latent_clip, self.config.latent_clip).repeat(batch, 1)  # (B*n, latent)
        obs_rep = obs.repeat_interleave(n, 0)
        candidates = self.perturbation(obs_rep, self.vae.decode(obs_rep, z))  # (B*n, act)
        best = self.critic.q1(obs_rep, candidates).view(batch, n).argmax(1)
        return candidates.view(batch, n, -1)[torch.arange(batch, device=obs.device), best]

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """The soft clipped double-Q estimate lambda min_i Q_i(s, a) + (1 - lambda) max_i Q_i(s, a): (B,)."""
        return self.soft_clipped_q(self.critic(obs, actions))

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict(), "perturbation": self.perturbation.state_dict(),
                "critic": self.critic.state_dict(),
                "perturbation_target": self.perturbation_target.state_dict(),
                "critic_target": self.critic_target.state_dict(),
                "vae_optimizer": self.vae_optimizer.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.perturbation.load_state_dict(state["perturbation"])
        self.critic.load_state_dict(state["critic"])
        self.perturbation_target.load_state_dict(state["perturbation_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        load_optimizer(self.vae_optimizer, state["vae_optimizer"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])


def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta' <- tau * theta + (1 - tau) * theta' for every parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), tau)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"bcq.py is for continuous actions but '{config.env}' has discrete actions; "
             f"use algorithms/bcq_discrete.py")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    next_obs = normalizer(data["next_obs"]) if normalizer else data["next_obs"]
    sampler = TensorSampler({"obs": obs, "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": next_obs, "terminals": data["terminals"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("bcq", config, dataset, device, normalizer)
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
