"""Critic Regularized Regression (CRR): behaviour cloning of the dataset actions, filtered by a learned critic.

Lecture sections: "Advantage-Weighted Objective" and "Advantage-Weighted Regression" (approach 2, the
"advantage weighted actor critic": Q^pi by TD, A(s,a) = Q(s,a) - E_{a~pi(.|s)} Q(s,a), then weighted
likelihood); the binary filter is "Filtered Behavior Cloning" with a learned per-state filter instead of the
trajectory return. CRR is AWAC's sibling: the same three steps, with
1. Q^pi by TD onto r + gamma (1 - d) Qbar(s', a'), a' ~ pibar(.|s') (the target policy),
2. A^(s,a) = Q(s,a) - 1/m sum_j Q(s,a_j) (`--advantage mean`) or Q(s,a) - max_j Q(s,a_j) (`max`), a_j ~ pi(.|s),
3. L_pi = -E_(s,a)~D [ f(A^(s,a)) log pi(a|s) ], with the filter f = 1[A^ > 0] (`--filter binary`) or
   min(exp(A^ / beta), max_weight) (`--filter exp`).
Paper: Wang, Novikov, Zolna, Springenberg, Reed, Shahriari, Siegel, Merel, Gulcehre, Heess & de Freitas 2020,
"Critic Regularized Regression" (NeurIPS).

Usage:
    python algorithms/crr.py --env hopper-medium-v2
    python algorithms/crr.py                                  # embedded default: local pendulum medium-replay
    python algorithms/crr.py --env halfcheetah-medium-v2 --filter exp --advantage max --eval-policy cwp

Reference implementation: d3rlpy's CRR (takuseno/d3rlpy, algos/qlearning/crr.py and torch/crr_impl.py, v2.8.1);
the paper's own experiments use a distributional critic and are not on D4RL. The defaults are d3rlpy's
locomotion reproduction (reproductions/offline/crr.py): binary filter, mean advantage, m = 4, soft targets
tau = 5e-3, batch 256, Adam 3e-4 for both networks, one critic of 2x256, 500k steps, no observation scaling.
CRRConfig's own defaults differ: `--filter exp --target-update hard` (copy every 100 steps) and batch 100.
Update order as d3rlpy: the critic step, then the actor step, whose advantages read the just-updated critic,
then both targets move.

The policy is d3rlpy's NormalPolicy: N(max_action * tanh(mu(s)), sigma(s)^2), the mean squashed and the
distribution not (log pi(a|s) is the plain Gaussian density, no tanh Jacobian), log sigma from its own head
clamped to [-20, 2], samples clipped to the action bounds. One difference: the target policy starts as a copy
of the policy (d3rlpy builds it from its own random initialisation and, with soft targets, never copies it).

Evaluation. `act` is the deterministic action max_action * tanh(mu(s)) by default (`--eval-policy mean`).
d3rlpy evaluates with the critic-weighted policy (CWP): m actions from pi(.|s), one of them resampled with
probabilities softmax_j Q(s, a_j); `--eval-policy cwp` does that (its draws from a private generator reseeded
with --seed before every evaluation). The mean is the default because it needs no critic at test time, is
reproducible without a generator, and is what every other file here evaluates (IQL, AWAC), so the scores
compare; on a well-trained critic CWP leans towards the best of m samples around that mean.
Per-dataset settings (the training length only: the reproduction uses one setting everywhere) live in
`DATASET_SETTINGS` below; flags override them.
"""

from __future__ import annotations

