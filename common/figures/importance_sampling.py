"""Figure 7: importance sampling's bias and variance as the evaluated policy moves away from the behaviour
policy (lecture: "Importance Sampling" and its "Shortcomings": "Importance sampling induces high variance if
the importance ratios are large", "The importance ratio is large if pi and pi_beta differ strongly").

The MDP: a chain of `N_STATES` states; action 1 ("right") moves one state right with probability 0.9, action
0 one state left; the reward per step is the state's index / (N_STATES - 1); episodes last `HORIZON` steps
from the left end; undiscounted. The behaviour policy takes "right" with probability `P_BEHAVIOUR`; the
evaluated policy pi_p with probability p, swept from P_BEHAVIOUR (on-policy) to 0.95. The true value of every
pi_p is exact (backward induction).

The estimators, on `EPISODES` behaviour episodes, with rho_{0:t} = prod_{k <= t} pi(a_k|s_k) / pi_beta(a_k|s_k):
ordinary (trajectory-wise) IS  (1/n) sum_i rho_{0:H-1}^i G^i
per-decision IS                (1/n) sum_i sum_t rho_{0:t}^i r_t^i
weighted IS                    sum_i rho_{0:H-1}^i G^i / sum_i rho_{0:H-1}^i
weighted per-decision IS       sum_t sum_i rho_{0:t}^i r_t^i / sum_i rho_{0:t}^i
computed by algorithms/ope.py's `importance_sampling_estimates` (the off-policy evaluation tool's own code).
Their bias and standard deviation come from `REPEATS` independent datasets.
"""

from __future__ import annotations

import numpy as np

from common.checkpoint import import_algorithm
from common.figures.tabular import TabularMDP, finite_horizon_values, sample_episodes

N_STATES = 6
HORIZON = 10
P_MOVE = 0.9  # an action moves as intended with this probability, else the state stays
P_BEHAVIOUR = 0.3  # pi_beta(right | s)
TARGETS = tuple(np.round(np.linspace(P_BEHAVIOUR, 0.95, 14), 3))  # pi(right | s) of the evaluated policies
EPISODES = 100  # episodes per dataset
REPEATS = 400  # datasets per estimate of bias and variance
SEED = 0
ESTIMATORS = ("ordinary IS", "per-decision IS", "weighted IS", "weighted per-decision IS")


def chain_mdp() -> TabularMDP:
    n = N_STATES
    P = np.zeros((n, 2, n))
    for s in range(n):
        for a, target in ((0, max(s - 1, 0)), (1, min(s + 1, n - 1))):
            P[s, a, target] += P_MOVE
            P[s, a, s] += 1 - P_MOVE
    R = np.repeat((np.arange(n) / (n - 1))[:, None], 2, axis=1)
    start = np.zeros(n)
    start[0] = 1.0
    return TabularMDP(P, R, 1.0, start)


def policy(p_right: float) -> np.ndarray:
    return np.tile([1 - p_right, p_right], (N_STATES, 1))


def true_value(mdp: TabularMDP, p_right: float) -> float:
    return float(finite_horizon_values(mdp, policy(p_right), HORIZON) @ mdp.start)


def sweep(targets=TARGETS, episodes: int = EPISODES, repeats: int = REPEATS, seed: int = SEED) -> dict:
    """Bias, standard deviation and standard error of the bias of each estimator, for each target."""
    mdp = chain_mdp()
    rng = np.random.default_rng(seed)
    data = sample_episodes(mdp, policy(P_BEHAVIOUR), episodes * repeats, HORIZON, rng)
    actions = data["actions"].reshape(repeats, episodes, HORIZON)
    rewards = data["rewards"].reshape(repeats, episodes, HORIZON)
    out = {"targets": np.array(targets), "true": np.array([true_value(mdp, p) for p in targets])}
    for name in ESTIMATORS:
        out[name] = {"bias": [], "std": [], "bias_se": []}
    out["max_ratio"] = []
    for p, truth in zip(targets, out["true"]):
        log_ratio = np.where(actions == 1, np.log(p / P_BEHAVIOUR), np.log((1 - p) / (1 - P_BEHAVIOUR)))
        estimates = import_algorithm("ope").importance_sampling_estimates(log_ratio, rewards, 1.0)
        for name in ESTIMATORS:
            e = estimates[name]
            out[name]["bias"].append(float(e.mean() - truth))
            out[name]["std"].append(float(e.std()))
            out[name]["bias_se"].append(float(e.std() / np.sqrt(repeats)))
        out["max_ratio"].append(float(max(p / P_BEHAVIOUR, (1 - p) / (1 - P_BEHAVIOUR)) ** HORIZON))
    for name in ESTIMATORS:
        out[name] = {k: np.array(v) for k, v in out[name].items()}
    return out


def make(path) -> dict:
    """Draw figure 7 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    res = sweep()
    p = res["targets"]
    colors = dict(zip(ESTIMATORS, ("#cc0000", "#e69138", "#3d85c6", "#38761d")))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for name in ESTIMATORS:
        axes[0].errorbar(p, res[name]["bias"] / res["true"], yerr=2 * res[name]["bias_se"] / res["true"], fmt="o-",
                         ms=3, capsize=2, color=colors[name], label=name)
        axes[1].semilogy(p, res[name]["std"], "o-", ms=3, color=colors[name], label=name)
        axes[2].semilogy(p, np.sqrt(res[name]["bias"] ** 2 + res[name]["std"] ** 2), "o-", ms=3,
                         color=colors[name], label=name)
    axes[0].axhline(0, color="black", lw=0.6)
    axes[0].set_ylabel("relative bias (mean estimate - true) / true, +-2 s.e.")
    axes[0].set_ylim(-0.8, 0.8)
    axes[1].set_ylabel(f"standard deviation over {REPEATS} datasets")
    axes[2].set_ylabel("RMSE")
    for ax, title in zip(axes, ("bias (ordinary, per-decision: 0 up to sampling error)", "variance", "error")):
        ax.set_xlabel(f"evaluated policy's pi(right|s) (behaviour: {P_BEHAVIOUR})")
        ax.axvline(P_BEHAVIOUR, color="gray", lw=0.6, ls="--")
        ax.grid(alpha=0.3)
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=8)
    secondary = axes[1].twiny()
    secondary.set_xlim(axes[1].get_xlim())
    ticks = p[::3]
    secondary.set_xticks(ticks, [f"{max(t / P_BEHAVIOUR, (1 - t) / (1 - P_BEHAVIOUR)) ** HORIZON:.0e}" for t in ticks],
                         fontsize=7)
    secondary.set_xlabel("largest trajectory ratio rho_{0:H-1}", fontsize=8)
    fig.suptitle(f"Importance sampling on a {N_STATES}-state chain, horizon {HORIZON}, {EPISODES} behaviour "
                 f"episodes per estimate: the variance explodes as pi moves away from pi_beta", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    last = -1
    return {"target pi(right)": float(p[last]), "true value": float(res["true"][last]),
            **{f"{name}: bias, std": (round(float(res[name]["bias"][last]), 3), round(float(res[name]["std"][last]), 3))
               for name in ESTIMATORS},
            "ordinary IS std on-policy -> farthest": (float(res["ordinary IS"]["std"][0]),
                                                     float(res["ordinary IS"]["std"][last]))}
