"""Online Double DQN: the behaviour agent that generates D4RL-recipe datasets for discrete actions.

Lecture: "Offline Reinforcement Learning", the D4RL slide (random / medium = partially trained policy /
medium-replay / expert datasets), here with a value-based agent since SAC needs continuous actions.
Papers: Mnih et al., "Human-level control through deep reinforcement learning" (2015, target network,
epsilon-greedy); van Hasselt et al., "Deep Reinforcement Learning with Double Q-learning" (2016).

Usage (standalone; `python -m common.build cartpole` drives it the same way):
    python -m common.build.behavior_dqn --env CartPole-v1 --max-steps 25000 --checkpoint-every 1000

The contract is the SAC behaviour agent's (`common/build/behavior_sac.py`):
  * `checkpoints`: the Q-network every `checkpoint_every` env steps with the returns of its greedy policy
    argmax_a Q(s,a) on `eval_episodes` evaluation episodes (same env seeds at every checkpoint). Step 0 is
    the randomly initialised network (D4RL's "random"), the last one the final policy ("expert").
  * the replay buffer, never evicted, is the stream of every collected episode; `stream_episodes(step)`
    cuts it at env step `step` (D4RL's medium-replay).
  * `<checkpoint_dir>/agent_state.pt` at the first episode end after every `save_every` steps and at the
    end: network, target, optimiser, buffer, checkpoints, step counter and every random state, so that an
    interrupted run resumes bit for bit (same device and thread count).
  * `<checkpoint_dir>/expert_policy.pt` when training ends: the final greedy policy as a policy file
    (`common.experts.save_policy_file`), the expert `dagger.py` loads from a build folder; `final_policy(build)`
    gives the same Q-network as this module's `q_network`; `python -m common.build.behavior_dqn
    --export-expert BUILD` writes the file for a build made before.
Dataset rollouts act epsilon-greedily with `behavior_epsilon` (the discrete counterpart of sampling
from SAC's Gaussian).

Hyperparameters (one set for every env, chosen on CartPole-v1, where seeds 0, 1 and 2 all end at greedy
return 500 after 25k steps): 256-256 MLP, gamma 0.99, Adam lr 1e-3 annealed linearly to 0, batch 64, one gradient
step per env step after `warmup_steps` uniform random steps, Huber loss, gradient norm clipped at 10,
target network copied every 50 steps, epsilon decayed linearly from 1 to 0.04 over the first 20% of
training. Why: with the target copied only every 500 steps, 25k steps are just 50 rounds of value
iteration and Q (about 100 at gamma 0.99) stays far from converged, so returns stall near 150; without the
learning-rate decay the greedy policy keeps swinging between 100 and 500, and the final ("expert") policy
is a matter of luck.
"""

from __future__ import annotations

import copy
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

from common.build.behavior_sac import (Checkpoint, agent_state, agent_state_file, buffer_episodes,  # shared with SAC
                                       episode_returns, flat_obs, make_adam)
from common.checkpoint import save_checkpoint
from common.errors import UserError, fail
from common.experts import POLICY_FILE, save_policy_file

# Evaluation episode i of every checkpoint resets the evaluation env with seed `seed + EVAL_SEED_OFFSET + i`.
EVAL_SEED_OFFSET = 1_000_000
STATE_FILE = "agent_state.pt"


