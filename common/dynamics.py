"""Learned dynamics for model-based offline RL (mopo.py, combo.py): the ensemble, its fit, rollouts, the buffer.

Lecture: "Model-based Offline Policy Optimization" step 1 ("estimate r(s, a) and p(s'|s, a) from D" with an
ensemble {T^i = N(mu^i, Sigma^i)}) and "COMBO - Algorithm" lines 1, 2 and 4 (train the probabilistic dynamics
model on D, start an empty D_model, roll the policy out in the model from dataset states into D_model).
Both algorithm files do these steps identically; what differs (MOPO's pessimistic reward, COMBO's conservative
critic) stays in the algorithm file.

The ensemble follows the MOPO code and OfflineRL-Kit: K Gaussian members over (s' - s, r) with Swish hidden
layers, learned soft bounds on the log-variance, per-layer weight decay, standardised inputs, a bootstrap
resample of the training split per member, early stopping on a held-out split (min(20%, 1000) transitions,
MSE of the mean), and the members with the lowest held-out MSE as elites (a random elite draws each model
step). Model steps end where the env's own termination rule says so (`TERMINATION_RULES`, written from the
Gymnasium sources); for any other env `--termination learned` trains a termination head on the dataset's
terminals, else the run is refused.

What an algorithm file calls, in the order of its train():
    data = model_data(config, dataset, "mopo.py")    # checks and the --dynamics file, before anything is written
    agent.model = LearnedModel(config, spec, device)    # inside the Agent: ensemble, rule, model buffer
    fit_or_load_dynamics(agent.model, data, config, dataset, run, checkpoint)   # once per run, after resume
    rollouts, stats = model_rollout(policy, agent.model.ensemble, agent.model.termination, starts, h)
    agent.model.add(rollouts, stats); agent.model.mix(batch, n_real)      # D_model, and f D + (1 - f) D_model
The config is the algorithm's own dataclass: this module reads its dynamics fields (`ensemble_size`,
`num_elites`, `dynamics_*`, `termination`, `dynamics`, `rollout_*`, `model_retain_rounds`, `seed`, `resume`).
Both files' actors are the same tanh-squashed Gaussian, whose sampler and log-density are common/networks.py's
(`sample_tanh_gaussian`; two copies had drifted: one left out the -log(max_action) of the scaling). Saved files
(`--dynamics`, the partial fit) are loaded with weights_only=True: nothing in them runs.

Randomness: the fit draws from its own generator (seeded with the run's seed), so a run that loads a saved
ensemble is the run that fitted it; rollouts and the buffer draw from the global torch RNG, which checkpoints
save. Everything here runs eagerly: a rollout keeps a data-dependent number of transitions (one host sync per
round), and the fit syncs once per epoch for early stopping.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import safe_load, save_checkpoint
from common.datasets import DataSpec
from common.errors import fail
from common.runs import Progress

MAX_LOGVAR_INIT, MIN_LOGVAR_INIT = 0.5, -10.0  # initial soft bounds on the ensemble's log-variance (MOPO code)
LOGVAR_BOUND_COEF = 0.01  # weight of sum(max_logvar) - sum(min_logvar) in the ensemble's loss (MOPO code)
IMPROVEMENT = 0.01  # a member's held-out error must drop by more than 1% to count as an improvement (MOPO code)
DIVERGENCE_FACTOR = 1e3  # held-out error above this multiple of max(initial error, MSE of predicting 0): diverged
DYNAMICS_SAVE_SECONDS = 60.0  # a run killed while fitting the ensemble loses at most about this much of it
DYNAMICS_FORMAT = "offline-rl probabilistic dynamics ensemble, v1"  # the saved file's kind (mopo.py, combo.py)
TRANSITION_KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")  # what the model is fitted on


# ---------------------------------------------------------------------------------------------------------
# Termination rules, written from the Gymnasium sources (gymnasium/envs/mujoco/*_v5.py, classic_control)
# ---------------------------------------------------------------------------------------------------------

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hopper_termination(healthy_state_range=(-100.0, 100.0), healthy_z_range=(0.7, float("inf")),
                       healthy_angle_range=(-0.2, 0.2), exclude_current_positions_from_observation=True,
                       **_) -> TerminationFn:
    """Hopper-v5 `is_healthy`: z = qpos[1] in (0.7, inf), angle = qpos[2] in (-0.2, 0.2), and every entry of
    state_vector()[2:] (qpos[2:], qvel) in (-100, 100), all open intervals; terminated = not healthy.

    In the observation (qpos[1:], clip(qvel, -10, 10)) z is obs[0], the angle obs[1] and qpos[2:] obs[1:]. The
    velocities are clipped at 10 there, so a |qvel| >= 100 that ends the real episode is invisible in s': the
    one case this rule (like any rule on observations) cannot see. NaN fails every comparison: terminated.
    (The MOPO and OfflineRL-Kit versions write `np.abs(next_obs[:, 1:] < 100)`, checking the upper bound only.)
    """
    i = 0 if exclude_current_positions_from_observation else 1  # with x in the observation, z is obs[1]
    (s_lo, s_hi), (z_lo, z_hi), (a_lo, a_hi) = healthy_state_range, healthy_z_range, healthy_angle_range

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        z, angle, state = next_obs[:, i], next_obs[:, i + 1], next_obs[:, i + 1:]
        healthy = (((state > s_lo) & (state < s_hi)).all(-1) & (z > z_lo) & (z < z_hi)
                   & (angle > a_lo) & (angle < a_hi))
        return ~healthy

    return terminated


def walker2d_termination(healthy_z_range=(0.8, 2.0), healthy_angle_range=(-1.0, 1.0),
                         exclude_current_positions_from_observation=True, **_) -> TerminationFn:
    """Walker2d-v5 `is_healthy`: z = qpos[1] in (0.8, 2.0) and angle = qpos[2] in (-1, 1), open intervals, i.e.
    obs[0] and obs[1]; terminated = not healthy. (The docstring also names non-finite states; the code checks
    only these two, and so does this rule. NaN in z or the angle fails the comparisons: terminated.)"""
    i = 0 if exclude_current_positions_from_observation else 1
    (z_lo, z_hi), (a_lo, a_hi) = healthy_z_range, healthy_angle_range

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        z, angle = next_obs[:, i], next_obs[:, i + 1]
        return ~((z > z_lo) & (z < z_hi) & (angle > a_lo) & (angle < a_hi))

    return terminated


def ant_termination(healthy_z_range=(0.2, 1.0), exclude_current_positions_from_observation=True,
                    **_) -> TerminationFn:
    """Ant-v5 `is_healthy`: state_vector() (qpos, qvel) all finite and z = qpos[2] in [0.2, 1.0], a closed
    interval; terminated = not healthy. The observation holds qpos[2:], qvel (27 numbers), then the contact
    forces: z is obs[0] and the state is obs[:27] (obs[2] and obs[:29] with x, y included). The reference
    code's substring match also gave this rule to antmaze, whose obs[0] is a position: here the env id is
    matched exactly, so AntMaze gets no rule."""
    z_index, state_dims = (0, 27) if exclude_current_positions_from_observation else (2, 29)
    z_lo, z_hi = healthy_z_range

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        z = next_obs[:, z_index]
        return ~(torch.isfinite(next_obs[:, :state_dims]).all(-1) & (z >= z_lo) & (z <= z_hi))

    return terminated


def never_terminates(**_) -> TerminationFn:
    """Envs whose step() returns terminated=False always (only the time limit truncates): the rule is never."""

    def terminated(obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)

    return terminated


def _unhealthy_rule(builder: Callable[..., TerminationFn]) -> Callable[..., TerminationFn]:
    """`terminate_when_unhealthy=False` (an env argument) turns a healthy-range rule into never."""
    def build(terminate_when_unhealthy: bool = True, **kwargs) -> TerminationFn:
        return builder(**kwargs) if terminate_when_unhealthy else never_terminates()
    return build


# env name -> (versions whose source was read, rule builder taking the env's kwargs). Hopper, Walker2d and
# Ant have the same rule in v2-v5; HalfCheetah's step returns terminated=False in every version, Pendulum-v1's
# too (it only truncates at 200 steps), Swimmer-v5, Reacher-v5 and Pusher-v5 as well.
TERMINATION_RULES: dict[str, tuple[tuple[int, ...], Callable[..., TerminationFn]]] = {
    "Hopper": ((2, 3, 4, 5), _unhealthy_rule(hopper_termination)),
    "Walker2d": ((2, 3, 4, 5), _unhealthy_rule(walker2d_termination)),
    "Ant": ((2, 3, 4, 5), _unhealthy_rule(ant_termination)),
    "HalfCheetah": ((2, 3, 4, 5), never_terminates),
    "Pendulum": ((1,), never_terminates),
    "Swimmer": ((5,), never_terminates),
    "Reacher": ((5,), never_terminates),
    "Pusher": ((5,), never_terminates),
}


def termination_function(env_spec, mode: str) -> TerminationFn | None:
    """The env's termination rule as a batched function (obs (N, S), actions (N, A), next_obs (N, S)) -> bool
    (N,), from the env id and its kwargs in the dataset's env spec (or an id string); None for `--termination
    learned` (the ensemble's head decides). An env without a known rule is refused in one line."""
    if mode == "learned":
        return None
    env_id = getattr(env_spec, "id", None) or (env_spec if isinstance(env_spec, str) else None)
    if env_id is None:
        fail("the dataset stores no environment spec, so its termination rule is unknown; pass "
             "--termination learned to learn one from the dataset's terminals")
    match = re.fullmatch(r"(?:.*/)?([A-Za-z0-9_]+)-v(\d+)", env_id)
    name, version = (match.group(1), int(match.group(2))) if match else (env_id, -1)
    if name not in TERMINATION_RULES or version not in TERMINATION_RULES[name][0]:
        known = ", ".join(f"{n}-v{'/'.join(map(str, v))}" for n, (v, _) in TERMINATION_RULES.items())
        fail(f"no termination rule for '{env_id}' (known: {known}); pass --termination learned to learn one "
             f"from the dataset's terminals")
    kwargs = dict(getattr(env_spec, "kwargs", None) or {})
    return TERMINATION_RULES[name][1](**kwargs)


# ---------------------------------------------------------------------------------------------------------
# The probabilistic dynamics ensemble: one network, members on a leading axis, batched matmuls
# ---------------------------------------------------------------------------------------------------------


class EnsembleLinear(nn.Module):
    """K independent linear layers as one batched matmul, (K, N, in) -> (K, N, out), with weight decay wd.

    Not common.networks.VectorizedLinear: the MOPO code initialises these from a truncated normal with zero
    biases (a different draw), evaluates a subset of members (the elites), and decays each layer's weights."""

    def __init__(self, in_dim: int, out_dim: int, ensemble_size: int, weight_decay: float):
        super().__init__()
        std = 1.0 / (2.0 * math.sqrt(in_dim))  # the MOPO code's truncated normal (cut at 2 std), zero bias
        self.weight = nn.Parameter(nn.init.trunc_normal_(torch.empty(ensemble_size, in_dim, out_dim), std=std,
                                                         a=-2 * std, b=2 * std))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, out_dim))
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        if members is None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.baddbmm(self.bias[members], x, self.weight[members])

    def decay_loss(self) -> torch.Tensor:
        return self.weight_decay * 0.5 * self.weight.square().sum()


class ModelStep(NamedTuple):
    """One model step for a batch of N rows (see `DynamicsEnsemble.step`)."""
    next_obs: torch.Tensor  # (N, S)
    reward: torch.Tensor  # (N,)
    done_logit: torch.Tensor | None  # (N,), the learned termination head's logit, or None without one
    logvar: torch.Tensor | None  # (K, N, S + 1), every member's log-variance, or None (elites only evaluated)


class DynamicsEnsemble(nn.Module):
    """T^i(s', r | s, a) = N(mu^i(s, a), Sigma^i(s, a)), i = 1..K, over the target (s' - s, r).

    Inputs (s, a) are standardised with the training split's mean and std. Each member outputs the mean and a
    log-variance softly bounded between learned limits: logvar = max - softplus(max - x), then
    min + softplus(logvar - min) (Chua et al. 2018, the MOPO code); optionally a termination logit.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], ensemble_size: int,
                 num_elites: int, weight_decay: tuple[float, ...], learned_termination: bool):
        super().__init__()
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.target_dim = obs_dim + 1  # (delta s, r)
        self.ensemble_size, self.num_elites = ensemble_size, num_elites
        self.learned_termination = learned_termination
        dims = [obs_dim + act_dim, *hidden_dims, 2 * self.target_dim + int(learned_termination)]
        self.layers = nn.ModuleList(EnsembleLinear(i, o, ensemble_size, wd)
                                    for i, o, wd in zip(dims[:-1], dims[1:], weight_decay))
        self.max_logvar = nn.Parameter(torch.full((self.target_dim,), MAX_LOGVAR_INIT))
        self.min_logvar = nn.Parameter(torch.full((self.target_dim,), MIN_LOGVAR_INIT))
        self.register_buffer("input_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("input_std", torch.ones(obs_dim + act_dim))
        self.register_buffer("elites", torch.arange(num_elites))

    def forward(self, inputs: torch.Tensor, members: torch.Tensor | None = None):
        """Raw inputs (s, a): (N, S + A) for every member alike, or (K, N, S + A) one set per member.
        Returns mean (K', N, S + 1), logvar (K', N, S + 1) and the termination logit (K', N) or None, for all
        K members or only those in `members`."""
        x = (inputs - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.ensemble_size if members is None else len(members), -1, -1)
        for layer in self.layers[:-1]:
            x = F.silu(layer(x, members))  # Swish
        out = self.layers[-1](x, members)
        d = self.target_dim
        mean, raw_logvar = out[..., :d], out[..., d:2 * d]
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
        logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar, (out[..., 2 * d] if self.learned_termination else None)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, terminals: torch.Tensor) -> torch.Tensor:
        """Sum over members of the Gaussian NLL (up to constants), the weight decay and the bounds' term.

        L = sum_i mean_(batch, dim) [ (mu_i - y)^2 exp(-logvar_i) + logvar_i ] + sum_l wd_l ||W_l||^2 / 2
            + 0.01 (sum max_logvar - sum min_logvar)   [+ sum_i BCE(termination logit_i, d)]
        inputs (K, B, S + A), targets (K, B, S + 1), terminals (K, B): one bootstrap minibatch per member.
        """
        mean, logvar, done_logit = self(inputs)
        nll = (((mean - targets) ** 2) * torch.exp(-logvar) + logvar).mean(dim=(1, 2)).sum()
        decay = sum(layer.decay_loss() for layer in self.layers)
        bounds = LOGVAR_BOUND_COEF * (self.max_logvar.sum() - self.min_logvar.sum())
        loss = nll + decay + bounds
        if done_logit is not None:
            loss = loss + F.binary_cross_entropy_with_logits(done_logit, terminals, reduction="none").mean(1).sum()
        return loss

    @torch.no_grad()
    def holdout_loss(self, inputs: torch.Tensor, targets: torch.Tensor, terminals: torch.Tensor) -> torch.Tensor:
        """Per-member held-out error (K,): the MSE of the mean on (s, a) -> (delta s, r), no variance term (the
        MOPO code's validation metric), plus the termination head's binary cross-entropy when it has one."""
        mean, _, done_logit = self(inputs)
        loss = ((mean - targets) ** 2).mean(dim=(1, 2))
        if done_logit is not None:
            loss = loss + F.binary_cross_entropy_with_logits(done_logit, terminals.expand_as(done_logit),
                                                             reduction="none").mean(1)
        return loss

    @torch.no_grad()
    def step(self, obs: torch.Tensor, actions: torch.Tensor, all_members: bool = False) -> ModelStep:
        """One model step for obs (N, S), actions (N, A): each row (s' - s, r) drawn from a random elite's
        Gaussian. Only the elites are evaluated, unless `all_members` (an uncertainty over every member needs
        their variances: returned as `logvar`). The draws are the same either way."""
        mean, logvar, done_logit = self(torch.cat([obs, actions], -1), None if all_members else self.elites)
        n = obs.shape[0]
        rows = torch.arange(n, device=obs.device)
        elite = torch.randint(self.num_elites, (n,), device=obs.device)  # position among the elites
        member = self.elites[elite] if all_members else elite  # that elite among the members evaluated
        mu, std = mean[member, rows], torch.exp(0.5 * logvar[member, rows])
        sample = mu + std * torch.randn_like(mu)
        logit = done_logit[member, rows] if done_logit is not None else None
        return ModelStep(obs + sample[:, :self.obs_dim], sample[:, self.obs_dim], logit,
                         logvar if all_members else None)


def dynamics_architecture(config: Any, spec: DataSpec) -> dict:
    """What a saved ensemble must match to be used by a run (the shapes of its network), as plain values."""
    return {"obs_dim": spec.obs_dim, "act_dim": spec.act_dim, "ensemble_size": config.ensemble_size,
            "num_elites": config.num_elites, "hidden_dims": list(config.dynamics_hidden_dims),
            "learned_termination": config.termination == "learned"}


def make_dynamics(config: Any, spec: DataSpec) -> DynamicsEnsemble:
    """An unfitted ensemble of the config's shape for the dataset's spec (draws its weights from the torch RNG)."""
    return DynamicsEnsemble(spec.obs_dim, spec.act_dim, tuple(config.dynamics_hidden_dims), config.ensemble_size,
                            config.num_elites, tuple(config.dynamics_weight_decay), config.termination == "learned")


# ---------------------------------------------------------------------------------------------------------
# Fitting the ensemble (held-out split, bootstrap, early stopping, elites; a killed fit continues)
# ---------------------------------------------------------------------------------------------------------


def fit_dynamics(ensemble: DynamicsEnsemble, data: dict[str, torch.Tensor], config: Any, seed: int,
                 partial_path: Path | None = None, label: str = "dynamics") -> dict:
    """Fit the ensemble on (s, a) -> (s' - s, r) (and the terminals) with early stopping; returns a report.

    `data` holds device tensors obs (N, S), actions (N, A), rewards (N,), next_obs (N, S), terminals (N,).
    A random split holds out min(ratio N, max_holdout) transitions. Each member trains on its own bootstrap
    resample of the rest (drawn once, reshuffled every pass), Adam at dynamics_lr, minibatches of
    dynamics_batch_size per member; an epoch is as many passes as make dynamics_min_epoch_steps. After every
    epoch each member's held-out error is measured (the MSE of the mean; plus the termination head's
    cross-entropy when it has one); a member whose error fell by more than 1% keeps a snapshot; fitting stops
    after `dynamics_patience` epochs without any such gain (or at dynamics_max_epochs). The snapshots are
    restored and the `num_elites` members with the lowest held-out error become the elites. A held-out error
    that is not finite or above DIVERGENCE_FACTOR x max(the member's error before training, the MSE of
    predicting 0) stops with the member and the step.
    Randomness comes from its own generator (seeded with `seed`), so fitting leaves the global RNG as it was.
    With `partial_path`, the fit's state is saved there about every DYNAMICS_SAVE_SECONDS (at an epoch's end)
    and a killed fit continues from it exactly.
    The report (plain values): holdout_mse (K floats), elites, elite_holdout_mse, epochs, gradient_steps,
    train_seconds, holdout_size, history (held-out errors per epoch), stopped.
    """
    device = data["obs"].device
    inputs = torch.cat([data["obs"], data["actions"]], -1)
    targets = torch.cat([data["next_obs"] - data["obs"], data["rewards"].unsqueeze(-1)], -1)
    terminals = data["terminals"].float()
    n = inputs.shape[0]
    n_holdout = min(int(n * config.dynamics_holdout_ratio), config.dynamics_max_holdout)
    if n_holdout < 1 or n - n_holdout < 2:
        fail(f"{n} transitions are too few to fit and validate a dynamics ensemble (held out: {n_holdout}); "
             f"use a larger dataset or --dynamics-holdout-ratio")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    permutation = torch.randperm(n, generator=generator, device=device)
    holdout, train_rows = permutation[:n_holdout], permutation[n_holdout:]
    n_train = train_rows.shape[0]
    with torch.no_grad():
        train_inputs = inputs[train_rows]
        ensemble.input_mean.copy_(train_inputs.mean(0))
        std = train_inputs.std(0, unbiased=False)
        ensemble.input_std.copy_(torch.where(std < 1e-12, torch.ones_like(std), std))
    k = ensemble.ensemble_size
    bootstrap = torch.randint(n_train, (k, n_train), generator=generator, device=device)  # per-member resample
    holdout_inputs, holdout_targets, holdout_terminals = inputs[holdout], targets[holdout], terminals[holdout]
    # the fit's own Adam (PyTorch's default implementation): it runs once per run, eagerly, outside the update
    optimizer = torch.optim.Adam(ensemble.parameters(), lr=config.dynamics_lr)
    member_params = [p for layer in ensemble.layers for p in (layer.weight, layer.bias)]
    limit = DIVERGENCE_FACTOR * torch.maximum(ensemble.holdout_loss(holdout_inputs, holdout_targets,
                                                                    holdout_terminals),
                                              holdout_targets.square().mean()).cpu()
    state = {"epoch": 0, "step": 0, "stale": 0, "seconds": 0.0, "history": [],
             "best_mse": torch.full((k,), 1e10, dtype=torch.float64),
             "best_params": [p.detach().clone() for p in member_params]}
    if partial_path is not None and partial_path.is_file():
        saved = safe_load(partial_path, map_location=device, what="the ensemble's partial fit")
        ensemble.load_state_dict(saved["ensemble"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"].cpu())
        state = saved["fit"]
        limit = saved["limit"]
        print(f"{label}: continuing the ensemble's fit from epoch {state['epoch']} ({partial_path})",
              file=sys.stderr, flush=True)
    passes = max(1, math.ceil(config.dynamics_min_epoch_steps / math.ceil(n_train / config.dynamics_batch_size)))
    progress = Progress(f"{label} epochs", config.dynamics_max_epochs, state["epoch"])
    started, last_save = time.perf_counter() - state["seconds"], time.perf_counter()
    while True:
        state["epoch"] += 1
        for _ in range(passes):
            # each member's bootstrap sample, reshuffled: (K, n_train) row numbers into the training split
            order = torch.gather(bootstrap, 1, torch.argsort(torch.rand(k, n_train, generator=generator,
                                                                        device=device), dim=1))
            for start in range(0, n_train, config.dynamics_batch_size):
                rows = train_rows[order[:, start:start + config.dynamics_batch_size]]  # (K, B)
                loss = ensemble.loss(inputs[rows], targets[rows], terminals[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["step"] += 1
        mse = ensemble.holdout_loss(holdout_inputs, holdout_targets, holdout_terminals).double().cpu()
        bad = ~torch.isfinite(mse) | (mse > limit)
        if bool(bad.any()):
            member = int(bad.nonzero()[0])
            progress.close()
            fail(f"dynamics member {member} diverged: held-out error {float(mse[member]):.3g} at epoch "
                 f"{state['epoch']} (gradient step {state['step']}), above {float(limit[member]):.3g}; lower "
                 f"--dynamics-lr (now {config.dynamics_lr:g}) or check the dataset for outliers")
        improved = (state["best_mse"] - mse) / state["best_mse"] > IMPROVEMENT
        state["best_mse"] = torch.where(improved, mse, state["best_mse"])
        with torch.no_grad():
            mask = improved.to(device)
            for best, p in zip(state["best_params"], member_params):
                best.copy_(torch.where(mask.view(-1, *[1] * (p.dim() - 1)), p, best))
        state["stale"] = 0 if bool(improved.any()) else state["stale"] + 1
        state["history"].append([round(float(v), 6) for v in mse])
        progress.extra = (f" | held-out error best {float(state['best_mse'].min()):.4g} mean "
                          f"{float(state['best_mse'].mean()):.4g}, {state['stale']}/{config.dynamics_patience} "
                          f"epochs without gain")
        progress.update(state["epoch"])
        if state["stale"] >= config.dynamics_patience or state["epoch"] >= config.dynamics_max_epochs:
            break
        if partial_path is not None and time.perf_counter() - last_save >= DYNAMICS_SAVE_SECONDS:
            state["seconds"] = time.perf_counter() - started
            save_checkpoint(partial_path, {"ensemble": ensemble.state_dict(), "optimizer": optimizer.state_dict(),
                                           "generator": generator.get_state(), "fit": state, "limit": limit})
            last_save = time.perf_counter()
    progress.close()
    with torch.no_grad():
        for best, p in zip(state["best_params"], member_params):
            p.copy_(best)
        mse = ensemble.holdout_loss(holdout_inputs, holdout_targets, holdout_terminals).cpu()
        ensemble.elites.copy_(torch.argsort(mse)[:ensemble.num_elites].to(device))
    seconds = time.perf_counter() - started
    elites = ensemble.elites.tolist()
    return {"holdout_mse": [float(v) for v in mse], "elites": elites,
            "elite_holdout_mse": float(mse[elites].mean()), "epochs": state["epoch"], "gradient_steps": state["step"],
            "train_seconds": seconds, "holdout_size": n_holdout, "history": state["history"],
            "stopped": "early stopping" if state["stale"] >= config.dynamics_patience else "max epochs"}


# ---------------------------------------------------------------------------------------------------------
# Saved ensembles (`--dynamics PATH`): the file names its dataset and a checksum of the data
# ---------------------------------------------------------------------------------------------------------


def data_checksum(data: dict[str, np.ndarray]) -> str:
    """sha256 over the transitions the ensemble is fitted on (obs, actions, rewards, next_obs, terminals)."""
    digest = hashlib.sha256()
    for key in TRANSITION_KEYS:
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(data[key], dtype=np.float32).tobytes())
    return digest.hexdigest()


def save_dynamics(path: Path, ensemble: DynamicsEnsemble, report: dict, dataset_id: str, checksum: str,
                  architecture: dict, config: Any) -> None:
    """Write the fitted ensemble with what it was fitted on (dataset, checksum), its shapes and its report."""
    training = {k: getattr(config, k) for k in ("dynamics_weight_decay", "dynamics_lr", "dynamics_batch_size",
                                                "dynamics_holdout_ratio", "dynamics_max_holdout",
                                                "dynamics_patience", "dynamics_min_epoch_steps",
                                                "dynamics_max_epochs", "seed")}
    save_checkpoint(path, {"format": DYNAMICS_FORMAT, "dataset": dataset_id, "checksum": checksum,
                           "architecture": architecture, "training": training, "report": report,
                           "state_dict": {k: v.detach().cpu() for k, v in ensemble.state_dict().items()}})


def load_dynamics_file(path: str, dataset_id: str, checksum: str, architecture: dict) -> dict:
    """Read a saved ensemble and check it was fitted on this dataset with these shapes (one line if not).
    Returns the saved dict: format, dataset, checksum, architecture, training, report, state_dict. The file is
    loaded with weights_only=True (tensors and plain values): a file holding anything else is refused in one
    line, and nothing in it is run."""
    file = Path(path)
    if not file.is_file():
        fail(f"--dynamics {path}: no such file (a dynamics.pt written by an earlier mopo or combo run)")
    saved = safe_load(file, map_location="cpu", what="--dynamics")  # weights_only: nothing in the file runs
    if not isinstance(saved, dict) or saved.get("format") != DYNAMICS_FORMAT:
        fail(f"--dynamics {path} is not a saved dynamics ensemble (dynamics.pt of a mopo or combo run)")
    if saved["dataset"] != dataset_id or saved["checksum"] != checksum:
        fail(f"--dynamics {path} was fitted on '{saved['dataset']}' (data checksum {saved['checksum'][:12]}), "
             f"not on this run's '{dataset_id}' (checksum {checksum[:12]}); leave --dynamics out to fit one")
    if saved["architecture"] != architecture:
        diff = ", ".join(f"{k} {saved['architecture'].get(k)} (this run: {v})" for k, v in architecture.items()
                         if saved["architecture"].get(k) != v)
        fail(f"--dynamics {path} has a different ensemble: {diff}; pass matching flags or leave --dynamics out")
    return saved


# ---------------------------------------------------------------------------------------------------------
# Model rollouts and the model buffer D_model
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def model_rollout(policy: Callable[[torch.Tensor], torch.Tensor], dynamics: DynamicsEnsemble,
                  termination: TerminationFn | None, start_obs: torch.Tensor, horizon: int,
                  uncertainty: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Roll `policy` out in the model for `horizon` steps from every row of `start_obs` (N, S), all together.

    Each step: a ~ policy(s); (s', r) from a random elite (`dynamics.step`); done = termination(s, a, s') (or
    the learned head's logit > 0 when termination is None). A rollout stops after its first done step: that
    transition is kept (with done = 1), none after it. With `uncertainty` (every member's logvar (K, N, S + 1)
    -> (N,)), every member is evaluated and each kept transition carries its value (MOPO's u(s, a)).
    Returns the M kept transitions, obs (M, S), actions (M, A), rewards (M,), next_obs (M, S), terminals (M,)
    [, uncertainty (M,)] and `step`/`start` (M,), the step number and start row of each; and statistics
    (0-d tensors). One host sync: the number of kept rows.
    """
    n = start_obs.shape[0]
    obs, alive = start_obs, torch.ones(n, dtype=torch.bool, device=start_obs.device)
    columns = {k: [] for k in (*TRANSITION_KEYS, "alive", *(("uncertainty",) if uncertainty is not None else ()))}
    for _ in range(horizon):
        actions = policy(obs)
        step = dynamics.step(obs, actions, all_members=uncertainty is not None)
        done = termination(obs, actions, step.next_obs) if termination is not None else step.done_logit > 0
        columns["obs"].append(obs)
        columns["actions"].append(actions)
        columns["rewards"].append(step.reward)
        columns["next_obs"].append(step.next_obs)
        columns["terminals"].append(done.float())
        columns["alive"].append(alive)
        if uncertainty is not None:
            columns["uncertainty"].append(uncertainty(step.logvar))
        alive = alive & ~done
        obs = step.next_obs
    stacked = {k: torch.stack(v) for k, v in columns.items()}  # (h, n, ...)
    kept = stacked["alive"].reshape(-1).nonzero().squeeze(-1)  # the host sync
    out = {k: v.reshape(horizon * n, *v.shape[2:]).index_select(0, kept) for k, v in stacked.items() if k != "alive"}
    out["step"], out["start"] = kept // n, kept % n
    alive_mask = stacked["alive"].float()
    stats = {"train/model_reward_mean": out["rewards"].mean(),
             "train/rollout_terminated_frac": (stacked["terminals"] * alive_mask).amax(0).mean(),
             "train/rollout_length_mean": alive_mask.sum(0).mean()}
    if uncertainty is not None:
        stats["train/model_penalty_mean"] = (stacked["uncertainty"] * alive_mask).sum() / alive_mask.sum()
    return out, stats


class ModelBuffer:
    """FIFO buffer of model transitions kept on the device: one (capacity, width) table, oldest rows overwritten.

    Columns: obs | actions | reward | next_obs | terminal. Sampling is one row gather with the global RNG of
    the device (saved in checkpoints), so resumed runs draw the same rows.
    """

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        self.widths = [obs_dim, act_dim, 1, obs_dim, 1]
        self.capacity, self.device = capacity, device
        self.table = torch.empty(capacity, sum(self.widths), device=device)  # pages touched only when filled
        self.size, self.pointer = 0, 0

    def add(self, transitions: dict[str, torch.Tensor]) -> None:
        """Append M transitions (obs (M, S), actions (M, A), rewards (M,), next_obs (M, S), terminals (M,))."""
        rows = torch.cat([transitions["obs"], transitions["actions"], transitions["rewards"].unsqueeze(-1),
                          transitions["next_obs"], transitions["terminals"].unsqueeze(-1)], -1)
        rows = rows[-self.capacity:]
        first = min(len(rows), self.capacity - self.pointer)
        self.table[self.pointer:self.pointer + first] = rows[:first]
        self.table[:len(rows) - first] = rows[first:]
        self.pointer = (self.pointer + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        """(obs, actions, rewards, next_obs, terminals) of `batch_size` rows drawn uniformly with replacement."""
        if self.size == 0:
            fail("the model buffer is empty: a rollout round must come before the first update")
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        obs, actions, rewards, next_obs, terminals = self.table.index_select(0, idx).split(self.widths, 1)
        return obs, actions, rewards.squeeze(-1), next_obs, terminals.squeeze(-1)

    def state_dict(self) -> dict:
        return {"rows": self.table[:self.size].clone(), "pointer": self.pointer}

    def load_state_dict(self, state: dict) -> None:
        rows = state["rows"].to(self.device)
        self.size, self.pointer = len(rows), int(state["pointer"])
        self.table[:self.size] = rows


class LearnedModel:
    """The model-based half of an agent: the dynamics ensemble, the env's termination rule, and the model
    buffer D_model that rollouts fill and updates draw from, with the fit's report and the last round's
    statistics. Its state_dict keys are the agent's: dynamics, dynamics_report, model_buffer, rollout_stats."""

    def __init__(self, config: Any, spec: DataSpec, device: torch.device):
        self.ensemble = make_dynamics(config, spec).to(device)
        self.report: dict | None = None  # set once the ensemble is fitted or loaded
        self.termination: TerminationFn | None = None  # the env's rule (train() sets it); None: learned head
        self.buffer = ModelBuffer(config.rollout_batch_size * config.rollout_length * config.model_retain_rounds,
                                  spec.obs_dim, spec.act_dim, device)
        self.stats: dict[str, torch.Tensor] = {}  # the last rollout round's, logged with every update

    @property
    def ready(self) -> bool:
        """Whether the ensemble is fitted (or loaded): a resumed run never fits it again."""
        return self.report is not None

    def add(self, rollouts: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put a round's kept transitions (see `model_rollout`) into D_model; returns the round's statistics."""
        self.buffer.add(rollouts)
        self.stats = {**stats, "train/model_buffer_size": torch.tensor(float(self.buffer.size))}
        return self.stats

    def mix(self, batch: dict[str, torch.Tensor], n_real: int) -> tuple[torch.Tensor, ...]:
        """(obs, actions, rewards, next_obs, terminals) of B rows: the first `n_real` rows of the dataset batch
        (B rows), then B - n_real rows drawn from D_model: a sample of f D + (1 - f) D_model, f = n_real / B."""
        model = self.buffer.sample(batch["obs"].shape[0] - n_real)
        return tuple(torch.cat([batch[key][:n_real], part]) for key, part in zip(TRANSITION_KEYS, model))

    def state_dict(self) -> dict:
        return {"dynamics": self.ensemble.state_dict(), "dynamics_report": self.report,
                "model_buffer": self.buffer.state_dict(), "rollout_stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self.ensemble.load_state_dict(state["dynamics"])
        self.report = state["dynamics_report"]
        self.buffer.load_state_dict(state["model_buffer"])
        self.stats = {k: v.to(self.buffer.device) for k, v in state["rollout_stats"].items()}


# ---------------------------------------------------------------------------------------------------------
# train(): the checks, the data and the ensemble of a model-based run
# ---------------------------------------------------------------------------------------------------------


def check_model_config(config: Any) -> None:
    """The dynamics and rollout fields of a config, before anything is written (one line if one is off)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            fail(message)

    need(config.rollout_length >= 1, f"--rollout-length must be at least 1, got {config.rollout_length}")
    for name in ("rollout_every", "rollout_batch_size", "model_retain_rounds", "ensemble_size",
                 "dynamics_batch_size", "dynamics_min_epoch_steps", "dynamics_max_holdout", "dynamics_patience",
                 "dynamics_max_epochs"):
        need(getattr(config, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    need(1 <= config.num_elites <= config.ensemble_size,
         f"--num-elites must lie in [1, --ensemble-size {config.ensemble_size}], got {config.num_elites}")
    need(len(config.dynamics_weight_decay) == len(config.dynamics_hidden_dims) + 1,
         f"--dynamics-weight-decay needs {len(config.dynamics_hidden_dims) + 1} values (one per hidden layer "
         f"and the output), got {len(config.dynamics_weight_decay)}")
    need(0.0 < config.dynamics_holdout_ratio < 1.0,
         f"--dynamics-holdout-ratio must lie in (0, 1), got {config.dynamics_holdout_ratio}")
    need(config.dynamics_lr > 0, f"--dynamics-lr must be positive, got {config.dynamics_lr}")


def check_transitions(data: dict[str, np.ndarray], name: str) -> None:
    """A model needs (s, a, r, s') with real rewards and next observations: one clear line if they are missing."""
    for key, what in (("rewards", "rewards"), ("next_obs", "next observations"), ("obs", "observations"),
                      ("actions", "actions")):
        if key not in data or data[key] is None or len(data[key]) == 0:
            fail(f"dataset '{name}' has no {what}: a dynamics model is fitted on (s, a, r, s') transitions")
        if not np.isfinite(data[key]).all():
            bad = int((~np.isfinite(data[key])).reshape(len(data[key]), -1).any(1).sum())
            fail(f"dataset '{name}' has {bad} transitions whose {what} are not finite (NaN or inf); a dynamics "
                 f"model needs every (s, a, r, s')")
    if not np.any(data["rewards"]):
        fail(f"dataset '{name}' stores no rewards (every reward is 0): model-based RL needs the reward of "
             f"each transition")


@dataclass
class ModelData:
    """What a model-based run takes from its dataset, read and checked before anything of the run is written."""
    transitions: dict[str, np.ndarray]  # obs (N, S), actions (N, A), rewards (N,), next_obs (N, S), terminals (N,)
    termination: TerminationFn | None  # the env's rule; None: the ensemble's learned head
    checksum: str  # of the transitions (a saved ensemble names the one it was fitted on)
    architecture: dict  # the ensemble's shapes (a saved ensemble must match them)
    reused: dict | None  # the checked `--dynamics` file, or None (the run fits its own)


def model_data(config: Any, dataset: Any, file: str) -> ModelData:
    """The dataset's transitions, termination rule, checksum and the `--dynamics` file, all checked (one line
    each: discrete actions, missing or non-finite rewards or next observations, an env without a rule, a file
    fitted on other data or of another shape). `file` names the algorithm file in messages. A resumed run
    does not read the `--dynamics` file again: its ensemble is in its checkpoint (the file may have moved)."""
    if dataset.discrete:
        fail(f"{file} needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    check_transitions(data, config.env)
    termination = termination_function(dataset.eval_env_spec, config.termination)
    checksum = data_checksum(data)
    architecture = dynamics_architecture(config, dataset.spec)
    reused = load_dynamics_file(config.dynamics, dataset.minari_id, checksum, architecture) \
        if config.dynamics and not config.resume else None
    return ModelData({k: data[k] for k in TRANSITION_KEYS}, termination, checksum, architecture, reused)


def dynamics_logs(report: dict) -> dict[str, float]:
    """The ensemble's diagnostics as metrics: held-out MSE per member, which are elites, fit time."""
    logs = {f"dynamics/holdout_mse_member_{i}": v for i, v in enumerate(report["holdout_mse"])}
    logs.update({f"dynamics/elite_{rank}": float(member) for rank, member in enumerate(report["elites"])})
    logs.update({"dynamics/elite_holdout_mse": report["elite_holdout_mse"], "dynamics/epochs": report["epochs"],
                 "dynamics/train_seconds": report["train_seconds"]})
    return logs


def dynamics_summary(report: dict) -> dict:
    """The ensemble's part of a run's summary.json."""
    return {"dynamics": {k: report.get(k) for k in ("path", "holdout_mse", "elites", "elite_holdout_mse", "epochs",
                                                    "train_seconds")}}


def fit_or_load_dynamics(model: LearnedModel, data: ModelData, config: Any, dataset: Any, run: Any,
                         checkpoint: Callable[[], None]) -> None:
    """The run's ensemble, once: loaded from `--dynamics` or fitted on the dataset and saved as
    `<run dir>/dynamics.pt` (reuse it with --dynamics), then logged and checkpointed at step 0. Does nothing
    for a resumed run whose checkpoint holds a fitted ensemble (it needs no `--dynamics` file). A run killed
    while fitting is checkpointed before the fit and continues the fit from `dynamics-partial.pt`.
    `checkpoint()` saves the run at step 0."""
    if model.ready:
        return
    dynamics_path = run.dir / "dynamics.pt"
    reused = data.reused
    if reused is None and config.dynamics:  # a resumed run whose checkpoint was written before the ensemble
        reused = load_dynamics_file(config.dynamics, dataset.minari_id, data.checksum, data.architecture)
    if reused is not None:
        model.ensemble.load_state_dict(reused["state_dict"])
        model.report = {**reused["report"], "path": str(Path(config.dynamics).resolve())}
        print(f"dynamics ensemble from {config.dynamics} (fitted on {reused['dataset']})", file=sys.stderr)
    else:
        checkpoint()  # a run killed while fitting can be resumed from here
        fit_data = {k: torch.as_tensor(v, device=run.device) for k, v in data.transitions.items()}
        report = fit_dynamics(model.ensemble, fit_data, config, config.seed,
                              partial_path=run.dir / "dynamics-partial.pt", label=f"dynamics {dataset.name}")
        save_dynamics(dynamics_path, model.ensemble, report, dataset.minari_id, data.checksum, data.architecture,
                      config)
        (run.dir / "dynamics-partial.pt").unlink(missing_ok=True)
        model.report = {**report, "path": str(dynamics_path.resolve())}
        print(f"dynamics ensemble: {report['epochs']} epochs ({report['stopped']}) in "
              f"{report['train_seconds']:.1f} s; held-out MSE per member "
              f"{', '.join(f'{v:.4g}' for v in report['holdout_mse'])}; elites {report['elites']} "
              f"(mean {report['elite_holdout_mse']:.4g}); saved to {dynamics_path} (reuse it with "
              f"--dynamics {dynamics_path})", file=sys.stderr, flush=True)
    run.log(0, dynamics_logs(model.report))
    checkpoint()  # from here on a resumed run never fits the ensemble again


# ---------------------------------------------------------------------------------------------------------
# The policy both files roll out and train: SAC's tanh-squashed Gaussian, its samples and log-density
# ---------------------------------------------------------------------------------------------------------
