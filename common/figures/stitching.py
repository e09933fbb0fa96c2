"""Figure 9: stitching (lecture: the s1 -> s9 example of the advantage-weighted slides, "Why Offline RL Should
Work in Principle: stitch together good and bad behaviour", and "Implicit Q-Learning").

A grid-world with deterministic moves (up, down, left, right) and two offline trajectories that share s3:
  A: s1 -> s2 -> s3 -> s4 -> s5 -> s6      good start (s1 -> s3 in two steps), then away to a dead end
  B: s1 -> b1 -> b2 -> b3 -> s3 -> s7 -> s8 -> s9 (goal)   a detour to s3, then the good end s7 -> s9
Reaching s9 gives reward 1 and ends the episode; s6 ends it with 0.

IQL here is a faithful tabular version of algorithms/iql.py: V(s) is the tau-expectile over the dataset's
actions in s of Q(s, a) (minimiser of E[l2^tau(Q - V)]), Q(s, a) = r + gamma V(s'), iterated to the fixed
point; the policy is advantage-weighted regression's optimum on the data, pi(a|s) proportional to
count(s, a) exp(beta (Q(s, a) - V(s))), and the deployed policy takes its most likely action. BC is
pi(a|s) proportional to count(s, a). Neither ever puts weight on an action the data does not hold.
"""

from __future__ import annotations

import numpy as np

from common.figures.expectiles import scalar_expectile

MOVES = {"up": (0, 1), "down": (0, -1), "left": (-1, 0), "right": (1, 0)}
ACTIONS = list(MOVES)
CELLS = {"s1": (0, 0), "s2": (1, 0), "s3": (2, 0), "s4": (3, 0), "s5": (4, 0), "s6": (4, -1),
         "b1": (0, -1), "b2": (1, -1), "b3": (2, -1), "s7": (2, 1), "s8": (2, 2), "s9": (2, 3)}
TRAJECTORY_A = ["s1", "s2", "s3", "s4", "s5", "s6"]
TRAJECTORY_B = ["s1", "b1", "b2", "b3", "s3", "s7", "s8", "s9"]
GOAL, DEAD_END = "s9", "s6"
GAMMA = 0.99
TAU = 0.7  # IQL's expectile (iql.py's locomotion setting)
BETA = 3.0  # IQL's inverse temperature (iql.py's locomotion setting)


def action_between(a: str, b: str) -> str:
    (x0, y0), (x1, y1) = CELLS[a], CELLS[b]
    return next(name for name, move in MOVES.items() if move == (x1 - x0, y1 - y0))


def dataset(trajectories=(TRAJECTORY_A, TRAJECTORY_B)) -> list[tuple[str, str, float, str]]:
    """Transitions (s, a, r, s') of the trajectories."""
    return [(s, action_between(s, s_next), float(s_next == GOAL), s_next)
            for traj in trajectories for s, s_next in zip(traj[:-1], traj[1:])]


def tabular_iql(data, tau: float = TAU, beta: float = BETA, gamma: float = GAMMA, iters: int = 200):
    """(Q {(s, a): value}, V {s: value}, pi {s: {a: prob}}) of tabular IQL on `data`."""
    pairs = sorted({(s, a) for s, a, _, _ in data})
    next_of = {(s, a): (r, s_next) for s, a, r, s_next in data}  # deterministic moves
    count = {p: sum(1 for s, a, _, _ in data if (s, a) == p) for p in pairs}
    states = sorted({s for s, _ in pairs})
    v = {s: 0.0 for s in CELLS}
    q = {}
    for _ in range(iters):
        # Q(s, a) = r + gamma V(s')   (V of a terminal state is 0)
        q = {p: next_of[p][0] + (0.0 if next_of[p][1] in (GOAL, DEAD_END) else gamma * v[next_of[p][1]])
             for p in pairs}
        # V(s) = argmin_v E_(a ~ D(s)) [ l2^tau(Q(s, a) - v) ]: the tau-expectile of Q over the data's actions
        v = {s: (scalar_expectile(np.repeat([q[p] for p in pairs if p[0] == s],
                                            [count[p] for p in pairs if p[0] == s]), tau)
                 if s in states else 0.0) for s in CELLS}
    pi = {}
    for s in states:
        # AWR on the data: pi(a|s) proportional to count(s, a) exp(beta (Q(s, a) - V(s)))
        w = {a: count[(s, a)] * np.exp(beta * (q[(s, a)] - v[s])) for (s2, a) in pairs if s2 == s}
        total = sum(w.values())
        pi[s] = {a: w[a] / total for a in w}
    return q, v, pi


def behaviour_cloning(data):
    """pi(a|s) proportional to count(s, a)."""
    pi: dict[str, dict[str, float]] = {}
    for s, a, _, _ in data:
        pi.setdefault(s, {}).setdefault(a, 0.0)
        pi[s][a] += 1
    return {s: {a: c / sum(row.values()) for a, c in row.items()} for s, row in pi.items()}


def step(s: str, a: str) -> str:
    x, y = CELLS[s]
    dx, dy = MOVES[a]
    return next(name for name, cell in CELLS.items() if cell == (x + dx, y + dy))


def greedy_path(pi, start: str = "s1", max_steps: int = 20) -> list[str]:
    """The path of the policy's most likely action from `start` (ties: the first action in ACTIONS order)."""
    path = [start]
    while path[-1] not in (GOAL, DEAD_END) and len(path) <= max_steps:
        row = pi[path[-1]]
        best = max(row.values())
        path.append(step(path[-1], next(a for a in ACTIONS if row.get(a, -1) == best)))
    return path


