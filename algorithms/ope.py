"""Off-policy evaluation (OPE): a trained policy's value estimated from a dataset alone, by importance sampling
(ordinary, per-decision, weighted) and fitted Q evaluation (FQE), each with a bootstrap interval.

Lecture sections: "Importance Sampling" (the importance ratio pi(a|s) / pi_beta(a|s) re-weights data of pi_beta
to estimate an expectation under pi) and its "Shortcomings"; "Offline Policy Evaluation and Distribution Shift"
and "Recap: Generalized Policy Iteration (GPI)" (policy evaluation: Q(s, a) = r + gamma E[Q(s', pi(s'))],
fitted by regression on the dataset's transitions: FQE is exactly that regression for a fixed pi).
Papers: Precup, Sutton & Singh 2000 (per-decision and weighted importance sampling); Le, Voloshin & Yue 2019
(fitted Q evaluation); Fu et al. 2021 (DOPE: gamma 0.995 on D4RL, bootstrap intervals).

Usage:
    python algorithms/ope.py --policy runs/iql/local-pendulum-medium-replay-v0/0-20261201-101500
    python algorithms/ope.py                       # the newest run under --runs-dir it can evaluate on --env
    python algorithms/ope.py --env local/pendulum/expert-v0 --policy runs/td3_bc/... --target-std 0.1
Without --policy, newer runs it cannot evaluate (sampling or history-dependent policies, other spaces) are
skipped, each named with the reason. The output names the evaluated run, its algorithm and checkpoint step
(the summary too: `policy`, `policy_algo`, `policy_step`). An ope.py run is not a policy: `load_policy` and
`load_agent` refuse it (`NOT_A_POLICY`).

What is estimated: J(pi) = E_(s0 ~ D) [ sum_t gamma^t r_t ], the discounted return from the dataset's initial
states, gamma = --gamma from `DATASET_SETTINGS` (chosen per dataset so that gamma^T is small for the
episode length T: the infinite-horizon value FQE estimates and the T-step value importance sampling
estimates then agree to well under 1%). When the dataset has an environment, the output puts beside each
estimate the true value measured there (--eval-episodes episodes): the deterministic policy's for FQE, the
Gaussian target's for importance sampling, and the undiscounted return the training run reported.

One training loop fits two networks on the dataset, step for step (the `Agent`): the FQE critic,
L_Q = E_(s,a,r,s')~D [ (Q(s,a) - (r + gamma (1 - d) Q_target(s', pi(s'))))^2 ], and pi_beta_hat, a Gaussian
behaviour-cloning model N(mu(s), sigma(s)^2) restricted to the action box, trained by negative log-likelihood
of that same box-restricted density (pi_beta is unknown; the density fitted is the density the ratios use). Then
rho_t = pi(a_t|s_t) / pi_beta_hat(a_t|s_t) gives, over n episodes, with rho_{0:t} = prod_{k <= t} rho_k:
    ordinary IS           (1/n) sum_i rho_{0:T-1}^i G^i
    per-decision IS       (1/n) sum_i sum_t gamma^t rho_{0:t}^i r_t^i
    weighted IS           sum_i rho_{0:T-1}^i G^i / sum_i rho_{0:T-1}^i
    weighted per-decision sum_t gamma^t sum_i rho_{0:t}^i r_t^i / sum_i rho_{0:t}^i
and FQE gives mean_i Q(s0^i, pi(s0^i)). Intervals: percentile bootstrap over episodes (`--bootstrap`
resamples); FQE's resamples the initial states only (the fitted Q is held fixed: its fitting error is not in
the interval, as refitting per resample would cost `--bootstrap` trainings).

Limits (the lecture's "Shortcomings", measured in results/figures/ figure 7):
  * Importance sampling's variance grows exponentially with the horizon and with the distance between pi and
    pi_beta: over a 200-step episode even a per-step ratio of 1.1 compounds to 1.1^200 = 2e8. Ordinary and
    per-decision IS are unbiased but on long episodes usually useless; the weighted ones are biased,
    consistent and far steadier. The effective sample size (printed) says how many episodes carry the
    weight.
  * pi_beta is unknown (the lecture: "In many cases we do not know pi_beta!"); it is estimated here by BC, and
    every error of that density model enters every ratio ("Density estimation in high-dimensional states is
    notoriously difficult"). A dataset mixing several policies (medium-replay) has a multimodal pi_beta that
    one Gaussian fits poorly.
  * A deterministic policy has no density: importance sampling evaluates the Gaussian target
    N(pi(s), (--target-std * max_action)^2) restricted to the action box instead, whose value the output
    measures separately. Both densities of the ratio are Gaussians renormalised to the box (the behaviour
    model's too): the data has its actions in the box, so mass a Gaussian puts outside it could never be
    re-weighted, and clipping it onto the bounds would make atoms no density over the box can weight. The
    behaviour model is fitted with that box-restricted likelihood: an unrestricted Gaussian fit to actions
    near a bound converges to another density (data of N(0.9, 0.5^2) on [-1, 1]: mean 0.56, std 0.33 instead
    of 0.9, 0.5), and the ratio would then divide by the wrong pi_beta.
  * FQE extrapolates Q to pi's actions wherever the data lacks them (the distribution-shift problem of the
    same slides): far from pi_beta it is biased, in either direction, and the interval cannot show it.
Discrete-action policies are not supported (continuous Box actions only).

--compile compiles the whole training step, the evaluated policy's pi(s') and the target update included
(common/optim.py); the estimators after training are numpy.

Per-dataset settings in `DATASET_SETTINGS`: the discount gamma (0.97 for the 200-step pendulum episodes, 0.995 for
D4RL locomotion as DOPE, 0.99 otherwise) and the number of training steps.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
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
from common.checkpoint import load_agent, load_checkpoint  # noqa: E402
from common.datasets import (DataSpec, ObsNormalizer, TensorSampler, flatten_observation, load_dataset,  # noqa: E402
                             minari_root, resolve_name)
from common.errors import UserError, fail  # noqa: E402
from common.evaluation import EVAL_SEED_OFFSET, make_eval_envs  # noqa: E402
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
    """gradient steps of FQE and of the behaviour model (None: from DATASET_SETTINGS)"""
    batch_size: int = 256
    """minibatch size (the papers' 256)"""
    eval_every: int = 5_000
    """log the FQE estimate every this many steps (0: only at the end)"""
    eval_episodes: int = 10
    """episodes in the environment that measure the true values beside the estimates"""
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
    # --- off-policy evaluation ---
    policy: str | None = None
    """the policy pi to evaluate: a run directory of this library (or its checkpoint.pt); None: the newest run
    under --runs-dir trained on --env that this file can evaluate (a policy of the state, same spaces)"""
    gamma: float | None = None
    """gamma of the estimated value J = E[sum_t gamma^t r_t] and of FQE's target (None: from DATASET_SETTINGS)"""
    target_std: float = 0.2
    """sigma of importance sampling's target pi(a|s) = N(pi_det(s), (sigma * max_action)^2) (a deterministic
    policy has no density); the larger, the smaller the ratios, the further from the deployed policy"""
    bootstrap: int = 1000
    """bootstrap resamples of episodes (importance sampling) or initial states (FQE) for the intervals"""
    confidence: float = 0.95
    """level of the percentile bootstrap intervals"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the FQE critic Q(s, a)"""
    behavior_hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the behaviour model pi_beta_hat(a|s) = N(mu(s), sigma(s)^2)"""
    lr: float = 3e-4
    """Adam learning rate of the FQE critic and of the behaviour model"""
    tau: float = 0.005
    """Polyak rate tau of FQE's target critic: Q_target <- (1 - tau) Q_target + tau Q"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. gamma^T small for the episode length T (pendulum T = 200: 0.97^200 = 0.002;
# D4RL locomotion T = 1000: 0.995^1000 = 0.007, DOPE's gamma).
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"gamma": 0.97, "max_steps": 20_000}),
    ("test/*", {"gamma": 0.97, "max_steps": 2_000}),
    *[(pattern, {"gamma": 0.995, "max_steps": 250_000}) for pattern in (
        "halfcheetah-*", "hopper-*", "walker2d-*", "ant-*", "mujoco/*", "local/hopper*", "local/halfcheetah*",
        "local/walker2d*", "local/ant*")],
    ("*", {"gamma": 0.99, "max_steps": 250_000}),
]

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # clip of the behaviour model's log-std

