"""Online fine-tuning: after the offline phase, the current policy acts in the dataset's env and learns on.

An algorithm file that supports it (its Agent has `explore`) runs the online phase with `--online-steps N`
after its `max_steps` offline updates, or from a finished run with `--resume RUN --online-steps N`:

    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_transform=...)
    start = run.resume(agent, phase)                    # the phase's state holds the offline sampler's too
    for step in run.steps(start):                       # 1 .. max_steps + online_steps
        if phase.online(step):                          # the online phase: the policy acts once in the env
            episode = phase.interact()                  # an ended episode's statistics, else {}
            if episode:
                run.log(step, episode)
        logs = agent.update(phase.sample(config.batch_size))

Each online step is one env step and one update (an update-to-data ratio of 1, as CORL and the Cal-QL authors).
- Acting: `agent.explore(obs)`, the algorithm's own exploration (a sample of its stochastic policy, or its
  deterministic action plus noise), on observations normalised with the offline statistics, clipped to the
  action box. At the first online step the phase calls `agent.start_online()` if the Agent has one: the
  per-algorithm switch (CQL's online alpha, SPOT's optimiser reset, Cal-QL's calibration...), whose effect the
  agent keeps in its own state so that a resumed run does not switch twice.
- Storing: every transition goes to an online buffer on the device exactly as stepped: observations
  normalised as the offline data, the reward transformed as the offline data (`reward_transform`),
  `terminals` 1 only on a termination, never on a time-limit truncation (which bootstraps), `timeouts` 1 on a
  truncation. Optional columns: `returns_to_go` (the Monte-Carlo return of the rest of the episode, filled when
  the episode ends; -inf until then, so a lower bound max(Q, G) does not act on an unfinished episode) and
  `next_actions` (the action taken at the next step; for an episode's last step its own action).
- Mixing: `config.online_mix` is the fraction of each batch drawn from the offline data (Cal-QL, ReBRAC: 0.5);
  None draws uniformly from the union of offline and online rows (one growing buffer: AWAC, IQL, CQL, SPOT).
- Logging: per online episode `online/episode_return`, `online/normalized_episode_return`,
  `online/episode_length`, and `online/regret`: the mean over the online episodes so far of 1 - success where
  the env reports success (`is_success`, `success`, `goal_achieved` in info), else of 1 - normalised return / 100
  (dense rewards; none without reference scores). `online/env_steps` counts env steps.
- Resume: the checkpoint holds the buffer's rows, the counters, the sampling generators, and the current
  episode as its reset seed and its actions so far; resuming resets the env with that seed and replays the
  actions, so a deterministic env (MuJoCo, Pendulum) continues exactly where it was.
"""

from __future__ import annotations

from typing import Any, Callable

import gymnasium as gym
import numpy as np
import torch

from common.datasets import ObsNormalizer, OfflineDataset, TensorSampler, flatten_observation
from common.errors import fail

ONLINE_SEED_OFFSET = 2_000_000  # online episode i is reset with seed + ONLINE_SEED_OFFSET + i (never an eval seed)
BUFFER_KEYS = ("obs", "actions", "rewards", "next_obs", "terminals", "timeouts", "returns_to_go", "next_actions")
SUCCESS_KEYS = ("is_success", "success", "goal_achieved")


