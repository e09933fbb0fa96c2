"""BAIL: best-action imitation learning, behaviour cloning of the points whose return reaches their upper envelope.

Lecture sections: "Filtered Behavior Cloning" and its "BAIL: Best-Action Imitation Learning" slides (Algorithm 1
Static BAIL): compute the Monte Carlo return G_i of every data point, fit an upper envelope V_phi(s) of the
returns with the penalty loss L^K (plus weight decay lambda ||phi||^2, a validation split and early stopping),
select the points with G_i > x V_phi(s_i), x set so that p% of the data are kept, and clone their actions.
Paper: Chen, Zhou, Wang, Wang, Wu & Ross 2020, "BAIL: Best-Action Imitation Learning for Batch Deep
Reinforcement Learning" (NeurIPS 2020); the authors' code is lanyavik/BAIL (main_static_bail.py).

Usage:
    python algorithms/bail.py                                  # embedded default: local pendulum medium-replay
    python algorithms/bail.py --env hopper-medium-replay-v2 --select-fraction 0.25 --envelope-k 10000

The three steps, as the slides order them:
  1. Returns. G_t = sum_k gamma^(k-t) r_k to the episode's end (gamma 0.99). Episodes that end without a
     termination (a time limit, or the end of the data) are augmented as the authors' `calculate_mc_gain`:
     each G_t (t >= 1) of an episode of T steps cut at state s_T gets the t missing steps of its horizon from
     the continuation of the state s_m most similar to s_T (L2 distance, m among s_0 .. s_{T-t}, so that the
     continuation has t real steps): G_t += gamma^(T-t) (G_m - gamma^t G_{m+t}). Every G_t then spans T steps.
     Adaptation to Minari episodes: truncation flags (not a `prev_s != next_obs` scan) say which episodes
     were cut, so only those are augmented, each with its own length as horizon (the authors: a fixed 1000,
     and every episode with `end - start >= rollout - 1`, i.e. of 1000 steps or more, counts as cut); and the
     match is on the state the episode was cut at, s_T, which Minari stores (the authors match the last state
     that has an action, s_{T-1}).
  2. Upper envelope. V_phi (MLP 128-128, output layer scaled by 0.1, as the authors) minimises
     L^K = mean_i (V(s_i) - G_i)^2 {1(V >= G) + K 1(V < G)} with Adam (lr 3e-3, weight decay 2e-2 as lambda),
     batch 800, 50 epochs over the training split (80%; the highest return is kept in training), the validation
     loss after every epoch (all as the authors). What happens with that validation loss differs:
       - this file (default, `--envelope-early-stopping`): after 4 epochs without a lower validation loss the
         training stops and the phi of the lowest validation loss is restored: the slides' "validation split and
         early stopping", made to work;
       - the authors' code (`--no-envelope-early-stopping`): all 50 epochs run and the last phi is kept. Their
         train_upper_envelope counts 4 epochs without improvement and then "restores" the best weights, but
         it keeps `state_dict()` references (views of the live weights), so the restore is a no-op, and it
         never stops early.
  3. Selection and BC. ratio_i = G_i / V(s_i); the top p = 25% ratios are kept (x = the smallest kept ratio), then
     a deterministic tanh policy (400-300) is cloned on them with the l2 loss (Adam 1e-3, batch 1000).
     V <= 0: the paper's ratio assumes positive returns. When some return is negative, returns and envelope
     are shifted by c = min_i G_i before the ratio, (G_i - c) / (V(s_i) - c), so that the worst return maps to 0
     (Pendulum's returns are all negative); with non-negative returns c = 0 and this is the paper's ratio.
     A denominator <= 0 (an envelope below even the lowest return) is clamped to 1e-6: the point lies above
     its envelope and ranks first. The authors' progressive variant maps V < 1 to exp(V - 1) instead, which
     breaks on negative returns.

The envelope and the selection are computed once, before the BC steps (`--max-steps` counts BC steps), logged
at step 0 (`envelope/train_loss`, `envelope/val_loss` per epoch, `envelope/under_fraction`: share of training
points with G_i <= V(s_i), `envelope/selected_fraction`, `envelope/border_x`), saved in the agent's state (a
checkpoint is written right after), and read back from the checkpoint on --resume, so a resumed run clones
exactly the same points.

Per-dataset settings in `DATASET_SETTINGS`: K (10,000 as the paper's text; the authors' scripts pass 1000)
and the number of BC steps (the authors' 200k; fewer for the small local sets). BC batch 1000 as the authors.

--compile compiles the BC step and the envelope's step (common/optim.py; an epoch's last, smaller envelope batch
is a second graph); the envelope's validation pass and the selection run eagerly, once.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.checkpoint import load_checkpoint  # noqa: E402
from common.datasets import (DataSpec, Episode, ObsNormalizer, OfflineDataset, TensorSampler,  # noqa: E402
                             discounted_returns_to_go, load_dataset)
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.optim import adam, keep, load_optimizer, update_step  # noqa: E402
from common.runs import Run, apply_dataset_settings, resolve_config, run_cli, setup  # noqa: E402

PAPER_BATCH_SIZE = 1_000  # the authors' BC minibatch (main_static_bail.py)


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
    batch_size: int = PAPER_BATCH_SIZE
    """minibatch size of the BC steps (the authors' 1000)"""
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
    # --- BAIL ---
    gamma: float = 0.99
    """gamma in the Monte Carlo return G_i = sum_k gamma^k r_(i+k) (the authors' 0.99)"""
    augment_returns: bool = True
    """augment G_i of episodes cut by a time limit with the continuation of the most similar state (the
    authors' 'gain' augmentation); --no-augment-returns keeps the plain truncated returns"""
    envelope_k: float | None = None
    """K in L^K: squared errors where V_phi(s_i) < G_i weigh K times more (None: from DATASET_SETTINGS; the
    paper's text says 10,000, the authors' scripts pass 1000)"""
    envelope_weight_decay: float = 2e-2
    """lambda of the lambda ||phi||^2 term, applied as Adam's weight decay (the authors' 2e-2)"""
    envelope_lr: float = 3e-3
    """Adam learning rate of V_phi (the authors' 3e-3)"""
    envelope_hidden_dims: tuple[int, ...] = (128, 128)
    """hidden layer sizes of the upper envelope V_phi (the authors' 128x128)"""
    envelope_batch_size: int = 800
    """minibatch B of the envelope's steps (the authors' 800)"""
    envelope_epochs: int = 50
    """passes over the training split B_t, at most (the authors' 50)"""
    envelope_early_stopping: bool = True
    """stop after --envelope-patience epochs without a lower validation loss and restore the phi of the lowest
    one (this file's default: the slides' early stopping); --no-envelope-early-stopping runs every epoch and
    keeps the last phi, which is what the authors' code does (its restore is a no-op)"""
    envelope_patience: int = 4
    """with --envelope-early-stopping: epochs without a lower validation loss before stopping (the authors' count
    of 4)"""
    val_fraction: float = 0.2
    """share of the data held out as the validation set B_v (the authors' 20%; 0: no early stopping)"""
    select_fraction: float = 0.25
    """p: share of the data kept by G_i > x V_phi(s_i) (the paper's 25%)"""
    hidden_dims: tuple[int, ...] = (400, 300)
    """hidden layer sizes of the cloned policy pi_theta (the authors' 400-300)"""
    lr: float = 1e-3
    """Adam learning rate of pi_theta (the authors' 1e-3)"""
    normalize_obs: bool = False
    """standardise observations with the dataset's mean and std (the authors do not)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The authors clone for 200k steps; the small local sets need far fewer.
# K: the paper's 10,000 (its text; the authors' scripts pass 1000, which left 10-20% of the returns of the
# tests' mixed pendulum set above the envelope, against about 1% at 10,000).
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"envelope_k": 10_000.0, "max_steps": 20_000}),
    ("test/*", {"envelope_k": 10_000.0, "max_steps": 3_000}),
    ("*", {"envelope_k": 10_000.0, "max_steps": 200_000}),
]

RATIO_EPS = 1e-6  # floor of the shifted envelope in the ratio's denominator
VALUE_CHUNK = 65_536  # rows per forward pass when the envelope is evaluated on the whole dataset


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# The upper envelope's loss (step 2), and the agent: envelope, selection, behaviour cloning (steps 2 and 3)
# --------------------------------------------------------------------------------------------------


def envelope_loss(v: torch.Tensor, g: torch.Tensor, k: float) -> torch.Tensor:
    """Per point (V - G)^2 {1(V >= G) + K 1(V < G)}: the slide's L^K without the lambda term."""
    diff = v - g
    return torch.where(diff >= 0, 1.0, k) * diff.square()


class Agent:
    """BAIL's upper envelope V_phi, the cloned policy pi_theta, their optimisers, and the selected points."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("bail.py is for continuous actions (Box); this dataset has discrete actions")
        config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.policy = mlp(spec.obs_dim, config.hidden_dims, spec.act_dim).to(device)
        self.optimizer = adam(self.policy.parameters(), config.lr, config)
        self.envelope = mlp(spec.obs_dim, config.envelope_hidden_dims, 1).to(device)
        with torch.no_grad():  # the authors' value head: weights scaled by 0.1, bias 0
            self.envelope[-1].weight.mul_(0.1)
            self.envelope[-1].bias.zero_()
        # lambda ||phi||^2 as Adam's (coupled) weight decay on every parameter of phi, as the authors
        self.envelope_optimizer = adam(self.envelope.parameters(), config.envelope_lr, config,
                                       weight_decay=config.envelope_weight_decay)
        self.selected = torch.zeros(0, dtype=torch.bool)  # U, as a mask over the dataset's rows (CPU)
        self.envelope_stats: dict[str, float] = {}
        # each: zero_grad of its optimiser, then the step (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)
        self._envelope_update = update_step(self._envelope_update_impl, config, self.envelope_optimizer)

    # --- step 2: the upper envelope ------------------------------------------------------------------
    def envelope_update(self, obs: torch.Tensor, returns: torch.Tensor) -> torch.Tensor:
        """One step on L^K for a minibatch; returns the minibatch's loss (kept: fit_envelope holds an epoch's)."""
        return keep(self._envelope_update(obs, returns))["envelope/loss"]

    def _envelope_update_impl(self, obs: torch.Tensor, returns: torch.Tensor) -> dict[str, torch.Tensor]:
        v = self.envelope(obs).squeeze(-1)
        # L^K(phi) = sum_i (V_phi(s_i) - G_i)^2 {1(V_phi(s_i) >= G_i) + K 1(V_phi(s_i) < G_i)} + lambda ||phi||^2
        # (lecture: "BAIL: Best-Action Imitation Learning"; a batch mean; lambda as Adam's weight decay)
        loss = envelope_loss(v, returns, self.config.envelope_k).mean()
        logged = loss.detach()  # taken before the backward, which consumes loss's graph
        # inputs: the parameters the loss trains, named (with --compile, torch 2.13's traced backward may lose
        # parameters that are not named when the step is recompiled)
        loss.backward(inputs=list(self.envelope.parameters()))
        self.envelope_optimizer.step()
        return {"envelope/loss": logged}

    @torch.no_grad()
    def values(self, obs: torch.Tensor) -> torch.Tensor:
        """V_phi(s) for every row, in chunks, shape (N,)."""
        return torch.cat([self.envelope(chunk).squeeze(-1) for chunk in obs.split(VALUE_CHUNK)])

    def fit_envelope(self, obs: torch.Tensor, returns: torch.Tensor,
                     log: Callable[[dict[str, float]], None] = lambda _: None) -> dict[str, float]:
        """Fit V_phi to (obs, returns) on a random training split with early stopping on the validation split and
        the best phi restored (--no-envelope-early-stopping: every epoch, the last phi kept, as the authors), and
        return the fit's statistics (also kept in `envelope_stats`)."""
        cfg = self.config
        n = len(returns)
        generator = torch.Generator().manual_seed(cfg.seed)  # split and epoch order: CPU, the same on any device
        perm = torch.randperm(n, generator=generator)
        n_val = int(n * cfg.val_fraction)
        best_point = int(returns.argmax())  # the highest return always trains (the authors)
        where = int((perm == best_point).nonzero()[0])
        if where < n_val:
            perm[[where, n_val]] = perm[[n_val, where]]
        val_idx, train_idx = perm[:n_val].to(self.device), perm[n_val:].to(self.device)
        best = (math.inf, 0, copy.deepcopy(self.envelope.state_dict()))
        since_best, epoch = 0, 0
        for epoch in range(1, cfg.envelope_epochs + 1):
            order = train_idx[torch.randperm(len(train_idx), generator=generator).to(self.device)]
            losses = [self.envelope_update(obs[chunk], returns[chunk])
                      for chunk in order.split(cfg.envelope_batch_size)]
            train_loss = float(torch.stack(losses).mean())
            val_loss = (float(envelope_loss(self.values(obs[val_idx]), returns[val_idx], cfg.envelope_k).mean())
                        if n_val else train_loss)
            log({"envelope/epoch": epoch, "envelope/train_loss": train_loss, "envelope/val_loss": val_loss})
            if val_loss < best[0] or not n_val:  # without a validation split: the last epoch, no early stop
                best, since_best = (val_loss, epoch, copy.deepcopy(self.envelope.state_dict())), 0
            else:
                since_best += 1
                if since_best >= cfg.envelope_patience and cfg.envelope_early_stopping:
                    break
        if cfg.envelope_early_stopping:
            self.envelope.load_state_dict(best[2])  # phi' : the lowest validation loss
        # else the last epoch's phi, as the authors' code returns it
        values = self.values(obs)
        under = (values >= returns).float()
        self.envelope_stats = {"envelope/epochs": epoch, "envelope/best_epoch": best[1],
                               "envelope/val_loss_best": best[0],
                               "envelope/under_fraction": float(under[train_idx].mean())}
        if n_val:
            self.envelope_stats["envelope/under_fraction_val"] = float(under[val_idx].mean())
        return self.envelope_stats

    def select(self, obs: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """U = the points with G_i > x V_phi(s_i), x such that p% are kept; returns the selection's statistics."""
        selected, border = select_top_ratios(returns, self.values(obs), self.config.select_fraction)
        self.selected = selected.cpu()
        self.envelope_stats.update({"envelope/selected_fraction": float(selected.float().mean()),
                                    "envelope/border_x": border,
                                    "envelope/selected_return_mean": float(returns[selected].mean()),
                                    "envelope/return_mean": float(returns.mean())})
        return self.envelope_stats

    # --- step 3: behaviour cloning on U --------------------------------------------------------------
    def mean_action(self, obs: torch.Tensor) -> torch.Tensor:
        """pi_theta(s) = max_action * tanh(MLP(s)) (the authors' actor)."""
        return self.max_action * torch.tanh(self.policy(obs))

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        # grad_theta sum_(i in U) (pi_theta(s_i) - a_i)^2   (lecture: "BAIL: Best-Action Imitation Learning";
        # a mean over the batch and action dimensions, as the authors)
        loss = (self.mean_action(obs) - actions).square().mean()
        logs = {"train/policy_loss": loss.detach()}  # taken before the backward, which consumes loss's graph
        # inputs: the parameters the loss trains, named (as the envelope's step)
        loss.backward(inputs=list(self.policy.parameters()))
        self.optimizer.step()
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action pi_theta(s)."""
        return self.mean_action(obs)

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "envelope": self.envelope.state_dict(), "envelope_optimizer": self.envelope_optimizer.state_dict(),
                "selected": self.selected.clone(), "envelope_stats": dict(self.envelope_stats)}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.envelope.load_state_dict(state["envelope"])
        load_optimizer(self.envelope_optimizer, state["envelope_optimizer"])
        self.selected = state["selected"].cpu().clone()
        self.envelope_stats = dict(state["envelope_stats"])


# --------------------------------------------------------------------------------------------------
# What train() uses: step 1's Monte Carlo returns, step 3's selection rule, the data and settings checks
# --------------------------------------------------------------------------------------------------


def monte_carlo_returns(episode: Episode, gamma: float, augment: bool = True) -> np.ndarray:
    """G_t of one episode, float64 `(N,)`: the discounted return to the episode's end; for an episode that
    does not end in a termination (and `augment`), G_t (t >= 1) += gamma^(N-t) (G_m - gamma^t G_(m+t)) with
    m = argmin_{k <= N-t} ||s_k - s_N|| (first one on ties) and G_N = 0: the t steps missing from G_t's
    N-step horizon, from the continuation of the state most similar to the one the episode was cut at."""
    n = len(episode)
    g = np.zeros(n + 1)
    g[:n] = discounted_returns_to_go(episode.rewards, gamma)
    if not augment or bool(episode.terminations[-1]) or n < 2:
        return g[:n]
    obs = episode.observations.reshape(n + 1, -1).astype(np.float64)
    dist = np.linalg.norm(obs[:n] - obs[n], axis=1)
    # first argmin of dist[0..k] for every k: the last position up to k where a strictly lower value appeared
    prefix_min = np.minimum.accumulate(dist)
    new_min = np.concatenate([[True], dist[1:] < prefix_min[:-1]])
    first_argmin = np.maximum.accumulate(np.where(new_min, np.arange(n), 0))
    t = np.arange(1, n)
    m = first_argmin[n - t]
    out = g[:n].copy()
    out[1:] += gamma ** (n - t) * (g[m] - gamma ** t * g[m + t])
    return out


def select_top_ratios(returns: torch.Tensor, values: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float]:
    """(bool mask of the round(p N) points with the highest G_i / V(s_i), x = the smallest kept ratio).

    Returns and envelope are shifted by c = min(0, min_i G_i) first, and the denominator is floored at
    RATIO_EPS, so that the ratio stays meaningful when returns or V are <= 0 (see the module docstring).
    """
    shift = torch.clamp(returns.min(), max=0.0)
    ratio = (returns - shift) / (values - shift).clamp(min=RATIO_EPS)
    n_kept = max(1, round(fraction * len(returns)))
    order = torch.argsort(ratio, descending=True, stable=True)
    selected = torch.zeros(len(returns), dtype=torch.bool, device=returns.device)
    selected[order[:n_kept]] = True
    return selected, float(ratio[order[n_kept - 1]])


def check_episodes(dataset: OfflineDataset) -> None:
    """One clear line for data BAIL cannot use: no episode boundaries, or episodes under 2 steps."""
    episodes = dataset.episodes
    if not any(bool(e.terminations[-1] or e.truncations[-1]) for e in episodes):
        fail(f"'{dataset.name}' has no episode boundaries (no episode ends in a termination or truncation): "
             f"Monte Carlo returns need whole episodes; store the data episode by episode")
    short = [i for i, e in enumerate(episodes) if len(e) < 2]
    if short:
        fail(f"'{dataset.name}' has {len(short)} episode(s) shorter than 2 steps (episode {short[0]} has "
             f"{len(episodes[short[0]])}); BAIL's returns need trajectories: drop them or use another dataset")


def check_config(config: Config) -> None:
    """One clear line for settings BAIL cannot run with (before anything is written)."""
    checks = [
        (0.0 < config.select_fraction <= 1.0,
         f"--select-fraction (p) must lie in (0, 1], got {config.select_fraction}"),
        (0.0 <= config.val_fraction < 1.0, f"--val-fraction must lie in [0, 1), got {config.val_fraction}"),
        (0.0 <= config.gamma <= 1.0, f"--gamma must lie in [0, 1], got {config.gamma}"),
        (config.envelope_k > 0, f"--envelope-k (K) must be positive, got {config.envelope_k}"),
        (config.envelope_epochs >= 1 and config.envelope_patience >= 1 and config.envelope_batch_size >= 1,
         f"--envelope-epochs, --envelope-patience and --envelope-batch-size must be at least 1 (got "
         f"{config.envelope_epochs}, {config.envelope_patience}, {config.envelope_batch_size})"),
        (config.envelope_weight_decay >= 0 and config.envelope_lr > 0 and config.lr > 0,
         "--envelope-weight-decay must be >= 0 and the learning rates positive"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"bail.py is for continuous actions; '{config.env}' has discrete actions")
    check_episodes(dataset)
    data = dataset.transitions()
    # step 1: G_i for every data point, episode by episode (rows in the order of `transitions()`)
    returns = np.concatenate([monte_carlo_returns(e, config.gamma, config.augment_returns)
                              for e in dataset.episodes]).astype(np.float32)
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    agent = Agent(config, dataset.spec, device)

    run = Run("bail", config, dataset, device, normalizer)
    if config.resume:
        # the envelope and the selection are part of the checkpoint: the resumed run clones the same points
        agent.load_state_dict(load_checkpoint(config.resume, map_location=device)["agent"])
    else:
        # step 2: the upper envelope; step 3: the selection U (logged at step 0)
        obs_t, returns_t = torch.as_tensor(obs, device=device), torch.as_tensor(returns, device=device)
        agent.fit_envelope(obs_t, returns_t, log=lambda entries: run.log(0, entries))
        stats = agent.select(obs_t, returns_t)
        run.log(0, stats)
        kept = "restored" if config.envelope_early_stopping else "the last kept"
        print(f"upper envelope: {stats['envelope/epochs']} epochs (best {stats['envelope/best_epoch']}, {kept}), "
              f"{100 * stats['envelope/under_fraction']:.1f}% of the training returns under it; selected "
              f"{100 * stats['envelope/selected_fraction']:.1f}% of {len(returns)} points (x = "
              f"{stats['envelope/border_x']:.3f}, mean return {stats['envelope/selected_return_mean']:.1f} against "
              f"{stats['envelope/return_mean']:.1f})", file=sys.stderr, flush=True)
    selected = agent.selected.numpy()
    sampler = TensorSampler({"obs": obs[selected], "actions": data["actions"][selected]}, device, config.seed)
    start = run.resume(agent, sampler)
    if not config.resume:
        run.save_checkpoint(0, agent, sampler)  # the envelope and the selection survive a kill from here on
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
    stats = agent.envelope_stats
    return run.finish(result, extra={k.replace("envelope/", "envelope_"): v for k, v in stats.items()})


if __name__ == "__main__":
    run_cli(train, Config)