# An ope.py run holds FQE's critic and the behaviour model, not a policy (its `act` is the evaluated policy,
# rebuilt only while it trains): common.checkpoint.load_agent / load_policy refuse every run of a file that
# defines NOT_A_POLICY, with this line (braces: fields of the run's config), and results tables skip them.
NOT_A_POLICY = ("an OPE run estimates another run's value and is not a policy itself; load the run it evaluated: "
                "{policy}")


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log N(a; mean, diag exp(log_std)^2), summed over action dimensions: (batch,)."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


class FixedLinearPolicy(nn.Module):
    """A fixed pi(s) = max_action tanh(W s) from a private generator: the policy evaluated when none is given
    (the benchmark and the convention tests build an Agent without a run)."""

    def __init__(self, spec: DataSpec):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(spec.obs_dim, spec.act_dim, generator=g) / math.sqrt(spec.obs_dim))
        self.max_action = spec.max_action

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(obs @ self.weight)


class Agent:
    """FQE's critic Q(s, a) with its target, and the behaviour model pi_beta_hat, trained side by side.

    `target_policy` maps observations (as the sampler holds them: normalised with the evaluated run's
    statistics when it had any) to pi's deterministic actions; `act` is that policy.
    """

    def __init__(self, config: Config, spec: DataSpec, device: torch.device, target_policy=None):
        if spec.discrete:
            fail("ope.py evaluates continuous-action (Box) policies; this dataset has discrete actions")
        if config.gamma is None:
            from common.runs import apply_dataset_settings

            config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.target_policy = target_policy or FixedLinearPolicy(spec).to(device)
        self.critic = mlp(spec.obs_dim + spec.act_dim, config.hidden_dims, 1).to(device)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.behavior = mlp(spec.obs_dim, config.behavior_hidden_dims, 2 * spec.act_dim).to(device)
        # the action box [low, high] (act_dim,) of pi_beta_hat's density: +-max_action until train() sets the
        # dataset's own bounds (the box the importance ratios restrict both densities to)
        self.action_low = torch.full((spec.act_dim,), -spec.max_action, device=device)
        self.action_high = torch.full((spec.act_dim,), spec.max_action, device=device)
        self.critic_optimizer = adam(self.critic.parameters(), config.lr, config)
        self.behavior_optimizer = adam(self.behavior.parameters(), config.lr, config)
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.behavior_optimizer)

    def behavior_distribution(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) of pi_beta_hat(.|s), each (batch, act_dim); the mean lies in the action box."""
        mean, log_std = self.behavior(obs).chunk(2, dim=-1)
        return self.spec.max_action * torch.tanh(mean), log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def q(self, critic: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return critic(torch.cat([obs, actions], -1)).squeeze(-1)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["terminals"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                     next_obs: torch.Tensor, terminals: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.config
        with torch.no_grad():
            next_actions = self.target_policy(next_obs)
            # y = r + gamma (1 - d) Q_target(s', pi(s'))   (terminations only: a time-limit truncation bootstraps)
            y = rewards + cfg.gamma * (1.0 - terminals) * self.q(self.target_critic, next_obs, next_actions)
        # L_Q = E_(s,a,r,s')~D [ (Q(s,a) - y)^2 ]   (lecture: "Recap: Generalized Policy Iteration (GPI)",
        # policy evaluation by regression on the dataset's transitions, for the fixed pi)
        q = self.q(self.critic, obs, actions)
        critic_loss = (q - y).square().mean()
        # L_beta = -E_(s,a)~D [ log pi_beta_hat(a|s) ]   (pi_beta is unknown: "In many cases we do not know pi_beta!")
        # with pi_beta_hat the Gaussian restricted to the action box: the density the importance ratios divide by
        mean, log_std = self.behavior_distribution(obs)
        behavior_loss = -box_gaussian_log_prob(actions, mean, log_std, self.action_low, self.action_high).mean()
        # logged values are taken before the backward (which consumes the graph they hang on)
        logs = {"train/fqe_loss": critic_loss.detach(), "train/q_data": q.detach().mean(),
                "train/behavior_nll": behavior_loss.detach(), "train/behavior_std": log_std.detach().exp().mean()}
        (critic_loss + behavior_loss).backward()  # disjoint parameters: one backward serves both
        self.critic_optimizer.step()
        self.behavior_optimizer.step()
        with torch.no_grad():
            # Q_target <- (1 - tau) Q_target + tau Q
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), cfg.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The evaluated policy's deterministic action pi(s)."""
        return self.target_policy(obs)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """FQE's Q(s, a) of the evaluated policy, shape (batch,)."""
        return self.q(self.critic, obs, actions)

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "target_critic": self.target_critic.state_dict(),
                "behavior": self.behavior.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
                "behavior_optimizer": self.behavior_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target_critic.load_state_dict(state["target_critic"])
        self.behavior.load_state_dict(state["behavior"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        load_optimizer(self.behavior_optimizer, state["behavior_optimizer"])


# ---------------------------------------------------------------------------------------------------
# The densities of the importance ratio: Gaussians restricted to the action box
# ---------------------------------------------------------------------------------------------------


def _log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for standardised bounds lower < upper, elementwise; mirrored when both
    lie above 0, where Phi's upper tail would round to 1."""
    flip = lower > 0
    lower, upper = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    return torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-300))


