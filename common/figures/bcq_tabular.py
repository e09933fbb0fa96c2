"""Figure 1: tabular BCQ on a deterministic and a stochastic MDP (lecture: "BCQ – Deterministic Tabular
Case", "BCQ – Stochastic Tabular Case").

The MDP: a lattice of 5 columns x 5 rows; the agent starts in the middle of the first column and moves one
column to the right per step with the action up (row + 1) or down (row - 1), clipped at the border; from the
last column every action ends the episode with a reward that grows with the row (the slides neglect rewards;
one at the end is enough to give Q-learning something to maximise). In the stochastic version an action
slips to the other direction with probability `SLIP`.

The dataset: a few episodes of a uniformly random behaviour policy; the transition counts t_i are the orange
numbers of the slides. BCQ (tabular): the restricted MDP keeps only transitions with t_i > 0, with
probabilities estimated from the counts, and is solved by Q-learning on the dataset with the max over the
actions seen in s' only. Naive Q-learning uses the same data but maxes over every action, including those
never tried, whose Q is whatever the initialisation (in deep RL: the network's extrapolation) says.

Claims: deterministic MDP -> BCQ's value estimate equals the true value of its policy exactly, and the policy
never leaves the data; naive Q-learning overestimates. Stochastic MDP -> the estimate is only as good as the
estimated probabilities, and the deployed policy is swept into states the data never saw with a positive
probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.figures.tabular import TabularMDP, evaluate_policy, greedy, value_iteration

COLUMNS, ROWS = 5, 5
START_ROW = 2
UP, DOWN = 0, 1
FINAL_REWARD = np.array([0.0, 0.1, 0.2, 0.4, 1.0])  # by row of the last column (row 4 at the top is best)
GAMMA = 0.9
SLIP = 0.2  # stochastic MDP: the action moves the other way with this probability
EPISODES = 6  # behaviour episodes in the dataset
Q_INIT_HIGH = 2.0  # naive Q-learning starts every Q(s, a) uniformly in [0, Q_INIT_HIGH]: arbitrary extrapolation
SEED = 3


def state_index(column: int, row: int) -> int:
    return column * ROWS + row


TERMINAL = COLUMNS * ROWS  # the absorbing end state


def lattice_mdp(slip: float) -> TabularMDP:
    """The lattice MDP (with the absorbing end state), deterministic for slip = 0."""
    n = COLUMNS * ROWS + 1
    P = np.zeros((n, 2, n))
    R = np.zeros((n, 2))
    for c in range(COLUMNS):
        for r in range(ROWS):
            s = state_index(c, r)
            if c == COLUMNS - 1:
                P[s, :, TERMINAL] = 1.0
                R[s, :] = FINAL_REWARD[r]
                continue
            up, down = state_index(c + 1, min(r + 1, ROWS - 1)), state_index(c + 1, max(r - 1, 0))
            P[s, UP, up] += 1 - slip
            P[s, UP, down] += slip
            P[s, DOWN, down] += 1 - slip
            P[s, DOWN, up] += slip
    P[TERMINAL, :, TERMINAL] = 1.0
    start = np.zeros(n)
    start[state_index(0, START_ROW)] = 1.0
    return TabularMDP(P, R, GAMMA, start)


def collect(mdp: TabularMDP, episodes: int, rng: np.random.Generator) -> np.ndarray:
    """Transitions (s, a, r, s') of `episodes` uniformly random behaviour episodes, shape (N, 4)."""
    rows = []
    for _ in range(episodes):
        s = int(np.argmax(mdp.start))
        while s != TERMINAL:
            a = int(rng.integers(2))
            s_next = int(rng.choice(mdp.n_states, p=mdp.P[s, a]))
            rows.append((s, a, mdp.R[s, a], s_next))
            s = s_next
    return np.array(rows)


def counts(data: np.ndarray, n_states: int) -> np.ndarray:
    """Transition counts t(s, a, s') (S, 2, S): the orange numbers on the slides."""
    t = np.zeros((n_states, 2, n_states), np.int64)
    np.add.at(t, (data[:, 0].astype(int), data[:, 1].astype(int), data[:, 3].astype(int)), 1)
    return t


def restricted_mdp(t: np.ndarray, mdp: TabularMDP) -> tuple[TabularMDP, np.ndarray]:
    """The restricted MDP estimated from counts: P_hat = t(s, a, s') / t(s, a) on the pairs with t(s, a) > 0
    (the `allowed` mask, returned too); rewards as observed."""
    n_sa = t.sum(2)
    allowed = n_sa > 0
    p_hat = np.where(allowed[..., None], t / np.maximum(n_sa, 1)[..., None], 0.0)
    p_hat[TERMINAL, :, TERMINAL] = 1.0
    return TabularMDP(p_hat, np.where(allowed, mdp.R, 0.0), mdp.gamma, mdp.start), allowed


def q_learning(data: np.ndarray, n_states: int, gamma: float, allowed: np.ndarray | None,
               q_init: np.ndarray, sweeps: int, rng: np.random.Generator) -> np.ndarray:
    """Tabular Q-learning replaying the dataset: Q(s,a) <- Q(s,a) + lr (r + gamma max_a' Q(s',a') - Q(s,a)),
    the max over the actions `allowed` in s' (BCQ: seen in the data) or over all (allowed None: naive);
    step size n(s, a)^-0.7 (n: updates of (s, a) so far: a Robbins-Monro schedule), so that it converges to
    the restricted MDP's fixed point."""
    q = q_init.copy()
    q[TERMINAL] = 0.0
    visits = np.zeros_like(q)
    for _ in range(sweeps):
        for i in rng.permutation(len(data)):
            s, a, r, s_next = int(data[i, 0]), int(data[i, 1]), data[i, 2], int(data[i, 3])
            next_q = q[s_next] if allowed is None else np.where(allowed[s_next], q[s_next], -np.inf)
            bootstrap = 0.0 if s_next == TERMINAL else np.max(next_q)
            visits[s, a] += 1
            q[s, a] += (r + gamma * bootstrap - q[s, a]) * visits[s, a] ** -0.7
    return q


def probability_of_unknown(mdp: TabularMDP, pi: np.ndarray, known: np.ndarray) -> float:
    """Probability that `pi`, deployed in the true `mdp`, ever takes a (state, action) pair outside the data
    (`known` (S, A) mask): it is then "swept into the unknown"."""
    dist = mdp.start.copy()
    lost = 0.0
    for _ in range(COLUMNS + 1):
        unknown_mass = (dist[:, None] * pi * ~known).sum(1)
        unknown_mass[TERMINAL] = 0.0
        lost += unknown_mass.sum()
        stay = dist[:, None] * pi * known
        stay[TERMINAL] = dist[TERMINAL] * pi[TERMINAL]
        dist = np.einsum("sa,sat->t", stay, mdp.P)
    return float(lost)


@dataclass
class TabularBCQResult:
    mdp: TabularMDP
    counts: np.ndarray  # t(s, a, s')
    known: np.ndarray  # (S, A): pairs with t > 0
    q_bcq: np.ndarray
    q_naive: np.ndarray
    q_exact_restricted: np.ndarray  # value iteration on the restricted MDP (what Q-learning converges to)
    pi_bcq: np.ndarray
    pi_naive: np.ndarray
    estimate_bcq: float  # V_hat(s0) = max over seen actions of Q_bcq(s0, .)
    true_bcq: float  # V^pi_bcq(s0) in the true MDP
    estimate_naive: float
    true_naive: float
    unknown_bcq: float  # P(pi_bcq leaves the data when deployed)
    unknown_naive: float
    visit_probability: np.ndarray  # (S,) probability that pi_bcq visits each state (true MDP)


def visit_probabilities(mdp: TabularMDP, pi: np.ndarray) -> np.ndarray:
    """Probability of visiting each state at least once under `pi` (each lattice state is visited at most
    once per episode: columns only increase)."""
    dist, visits = mdp.start.copy(), mdp.start.copy()
    for _ in range(COLUMNS):
        dist = np.einsum("s,sa,sat->t", dist, pi, mdp.P)
        visits = visits + dist
    visits[TERMINAL] = 0.0
    return visits


def run(slip: float, episodes: int = EPISODES, seed: int = SEED, sweeps: int = 1000) -> TabularBCQResult:
    """Build the dataset, the restricted MDP, BCQ's and naive Q-learning's solutions, and their true values."""
    rng = np.random.default_rng(seed)
    mdp = lattice_mdp(slip)
    data = collect(mdp, episodes, rng)
    t = counts(data, mdp.n_states)
    restricted, known = restricted_mdp(t, mdp)
    s0 = int(np.argmax(mdp.start))
    q_init = rng.uniform(0.0, Q_INIT_HIGH, size=mdp.R.shape)
    q_bcq = q_learning(data, mdp.n_states, mdp.gamma, known, q_init, sweeps, rng)
    q_bcq = np.where(known, q_bcq, -np.inf)
    q_bcq[TERMINAL] = 0.0
    q_naive = q_learning(data, mdp.n_states, mdp.gamma, None, q_init, sweeps, rng)
    q_exact = value_iteration(restricted, allowed=known | (np.arange(mdp.n_states) == TERMINAL)[:, None])
    pi_bcq, pi_naive = greedy(q_bcq), greedy(q_naive)
    known_or_end = known.copy()
    known_or_end[TERMINAL] = True
    return TabularBCQResult(
        mdp=mdp, counts=t, known=known, q_bcq=q_bcq, q_naive=q_naive, q_exact_restricted=q_exact,
        pi_bcq=pi_bcq, pi_naive=pi_naive,
        estimate_bcq=float(np.max(q_bcq[s0])), true_bcq=float(evaluate_policy(mdp, pi_bcq)[1][s0]),
        estimate_naive=float(np.max(q_naive[s0])), true_naive=float(evaluate_policy(mdp, pi_naive)[1][s0]),
        unknown_bcq=probability_of_unknown(mdp, pi_bcq, known_or_end),
        unknown_naive=probability_of_unknown(mdp, pi_naive, known_or_end),
        visit_probability=visit_probabilities(mdp, pi_bcq))


# ---------------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------------


def _draw_lattice(ax, res: TabularBCQResult, title: str) -> None:
    import matplotlib.patches as mpatches

    seen_states = res.counts.sum((1, 2)) > 0
    for c in range(COLUMNS):
        for r in range(ROWS):
            s = state_index(c, r)
            unknown = not seen_states[s] and res.visit_probability[s] > 1e-9
            face = "#cfe2f3" if seen_states[s] else ("#f4cccc" if unknown else "white")
            ax.add_patch(mpatches.Circle((c, r), 0.17, facecolor=face, edgecolor="black", lw=0.8, zorder=3))
            if unknown:
                ax.text(c + 0.02, r - 0.36, f"p={res.visit_probability[s]:.2f}", color="#cc0000", ha="center",
                        fontsize=7, zorder=4)
        if c == COLUMNS - 1:
            for r in range(ROWS):
                ax.text(c + 0.3, r, f"r={FINAL_REWARD[r]:g}", va="center", fontsize=7, color="dimgray")
    # dataset transitions with their counts
    for s in range((COLUMNS - 1) * ROWS):
        for a in (UP, DOWN):
            for s_next in np.flatnonzero(res.counts[s, a]):
                (c0, r0), (c1, r1) = divmod(s, ROWS), divmod(int(s_next), ROWS)
                rad = 0.18 if a == UP else -0.18
                ax.annotate("", xy=(c1, r1), xytext=(c0, r0), zorder=2,
                            arrowprops=dict(arrowstyle="-|>", color="gray", lw=0.8, shrinkA=9, shrinkB=9,
                                            connectionstyle=f"arc3,rad={rad}"))
                mx, my = (c0 + c1) / 2, (r0 + r1) / 2 + (0.16 if a == UP else -0.16)
                ax.text(mx, my, str(res.counts[s, a, s_next]), color="#e69138", fontsize=8, ha="center",
                        va="center", fontweight="bold", zorder=4)
    # BCQ's greedy path (the intended moves, no slips)
    s = int(np.argmax(res.mdp.start))
    for c in range(COLUMNS - 1):
        a = int(np.argmax(res.pi_bcq[s]))
        r = s % ROWS
        r_next = min(r + 1, ROWS - 1) if a == UP else max(r - 1, 0)
        ax.annotate("", xy=(c + 1, r_next), xytext=(c, r), zorder=5,
                    arrowprops=dict(arrowstyle="-|>", color="#38761d", lw=2.4, shrinkA=9, shrinkB=9))
        s = state_index(c + 1, r_next)
    ax.set_xlim(-0.5, COLUMNS - 0.2)
    ax.set_ylim(-0.7, ROWS - 0.4)
    ax.set_xticks(range(COLUMNS), [f"t={c}" for c in range(COLUMNS)])
    ax.set_yticks([])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)


