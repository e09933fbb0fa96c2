"""Online Soft Actor-Critic: the behaviour agent that generates D4RL-recipe datasets for continuous actions.

Lecture: "Offline Reinforcement Learning", the D4RL slide ("medium": partially-trained policy, SAC + early
stopping of the training). Papers: Haarnoja et al., "Soft Actor-Critic Algorithms and Applications" (2018,
automatic entropy tuning); Fu et al., "D4RL" (2020), whose gym-mujoco datasets were made with this agent.

Usage (standalone; `python -m common.build` drives it the same way):
    python -m common.build.behavior_sac --env Pendulum-v1 --max-steps 20000 --checkpoint-every 1000

What it keeps for the dataset builder:
  * `checkpoints`: the actor's weights every `checkpoint_every` env steps, each with the returns of the
    deterministic policy a = tanh(mu(s)) on `eval_episodes` evaluation episodes. The evaluation env is
    reset with the same seeds at every checkpoint, so checkpoints are compared on the same start states.
    Step 0 is the randomly initialised actor (D4RL's "random" policy); the last one is the final policy
    (D4RL's "expert").
  * the replay buffer, never evicted (capacity = `max_steps`), which is the stream of every collected
    episode; `stream_episodes(step)` cuts out the buffer as it was at env step `step` (D4RL's
    "medium-replay" is the buffer up to the medium policy).
  * `<checkpoint_dir>/agent_state.pt`, written at the first episode end after every `save_every` env steps
    and when training ends: networks, optimisers, temperature, buffer, checkpoints, step counter and every
    random state (sampling generator, warm-up generator, the training env's np_random). Saving only at
    episode ends means the env needs no state beyond its RNG, so a resumed run continues bit for bit as
    if never interrupted (same device and thread count).
  * `<checkpoint_dir>/expert_policy.pt` when training ends: the final policy as a policy file
    (`common.experts.save_policy_file`: plain tensors), the expert `dagger.py` loads from a build folder
    without importing the builder. `final_policy(build)` gives the same policy as this module's `Actor`;
    `python -m common.build.behavior_sac --export-expert BUILD` writes the file for a build made before.

Hyperparameters are SAC's and D4RL's defaults (not tuned per env): 256-256 MLPs, gamma 0.99, tau 0.005, Adam
lr 3e-4 for actor, critics and temperature, batch 256, target entropy -dim(A), one gradient step per env step
after `warmup_steps` steps of uniform random actions. Only `max_steps`, `warmup_steps` and `checkpoint_every`
change per env (presets in `common/build/recipe.py`).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoint import save_checkpoint
from common.errors import UserError, fail
from common.experts import AGENT_STATE_FILE, POLICY_FILE, save_policy_file

# Evaluation episode i of every checkpoint resets the evaluation env with seed `seed + EVAL_SEED_OFFSET + i`:
# far from the training env's seed, identical across checkpoints.
EVAL_SEED_OFFSET = 1_000_000
# log std of the Gaussian before tanh is clamped to this range (the SAC authors' code, also rlkit's, which
# D4RL used). With PyTorch's default init the random actor starts near log std 0, i.e. std 1.
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
STATE_FILE = AGENT_STATE_FILE  # "agent_state.pt"


@dataclass
class Config:
    env: str = "Pendulum-v1"
    """Gymnasium env id with a bounded Box action space."""
    max_episode_steps: int | None = None
    """Time limit of the env's episodes; None keeps the env's registered one."""
    seed: int = 0
    """Seeds network init, the training env, warm-up actions and all sampling."""
    device: str = "cpu"
    """torch device for networks and the replay buffer."""
    threads: int = 1
    """torch CPU threads. Bit-identical reruns need the same device and thread count."""
    max_steps: int = 20_000
    """Env steps of online training (also the replay buffer's capacity: nothing is evicted)."""
    batch_size: int = 256
    """Transitions per gradient step."""
    eval_episodes: int = 5
    """Episodes of the deterministic policy at every checkpoint."""
    log_every: int = 1000
    """Env steps between training statistics in the progress message."""
    checkpoint_every: int = 1000
    """K: keep the actor and its evaluation return every K env steps (also at step 0 and at the end)."""
    checkpoint_dir: str | None = None
    """Folder for the resumable state (agent_state.pt); None keeps nothing on disk."""
    resume: bool = True
    """Continue from checkpoint_dir/agent_state.pt when it exists."""
    save_every: int = 10_000
    """Write agent_state.pt at the first episode end after every this many env steps."""
    hidden: int = 256
    """Width of both hidden layers of the actor and of each critic."""
    gamma: float = 0.99
    """Discount gamma."""
    tau: float = 0.005
    """Polyak rate tau of the target critics: theta' <- (1 - tau) theta' + tau theta."""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and log alpha."""
    warmup_steps: int = 5000
    """Env steps of uniform random actions before the first gradient step."""


# Fields that change what the agent computes: a saved state made with other values cannot be resumed.
RECIPE_FIELDS = ("env", "max_episode_steps", "seed", "max_steps", "batch_size", "eval_episodes",
                 "checkpoint_every", "hidden",
                 "gamma", "tau", "lr", "warmup_steps")


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------


class Actor(nn.Module):
    """pi(a|s): a Gaussian over u, squashed a = center + scale * tanh(u) into the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mean = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)
        self.register_buffer("scale", torch.as_tensor((high - low) / 2, dtype=torch.float32))
        self.register_buffer("center", torch.as_tensor((high + low) / 2, dtype=torch.float32))

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """a = center + scale * tanh(mu(s)), shape (B, act_dim): the evaluation policy."""
        return self.center + self.scale * torch.tanh(self.mean(self.trunk(obs)))

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """a ~ pi(.|s) by reparameterisation, and log pi(a|s); shapes (B, act_dim) and (B,)."""
        h = self.trunk(obs)
        mu = self.mean(h)
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        eps = torch.randn(mu.shape, device=mu.device, generator=generator)
        u = mu + log_std.exp() * eps
        # log N(u; mu, std) = -eps^2/2 - log std - log(2 pi)/2, summed over action dims
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        # change of variables a = center + scale * tanh(u): subtract sum log(scale * (1 - tanh(u)^2)),
        # with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)) (stable for large |u|)
        log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u)) + self.scale.log()).sum(-1)
        return self.center + self.scale * torch.tanh(u), log_prob


