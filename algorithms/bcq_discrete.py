"""Discrete Batch-Constrained deep Q-learning (BCQ): Q-learning over actions the behaviour policy takes.

Lecture section: "BCQ with Function Approximation – Discrete Case" (the action set
A_eps^BCQ(s) = {a : pi_beta(a|s) / max_a pi_beta(a|s) >= eps}, the constrained target and the constrained
greedy policy; eps is `--threshold` here, tau in the paper).
Paper: Fujimoto, Conti, Ghavamzadeh, Pineau 2019, "Benchmarking Batch Deep Reinforcement Learning
Algorithms" (NeurIPS Deep RL workshop).

Usage:
    python algorithms/bcq_discrete.py                         # embedded default: local cartpole data
    python algorithms/bcq_discrete.py --env local/cartpole/medium-replay-v0 --threshold 0.3

Target network: Polyak averaging with tau = 0.005 every step, as the reference code's settings for
non-Atari tasks (`--target-update-every N` switches to its Atari rule, a hard copy every N = 8000 steps).
The reference uses Adam 3e-4 and batch 64 on those tasks; the library's batch size is 256.
Only the training length is per dataset, in `DATASET_SETTINGS` below.

--compile compiles the whole update with its Polyak target update (common/optim.py); the hard copy of
`--target-update-every` runs between steps, outside it.
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
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, resolve_config, run_cli, setup  # noqa: E402

DISCRETE_ONLY = True  # the benchmark builds this agent for a discrete action set


@dataclass
class Config:
    # --- shared by every algorithm (same names, order and meaning in every file) ---
    env: str = "local/cartpole/medium-replay-v0"
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
    """minibatch size (the library's 256; the reference uses 64)"""
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
    # --- discrete BCQ ---
    threshold: float = 0.3
    """eps in A_eps^BCQ(s) = {a : pi_beta(a|s) / max_a pi_beta(a|s) >= eps} (paper: tau = 0.3)"""
    gamma: float = 0.99
    """discount gamma in y = r + gamma * Q_theta'(s', argmax_{a' in A_eps^BCQ(s')} Q_theta(s', a'))"""
    tau: float = 0.005
    """Polyak rate of the target network theta' <- tau * theta + (1 - tau) * theta' (reference, non-Atari)"""
    target_update_every: int = 0
    """0: Polyak update with tau every step; N > 0: copy theta' <- theta every N steps (Atari: 8000)"""
    imitation_logit_reg: float = 1e-2
    """weight of the logit penalty mean(logits^2) on the imitation network G (reference code: 1e-2)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the Q network and of the imitation network G (separate networks)"""
    lr: float = 3e-4
    """Adam learning rate of both networks (reference, non-Atari: 3e-4)"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (the reference code does not)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The reference code trains 1M steps on Atari buffers.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/cartpole/*", {"max_steps": 20_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 1_000_000}),
]


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def allowed_actions(imitation_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of A_eps^BCQ(s): pi_beta(a|s) / max_a pi_beta(a|s) >= eps, as a bool tensor (B, |A|).

    The ratio is exp(log pi_beta(a|s) - max_a log pi_beta(a|s)), which stays finite for any finite logits
    (and is exactly 1 for the most likely action, so the set is never empty).
    """
    log_pi = F.log_softmax(imitation_logits, -1)
    ratio = (log_pi - log_pi.max(-1, keepdim=True).values).exp()
    return ratio >= threshold


def masked_argmax(q: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """argmax_{a in A_eps^BCQ(s)} Q(s, a): (B, |A|), (B, |A|) bool -> (B,) int64.

    Actions outside the set get the most negative finite float (not `inf * mask`, whose 0 * inf is NaN).
    """
    return torch.where(allowed, q, torch.finfo(q.dtype).min).argmax(-1)


class Agent:
    """The Q network, its target, the imitation network G (the estimate of pi_beta) and the update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if not spec.discrete:
            fail("bcq_discrete.py is for discrete actions; for continuous actions use algorithms/bcq.py")
        self.config, self.spec, self.device = config, spec, device
        self.q_network = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        self.q_target = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        self.q_target.load_state_dict(self.q_network.state_dict())
        for p in self.q_target.parameters():
            p.requires_grad_(False)
        # G: logits of pi_beta(a|s); no ReLU on the output layer (a ReLU there was BCQ issue #6)
        self.imitation = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        params = [*self.q_network.parameters(), *self.imitation.parameters()]
        self.optimizer = adam(params, config.lr, config)
        self.steps = 0  # counts updates, for the periodic target copy
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logs = self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])
        self.steps += 1
        every = self.config.target_update_every
        if every > 0 and self.steps % every == 0:
            self.q_target.load_state_dict(self.q_network.state_dict())  # theta' <- theta
        return logs

    @torch.no_grad()
    def value_target(self, rewards: torch.Tensor, next_obs: torch.Tensor,
                     terminals: torch.Tensor) -> torch.Tensor:
        """y = r + gamma * (1 - d) * Q_theta'(s', a'), a' = argmax_{a' in A_eps^BCQ(s')} Q_theta(s', a')."""
        # a' from the online network within the allowed set, evaluated by the target network (double DQN)
        next_allowed = allowed_actions(self.imitation(next_obs), self.config.threshold)
        next_actions = masked_argmax(self.q_network(next_obs), next_allowed)
        q_next = self.q_target(next_obs).gather(1, next_actions.unsqueeze(1)).squeeze(1)
        # y = r + gamma * max_{a' in A_eps^BCQ(s')} Q(s', a')   (lecture: "BCQ with Function Approximation
        # – Discrete Case"); no bootstrap past a true termination
        return rewards + self.config.gamma * (1.0 - terminals) * q_next

    def _update_impl(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        y = self.value_target(rewards, next_obs, terminals)
        q_all = self.q_network(obs)
        q_data = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)
        # min_theta (y - Q_theta(s, a))^2, with the Huber loss in place of the square (reference code)
        q_loss = F.smooth_l1_loss(q_data, y)
        logits = self.imitation(obs)
        # pi_beta-hat = G_omega: min -E_(s,a)~D [ log G_omega(a|s) ] + 1e-2 * mean(logits^2)
        imitation_loss = F.cross_entropy(logits, actions)
        loss = q_loss + imitation_loss + self.config.imitation_logit_reg * logits.pow(2).mean()
        with torch.no_grad():  # logged values, taken before the backward (which consumes their graph)
            allowed = allowed_actions(logits, self.config.threshold)
            q_policy = q_all.gather(1, masked_argmax(q_all, allowed).unsqueeze(1)).squeeze(1)
        logs = {"train/q_loss": q_loss.detach(), "train/imitation_loss": imitation_loss.detach(),
                "train/allowed_actions": allowed.float().sum(-1).mean(),
                "train/q_data": q_data.detach().mean(), "train/q_policy": q_policy.mean()}
        loss.backward()
        self.optimizer.step()

        if self.config.target_update_every <= 0:
            with torch.no_grad():  # theta' <- tau * theta + (1 - tau) * theta'
                torch._foreach_lerp_(list(self.q_target.parameters()), list(self.q_network.parameters()),
                                     self.config.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(s) = argmax_{a in A_eps^BCQ(s)} Q(s, a)
        (lecture: "BCQ with Function Approximation – Discrete Case")."""
        return masked_argmax(self.q_network(obs), allowed_actions(self.imitation(obs), self.config.threshold))

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_theta(s, a) for integer actions: (B,)."""
        return self.q_network(obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)

    def state_dict(self) -> dict:
        return {"q_network": self.q_network.state_dict(), "q_target": self.q_target.state_dict(),
                "imitation": self.imitation.state_dict(), "optimizer": self.optimizer.state_dict(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.q_network.load_state_dict(state["q_network"])
        self.q_target.load_state_dict(state["q_target"])
        self.imitation.load_state_dict(state["imitation"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.steps = int(state["steps"])


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if not dataset.discrete:
        fail(f"bcq_discrete.py is for discrete actions but '{config.env}' has continuous actions; "
             f"use algorithms/bcq.py")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    next_obs = normalizer(data["next_obs"]) if normalizer else data["next_obs"]
    sampler = TensorSampler({"obs": obs, "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": next_obs, "terminals": data["terminals"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("bcq_discrete", config, dataset, device, normalizer)
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
