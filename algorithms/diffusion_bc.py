"""Diffusion policy: behaviour cloning with a DDPM over actions conditioned on the state.

Lecture sections: "Behavior Cloning / Imitation Learning" and "What can go wrong in imitation learning?
2. Multimodal demonstration data", answered by "Use expressive distribution class to fit p(a|s) ... e.g.
Gaussian mixture, Categorical, VAEs, diffusion models" (the other three are `algorithms/bc_expressive.py`).
A denoiser learns to undo Gaussian noise added to the demonstrated actions; sampling runs the noise
process backwards from pure noise, so the policy draws whole actions from p(a|s), every mode included.
Papers: Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Chi et al. 2023, "Diffusion Policy:
Visuomotor Policy Learning via Action Diffusion" (noise schedule, clipped x_0, EMA, action chunks); Wang et
al. 2023, "Diffusion Policies as an Expressive Policy Class for Offline RL" (Diffusion-QL: the MLP
denoiser with a sinusoidal timestep embedding, for state inputs).

Usage:
    python algorithms/diffusion_bc.py --env local/fork/expert-v0
    python algorithms/diffusion_bc.py --env local/pendulum/expert-v0 --diffusion-steps 50
    python algorithms/diffusion_bc.py --env local/fork/expert-v0 --action-horizon 8 --execute-steps 4

Training (one step): scale actions to [-1, 1] by dividing by the env's bound max_action (Diffusion Policy's
"limits" normaliser instead fits each action dimension's data min and max to [-1, 1]; the two agree only where
the data spans the whole box), draw t ~ U{0..T-1} and eps ~ N(0, I), noise the action to
x_t = sqrt(abar_t) a + sqrt(1 - abar_t) eps, regress eps_theta(x_t, t, s) on eps (epsilon prediction),
then move the EMA copy of the denoiser. Sampling (evaluation, with the EMA weights): x_T ~ N(0, I); for
t = T-1..0: x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t), clamped to [-1, 1] (the action
bounds), x_{t-1} = mu_tilde(x0_hat, x_t) + sigma_t z with the posterior's variance beta_tilde_t
("fixed_small"), no noise at t = 0. Random draws come from a private device generator, seeded with
--seed and reseeded before every evaluation: evaluation is reproducible and leaves the training RNG alone.
The policy only samples (it has no deterministic mode): `common.checkpoint.load_policy` needs `sample=True`
and then replays the evaluation's draws; with action chunks it returns a policy that keeps its plan across
calls (`Agent.stateful_policy`), reset between episodes.

Choices, from the reference implementations: T = 100 steps with the squared-cosine schedule
(squaredcos_cap_v2), epsilon prediction, clipped x0_hat and fixed_small variance, EMA with warm-up
decay 1 - k^-0.75 after k updates (0 for the first two) capped at 0.9999 (all Diffusion Policy's low-dim
settings); the denoiser is Diffusion-QL's MLP (3 x 256 Mish, 16-d sinusoidal t embedding) in place of
Diffusion Policy's 1-D convolutional U-Net, which only pays off for long action chunks; Adam at 3e-4
(Diffusion-QL). Optional action chunks (`--action-horizon H`): the model denoises H consecutive actions at
once (chunks cut from episodes, padded at the end with the last action) and the policy executes the first
`--execute-steps` of each plan before planning again (receding horizon). Diffusion Policy conditions on the
last 2 observations; here on the current one. Per-dataset settings (training length) live in `DATASET_SETTINGS`.

--compile compiles the whole update, the EMA step included (common/optim.py; the EMA's decay is a device tensor
changed in place); the sampling loop runs eagerly.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import numpy as np
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
    # --- diffusion policy ---
    diffusion_steps: int = 100
    """T, the number of noise levels (Diffusion Policy: 100 for training and sampling)"""
    beta_schedule: Literal["cosine", "linear", "vp"] = "cosine"
    """noise schedule beta_1..beta_T: cosine (squaredcos_cap_v2, Diffusion Policy), linear 1e-4 -> 2e-2
    (DDPM's, made for T = 1000: at T = 100 it leaves alpha-bar_T = 0.36, far from pure noise, so use it with
    --diffusion-steps 1000), or vp (Diffusion-QL's variance-preserving schedule, b_min 0.1, b_max 10)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the denoiser eps_theta (Diffusion-QL: 3 x 256, Mish)"""
    time_embed_dim: int = 16
    """size of the sinusoidal embedding of t fed to eps_theta (Diffusion-QL: 16)"""
    lr: float = 3e-4
    """Adam learning rate (Diffusion-QL: 3e-4)"""
    ema: bool = True
    """evaluate with the exponential moving average of the denoiser's weights (Diffusion Policy)"""
    ema_power: float = 0.75
    """EMA warm-up: the decay of the EMA step after k updates is 1 - k^-power, 0 for k <= 1 (Diffusion
    Policy: 0.75)"""
    ema_max_decay: float = 0.9999
    """cap of the EMA decay (Diffusion Policy: 0.9999)"""
    action_horizon: int = 1
    """H, actions denoised together as one chunk a_t..a_{t+H-1} (Diffusion Policy: 16; 1 = no chunks)"""
    execute_steps: int = 1
    """actions of each sampled chunk executed before sampling again, <= H (Diffusion Policy: 8)"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std (eps 1e-3)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. Diffusion-QL trains 2M steps on D4RL locomotion; 1M here as bc.py.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 20_000}),
    ("local/fork/*", {"max_steps": 10_000}),
    ("*", {"max_steps": 1_000_000}),
]

COSINE_OFFSET = 0.008  # s in abar(t) = cos^2((t / T + s) / (1 + s) pi / 2) (Nichol & Dhariwal 2021)
MAX_BETA = 0.999  # the cosine schedule's cap on beta_t
LINEAR_BETAS = (1e-4, 2e-2)  # DDPM's linear schedule ends (Diffusion-QL's linear_beta_schedule)
VP_BETA_MIN, VP_BETA_MAX = 0.1, 10.0  # Diffusion-QL's vp_beta_schedule
MIN_POSTERIOR_VARIANCE = 1e-20  # diffusers clamps the fixed_small variance here


# ---------------------------------------------------------------------------------------------------
# The noise schedule and its closed forms (DDPM)
# ---------------------------------------------------------------------------------------------------


def make_betas(schedule: str, steps: int) -> torch.Tensor:
    """beta_1..beta_T (index 0..T-1) in float64 for the named schedule."""
    if schedule == "cosine":
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        alpha_bar = torch.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=MAX_BETA)
    if schedule == "linear":
        return torch.linspace(*LINEAR_BETAS, steps, dtype=torch.float64)
    if schedule == "vp":
        t = torch.arange(1, steps + 1, dtype=torch.float64)
        return 1 - torch.exp(-VP_BETA_MIN / steps - 0.5 * (VP_BETA_MAX - VP_BETA_MIN) * (2 * t - 1) / steps ** 2)
    fail(f"unknown --beta-schedule '{schedule}' (cosine, linear or vp)")


class NoiseSchedule:
    """The DDPM quantities for t = 0..T-1, precomputed in float64 and stored as `dtype` on the device."""

    def __init__(self, betas: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32):
        betas = betas.double()
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        self.steps = len(betas)
        self.betas, self.alpha_bar = to(betas), to(alpha_bar)
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = to(alpha_bar.sqrt()), to((1 - alpha_bar).sqrt())
        self.sqrt_recip_alpha_bar = to((1 / alpha_bar).sqrt())
        self.sqrt_recip_minus_one = to((1 / alpha_bar - 1).sqrt())
        # posterior q(x_{t-1} | x_t, x_0) = N(coef_x0_t x_0 + coef_xt_t x_t, beta_tilde_t), beta_tilde_0 = 0
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        self.posterior_variance = to(posterior_variance)
        self.posterior_std = to(posterior_variance.clamp(min=MIN_POSTERIOR_VARIANCE).sqrt())
        self.coef_x0 = to(betas * alpha_bar_prev.sqrt() / (1 - alpha_bar))
        self.coef_xt = to((1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar))

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process in closed form, q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self.sqrt_alpha_bar[t].unsqueeze(-1) * x0 + self.sqrt_one_minus_alpha_bar[t].unsqueeze(-1) * eps

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """x0_hat = sqrt(1 / abar_t) x_t - sqrt(1 / abar_t - 1) eps, the forward process solved for x_0."""
        return self.sqrt_recip_alpha_bar[t] * x_t - self.sqrt_recip_minus_one[t] * eps

    def reverse_step(self, x_t: torch.Tensor, eps_hat: torch.Tensor, t: int, z: torch.Tensor,
                     clip: float | None = 1.0) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1}: mu_tilde(x0_hat, x_t) + sqrt(beta_tilde_t) z (no noise at t = 0),
        with x0_hat clamped to [-clip, clip] (the action bounds) unless clip is None."""
        x0_hat = self.predict_x0(x_t, eps_hat, t)
        if clip is not None:
            x0_hat = x0_hat.clamp(-clip, clip)
        mean = self.coef_x0[t] * x0_hat + self.coef_xt[t] * x_t
        return mean + self.posterior_std[t] * z if t > 0 else mean


def reverse_process(schedule: NoiseSchedule, eps_model, noise: torch.Tensor) -> torch.Tensor:
    """DDPM's sampling loop: x_T = noise[0], then for t = T-1..0 one `reverse_step` with eps_model(x_t, t)
    (t a (B,) long tensor) and z = noise[t] (unused at t = 0). Returns x_0 clamped to [-1, 1]: (B, D)."""
    x = noise[0]
    for t in reversed(range(schedule.steps)):
        steps = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x = schedule.reverse_step(x, eps_model(x, steps), t, noise[t])
    return x.clamp(-1.0, 1.0)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The transformer's position encoding of the step t: [sin(t w_j), cos(t w_j)], w_j = 10000^(-j/(dim/2-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    angles = t.float().unsqueeze(-1) * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Denoiser(nn.Module):
    """eps_theta(x_t, t, s): an MLP on [x_t, embed(t), s] (Diffusion-QL's network, Mish activations)."""

    def __init__(self, obs_dim: int, action_size: int, hidden_dims: tuple[int, ...], time_embed_dim: int):
        super().__init__()
        self.time_embed_dim = time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, 2 * time_embed_dim), nn.Mish(),
                                      nn.Linear(2 * time_embed_dim, time_embed_dim))
        layers, last = [], action_size + time_embed_dim + obs_dim
        for width in hidden_dims:
            layers += [nn.Linear(last, width), nn.Mish()]
            last = width
        layers.append(nn.Linear(last, action_size))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        t_embed = self.time_mlp(sinusoidal_embedding(t, self.time_embed_dim))
        return self.net(torch.cat([x_t, t_embed, obs], dim=-1))


