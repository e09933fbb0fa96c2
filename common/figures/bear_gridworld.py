"""Figure 2: BEAR's 1-D grid-world, distribution matching against the support constraint (lecture:
"Bootstrapping Error Accumulation Reduction (BEAR)", the example slides; Kumar et al. 2019 and the BAIR blog).

The grid: `LEFT_CELLS` cells left of the start S, then S, then `size` cells up to the goal G on the right.
Two actions, left and right; reaching G ends the episode with reward 1; the left end is a wall. The
behaviour policy: between S and G (S included) it goes left (the sub-optimal action) with probability 0.9
and right with 0.1, so both actions are in distribution; left of S it only ever goes left.

Distribution matching: the KL-constrained policy improvement of the slides, in its penalised form
max_pi E[sum_t gamma^t r_t] - alpha sum_t gamma^t KL(pi(.|s_t) || pi_beta(.|s_t)), solved exactly by soft value
iteration: V(s) = alpha log sum_a pi_beta(a|s) exp(Q(s,a) / alpha), pi(a|s) = pi_beta(a|s) exp((Q(s,a) - V(s)) /
alpha). A large alpha is a tight constraint (pi close to pi_beta); a small one is generous.
Support constraint (BEAR): Q-learning with the max over A_eps(s) = {a : pi_beta(a|s) >= eps}, greedy policy.

Success probability: the probability of ever reaching G from S, exact (the chain's absorption
probabilities by one linear solve; left of S the data only holds "left", so no constrained policy ever
comes back from there).
"""

from __future__ import annotations

import numpy as np

LEFT, RIGHT = 0, 1
LEFT_CELLS = 3
P_RIGHT_BEHAVIOUR = 0.1  # the behaviour policy's right (optimal) action between S and G
GAMMA = 0.99
SUPPORT_EPS = 0.05  # eps of BEAR's A_eps(s) = {a : pi_beta(a|s) >= eps}
ALPHAS = (1.0, 0.1, 0.01)  # KL penalty weights: tight to generous
SIZES = tuple(range(2, 61, 2))  # number of steps from S to G


def grid(size: int) -> tuple[np.ndarray, int, int, np.ndarray]:
    """(next_cell (N, 2), start, goal, pi_beta (N, 2)) of the grid with `size` steps from S to G."""
    n = LEFT_CELLS + 1 + size
    start, goal = LEFT_CELLS, LEFT_CELLS + size
    next_cell = np.stack([np.maximum(np.arange(n) - 1, 0), np.minimum(np.arange(n) + 1, n - 1)], 1)
    pi_beta = np.zeros((n, 2))
    pi_beta[:start, LEFT] = 1.0
    pi_beta[start:, RIGHT] = P_RIGHT_BEHAVIOUR
    pi_beta[start:, LEFT] = 1 - P_RIGHT_BEHAVIOUR
    return next_cell, start, goal, pi_beta


def _backup(v: np.ndarray, next_cell: np.ndarray, goal: int) -> np.ndarray:
    """Q(s, a) = r + gamma V(s') with r = 1 on reaching G (the goal is terminal: V(G) = 0)."""
    reward = (next_cell == goal).astype(float)
    v_next = np.where(next_cell == goal, 0.0, v[next_cell])
    return reward + GAMMA * v_next


def distribution_matching_policy(size: int, alpha: float, iters: int = 20_000) -> np.ndarray:
    """The KL-penalised optimal policy pi(a|s) (N, 2), by soft value iteration to convergence."""
    next_cell, _, goal, pi_beta = grid(size)
    v = np.zeros(len(pi_beta))
    with np.errstate(divide="ignore"):
        log_beta = np.log(pi_beta)  # -inf outside pi_beta's support: KL forbids those actions
    for _ in range(iters):
        q = _backup(v, next_cell, goal)
        z = log_beta + q / alpha
        m = z.max(1)
        new = alpha * (m + np.log(np.exp(z - m[:, None]).sum(1)))
        if np.max(np.abs(new - v)) < 1e-12:
            v = new
            break
        v = new
    q = _backup(v, next_cell, goal)
    logits = log_beta + q / alpha
    pi = np.exp(logits - logits.max(1, keepdims=True))
    return pi / pi.sum(1, keepdims=True)


def support_constraint_policy(size: int, eps: float = SUPPORT_EPS, iters: int = 20_000) -> np.ndarray:
    """BEAR's support-constrained greedy policy (N, 2): Q-iteration with the max over pi_beta(a|s) >= eps."""
    next_cell, _, goal, pi_beta = grid(size)
    allowed = pi_beta >= eps
    v = np.zeros(len(pi_beta))
    for _ in range(iters):
        q = _backup(v, next_cell, goal)
        new = np.where(allowed, q, -np.inf).max(1)
        if np.max(np.abs(new - v)) < 1e-12:
            v = new
            break
        v = new
    q = np.where(allowed, _backup(v, next_cell, goal), -np.inf)
    pi = np.zeros_like(q)
    pi[np.arange(len(q)), np.argmax(q, 1)] = 1.0
    return pi