def box_gaussian_log_prob(actions: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, low: torch.Tensor,
                          high: torch.Tensor) -> torch.Tensor:
    """log density of N(mean, diag exp(log_std)^2) restricted to the action box [low, high] (renormalised by its
    mass there), summed over action dimensions: (batch,). Computed in float64."""
    actions, mean, log_std = actions.double(), mean.double(), log_std.double()
    std = log_std.exp()
    mass = _log_normal_mass((low.double() - mean) / std, (high.double() - mean) / std)
    return gaussian_log_prob(actions, mean, log_std) - mass.sum(-1)


def sample_box_gaussian(mean: np.ndarray, std: float, low: np.ndarray, high: np.ndarray,
                        rng: np.random.Generator) -> np.ndarray:
    """Draws of N(mean, std^2) restricted to [low, high] (inverse CDF, elementwise): the IS target as executed."""
    mean = torch.as_tensor(mean, dtype=torch.float64)
    lower = (torch.as_tensor(low, dtype=torch.float64) - mean) / std
    upper = (torch.as_tensor(high, dtype=torch.float64) - mean) / std
    flip = lower > 0  # both bounds above the mean: draw the mirror image, where Phi keeps its precision
    lower, upper = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    p_lower, p_upper = torch.special.ndtr(lower), torch.special.ndtr(upper)
    u = torch.as_tensor(rng.uniform(size=tuple(mean.shape)), dtype=torch.float64)
    z = torch.special.ndtri(p_lower + u * (p_upper - p_lower)).clamp(lower, upper)
    return np.clip((mean + std * torch.where(flip, -z, z)).numpy(), low, high)