def most_likely(pi):
    """The deterministic policy taking pi's most likely action (ties: the first action in ACTIONS order), as
    iql.py's act() deploys the actor's mean."""
    out = {}
    for s, row in pi.items():
        best = max(row.values())
        out[s] = {next(a for a in ACTIONS if row.get(a, -1) == best): 1.0}
    return out


def path_probability(pi, path: list[str]) -> float:
    return float(np.prod([pi[s].get(action_between(s, s_next), 0.0) for s, s_next in zip(path[:-1], path[1:])]))


def success_probability(pi, start: str = "s1", horizon: int = 50) -> float:
    """P(reach s9) of the stochastic policy (it only takes dataset actions, so it stays on the data's cells)."""
    dist = {start: 1.0}
    reached = 0.0
    for _ in range(horizon):
        new: dict[str, float] = {}
        for s, mass in dist.items():
            for a, p in pi[s].items():
                s_next = step(s, a)
                if s_next == GOAL:
                    reached += mass * p
                elif s_next != DEAD_END:
                    new[s_next] = new.get(s_next, 0.0) + mass * p
        dist = new
    return reached


STITCHED = ["s1", "s2", "s3", "s7", "s8", "s9"]


def make(path) -> dict:
    """Draw figure 9 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    data = dataset()
    q, v, pi_iql = tabular_iql(data)
    pi_bc = behaviour_cloning(data)
    iql_path, bc_path = greedy_path(pi_iql), greedy_path(pi_bc)

    fig, (ax, bars, weights) = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [1.3, 1, 0.8]})
    for name, (x, y) in CELLS.items():
        ax.add_patch(plt.Rectangle((x - 0.45, y - 0.45), 0.9, 0.9, facecolor="#fff2cc" if name == GOAL else "#f3f3f3",
                                   edgecolor="gray"))
        ax.text(x - 0.3, y + 0.28, name, fontsize=9, fontweight="bold" if name.startswith("s") else "normal")

    def draw(path_, color, offset, lw, label, style="-"):
        xs = [CELLS[s][0] + offset for s in path_]
        ys = [CELLS[s][1] + offset for s in path_]
        ax.plot(xs, ys, style, color=color, lw=lw, label=label, solid_capstyle="round")
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]),
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=lw))

    draw(TRAJECTORY_A, "#3d85c6", -0.12, 1.5, "trajectory A (data)")
    draw(TRAJECTORY_B, "#e69138", 0.12, 1.5, "trajectory B (data)")
    draw(iql_path, "#38761d", 0.0, 3.5, "IQL's deployed policy")
    ax.set_xlim(-0.7, 4.7)
    ax.set_ylim(-1.7, 3.9)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(fontsize=8, loc="center right")
    ax.set_title("two sub-optimal trajectories sharing s3;\nIQL: " + " -> ".join(iql_path), fontsize=10)

    policies = {"BC\n(sampled)": pi_bc, "IQL's AWR policy\n(sampled)": pi_iql,
                "IQL deployed\n(most likely action)": most_likely(pi_iql)}
    names = list(policies)
    success = [success_probability(pi) for pi in policies.values()]
    stitched = [path_probability(pi, STITCHED) for pi in policies.values()]
    x = np.arange(len(names))
    bars.bar(x - 0.18, success, 0.36, color="#b6d7a8", edgecolor="black", label="P(reach s9)")
    bars.bar(x + 0.18, stitched, 0.36, color="#38761d", edgecolor="black",
             label="P(path s1 -> s2 -> s3 -> s7 -> s8 -> s9)")
    for i in range(len(names)):
        bars.text(i - 0.18, success[i] + 0.02, f"{success[i]:.2f}", ha="center", fontsize=9)
        bars.text(i + 0.18, stitched[i] + 0.02, f"{stitched[i]:.2f}", ha="center", fontsize=9)
    bars.set_xticks(x, names, fontsize=8)
    bars.set_ylim(0, 1.25)
    bars.legend(fontsize=8, loc="upper left")
    bars.set_title("the policies run from s1", fontsize=10)

    at_s3 = sorted(pi_iql["s3"])
    w = [np.exp(BETA * (q[("s3", a)] - v["s3"])) for a in at_s3]
    labels = [f"{a}\n(to {step('s3', a)})" for a in at_s3]
    weights.bar(labels, w, color=["#38761d" if step("s3", a) == "s7" else "#cc0000" for a in at_s3])
    for i, value in enumerate(w):
        weights.text(i, value * 1.02, f"{value:.2f}", ha="center", fontsize=9)
    weights.set_title(f"advantage weights exp(beta A) at s3\n(tau={TAU}, beta={BETA})", fontsize=10)
    fig.suptitle("Stitching: offline RL (IQL) goes s1 -> s9 along the best parts of both trajectories; BC copies "
                 "both and mixes them", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"iql greedy path": " -> ".join(iql_path), "bc greedy path (ties: first action)": " -> ".join(bc_path),
            "P(reach s9): bc, iql awr sampled, iql deployed": tuple(round(x_, 3) for x_ in success),
            "P(stitched path): bc, iql awr sampled, iql deployed": tuple(round(x_, 3) for x_ in stitched),
            "advantage weights at s3": {a: round(float(x_), 3) for a, x_ in zip(at_s3, w)}}
