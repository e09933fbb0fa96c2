"""Figure 3: expectile regression (lecture: "Aside: Expectile regression", the loss and "Example with a 2D
random variable"; IQL paper, Figure 1).

l2^tau(u) = |tau - 1(u < 0)| u^2 with u = y - m (the target minus the estimate; the slide writes it for
V - Q with tau < 0.5, iql.py and the paper for Q - V with tau > 0.5: the same loss with tau and 1 - tau
swapped). Minimising E[l2^tau(y - m)] gives the tau-expectile of y: the mean at tau = 0.5, towards the largest
value as tau -> 1 (what IQL's V(s) uses to approach max over in-data actions of Q(s, a)).

The figure fits conditional expectiles m_tau(x) of a 2-D sample (x, y), y heteroscedastic in x, on a
polynomial basis by iteratively reweighted least squares (each step is a weighted least-squares solve with
weights tau where y is above the current fit and 1 - tau below; it stops when no point changes side, which
is the exact minimiser). The loss curves are drawn with iql.py's own `expectile_loss`.
"""

from __future__ import annotations

import numpy as np

TAUS = (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99)
DEGREE = 5  # polynomial basis 1, x, ..., x^5
POINTS = 1000
SEED = 0


def sample(n: int = POINTS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D random variable: x ~ U(-1, 1), y = sin(2.5 x) + (0.15 + 0.5 |x|) eps with eps ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    y = np.sin(2.5 * x) + (0.15 + 0.5 * np.abs(x)) * rng.standard_normal(n)
    return x, y


def features(x: np.ndarray, degree: int = DEGREE) -> np.ndarray:
    return np.vander(x, degree + 1, increasing=True)


def expectile_weights(residual: np.ndarray, tau: float) -> np.ndarray:
    """|tau - 1(u < 0)| for u = y - m: tau above the fit, 1 - tau below."""
    return np.where(residual < 0, 1.0 - tau, tau)


def fit_expectile(phi: np.ndarray, y: np.ndarray, tau: float, max_iters: int = 200) -> np.ndarray:
    """Weights w minimising sum_i l2^tau(y_i - phi_i w), by iteratively reweighted least squares."""
    w = np.linalg.lstsq(phi, y, rcond=None)[0]
    for _ in range(max_iters):
        c = expectile_weights(y - phi @ w, tau)
        new = np.linalg.solve(phi.T @ (c[:, None] * phi), phi.T @ (c * y))
        if np.array_equal(expectile_weights(y - phi @ new, tau), c):
            return new
        w = new
    return w


def scalar_expectile(y: np.ndarray, tau: float) -> float:
    """The tau-expectile of a 1-D sample (the intercept-only fit)."""
    return float(fit_expectile(np.ones((len(y), 1)), y, tau)[0])


def make(path) -> dict:
    """Draw figure 3 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt
    import torch

    from common.checkpoint import import_algorithm

    expectile_loss = import_algorithm("iql").expectile_loss
    x, y = sample()
    phi = features(x)
    fits = {tau: fit_expectile(phi, y, tau) for tau in TAUS}
    ols = np.linalg.lstsq(phi, y, rcond=None)[0]
    grid = np.linspace(-1, 1, 200)
    colors = plt.cm.coolwarm(np.linspace(0, 1, len(TAUS)))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [1, 1.6, 1]})
    u = torch.linspace(-2, 2, 201)
    for tau, color in zip((0.1, 0.5, 0.9), (colors[1], "black", colors[-2])):
        axes[0].plot(u, expectile_loss(u, tau), color=color, label=f"tau = {tau}")
    axes[0].set_xlabel("u = y - m")
    axes[0].set_ylabel("l2^tau(u)")
    axes[0].set_title("expectile loss (iql.expectile_loss)", fontsize=10)
    axes[0].legend(fontsize=8)

    axes[1].scatter(x, y, s=4, color="gray", alpha=0.4)
    for (tau, w), color in zip(fits.items(), colors):
        axes[1].plot(grid, features(grid) @ w, color="black" if tau == 0.5 else color, lw=2.2 if tau == 0.5 else 1.6,
                     label=f"tau = {tau}" + (" (mean)" if tau == 0.5 else ""))
    axes[1].plot(grid, features(grid) @ ols, ":", color="yellow", lw=1.5, label="least squares (mean)")
    axes[1].set_xlabel("x")
    axes[1].set_ylabel("y")
    axes[1].set_title("conditional expectiles m_tau(x) of a 2-D sample", fontsize=10)
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")

    taus = np.linspace(0.001, 0.999, 120)
    ys = y[np.abs(x - 0.8) < 0.1]  # the slice x ~ 0.8
    axes[2].plot(taus, [scalar_expectile(ys, t) for t in taus], color="purple")
    for value, name, style in ((ys.mean(), "mean", "--"), (ys.max(), "max", ":"), (ys.min(), "min", ":")):
        axes[2].axhline(value, ls=style, color="gray", lw=1)
        axes[2].text(0.02, value, name, fontsize=8, va="bottom")
    axes[2].axvline(0.5, color="gray", lw=0.5)
    axes[2].set_ylim(ys.min() - 0.3, ys.max() + 0.3)
    axes[2].set_xlabel("tau")
    axes[2].set_ylabel("expectile of y | x ~ 0.8")
    axes[2].set_title("tau = 0.5 gives the mean; tau -> 1 the max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    above = {tau: float(np.mean(y > phi @ w)) for tau, w in fits.items()}
    return {"max |m_0.5 - least squares| on the grid": float(np.max(np.abs(features(grid) @ (fits[0.5] - ols)))),
            "slice x~0.8: mean": float(ys.mean()), "slice: expectile 0.5": scalar_expectile(ys, 0.5),
            "slice: expectile 0.99": scalar_expectile(ys, 0.99), "slice: max": float(ys.max()),
            "fraction of points above m_tau": above}