@dataclass
class Config:
    env: str = "CartPole-v1"
    """Gymnasium env id with a Discrete action space."""
    max_episode_steps: int | None = None
    """Time limit of the env's episodes; None keeps the env's registered one."""
    seed: int = 0
    """Seeds network init, the training env, exploration and minibatch sampling."""
    device: str = "cpu"
    """torch device for networks and the replay buffer."""
    threads: int = 1
    """torch CPU threads. Bit-identical reruns need the same device and thread count."""
    max_steps: int = 25_000
    """Env steps of online training (also the replay buffer's capacity: nothing is evicted)."""
    batch_size: int = 64
    """Transitions per gradient step."""
    eval_episodes: int = 5
    """Episodes of the greedy policy at every checkpoint."""
    log_every: int = 1000
    """Env steps between training statistics in the progress message."""
    checkpoint_every: int = 1000
    """K: keep the Q-network and its evaluation return every K env steps (also at step 0 and at the end)."""
    checkpoint_dir: str | None = None
    """Folder for the resumable state (agent_state.pt); None keeps nothing on disk."""
    resume: bool = True
    """Continue from checkpoint_dir/agent_state.pt when it exists."""
    save_every: int = 10_000
    """Write agent_state.pt at the first episode end after every this many env steps."""
    hidden: int = 256
    """Width of both hidden layers of the Q-network."""
    gamma: float = 0.99
    """Discount gamma."""
    lr: float = 1e-3
    """Adam learning rate."""
    warmup_steps: int = 1000
    """Env steps of uniform random actions before the first gradient step."""
    target_update_every: int = 50
    """C: copy the online network into the target network every C env steps."""
    epsilon_start: float = 1.0
    """Exploration epsilon at the first learning step."""
    epsilon_end: float = 0.04
    """Exploration epsilon after the decay."""
    epsilon_fraction: float = 0.2
    """Fraction of max_steps over which epsilon decays linearly from epsilon_start to epsilon_end."""
    max_grad_norm: float = 10.0
    """Gradient norm clip."""
    lr_decay: bool = True
    """Anneal the learning rate linearly to 0 at max_steps: steadies the final ("expert") policy, which
    plain DQN keeps oscillating on CartPole."""
    behavior_epsilon: float = 0.05
    """epsilon of the epsilon-greedy behaviour policy in dataset rollouts."""


# Fields that change what the agent computes: a saved state made with other values cannot be resumed.
RECIPE_FIELDS = ("env", "max_episode_steps", "seed", "max_steps", "batch_size", "eval_episodes",
                 "checkpoint_every", "hidden",
                 "gamma", "lr", "warmup_steps", "target_update_every", "epsilon_start", "epsilon_end",
                 "epsilon_fraction", "max_grad_norm", "lr_decay")


def q_network(obs_dim: int, n_actions: int, hidden: int) -> nn.Sequential:
    """Q(s, .): an MLP from observations to one value per action, shape (B, n_actions)."""
    return nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_actions))


def final_policy(build: str | Path) -> nn.Sequential:
    """The final Q-network of a Double DQN build folder (its last checkpoint: the policy behind the "expert"
    quality), on the CPU; the greedy env action is `q(obs).argmax(-1) + start`, start = the action space's."""
    state = agent_state(build)
    if "q" not in state:
        fail(f"{build}: its agent is not Double DQN (for a SAC build use common.build.behavior_sac)")
    policy = state["checkpoints"][-1]["policy"]
    with torch.random.fork_rng(devices=[]):  # the layers' initial weights, overwritten below: leave the RNG as it was
        q = q_network(policy["0.weight"].shape[1], policy["4.weight"].shape[0], state["recipe"]["hidden"])
    q.load_state_dict(policy)
    return q


def write_expert(q: nn.Sequential, folder: str | Path, env_id: str, step: int, start: int) -> Path:
    """Write the greedy policy argmax_a Q(s, a) + start of `q` to `<folder>/expert_policy.pt`."""
    return save_policy_file(Path(folder) / POLICY_FILE, [q[0], q[2], q[4]], "argmax",
                            {"env": env_id, "agent": "DoubleDQN", "step": step}, start=start)


def export_expert(build: str | Path) -> Path:
    """Write a Double DQN build folder's final greedy policy beside its agent state
    (`<build>/agent/expert_policy.pt`), for builds made before builds wrote it; returns the file."""
    state = agent_state(build)
    env = make_env(state["recipe"]["env"], state["recipe"]["max_episode_steps"])
    start = int(env.action_space.start)
    env.close()
    return write_expert(final_policy(build), agent_state_file(build).parent, state["recipe"]["env"],
                        state["checkpoints"][-1]["step"], start)