def _draw_bars(ax, res: TabularBCQResult) -> None:
    labels = ["naive Q\nestimate", "naive Q\ntrue", "BCQ\nestimate", "BCQ\ntrue"]
    values = [res.estimate_naive, res.true_naive, res.estimate_bcq, res.true_bcq]
    colors = ["#e06666", "#f4cccc", "#38761d", "#b6d7a8"]
    ax.bar(labels, values, color=colors, edgecolor="black", lw=0.6)
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.3f}", ha="center", fontsize=8)
    ax.set_ylabel("V(s0)")
    ax.set_ylim(0, max(values) * 1.25)
    ax.set_title(f"P(leave the data): naive {res.unknown_naive:.2f}, BCQ {res.unknown_bcq:.2f}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)


def make(path) -> dict:
    """Draw figure 1 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    det, sto = run(0.0), run(SLIP)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), gridspec_kw={"width_ratios": [1.5, 1]})
    _draw_lattice(axes[0, 0], det, "Deterministic MDP: data (counts), restricted MDP, BCQ's policy (green)")
    _draw_bars(axes[0, 1], det)
    _draw_lattice(axes[1, 0], sto, f"Stochastic MDP (slip {SLIP:g}): red states are outside the data;\n"
                                   f"p = probability that BCQ's policy is swept there")
    _draw_bars(axes[1, 1], sto)
    fig.suptitle("Tabular BCQ: Q-learning on the restricted MDP built from transition counts", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"deterministic": {"bcq_estimate": det.estimate_bcq, "bcq_true": det.true_bcq,
                              "naive_estimate": det.estimate_naive, "naive_true": det.true_naive,
                              "bcq_p_unknown": det.unknown_bcq, "naive_p_unknown": det.unknown_naive},
            "stochastic": {"bcq_estimate": sto.estimate_bcq, "bcq_true": sto.true_bcq,
                           "naive_estimate": sto.estimate_naive, "naive_true": sto.true_naive,
                           "bcq_p_unknown": sto.unknown_bcq, "naive_p_unknown": sto.unknown_naive}}
