"""python -m common.reporting.crosscheck: compare, print, and write each compared file's row to the table.

    python -m common.reporting.crosscheck --reference ~/src/CORL --algos td3_bc iql
    python -m common.reporting.crosscheck --reference ~/src/CORL --jax-python ~/jax/bin/python --algos rebrac
    python -m common.reporting.crosscheck --d3rlpy-python ~/d3/bin/python --algos crr

A missing checkout, file or interpreter is one line and exit status 2, before anything runs or is written.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from common.errors import UserError, fail  # noqa: E402
from common.reporting.crosscheck import corl, corl_jax, d3rlpy_crr, reference, table  # noqa: E402
from common.reporting.crosscheck.matching import Context, Outcome  # noqa: E402
from common.runs import git_commit  # noqa: E402

# --algos name -> (family, reference file, comparison); the table's rows come in this order
FAMILIES = {"corl": corl.COMPARISONS, "corl-jax": corl_jax.COMPARISONS, "d3rlpy": d3rlpy_crr.COMPARISONS}
COMPARISONS = {name: (family, relpath, run) for family, entries in FAMILIES.items()
               for name, (relpath, run) in entries.items()}
ORDER = ["td3_bc", "iql", "cql", "awac", "bc", "dt", "cal_ql", "spot", "sac_n", "edac", "lb_sac", "rebrac", "crr"]
ROW_FILES = {  # --algos name -> the table row's file cell (the key a rerun replaces)
    **{name: f"algorithms/{name}.py" for name in ORDER},
    "sac_n": "algorithms/sac_n.py --variant sac-n", "edac": "algorithms/sac_n.py --variant edac",
    "lb_sac": "algorithms/sac_n.py --variant lb-sac"}
# what each family's interpreter must import
NEEDS = {"corl-jax": ("--jax-python", "jax, flax, optax, chex", "import jax, flax, optax, chex"),
         "d3rlpy": ("--d3rlpy-python", "d3rlpy", "import d3rlpy")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m common.reporting.crosscheck",
                                     description="One update of each algorithm file against its reference "
                                                 "implementation, on the same weights, batch and random draws.")
    parser.add_argument("--reference", type=Path, default=None,
                        help="a checkout of github.com/corl-team/CORL (or a bare git mirror of one): its files are "
                             "imported from there (every comparison but crr)")
    parser.add_argument("--jax-python", default=None,
                        help="a Python with jax, flax, optax and chex, for CORL's ReBRAC (rebrac)")
    parser.add_argument("--d3rlpy-python", default=None, help="a Python with d3rlpy installed, for CRR (crr)")
    parser.add_argument("--d3rlpy-checkout", type=Path, default=None,
                        help="a d3rlpy checkout put first on that Python's path (default: its installed package)")
    parser.add_argument("--algos", nargs="+", default=["all"], metavar="NAME",
                        help=f"which comparisons: {' '.join(ORDER)}, or all (default)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="both sides' precision (default float64: differences are then the algorithm's, "
                             "not rounding's)")
    parser.add_argument("--output", type=Path, default=Path("results/crosscheck.md"),
                        help="the table (default results/crosscheck.md; other rows are kept)")
    return parser.parse_args(argv)


def check_interpreter(flag: str, python: str | None, what: str, probe: str, algo: str) -> None:
    if not python:
        fail(f"{algo} runs its reference in another Python: pass {flag} /path/to/python (one with {what})")
    if shutil.which(python) is None:
        fail(f"{flag} {python}: no such interpreter")
    probe_env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if subprocess.run([python, "-c", probe], capture_output=True, env=probe_env).returncode:
        fail(f"{flag} {python}: cannot `{probe}` there (needs {what})")


def check(args: argparse.Namespace) -> list[str]:
    """The comparisons asked for, after checking that every reference they need is there (UserError if not)."""
    algos = ORDER if args.algos == ["all"] else args.algos
    unknown = [a for a in algos if a not in COMPARISONS]
    if unknown:
        fail(f"unknown comparison {' '.join(unknown)} (known: {' '.join(ORDER)}, or all)")
    for algo in algos:
        family, relpath, _ = COMPARISONS[algo]
        if family.startswith("corl"):
            if args.reference is None:
                fail(f"{algo} compares against CORL: pass --reference /path/to/CORL (a checkout of "
                     f"github.com/corl-team/CORL)")
            if not args.reference.is_dir():
                fail(f"--reference {args.reference}: no such directory (expected a CORL checkout)")
            if not reference.has_file(args.reference, relpath):
                fail(f"--reference {args.reference}: no {relpath} there (is it a CORL checkout?)")
        if family in NEEDS:
            flag, what, probe = NEEDS[family]
            check_interpreter(flag, getattr(args, flag[2:].replace("-", "_")), what, probe, algo)
    if args.d3rlpy_checkout is not None and not (args.d3rlpy_checkout / d3rlpy_crr.IMPL).is_file():
        fail(f"--d3rlpy-checkout {args.d3rlpy_checkout}: no {d3rlpy_crr.IMPL} there")
    return list(algos)


def row(algo: str, result: Outcome, dtype: str, date: str, commit: str) -> list[str]:
    return [result.file, result.reference, f"{result.loss_diff:.1e}", f"{result.param_diff:.1e}", dtype,
            result.notes, f"`--algos {algo}`, {date}, {commit}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m common.reporting.crosscheck " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        algos = check(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    ctx = Context(corl=args.reference, jax_python=args.jax_python, d3rlpy_python=args.d3rlpy_python,
                  d3rlpy_checkout=args.d3rlpy_checkout, dtype=getattr(torch, args.dtype))
    head, _, dirty = git_commit().partition("-")
    date, commit = datetime.date.today().isoformat(), head[:12] + (f"-{dirty}" if dirty else "")
    rows, failed = [], []
    for algo in algos:
        start = time.perf_counter()
        try:
            result = COMPARISONS[algo][2](ctx)
        except Exception as err:  # one comparison's failure (a reference that changed its API) spares the others
            print(f"error: {algo}: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append(algo)
            continue
        assert result.file == ROW_FILES[algo], (result.file, ROW_FILES[algo])
        print(f"{result.file} vs {result.reference}: losses {result.loss_diff:.1e}, parameters "
              f"{result.param_diff:.1e} ({time.perf_counter() - start:.0f} s)")
        for line in result.details:
            print(f"    {line}")
        rows.append(row(algo, result, args.dtype, date, commit))
    if rows:
        table.update_table(args.output, rows, command, date, commit, order=[ROW_FILES[a] for a in ORDER])
        print(f"wrote {len(rows)} row(s) to {args.output}")
    if failed:
        print(f"error: not compared: {' '.join(failed)} (their rows are left as they were)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
