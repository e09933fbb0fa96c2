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
`common.envs.pendulum:scripted_pendulum_expert` is also a ready `--expert` for the algorithm:
    python algorithms/dagger.py --env Pendulum-v1 --expert common.envs.pendulum:scripted_pendulum_expert
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

from common.checkpoint import import_algorithm, load_agent  # noqa: E402
from common.envs.pendulum import pendulum_expert  # noqa: E402,F401  (the experiment's expert)
from common.errors import UserError, fail  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.experts import Expert  # noqa: E402
from common.runs import git_commit  # noqa: E402

ENV = "Pendulum-v1"
EXPERT = "common.envs.pendulum:scripted_pendulum_expert"
METHODS = {  # name -> the dagger.py settings that make it
    "BC": {"beta_schedule": "exponential", "beta_decay": 1.0},
    "DAgger": {"beta_schedule": "linear", "beta_rampdown_rounds": 1},
}


def growth_exponent(horizons, costs) -> float:
    """Least-squares slope of log(cost) against log(H): cost ~ H^slope."""
    h, c = np.asarray(horizons, np.float64), np.asarray(costs, np.float64)
    if len(h) < 2 or np.any(c <= 0):
        return float("nan")
    return float(np.polyfit(np.log(h), np.log(c), 1)[0])


def horizon_env(dagger, horizon: int):
    return dagger.interactive_env(dagger.Config(env=ENV, max_episode_steps=horizon))


def expert_return(dagger, horizon: int, episodes: int, seed: int) -> float:
    """The expert's mean return on the evaluation episodes the learners are scored on (same seeds, same H)."""
    policy = lambda obs: torch.as_tensor(pendulum_expert(obs.cpu().numpy()))
    return evaluate(policy, horizon_env(dagger, horizon), None, episodes, seed)["return_mean"]


@torch.no_grad()
def error_on_expert_states(dagger, agent, horizon: int, episodes: int, seed: int) -> float:
    """eps of the theorems: the learner's mean d(a, a*) on the states the expert visits (the expert drives
    the evaluation episodes; the learner only proposes)."""
    env = horizon_env(dagger, horizon)
    errors = []

    def policy(obs: torch.Tensor) -> torch.Tensor:
        flat = obs.cpu().numpy()
        a_star = pendulum_expert(flat)
        errors.append(dagger.action_discrepancy(dagger.learner_actions(agent, flat, env.action_space), a_star,
                                                env.action_space))
        return torch.as_tensor(a_star)

    lengths = evaluate(policy, env, None, episodes, seed)["lengths"]
    d = np.stack(errors)
    return float(d[np.arange(len(d))[:, None] < lengths[None, :]].mean())


def run_one(dagger, method: str, horizon: int, seed: int, args) -> dict:
    """Train one method at one H; return its summary with `eps_expert_states` added (and, at the longest H,
    `error_by_step`: the final policy's mean d(a_t, a*_t) at each step of its own evaluation episodes)."""
    config = dagger.Config(env=ENV, expert=EXPERT, seed=seed, device="cpu", threads=args.threads,
                           max_steps=args.rounds * args.steps_per_round, steps_per_round=args.steps_per_round,
                           episodes_per_round=args.episodes_per_round, max_episode_steps=horizon,
                           hidden_dims=tuple(args.hidden_dims), eval_every=0, eval_episodes=args.eval_episodes,
                           log_every=args.steps_per_round, checkpoint_every=0, runs_dir=args.runs_dir,
                           download=False, **METHODS[method])
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        summary = dagger.train(config)
    agent, _ = load_agent(summary["run_dir"])
    summary["eps_expert_states"] = error_on_expert_states(dagger, agent, horizon, args.eval_episodes, seed)
    if horizon == max(args.horizons):
        expert = Expert(pendulum_expert, "scripted", horizon_env(dagger, horizon).action_space)
        summary["error_by_step"] = dagger.evaluate_against_expert(
            agent, expert, horizon_env(dagger, horizon), args.eval_episodes, seed, "cpu")["error_by_step"]
    return summary