import copy
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
from common.networks import CriticEnsemble  # noqa: E402
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
    # --- critic regularized regression ---
    filter: Literal["binary", "exp"] = "binary"
    """the filter f(A^) weighting log pi(a|s): binary 1[A^ > 0] (d3rlpy's locomotion reproduction) or exp
    min(exp(A^ / beta), max_weight) (d3rlpy's CRRConfig default)"""
    advantage: Literal["mean", "max"] = "mean"
    """A^(s,a) = Q(s,a) - 1/m sum_j Q(s,a_j) (mean) or Q(s,a) - max_j Q(s,a_j) (max), a_j ~ pi(.|s)"""
    num_action_samples: int = 4
    """m, the actions a_j ~ pi(.|s) behind the advantage's baseline and the critic-weighted policy (d3rlpy: 4)"""
    beta: float = 1.0
    """beta, the temperature in exp(A^ / beta) of the exp filter (d3rlpy and the paper: 1)"""
    max_weight: float = 20.0
    """the clip of the exp filter: min(exp(A^ / beta), max_weight) (d3rlpy and the paper: 20)"""
    gamma: float = 0.99
    """gamma in the TD target y = r + gamma (1 - d) min_k Qbar_k(s', a'), a' ~ pibar(.|s')"""
    target_update: Literal["soft", "hard"] = "soft"
    """soft: Qbar <- (1 - tau) Qbar + tau Q and pibar likewise every step (the reproduction); hard: copy both
    every target_update_interval steps (d3rlpy's CRRConfig default)"""
    tau: float = 5e-3
    """tau, the Polyak rate of the soft target updates of the critic Qbar and the policy pibar"""
    target_update_interval: int = 100
    """steps between the copies of --target-update hard (d3rlpy: 100, the first after update 1)"""
    num_critics: int = 1
    """K critics Q_1..Q_K: the TD target takes their min, the advantage and the CWP their mean (d3rlpy: 1)"""
    actor_lr: float = 3e-4
    """Adam learning rate of the policy pi (d3rlpy: 3e-4)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics Q_k (d3rlpy: 3e-4)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the policy and of each critic (d3rlpy's encoders: 256x256, ReLU)"""
    eval_policy: Literal["mean", "cwp"] = "mean"
    """the evaluation action: mean, max_action * tanh(mu(s)); cwp, the critic-weighted policy (d3rlpy's): m
    samples of pi(.|s), one resampled with probabilities softmax_j Q(s, a_j)"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (d3rlpy's reproduction does not)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. d3rlpy's reproduction trains every locomotion dataset 500k steps with one
# setting (d3rlpy-benchmarks d4rl/crr: binary, mean, m 4, beta 1, soft 5e-3, batch 256); the small local
# pendulum sets need far fewer, the hopper-150k builds (150k transitions) keep the reproduction's length.
LOCOMOTION_STEPS = {"max_steps": 500_000}
DATASET_SETTINGS: list[tuple[str, dict]] = [
    *[(pattern, LOCOMOTION_STEPS) for family in ("halfcheetah", "hopper", "walker2d")
      for pattern in (f"{family}-*", f"mujoco/{family}/*", f"local/{family}*/*")],
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 500_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # d3rlpy's NormalPolicy clamp of log sigma(s)


def advantage_estimate(q_data: torch.Tensor, q_samples: torch.Tensor, kind: str) -> torch.Tensor:
    """A^(s,a) = Q(s,a) - 1/m sum_j Q(s,a_j) (mean) or Q(s,a) - max_j Q(s,a_j) (max).

    q_data (B,): Q on the dataset actions; q_samples (m, B): Q on the m actions sampled from pi per state.
    """
    baseline = q_samples.mean(dim=0) if kind == "mean" else q_samples.max(dim=0).values
    return q_data - baseline


def crr_filter(advantage: torch.Tensor, kind: str, beta: float, max_weight: float) -> torch.Tensor:
    """f(A^): binary 1[A^ > 0], or exp min(exp(A^ / beta), max_weight) (an overflow to inf is clipped too)."""
    if kind == "binary":
        return (advantage > 0).float()
    return torch.exp(advantage / beta).clamp(0.0, max_weight)


def mlp(in_dim: int, hidden_dims: tuple[int, ...]) -> nn.Sequential:
    """Linear -> ReLU per hidden layer: d3rlpy's vector encoder (the heads come after it)."""
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    return nn.Sequential(*layers)