def success_probability(size: int, pi: np.ndarray) -> float:
    """P(reach G from S) under `pi`: absorption probability of the chain (G: success; the cells left of S:
    failure, since every constrained policy only goes left there)."""
    next_cell, start, goal, _ = grid(size)
    cells = np.arange(start, goal)  # the transient cells S .. G-1
    k = len(cells)
    a = np.eye(k)
    b = np.zeros(k)
    for i, s in enumerate(cells):
        for action in (LEFT, RIGHT):
            target, p = next_cell[s, action], pi[s, action]
            if target == goal:
                b[i] += p
            elif target >= start:
                a[i, target - start] -= p
    return float(np.linalg.solve(a, b)[0])


def success_curves(sizes=SIZES, alphas=ALPHAS) -> dict[str, np.ndarray]:
    """Success probability against grid size: one curve per KL weight alpha, and the support constraint."""
    curves = {f"alpha={a:g}": np.array([success_probability(n, distribution_matching_policy(n, a)) for n in sizes])
              for a in alphas}
    curves["support"] = np.array([success_probability(n, support_constraint_policy(n)) for n in sizes])
    return curves


def _draw_policy_row(ax, y: float, pi: np.ndarray, start: int, goal: int, label: str) -> None:
    import matplotlib.patches as mpatches

    for s in range(len(pi)):
        ax.add_patch(mpatches.Rectangle((s - 0.5, y - 0.4), 1, 0.8, fill=False, lw=0.6, edgecolor="gray"))
        if s == goal:
            ax.text(s, y, "G", ha="center", va="center", fontweight="bold", color="#38761d")
            continue
        if s == start:
            ax.text(s, y + 0.27, "S", ha="center", va="center", fontsize=8, fontweight="bold")
        for action, sign, dy in ((LEFT, -1, 0.08), (RIGHT, 1, -0.08)):
            p = pi[s, action]
            if p > 0.005:
                ax.annotate("", xy=(s + sign * 0.42, y + dy), xytext=(s, y + dy),
                            arrowprops=dict(arrowstyle="-|>", lw=0.4 + 2.6 * p, alpha=0.25 + 0.75 * p,
                                            mutation_scale=6 + 8 * p,
                                            color="#38761d" if action == RIGHT else "#cc0000"))
        ax.text(s, y - 0.29, f"{pi[s, RIGHT]:.2f}", ha="center", va="center", fontsize=6, color="#38761d")
    ax.text(-0.8, y, label, ha="right", va="center", fontsize=8)


def make(path) -> dict:
    """Draw figure 2 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    curves = success_curves()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), gridspec_kw={"height_ratios": [1, 1.25]})
    size = 8
    _, start, goal, pi_beta = grid(size)
    rows = [("behaviour pi_beta", pi_beta), ("dist. matching, alpha=0.1", distribution_matching_policy(size, 0.1)),
            ("support constraint", support_constraint_policy(size))]
    for i, (label, pi) in enumerate(rows):
        _draw_policy_row(top, -1.2 * i, pi, start, goal, label)
    top.set_xlim(-4.5, goal + 0.7)
    top.set_ylim(-1.2 * len(rows) + 0.5, 0.7)
    top.set_aspect("equal")
    top.axis("off")
    top.set_title(f"1-D grid-world (S to G: {size} steps); arrow width = pi(a|s), green right, red left; "
                  f"numbers: pi(right|s)",
                  fontsize=10)
    sizes = np.array(SIZES)
    for (name, curve), color in zip(curves.items(), ["#f6b26b", "#e06666", "#990000", "#38761d"]):
        label = ("support constraint (BEAR, eps=%g)" % SUPPORT_EPS if name == "support"
                 else f"distribution matching, KL weight {name}")
        bottom.semilogy(sizes, np.maximum(curve, 1e-15), "--" if name == "support" else "o-", ms=3, color=color,
                        label=label, lw=3 if name == "support" else 1.5)
    bottom.set_xlabel("grid size (steps from S to G)")
    bottom.set_ylabel("P(reach G)")
    bottom.set_ylim(1e-13, 5)
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="lower left")
    bottom.set_title("Success probability as the grid grows: distribution matching -> 0, support constraint = 1",
                     fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    index = {n: i for i, n in enumerate(SIZES)}
    return {name: {f"size {n}": float(curve[index[n]]) for n in (10, 30, 60)} for name, curve in curves.items()}
