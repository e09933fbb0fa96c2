"""Advantage-Weighted Regression (AWR): weighted behaviour cloning with Monte Carlo advantages.

Lecture sections: "Advantage-Weighted Objective" (the KL-constrained policy improvement whose solution is
pi'(a|s) proportional to pi_beta(a|s) exp(A(s,a) / beta)) and "Advantage-Weighted Regression", approach 1:
estimate V of the behaviour policy by Monte Carlo regression, min_V E[(G - V(s))^2], set A = G - V(s), and
maximise E[ log pi(a|s) exp(A / beta) ] over dataset actions only.
Paper: Peng, Kumar, Zhang & Levine 2019, "Advantage-Weighted Regression: Simple and Scalable Off-Policy
Reinforcement Learning".

Usage:
    python algorithms/awr.py --env hopper-medium-v2
    python algorithms/awr.py                                  # embedded default: local pendulum medium-replay
    python algorithms/awr.py --env hopper-medium-v2 --beta 0.05 --no-normalize-advantages   # the paper's beta

Monte Carlo targets: G_t = sum_{k >= t} gamma^(k-t) r_k, summed inside each episode and never across an
episode boundary (`OfflineDataset.transitions(returns_to_go_gamma=gamma)`). A truncated episode (time
limit) has its Monte Carlo return cut at the truncation: the rewards the behaviour policy would have
collected afterwards are missing, so G is biased over the last ~1/(1 - gamma) steps of every truncated
episode (V, which cannot see the time left, averages the bias in). Treating a time limit as the end of the
task is the mistake the whole library avoids for TD targets, so by default this file adds the missing tail
as a bootstrap, G_t + gamma^(T-t) V(s_T), for rows of truncated (not terminated) episodes, as the released
code's TD(lambda) does at such path ends; terminated episodes keep the pure Monte Carlo return.
`--no-bootstrap-truncations` gives the lecture's pure Monte Carlo approach 1 (on 200-step Pendulum episodes
with gamma 0.99 it then upweights the random actions of the last steps, whose cut returns look good, and
does no better than the behaviour policy).

Temperature: the paper writes exp(A / beta) with beta = 0.05 and weights clipped at 20; the released code
(xbpeng/awr, awr_agent.py) instead standardises the advantages, (A - mean) / std, and uses beta = 1.0 with
the same clip. The default here is the released code's convention (it does not depend on the reward
scale); `--beta 0.05 --no-normalize-advantages` gives the paper's. Advantages are standardised over each
minibatch (the released code used its whole replay buffer).

Other deviations from the paper, all for a library that trains every method the same way: Adam at 3e-4 on
256x256 networks, V and pi updated together on each minibatch (the paper alternates SGD-with-momentum
phases on 128x64 networks), and a state-independent learned log-std (the paper fixes the std at 0.2).
As in the released code, V regresses onto standardised returns (G - mean_G) / std_G.
Per-dataset settings (training length) live in `DATASET_SETTINGS` below; flags override them.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, OfflineDataset, TensorSampler, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
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
    # --- advantage-weighted regression ---
    beta: float = 1.0
    """temperature beta in the weight exp(A / beta) (the slide's epsilon). 1.0 goes with standardised
    advantages (the released code); the paper's 0.05 goes with --no-normalize-advantages"""
    normalize_advantages: bool = True
    """standardise A over the minibatch, (A - mean) / (std + 1e-5), before exp(A / beta) (released code)"""
    max_weight: float = 20.0
    """clip of the weight: min(exp(A / beta), max_weight) (the paper's and the code's 20)"""
    gamma: float = 0.99
    """gamma in the Monte Carlo return G_t = sum_k gamma^(k-t) r_k"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the policy and of the value network"""
    lr: float = 3e-4
    """Adam learning rate of the policy and of the value network"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3)"""
    bootstrap_truncations: bool = True
    """add gamma^(T-t) V(s_T) to the Monte Carlo return of rows whose episode was truncated (not
    terminated), as the released code's TD(lambda) does at such path ends; off: pure Monte Carlo (cut)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. D4RL-scale sets get the usual 1M steps; the small local sets far fewer.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 1_000_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # keeps the Gaussian's variance in a sane range
ADV_EPS = 1e-5  # the released code's epsilon in (A - mean) / (std + eps)


def advantage_weights(advantage: torch.Tensor, beta: float, max_weight: float,
                      normalize: bool) -> torch.Tensor:
    """w = min(exp(A' / beta), max_weight) with A' = A standardised over the batch (or A itself)."""
    if normalize:
        advantage = (advantage - advantage.mean()) / (advantage.std() + ADV_EPS)
    return torch.exp(advantage / beta).clamp(max=max_weight)  # an overflow to inf is clipped too


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Agent:
    """AWR's Gaussian policy, its Monte Carlo value network V(s), optimisers and update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("awr.py is for continuous actions (Box); this dataset has discrete actions")
        config = apply_dataset_settings(config, DATASET_SETTINGS)  # fills None fields, as train() does
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.actor = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        self.log_std = nn.Parameter(torch.zeros(spec.act_dim, device=device))
        self.value = mlp(spec.obs_dim, config.hidden_dims, 1).to(device)
        # V(s) = return_mean + return_std * value(s): the network regresses standardised returns
        self.return_mean = torch.zeros((), device=device)
        self.return_std = torch.ones((), device=device)
        self.actor_optimizer = adam(list(self.actor.parameters()) + [self.log_std], config.lr, config)
        self.value_optimizer = adam(self.value.parameters(), config.lr, config)
        self.params = [*self.value.parameters(), *self.actor.parameters(), self.log_std]  # what the loss trains
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.value_optimizer, self.actor_optimizer)

    def set_return_scale(self, returns: np.ndarray) -> None:
        """Standardise V's regression target with the dataset's return mean and std (train() calls it)."""
        self.return_mean.fill_(float(np.mean(returns)))
        self.return_std.fill_(float(np.std(returns)) + 1e-6)

    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """The Gaussian's mean max_action * tanh(MLP(s)), also the deterministic evaluation action."""
        return self.max_action * torch.tanh(self.actor(obs))

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"], batch["returns_to_go"],
                            batch.get("final_obs"), batch.get("tail_discount"))

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor,
                     final_obs: torch.Tensor | None,
                     tail_discount: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg = self.config
        if cfg.bootstrap_truncations and final_obs is not None:  # (the benchmark's batches carry none)
            # G_t <- G_t + gamma^(T-t) V(s_T) on rows of truncated episodes (tail_discount is 0 elsewhere)
            returns = returns + tail_discount * self.v_value(final_obs)

        # min_V E_(s,a)~D [ (G_(s,a) - V(s))^2 ]   (lecture: "Advantage-Weighted Regression", approach 1),
        # in standardised units: ((G - mean_G) / std_G - value(s))^2
        value_pred = self.value(obs).squeeze(-1)
        value_loss = (value_pred - (returns - self.return_mean) / self.return_std).square().mean()

        # A(s,a) = G_(s,a) - V(s)
        v = self.return_mean + self.return_std * value_pred.detach()
        weights = advantage_weights(returns - v, cfg.beta, cfg.max_weight, cfg.normalize_advantages)

        # theta = argmax_theta E_(s,a)~D [ log pi_theta(a|s) exp(A(s,a) / beta) ],  weights clipped at 20
        mean = self.mean_action(obs)
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        log_prob = (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std
                    - 0.5 * math.log(2 * math.pi)).sum(-1)
        actor_loss = -(weights * log_prob).mean()

        logs = {  # read before the backward, which consumes the graph these values hang on
            "train/value_loss": value_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/weight_mean": weights.mean(),
            "train/weight_max": weights.max(),
            "train/weight_clipped_frac": (weights >= cfg.max_weight).float().mean(),
        }
        # the two losses touch disjoint parameters (the advantage is detached): one backward serves both;
        # inputs: the parameters trained, named (with --compile, torch 2.13's traced backward loses bare
        # tensors such as log_std when the step is recompiled)
        (value_loss + actor_loss).backward(inputs=self.params)
        self.value_optimizer.step()
        self.actor_optimizer.step()
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action: the Gaussian's mean."""
        return self.mean_action(obs)

    @torch.no_grad()
    def v_value(self, obs: torch.Tensor) -> torch.Tensor:
        """V(s) of the behaviour policy in return units, shape (batch,)."""
        return self.return_mean + self.return_std * self.value(obs).squeeze(-1)

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "log_std": self.log_std.detach().clone(),
                "value": self.value.state_dict(), "return_mean": self.return_mean.clone(),
                "return_std": self.return_std.clone(), "actor_optimizer": self.actor_optimizer.state_dict(),
                "value_optimizer": self.value_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.value.load_state_dict(state["value"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
            self.return_mean.copy_(state["return_mean"])
            self.return_std.copy_(state["return_std"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.value_optimizer, state["value_optimizer"])


def monte_carlo_returns(dataset: OfflineDataset, gamma: float) -> dict[str, np.ndarray]:
    """Flat transitions with `returns_to_go` G_t, discounted and summed within each episode only.

    Returns the arrays `obs`, `actions`, `returns_to_go`, `final_obs` (the episode's last observation s_T)
    and `tail_discount` (gamma^(T-t) if the episode was truncated, else 0), N_total rows each. Episodes
    are never joined: the last step of an episode has G = r, whatever the next episode in the file holds.
    """
    data = dataset.transitions(returns_to_go_gamma=gamma)
    # for --bootstrap-truncations: each row's episode-final observation s_T and gamma^(T - t), the latter
    # zero unless the episode was truncated (a termination has nothing after it to bootstrap from)
    final_obs, tail_discount = [], []
    for ep in dataset.episodes:
        n = len(ep)
        final_obs.append(np.repeat(ep.observations[-1:], n, axis=0))
        truncated = bool(ep.truncations[-1]) and not bool(ep.terminations[-1])
        tail_discount.append(gamma ** np.arange(n, 0, -1, dtype=np.float64) * truncated)
    return {"obs": data["obs"], "actions": data["actions"], "returns_to_go": data["returns_to_go"],
            "final_obs": np.concatenate(final_obs).astype(np.float32),
            "tail_discount": np.concatenate(tail_discount).astype(np.float32)}


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"awr.py is for continuous actions; '{config.env}' has discrete actions")
    data = monte_carlo_returns(dataset, config.gamma)
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    arrays = {"obs": obs, "actions": data["actions"], "returns_to_go": data["returns_to_go"]}
    if config.bootstrap_truncations:
        arrays["final_obs"] = normalizer(data["final_obs"]) if normalizer else data["final_obs"]
        arrays["tail_discount"] = data["tail_discount"]
    sampler = TensorSampler(arrays, device, config.seed)
    agent = Agent(config, dataset.spec, device)
    agent.set_return_scale(data["returns_to_go"])

    run = Run("awr", config, dataset, device, normalizer)
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
