"""Conservative Q-Learning, CQL(H), on a double-DQN critic, for discrete actions.

Lecture sections: "Conservative Q-Learning", "Conservative Evaluation" (push Q down on all actions through the
soft-maximum log sum_a exp Q(s,a), up on the dataset action) and "Conservative Control" (the greedy policy of
the conservative Q-function: "policy improvement can be done using standard Q-learning").
Paper: Kumar, Zhou, Tucker, Levine 2020, "Conservative Q-Learning for Offline Reinforcement Learning"
(their Atari agent is CQL(H) on QR-DQN; this file uses a plain double-DQN critic).

Usage:
    python algorithms/cql_discrete.py                          # embedded default: local cartpole data
    python algorithms/cql_discrete.py --env local/cartpole/medium-replay-v0 --cql-alpha 4.0

With discrete actions the sum over actions in log sum_a exp Q(s,a) is exact: no sampling, no importance
weights. The regulariser subtracts Q at the DATASET action, not the mean over actions (a bug in a popular
re-implementation, BY571/CQL issue #5, which makes the term push all actions down equally).
TD loss: Huber by default (`--td-loss mse` for the squared error). Target network: Polyak averaging every
step, or a hard copy every `--target-update-period` steps (DQN style).
Per-dataset settings (training length) live in `DATASET_SETTINGS` below; flags override them.

--compile compiles the whole update with its Polyak target update (common/optim.py); the hard copy of
`--target-update-period` runs between steps, outside it.
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
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, resolve_config, run_cli, setup  # noqa: E402

DISCRETE_ONLY = True  # bench gives this file a discrete DataSpec


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
    # --- conservative Q-learning, discrete actions ---
    cql_alpha: float = 1.0
    """alpha in alpha * E_(s,a)~D [ log sum_a' exp Q(s,a') - Q(s,a) ] (paper, Atari: 1.0 with 10% of the data,
    4.0 with 1%; 0 gives plain offline double DQN)"""
    lr: float = 3e-4
    """Adam learning rate of the Q-network"""
    gamma: float = 0.99
    """gamma in the target r + gamma * (1 - done) * Q'(s', argmax_a' Q(s', a'))"""
    td_loss: Literal["huber", "mse"] = "huber"
    """loss on the TD error: Huber (smooth L1 with delta 1, as DQN) or the squared error"""
    tau: float = 5e-3
    """Polyak rate tau of the target network: Q' <- (1 - tau) Q' + tau Q every step (when target_update_period
    is 0)"""
    target_update_period: int = 0
    """copy Q into Q' every this many steps instead of Polyak averaging (0: Polyak; DQN uses 8000 frames)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the Q-network"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The paper trains its Atari agents for 50M frames; the small local sets need less.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/cartpole/*", {"max_steps": 50_000}),
    ("*", {"max_steps": 1_000_000}),
]


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def discrete_cql_gap(q_all: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log sum_a' exp Q(s, a') - Q(s, a_data) per state: q_all (B, |A|), actions (B,) int -> (B,).

    The exact CQL(H) regulariser for a finite action set: the soft-maximum over ALL actions minus the Q-value
    of the action the dataset took (not the mean over actions). It is >= 0 and is zero only when the dataset
    action holds all the softmax mass.
    """
    q_data = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)
    return torch.logsumexp(q_all, dim=1) - q_data


class Agent:
    """Q-network, its target network and the CQL(H) double-DQN update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if not spec.discrete:
            fail("cql_discrete.py is for discrete actions; for continuous (Box) actions use algorithms/cql.py")
        self.config, self.spec, self.device = config, spec, device
        self.q_network = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        self.target_network = copy.deepcopy(self.q_network).requires_grad_(False)
        self.optimizer = adam(self.q_network.parameters(), config.lr, config)
        self.step = 0
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logs = self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])
        self.step += 1
        period = self.config.target_update_period
        if period > 0 and self.step % period == 0:  # hard copy Q' <- Q (rare: outside the compiled step)
            with torch.no_grad():
                torch._foreach_copy_(list(self.target_network.parameters()), list(self.q_network.parameters()))
        return logs

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     next_obs: torch.Tensor, terminals: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        q_all = self.q_network(obs)  # Q(s, .)  (B, |A|)
        q_data = q_all.gather(1, actions.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            # double DQN target: the online network picks a' = argmax_a' Q(s', a'), the target network rates it:
            #   T Q(s,a) = r + gamma (1 - done) Q'(s', argmax_a' Q(s', a'))   (terminations only, not timeouts)
            next_actions = self.q_network(next_obs).argmax(dim=1, keepdim=True)
            next_q = self.target_network(next_obs).gather(1, next_actions).squeeze(1)
            target = rewards + cfg.gamma * (1.0 - terminals) * next_q
        # 1/2 E_(s,a,s')~D [ (Q(s,a) - T Q(s,a))^2 ]   (lecture: "Conservative Evaluation"; Huber by default)
        if cfg.td_loss == "huber":
            td_loss = F.smooth_l1_loss(q_data, target)
        else:
            td_loss = 0.5 * F.mse_loss(q_data, target)
        # CQL(H):  alpha ( E_s~D [ log sum_a exp Q(s,a) ] - E_(s,a)~D [ Q(s,a) ] )
        # (lecture: "Conservative Evaluation"; the soft-maximum is the exact sum over the |A| actions)
        cql_gap = discrete_cql_gap(q_all, actions).mean()
        loss = td_loss + cfg.cql_alpha * cql_gap
        logs = {"train/critic_loss": loss.detach(), "train/td_loss": td_loss.detach(),  # before the backward
                "train/cql_gap": cql_gap.detach(), "train/q_data": q_data.detach().mean(),
                "train/q_policy": q_all.detach().max(dim=1).values.mean()}
        loss.backward()
        self.optimizer.step()
        if cfg.target_update_period <= 0:
            with torch.no_grad():  # Q' <- (1 - tau) Q' + tau Q
                torch._foreach_lerp_(list(self.target_network.parameters()), list(self.q_network.parameters()),
                                     cfg.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Greedy action argmax_a Q(s, a)  (lecture: "Conservative Control")."""
        return self.q_network(obs).argmax(dim=-1)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q(s, a) for integer actions (batch,) -> (batch,)."""
        return self.q_network(obs).gather(1, actions.long().unsqueeze(1)).squeeze(1)

    def state_dict(self) -> dict:
        return {"q_network": self.q_network.state_dict(), "target_network": self.target_network.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.q_network.load_state_dict(state["q_network"])
        self.target_network.load_state_dict(state["target_network"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.step = int(state["step"])


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if not dataset.discrete:
        fail(f"'{config.env}' has continuous actions; cql_discrete.py needs discrete ones: use algorithms/cql.py")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs, next_obs = (normalizer(data["obs"]), normalizer(data["next_obs"])) if normalizer else \
        (data["obs"], data["next_obs"])
    sampler = TensorSampler({"obs": obs, "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": next_obs, "terminals": data["terminals"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("cql_discrete", config, dataset, device, normalizer)
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
