"""Behaviour cloning (BC) and filtered behaviour cloning (BC-x%): supervised learning of pi(a|s) from data.

Lecture sections: "Behavior Cloning / Imitation Learning" (train the policy to mimic the demonstrations,
minimise cross-entropy or l2 loss) and, with `--top-fraction`, "Filtered Behavior Cloning" (clone only the
best trajectories by return). `--top-fraction 0.1` keeps the round(0.1 n) episodes of highest undiscounted
return; CORL's BC-10% is `--top-fraction 0.1 --top-discount 0.99 --top-count floor` (its ranking uses the
0.99-discounted return and keeps int(0.1 n) episodes).
Papers: Pomerleau 1989 (ALVINN); Chen et al. 2021 (Decision Transformer, the %BC baseline).

Usage:
    python algorithms/bc.py                                   # embedded default: local pendulum expert data
    python algorithms/bc.py --env halfcheetah-medium-v2 --top-fraction 0.1 --policy gaussian

Heads: `deterministic` (l2 loss on tanh-bounded actions), `gaussian` (negative log-likelihood of a
Gaussian with a tanh-bounded mean and a state-independent log-std), and for discrete actions a
categorical head (cross-entropy), chosen automatically.
Per-dataset settings (training length) live in `DATASET_SETTINGS` below; flags override them.

--compile compiles the whole update (common/optim.py).
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
    # --- behaviour cloning ---
    policy: Literal["deterministic", "gaussian"] = "deterministic"
    """continuous-action head: deterministic pi(s) with the l2 loss, or Gaussian pi(a|s) with the NLL"""
    top_fraction: float = 1.0
    """filtered BC: keep only this fraction of episodes, the best by return (0.1: BC-10%)"""
    top_discount: float = 1.0
    """gamma of the return that ranks episodes for --top-fraction: 1 ranks by the undiscounted return (the
    lecture's filtered BC, the Decision Transformer paper's %BC); CORL's BC-10% ranks by the 0.99-discounted one"""
    top_count: Literal["round", "floor"] = "round"
    """how many of n episodes --top-fraction f keeps: round(f n) (nearest), or floor(f n) as CORL (at least 1)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the policy MLP"""
    lr: float = 3e-4
    """Adam learning rate (CORL: 3e-4)"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. CORL trains BC for 1M steps on D4RL; the small local sets need far fewer.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("local/cartpole/*", {"max_steps": 20_000}),
    ("*", {"max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps the Gaussian head's variance in a sane range


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Agent:
    """The BC policy, its optimiser and the update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        self.config, self.spec, self.device = config, spec, device
        self.discrete = spec.discrete
        self.gaussian = config.policy == "gaussian" and not spec.discrete
        self.policy = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        # state-independent log-std of the Gaussian head (unused by the other heads)
        self.log_std = nn.Parameter(torch.zeros(spec.act_dim, device=device))
        self.params = list(self.policy.parameters()) + ([self.log_std] if self.gaussian else [])
        self.optimizer = adam(self.params, config.lr, config)
        self.max_action = spec.max_action
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """pi(s) = max_action * tanh(MLP(s)) (continuous heads: the Gaussian's mean is bounded too)."""
        return self.max_action * torch.tanh(self.policy(obs))

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.discrete:
            # min_theta -E_(s,a)~D [ log pi_theta(a|s) ]  (cross-entropy)   (lecture: "Behavior Cloning")
            loss = F.cross_entropy(self.policy(obs), actions)
        elif self.gaussian:
            mean = self.mean_action(obs)
            log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
            # log pi_theta(a|s) = sum_i [ -(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi) / 2 ]
            log_prob = (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std
                        - 0.5 * math.log(2 * math.pi)).sum(-1)
            # min_theta -E_(s,a)~D [ log pi_theta(a|s) ]   (lecture: "Behavior Cloning / Imitation Learning")
            loss = -log_prob.mean()
        else:
            # min_theta E_(s,a)~D || pi_theta(s) - a ||^2   (l2 loss; lecture: "Behavior Cloning")
            loss = F.mse_loss(self.mean_action(obs), actions)
        logs = {"train/policy_loss": loss.detach()}  # taken before the backward, which consumes loss's graph
        # inputs: the parameters the loss trains, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_std when the step is recompiled)
        loss.backward(inputs=self.params)
        self.optimizer.step()
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: the argmax (discrete) or the mean pi(s) (continuous)."""
        if self.discrete:
            return self.policy(obs).argmax(-1)
        return self.mean_action(obs)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "log_std": self.log_std.detach().clone(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        load_optimizer(self.optimizer, state["optimizer"])


def check_config(config: Config) -> None:
    """One clear line for filtered-BC settings outside their range (before anything is read or written)."""
    if not 0.0 < config.top_fraction <= 1.0:  # NaN fails too
        fail(f"--top-fraction must lie in (0, 1] (the share of episodes kept; 1 keeps all), got {config.top_fraction}")
    if not 0.0 <= config.top_discount <= 1.0:
        fail(f"--top-discount must lie in [0, 1] (gamma of the ranking return), got {config.top_discount}")


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if config.top_fraction < 1.0:
        full = len(dataset.episodes)
        # lecture: "Filtered Behavior Cloning"
        dataset = dataset.top_episodes(config.top_fraction, config.top_discount, config.top_count)
        print(f"filtered BC: kept the best {len(dataset.episodes)} of {full} episodes by return",
              file=sys.stderr)
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    sampler = TensorSampler({"obs": obs, "actions": data["actions"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("bc", config, dataset, device, normalizer)
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
