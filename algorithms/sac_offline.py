"""Naive offline SAC: plain off-policy Soft Actor-Critic trained on a fixed dataset, the baseline that fails.

Lecture sections: "Off-Policy Algorithms for Offline RL?" and the question before it ("Can we just use
off-policy methods to learn from static datasets? No!": SAC trained fully off-policy on a static dataset
does not succeed and its Q-values can diverge), the motivation for "Policy-Constrained Offline RL".
Nothing here is changed for the offline setting: the Bellman target queries Q at actions a' ~ pi(.|s') that
the dataset may never contain, the actor climbs the critic's errors there, and nothing pulls it back.
Watch `train/q_policy` (Q at the policy's actions) run away from `train/q_data` (Q at the dataset's actions).
Paper: Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications" (twin critics, automatic
entropy tuning); the offline failure: Kumar et al. 2019 (BEAR), Fujimoto et al. 2019 (BCQ).

Usage:
    python algorithms/sac_offline.py                          # embedded default: local pendulum data
    python algorithms/sac_offline.py --env hopper-medium-v2

Continuous actions only. SAC's hyperparameters are not tuned per dataset; only the training length differs,
for the small local and test datasets, in `DATASET_SETTINGS` below; flags override it.

--compile compiles the whole update, pi's samples drawn on the device inside (common/optim.py).
"""

from __future__ import annotations

import copy
import math
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
    # --- SAC ---
    gamma: float = 0.99
    """gamma, the discount in y = r + gamma (1 - d) (min_i Q_theta'_i(s', a') - alpha log pi(a'|s'))"""
    tau: float = 0.005
    """tau in the target update theta' <- tau theta + (1 - tau) theta'"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor pi_phi"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics Q_theta1, Q_theta2"""
    alpha_lr: float = 3e-4
    """Adam learning rate of log alpha (automatic entropy tuning)"""
    initial_alpha: float = 1.0
    """alpha, the entropy temperature, at the start"""
    target_entropy: float | None = None
    """H-bar, the entropy target of automatic tuning (None: -|A|, the SAC paper's choice)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor and of each critic"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3), as the offline methods do"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The offline RL papers train their baselines for 1M steps on D4RL.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 30_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # the SAC authors' clamp of the Gaussian's log std


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class TanhGaussianActor(nn.Module):
    """pi_phi(a|s): a = max_action * tanh(u), u ~ N(mu_phi(s), sigma_phi(s)^2)."""

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
        # (the constant -|A| log(max_action) of the scaling is left out, as in the SAC authors' code)
        log_prob = (-0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_prob = log_prob - (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return self.max_action * torch.tanh(u), log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        mean, _ = self.net(obs).chunk(2, dim=-1)
        return self.max_action * torch.tanh(mean)


class Agent:
    """Actor, twin critics, target critics, the temperature and the SAC update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("offline SAC here needs continuous (Box) actions; this dataset has discrete actions")
        self.config, self.spec, self.device = config, spec, device
        self.actor = TanhGaussianActor(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims, 2).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.initial_alpha), device=device, requires_grad=True)
        self.target_entropy = float(-spec.act_dim if config.target_entropy is None else config.target_entropy)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.alpha_optimizer = adam([self.log_alpha], config.alpha_lr, config)
        self.actor_and_alpha = [*self.actor.parameters(), self.log_alpha]  # what the second backward trains
        # zero_grad of the three optimisers, then _update_impl (torch.compile'd whole under --compile); each loss
        # reaches only its own optimiser's parameters, so one reset up front equals one before each backward
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer,
                                   self.alpha_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])

    def _update_impl(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        c = self.config
        alpha = self.log_alpha.detach().exp()

        # --- critics: soft policy evaluation on the dataset's (s, a, r, s') ---
        with torch.no_grad():
            next_actions, next_log_prob = self.actor.sample(next_obs)  # a' ~ pi(.|s'): possibly never in D
            target_q = self.critic_target(next_obs, next_actions).min(0).values
            # y = r + gamma (1 - d) ( min_i Q_theta'_i(s', a') - alpha log pi(a'|s') )
            y = rewards + c.gamma * (1.0 - terminals) * (target_q - alpha * next_log_prob)
        q = self.critic(obs, actions)  # (2, B)
        # J_Q = E_(s,a,r,s')~D [ (Q_theta_i(s, a) - y)^2 ], both critics (summed)
        critic_loss = ((q - y) ** 2).mean(1).sum()
        # logged values are taken before each backward (which consumes the graph they hang on)
        logs = {"train/critic_loss": critic_loss.detach(), "train/q_data": q.detach().min(0).values.mean()}
        critic_loss.backward()
        self.critic_optimizer.step()

        # --- actor: J_pi = E_s~D, a~pi [ alpha log pi(a|s) - min_i Q_theta_i(s, a) ] (no constraint to D) ---
        pi_actions, log_prob = self.actor.sample(obs)
        q_pi = self.critic(obs, pi_actions, detach_weights=True).min(0).values
        actor_loss = (alpha * log_prob - q_pi).mean()

        # --- temperature: J(alpha) = E_a~pi [ -alpha (log pi(a|s) + H-bar) ] (optimised through log alpha) ---
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        logs.update({"train/actor_loss": actor_loss.detach(), "train/alpha": alpha,
                     "train/entropy": -log_prob.detach().mean(), "train/q_policy": q_pi.detach().mean()})
        # the two losses touch disjoint parameters (alpha enters the actor's detached): one backward serves both;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_alpha when the step is recompiled)
        (actor_loss + alpha_loss).backward(inputs=self.actor_and_alpha)
        self.actor_optimizer.step()
        self.alpha_optimizer.step()

        with torch.no_grad():
            # theta'_i <- tau theta_i + (1 - tau) theta'_i
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), c.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: max_action * tanh(mu_phi(s))."""
        return self.actor.deterministic(obs)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q_theta1, Q_theta2)(s, a), shape (batch,): the estimate SAC's target and actor use."""
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


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"offline SAC here needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("sac_offline", config, dataset, device, normalizer)
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