def ema_decay(updates_done: int, power: float, max_decay: float) -> float:
    """Diffusion Policy's EMA warm-up: decay before update number k (from 0) is 0 for k <= 1, then
    min(max_decay, 1 - k^-power) (EMAModel.get_decay with inv_gamma 1, update_after_step 0)."""
    step = updates_done - 1
    if step <= 0:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + step) ** -power)


class Agent:
    """The denoiser, its EMA copy, the noise schedule, the DDPM update and the sampling act()."""

    SAMPLES_ACTIONS = True  # act() draws x_T ~ N(0, I): load_policy needs sample=True (no deterministic mode)

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("diffusion_bc.py is for continuous (Box) actions; for discrete actions bc.py's categorical head "
                 "already fits any p(a|s)")
        check_config(config)
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.action_size = spec.act_dim * config.action_horizon
        self.schedule = NoiseSchedule(make_betas(config.beta_schedule, config.diffusion_steps), device)
        self.denoiser = Denoiser(spec.obs_dim, self.action_size, config.hidden_dims, config.time_embed_dim).to(device)
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.params, self.ema_params = list(self.denoiser.parameters()), list(self.ema_denoiser.parameters())
        self.optimizer = adam(self.params, config.lr, config)
        self.ema_updates = 0  # EMA updates done so far (drives the warm-up decay)
        # 1 - decay as a device tensor changed in place: a compiled update never retraces
        self.ema_weight = torch.zeros((), device=device)
        self.act_generator = torch.Generator(device=device)
        # with action chunks the next action depends on the plan made earlier in the episode
        self.history_dependent = config.action_horizon > 1
        self.reset_sampling()
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        decay = ema_decay(self.ema_updates, self.config.ema_power, self.config.ema_max_decay)
        self.ema_weight.fill_(1.0 - decay)
        self.ema_updates += 1
        return self._update(batch["obs"], batch["actions"])

    def _update_impl(self, obs: torch.Tensor, actions: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = (actions / self.max_action).clamp(-1.0, 1.0)  # (B, H * A) scaled to [-1, 1]
        t = torch.randint(0, self.schedule.steps, (obs.shape[0],), device=obs.device)
        eps = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, eps, t)
        # L(theta) = E_{t, (s,a)~D, eps~N(0,I)} || eps - eps_theta( sqrt(abar_t) a + sqrt(1 - abar_t) eps, t, s ) ||^2
        #   (lecture: "Use expressive distribution class to fit p(a|s)": diffusion models; DDPM's L_simple)
        loss = F.mse_loss(self.denoiser(x_t, t, obs), eps)
        logs = {"train/diffusion_loss": loss.detach()}  # taken before the backward, which consumes the graph
        loss.backward(inputs=self.params)
        self.optimizer.step()
        with torch.no_grad():
            # theta_ema <- decay theta_ema + (1 - decay) theta
            torch._foreach_lerp_(self.ema_params, self.params, self.ema_weight)
        return logs

    def reset_sampling(self) -> None:
        """Reseed act()'s generator with --seed and drop any planned chunk: the next evaluation is
        reproducible and starts planning afresh."""
        self.act_generator.manual_seed(self.config.seed)
        self.plan, self.plan_step = None, 0

    @torch.no_grad()
    def sample(self, obs: torch.Tensor) -> torch.Tensor:
        """Draw a ~ p(a|s) (B, H * A) in [-max_action, max_action] by the reverse process, from x_T ~ N(0, I)."""
        network = self.ema_denoiser if self.config.ema else self.denoiser
        noise = torch.randn(self.schedule.steps, obs.shape[0], self.action_size, device=obs.device,
                            generator=self.act_generator)
        return self.max_action * reverse_process(self.schedule, lambda x, t: network(x, t, obs), noise)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """The next action; with chunks, the next of the current plan, sampled anew every execute_steps calls."""
        if self.config.action_horizon == 1:
            return self.sample(obs)
        return self.next_planned_action(self, obs)

    @torch.no_grad()
    def next_planned_action(self, holder, obs: torch.Tensor) -> torch.Tensor:
        """The next action of the plan kept in `holder.plan` (B, H, A) / `holder.plan_step` (the agent itself
        for act(), a policy's own state for stateful_policy), planning anew every execute_steps calls."""
        horizon = self.config.action_horizon
        if holder.plan is None or holder.plan_step >= self.config.execute_steps or holder.plan.shape[0] != obs.shape[0]:
            holder.plan = self.sample(obs).view(obs.shape[0], horizon, self.spec.act_dim)
            holder.plan_step = 0
        action = holder.plan[:, holder.plan_step]
        holder.plan_step += 1
        return action

    def stateful_policy(self, num_envs: int):
        """A policy of its own plan for `num_envs` episodes, called as policy(obs (n, obs_dim), rewards (n,)) (the
        protocol of `common.evaluation.evaluate_stateful`; rewards unused): act()'s receding horizon, its draws
        from the agent's generator (`common.checkpoint.load_policy` with sample=True)."""
        holder = SimpleNamespace(plan=None, plan_step=0)
        if self.config.action_horizon == 1:
            return lambda obs, rewards: self.sample(obs)
        return lambda obs, rewards: self.next_planned_action(holder, obs)

    def state_dict(self) -> dict:
        return {"denoiser": self.denoiser.state_dict(), "ema_denoiser": self.ema_denoiser.state_dict(),
                "optimizer": self.optimizer.state_dict(), "ema_updates": self.ema_updates}

    def load_state_dict(self, state: dict) -> None:
        self.denoiser.load_state_dict(state["denoiser"])
        self.ema_denoiser.load_state_dict(state["ema_denoiser"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.ema_updates = int(state["ema_updates"])


# ---------------------------------------------------------------------------------------------------
# What train() uses: the settings check and the action chunks
# ---------------------------------------------------------------------------------------------------


def check_config(config: Config) -> None:
    """One clear line for diffusion settings that cannot work (before any data is read or folder made)."""
    if config.diffusion_steps < 1:
        fail(f"--diffusion-steps must be at least 1 (the number of noise levels T), got {config.diffusion_steps}")
    if config.action_horizon < 1:
        fail(f"--action-horizon must be at least 1 (actions per chunk), got {config.action_horizon}")
    if not 1 <= config.execute_steps <= config.action_horizon:
        fail(f"--execute-steps must lie in [1, --action-horizon={config.action_horizon}], got {config.execute_steps}")
    if config.time_embed_dim < 4 or config.time_embed_dim % 2:
        fail(f"--time-embed-dim must be even and at least 4 (sines and cosines), got {config.time_embed_dim}")
    if config.ema_power <= 0:
        fail(f"--ema-power must be positive, got {config.ema_power}")
    if not 0.0 <= config.ema_max_decay < 1.0:
        fail(f"--ema-max-decay must lie in [0, 1), got {config.ema_max_decay}")
    if config.lr <= 0:
        fail(f"--lr must be positive, got {config.lr}")


def action_chunks(actions: np.ndarray, horizon: int) -> np.ndarray:
    """(N, A) actions of one episode -> (N, H * A): row t holds a_t..a_{t+H-1}, padded with a_{N-1}."""
    index = np.minimum(np.arange(len(actions))[:, None] + np.arange(horizon)[None, :], len(actions) - 1)
    return actions[index].reshape(len(actions), -1)


def train(config: Config) -> dict:
    check_config(config)  # this file's settings, before anything is printed, read or written
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"diffusion_bc.py is for continuous actions; '{config.env}' has discrete actions (use bc.py)")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    obs = normalizer(data["obs"]) if normalizer else data["obs"]
    # targets: single actions, or chunks a_t..a_{t+H-1} cut from each episode in the same row order
    actions = data["actions"] if config.action_horizon == 1 else np.concatenate(
        [action_chunks(ep.actions, config.action_horizon) for ep in dataset.episodes])
    sampler = TensorSampler({"obs": obs, "actions": actions}, device, config.seed)
    agent = Agent(config, dataset.spec, device)

    run = Run("diffusion_bc", config, dataset, device, normalizer)
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
