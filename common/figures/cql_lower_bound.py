"""Figure 8: CQL's lower bound (lecture: "Conservative Q-Learning": "Learn a value function such that the
estimated performance of the policy under this learned value function lower-bounds its true value!", and
"Conservative Evaluation": min_Q alpha (E_(s~D, a~pi) Q - E_(s,a)~D Q) + 1/2 E [(Q - T^pi Q)^2]).

This library's algorithms/cql.py (CQL(H) on SAC, fixed alpha, no entropy term in the backup) on a noisy
expert Pendulum dataset (the scripted swing-up with action noise 0.3, 10,000 transitions), for several
alpha: alpha = 0 is the same actor-critic with no conservative term, i.e. naive offline Q-learning. For each,
the learned estimate Q(s0, pi(s0)) of its own final policy pi, averaged over the dataset's start states,
against the true discounted return of pi from the same states (Monte Carlo). Small sizes so that it trains
in under a minute: 64x64 networks, batch 128, learning rates 1e-3, Polyak rate 0.05, discount 0.95, rewards
x 0.1 (see naive_divergence.py).
"""

from __future__ import annotations

import numpy as np

from common.figures.offline_training import train_and_track
from common.figures.toy_control import rollout_dataset

ALPHAS = (0.0, 1.0, 10.0)
TRANSITIONS = 10_000
NOISE = 0.3
STEPS = 1_200
EVAL_EVERY = 200
SHARED = {"gamma": 0.95, "reward_scale": 0.1, "policy_lr": 1e-3, "critic_lr": 1e-3, "tau": 0.05}


def run(alphas=ALPHAS, steps: int = STEPS, eval_every: int = EVAL_EVERY, transitions: int = TRANSITIONS,
        seed: int = 0) -> dict:
    """{alpha: {"steps", "q", "true"}} from algorithms/cql.py with cql_alpha = alpha."""
    data = rollout_dataset(transitions, noise=NOISE, seed=seed)
    return {a: train_and_track("cql", data, steps, eval_every, seed=seed, cql_alpha=a, **SHARED) for a in alphas}


def make(path) -> dict:
    """Draw figure 8 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    res = run()
    fig, (curves, final) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, len(ALPHAS)))
    colors[0] = (0.8, 0.0, 0.0, 1.0)
    for (a, rec), color in zip(res.items(), colors):
        label = "alpha = 0 (naive)" if a == 0 else f"alpha = {a:g}"
        curves.plot(rec["steps"], rec["q"], "-", color=color, lw=2, label=f"{label}: Q(s0, pi(s0))")
        curves.plot(rec["steps"], rec["true"], "--", color=color, lw=1.2, label=f"{label}: true return")
    curves.set_xlabel("gradient steps")
    curves.set_ylabel("discounted value (rewards x 0.1, gamma 0.95)")
    curves.legend(fontsize=7)
    curves.grid(alpha=0.3)
    curves.set_title("learned Q of the policy (solid) against its true return (dashed)", fontsize=10)
    x = np.arange(len(ALPHAS))
    gaps = [res[a]["q"][-1] - res[a]["true"][-1] for a in ALPHAS]
    final.bar(x, gaps, 0.6, color=colors, edgecolor="black")
    for i, a in enumerate(ALPHAS):
        final.text(i, gaps[i], f"Q {res[a]['q'][-1]:.1f}\ntrue {res[a]['true'][-1]:.1f}", ha="center",
                   va="bottom" if gaps[i] > 0 else "top", fontsize=8)
    final.set_xticks(x, ["alpha = 0\n(naive)" if a == 0 else f"alpha = {a:g}" for a in ALPHAS])
    final.axhline(0, color="black", lw=0.8)
    span = max(abs(g) for g in gaps)
    final.set_ylim(-1.6 * span, 1.6 * span)
    final.set_ylabel("learned Q(s0, pi(s0)) - true return of pi")
    final.set_title(f"after {STEPS} steps: above 0 over-estimates, below 0 is a lower bound", fontsize=10)
    final.grid(alpha=0.3, axis="y")
    fig.suptitle("CQL (algorithms/cql.py) learns a lower bound on its policy's value", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {f"alpha={a:g}": {"Q": round(float(res[a]["q"][-1]), 2), "true": round(float(res[a]["true"][-1]), 2)}
            for a in ALPHAS}
