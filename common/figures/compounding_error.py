"""Figure 6: compounding error, behaviour cloning against DAgger as the horizon grows (lecture: "What can go
wrong in imitation learning? 1. Compounding errors", "Addressing Compounding Errors with DAgger", Theorems 2.1
and 2.2: C + H^2 eps for BC trained on the expert's states, C + H eps for DAgger).

A reduced run of the library's compounding-error tool (`common/reporting/compounding.py`, which trains
`algorithms/dagger.py` as BC (beta = 1 every round) and as DAgger (beta_i = 1[i = 0]) at equal expert labels on
Pendulum-v1 with a scripted expert): horizons 25 to 200 and two seeds instead of 25 to 400 and three, so that it
draws in about a minute; the full experiment is `python -m common.reporting.compounding` (its table:
results/compounding-error.md). The runs go to a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import tempfile


HORIZONS = (25, 50, 100, 200)
SEEDS = (0, 1)


def run(horizons=HORIZONS, seeds=SEEDS, **overrides) -> tuple:
    """(args, out, fits) of the compounding tool at these horizons and seeds (`overrides`: its other flags)."""
    from common.reporting import compounding

    with tempfile.TemporaryDirectory() as runs_dir:
        argv = ["--horizons", *map(str, horizons), "--seeds", *map(str, seeds), "--runs-dir", runs_dir]
        for key, value in overrides.items():
            argv += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, (list, tuple)) else [str(value)])]
        args = compounding.parse_args(argv)
        with contextlib.redirect_stderr(io.StringIO()):
            out = compounding.experiment(args)
        return args, out, compounding.fit(args, out)


def make(path) -> dict:
    """Draw figure 6 to `path` (PNG); return the numbers behind its claims."""
    from common.reporting import compounding

    args, out, fits = run()
    compounding.figure(args, out, fits, path)
    return {method: {"cost exponent": round(float(f["cost_exponent_means"]), 2),
                     "regret exponent": round(float(f["regret_exponent_means"]), 2),
                     **{f"cost at H={h}": round(float(f["cost"][k].mean()), 2) for k, h in enumerate(args.horizons)}}
            for method, f in fits.items()}