class GaussianPolicy(nn.Module):
    """pi(a|s) = N(max_action * tanh(mu(s)), sigma(s)^2) per dimension, log sigma(s) in [LOG_STD_MIN, LOG_STD_MAX]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.trunk = mlp(obs_dim, hidden_dims)
        self.mu = nn.Linear(hidden_dims[-1], act_dim)
        self.log_std = nn.Linear(hidden_dims[-1], act_dim)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log sigma), each (B, act_dim)."""
        h = self.trunk(obs)
        return self.max_action * torch.tanh(self.mu(h)), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, sigma^2), summed over the action dimensions: (B, A) -> (B,)."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class Agent:
    """CRR's Gaussian policy and its target, the critics and their targets, optimisers and update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("crr.py is for continuous actions (Box); this dataset has discrete actions")
        check_config(config)
        config = apply_dataset_settings(config, DATASET_SETTINGS)  # fills None fields, as train() does
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.actor = GaussianPolicy(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims, config.num_critics).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.step = 0  # updates done so far (drives --target-update hard)
        # the evaluation's critic-weighted policy draws from this private generator, never the training RNG
        self.act_generator = torch.Generator(device=device)
        self.reset_sampling()
        # act() samples under --eval-policy cwp: common.checkpoint.load_policy then returns act_deterministic
        self.SAMPLES_ACTIONS = config.eval_policy == "cwp"
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    def sample_actions(self, mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """a = mean + sigma * noise, clipped to the action bounds (d3rlpy clips its samples to [-1, 1])."""
        return (mean + log_std.exp() * noise).clamp(-self.max_action, self.max_action)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logs = self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["terminals"])
        if self.config.target_update == "hard" and self.step % self.config.target_update_interval == 0:
            # Qbar <- Q, pibar <- pi after updates 1, 1 + interval, ... (d3rlpy: grad_step % interval == 0 from 0)
            self.critic_target.load_state_dict(self.critic.state_dict())
            self.actor_target.load_state_dict(self.actor.state_dict())
        self.step += 1
        return logs

    def _update_impl(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        logs = self._critic_step(obs, actions, rewards, next_obs, terminals)
        logs.update(self._actor_step(obs, actions))  # reads the critic this step just updated (d3rlpy's order)
        if self.config.target_update == "soft":
            with torch.no_grad():
                # Qbar <- (1 - tau) Qbar + tau Q ;  pibar <- (1 - tau) pibar + tau pi
                torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()),
                                     self.config.tau)
                torch._foreach_lerp_(list(self.actor_target.parameters()), list(self.actor.parameters()),
                                     self.config.tau)
        return logs

    def _critic_step(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        cfg = self.config
        with torch.no_grad():
            # y = r + gamma (1 - d) min_k Qbar_k(s', a'),  a' ~ pibar(.|s')  (the target policy, clipped)
            next_mean, next_log_std = self.actor_target(next_obs)
            next_actions = self.sample_actions(next_mean, next_log_std, torch.randn_like(next_mean))
            y = rewards + cfg.gamma * (1.0 - terminals) * self.critic_target(next_obs, next_actions).min(0).values
        # 1. min_Q E_(s,a,s')~D [ sum_k ( Q_k(s,a) - y )^2 ]   (lecture: "Advantage-Weighted Regression", step 1)
        q = self.critic(obs, actions)  # (K, B)
        critic_loss = (q - y).square().mean(dim=1).sum()
        logs = {"train/critic_loss": critic_loss.detach()}  # taken before the backward consumes the graph
        critic_loss.backward(inputs=list(self.critic.parameters()))
        self.critic_optimizer.step()
        return logs

    def _actor_step(self, obs, actions) -> dict[str, torch.Tensor]:
        cfg = self.config
        m, batch, act_dim = cfg.num_action_samples, obs.shape[0], actions.shape[-1]
        mean, log_std = self.actor(obs)
        with torch.no_grad():
            # a_j ~ pi(.|s), j = 1..m (m draws of the whole batch, d3rlpy's order), clipped to the bounds
            noise = torch.randn(m, batch, act_dim, device=obs.device)
            sampled = self.sample_actions(mean.detach(), log_std.detach(), noise)  # (m, B, A)
            # Q(s,a) on the dataset actions and Q(s,a_j) on the samples in one critic pass; mean over the K critics
            q_all = self.critic(obs.repeat(m + 1, 1), torch.cat([actions, sampled.reshape(m * batch, act_dim)]))
            q_all = q_all.mean(dim=0)
            q_data, q_samples = q_all[:batch], q_all[batch:].view(m, batch)
            # 2. A^(s,a) = Q(s,a) - 1/m sum_j Q(s,a_j)  (mean)   or   Q(s,a) - max_j Q(s,a_j)  (max)
            advantage = advantage_estimate(q_data, q_samples, cfg.advantage)
            # f(A^) = 1[A^ > 0]  (binary)   or   min(exp(A^ / beta), max_weight)  (exp)
            weights = crr_filter(advantage, cfg.filter, cfg.beta, cfg.max_weight)
        # 3. L_pi = -E_(s,a)~D [ f(A^(s,a)) log pi(a|s) ]   (lecture: "Advantage-Weighted Regression", step 3)
        actor_loss = -(weights * gaussian_log_prob(actions, mean, log_std)).mean()
        logs = {
            "train/actor_loss": actor_loss.detach(),
            "train/q_data": q_data.mean(),
            "train/q_policy": q_samples.mean(),
            "train/adv_mean": advantage.mean(),
            "train/adv_std": advantage.std(),
            "train/adv_positive_frac": (advantage > 0).float().mean(),  # the share the binary filter keeps
            "train/weight_mean": weights.mean(),
            "train/policy_std": log_std.detach().exp().mean(),
        }
        if cfg.filter == "exp":
            logs["train/weight_clipped_frac"] = (weights >= cfg.max_weight).float().mean()
        actor_loss.backward(inputs=list(self.actor.parameters()))
        self.actor_optimizer.step()
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The evaluation action: max_action * tanh(mu(s)), or the critic-weighted policy with --eval-policy cwp."""
        return self.act_cwp(obs) if self.config.eval_policy == "cwp" else self.act_deterministic(obs)

    @torch.no_grad()
    def act_deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """The Gaussian's mean max_action * tanh(mu(s)) (d3rlpy's squashed_mu)."""
        return self.actor(obs)[0]

    @torch.no_grad()
    def act_cwp(self, obs: torch.Tensor) -> torch.Tensor:
        """Critic-weighted policy: a_1..a_m ~ pi(.|s), then a_j with probability softmax_j mean_k Q_k(s, a_j)."""
        m, batch = self.config.num_action_samples, obs.shape[0]
        mean, log_std = self.actor(obs)
        noise = torch.randn(batch, m, mean.shape[-1], device=obs.device, generator=self.act_generator)
        candidates = self.sample_actions(mean.unsqueeze(1), log_std.unsqueeze(1), noise)  # (B, m, A)
        q = self.critic(obs.repeat_interleave(m, 0), candidates.reshape(batch * m, -1)).mean(0).view(batch, m)
        index = torch.multinomial(torch.softmax(q, dim=1), 1, generator=self.act_generator).squeeze(1)
        return candidates[torch.arange(batch, device=obs.device), index]

    def reset_sampling(self) -> None:
        """Reseed the critic-weighted policy's generator with --seed: the evaluation that follows is reproducible."""
        self.act_generator.manual_seed(self.config.seed)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """mean_k Q_k(s, a), shape (batch,): the estimate CRR's advantages and the CWP read."""
        return self.critic(obs, actions).mean(dim=0)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
                "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        self.step = int(state["step"])


def check_config(config: Config) -> None:
    """This file's own fields, before anything is written (one line each)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            fail(message)

    need(config.num_action_samples >= 1,
         f"--num-action-samples (m) must be at least 1, got {config.num_action_samples}")
    need(config.beta > 0, f"--beta must be positive (the temperature in exp(A / beta)), got {config.beta}")
    need(config.max_weight > 0, f"--max-weight must be positive, got {config.max_weight}")
    need(0 < config.tau <= 1, f"--tau must lie in (0, 1], got {config.tau}")
    need(config.target_update_interval >= 1,
         f"--target-update-interval must be at least 1, got {config.target_update_interval}")
    need(config.num_critics >= 1, f"--num-critics must be at least 1, got {config.num_critics}")


def train(config: Config) -> dict:
    check_config(config)  # this file's settings, before anything is printed, read or written
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"crr.py is for continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    if config.batch_size > len(data["obs"]):
        fail(f"--batch-size {config.batch_size} is larger than the dataset: '{config.env}' holds "
             f"{len(data['obs'])} transitions")
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("crr", config, dataset, device, normalizer)
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