# ---------------------------------------------------------------------------------------------------
# The estimators (numpy, float64; also used by common/figures/importance_sampling.py)
# ---------------------------------------------------------------------------------------------------


def pad_episodes(values: list[np.ndarray]) -> np.ndarray:
    """Ragged per-episode arrays as one (n, T_max) float64 array, zero after each episode's end (a log-ratio
    of 0 and a reward of 0: the ended episode sits in an absorbing state where pi and pi_beta agree)."""
    out = np.zeros((len(values), max(len(v) for v in values)))
    for i, v in enumerate(values):
        out[i, :len(v)] = v
    return out


def _signed_log_mean(log_weights: np.ndarray, values: np.ndarray, axis: int) -> np.ndarray:
    """mean over `axis` of exp(log_weights) * values, computed in the log domain (no overflow before the
    result itself overflows; then +-inf)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_abs = log_weights + np.log(np.abs(values))
        top = np.max(np.where(values != 0, log_abs, -np.inf), axis=axis, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        total = (np.sign(values) * np.exp(log_abs - top)).mean(axis=axis, keepdims=True)
        return np.squeeze(total * np.exp(top), axis=axis)


def importance_sampling_estimates(log_ratios: np.ndarray, rewards: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """The four IS estimates from `log_ratios` = log pi(a_t|s_t) - log pi_beta(a_t|s_t) and `rewards`, both
    (..., n episodes, T steps) (pad ragged episodes with `pad_episodes`); returns arrays of shape (...)."""
    log_ratios = np.asarray(log_ratios, np.float64)
    rewards = np.asarray(rewards, np.float64)
    discount = gamma ** np.arange(rewards.shape[-1])
    log_rho_t = np.cumsum(log_ratios, axis=-1)  # log rho_{0:t}
    log_rho = log_rho_t[..., -1]  # log rho_{0:T-1}
    returns = (rewards * discount).sum(-1)
    # weighted: self-normalised weights softmax(log rho) over episodes, stable for any size of ratio
    w = np.exp(log_rho - log_rho.max(-1, keepdims=True))
    w_t = np.exp(log_rho_t - log_rho_t.max(-2, keepdims=True))
    return {
        "ordinary IS": _signed_log_mean(log_rho, returns, axis=-1),
        "per-decision IS": _signed_log_mean(log_rho_t, rewards * discount, axis=-2).sum(-1),
        "weighted IS": (w * returns).sum(-1) / w.sum(-1),
        "weighted per-decision IS": ((w_t * rewards).sum(-2) / w_t.sum(-2) * discount).sum(-1),
    }


def effective_sample_size(log_weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of the weights exp(log_weights): how many episodes carry the estimate."""
    w = np.exp(log_weights - np.max(log_weights))
    return float(w.sum() ** 2 / np.square(w).sum())