def mean_std(values, digits: int = 2) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def experiment(args) -> dict:
    """Every (method, H, seed) run; returns {method: {H: [summary per seed]}} and the expert's returns."""
    dagger = import_algorithm("dagger")
    runs = {m: {h: [] for h in args.horizons} for m in METHODS}
    expert = {h: [] for h in args.horizons}
    for h in args.horizons:
        for seed in args.seeds:
            expert[h].append(expert_return(dagger, h, args.eval_episodes, seed))
            for method in METHODS:
                t = time.perf_counter()
                summary = run_one(dagger, method, h, seed, args)
                runs[method][h].append(summary)
                print(f"H={h:<4} seed {seed} {method:<6} labels {summary['expert_labels']:>6}  eps (expert states) "
                      f"{summary['eps_expert_states']:.4f}  on-policy error {summary['onpolicy_error']:.4f}  cost "
                      f"{summary['onpolicy_cost']:8.2f}  return {summary['return_mean']:8.1f} (expert "
                      f"{expert[h][-1]:8.1f})  {time.perf_counter() - t:5.1f} s", file=sys.stderr, flush=True)
    for h in args.horizons:  # the comparison is at equal labels: make sure it is
        labels = {m: {s["expert_labels"] for s in runs[m][h]} for m in METHODS}
        if len({n for v in labels.values() for n in v}) != 1:
            fail(f"unequal expert labels at H={h}: {labels}")
    return {"runs": runs, "expert": expert}


def fit(args, out: dict) -> dict:
    """Per method: per-H values (rows: H, columns: seeds) and the fitted exponents."""
    fits = {}
    per_h = lambda method, key: np.array([[s[key] for s in out["runs"][method][h]] for h in args.horizons])
    for method in METHODS:
        cost = per_h(method, "onpolicy_cost")
        regret = np.array([out["expert"][h] for h in args.horizons]) - per_h(method, "return_mean")
        fits[method] = {
            "cost": cost, "return": per_h(method, "return_mean"), "regret": regret,
            "eps": per_h(method, "eps_expert_states"), "error": per_h(method, "onpolicy_error"),
            "cost_exponent_seeds": [growth_exponent(args.horizons, cost[:, j]) for j in range(cost.shape[1])],
            "cost_exponent_means": growth_exponent(args.horizons, cost.mean(1)),
            "regret_exponent_means": growth_exponent(args.horizons, regret.mean(1)),
            "labels": [out["runs"][method][h][0]["expert_labels"] for h in args.horizons],
            "error_by_step": np.mean([s["error_by_step"] for s in out["runs"][method][max(args.horizons)]], 0),
        }
    return fits


