"""Score tables from finished runs: every number says which dataset, seeds, budget and commit made it.

    python -m common.reporting.results                         # all runs under runs/ -> results/scores.md
    python -m common.reporting.results --runs-dir runs --output results/scores.md --title "Pendulum suite"

Reads each run's `summary.json` (written by `Run.finish`), groups runs by (algorithm, dataset, steps) and
reports the mean and standard deviation over seeds of the final normalised score (and raw return), with
the seeds, the evaluation episodes and the commits that produced them. `make scores` runs the algorithms
first and then this.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def collect(runs_dir: Path) -> list[dict]:
    """Every summary.json below `runs_dir`."""
    out = []
    for path in sorted(runs_dir.glob("*/*/*/summary.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            print(f"skipping unreadable {path}", file=sys.stderr)
    return out


def _short(commit: str) -> str:
    """12 hex digits, keeping the `-dirty` mark of a run made from a modified tree."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def table(summaries: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        groups[(s["env"], s["algo"], s["steps"])].append(s)
    lines = ["| dataset | algorithm | steps | seeds | normalised score | return | eval episodes | commit |",
             "|---|---|---|---|---|---|---|---|"]
    for (env, algo, steps), runs in sorted(groups.items()):
        runs.sort(key=lambda s: s["seed"])
        returns = np.array([s["return_mean"] for s in runs])
        scores = [s["normalized_score_mean"] for s in runs]
        spread = lambda values: f" ± {np.std(values):.1f}" if len(values) > 1 else " (one seed)"
        score = ("n/a (no reference scores)" if any(v is None for v in scores)
                 else f"{np.mean(scores):.1f}{spread(scores)}")
        commits = sorted({_short(s.get("git_commit", "unknown")) for s in runs})
        lines.append(f"| {env} | {algo} | {steps} | {', '.join(str(s['seed']) for s in runs)} | {score} | "
                     f"{returns.mean():.1f}{spread(returns)} | {runs[0].get('eval_episodes', '?')} | "
                     f"{', '.join(commits)} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.reporting.results", description=__doc__.split("\n")[0])
    parser.add_argument("--runs-dir", default="runs", help="where the runs are")
    parser.add_argument("--output", default="results/scores.md", help="markdown table to write")
    parser.add_argument("--title", default="Final normalised scores", help="heading of the table")
    parser.add_argument("--command", default=None, help="the command that produced the runs (recorded)")
    args = parser.parse_args(argv)
    summaries = collect(Path(args.runs_dir))
    if not summaries:
        print(f"error: no finished runs (summary.json) under {args.runs_dir}", file=sys.stderr)
        return 2
    lines = [f"# {args.title}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m common.reporting.results "
             f"--runs-dir {args.runs_dir}` from {len(summaries)} runs.",
             *( [f"Runs made by: `{args.command}`"] if args.command else []),
             "Score: final evaluation, mean ± std over seeds of each seed's mean over its evaluation episodes "
             "(one seed: no spread shown); "
             "normalised = 100 * (R - ref_min) / (ref_max - ref_min) with the dataset's reference scores.", "",
             *table(summaries), ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
