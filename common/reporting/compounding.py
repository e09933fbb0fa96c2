"""The compounding-error experiment: behaviour cloning against DAgger at equal expert labels, as H grows.

    python -m common.reporting.compounding                 # Pendulum-v1, H in 25..400, 3 seeds: a few minutes
    python -m common.reporting.compounding --horizons 50 100 200 --seeds 0 1 --threads 1

Lecture: "What can go wrong in imitation learning?" (compounding errors) and Theorems 2.1 / 2.2: trained on
the expert's states, behaviour cloning's cost is bounded by C + H^2 eps (the bound is tight in the worst
case); trained on its own states (DAgger), by C + H eps. This tool measures the cost on Pendulum-v1 with a
scripted expert (energy pumping, then PD control; the controller of tests/conftest.py), the time limit H
varied:
  * BC     = `algorithms/dagger.py` with beta = 1 in every round (exponential schedule, p = 1): R rounds of
             expert rollouts, the same pipeline and label budget as DAgger;
  * DAgger = `algorithms/dagger.py` with beta_i = 1[i = 0] (linear schedule, R = 1; Ross et al.): round 0
             expert rollouts, then the learner drives and the expert labels every state it visits.
Both get `rounds * episodes_per_round` episodes of H labelled steps (Pendulum never terminates early), the
same gradient steps and network. The cost of the final policy is measured on `eval_episodes` evaluation
episodes of length H: the on-policy action error d(a, a*) = |a - a*| / (high - low) summed over the
episode (l(pi) of the theorems with d as the per-step loss), and the return regret R(expert) - R(learner)
on the same episodes. The growth exponent is the least-squares slope of log(cost) against log(H), fitted to
each seed's curve (mean and std over seeds) and to the seed means.

Writes `results/compounding-error.md` (table, exponents, command, commit) and
`results/figures/compounding-error.png`; the runs go to `--runs-dir` (default runs/compounding).
`scripted_pendulum_expert` is also a ready `--expert` for the algorithm:
    python algorithms/dagger.py --env Pendulum-v1 --expert common.reporting.compounding:scripted_pendulum_expert
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.checkpoint import _import_algorithm  # noqa: E402
from common.errors import UserError, fail  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.runs import git_commit  # noqa: E402

ENV = "Pendulum-v1"
EXPERT = "common.reporting.compounding:scripted_pendulum_expert"
METHODS = {  # name -> the dagger.py settings that make it
    "BC": {"beta_schedule": "exponential", "beta_decay": 1.0},
    "DAgger": {"beta_schedule": "linear", "beta_rampdown_rounds": 1},
}


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """Scripted Pendulum-v1 controller: pump energy towards the upright level, then PD-stabilise (as the
    tests' expert: about -140 return over 200 steps, against about -1200 for uniform random actions)."""
    c, s, thdot = obs[..., 0], obs[..., 1], obs[..., 2]
    theta = np.arctan2(s, c)
    energy = 0.5 * thdot ** 2 + 15.0 * c  # thetaddot = 15 sin(theta) + 3 u  ->  E = thdot^2/2 + 15 cos
    pump = 0.5 * (15.0 - energy) * thdot
    pd = -(12.0 * theta + 2.5 * thdot)
    return np.clip(np.where(c > 0.85, pd, pump), -2.0, 2.0)[..., None].astype(np.float32)


def scripted_pendulum_expert():
    """Factory for `--expert common.reporting.compounding:scripted_pendulum_expert`."""
    return pendulum_expert


def growth_exponent(horizons, costs) -> float:
    """Least-squares slope of log(cost) against log(H): cost ~ H^slope."""
    h, c = np.asarray(horizons, np.float64), np.asarray(costs, np.float64)
    if len(h) < 2 or np.any(c <= 0):
        return float("nan")
    return float(np.polyfit(np.log(h), np.log(c), 1)[0])


def expert_return(dagger, horizon: int, episodes: int, seed: int) -> float:
    """The expert's mean return on the evaluation episodes the learners are scored on (same seeds, same H)."""
    dataset = dagger.interactive_env(dagger.Config(env=ENV, max_episode_steps=horizon))
    policy = lambda obs: torch.as_tensor(pendulum_expert(obs.cpu().numpy()))
    return evaluate(policy, dataset, None, episodes, seed)["return_mean"]


def run_one(dagger, method: str, horizon: int, seed: int, args) -> dict:
    config = dagger.Config(env=ENV, expert=EXPERT, seed=seed, device="cpu", threads=args.threads,
                           max_steps=args.rounds * args.steps_per_round, steps_per_round=args.steps_per_round,
                           episodes_per_round=args.episodes_per_round, max_episode_steps=horizon,
                           hidden_dims=tuple(args.hidden_dims), eval_every=0, eval_episodes=args.eval_episodes,
                           log_every=args.steps_per_round, checkpoint_every=0, runs_dir=args.runs_dir,
                           download=False, **METHODS[method])
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return dagger.train(config)


def mean_std(values) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def experiment(args) -> dict:
    """Every (method, H, seed) run; returns {method: {H: [summary per seed]}} and the expert's returns."""
    dagger = _import_algorithm("dagger")
    runs = {m: {h: [] for h in args.horizons} for m in METHODS}
    expert = {h: [] for h in args.horizons}
    for h in args.horizons:
        for seed in args.seeds:
            expert[h].append(expert_return(dagger, h, args.eval_episodes, seed))
            for method in METHODS:
                t = time.perf_counter()
                summary = run_one(dagger, method, h, seed, args)
                runs[method][h].append(summary)
                print(f"H={h:<4} seed {seed} {method:<6} labels {summary['expert_labels']:>6}  on-policy cost "
                      f"{summary['onpolicy_cost']:8.2f}  return {summary['return_mean']:8.1f} (expert "
                      f"{expert[h][-1]:8.1f})  {time.perf_counter() - t:5.1f} s", file=sys.stderr, flush=True)
    for h in args.horizons:  # the comparison is at equal labels: make sure it is
        labels = {m: {s["expert_labels"] for s in runs[m][h]} for m in METHODS}
        if len({n for v in labels.values() for n in v}) != 1:
            fail(f"unequal expert labels at H={h}: {labels}")
    return {"runs": runs, "expert": expert}


def fit(args, out: dict) -> dict:
    """Per method: per-H costs (seeds), and the exponents of the on-policy cost and of the return regret."""
    fits = {}
    for method in METHODS:
        cost = np.array([[s["onpolicy_cost"] for s in out["runs"][method][h]] for h in args.horizons])  # (H, seeds)
        ret = np.array([[s["return_mean"] for s in out["runs"][method][h]] for h in args.horizons])
        regret = np.array([out["expert"][h] for h in args.horizons]) - ret  # same episodes, same seeds
        fits[method] = {
            "cost": cost, "return": ret, "regret": regret,
            "cost_exponent_seeds": [growth_exponent(args.horizons, cost[:, j]) for j in range(cost.shape[1])],
            "cost_exponent_means": growth_exponent(args.horizons, cost.mean(1)),
            "regret_exponent_means": growth_exponent(args.horizons, regret.mean(1)),
            "labels": [out["runs"][method][h][0]["expert_labels"] for h in args.horizons],
        }
    return fits


def markdown(args, out: dict, fits: dict, command: str, elapsed: float) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        "# Compounding errors: behaviour cloning against DAgger at equal expert labels",
        "",
        f"Command: `{command}`  ",
        f"Commit: {git_commit()[:12] + ('-dirty' if git_commit().endswith('-dirty') else '')}; "
        f"{time.strftime('%Y-%m-%d')}; {elapsed / 60:.1f} min on {args.threads} torch thread(s).",
        "",
        f"{ENV} with a scripted expert (energy pumping, then PD control); time limit H varied. Each method gets "
        f"{args.rounds} rounds x {args.episodes_per_round} episodes of H expert-labelled steps, "
        f"{args.rounds} x {args.steps_per_round} gradient steps of an MLP {tuple(args.hidden_dims)} with the l2 "
        f"loss (`algorithms/dagger.py`). BC: beta = 1 in every round (expert rollouts only). DAgger: "
        f"beta_i = 1[i = 0] (the learner drives from round 1, the expert labels the states it visits). "
        f"Scored on {args.eval_episodes} evaluation episodes of length H per seed (seeds {seeds}): on-policy "
        f"cost = sum over the episode of d(a, a*) = |a - a*| / 4 (the action range), and the return; "
        f"regret = expert return - learner return on the same episodes. Mean ± std over seeds.",
        "",
        "| H | expert labels | BC on-policy cost | DAgger on-policy cost | BC return | DAgger return | expert return |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, h in enumerate(args.horizons):
        lines.append(f"| {h} | {fits['BC']['labels'][k]} | {mean_std(fits['BC']['cost'][k])} | "
                     f"{mean_std(fits['DAgger']['cost'][k])} | {mean_std(fits['BC']['return'][k])} | "
                     f"{mean_std(fits['DAgger']['return'][k])} | {np.mean(out['expert'][h]):.1f} |")
    lines += ["", "Fitted growth exponents (slope of log cost against log H; theory's worst case: BC 2, DAgger 1):",
              "", "| method | on-policy cost, per seed (mean ± std) | on-policy cost, seed means | return regret, seed means |",
              "|---|---|---|---|"]
    for method in METHODS:
        f = fits[method]
        lines.append(f"| {method} | {mean_std(f['cost_exponent_seeds'])} | {f['cost_exponent_means']:.2f} | "
                     f"{f['regret_exponent_means']:.2f} |")
    lines += ["", "![compounding error](figures/compounding-error.png)", ""]
    return "\n".join(lines)


def figure(args, out: dict, fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = np.asarray(args.horizons, np.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, color in (("BC", "tab:red"), ("DAgger", "tab:blue")):
        f = fits[method]
        mean, std = f["cost"].mean(1), f["cost"].std(1)
        left.errorbar(h, mean, yerr=std, fmt="o", color=color, capsize=3,
                      label=f"{method}: slope {f['cost_exponent_means']:.2f}")
        if np.isfinite(f["cost_exponent_means"]):
            slope, intercept = np.polyfit(np.log(h), np.log(mean), 1)
            left.plot(h, np.exp(intercept) * h ** slope, "-", color=color, alpha=0.6)
        right.errorbar(h, f["return"].mean(1), yerr=f["return"].std(1), fmt="o-", color=color, capsize=3,
                       label=method)
    anchor = fits["DAgger"]["cost"].mean(1)[0]
    for power, style in ((1, ":"), (2, "--")):
        left.plot(h, anchor * (h / h[0]) ** power, style, color="gray", label=f"H^{power} (reference)")
    left.set(xscale="log", yscale="log", xlabel="horizon H", ylabel="on-policy cost  sum_t d(a_t, a*_t)",
             title="cost of the final policy vs H (log-log)")
    right.plot(h, [np.mean(out["expert"][x]) for x in args.horizons], "s--", color="black", label="expert")
    right.set(xscale="log", xlabel="horizon H", ylabel="return over H steps", title="return vs H")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{ENV}, equal expert labels ({args.rounds} x {args.episodes_per_round} episodes of H steps), "
                 f"seeds {', '.join(str(s) for s in args.seeds)}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.reporting.compounding",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--horizons", type=int, nargs="+", default=[25, 50, 100, 200, 400],
                        help="time limits H (default 25 50 100 200 400)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--episodes-per-round", type=int, default=2, help="episodes per round (default 2)")
    parser.add_argument("--steps-per-round", type=int, default=400, help="gradient steps per round (default 400)")
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256], help="policy MLP (default 256 256)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes per run (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--runs-dir", default="runs/compounding", help="where the runs go (default runs/compounding)")
    parser.add_argument("--output", default="results/compounding-error.md", help="markdown table")
    parser.add_argument("--figure", default="results/figures/compounding-error.png", help="PNG figure")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m common.reporting.compounding" + ("" if argv is None and len(sys.argv) == 1 else
                                                          " " + " ".join(sys.argv[1:] if argv is None else argv))
    try:
        if len(args.horizons) < 2 or min(args.horizons) < 1:
            fail("--horizons needs at least two positive time limits to fit an exponent")
        if min(args.rounds, args.episodes_per_round, args.steps_per_round, args.eval_episodes, args.threads) < 1:
            fail("--rounds, --episodes-per-round, --steps-per-round, --eval-episodes and --threads must be >= 1")
        if args.rounds < 2:
            fail("--rounds must be at least 2: with one round DAgger is BC")
        torch.set_num_threads(args.threads)
        args.horizons = sorted(set(args.horizons))
        start = time.perf_counter()
        out = experiment(args)
        fits = fit(args, out)
        text = markdown(args, out, fits, command, time.perf_counter() - start)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output, fig_path = Path(args.output), Path(args.figure)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    figure(args, out, fits, fig_path)
    print(text)
    print(f"\nwrote {output} and {fig_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
