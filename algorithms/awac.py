"""Advantage-Weighted Actor-Critic (AWAC): AWR's weighted likelihood with a TD-learned Q of the policy.

Lecture section: "Advantage-Weighted Regression", approach 2 ("advantage weighted actor critic"):
1. estimate Q^pi by TD, min_Q E[(Q(s,a) - (r + gamma E_{a'~pi(.|s')} Q(s',a')))^2],
2. estimate the advantage A(s,a) = Q(s,a) - E_{a~pi(.|s)} Q(s,a),
3. update the policy by weighted likelihood, argmax_pi E_(s,a)~D [ log pi(a|s) exp(A(s,a) / lambda) ].
Paper: Nair, Gupta, Dalal & Levine 2020, "AWAC: Accelerating Online Reinforcement Learning with Offline
Datasets": the offline phase, and with --online-steps N the paper's online fine-tuning (common/online.py).

Usage:
    python algorithms/awac.py --env halfcheetah-medium-v2
    python algorithms/awac.py                                 # embedded default: local pendulum medium-replay
    python algorithms/awac.py --env hopper-medium-v2 --weighting exp --actor-hidden-dims 256 256 256
    python algorithms/awac.py --online-steps 20000            # then 20k env steps of online fine-tuning

Weights. The official code (rlkit's AWACTrainer with normalize_over_batch=True) does not use exp(A / lambda)
per sample but softmax(A / lambda) over the minibatch, multiplied by the batch size, so the weights of a
batch always average 1 (rlkit #130, d3rlpy #163 discuss the difference): that is the default here,
`--weighting batch-softmax`. CORL's AWAC uses min(exp(A / lambda), 100) instead: `--weighting exp`.
V(s) = E_{a~pi} Q(s, a) is estimated, as in the paper's code, with one action sampled from pi per state and
the minimum of the twin critics; Q(s, a) on dataset actions is also the twin minimum. No entropy term
(the paper's code runs with alpha = 0).

Networks. The defaults follow CORL's AWAC (the implementation behind the published-scores table): actor
and critics with three hidden layers of 256, lambda = 1, batch 256, Adam 3e-4, Polyak rate tau 0.005. The paper's
code (rlkit examples/awac/mujoco) used a 4x256 actor, 2x256 critics, batch 1024 and policy weight decay
1e-4: `--actor-hidden-dims 256 256 256 256 --critic-hidden-dims 256 256 --batch-size 1024`. The actor is a
Gaussian with a state-independent log-std (as both) and a tanh-bounded mean (as the paper's code, rlkit's
GaussianPolicy with a tanh output activation; CORL's mean is unbounded). Sampled actions are clipped to the
action bounds before the critics see them (as CORL).
Online fine-tuning (--online-steps) as the paper and CORL's finetune/awac.py: the policy acts by sampling its
Gaussian (clipped to the action box), online transitions join the offline data in one buffer sampled uniformly
(the paper initialises the replay buffer with the offline data and appends to it), one update per env step, and
nothing in the update changes at the switch.
Per-dataset settings (training length) live in `DATASET_SETTINGS` below; flags override them.
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
    # --- advantage-weighted actor-critic ---
    temperature: float = 1.0
    """lambda in the weights softmax(A / lambda) (the slide's alpha in exp(A / alpha); CORL: 1.0)"""
    weighting: Literal["batch-softmax", "exp"] = "batch-softmax"
    """batch-softmax: batch_size * softmax_batch(A / lambda) (the official code); exp: min(exp(A / lambda),
    max_weight) per sample (CORL)"""
    max_weight: float = 100.0
    """clip of exp(A / lambda) with --weighting exp (CORL's 100; unused by batch-softmax)"""
    gamma: float = 0.99
    """gamma in the TD target r + gamma (1 - done) min_k Q_target,k(s', a'), a' ~ pi(.|s')"""
    tau: float = 0.005
    """Polyak rate tau of the target critics: Q_target <- (1 - tau) Q_target + tau Q"""
    actor_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the Gaussian actor (CORL: 3x256; the paper's code: 4x256)"""
    critic_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of each of the twin critics (CORL: 3x256; the paper's code: 2x256)"""
    lr: float = 3e-4
    """Adam learning rate of the actor and the critics (the paper's and CORL's 3e-4)"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3), as CORL does"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = None
    """fraction of each online-phase batch drawn from the offline data (None: uniform over the offline and online
    rows, one growing buffer, as the paper and CORL's AWAC fine-tuning)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. CORL trains AWAC for 1M steps on D4RL; the small local sets need far fewer.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps the Gaussian's variance in a sane range


def awac_weights(advantage: torch.Tensor, temperature: float) -> torch.Tensor:
    """The official AWAC weights: batch_size * softmax(A / lambda) over the batch (they average exactly 1)."""
    return advantage.shape[0] * torch.softmax(advantage / temperature, dim=0)


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Agent:
    """AWAC's Gaussian actor, twin critics with their targets, optimisers and update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("awac.py is for continuous actions (Box); this dataset has discrete actions")
        config = apply_dataset_settings(config, DATASET_SETTINGS)  # fills None fields, as train() does
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.actor = mlp(spec.obs_dim, config.actor_hidden_dims, spec.act_dim).to(device)
        self.log_std = nn.Parameter(torch.zeros(spec.act_dim, device=device))
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.critic_hidden_dims).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = adam(list(self.actor.parameters()) + [self.log_std], config.lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.lr, config)
        self.params = [*self.critic.parameters(), *self.actor.parameters(), self.log_std]  # what the loss trains
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The Gaussian's mean max_action * tanh(MLP(s)), also the deterministic evaluation action."""
        return self.max_action * torch.tanh(self.actor(obs))

    def sample_action(self, mean: torch.Tensor) -> torch.Tensor:
        """a ~ N(mean, sigma^2) (torch's global RNG, saved in checkpoints), clipped to the action bounds."""
        std = self.log_std.detach().clamp(LOG_STD_MIN, LOG_STD_MAX).exp()
        return (mean + std * torch.randn_like(mean)).clamp(-self.max_action, self.max_action)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     next_obs: torch.Tensor, terminals: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        policy_mean = self.mean_action(obs)
        with torch.no_grad():
            # y = r + gamma (1 - done) min_k Q_target,k(s', a'),  a' ~ pi(.|s')   (Q of the current policy)
            next_actions = self.sample_action(self.mean_action(next_obs))
            next_q = self.target_critic(next_obs, next_actions).min(dim=0).values
            td_target = rewards + cfg.gamma * (1.0 - terminals) * next_q
            # V(s) = E_{a~pi(.|s)} Q(s, a), one sample per state (the paper's code)
            q_policy = self.critic(obs, self.sample_action(policy_mean.detach())).min(dim=0).values

        # 1. min_Q E_(s,a,s')~D [ sum_k ( Q_k(s,a) - (r + gamma E_{a'~pi} Q(s',a')) )^2 ]   (lecture: "AWAC")
        q = self.critic(obs, actions)
        critic_loss = (q - td_target).square().mean(dim=1).sum()

        # 2. A(s,a) = Q(s,a) - E_{a~pi(.|s)} Q(s,a)
        q_data = q.detach().min(dim=0).values
        advantage = q_data - q_policy
        if cfg.weighting == "batch-softmax":
            weights = awac_weights(advantage, cfg.temperature)
        else:
            weights = torch.exp(advantage / cfg.temperature).clamp(max=cfg.max_weight)

        # 3. pi = argmax_pi E_(s,a)~D [ log pi(a|s) exp(A(s,a) / lambda) ]   (weights as above)
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        log_prob = (-0.5 * ((actions - policy_mean) / log_std.exp()) ** 2 - log_std
                    - 0.5 * math.log(2 * math.pi)).sum(-1)
        actor_loss = -(weights * log_prob).mean()

        logs = {  # read before the backward, which consumes the graph these values hang on
            "train/critic_loss": critic_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/weight_mean": weights.mean(),
            "train/weight_max": weights.max(),
            "train/q_data": q_data.mean(),
            "train/q_policy": q_policy.mean(),
        }
        # the two losses touch disjoint parameters (targets and weights are detached): one backward;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_std when the step is recompiled)
        (critic_loss + actor_loss).backward(inputs=self.params)
        self.critic_optimizer.step()
        self.actor_optimizer.step()
        with torch.no_grad():
            # Q_target <- (1 - tau) Q_target + tau Q
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: the Gaussian's mean."""
        return self.mean_action(obs)

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The online phase's action: a ~ pi(a|s) = N(mean(s), sigma^2), clipped to the action bounds (the paper's
        and CORL's fine-tuning sample the policy)."""
        return self.sample_action(self.mean_action(obs))

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min_k Q_k(s, a), shape (batch,): the estimate AWAC's advantages use."""
        return self.critic(obs, actions).min(dim=0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "log_std": self.log_std.detach().clone(),
                "critic": self.critic.state_dict(), "target_critic": self.target_critic.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"awac.py is for continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py)
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_transform="none")

    run = Run("awac", config, dataset, device, normalizer)
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