class OnlinePhase:
    """The sampler of a run with an online phase, and the env it acts in (see the module docstring).

    `offline`: the run's TensorSampler of offline data; its keys are the keys every batch has (the online buffer
    fills the same ones, from `BUFFER_KEYS`). `config`: the algorithm's Config (`max_steps`, `online_steps`,
    `seed`, and optionally `online_mix`). With `online_steps` 0 the phase is the offline sampler itself.
    Online rewards become `r * scale + shift` with (scale, shift) = `reward_affine`, else the dataset's
    `reward_affine(reward_transform)`. `returns_to_go(rewards, terminals) -> G` computes an ended episode's
    returns-to-go from its (transformed) rewards and terminal flags (numpy, one row per step; Cal-QL's sparse
    rule), else the discounted sum with `returns_to_go_gamma`.
    """

    def __init__(self, agent: Any, dataset: OfflineDataset, offline: TensorSampler, normalizer: ObsNormalizer | None,
                 config: Any, device: torch.device, reward_transform: str = "none",
                 returns_to_go_gamma: float | None = None, reward_affine: tuple[float, float] | None = None,
                 returns_to_go: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        self.agent, self.dataset, self.offline, self.normalizer = agent, dataset, offline, normalizer
        self.device, self.seed = torch.device(device), int(config.seed)
        self.offline_steps, self.online_steps = int(config.max_steps), int(getattr(config, "online_steps", 0) or 0)
        self.mix = getattr(config, "online_mix", None)
        self.scale, self.shift = reward_affine or dataset.reward_affine(reward_transform)
        self.gamma, self.returns_to_go = returns_to_go_gamma, returns_to_go
        self.keys = list(offline.keys)
        missing = [k for k in self.keys if k not in BUFFER_KEYS]
        if self.online_steps and missing:
            fail(f"the online phase cannot fill {missing} for online transitions (it fills {', '.join(BUFFER_KEYS)})")
        if self.online_steps and "returns_to_go" in self.keys and returns_to_go_gamma is None and returns_to_go is None:
            fail("the online phase needs returns_to_go_gamma (or returns_to_go) to fill returns_to_go")
        if self.online_steps:
            dataset.make_env().close()  # an env that cannot be made is one line now, before anything is written
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(self.seed + ONLINE_SEED_OFFSET)
        self.rows: dict[str, torch.Tensor] | None = None
        self.size = 0  # online rows stored (= online env steps)
        self.episode = 0  # the running episode's index
        self.episode_actions: list[np.ndarray] = []  # the running episode's actions: replayed on resume
        self.episode_return = 0.0
        self.finished: list[dict] = []  # per finished online episode: return, normalised return, length, success
        self.env: gym.Env | None = None
        self.obs: np.ndarray | None = None

    # --- when ------------------------------------------------------------------------------------------------
    def online(self, step: int) -> bool:
        """Whether update `step` (1-based) belongs to the online phase."""
        return step > self.offline_steps

    # --- sampling --------------------------------------------------------------------------------------------
    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A minibatch: offline rows only until the online phase has rows, then mixed by `online_mix`."""
        if self.size == 0:
            return self.offline.sample(batch_size)
        if self.mix is not None:
            n_offline = int(round(batch_size * self.mix))
            offline = self.offline.sample(n_offline) if n_offline else None
            online = self._online_rows(torch.randint(0, self.size, (batch_size - n_offline,), device=self.device,
                                                     generator=self.generator))
            if offline is None:
                return online
            return {k: torch.cat([offline[k], online[k]]) for k in self.keys}
        # one buffer: uniform over the union of the offline rows and the online rows stored so far
        idx = torch.randint(0, self.offline.size + self.size, (batch_size,), device=self.device,
                            generator=self.generator)
        from_offline = idx < self.offline.size
        offline = self.offline.rows(idx.clamp(max=self.offline.size - 1))
        online = self._online_rows((idx - self.offline.size).clamp(min=0))
        out = {}
        for key in self.keys:
            mask = from_offline.view(-1, *([1] * (offline[key].dim() - 1)))
            out[key] = torch.where(mask, offline[key], online[key])
        return out

    def _online_rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: self.rows[k].index_select(0, idx) for k in self.keys}

    # --- acting ----------------------------------------------------------------------------------------------
    def interact(self) -> dict[str, float]:
        """One env step of `agent.explore`, stored in the online buffer. Returns the episode's statistics when
        this step ended it (with the env step count), else nothing."""
        if self.env is None:
            self._start()
        action = self._act(self.obs)
        next_obs, reward, terminated, truncated, info = self.env.step(self._env_action(action))
        flat_next = flatten_observation(next_obs, self.dataset.observation_space)
        self._store(self.obs, action, float(reward), flat_next, bool(terminated), bool(truncated))
        self.episode_actions.append(action)
        self.episode_return += float(reward)
        if terminated or truncated:
            logs = {"online/env_steps": float(self.size), **self._end_episode(info)}
            self._reset()
            return logs
        self.obs = flat_next
        return {}

    def _start(self) -> None:
        """The first online step (or the first after a resume): the agent's switch, the buffer, the env."""
        if self.size == 0 and hasattr(self.agent, "start_online"):
            self.agent.start_online()
        if self.rows is None:
            self._allocate()
        self.env = self.dataset.make_env()
        self._reset(replay=self.episode_actions)

    def _allocate(self) -> None:
        # shapes and dtypes from the first offline row (not a sample: a resumed run's generator must not move)
        sample = self.offline.rows(torch.zeros(1, dtype=torch.long, device=self.device))
        self.rows = {k: torch.zeros((self.online_steps, *sample[k].shape[1:]), dtype=sample[k].dtype,
                                    device=self.device) for k in self.keys}

    def _reset(self, replay: list[np.ndarray] | None = None) -> None:
        """Start (or, replaying its actions, restore) the running episode: reset with its own seed."""
        obs, _ = self.env.reset(seed=self.seed + ONLINE_SEED_OFFSET + self.episode)
        self.obs = flatten_observation(obs, self.dataset.observation_space)
        for action in replay or []:
            obs, *_ = self.env.step(self._env_action(action))
            self.obs = flatten_observation(obs, self.dataset.observation_space)
        if not replay:
            self.episode_actions, self.episode_return = [], 0.0

    @torch.no_grad()
    def _act(self, obs: np.ndarray) -> np.ndarray:
        x = self.normalizer(obs[None]) if self.normalizer is not None else obs[None].astype(np.float32)
        action = self.agent.explore(torch.as_tensor(x, device=self.device))[0].cpu().numpy()
        space = self.dataset.action_space
        if isinstance(space, gym.spaces.Box):
            action = np.clip(action, space.low.reshape(-1), space.high.reshape(-1)).astype(np.float32)
        return action

    def _env_action(self, action: np.ndarray):
        space = self.dataset.action_space
        if isinstance(space, gym.spaces.Box):
            return action.reshape(space.shape)
        return int(np.asarray(action).reshape(-1)[0]) + int(space.start)

    def _store(self, obs: np.ndarray, action: np.ndarray, reward: float, next_obs: np.ndarray, terminated: bool,
               truncated: bool) -> None:
        if self.size >= self.online_steps:
            fail(f"the online buffer is full ({self.online_steps} rows): more env steps than --online-steps")
        norm = self.normalizer or (lambda x: x.astype(np.float32))
        values = {"obs": norm(obs[None])[0], "next_obs": norm(next_obs[None])[0], "actions": action,
                  "rewards": reward * self.scale + self.shift, "terminals": float(terminated),
                  "timeouts": float(truncated and not terminated), "returns_to_go": -np.inf, "next_actions": action}
        i = self.size
        for key in self.keys:
            self.rows[key][i] = torch.as_tensor(np.asarray(values[key]), dtype=self.rows[key].dtype)
        if "next_actions" in self.keys and len(self.episode_actions) > 0:
            self.rows["next_actions"][i - 1] = self.rows["actions"][i]  # the previous step's next action
        self.size += 1

    def _end_episode(self, info: dict) -> dict[str, float]:
        length = len(self.episode_actions)
        if "returns_to_go" in self.keys:
            # G_t = r_t + gamma (1 - d_t) G_{t+1}, from the episode's (transformed) rewards, truncation not
            # bootstrapped: the Monte-Carlo value of the rest of this episode
            rows = slice(self.size - length, self.size)
            rewards = self.rows["rewards"][rows].double().cpu().numpy()
            terminals = self.rows["terminals"][rows].double().cpu().numpy()
            if self.returns_to_go is not None:
                returns = np.asarray(self.returns_to_go(rewards, terminals), dtype=np.float64)
            else:
                returns, running = np.zeros(length), 0.0
                for t in range(length - 1, -1, -1):
                    running = rewards[t] + self.gamma * (1.0 - terminals[t]) * running
                    returns[t] = running
            self.rows["returns_to_go"][rows] = torch.as_tensor(returns, dtype=self.rows["returns_to_go"].dtype)
        normalized = self.dataset.normalized_score(np.array([self.episode_return]))
        success = next((bool(info[k]) for k in SUCCESS_KEYS if k in info), None)
        self.finished.append({"return": self.episode_return, "length": length,
                              "normalized": None if normalized is None else float(normalized[0]),
                              "success": success})
        self.episode += 1
        logs = {"online/episode_return": self.episode_return, "online/episode_length": float(length)}
        if normalized is not None:
            logs["online/normalized_episode_return"] = float(normalized[0])
        regret = self.regret()
        if regret is not None:
            logs["online/regret"] = regret
        return logs

    def regret(self) -> float | None:
        """Mean over finished online episodes of 1 - success (goal envs) or 1 - normalised return / 100."""
        if not self.finished:
            return None
        if all(e["success"] is not None for e in self.finished):
            return float(np.mean([1.0 - e["success"] for e in self.finished]))
        if all(e["normalized"] is not None for e in self.finished):
            return float(np.mean([1.0 - e["normalized"] / 100.0 for e in self.finished]))
        return None

    def summary(self) -> dict:
        """What the run's summary.json says of the online phase."""
        if not self.online_steps:
            return {}
        return {"online_steps": self.online_steps, "online_env_steps": self.size,
                "online_episodes": len(self.finished), "online_regret": self.regret()}

    # --- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The offline sampler's state, and (online) the buffer's rows, counters, generator and running episode."""
        state = {"offline": self.offline.state_dict()}
        if self.online_steps:
            state.update(generator=self.generator.get_state(), size=self.size, episode=self.episode,
                         episode_return=self.episode_return, finished=[dict(e) for e in self.finished],
                         episode_actions=torch.as_tensor(np.asarray(self.episode_actions, dtype=np.float32)),
                         rows=None if self.rows is None else {k: v[:self.size].clone() for k, v in self.rows.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        if "offline" not in state:  # a checkpoint of a run made before online phases: the sampler's own state
            self.offline.load_state_dict(state)
            return
        self.offline.load_state_dict(state["offline"])
        if not self.online_steps or state.get("rows") is None:
            return
        self.generator.set_state(state["generator"])
        self.size, self.episode = int(state["size"]), int(state["episode"])
        self.episode_return, self.finished = float(state["episode_return"]), [dict(e) for e in state["finished"]]
        self.episode_actions = list(state["episode_actions"].cpu().numpy())
        if self.size > self.online_steps:
            fail(f"the checkpoint's online phase has {self.size} env steps, more than --online-steps "
                 f"{self.online_steps}")
        self._allocate()
        for key in self.keys:
            self.rows[key][:self.size] = state["rows"][key].to(self.device)