def bootstrap_interval(statistic, n: int, resamples: int, confidence: float, rng: np.random.Generator,
                       row_size: int = 1) -> np.ndarray:
    """Percentile interval (2, ...) of `statistic(indices)` over `resamples` resamples of range(n) with
    replacement; `statistic` takes an index array (k, n) and returns values (k, ...). Resamples go in chunks
    of about 2e7 / (n row_size) so that a statistic over (k, n, row_size) arrays stays in memory."""
    chunk = max(1, int(2e7 // max(1, n * row_size)))
    idx = rng.integers(0, n, size=(resamples, n))
    values = np.concatenate([statistic(idx[i:i + chunk]) for i in range(0, resamples, chunk)])
    alpha = (1.0 - confidence) / 2
    return np.nanquantile(values, [alpha, 1.0 - alpha], axis=0)


# ---------------------------------------------------------------------------------------------------
# The evaluated policy, the dataset's episodes, the truth
# ---------------------------------------------------------------------------------------------------


def _dataset_env_id(name: str) -> str | None:
    """The environment id stored with a local Minari dataset, or None when it cannot be read cheaply."""
    try:
        meta = json.loads((minari_root() / resolve_name(name).minari_id / "data" / "metadata.json").read_text())
        spec = meta.get("env_spec")
        return json.loads(spec).get("id") if isinstance(spec, str) else None
    except (OSError, ValueError, UserError, AttributeError):
        return None


# runs whose act() is not one deterministic action per state (the estimators below evaluate pi(s))
NOT_A_FUNCTION_OF_THE_STATE = {
    "bc_expressive": "samples its action from the fitted distribution",
    "diffusion_bc": "samples its action by denoising random noise (and keeps a plan with action chunks)",
    "dt": "conditions on the episode's history and a target return",
}


def policy_problem(ckpt: dict, dataset) -> str | None:
    """Why the run of checkpoint `ckpt` cannot be evaluated on `dataset` here (one line), or None when it can:
    it must be a trained policy of the state alone, for the same observation and action spaces and env."""
    algo, trained_on = ckpt.get("algo"), ckpt.get("config", {}).get("env", "?")
    if algo == "ope":
        return "it is an ope.py run, not a trained policy; pass the run directory of a training run"
    if algo in NOT_A_FUNCTION_OF_THE_STATE:
        return (f"it is a {algo}.py run, whose policy {NOT_A_FUNCTION_OF_THE_STATE[algo]}: importance sampling and FQE "
                f"here need one deterministic action per state, pi(s)")
    spec = DataSpec(**ckpt["spec"])
    if spec != dataset.spec:
        kind = lambda s: "discrete" if s.discrete else "continuous"  # noqa: E731
        return (f"its policy was trained on '{trained_on}' (obs {spec.obs_dim}-d, {kind(spec)} {spec.act_dim}-d "
                f"actions, bound {spec.max_action:g}) but '{dataset.name}' has obs {dataset.obs_dim}-d, "
                f"{kind(dataset)} {dataset.act_dim}-d actions, bound {dataset.max_action:g}: evaluate it on a dataset "
                f"of the environment it was trained for")
    own_env, data_env = _dataset_env_id(trained_on), getattr(dataset.eval_env_spec, "id", None)
    if own_env and data_env and own_env != data_env:
        return (f"its policy was trained on '{trained_on}' ({own_env}) but '{dataset.name}' comes from {data_env}: "
                f"evaluate it on a dataset of the environment it was trained for")
    return None


def newest_run(runs_dir: str, env: str, dataset) -> str:
    """The newest run directory under `runs_dir` (any algorithm but ope) trained on dataset `env` that can be
    evaluated on `dataset` (see `policy_problem`): newer runs that cannot are skipped, each named on stderr with
    the reason; `UserError` saying why when none can."""
    folder = env.replace("/", "-")
    found = [Path(p) for name in ("checkpoint.pt", "checkpoint.path")  # .path: runs with --checkpoint-dir
             for p in glob.glob(os.path.join(runs_dir, "*", folder, "*", name))]
    candidates = sorted({p.parent for p in found if p.parts[-4] != "ope"}, reverse=True,
                        key=lambda p: ((p / "config.json").stat().st_mtime if (p / "config.json").exists()
                                       else p.stat().st_mtime, str(p)))
    if not candidates:
        fail(f"no trained run for '{env}' under {runs_dir}/ to evaluate; train one (e.g. `python algorithms/iql.py "
             f"--env {env}`) or pass --policy RUN_DIR")
    skipped = []
    for run_dir in candidates:
        try:
            problem = policy_problem(load_checkpoint(run_dir, map_location="cpu"), dataset)
        except UserError as err:  # an unreadable or unfinished run: say so and look further
            problem = str(err)
        if problem is None:
            for line in skipped:
                print(f"skipping a newer run: {line}", file=sys.stderr, flush=True)
            return str(run_dir)
        skipped.append(f"{run_dir}: {problem}")
    fail(f"none of the {len(candidates)} run(s) for '{env}' under {runs_dir}/ can be evaluated by ope.py (the newest, "
         f"{skipped[0]}); train a policy of the state (e.g. `python algorithms/iql.py --env {env}`) or pass "
         f"--policy RUN_DIR")


def load_target_policy(path: str, dataset, device: torch.device):
    """(deterministic torch policy on normalised observations, its ObsNormalizer or None, checkpoint) of the
    run at `path`, checked against `dataset` (same observation and action sizes, same environment)."""
    ckpt = load_checkpoint(path, map_location="cpu")  # one clear line when the run or file is missing
    problem = policy_problem(ckpt, dataset)
    if problem is not None:
        fail(f"{path}: {problem}")
    agent, ckpt = load_agent(path, str(device))
    normalizer = ObsNormalizer.from_state_dict(ckpt["normalizer"]) if ckpt.get("normalizer") else None
    return agent.act, normalizer, ckpt


def episode_arrays(dataset, normalizer) -> dict[str, list[np.ndarray]]:
    """Per episode: observations (normalised as the policy saw them) and actions, rewards."""
    norm = normalizer or (lambda x: x)
    return {"obs": [norm(e.observations[:-1]) for e in dataset.episodes],
            "actions": [e.actions.astype(np.float32) for e in dataset.episodes],
            "rewards": [e.rewards.astype(np.float64) for e in dataset.episodes]}


@torch.no_grad()
def log_ratios(agent: Agent, episodes: dict, target_std: float, low: np.ndarray, high: np.ndarray,
               device: torch.device) -> list[np.ndarray]:
    """Per episode, log rho_t = log pi(a_t|s_t) - log pi_beta_hat(a_t|s_t), both Gaussians restricted to the
    action box [low, high] (act_dim,): pi = N(pi_det(s_t), (target_std max_action)^2), pi_beta_hat = N(mu, sigma^2)."""
    log_sigma = math.log(target_std * agent.spec.max_action)
    low, high = (torch.as_tensor(np.asarray(b, np.float64).reshape(-1), device=device) for b in (low, high))
    out = []
    for obs, actions in zip(episodes["obs"], episodes["actions"]):
        s = torch.as_tensor(obs, device=device)
        a = torch.as_tensor(actions, device=device)
        # log sigma in float64: rounded to float32 it would shift log pi by up to ~1e-6 per step at |z| ~ 10
        target = box_gaussian_log_prob(a, agent.act(s), torch.full_like(a, log_sigma, dtype=torch.float64), low,
                                       high)
        mean, log_std = agent.behavior_distribution(s)
        out.append((target - box_gaussian_log_prob(a, mean, log_std, low, high)).cpu().numpy())
    return out


@torch.no_grad()
def true_values(dataset, policy, normalizer, episodes: int, seed: int, gamma: float, noise_std: float,
                device: torch.device) -> dict[str, np.ndarray]:
    """Discounted and undiscounted returns of `policy` (deterministic torch policy) in the dataset's env over
    `episodes` episodes, with Gaussian action noise of std `noise_std` restricted to the action box (the IS
    target as its density has it; 0: the deterministic policy)."""
    envs = make_eval_envs(dataset, episodes)
    obs, _ = envs.reset(seed=[EVAL_SEED_OFFSET + seed + i for i in range(episodes)])
    rng = np.random.default_rng(seed)
    low, high = dataset.action_space.low, dataset.action_space.high
    discounted, undiscounted = np.zeros(episodes), np.zeros(episodes)
    done = np.zeros(episodes, bool)
    t = 0
    while not done.all():
        flat = flatten_observation(obs, dataset.observation_space)
        if normalizer is not None:
            flat = normalizer(flat)
        action = policy(torch.as_tensor(flat, device=device)).cpu().numpy().reshape(episodes, *dataset.action_space.shape)
        if noise_std > 0:
            action = sample_box_gaussian(action, noise_std, low, high, rng)
        action = np.clip(action, low, high).astype(np.float32)
        obs, reward, terminated, truncated, _ = envs.step(action)
        discounted += np.where(done, 0.0, gamma ** t * reward)
        undiscounted += np.where(done, 0.0, reward)
        done |= np.asarray(terminated) | np.asarray(truncated)
        t += 1
    envs.close()
    return {"discounted": discounted, "undiscounted": undiscounted}


def estimate(agent: Agent, episodes: dict, config: Config, action_space, device: torch.device) -> dict:
    """Every estimate with its bootstrap interval: {name: {"estimate", "low", "high"}} plus the IS weights'
    effective sample size. `action_space`: the Box whose bounds restrict the IS densities."""
    rng = np.random.default_rng(config.seed)
    lr = pad_episodes(log_ratios(agent, episodes, config.target_std, action_space.low, action_space.high, device))
    r = pad_episodes(episodes["rewards"])
    n = len(r)
    point = importance_sampling_estimates(lr, r, config.gamma)
    intervals = bootstrap_interval(lambda idx: np.stack(list(importance_sampling_estimates(
        lr[idx], r[idx], config.gamma).values()), -1), n, config.bootstrap, config.confidence, rng,
        row_size=r.shape[1])
    out = {name: {"estimate": float(point[name]), "low": float(intervals[0, k]), "high": float(intervals[1, k])}
           for k, name in enumerate(point)}
    with torch.no_grad():
        s0 = torch.as_tensor(np.stack([o[0] for o in episodes["obs"]]), device=device)
        q0 = agent.q_value(s0, agent.act(s0)).double().cpu().numpy()
    low, high = bootstrap_interval(lambda idx: q0[idx].mean(-1), n, config.bootstrap, config.confidence, rng)
    out["FQE"] = {"estimate": float(q0.mean()), "low": float(low), "high": float(high)}
    out["effective sample size"] = effective_sample_size(lr.sum(-1))
    return out


def report(estimates: dict, truth: dict | None, config: Config, n_episodes: int, policy_path: str,
           trained_on: str, algo: str, step: int) -> str:
    """The printed table: each estimate, its interval, and the true value beside it."""
    lines = [f"off-policy evaluation of {policy_path} ({algo}, trained on {trained_on}, checkpoint step {step}) on "
             f"{config.env}: "
             f"{n_episodes} episodes, gamma {config.gamma:g}, IS target N(pi(s), ({config.target_std:g} max_action)^2) "
             f"on the action box, {config.confidence:.0%} bootstrap intervals ({config.bootstrap} resamples)",
             f"{'estimator':26s} {'estimate':>12s} {'interval':>27s} {'true value':>12s}"]
    for name, row in estimates.items():
        if not isinstance(row, dict):
            continue
        true_key = "deterministic" if name == "FQE" else "gaussian"
        true = f"{truth[true_key]:12.2f}" if truth else f"{'(no env)':>12s}"
        lines.append(f"{name:26s} {row['estimate']:12.4g} [{row['low']:11.4g}, {row['high']:11.4g}] {true}")
    lines.append(f"effective sample size of the IS weights: {estimates['effective sample size']:.1f} of "
                 f"{n_episodes} episodes")
    if truth:
        lines.append(f"true values over {config.eval_episodes} env episodes: discounted {truth['deterministic']:.2f} "
                     f"(deterministic pi, FQE's target), {truth['gaussian']:.2f} (Gaussian target, IS's); "
                     f"undiscounted return {truth['return']:.1f}")
    return "\n".join(lines)


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    if not 0.0 < config.target_std:
        fail(f"--target-std must be positive, got {config.target_std}")
    if not 0.0 < config.confidence < 1.0:
        fail(f"--confidence must lie in (0, 1), got {config.confidence}")
    if config.bootstrap < 1:
        fail(f"--bootstrap must be at least 1, got {config.bootstrap}")
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"ope.py evaluates continuous-action policies; '{config.env}' has discrete actions")
    policy_path = config.policy or newest_run(config.runs_dir, config.env, dataset)
    policy, normalizer, policy_ckpt = load_target_policy(policy_path, dataset, device)
    policy_algo, policy_step = policy_ckpt.get("algo", "?"), int(policy_ckpt["step"])
    chosen = "" if config.policy else f" (the newest run on {config.env} that ope.py can evaluate)"
    print(f"evaluating {policy_path}{chosen}: {policy_algo}, checkpoint step {policy_step}", file=sys.stderr,
          flush=True)
    if config.policy is None:
        config = dataclasses.replace(config, policy=policy_path)  # saved with the run: a resume evaluates it again

    data = dataset.transitions()
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]}, device, config.seed)
    agent = Agent(config, dataset.spec, device, target_policy=policy)
    # pi_beta_hat's box: the dataset's own action bounds, as the ratios in `estimate` use
    agent.action_low = torch.as_tensor(dataset.action_space.low, dtype=torch.float32, device=device).reshape(-1)
    agent.action_high = torch.as_tensor(dataset.action_space.high, dtype=torch.float32, device=device).reshape(-1)
    episodes = episode_arrays(dataset, normalizer)
    s0 = torch.as_tensor(np.stack([o[0] for o in episodes["obs"]]), device=device)

    run = Run("ope", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    for step in run.steps(start):
        logs = agent.update(sampler.sample(config.batch_size))
        if run.should_eval(step) or run.should_log(step):
            logs["train/fqe_estimate"] = agent.q_value(s0, agent.act(s0)).mean()
        if run.should_log(step) or run.should_eval(step):
            run.log(step, logs)
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, sampler)

    estimates = estimate(agent, episodes, config, dataset.action_space, device)
    truth, result = None, None
    if dataset.eval_env_spec is not None:
        deterministic = true_values(dataset, policy, normalizer, config.eval_episodes, config.seed, config.gamma,
                                    0.0, device)
        gaussian = true_values(dataset, policy, normalizer, config.eval_episodes, config.seed, config.gamma,
                               config.target_std * dataset.max_action, device)
        truth = {"deterministic": float(deterministic["discounted"].mean()),
                 "gaussian": float(gaussian["discounted"].mean()),
                 "return": float(deterministic["undiscounted"].mean())}
        returns = deterministic["undiscounted"]
        normalized = dataset.normalized_score(returns)
        # the deterministic episodes are common.evaluation.evaluate's (same seeds): its result, read off them
        result = {"returns": returns, "return_mean": float(returns.mean()), "return_std": float(returns.std()),
                  "normalized_mean": None if normalized is None else float(normalized.mean()),
                  "normalized_std": None if normalized is None else float(normalized.std())}
        run.log_eval(config.max_steps, result)
    print(report(estimates, truth, config, len(episodes["rewards"]), policy_path,
                 policy_ckpt.get("config", {}).get("env", "?"), policy_algo, policy_step), flush=True)
    if result is None:
        nan = float("nan")
        result = {"returns": np.zeros(0), "return_mean": nan, "return_std": nan, "normalized_mean": None,
                  "normalized_std": None}
    return run.finish(result, extra={"policy": str(policy_path), "policy_algo": policy_algo,
                                     "policy_step": policy_step, "gamma": config.gamma,
                                     "estimates": estimates, "true_values": truth})


if __name__ == "__main__":
    run_cli(train, Config)