class NumpyActor:
    """`Actor`'s forward pass in NumPy, for acting on one observation at a time (rollouts, evaluation).

    At batch size 1 torch's per-operator overhead costs about ten times the arithmetic; the same weights
    and equations in NumPy act ~10x faster. `tests/test_build.py` checks it matches `Actor`.
    """

    def __init__(self, policy: dict):
        p = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in policy.items()}
        self.layers = [(p["trunk.0.weight"], p["trunk.0.bias"]), (p["trunk.2.weight"], p["trunk.2.bias"])]
        self.mean, self.log_std = (p["mean.weight"], p["mean.bias"]), (p["log_std.weight"], p["log_std.bias"])
        self.scale, self.center = p["scale"], p["center"]

    def __call__(self, obs: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """center + scale * tanh(u) with u = mu(s) (rng None) or u ~ N(mu(s), std(s)^2); shape (act_dim,)."""
        h = obs
        for w, b in self.layers:
            h = np.maximum(w @ h + b, 0.0)
        u = self.mean[0] @ h + self.mean[1]
        if rng is not None:
            log_std = np.clip(self.log_std[0] @ h + self.log_std[1], LOG_STD_MIN, LOG_STD_MAX)
            u = u + np.exp(log_std) * rng.standard_normal(u.shape, dtype=np.float32)
        return self.center + self.scale * np.tanh(u)


def agent_state_file(build: str | Path) -> Path:
    """The saved agent state of a build folder: `<build>/agent/agent_state.pt` (the agent/ folder or the file
    itself also do); `UserError` when there is none."""
    path = Path(build)
    file = next((f for f in (path, path / "agent" / STATE_FILE, path / STATE_FILE) if f.is_file()), None)
    if file is None:
        fail(f"{build}: not a build folder (no agent/{STATE_FILE}; a scripted build such as fork has no agent)")
    return file


def agent_state(build: str | Path) -> dict:
    """A build folder's saved agent state (`agent_state_file`), read without running code from it."""
    file = agent_state_file(build)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        fail(f"cannot read the saved agent state {file}: {type(err).__name__}: {err}")


def final_policy(build: str | Path) -> Actor:
    """The final policy of a SAC build folder (its last checkpoint: the policy behind the "expert" quality), as
    an `Actor` on the CPU; `actor.deterministic(obs)` is the deterministic action, (B, obs_dim) -> (B, act_dim)."""
    state = agent_state(build)
    if "actor" not in state:
        fail(f"{build}: its agent is not SAC (for a Double DQN build use common.build.behavior_dqn)")
    policy = state["checkpoints"][-1]["policy"]
    obs_dim, act_dim = policy["trunk.0.weight"].shape[1], policy["mean.weight"].shape[0]
    with torch.random.fork_rng(devices=[]):  # the layers' initial weights, overwritten below: leave the RNG as it was
        actor = Actor(obs_dim, act_dim, state["recipe"]["hidden"], np.zeros(act_dim), np.zeros(act_dim))
    actor.load_state_dict(policy)
    return actor


def write_expert(actor: Actor, folder: str | Path, env_id: str, step: int) -> Path:
    """Write `actor`'s deterministic policy center + scale * tanh(mu(s)) to `<folder>/expert_policy.pt`."""
    return save_policy_file(Path(folder) / POLICY_FILE, [actor.trunk[0], actor.trunk[2], actor.mean], "tanh_box",
                            {"env": env_id, "agent": "SAC", "step": step}, scale=actor.scale, center=actor.center)


def export_expert(build: str | Path) -> Path:
    """Write a SAC build folder's final policy beside its agent state (`<build>/agent/expert_policy.pt`), for
    builds made before builds wrote it; returns the file."""
    state = agent_state(build)
    return write_expert(final_policy(build), agent_state_file(build).parent, state["recipe"]["env"],
                        state["checkpoints"][-1]["step"])


class TwinQ(nn.Module):
    """Q_1(s,a), Q_2(s,a): two 256-256 critics evaluated in one batched pass.

    Each layer's weights are stacked on a leading axis of size 2, so both critics cost one `baddbmm` per
    layer instead of two matmuls (half the operator calls, which dominate at these sizes on a CPU).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(n_in)  # nn.Linear's default init, per critic
            self.weights.append(nn.Parameter(torch.empty(2, n_in, n_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, n_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Both critics' values, shape (2, B)."""
        x = torch.cat([obs, action], dim=-1).expand(2, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel where the device supports it, else the multi-tensor (foreach) one."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, foreach=True)


@dataclass
class Checkpoint:
    """A policy at env step `step` (SAC's actor or DQN's Q-network) and the returns of its deterministic /
    greedy policy on the evaluation seeds."""

    step: int
    eval_returns: list[float]
    policy: dict  # the actor's (SAC) or Q-network's (DQN) state_dict, CPU tensors

    @property
    def eval_return(self) -> float:
        return float(np.mean(self.eval_returns))


# --------------------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------------------


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """`gym.make(env_id)` for a Box-observation, bounded-Box-action env with a time limit, else `UserError`."""
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        fail(f"cannot create env '{env_id}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if not isinstance(env.observation_space, gym.spaces.Box):
        fail(f"env '{env_id}' has observation space {env.observation_space}; the SAC behaviour agent needs a Box")
    space = env.action_space
    if not isinstance(space, gym.spaces.Box):
        fail(f"env '{env_id}' has action space {space}; SAC needs a Box (use common.build.behavior_dqn for Discrete)")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        fail(f"env '{env_id}' has an unbounded action space {space}; SAC's tanh policy needs finite bounds")
    if env.spec is None or env.spec.max_episode_steps is None:
        fail(f"env '{env_id}' has no time limit; give one (--max-episode-steps) so episodes end")
    return env


def flat_obs(obs) -> np.ndarray:
    """A Box observation as a flat float32 vector (what the networks see and the buffer stores)."""
    return np.asarray(obs, dtype=np.float32).reshape(-1)


# --------------------------------------------------------------------------------------------------
# The agent
# --------------------------------------------------------------------------------------------------


def episode_returns(env: gym.Env, act: Callable[[np.ndarray], np.ndarray], episodes: int,
                    first_seed: int) -> list[float]:
    """Returns of `act` on `episodes` episodes of `env`; episode i resets with seed `first_seed + i`."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=first_seed + i)
        total, done = 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(act(obs))
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def buffer_episodes(buffer: dict[str, torch.Tensor], step: int, up_to_step: int | None = None,
                    action_offset: int = 0) -> list[dict]:
    """A replay buffer recorded in env-step order (`obs`, `actions`, `rewards`, `next_obs`, `terminations`,
    `truncations`; `step` rows filled) as it was at `up_to_step` (default: `step`), cut into whole episodes.

    Each episode holds N+1 observations (the final one included); an episode still running at `up_to_step` is
    cut there and marked truncated. `action_offset` is added to the actions (a Discrete space's `start`).
    """
    t = step if up_to_step is None else int(up_to_step)
    if not 0 < t <= step:
        fail(f"stream_episodes: step {t} outside the recorded stream (1..{step})")
    data = {k: v[:t].cpu().numpy() for k, v in buffer.items()}
    terminations, truncations = data["terminations"] > 0.5, data["truncations"] > 0.5
    ends = list(np.flatnonzero(terminations | truncations) + 1)
    if not ends or ends[-1] != t:
        ends.append(t)
        truncations[t - 1] = True  # the cut episode
    episodes, start = [], 0
    for end in ends:
        episodes.append({
            "observations": np.concatenate([data["obs"][start:end], data["next_obs"][end - 1:end]]),
            "actions": data["actions"][start:end] + action_offset,
            "rewards": data["rewards"][start:end],
            "terminations": terminations[start:end],
            "truncations": truncations[start:end],
        })
        start = end
    return episodes


class SACAgent:
    """Online SAC with checkpoints, evaluation returns, the full episode stream and resumable state."""

    algorithm_name = "SAC"
    behavior_note = "actions sampled from the SAC actor's tanh-Gaussian (stochastic, as D4RL)"

    def __init__(self, config: Config):
        self.config = cfg = config
        if cfg.max_steps < 1 or cfg.checkpoint_every < 1 or cfg.eval_episodes < 1 or cfg.batch_size < 1:
            fail("max_steps, checkpoint_every, eval_episodes and batch_size must all be >= 1")
        torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.env = make_env(cfg.env, cfg.max_episode_steps)
        self.eval_env = make_env(cfg.env, cfg.max_episode_steps)
        self.obs_shape = self.env.observation_space.shape
        self.obs_dim = int(np.prod(self.obs_shape))
        self.act_shape = self.env.action_space.shape
        self.act_dim = int(np.prod(self.act_shape))
        self.low = self.env.action_space.low.reshape(-1).astype(np.float32)
        self.high = self.env.action_space.high.reshape(-1).astype(np.float32)

        torch.manual_seed(cfg.seed)  # network init only; all later sampling uses self.generator
        self.actor = self._new_actor()
        self.critic = TwinQ(self.obs_dim, self.act_dim, cfg.hidden).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=self.device, requires_grad=True)
        self.target_entropy = -float(self.act_dim)  # H_bar = -dim(A)
        self.actor_opt = make_adam(self.actor.parameters(), cfg.lr)
        self.critic_opt = make_adam(self.critic.parameters(), cfg.lr)
        self.alpha_opt = make_adam([self.log_alpha], cfg.lr)

        self.generator = torch.Generator(device=self.device)  # minibatch indices and policy noise
        self.generator.manual_seed(cfg.seed)
        self.warmup_rng = np.random.default_rng(cfg.seed)  # uniform warm-up actions

        # The replay buffer = the stream of collected transitions in order, on the training device.
        n, f32 = cfg.max_steps, dict(dtype=torch.float32, device=self.device)
        self.buffer = {
            "obs": torch.zeros(n, self.obs_dim, **f32),
            "actions": torch.zeros(n, self.act_dim, **f32),
            "rewards": torch.zeros(n, **f32),
            "next_obs": torch.zeros(n, self.obs_dim, **f32),
            "terminations": torch.zeros(n, **f32),
            "truncations": torch.zeros(n, **f32),
        }
        self.step = 0  # env steps taken = transitions in the buffer
        self.last_save = 0
        self.checkpoints: list[Checkpoint] = []
        self.train_returns: list[float] = []  # return of every finished training episode
        self.stats = {k: torch.zeros((), device=self.device) for k in ("critic_loss", "actor_loss", "alpha", "q")}
        self.stat_count = 0

    def _new_actor(self) -> Actor:
        return Actor(self.obs_dim, self.act_dim, self.config.hidden, self.low, self.high).to(self.device)

    # --- the update rule -------------------------------------------------------------------------
    def update(self) -> None:
        """One SAC gradient step on a uniform minibatch: critics, actor, temperature, targets."""
        cfg = self.config
        idx = torch.randint(0, self.step, (cfg.batch_size,), device=self.device, generator=self.generator)
        obs, actions, rewards = self.buffer["obs"][idx], self.buffer["actions"][idx], self.buffer["rewards"][idx]
        next_obs, terminations = self.buffer["next_obs"][idx], self.buffer["terminations"][idx]
        alpha = self.log_alpha.detach().exp()

        # y = r + gamma (1 - d) [ min_i Q'_i(s', a') - alpha log pi(a'|s') ],  a' ~ pi(.|s')
        # (d: termination only; a time-limit truncation bootstraps)
        with torch.no_grad():
            next_actions, next_log_prob = self.actor.sample(next_obs, self.generator)
            next_q = self.critic_target(next_obs, next_actions).min(dim=0).values
            target = rewards + cfg.gamma * (1 - terminations) * (next_q - alpha * next_log_prob)
        # L_Q = sum_i E [ (Q_i(s,a) - y)^2 ]
        q = self.critic(obs, actions)
        critic_loss = (q - target).pow(2).mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # L_pi = E_s E_{a~pi} [ alpha log pi(a|s) - min_i Q_i(s,a) ]   (critics frozen for this step)
        self.critic.requires_grad_(False)
        new_actions, log_prob = self.actor.sample(obs, self.generator)
        actor_loss = (alpha * log_prob - self.critic(obs, new_actions).min(dim=0).values).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        # L_alpha = E [ -log alpha * (log pi(a|s) + H_bar) ]   (automatic entropy tuning)
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        # theta' <- (1 - tau) theta' + tau theta
        with torch.no_grad():
            for target_param, param in zip(self.critic_target.parameters(), self.critic.parameters()):
                target_param.lerp_(param, cfg.tau)

        # running sums on the device; read (one sync) only when a progress message is made
        self.stats["critic_loss"] += critic_loss.detach()
        self.stats["actor_loss"] += actor_loss.detach()
        self.stats["alpha"] += alpha
        self.stats["q"] += q.detach().mean()
        self.stat_count += 1

    # --- acting and evaluating -------------------------------------------------------------------
    def make_policy(self, policy: dict, stochastic: bool, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
        """`act(obs) -> action` (the env's action shape) for a checkpoint's `policy` state_dict.

        `stochastic`: a ~ pi(.|s), the noise drawn from a NumPy generator seeded with `seed` (how datasets are
        rolled out); else the deterministic a = tanh(mu(s)) (how checkpoints are evaluated).
        """
        actor = NumpyActor(policy)
        rng = np.random.default_rng(seed) if stochastic else None
        return lambda obs: actor(flat_obs(obs), rng).reshape(self.act_shape)

    def evaluate(self, policy: dict, episodes: int, stochastic: bool = False, seed: int = 0) -> list[float]:
        """Returns of `make_policy(policy, stochastic, seed)` on evaluation episodes 0..episodes-1.

        Episode i resets the evaluation env with seed `config.seed + EVAL_SEED_OFFSET + i`, the same for every
        policy evaluated, so returns of different checkpoints are comparable.
        """
        return episode_returns(self.eval_env, self.make_policy(policy, stochastic, seed), episodes,
                               self.config.seed + EVAL_SEED_OFFSET)

    def export_expert(self, folder: str | Path) -> Path:
        """Write the final policy (the last checkpoint's actor) to `<folder>/expert_policy.pt`."""
        actor = copy.deepcopy(self.actor).cpu()  # a copy, not a new Actor: building one would draw from the RNG
        actor.load_state_dict(self.checkpoints[-1].policy)
        return write_expert(actor, folder, self.config.env, self.checkpoints[-1].step)

    def _checkpoint(self) -> Checkpoint:
        policy = {k: v.detach().cpu().clone() for k, v in self.actor.state_dict().items()}
        ckpt = Checkpoint(self.step, self.evaluate(policy, self.config.eval_episodes), policy)
        self.checkpoints.append(ckpt)
        return ckpt

    # --- the training loop -----------------------------------------------------------------------
    def train(self, progress: Callable[[int, str], None] | None = None) -> list[Checkpoint]:
        """Run (or resume) online training to `max_steps` env steps; return the checkpoints.

        `progress(step, message)` is called after every env step (keep it cheap); `message` holds the
        latest evaluation and training statistics.
        """
        cfg = self.config
        state_path = Path(cfg.checkpoint_dir) / STATE_FILE if cfg.checkpoint_dir else None
        if state_path is not None and cfg.resume and state_path.exists():
            self.load_state(state_path)
        if not self.checkpoints:
            self._checkpoint()  # step 0: the randomly initialised actor
        message = f"eval {self.checkpoints[-1].eval_return:.1f}"
        if self.step >= cfg.max_steps:
            if state_path is not None:
                self.export_expert(state_path.parent)
            return self.checkpoints

        if self.step == 0:
            obs, _ = self.env.reset(seed=cfg.seed)
        else:  # a resumed run: the env RNG was restored at an episode end
            obs, _ = self.env.reset()
        episode_return = 0.0
        while self.step < cfg.max_steps:
            if self.step < cfg.warmup_steps:
                action = self.warmup_rng.uniform(self.low, self.high).astype(np.float32)
            else:
                with torch.no_grad():
                    obs_t = torch.as_tensor(flat_obs(obs), device=self.device).unsqueeze(0)
                    action = self.actor.sample(obs_t, self.generator)[0][0].cpu().numpy()
            next_obs, reward, terminated, truncated, _ = self.env.step(action.reshape(self.act_shape))
            t = self.step
            self.buffer["obs"][t] = torch.from_numpy(flat_obs(obs))
            self.buffer["actions"][t] = torch.from_numpy(action)
            self.buffer["rewards"][t] = float(reward)
            self.buffer["next_obs"][t] = torch.from_numpy(flat_obs(next_obs))
            self.buffer["terminations"][t] = float(terminated)
            self.buffer["truncations"][t] = float(truncated)
            self.step += 1
            episode_return += float(reward)
            obs = next_obs

            if self.step >= cfg.warmup_steps:
                self.update()
            if self.step % cfg.log_every == 0 and self.stat_count:
                stats = {k: (v / self.stat_count).item() for k, v in self.stats.items()}
                recent = np.mean(self.train_returns[-10:]) if self.train_returns else float("nan")
                message = (f"eval {self.checkpoints[-1].eval_return:.1f} | train return {recent:.1f} "
                           f"q {stats['q']:.1f} alpha {stats['alpha']:.3f}")
                for v in self.stats.values():
                    v.zero_()
                self.stat_count = 0
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self._checkpoint()
                message = f"eval {self.checkpoints[-1].eval_return:.1f} at step {self.step}"
            if progress is not None:
                progress(self.step, message)
            if terminated or truncated:
                self.train_returns.append(episode_return)
                episode_return = 0.0
                if state_path is not None and self.step - self.last_save >= cfg.save_every:
                    self.save_state(state_path)  # before the reset: the env RNG is all its state
                obs, _ = self.env.reset()
        if state_path is not None:
            self.save_state(state_path)
            self.export_expert(state_path.parent)
        return self.checkpoints

    # --- the episode stream ----------------------------------------------------------------------
    def stream_episodes(self, up_to_step: int | None = None) -> list[dict]:
        """The replay buffer as it was at env step `up_to_step` (default: now), as whole episodes.

        Each episode is a dict: `observations` (N+1, obs_dim) float32 (the final observation included),
        `actions` (N, act_dim) float32, `rewards` (N,) float32, `terminations`, `truncations` (N,) bool.
        An episode still running at `up_to_step` is cut there and marked truncated: these are exactly the
        transitions the buffer held at that step.
        """
        return buffer_episodes(self.buffer, self.step, up_to_step)

    # --- resumable state -------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Write everything needed to resume to `path`, atomically (temporary file, then rename)."""
        t = self.step
        state = {
            "recipe": {k: getattr(self.config, k) for k in RECIPE_FIELDS},
            "step": t,
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach(),
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "generator": self.generator.get_state(),
            "warmup_rng": self.warmup_rng.bit_generator.state,
            "env_rng": self.env.unwrapped.np_random.bit_generator.state,
            "buffer": {k: v[:t].cpu() for k, v in self.buffer.items()},
            "checkpoints": [asdict(c) for c in self.checkpoints],
            "train_returns": list(self.train_returns),
        }
        save_checkpoint(path, state)  # atomic; a failed write (disk full) is one line and leaves the last state
        self.last_save = t

    def load_state(self, path: Path) -> None:
        """Restore a state written by `save_state`; `UserError` if it was made with another recipe."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as err:
            fail(f"cannot read the saved agent state {path}: {type(err).__name__}: {err}; delete it to start over")
        recipe = {k: getattr(self.config, k) for k in RECIPE_FIELDS}
        if state.get("recipe") != recipe:
            diff = {k: (state.get("recipe", {}).get(k), v) for k, v in recipe.items()
                    if state.get("recipe", {}).get(k) != v}
            fail(f"{path} was made with other settings (saved, now): {diff}; use another build folder, "
                 f"or start over (--fresh / delete it)")
        t = state["step"]
        self.step = self.last_save = t
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.generator.set_state(state["generator"])
        self.warmup_rng.bit_generator.state = state["warmup_rng"]
        self.env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        for k, v in state["buffer"].items():
            self.buffer[k][:t] = v.to(self.device)
        self.checkpoints = [Checkpoint(**c) for c in state["checkpoints"]]
        self.train_returns = list(state["train_returns"])


# --------------------------------------------------------------------------------------------------
# Standalone run: train and print the checkpoints
# --------------------------------------------------------------------------------------------------


def main(config: Config) -> None:
    agent = SACAgent(config)
    start, last_print = time.perf_counter(), [0.0]

    def progress(step: int, message: str) -> None:
        now = time.perf_counter()
        if now - last_print[0] >= 5.0 or step == config.max_steps:
            last_print[0] = now
            print(f"step {step}/{config.max_steps}  {step / max(now - start, 1e-9):.0f} steps/s  {message}",
                  file=sys.stderr, flush=True)

    checkpoints = agent.train(progress)
    print("step      eval return (deterministic policy)")
    for ckpt in checkpoints:
        print(f"{ckpt.step:<9d} {ckpt.eval_return:.1f}")


if __name__ == "__main__":
    import tyro

    try:
        if sys.argv[1:2] == ["--export-expert"]:  # python -m common.build.behavior_sac --export-expert BUILD
            if len(sys.argv) != 3:
                fail("usage: python -m common.build.behavior_sac --export-expert BUILD_FOLDER")
            print(f"wrote {export_expert(sys.argv[2])}")
        else:
            main(tyro.cli(Config))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
