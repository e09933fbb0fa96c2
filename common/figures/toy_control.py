"""Pendulum-v1 in vectorised numpy, a scripted expert, offline datasets and exact-enough true returns.

`VectorPendulum` steps thousands of Pendulum-v1 copies at once with gymnasium's equations (a test checks
it against `gymnasium.make("Pendulum-v1")` step by step), so that the true discounted return of a learned
policy is a Monte Carlo average over hundreds of episodes in well under a second. The figures on naive
off-policy divergence and CQL's lower bound train this library's algorithm files on datasets made here.
"""

from __future__ import annotations

import numpy as np

from common.envs.pendulum import pendulum_expert  # noqa: F401  (the scripted swing-up the figures use)

MAX_SPEED, MAX_TORQUE, DT, G, M, L = 8.0, 2.0, 0.05, 10.0, 1.0, 1.0  # gymnasium's Pendulum-v1 constants
EPISODE_STEPS = 200  # Pendulum-v1's time limit


def angle_normalize(x: np.ndarray) -> np.ndarray:
    return ((x + np.pi) % (2 * np.pi)) - np.pi


class VectorPendulum:
    """`n` Pendulum-v1 environments stepped together; state (theta, theta_dot), observation
    (cos theta, sin theta, theta_dot), reward -(theta^2 + 0.1 theta_dot^2 + 0.001 u^2)."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.state = np.zeros((n, 2))

    def reset(self, state: np.ndarray | None = None) -> np.ndarray:
        """Start states uniform in theta in [-pi, pi], theta_dot in [-1, 1] (as gymnasium), or `state`."""
        self.state = (self.rng.uniform([-np.pi, -1.0], [np.pi, 1.0], size=(self.n, 2)) if state is None
                      else np.array(state, dtype=np.float64))
        return self.obs()

    def obs(self) -> np.ndarray:
        th, thdot = self.state[:, 0], self.state[:, 1]
        return np.stack([np.cos(th), np.sin(th), thdot], 1).astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply torques `action` (n,) or (n, 1); return (next observation, reward)."""
        th, thdot = self.state[:, 0], self.state[:, 1]
        # float32 torques as gymnasium computes them (its float32 u keeps u^2 and 3 u / (m l^2) in float32)
        u = np.clip(np.asarray(action, dtype=np.float32).reshape(self.n), -MAX_TORQUE, MAX_TORQUE)
        cost = angle_normalize(th) ** 2 + 0.1 * thdot ** 2 + 0.001 * u ** 2
        newthdot = np.clip(thdot + (3 * G / (2 * L) * np.sin(th) + 3.0 / (M * L ** 2) * u) * DT, -MAX_SPEED, MAX_SPEED)
        newth = th + newthdot * DT
        self.state = np.stack([newth, newthdot], 1)
        return self.obs(), -cost


def rollout_dataset(transitions: int, noise: float, seed: int, random_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """About `transitions` transitions of whole 200-step episodes: the scripted expert with Gaussian action
    noise `noise`, and a `random_fraction` of the episodes with uniformly random torques instead.
    Returns flat arrays obs, actions, rewards, next_obs, terminals (all zero: Pendulum never terminates)."""
    episodes = max(1, int(round(transitions / EPISODE_STEPS)))
    env = VectorPendulum(episodes, seed)
    rng = np.random.default_rng(seed + 1)
    random_episode = np.arange(episodes) < int(round(random_fraction * episodes))
    obs = env.reset()
    out = {k: [] for k in ("obs", "actions", "rewards", "next_obs")}
    for _ in range(EPISODE_STEPS):
        action = pendulum_expert(obs) + noise * rng.standard_normal((episodes, 1)).astype(np.float32)
        action = np.where(random_episode[:, None], rng.uniform(-MAX_TORQUE, MAX_TORQUE, (episodes, 1)), action)
        action = np.clip(action, -MAX_TORQUE, MAX_TORQUE).astype(np.float32)
        next_obs, reward = env.step(action)
        for k, v in (("obs", obs), ("actions", action), ("rewards", reward), ("next_obs", next_obs)):
            out[k].append(v)
        obs = next_obs
    # episode-major order: episode i's steps are contiguous
    data = {k: np.stack(v, 1).reshape(episodes * EPISODE_STEPS, -1).astype(np.float32) for k, v in out.items()}
    data["rewards"] = data["rewards"].reshape(-1)
    data["terminals"] = np.zeros(len(data["rewards"]), np.float32)
    return data


def discounted_return(policy, start_states: np.ndarray, gamma: float, horizon: int) -> np.ndarray:
    """The discounted return sum_{t < horizon} gamma^t r_t of the deterministic `policy` (obs (n, 3) ->
    actions (n, 1)) from each start state (theta, theta_dot), shape (n,). With gamma^horizon small this is the
    infinite-horizon value that Q(s0, pi(s0)) estimates (truncations bootstrap, so Q has no time limit)."""
    env = VectorPendulum(len(start_states), 0)
    obs = env.reset(start_states)
    total = np.zeros(len(start_states))
    for t in range(horizon):
        obs, reward = env.step(policy(obs))
        total += gamma ** t * reward
    return total