class NumpyQ:
    """`q_network`'s forward pass in NumPy, for acting on one observation at a time (rollouts, evaluation):
    at batch size 1 torch's per-operator overhead costs about ten times the arithmetic."""

    def __init__(self, policy: dict):
        p = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in policy.items()}
        self.layers = [(p["0.weight"], p["0.bias"]), (p["2.weight"], p["2.bias"]), (p["4.weight"], p["4.bias"])]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Q(s, .) for one flat observation, shape (n_actions,)."""
        h = obs
        for i, (w, b) in enumerate(self.layers):
            h = w @ h + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h


def make_env(env_id: str, max_episode_steps: int | None = None) -> gym.Env:
    """`gym.make(env_id)` for a Box-observation, Discrete-action env with a time limit, else `UserError`."""
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as err:
        fail(f"cannot create env '{env_id}': {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    if not isinstance(env.observation_space, gym.spaces.Box):
        fail(f"env '{env_id}' has observation space {env.observation_space}; the DQN behaviour agent needs a Box")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        fail(f"env '{env_id}' has action space {env.action_space}; DQN needs Discrete (common.build.behavior_sac: Box)")
    if env.spec is None or env.spec.max_episode_steps is None:
        fail(f"env '{env_id}' has no time limit; give one (--max-episode-steps) so episodes end")
    return env


class DQNAgent:
    """Online Double DQN with checkpoints, evaluation returns, the full episode stream and resumable state."""

    algorithm_name = "DoubleDQN"

    def __init__(self, config: Config):
        self.config = cfg = config
        if cfg.max_steps < 1 or cfg.checkpoint_every < 1 or cfg.eval_episodes < 1 or cfg.batch_size < 1:
            fail("max_steps, checkpoint_every, eval_episodes and batch_size must all be >= 1")
        if not 0.0 <= cfg.behavior_epsilon <= 1.0:
            fail(f"behavior_epsilon must be in [0, 1], got {cfg.behavior_epsilon}")
        torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.env = make_env(cfg.env, cfg.max_episode_steps)
        self.eval_env = make_env(cfg.env, cfg.max_episode_steps)
        self.obs_shape = self.env.observation_space.shape
        self.obs_dim = int(np.prod(self.obs_shape))
        self.n_actions = int(self.env.action_space.n)
        self.action_start = int(self.env.action_space.start)  # env action = network index + start

        torch.manual_seed(cfg.seed)  # network init only
        self.q = q_network(self.obs_dim, self.n_actions, cfg.hidden).to(self.device)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.optimizer = make_adam(self.q.parameters(), cfg.lr)
        self.generator = torch.Generator(device=self.device)  # minibatch indices
        self.generator.manual_seed(cfg.seed)
        self.explore_rng = np.random.default_rng(cfg.seed)  # epsilon coin flips and random actions

        n, f32 = cfg.max_steps, dict(dtype=torch.float32, device=self.device)
        self.buffer = {
            "obs": torch.zeros(n, self.obs_dim, **f32),
            "actions": torch.zeros(n, dtype=torch.int64, device=self.device),  # network index 0..n-1
            "rewards": torch.zeros(n, **f32),
            "next_obs": torch.zeros(n, self.obs_dim, **f32),
            "terminations": torch.zeros(n, **f32),
            "truncations": torch.zeros(n, **f32),
        }
        self.step = 0
        self.last_save = 0
        self.checkpoints: list[Checkpoint] = []
        self.train_returns: list[float] = []
        self.stats = {k: torch.zeros((), device=self.device) for k in ("loss", "q")}
        self.stat_count = 0

    @property
    def behavior_note(self) -> str:
        return (f"epsilon-greedy actions of the Q-network's greedy policy, epsilon "
                f"{self.config.behavior_epsilon}")

    def epsilon(self) -> float:
        """Linear decay from epsilon_start (at warmup_steps) to epsilon_end over epsilon_fraction * max_steps."""
        cfg = self.config
        decay_steps = max(1.0, cfg.epsilon_fraction * cfg.max_steps)
        progress = min(1.0, max(0, self.step - cfg.warmup_steps) / decay_steps)
        return cfg.epsilon_start + progress * (cfg.epsilon_end - cfg.epsilon_start)

    # --- the update rule -------------------------------------------------------------------------
    def update(self) -> None:
        """One Double DQN gradient step on a uniform minibatch."""
        cfg = self.config
        idx = torch.randint(0, self.step, (cfg.batch_size,), device=self.device, generator=self.generator)
        obs, actions, rewards = self.buffer["obs"][idx], self.buffer["actions"][idx], self.buffer["rewards"][idx]
        next_obs, terminations = self.buffer["next_obs"][idx], self.buffer["terminations"][idx]
        # y = r + gamma (1 - d) Q'(s', argmax_a' Q(s', a'))   (Double DQN; d: termination only)
        with torch.no_grad():
            next_action = self.q(next_obs).argmax(dim=1, keepdim=True)
            next_q = self.q_target(next_obs).gather(1, next_action).squeeze(1)
            target = rewards + cfg.gamma * (1 - terminations) * next_q
        # L = E [ huber(Q(s,a) - y) ]
        q = self.q(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, target)
        if cfg.lr_decay:
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * (1 - self.step / cfg.max_steps)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.q.parameters(), cfg.max_grad_norm, foreach=True)
        self.optimizer.step()
        self.stats["loss"] += loss.detach()
        self.stats["q"] += q.detach().mean()
        self.stat_count += 1

    # --- acting and evaluating -------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, obs) -> int:
        """argmax_a Q(s, a) of the online network, as a network index (the training loop's action)."""
        return int(self.q(torch.as_tensor(flat_obs(obs), device=self.device).unsqueeze(0)).argmax(dim=1)[0])

    def make_policy(self, policy: dict, stochastic: bool, seed: int = 0) -> Callable[[np.ndarray], int]:
        """`act(obs) -> env action` for a checkpoint's `policy` state_dict.

        `stochastic`: epsilon-greedy with `behavior_epsilon`, coin flips and random actions from a NumPy
        generator seeded with `seed` (how datasets are rolled out); else greedy (how checkpoints are evaluated).
        """
        q = NumpyQ(policy)
        rng = np.random.default_rng(seed)
        epsilon = self.config.behavior_epsilon if stochastic else 0.0

        def act(obs: np.ndarray) -> int:
            if stochastic and rng.random() < epsilon:
                return int(rng.integers(self.n_actions)) + self.action_start
            return int(np.argmax(q(flat_obs(obs)))) + self.action_start

        return act

    def evaluate(self, policy: dict, episodes: int, stochastic: bool = False, seed: int = 0) -> list[float]:
        """Returns of `make_policy(policy, stochastic, seed)` on evaluation episodes 0..episodes-1
        (episode i resets with seed `config.seed + EVAL_SEED_OFFSET + i`, the same for every policy)."""
        return episode_returns(self.eval_env, self.make_policy(policy, stochastic, seed), episodes,
                               self.config.seed + EVAL_SEED_OFFSET)

    def export_expert(self, folder: str | Path) -> Path:
        """Write the final greedy policy (the last checkpoint's Q-network) to `<folder>/expert_policy.pt`."""
        q = copy.deepcopy(self.q).cpu()  # a copy, not a new network: building one would draw from the RNG
        q.load_state_dict(self.checkpoints[-1].policy)
        return write_expert(q, folder, self.config.env, self.checkpoints[-1].step, self.action_start)

    def _checkpoint(self) -> Checkpoint:
        policy = {k: v.detach().cpu().clone() for k, v in self.q.state_dict().items()}
        ckpt = Checkpoint(self.step, self.evaluate(policy, self.config.eval_episodes), policy)
        self.checkpoints.append(ckpt)
        return ckpt

    # --- the training loop -----------------------------------------------------------------------
    def train(self, progress: Callable[[int, str], None] | None = None) -> list[Checkpoint]:
        """Run (or resume) online training to `max_steps` env steps; return the checkpoints.

        `progress(step, message)` is called after every env step (keep it cheap).
        """
        cfg = self.config
        state_path = Path(cfg.checkpoint_dir) / STATE_FILE if cfg.checkpoint_dir else None
        if state_path is not None and cfg.resume and state_path.exists():
            self.load_state(state_path)
        if not self.checkpoints:
            self._checkpoint()  # step 0: the randomly initialised Q-network
        message = f"eval {self.checkpoints[-1].eval_return:.1f}"
        if self.step >= cfg.max_steps:
            if state_path is not None:
                self.export_expert(state_path.parent)
            return self.checkpoints

        obs, _ = self.env.reset(seed=cfg.seed) if self.step == 0 else self.env.reset()
        episode_return = 0.0
        while self.step < cfg.max_steps:
            explore = self.step < cfg.warmup_steps or self.explore_rng.random() < self.epsilon()
            action = int(self.explore_rng.integers(self.n_actions)) if explore else self.greedy(obs)
            next_obs, reward, terminated, truncated, _ = self.env.step(action + self.action_start)
            t = self.step
            self.buffer["obs"][t] = torch.from_numpy(flat_obs(obs))
            self.buffer["actions"][t] = action
            self.buffer["rewards"][t] = float(reward)
            self.buffer["next_obs"][t] = torch.from_numpy(flat_obs(next_obs))
            self.buffer["terminations"][t] = float(terminated)
            self.buffer["truncations"][t] = float(truncated)
            self.step += 1
            episode_return += float(reward)
            obs = next_obs

            if self.step >= cfg.warmup_steps:
                self.update()
            if self.step % cfg.target_update_every == 0:
                self.q_target.load_state_dict(self.q.state_dict())  # theta' <- theta
            if self.step % cfg.log_every == 0 and self.stat_count:
                stats = {k: (v / self.stat_count).item() for k, v in self.stats.items()}
                recent = np.mean(self.train_returns[-10:]) if self.train_returns else float("nan")
                message = (f"eval {self.checkpoints[-1].eval_return:.1f} | train return {recent:.1f} "
                           f"q {stats['q']:.1f} epsilon {self.epsilon():.2f}")
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

        Each episode is a dict: `observations` (N+1, obs_dim) float32, `actions` (N,) int64 env actions,
        `rewards` (N,) float32, `terminations`, `truncations` (N,) bool. An episode still running at
        `up_to_step` is cut there and marked truncated.
        """
        return buffer_episodes(self.buffer, self.step, up_to_step, self.action_start)

    # --- resumable state -------------------------------------------------------------------------
    def save_state(self, path: Path) -> None:
        """Write everything needed to resume to `path`, atomically (temporary file, then rename)."""
        t = self.step
        state = {
            "recipe": {k: getattr(self.config, k) for k in RECIPE_FIELDS},
            "step": t,
            "q": self.q.state_dict(), "q_target": self.q_target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "explore_rng": self.explore_rng.bit_generator.state,
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
        self.q.load_state_dict(state["q"])
        self.q_target.load_state_dict(state["q_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.explore_rng.bit_generator.state = state["explore_rng"]
        self.env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        for k, v in state["buffer"].items():
            self.buffer[k][:t] = v.to(self.device)
        self.checkpoints = [Checkpoint(**c) for c in state["checkpoints"]]
        self.train_returns = list(state["train_returns"])


def main(config: Config) -> None:
    agent = DQNAgent(config)
    start, last_print = time.perf_counter(), [0.0]

    def progress(step: int, message: str) -> None:
        now = time.perf_counter()
        if now - last_print[0] >= 5.0 or step == config.max_steps:
            last_print[0] = now
            print(f"step {step}/{config.max_steps}  {message}", file=sys.stderr, flush=True)

    checkpoints = agent.train(progress)
    print(f"done in {time.perf_counter() - start:.0f} s")
    print("step      eval return (greedy policy)")
    for ckpt in checkpoints:
        print(f"{ckpt.step:<9d} {ckpt.eval_return:.1f}")


if __name__ == "__main__":
    import tyro

    try:
        if sys.argv[1:2] == ["--export-expert"]:  # python -m common.build.behavior_dqn --export-expert BUILD
            if len(sys.argv) != 3:
                fail("usage: python -m common.build.behavior_dqn --export-expert BUILD_FOLDER")
            print(f"wrote {export_expert(sys.argv[2])}")
        else:
            main(tyro.cli(Config))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