def markdown(args, out: dict, fits: dict, command: str, elapsed: float) -> str:
    seeds = ", ".join(str(s) for s in args.seeds)
    commit = git_commit()
    bc, dg = fits["BC"], fits["DAgger"]
    lines = [
        "# Compounding errors: behaviour cloning against DAgger at equal expert labels",
        "",
        f"Command: `{command}`  ",
        f"Commit: {commit[:12] + ('-dirty' if commit.endswith('-dirty') else '')}; {time.strftime('%Y-%m-%d')}; "
        f"{elapsed / 60:.1f} min wall on {args.threads} torch thread(s).",
        "",
        f"{ENV} with a scripted expert (energy pumping, then PD control), time limit H varied. Each method gets "
        f"{args.rounds} rounds x {args.episodes_per_round} episodes of H expert-labelled steps and "
        f"{args.rounds} x {args.steps_per_round} gradient steps of an MLP {tuple(args.hidden_dims)} with the l2 "
        f"loss (`algorithms/dagger.py`). BC: beta = 1 in every round (expert rollouts only). DAgger: "
        f"beta_i = 1[i = 0] (the learner drives from round 1, the expert labels the states it visits). "
        f"Scored on {args.eval_episodes} evaluation episodes of length H per seed (seeds {seeds}), mean ± std "
        f"over seeds. d(a, a*) = |a - a*| / 4 (the action range); eps = mean d on the expert's own states "
        f"(the theorems' training error); on-policy error = mean d on the learner's states; cost = sum of d "
        f"over the learner's episode (l(pi) of the theorems); regret = expert return - learner return on the "
        f"same episodes.",
        "",
        "| H | labels | BC eps | BC on-policy error | BC cost | DAgger eps | DAgger on-policy error | DAgger cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, h in enumerate(args.horizons):
        lines.append(f"| {h} | {bc['labels'][k]} | {mean_std(bc['eps'][k], 4)} | {mean_std(bc['error'][k], 4)} | "
                     f"{mean_std(bc['cost'][k])} | {mean_std(dg['eps'][k], 4)} | {mean_std(dg['error'][k], 4)} | "
                     f"{mean_std(dg['cost'][k])} |")
    lines += ["", "| H | BC return | DAgger return | expert return |", "|---|---|---|---|"]
    for k, h in enumerate(args.horizons):
        lines.append(f"| {h} | {mean_std(bc['return'][k], 1)} | {mean_std(dg['return'][k], 1)} | "
                     f"{np.mean(out['expert'][h]):.1f} |")
    lines += ["", "Fitted growth exponents, the slope of log(cost) against log(H) (the theorems' worst cases: BC 2, "
              "DAgger 1):", "",
              "| method | on-policy cost, per seed (mean ± std) | on-policy cost, seed means | return regret, seed means |",
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
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    h = np.asarray(args.horizons, np.float64)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, color in (("BC", "tab:red"), ("DAgger", "tab:blue")):
        f = fits[method]
        mean = f["cost"].mean(1)
        for j in range(f["cost"].shape[1]):
            left.plot(h, f["cost"][:, j], ".", color=color, alpha=0.35)
        left.plot(h, mean, "o", color=color, label=f"{method}: fitted slope {f['cost_exponent_means']:.2f}")
        if np.isfinite(f["cost_exponent_means"]):
            slope, intercept = np.polyfit(np.log(h), np.log(mean), 1)
            left.plot(h, np.exp(intercept) * h ** slope, "-", color=color, alpha=0.7)
        middle.errorbar(h, f["return"].mean(1), yerr=f["return"].std(1), fmt="o-", color=color, capsize=3,
                        label=method)
        curve = f["error_by_step"]
        window = max(1, len(curve) // 40)
        smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
        right.plot(np.arange(len(smooth)) + window / 2, smooth, color=color, label=method)
    anchor = fits["BC"]["cost"].mean(1)[0]
    for power, style in ((1, ":"), (2, "--")):
        left.plot(h, anchor * (h / h[0]) ** power, style, color="gray", label=f"H^{power} (reference)")
    left.set(xscale="log", yscale="log", xlabel="horizon H", ylabel="on-policy cost  sum_t d(a_t, a*_t)",
             title="cost of the final policy vs H (log-log)")
    middle.plot(h, [np.mean(out["expert"][x]) for x in args.horizons], "s--", color="black", label="expert")
    middle.set(xscale="log", xlabel="horizon H", ylabel="return over H steps", title="return vs H")
    for ax in (left, middle):
        ax.set_xticks(h)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    right.set(xlabel="step t", ylabel="mean d(a_t, a*_t)",
              title=f"per-step on-policy error at H={max(args.horizons)}")
    for ax in (left, middle, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{ENV}, MLP {tuple(args.hidden_dims)}, equal expert labels ({args.rounds} x "
                 f"{args.episodes_per_round} episodes of H steps), seeds {', '.join(str(s) for s in args.seeds)}",
                 fontsize=9)
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
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[64, 64],
                        help="policy MLP (default 64 64: a small learner, so that eps is not negligible)")
    parser.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per run (default 20)")
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
