"""Implicit Q-Learning (IQL): expectile regression for V, TD for Q, advantage-weighted regression for pi.

Lecture sections: "Aside: Expectile regression" (the asymmetric l2 loss l2^tau) and "Implicit Q-Learning"
(fit V with the expectile loss on Q of dataset actions, fit Q by TD to r + gamma V(s'), extract the policy
with AWR): IQL never evaluates Q on an action outside the dataset, so it needs no explicit constraint.
Paper: Kostrikov, Nair & Levine 2021, "Offline Reinforcement Learning with Implicit Q-Learning".

Usage:
    python algorithms/iql.py --env halfcheetah-medium-v2
    python algorithms/iql.py                                  # embedded default: local pendulum medium-replay
    python algorithms/iql.py --env antmaze-umaze-v2 --policy deterministic

One gradient step updates, from the same minibatch, (1) V by expectile regression onto the target critics'
min_k Q_k(s, a), (2) the twin critics by MSE onto r + gamma (1 - done) V(s'), (3) the actor by
advantage-weighted regression with weights min(exp(beta (Q - V)), 100); then the target critics move by
Polyak averaging. All three losses are computed from the networks as they were before the step (as CORL
does; the official JAX code feeds the freshly updated V into the actor and critic steps, one step of lag).

Per-dataset settings (as the paper and its official configs set them) live in `DATASET_SETTINGS` below:
locomotion expectile tau 0.7, beta 3, rewards r * 1000 / (max_return - min_return) (halfcheetah, hopper and
walker2d only, as the official code and CORL; other datasets keep raw rewards); antmaze tau 0.9,
beta 10, rewards r - 1; Adroit and Kitchen tau 0.7, beta 0.5, dropout 0.1 on the actor, raw rewards;
1M steps for the D4RL-scale sets, far fewer for the small local ones. Flags override every one of them.
Never set tau 0.5 with beta near 1 by accident: V becomes the mean of Q over dataset actions (SARSA) and
the actor barely differs from behaviour cloning (the pitfall TorchRL's old defaults fell into).
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
from common.online import OnlinePhase  # noqa: E402
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
    # --- implicit Q-learning ---
    expectile: float | None = None
    """tau in the expectile loss l2^tau(Q - V) (None: from DATASET_SETTINGS; 0.7 locomotion, 0.9 antmaze).
    tau = 0.5 makes V the mean of Q over dataset actions (SARSA); tau -> 1 approaches max_a Q"""
    beta: float | None = None
    """inverse temperature beta in the AWR weight exp(beta (Q - V)) (the slide's 1/alpha; None: from
    DATASET_SETTINGS; 3 locomotion, 10 antmaze, 0.5 Adroit/Kitchen); beta -> 0 is plain BC"""
    max_weight: float = 100.0
    """clip of the AWR weight: min(exp(beta A), max_weight) (the paper's 100)"""
    reward_transform: Literal["none", "return-range", "minus-one"] | None = None
    """reward preprocessing (None: from DATASET_SETTINGS): return-range r * 1000 / (max - min episode
    return) for locomotion, minus-one r - 1 for antmaze, none for Adroit/Kitchen"""
    policy: Literal["gaussian", "deterministic"] = "gaussian"
    """actor: Gaussian pi(a|s) with a tanh-bounded mean and state-independent log-std, trained by weighted
    log-likelihood (the paper); or deterministic pi(s) trained by weighted squared error (a CORL option)"""
    actor_dropout: float | None = None
    """dropout rate after each hidden layer of the actor (None: from DATASET_SETTINGS; 0.1 Adroit/Kitchen)"""
    gamma: float = 0.99
    """gamma in the TD target r + gamma (1 - done) V(s')"""
    tau: float = 0.005
    """Polyak rate tau of the target critics: Q_target <- (1 - tau) Q_target + tau Q (not the expectile: that is
    --expectile)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor, the value network and each critic (the paper's 256x256)"""
    lr: float = 3e-4
    """Adam learning rate of the actor, the critics and the value network (the paper's 3e-4)"""
    cosine_schedule: bool = True
    """decay the actor's learning rate to zero over max_steps along a cosine (the official code)"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3), as CORL does"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = None
    """fraction of each online-phase batch drawn from the offline data (None: uniform over the offline and online
    rows, one growing buffer, as CORL's IQL fine-tuning)"""
    online_explore_noise: float = 0.03
    """deterministic policy only: std of the Gaussian noise added to pi(s) when acting online (CORL's 0.03,
    clipped at 0.5); the Gaussian policy samples pi(a|s) instead"""


LOCOMOTION = {"expectile": 0.7, "beta": 3.0, "reward_transform": "return-range", "actor_dropout": 0.0}
ANTMAZE = {"expectile": 0.9, "beta": 10.0, "reward_transform": "minus-one", "actor_dropout": 0.0,
           "max_steps": 1_000_000}
# the official repository trains Adroit with the Kitchen config (configs/kitchen_config.py): dropout 0.1
ADROIT_KITCHEN = {"expectile": 0.7, "beta": 0.5, "reward_transform": "none", "actor_dropout": 0.1,
                  "max_steps": 1_000_000}

# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The small local sets (Pendulum, 200-step episodes) need far fewer steps.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("antmaze-*", ANTMAZE),
    ("D4RL/antmaze/*", ANTMAZE),
    *[(pattern, ADROIT_KITCHEN) for pattern in (
        "pen-*", "door-*", "hammer-*", "relocate-*", "kitchen-*",
        "D4RL/pen/*", "D4RL/door/*", "D4RL/hammer/*", "D4RL/relocate/*", "D4RL/kitchen/*")],
    # the official code and CORL rescale rewards by the return range for these three families only
    *[(pattern, {**LOCOMOTION, "max_steps": 1_000_000}) for family in ("halfcheetah", "hopper", "walker2d")
      for pattern in (f"{family}-*", f"mujoco/{family}/*", f"local/{family}*/*")],
    # the small local sets: the locomotion settings (return-range rewards: Pendulum's -16..0 per-step costs
    # scaled to returns spanning 1000, as a locomotion set's), far fewer steps
    ("local/pendulum/*", {**LOCOMOTION, "max_steps": 20_000}),
    ("test/*", {**LOCOMOTION, "max_steps": 5_000}),
    # anything else (pointmaze, Minari's ant and humanoid, ...): the locomotion tau and beta on raw rewards
    ("*", {**LOCOMOTION, "reward_transform": "none", "max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the official code's clip of the Gaussian's log-std


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Elementwise l2^tau(u) = |tau - 1(u < 0)| u^2 with u = diff (lecture: "Aside: Expectile regression").

    Positive u (targets above the estimate) weigh tau, negative ones 1 - tau, so minimising
    E[l2^tau(x - v)] over a scalar v gives the tau-expectile of x: the mean at tau = 0.5, towards the
    maximum as tau -> 1. The slide writes l2^tau(V - Q) with a small tau; the paper and this file write
    l2^tau(Q - V) with tau > 0.5: the same loss with tau swapped for 1 - tau.
    """
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return weight * diff.square()


DIAGNOSTIC_ROWS = 32  # states per batch on which the logged Q(s, pi(s)) diagnostic is taken


def advantage_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """AWR weights w = min(exp(beta A), max_weight) (an overflow to inf is clipped to max_weight too)."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Agent:
    """IQL's actor, value network V, twin critics Q_1, Q_2 with their targets, optimisers and update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("iql.py is for continuous actions (Box); this dataset has discrete actions")
        # fields left at None (e.g. an Agent built straight from Config(), as the benchmark does) get the
        # per-dataset values of config.env, exactly as train() fills them
        config = apply_dataset_settings(config, DATASET_SETTINGS)
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.gaussian = config.policy == "gaussian"
        self.actor = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim, config.actor_dropout).to(device)
        self.log_std = nn.Parameter(torch.zeros(spec.act_dim, device=device))  # Gaussian head only
        self.value = mlp(spec.obs_dim, config.hidden_dims, 1).to(device)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

        actor_params = list(self.actor.parameters()) + ([self.log_std] if self.gaussian else [])
        # a tensor learning rate: the cosine schedule changes it in place, so a compiled update never retraces
        self.actor_lr = torch.tensor(config.lr, device=device)
        self.actor_optimizer = adam(actor_params, self.actor_lr, config)
        self.value_optimizer = adam(self.value.parameters(), config.lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.lr, config)
        self.step = 0  # updates done so far (drives the cosine schedule)
        self.params = [*self.value.parameters(), *self.critic.parameters(), *actor_params]  # what the loss trains
        # zero_grad of the three optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.value_optimizer, self.critic_optimizer,
                                   self.actor_optimizer)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(s) = max_action * tanh(MLP(s)): the deterministic action, and the Gaussian's mean (CORL #38)."""
        return self.max_action * torch.tanh(self.actor(obs))

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.config.cosine_schedule:
            # lr_t = lr (1 + cos(pi t / T)) / 2, reaching 0 at T = max_steps (optax.cosine_decay_schedule); in an
            # online phase (t > T) it rises again along the same cosine, as CORL's CosineAnnealingLR keeps stepping
            progress = self.step / self.config.max_steps
            self.actor_lr.fill_(self.config.lr * 0.5 * (1.0 + math.cos(math.pi * progress)))
        self.step += 1
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     next_obs: torch.Tensor, terminals: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        policy_mean = self.mean_action(obs)
        with torch.no_grad():
            # Q_target(s, a) on dataset actions, and Q_target(s, pi(s)) on the batch's first DIAGNOSTIC_ROWS
            # states (a logged diagnostic only, so it costs an eighth of a critic pass), in one batch
            k = min(DIAGNOSTIC_ROWS, obs.shape[0])
            target_q = self.target_critic(torch.cat([obs, obs[:k]]),
                                          torch.cat([actions, policy_mean[:k].detach()])).min(dim=0).values
            q_data, q_policy = target_q[:obs.shape[0]], target_q[obs.shape[0]:]
            next_v = self.value(next_obs).squeeze(-1)
            # y = r + gamma (1 - done) V(s')   (terminations only: a time-limit truncation bootstraps)
            td_target = rewards + cfg.gamma * (1.0 - terminals) * next_v

        # L_V = E_(s,a)~D [ l2^tau( Q_target(s,a) - V(s) ) ]   (lecture: "Implicit Q-Learning")
        v = self.value(obs).squeeze(-1)
        advantage = q_data - v
        value_loss = expectile_loss(advantage, cfg.expectile).mean()

        # L_Q = E_(s,a,s')~D [ sum_k ( Q_k(s,a) - (r + gamma V(s')) )^2 ]   (twin critics summed: the paper)
        q = self.critic(obs, actions)
        q_loss = (q - td_target).square().mean(dim=1).sum()

        # L_pi = -E_(s,a)~D [ exp(beta (Q(s,a) - V(s))) log pi(a|s) ], weights clipped at max_weight
        weights = advantage_weights(advantage.detach(), cfg.beta, cfg.max_weight)
        if self.gaussian:
            log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
            log_prob = (-0.5 * ((actions - policy_mean) / log_std.exp()) ** 2 - log_std
                        - 0.5 * math.log(2 * math.pi)).sum(-1)
            per_sample = -log_prob
        else:
            # deterministic head: the weighted squared error || pi(s) - a ||^2 replaces -log pi(a|s)
            per_sample = (policy_mean - actions).square().sum(-1)
        actor_loss = (weights * per_sample).mean()

        advantage = advantage.detach()
        logs = {  # read before the backward, which consumes the graph these values hang on
            "train/value_loss": value_loss.detach(),
            "train/q_loss": q_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/v_mean": v.detach().mean(),
            "train/q_data": q_data.mean(),
            "train/q_policy": q_policy.mean(),
            "train/adv_mean": advantage.mean(),
            "train/adv_std": advantage.std(),
            "train/weight_clipped_frac": (weights >= cfg.max_weight).float().mean(),
        }
        # the three losses touch disjoint parameters (targets are detached): one backward serves all three;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_std when the step is recompiled)
        (value_loss + q_loss + actor_loss).backward(inputs=self.params)
        self.value_optimizer.step()
        self.critic_optimizer.step()
        self.actor_optimizer.step()
        with torch.no_grad():
            # Q_target <- (1 - tau) Q_target + tau Q
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()),
                                 cfg.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action pi(s) (the Gaussian's mean), dropout off."""
        self.actor.eval()
        action = self.mean_action(obs)
        self.actor.train()
        return action

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The online phase's action: a ~ pi(a|s) for the Gaussian policy (CORL's fine-tuning), or pi(s) plus
        N(0, online_explore_noise^2) clipped at 0.5 for the deterministic one; kept inside the action bounds."""
        self.actor.eval()
        mean = self.mean_action(obs)
        self.actor.train()
        if self.gaussian:
            noise = torch.randn_like(mean) * self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        else:
            noise = (torch.randn_like(mean) * self.config.online_explore_noise).clamp(-0.5, 0.5)
        return (mean + noise).clamp(-self.max_action, self.max_action)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_k Q_target,k(s, a), shape (batch,): the estimate IQL's V and actor read."""
        return self.target_critic(obs, actions).min(dim=0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "log_std": self.log_std.detach().clone(),
                "value": self.value.state_dict(), "critic": self.critic.state_dict(),
                "target_critic": self.target_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "value_optimizer": self.value_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.value.load_state_dict(state["value"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.value_optimizer, state["value_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        # the optimiser's saved lr replaced our tensor: point it back, so the schedule keeps driving it
        self.actor_optimizer.param_groups[0]["lr"] = self.actor_lr
        self.step = int(state["step"])


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"iql.py is for continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions(reward_transform=config.reward_transform)
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py)
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_transform=config.reward_transform)

    run = Run("iql", config, dataset, device, normalizer)
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
