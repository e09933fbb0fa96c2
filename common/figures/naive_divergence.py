"""Figure 4: naive off-policy RL on a static dataset (lecture: "Off-Policy Algorithms for Offline RL?":
"Can we just use off-policy methods to learn from static datasets? No!", its experimental results: "None of
the runs succeeds", "Q-values even diverge for some datasets"; the BAIR BEAR blog's SAC experiment).

This library's own files, trained on expert demonstrations of Pendulum (the scripted swing-up with action
noise 0.1, as the lecture's experiment uses a trained policy's expert data) of several sizes n:
  algorithms/sac_offline.py  naive SAC, nothing changed for the offline setting; the temperature is held at
                             alpha = 0.001 (alpha_lr 0) so that its soft Q carries no entropy bonus and
                             compares with the plain return;
  algorithms/td3_bc.py       TD3+BC (alpha 2.5), the minimal policy constraint, on the same data.
Small sizes so that the figure trains in well under a minute: 64x64 networks, batch 128, learning rates
1e-3, Polyak rate 0.05, discount 0.95 and rewards x 0.1 (so that Q converges within the short run: the
effective horizon is 20 steps). Every `EVAL_EVERY` updates: Q(s0, pi(s0)) averaged over the dataset's start
states, against the true discounted return of the same policy from the same states (Monte Carlo, 600 steps).
"""

from __future__ import annotations


from common.figures.offline_training import train_and_track
from common.figures.toy_control import rollout_dataset

SIZES = (1_000, 10_000, 100_000)
STEPS = 3_000
EVAL_EVERY = 250
NOISE = 0.1
SHARED = {"gamma": 0.95, "reward_scale": 0.1, "actor_lr": 1e-3, "critic_lr": 1e-3, "tau": 0.05}
METHODS = {
    "naive SAC (sac_offline.py)": ("sac_offline", {**SHARED, "initial_alpha": 1e-3, "alpha_lr": 0.0}),
    "TD3+BC (td3_bc.py)": ("td3_bc", SHARED),
}


def run(sizes=SIZES, steps: int = STEPS, eval_every: int = EVAL_EVERY, seed: int = 0) -> dict:
    """{size: {method: {"steps", "q", "true"}}} for every dataset size and method."""
    out = {}
    for n in sizes:
        data = rollout_dataset(n, noise=NOISE, seed=seed)
        out[n] = {name: train_and_track(algo, data, steps, eval_every, seed=seed, **cfg)
                  for name, (algo, cfg) in METHODS.items()}
    return out


def make(path) -> dict:
    """Draw figure 4 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    res = run()
    colors = {"naive SAC (sac_offline.py)": "#cc0000", "TD3+BC (td3_bc.py)": "#38761d"}
    fig, axes = plt.subplots(1, len(SIZES) + 1, figsize=(4.2 * (len(SIZES) + 1), 4.3))
    numbers = {}
    for ax, n in zip(axes, SIZES):
        for name, rec in res[n].items():
            ax.plot(rec["steps"], rec["q"], "-", color=colors[name], lw=2, label=f"{name}: Q(s0, pi(s0))")
            ax.plot(rec["steps"], rec["true"], "--", color=colors[name], lw=1.5, label=f"{name}: true return")
            axes[-1].plot(rec["steps"], rec["q"] - rec["true"], (":", "--", "-")[SIZES.index(n) % 3],
                          color=colors[name], label=f"{name.split(' (')[0]}, n={n:,}")
            numbers[f"n={n:,} {name.split(' (')[0]}"] = {"Q": round(float(rec["q"][-1]), 2),
                                                          "true": round(float(rec["true"][-1]), 2)}
        ax.set_title(f"n = {n:,} expert transitions", fontsize=10)
        ax.set_xlabel("gradient steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("discounted value (rewards x 0.1, gamma 0.95)")
    axes[0].legend(fontsize=7)
    axes[-1].axhline(0, color="black", lw=0.6)
    axes[-1].set_title("overestimation Q - true", fontsize=10)
    axes[-1].set_xlabel("gradient steps")
    axes[-1].legend(fontsize=6)
    axes[-1].grid(alpha=0.3)
    fig.suptitle("Naive off-policy SAC on static expert data: Q climbs away from the true return (dashed); "
                 "TD3+BC's Q stays on it", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return numbers
