"""Draw the lecture's figures: `python -m common.figures [names ...] [--output DIR]` (`make figures`).

Each figure module's `make(path)` draws one PNG and returns the numbers behind its claim. The numbers of every
figure drawn so far are kept in `<output>/numbers.json`; `<output>/README.md` is written from them with each
figure's caption (the slide it reproduces, what it shows, the claim with its number).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.checkpoint import atomic_write_text  # noqa: E402
from common.runs import git_commit  # noqa: E402

# name -> (figure number, module, PNG file name, slide(s) it reproduces, what it shows, claim from the numbers)
FIGURES: dict[str, tuple] = {
    "bcq": (1, "bcq_tabular", "1-bcq-tabular.png",
            '"BCQ – Deterministic Tabular Case" and "BCQ – Stochastic Tabular Case"',
            "A 5x5 lattice MDP (actions up/down, one column per step, reward by final row), six random behaviour "
            "episodes; orange numbers are the transition counts t_i. BCQ runs Q-learning on the restricted MDP "
            "(only transitions with t_i > 0, probabilities from the counts, max over seen actions); naive "
            "Q-learning maxes over all actions, whose unseen Q values are arbitrary (initialised uniformly in "
            "[0, 2]). Bars: each method's estimate V(s0) beside the true value of its greedy policy in the true MDP.",
            lambda n: (f"Deterministic MDP: BCQ's estimate {n['deterministic']['bcq_estimate']:.4f} equals its "
                       f"policy's true value {n['deterministic']['bcq_true']:.4f} and the policy never leaves the "
                       f"data (P = {n['deterministic']['bcq_p_unknown']:.2f}); naive Q-learning estimates "
                       f"{n['deterministic']['naive_estimate']:.3f} for a policy worth "
                       f"{n['deterministic']['naive_true']:.3f}. Stochastic MDP (slip 0.2): BCQ's estimate "
                       f"{n['stochastic']['bcq_estimate']:.3f} against a true {n['stochastic']['bcq_true']:.3f}, and "
                       f"the deployed policy is swept into states the data never saw with probability "
                       f"{n['stochastic']['bcq_p_unknown']:.2f}.")),
    "bear": (2, "bear_gridworld", "2-bear-gridworld.png",
             '"Bootstrapping Error Accumulation Reduction (BEAR)", the 1-D grid-world example',
             "Behaviour: left (sub-optimal) 90% / right 10% between S and G, only left to the left of S. "
             "Distribution matching is the KL-penalised improvement max E[return] - alpha KL(pi || pi_beta), "
             "solved exactly (soft value iteration) for a tight (alpha = 1), medium (0.1) and generous (0.01) "
             "penalty; the support constraint is Q-learning over A_eps(s) = {a : pi_beta(a|s) >= 0.05}. "
             "Top: the learned policies on an 8-step grid. Bottom: exact probability of ever reaching G.",
             lambda n: ("Support constraint: P(reach G) = " + ", ".join(f"{v:.2f}" for v in n["support"].values())
                        + " at grid sizes 10, 30, 60. Distribution matching: "
                        + "; ".join(f"{k}: " + ", ".join(f"{v:.1e}" for v in row.values())
                                    for k, row in n.items() if k != "support")
                        + " (sizes 10, 30, 60): every fixed penalty goes to 0 as the grid grows.")),
    "expectile": (3, "expectiles", "3-expectile-regression.png",
                  '"Aside: Expectile regression" (the loss and "Example with a 2D random variable")',
                  "Left: the asymmetric loss l2^tau drawn with iql.py's expectile_loss. Middle: conditional "
                  "expectiles m_tau(x) of a 2-D sample (1,000 points, quintic basis, fitted exactly by iteratively "
                  "reweighted least squares) for tau from 0.01 to 0.99. Right: the expectile of the slice x ~ 0.8 "
                  "as tau goes from 0 to 1.",
                  lambda n: (f"tau = 0.5 is the mean: max |m_0.5 - least squares| = "
                             f"{n['max |m_0.5 - least squares| on the grid']:.1e}; on the slice, expectile 0.5 = "
                             f"{n['slice: expectile 0.5']:.4f} = mean {n['slice x~0.8: mean']:.4f}, expectile 0.99 = "
                             f"{n['slice: expectile 0.99']:.2f} towards the max {n['slice: max']:.2f}; the fraction "
                             f"of points above m_tau falls from {n['fraction of points above m_tau']['0.01']:.2f} "
                             f"(tau 0.01) to {n['fraction of points above m_tau']['0.99']:.2f} (tau 0.99).")),
    "divergence": (4, "naive_divergence", "4-naive-offline-divergence.png",
                   '"Off-Policy Algorithms for Offline RL?" ("Can we just use off-policy methods ... No!", '
                   'experimental results)',
                   "This library's sac_offline.py (naive SAC, temperature held at 0.001 so its Q has no entropy "
                   "bonus) and td3_bc.py, trained on expert Pendulum data (scripted swing-up, action noise 0.1) of "
                   "1k, 10k and 100k transitions: Q(s0, pi(s0)) over the dataset's start states (solid) against the "
                   "true discounted return of the same policy (dashed, Monte Carlo in a vectorised Pendulum-v1). "
                   "Small settings so it trains in seconds: 64x64 networks, batch 128, lr 1e-3, Polyak 0.05, "
                   "gamma 0.95, rewards x 0.1, 3,000 steps.",
                   lambda n: ("After 3,000 steps: " + "; ".join(f"{k}: Q {v['Q']:.2f} vs true {v['true']:.2f}"
                                                               for k, v in n.items())
                              + ". Naive SAC's Q sits far above its return and still climbs; TD3+BC's tracks it.")),
    "multimodal": (5, "multimodal", "5-multimodal-bc.png",
                   '"What can go wrong in imitation learning? 2. Multimodal demonstration data" and "Use expressive '
                   'distribution class to fit p(a|s)"',
                   "PointFork-v0 (common/envs/fork.py): the point passes the obstacle (grey) on the left or the right "
                   "to reach the goal (gold). Demonstrations: local/fork/expert-v0 as `python -m common.build fork` "
                   "builds it (the scripted expert, a side drawn 50/50 per episode, action noise 0.1, 5,000 steps), "
                   "made in memory; left panel, coloured by side. This library's bc.py (l2 loss), bc_expressive.py "
                   "--head gmm (5-component Gaussian mixture) and diffusion_bc.py (DDPM, 100 noise levels) cloned "
                   "from them in memory with their tests' small settings (128-wide MLPs, lr 1e-3, 2,000 steps; the "
                   "diffusion denoiser 3 layers, 4,000 steps), then rolled out on 100 evaluation episodes; 40 drawn "
                   "per panel over the demonstrations (light grey); x marks a collision.",
                   lambda n: ("Success rate (successful episodes that passed left + right) and collision rate over "
                              f"{n['episodes']} episodes (the demonstrations' first action goes left in "
                              f"{n['demonstrations: first action left']:.0%}): "
                              + "; ".join(f"{k} {v['success_rate']:.0%} ({v['left_success']:.0%} + "
                                          f"{v['right_success']:.0%}), collisions {v['collision_rate']:.0%}"
                                          for k, v in n.items() if isinstance(v, dict))
                              + ". The l2 policy averages the two modes into the obstacle; the mixture and the "
                                "diffusion policy pass it on both sides.")),
    "compounding": (6, "compounding_error", "6-compounding-error.png",
                    '"What can go wrong in imitation learning? 1. Compounding errors", "Addressing Compounding Errors '
                    'with DAgger" and the error bounds C + H^2 eps (BC) and C + H eps (DAgger)',
                    "A reduced run of common/reporting/compounding.py (algorithms/dagger.py as BC, beta = 1 in every "
                    "round, and as DAgger, beta_i = 1[i = 0], at equal expert labels; Pendulum-v1, scripted expert, "
                    "MLP 64x64): horizons 25 to 200, seeds 0 and 1. Left: on-policy cost sum_t d(a_t, a*_t) of the "
                    "final policy against H (log-log, H and H^2 references); middle: return; right: per-step error "
                    "along the longest episodes. The full experiment (H up to 400, three seeds) is "
                    "`python -m common.reporting.compounding` (results/compounding-error.md).",
                    lambda n: ("Fitted growth exponent of the cost (slope of log cost on log H): "
                               + ", ".join(f"{m} {v['cost exponent']:.2f}" for m, v in n.items())
                               + "; cost at H=200: " + ", ".join(f"{m} {v.get('cost at H=200', float('nan')):.1f}"
                                                                 for m, v in n.items())
                               + ". BC's errors compound with H, DAgger's do not (the theorems' worst cases are "
                                 "exponents 2 and 1).")),
    "importance": (7, "importance_sampling", "7-importance-sampling.png",
                   '"Importance Sampling" and its "Shortcomings"',
                   "A 6-state chain (right moves right with p 0.9, reward = state / 5), horizon 10, undiscounted; "
                   "behaviour pi_beta(right) = 0.3; evaluated policies pi(right) from 0.3 to 0.95; exact values by "
                   "backward induction. Ordinary, per-decision, weighted and weighted per-decision IS on 100 "
                   "behaviour episodes, bias and standard deviation over 400 independent datasets.",
                   lambda n: (f"At pi(right) = {n['target pi(right)']:.2f} (largest trajectory ratio "
                              f"{(0.95 / 0.3) ** 10:.0e}), true value {n['true value']:.2f}: "
                              + "; ".join(f"{k.split(':')[0]} bias {v[0]:+.2f}, std {v[1]:.2f}" for k, v in n.items()
                                          if ": bias, std" in k)
                              + f". Ordinary IS's std grows from {n['ordinary IS std on-policy -> farthest'][0]:.2f} "
                                f"on-policy to {n['ordinary IS std on-policy -> farthest'][1]:.0f}; the weighted "
                                f"estimators trade a bias for a std hundreds of times smaller.")),
    "cql": (8, "cql_lower_bound", "8-cql-lower-bound.png",
            '"Conservative Q-Learning" ("learn a value function ... that lower-bounds its true value") and '
            '"Conservative Evaluation"',
            "This library's cql.py (CQL(H), fixed alpha, no entropy term in the backup) on 10k transitions of "
            "noisy expert Pendulum data (action noise 0.3), alpha = 0 (the same actor-critic without the "
            "conservative term: naive), 1 and 10; Q(s0, pi(s0)) of each run's own policy against that policy's "
            "true discounted return. Same small settings as figure 4, 1,200 steps.",
            lambda n: ("After 1,200 steps: " + "; ".join(f"{k}: Q {v['Q']:.2f} vs true {v['true']:.2f}"
                                                        for k, v in n.items()) + ".")),
    "stitching": (9, "stitching", "9-stitching.png",
                  'the s1 -> s9 example of "Advantage-Weighted Regression" ("Offline RL methods can learn a policy '
                  'that goes from s1 to s9!"), "Implicit Q-Learning"',
                  "Two sub-optimal trajectories sharing s3: A = s1 s2 s3 s4 s5 s6 (good start, dead end), "
                  "B = s1 b1 b2 b3 s3 s7 s8 s9 (detour, good end; s9 gives reward 1). Tabular IQL (V = the "
                  "0.7-expectile over the data's actions of Q, Q = r + 0.99 V(s'), policy = advantage-weighted "
                  "regression's optimum count(s, a) exp(3 A)) against BC (count(s, a)). Right: the advantage "
                  "weights at s3, as the slide's \"Adv. weights for s3\".",
                  lambda n: (f"IQL's deployed path: {n['iql greedy path']}. P(reach s9) for BC, IQL's AWR policy "
                             f"sampled, IQL deployed: {n['P(reach s9): bc, iql awr sampled, iql deployed']}; "
                             f"P(the stitched path): {n['P(stitched path): bc, iql awr sampled, iql deployed']}. "
                             f"BC copies the 50/50 split at s1 and s3 and never prefers the stitched path.")),
}
GAPS: dict[int, tuple[str, str]] = {}
if not ((ROOT / "algorithms" / "dagger.py").is_file() and (ROOT / "common" / "reporting" / "compounding.py").is_file()):
    FIGURES.pop("compounding")
    GAPS[6] = ("compounding error: BC against DAgger as the horizon grows (the H^2 eps vs H eps bounds)",
               "needs algorithms/dagger.py and common/reporting/compounding.py")


def write_readme(output: Path, numbers: dict) -> None:
    lines = ["# The lecture's claims as figures", "",
             "Generated by `make figures` (`python -m common.figures`); each figure is drawn by one module of "
             "`common/figures/` in under a minute on one CPU core, and every claim below is also a test "
             "(`tests/test_figures.py`). Numbers are from the last run (seeds fixed), CPU seconds as measured "
             "then.", ""]
    entries = sorted([(spec[0], name, spec) for name, spec in FIGURES.items()] +
                     [(k, None, v) for k, v in GAPS.items()], key=lambda e: e[0])
    for number, name, spec in entries:
        if name is None:
            lines += [f"## Figure {number}: not drawn yet", "", f"{spec[0]}: {spec[1]}.", ""]
            continue
        _, module, png, slide, shows, claim = spec
        lines += [f"## Figure {number}: `{png}`", "", f"![figure {number}]({png})", "",
                  f"**Slide:** {slide}.", "", f"**Shows:** {shows}", ""]
        if name in numbers:
            entry = numbers[name]
            lines += [f"**Claim and number:** {claim(entry['numbers'])}", "",
                      f"(`common/figures/{module}.py`, {entry['cpu_seconds']:.0f} s CPU, {entry['wall_seconds']:.0f} s "
                      f"wall when last drawn, at commit {entry.get('commit', 'unrecorded')[:12]}"
                      f"{'-dirty' if entry.get('commit', '').endswith('-dirty') else ''} on "
                      f"{entry.get('date', 'an unrecorded date')}.)", ""]
        else:
            lines += ["(not drawn yet: run `make figures`)", ""]
    atomic_write_text(output / "README.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.figures", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"figures to draw (default: all): {', '.join(FIGURES)}")
    parser.add_argument("--output", default=str(ROOT / "results" / "figures"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in FIGURES]
    if unknown:
        print(f"error: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(1)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    store = output / "numbers.json"
    numbers = json.loads(store.read_text()) if store.is_file() else {}
    commit = git_commit()  # before drawing: the PNGs this run writes are tracked files and would read as "dirty"
    for name in args.names or list(FIGURES):
        number, module, png, *_ = FIGURES[name]
        wall, cpu = time.perf_counter(), time.process_time()
        result = importlib.import_module(f"common.figures.{module}").make(output / png)
        result = json.loads(json.dumps(result, default=float))  # as numbers.json keeps it (string keys)
        numbers[name] = {"numbers": result, "cpu_seconds": time.process_time() - cpu,
                         "wall_seconds": time.perf_counter() - wall, "commit": commit,
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        print(f"figure {number} ({name}): {output / png} in {numbers[name]['cpu_seconds']:.1f} s CPU "
              f"({numbers[name]['wall_seconds']:.1f} s wall)", flush=True)
        print("  " + FIGURES[name][5](result), flush=True)
        atomic_write_text(store, json.dumps(numbers, indent=1, default=float))
    write_readme(output, numbers)
    for number, (what, why) in GAPS.items():
        print(f"figure {number} ({what}) is not drawn: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
