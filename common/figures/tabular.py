"""Small tabular MDPs and exact dynamic programming for the lecture's figures.

A `TabularMDP` is `P[s, a, s']` (transition probabilities), `R[s, a]` (expected reward), a discount and a
start distribution. Terminal states are absorbing with zero reward, so every value below is exact: finite
sums, linear solves or value iteration to machine precision. Policies are arrays `pi[s, a]` (rows sum to 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TabularMDP:
    """`P` (S, A, S) transition probabilities, `R` (S, A) expected rewards, `gamma`, `start` (S,)."""

    P: np.ndarray
    R: np.ndarray
    gamma: float
    start: np.ndarray

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]


def evaluate_policy(mdp: TabularMDP, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Q^pi (S, A), V^pi (S,)) of the discounted infinite-horizon MDP, by one linear solve:
    V = r_pi + gamma P_pi V."""
    p_pi = np.einsum("sa,sat->st", pi, mdp.P)
    r_pi = (pi * mdp.R).sum(1)
    v = np.linalg.solve(np.eye(mdp.n_states) - mdp.gamma * p_pi, r_pi)
    q = mdp.R + mdp.gamma * mdp.P @ v
    return q, v


def finite_horizon_values(mdp: TabularMDP, pi: np.ndarray, horizon: int) -> np.ndarray:
    """V_0^pi (S,): the expected discounted return of the first `horizon` steps, by backward induction."""
    v = np.zeros(mdp.n_states)
    for _ in range(horizon):
        q = mdp.R + mdp.gamma * mdp.P @ v
        v = (pi * q).sum(1)
    return v


def value_iteration(mdp: TabularMDP, allowed: np.ndarray | None = None, tol: float = 1e-12,
                    max_iters: int = 100_000) -> np.ndarray:
    """Q* (S, A) of `mdp` restricted to the `allowed` (S, A) actions (max only over those; the others
    keep -inf). States without an allowed action are worth 0 (the restricted MDP's dead ends)."""
    allowed = np.ones(mdp.R.shape, bool) if allowed is None else allowed
    q = np.zeros(mdp.R.shape)
    for _ in range(max_iters):
        v = np.where(allowed, q, -np.inf).max(1)
        v = np.where(np.isfinite(v), v, 0.0)
        new = mdp.R + mdp.gamma * mdp.P @ v
        if np.max(np.abs(new - q)) < tol:
            q = new
            break
        q = new
    return np.where(allowed, q, -np.inf)


def greedy(q: np.ndarray) -> np.ndarray:
    """The deterministic greedy policy (S, A) of `q` (ties: the lowest action index; -inf never chosen
    when a finite action exists; states whose actions are all -inf take action 0)."""
    pi = np.zeros(q.shape)
    best = np.argmax(np.where(np.isfinite(q), q, -1e300), axis=1)
    pi[np.arange(len(q)), best] = 1.0
    return pi


def sample_episodes(mdp: TabularMDP, pi: np.ndarray, episodes: int, horizon: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`episodes` trajectories of `horizon` steps under `pi`, all stepped at once.

    Returns arrays of shape (episodes, horizon): `states`, `actions` (int), `rewards` (the expected
    reward R[s, a]: the figures' MDPs have deterministic rewards), `next_states`.
    """
    n = episodes
    states = np.zeros((n, horizon), np.int64)
    actions = np.zeros((n, horizon), np.int64)
    next_states = np.zeros((n, horizon), np.int64)
    s = rng.choice(mdp.n_states, size=n, p=mdp.start)
    cum_pi = np.cumsum(pi, axis=1)
    cum_p = np.cumsum(mdp.P, axis=2)
    for t in range(horizon):
        a = np.minimum((rng.random(n)[:, None] > cum_pi[s]).sum(1), mdp.n_actions - 1)
        s_next = np.minimum((rng.random(n)[:, None] > cum_p[s, a]).sum(1), mdp.n_states - 1)
        states[:, t], actions[:, t], next_states[:, t] = s, a, s_next
        s = s_next
    return {"states": states, "actions": actions, "rewards": mdp.R[states, actions], "next_states": next_states}
