"""Score tables, learning curves and aggregate statistics from run directories, each naming its provenance.

    python -m common.reporting.results                          # runs/ -> results/scores.md + results/scores/*.png
    python -m common.reporting.results --runs-dir runs --output results/scores-hopper.md \\
        --datasets 'local/hopper-150k/*' --title "Reduced hopper suite"

Reads every run directory `<runs-dir>/<algo>/<dataset>/<seed>-<time>/` (config.json, metrics.jsonl,
summary.json) and writes one markdown file plus its figures in a folder of the same name:

* per dataset and algorithm: the final normalised score (the run's last evaluation, summary.json) and the
  best one (the highest evaluation in metrics.jsonl: optimistic, chosen with the evaluation episodes), mean
  ± std over seeds, the raw return, and beside them the data's own score (the dataset's mean episode
  return, normalised with the same reference scores);
* learning curves per dataset (`curves-<dataset>.png`): eval/normalized_score_mean against the step, mean
  ± std over seeds, the data's score as a dashed line;
* aggregate IQM and mean over datasets with 95% stratified-bootstrap intervals (rliable, percentile method;
  `aggregate.png`) and performance profiles (`profiles.png`);
* a table of the datasets with their checksums (the Minari metadata sha256 of local builds; "no checksum"
  otherwise); every table and figure names its datasets with checksums, seeds, step budget and commit.

Runs are grouped by (dataset, algorithm, step budget, settings): runs that differ in anything but the seed
and where/how they ran are different rows. A seed missing from a row (present in others), an unfinished
run (no summary.json) and a run skipped for corrupt or partial metrics are flagged in the row and never
averaged in; skipped runs are named in a warning. Published numbers (`--published FILE`) appear only in a
separate table labelled as other data.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Runs that differ only in the seed and in where or how they ran (WHERE_FIELDS) belong to one row.
from common.checkpoint import load_checkpoint, renamed_keys  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.reporting.sweep import WHERE_FIELDS  # noqa: E402
NOT_RUN_FOLDERS = {"sweeps", "datasets"}  # under --runs-dir: the sweep tool's and the dataset builder's
SCORE_KEY, RETURN_KEY = "eval/normalized_score_mean", "eval/return_mean"
AGGREGATE_METRICS = ("IQM", "mean")


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunRecord:
    """One run directory as read from disk."""

    path: Path
    algo: str
    env: str
    seed: int
    steps: int  # the step budget (max_steps)
    config: dict
    finished: bool
    last_step: int = 0
    final: float | None = None  # final normalised score (None: no reference scores)
    final_return: float | None = None
    best: float | None = None
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, normalised or return)
    commit: str = "unknown"
    eval_episodes: Any = "?"
    minari_id: str | None = None
    dataset_sha256: str | None = None  # as recorded by the run, when it did
    checkpoint_step: int | None = None  # an unfinished run's last checkpoint (None: none)
    online_steps: int = 0  # env steps of an online phase after the `steps` offline updates (0: none)
    offline_final: float | None = None  # the normalised score at the switch to the online phase
    regret: float | None = None  # the online phase's cumulative regret


class Corrupt(Exception):
    """A run directory that cannot be used: why, in one line."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise Corrupt(f"{path.name} is unreadable ({type(err).__name__})") from None


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise Corrupt("metrics.jsonl is missing")
    entries = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise Corrupt(f"metrics.jsonl line {i} is not JSON") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            raise Corrupt(f"metrics.jsonl line {i} has no integer step")
        entries.append(entry)
    return entries


def read_run(path: Path) -> RunRecord:
    """Read one run directory; `Corrupt` when its files are unreadable or its metrics partial."""
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or not {"env", "seed", "max_steps"} <= config.keys():
        raise Corrupt("config.json lacks env, seed or max_steps")
    config = renamed_keys(config)  # runs made before --discount/--polyak became --gamma/--tau group with later ones
    algo = path.parent.parent.name
    if not (path / "summary.json").is_file():
        steps = []
        if (path / "metrics.jsonl").is_file():  # lenient: a running or killed run may end in a cut line
            for line in (path / "metrics.jsonl").read_text().splitlines():
                try:
                    steps.append(int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    pass
        return RunRecord(path, algo, config["env"], int(config["seed"]), int(config["max_steps"] or 0), config,
                         finished=False, last_step=max(steps, default=0), checkpoint_step=_checkpoint_step(path))
    summary = _read_json(path / "summary.json")
    needed = {"algo", "env", "seed", "steps", "return_mean", "normalized_score_mean"}
    if not isinstance(summary, dict) or not needed <= summary.keys():
        raise Corrupt(f"summary.json lacks {', '.join(sorted(needed - set(summary or {})))}")
    metrics = _read_metrics(path / "metrics.jsonl")
    evals = [e for e in metrics if RETURN_KEY in e]
    steps = int(summary["steps"])
    online_steps = int(summary.get("online_steps") or 0)  # an online phase ends the run at steps + online_steps
    if not any(e["step"] == steps + online_steps for e in evals):
        raise Corrupt(f"metrics.jsonl has no evaluation at the final step {steps + online_steps} (partial metrics)")
    key = SCORE_KEY if summary["normalized_score_mean"] is not None else RETURN_KEY
    if any(key not in e for e in evals):
        raise Corrupt(f"metrics.jsonl has evaluations without {key}")
    curve = sorted({e["step"]: float(e[key]) for e in evals}.items())
    values = [v for _, v in curve]
    if not np.all(np.isfinite(values)):
        raise Corrupt("metrics.jsonl holds a non-finite evaluation")
    final = summary["normalized_score_mean"]
    if final is not None and not np.isfinite(float(final)) or not np.isfinite(float(summary["return_mean"])):
        raise Corrupt("summary.json holds a non-finite final score")
    return RunRecord(path, summary["algo"], summary["env"], int(summary["seed"]), steps, config, finished=True,
                     last_step=steps, final=None if final is None else float(final),
                     final_return=float(summary["return_mean"]),
                     best=None if final is None else max(values), curve=curve,
                     commit=summary.get("git_commit", "unknown"), eval_episodes=summary.get("eval_episodes", "?"),
                     minari_id=summary.get("minari_id"), dataset_sha256=summary.get("dataset_sha256"),
                     online_steps=online_steps, offline_final=summary.get("offline_normalized_score_mean"),
                     regret=summary.get("online_regret"))


def _checkpoint_step(path: Path) -> int | None:
    """The step of a run directory's newest checkpoint, or None (none, or unreadable)."""
    try:
        return int(load_checkpoint(path)["step"])
    except (UserError, KeyError, TypeError, ValueError):
        return None


def run_dirs(runs_dir: Path) -> list[Path]:
    """Every run directory below `runs_dir` (`<algo>/<dataset>/<run>/config.json`), sorted."""
    return sorted(p.parent for p in runs_dir.glob("*/*/*/config.json")
                  if p.parent.parent.parent.name not in NOT_RUN_FOLDERS)


def collect_runs(runs_dirs: list[Path], datasets: list[str] | None = None,
                 algos: list[str] | None = None) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """(readable runs, skipped runs with why), filtered by dataset patterns (fnmatch) and algorithm names."""
    runs, skipped = [], []
    for runs_dir in runs_dirs:
        for path in run_dirs(runs_dir):
            try:
                run = read_run(path)
            except Corrupt as why:
                if algos and path.parent.parent.name not in algos:
                    continue
                skipped.append((path, str(why)))
                print(f"warning: skipping {path}: {why}", file=sys.stderr)
                continue
            if datasets and not any(fnmatch.fnmatch(run.env, p) for p in datasets):
                continue
            if algos and run.algo not in algos:
                continue
            if not is_policy(run.algo):
                continue  # an OPE run carries the score of the run it evaluated: no row of its own
            runs.append(run)
    return runs, skipped


def is_policy(algo: str) -> bool:
    """Whether runs of algorithms/<algo>.py are policies (not a file that defines NOT_A_POLICY, such as ope.py)."""
    from common.checkpoint import import_algorithm

    try:
        return not getattr(import_algorithm(algo), "NOT_A_POLICY", None)
    except UserError:
        return True  # a run of a file this copy lacks: scored as before


def collect(runs_dir: Path) -> list[dict]:
    """Every readable summary.json below `runs_dir` (kept for scripts that read summaries directly)."""
    out = []
    for path in sorted(runs_dir.glob("*/*/*/summary.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            print(f"warning: skipping unreadable {path}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------------------
# Grouping over seeds
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One row: an algorithm on a dataset at one step budget and one set of settings, over seeds."""

    env: str
    algo: str
    steps: int
    variant: str  # "" or the settings that tell this row from another of the same algorithm and dataset
    runs: list[RunRecord]  # finished runs, one per seed, sorted by seed
    unfinished: list[RunRecord]
    missing: list[int]  # seeds present elsewhere in the report but not finished here

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def label(self) -> str:
        return self.algo + (f" ({self.variant})" if self.variant else "")

    def finals(self) -> np.ndarray | None:
        return None if any(r.final is None for r in self.runs) else np.array([r.final for r in self.runs])

    def bests(self) -> np.ndarray | None:
        return None if any(r.best is None for r in self.runs) else np.array([r.best for r in self.runs])


def _signature(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in WHERE_FIELDS | {"seed"}}, sort_keys=True,
                      default=str)


def _variant_labels(signatures: list[str]) -> dict[str, str]:
    """For the settings of one (dataset, algorithm, budget): "" when only one, else the fields that differ."""
    if len(signatures) == 1:
        return {signatures[0]: ""}
    parsed = {s: json.loads(s) for s in signatures}
    keys = sorted({k for p in parsed.values() for k in p if len({json.dumps(q.get(k)) for q in parsed.values()}) > 1})
    return {s: ", ".join(f"{k}={p.get(k)}" for k in keys) for s, p in parsed.items()}


# Fields that say where, how long or how often a run measured, not what it trained: never a row's label.
NOT_SETTINGS = WHERE_FIELDS | {"env", "seed", "max_steps", "eval_every", "eval_episodes", "log_every",
                               "checkpoint_every"}
_DEFAULTS: dict[tuple[str, str], dict | None] = {}


def file_defaults(algo: str, env: str) -> dict | None:
    """The settings `python algorithms/<algo>.py --env <env>` picks today (its Config defaults, then its
    DATASET_SETTINGS row), as JSON values, leaving out those train() fills at run time; None when the file or
    the dataset name cannot be read."""
    if (algo, env) not in _DEFAULTS:
        import contextlib
        import io

        try:
            from common.checkpoint import import_algorithm
            from common.runs import apply_dataset_settings, settings_table

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = import_algorithm(algo)
                config = module.Config(env=env)
                if hasattr(module, "DATASET_SETTINGS"):
                    config = apply_dataset_settings(config, settings_table(module, config), quiet=True)
            values = json.loads(json.dumps(dataclasses.asdict(config), default=str))
            # None, or a file's FROM_DATA sentinel (dt.py: empty targets, scale 0): train() fills it from the data
            from_data = json.loads(json.dumps(getattr(module, "FROM_DATA", {}), default=str))
            _DEFAULTS[(algo, env)] = {k: v for k, v in values.items()
                                      if v is not None and not (k in from_data and v == from_data[k])}
        except (Exception, SystemExit):
            _DEFAULTS[(algo, env)] = None
    return _DEFAULTS[(algo, env)]


def changed_settings(run: RunRecord) -> str | None:
    """The run's settings that differ from what its file would pick for its dataset today (the flags it was
    given, e.g. "warmup_steps=100"): "" when none, None when the file's defaults cannot be read."""
    defaults = file_defaults(run.algo, run.env)
    if defaults is None:
        return None
    config = json.loads(json.dumps(run.config, default=str))
    return ", ".join(f"{k}={config[k]}" for k in sorted(config)
                     if k not in NOT_SETTINGS and k in defaults and config[k] != defaults[k])


def group_runs(runs: list[RunRecord]) -> list[Group]:
    """Rows over seeds; when one seed has several finished runs in a row, the newest counts (flagged)."""
    by_row: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_row[(r.env, r.algo, r.steps, _signature(r.config))].append(r)
    labels: dict[tuple, dict[str, str]] = defaultdict(dict)
    for env, algo, steps, sig in by_row:
        labels[(env, algo, steps)][sig] = ""
    for k, sigs in labels.items():
        labels[k] = _variant_labels(sorted(sigs))
    expected = sorted({r.seed for r in runs})
    groups = []
    for (env, algo, steps, sig), members in sorted(by_row.items(), key=lambda kv: kv[0][:3] + (kv[0][3],)):
        finished: dict[int, RunRecord] = {}
        for r in sorted((m for m in members if m.finished), key=lambda m: m.path.name):
            finished[r.seed] = r  # run folder names end in their start time: the newest wins
        unfinished = sorted((m for m in members if not m.finished and m.seed not in finished), key=lambda m: m.seed)
        missing = [s for s in expected if s not in finished and s not in {u.seed for u in unfinished}]
        changed = changed_settings(members[0])  # one signature: the same settings in every member
        groups.append(Group(env, algo, steps, labels[(env, algo, steps)][sig] if changed is None else changed,
                            [finished[s] for s in sorted(finished)], unfinished, missing))
    return groups


def _progress(r: RunRecord) -> str:
    """How far an unfinished run got: its last logged step and its last checkpoint, of its budget."""
    logged = f"logged to step {r.last_step}" if r.last_step else "nothing logged"
    saved = f"checkpoint at step {r.checkpoint_step}" if r.checkpoint_step is not None else "no checkpoint"
    return f"{logged}, {saved}, of {r.steps} steps"


def flags_of(group: Group) -> str:
    parts = [f"seed {r.seed} unfinished ({_progress(r)})" for r in group.unfinished]
    parts += [f"seed {s} missing" for s in group.missing]
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Datasets: checksum and the data's own score
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetInfo:
    name: str
    minari_id: str | None
    sha256: str | None  # None: "no checksum"
    episodes: int | None = None
    steps: int | None = None
    data_return: float | None = None
    data_score: float | None = None
    note: str = ""


def dataset_info(name: str) -> DatasetInfo:
    """Checksum and the data's own score (mean episode return, normalised) of a dataset stored locally."""
    from common.datasets import load_dataset, local_dataset_ids, minari_root, resolve_name
    from common.errors import UserError

    try:
        minari_id = resolve_name(name).minari_id
    except UserError:
        return DatasetInfo(name, None, None, note="name not known here")
    if minari_id not in local_dataset_ids():
        return DatasetInfo(name, minari_id, None, note=f"not stored under {minari_root()}")
    try:
        metadata = json.loads((minari_root() / minari_id / "data" / "metadata.json").read_text())
    except (OSError, ValueError):
        metadata = {}
    try:
        dataset = load_dataset(name, download=False)
    except UserError as err:
        return DatasetInfo(name, minari_id, metadata.get("sha256"), note=f"unreadable: {err}")
    returns = np.array([e.total_return for e in dataset.episodes])
    score = dataset.normalized_score(returns.mean())
    return DatasetInfo(name, minari_id, metadata.get("sha256"), len(returns), dataset.num_steps,
                       float(returns.mean()), None if score is None else float(score))


def _short(commit: str) -> str:
    """12 hex digits, keeping the `-dirty` mark of a run made from a modified tree."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def _checksum(info: DatasetInfo, full: bool = False) -> str:
    if not info.sha256:
        return "no checksum"
    return f"sha256 {info.sha256 if full else info.sha256[:12]}"


def provenance(groups: list[Group], infos: dict[str, DatasetInfo]) -> str:
    """One line naming the datasets (with checksums), seeds, step budgets and commits behind `groups`."""
    envs = sorted({g.env for g in groups})
    seeds = sorted({s for g in groups for s in g.seeds})
    steps = sorted({g.steps for g in groups})
    commits = sorted({_short(r.commit) for g in groups for r in g.runs})
    return (f"Datasets: {'; '.join(f'{e} ({_checksum(infos[e])})' for e in envs)}. Seeds: "
            f"{', '.join(map(str, seeds)) or 'none'}. Steps: {', '.join(map(str, steps))}. "
            f"Commit: {', '.join(commits) or 'unknown'}.")


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _mean_std(values: np.ndarray | None, digits: int = 1) -> str:
    if values is None:
        return "n/a (no reference scores)"
    if len(values) == 0:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (one seed)"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def scores_table(groups: list[Group], infos: dict[str, DatasetInfo]) -> list[str]:
    lines = ["| dataset | algorithm | steps | seeds | final normalised score | best normalised score | data's score | "
             "return | eval episodes | flags | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        info = infos[g.env]
        data = "n/a" if info.data_score is None else f"{info.data_score:.1f}"
        returns = np.array([r.final_return for r in g.runs])
        commits = sorted({_short(r.commit) for r in g.runs})
        lines.append(f"| {g.env} | {g.label} | {g.steps} | {', '.join(map(str, g.seeds)) or 'none finished'} | "
                     f"{_mean_std(g.finals()) if g.runs else '-'} | {_mean_std(g.bests()) if g.runs else '-'} | "
                     f"{data} | {_mean_std(returns) if g.runs else '-'} | "
                     f"{g.runs[0].eval_episodes if g.runs else '-'} | {flags_of(g) or '-'} | "
                     f"{', '.join(commits) or '-'} |")
    return lines


def datasets_table(infos: dict[str, DatasetInfo], runs: list[RunRecord]) -> list[str]:
    lines = ["| dataset | Minari id | checksum | episodes | transitions | data's return | data's normalised score |",
             "|---|---|---|---|---|---|---|"]
    for name, info in sorted(infos.items()):
        recorded = {r.dataset_sha256 for r in runs if r.env == name and r.dataset_sha256}
        changed = " (differs from the one some runs recorded)" if recorded - {info.sha256} else ""
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {name} | {info.minari_id or '-'} | {_checksum(info, full=True)}{changed} | "
                     f"{fmt(info.episodes, 'd')} | {fmt(info.steps, 'd')} | {fmt(info.data_return, '.1f')} | "
                     f"{fmt(info.data_score, '.1f')}{' (' + info.note + ')' if info.note else ''} |")
    return lines


# --------------------------------------------------------------------------------------------------
# Aggregate statistics (rliable)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Aggregate:
    """Scores arranged for rliable: {row label: (runs, datasets)} over the datasets every label covers."""

    datasets: list[str]
    scores: dict[str, np.ndarray]
    seeds: dict[str, list[int]]
    notes: list[str]
    point: dict[str, np.ndarray] | None = None  # IQM, mean
    interval: dict[str, np.ndarray] | None = None  # (2, 2): lower/upper x IQM/mean


def aggregate_scores(groups: list[Group]) -> Aggregate | None:
    """The final normalised scores over the datasets that every algorithm (and settings) has finished runs on.

    Per algorithm, only the seeds finished on all of those datasets enter (rliable needs runs x datasets);
    the rest are named in `notes`. With several step budgets on one dataset the largest counts. None when
    fewer than one dataset qualifies.
    """
    notes: list[str] = []
    cells: dict[str, dict[str, Group]] = defaultdict(dict)  # label -> env -> group
    for g in groups:
        if not g.runs or g.finals() is None:
            continue
        previous = cells[g.label].get(g.env)
        if previous is not None:
            notes.append(f"{g.label} on {g.env}: several step budgets; the aggregate uses "
                         f"{max(previous.steps, g.steps)}")
            if previous.steps >= g.steps:
                continue
        cells[g.label][g.env] = g
    if not cells:
        return None
    all_envs = sorted({g.env for g in groups})
    envs = [e for e in all_envs if all(e in by_env for by_env in cells.values())]
    for e in all_envs:
        if e not in envs:
            lacking = sorted(label for label, by_env in cells.items() if e not in by_env)
            notes.append(f"{e} left out: no finished runs with normalised scores for {', '.join(lacking)}")
    if not envs:
        return None
    scores, seeds = {}, {}
    for label, by_env in sorted(cells.items()):
        common = sorted(set.intersection(*(set(by_env[e].seeds) for e in envs)))
        dropped = sorted({s for e in envs for s in by_env[e].seeds} - set(common))
        if dropped:
            notes.append(f"{label}: seeds {', '.join(map(str, dropped))} left out (not finished on every dataset)")
        if not common:
            notes.append(f"{label} left out: no seed finished on every dataset")
            continue
        scores[label] = np.array([[next(r.final for r in by_env[e].runs if r.seed == s) for e in envs]
                                  for s in common])
        seeds[label] = common
    return Aggregate(envs, scores, seeds, notes) if scores else None


def aggregate_metrics(x: np.ndarray) -> np.ndarray:
    """IQM and mean of a (runs, datasets) array: rliable's aggregate_iqm (scipy trim_mean 25%) and mean."""
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])


def bootstrap(agg: Aggregate, reps: int, seed: int) -> None:
    """Point estimates and 95% stratified-bootstrap percentile intervals (rliable) into `agg`."""
    from rliable import library as rly

    with warnings.catch_warnings():  # arch deprecates the RandomState that rliable hands it
        warnings.simplefilter("ignore", FutureWarning)
        agg.point, agg.interval = rly.get_interval_estimates(
            agg.scores, aggregate_metrics, method="percentile", reps=reps, confidence_interval_size=0.95,
            random_state=np.random.RandomState(seed))


def aggregate_table(agg: Aggregate) -> list[str]:
    lines = ["| algorithm | seeds x datasets | IQM [95% CI] | mean [95% CI] |", "|---|---|---|---|"]
    for label, x in agg.scores.items():
        cells = [f"{agg.point[label][i]:.1f} [{agg.interval[label][0, i]:.1f}, {agg.interval[label][1, i]:.1f}]"
                 for i in range(len(AGGREGATE_METRICS))]
        lines.append(f"| {label} | {x.shape[0]} x {x.shape[1]} | {' | '.join(cells)} |")
    return lines


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curve_of(group: Group) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(steps, mean, std over seeds) of the evaluations at the steps every seed of `group` evaluated."""
    steps = sorted(set.intersection(*(set(s for s, _ in r.curve) for r in group.runs)))
    values = np.array([[dict(r.curve)[s] for s in steps] for r in group.runs])
    return steps, values.mean(axis=0), values.std(axis=0)


# Every figure draws an algorithm in the same colour, and rows in the same order: the algorithm files sorted
ALGORITHM_FILES = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))


def algorithm_colour(label: str):
    """The colour of a row's algorithm (its label's first word: 'dt (warmup_steps=100)' -> dt), the same in
    every figure: its place among the algorithm files in matplotlib's 20-colour qualitative maps."""
    import matplotlib

    algo = label.split(" ")[0]
    index = ALGORITHM_FILES.index(algo) if algo in ALGORITHM_FILES else len(ALGORITHM_FILES)
    if index < 20:  # tab20's strong colours for the first ten files, its light ones for the next ten
        return matplotlib.colormaps["tab20"].colors[(2 * index) % 20 + index // 10]
    return matplotlib.colormaps["tab20b"].colors[index % 20]


def ordered(labels) -> list[str]:
    """Rows in the order of every figure and table: by algorithm file, then label."""
    rank = {a: i for i, a in enumerate(ALGORITHM_FILES)}
    return sorted(labels, key=lambda label: (rank.get(label.split(" ")[0], len(rank)), label))


def _save(fig, path: Path, caption: str) -> None:
    """Save with the caption under the axes, every label inside the canvas, no empty margins."""
    import textwrap

    fig.text(0.0, -0.02, "\n".join(textwrap.wrap(caption, 130)), fontsize=6.5, va="top", ha="left",
             color="0.3", transform=fig.transFigure)
    fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.15)


def curve_figure(env: str, groups: list[Group], info: DatasetInfo, path: Path, caption: str) -> None:
    """eval/normalized_score_mean against the step for each row on `env`: mean ± std over its seeds."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    order = ordered([g.label for g in groups])
    for g in sorted(groups, key=lambda g: order.index(g.label)):
        if not g.runs or g.finals() is None:
            continue
        steps, mean, std = curve_of(g)
        colour = algorithm_colour(g.label)
        ax.plot(steps, mean, marker="o" if len(steps) < 3 else None, ms=4, color=colour,
                label=f"{g.label}, {g.steps} steps ({len(g.runs)} seeds)")
        ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.2)
    if info.data_score is not None:
        ax.axhline(info.data_score, color="0.4", ls="--", lw=1, label=f"the data ({info.data_score:.1f})")
    ax.set_xlabel("gradient step")
    ax.set_ylabel("normalised score (mean ± std over seeds)")
    ax.set_title(f"{env}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, path, caption)
    plt.close(fig)


def finetune_table(groups: list[Group]) -> list[str]:
    """Offline score at the switch -> score after the online phase, per row (mean ± std over seeds)."""
    out = ["| dataset | algorithm | offline steps | online env steps | seeds | at the switch | after online | "
           "change | regret |", "|---|---|---|---|---|---|---|---|---|"]
    for g in sorted(groups, key=lambda g: (g.env, ordered([x.label for x in groups]).index(g.label))):
        switch = np.array([r.offline_final if r.offline_final is not None else np.nan for r in g.runs])
        final = g.finals()
        regret = np.array([r.regret if r.regret is not None else np.nan for r in g.runs])
        change = None if final is None else final - switch
        out.append(f"| {g.env} | {g.label} | {g.steps} | {g.runs[0].online_steps} | "
                   f"{', '.join(map(str, g.seeds))} | {_mean_std(switch)} | {_mean_std(final)} | "
                   f"{_mean_std(change)} | {_mean_std(regret, 2)} |")
    return out


def finetune_figure(env: str, groups: list[Group], info: DatasetInfo, path: Path, caption: str) -> None:
    """The normalised score against the step through both phases (mean ± std over seeds), the switch marked."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    order = ordered([g.label for g in groups])
    for g in sorted(groups, key=lambda g: order.index(g.label)):
        if g.finals() is None:
            continue
        steps, mean, std = curve_of(g)
        colour = algorithm_colour(g.label)
        ax.plot(steps, mean, color=colour, marker="o" if len(steps) < 4 else None, ms=3,
                label=f"{g.label}: {g.steps} offline + {g.runs[0].online_steps} online ({len(g.runs)} seeds)")
        ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.15)
        ax.axvline(g.steps, color=colour, ls=":", lw=1)
    if info.data_score is not None:
        ax.axhline(info.data_score, color="0.4", ls="--", lw=1, label=f"the data ({info.data_score:.1f})")
    ax.set_xlabel("step (offline updates, then one update per online env step; dotted: the switch)")
    ax.set_ylabel("normalised score (mean ± std over seeds)")
    ax.set_title(env, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, path, caption)
    plt.close(fig)


def interval_figure(agg: Aggregate):
    """IQM and mean of each row with its interval, one panel per statistic, one line per row: a figure sized to
    its rows (returned for the layout test)."""
    plt = _pyplot()

    labels = ordered(agg.scores)[::-1]  # the first algorithm at the top
    height = 0.9 + 0.28 * len(labels)
    fig, axes = plt.subplots(1, len(AGGREGATE_METRICS), figsize=(7.5, height), sharey=True, layout="constrained")
    for m, (ax, metric) in enumerate(zip(axes, AGGREGATE_METRICS)):
        for y, label in enumerate(labels):
            low, high = agg.interval[label][:, m]
            colour = algorithm_colour(label)
            ax.barh(y, high - low, left=low, height=0.6, color=colour, alpha=0.75)
            ax.plot([agg.point[label][m]] * 2, [y - 0.3, y + 0.3], color="k", lw=1.5)
        ax.set_title(metric, fontsize=10)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.supxlabel("normalised score (final evaluation), 95% stratified-bootstrap interval", fontsize=8)
    return fig


def aggregate_figures(agg: Aggregate, folder: Path, caption: str, reps: int, seed: int) -> list[str]:
    """`aggregate.png` (IQM and mean with intervals) and `profiles.png` (performance profiles)."""
    plt = _pyplot()
    from rliable import library as rly, plot_utils

    fig = interval_figure(agg)
    _save(fig, folder / "aggregate.png", caption)
    plt.close(fig)

    everything = np.concatenate([x.ravel() for x in agg.scores.values()])
    tau = np.linspace(min(0.0, everything.min()), max(100.0, everything.max()), 101)
    np.random.seed(seed)  # create_performance_profile takes no random state; its bootstrap uses numpy's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        profiles, cis = rly.create_performance_profile(agg.scores, tau, method="percentile", reps=min(reps, 2000))
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    labels = ordered(agg.scores)
    plot_utils.plot_performance_profiles({k: profiles[k] for k in labels}, tau, performance_profile_cis=cis, ax=ax,
                                         colors={k: algorithm_colour(k) for k in labels},
                                         xlabel=r"normalised score $\tau$",
                                         ylabel=r"fraction of runs with score $> \tau$")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, folder / "profiles.png", caption)
    plt.close(fig)
    return ["aggregate.png", "profiles.png"]


# --------------------------------------------------------------------------------------------------
# Provenance of sweeps and other data
# --------------------------------------------------------------------------------------------------


def sweeps_behind(runs_dirs: list[Path], runs: list[RunRecord]) -> list[str]:
    """The sweeps (`<runs-dir>/sweeps/<name>/manifest.json`) that made some of `runs`, with their flags."""
    paths = {str(r.path.resolve()) for r in runs}
    out = []
    for runs_dir in runs_dirs:
        for manifest in sorted(runs_dir.glob("sweeps/*/manifest.json")):
            try:
                trials = json.loads(manifest.read_text())["trials"].values()
            except (OSError, ValueError, KeyError, AttributeError):
                continue
            used = [t for t in trials if t.get("run_dir") and str(Path(t["run_dir"]).resolve()) in paths]
            if used:
                flags = sorted({" ".join(t.get("flags", [])) for t in used})
                out.append(f"sweep '{manifest.parent.name}' ({len(used)} runs; flags: "
                           f"{' | '.join(f or '(none)' for f in flags)})")
    return out


def published_table(path: Path) -> list[str]:
    """Published numbers, labelled as other data: a JSON list of {dataset, algorithm, score, source}."""
    from common.errors import fail

    try:
        rows = json.loads(path.read_text())
        assert isinstance(rows, list) and all({"dataset", "algorithm", "score", "source"} <= r.keys() for r in rows)
    except (OSError, ValueError, AssertionError, AttributeError):
        fail(f"--published {path}: expected a JSON list of objects with dataset, algorithm, score and source")
    lines = ["| dataset (theirs) | algorithm | published normalised score | source |", "|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['algorithm']} | {r['score']} | {r['source']} |" for r in rows]
    return lines


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def report(args: argparse.Namespace) -> int:
    from common.errors import fail

    runs_dirs = [Path(d) for d in args.runs_dir]
    runs, skipped = collect_runs(runs_dirs, args.datasets, args.algos)
    if not any(r.finished for r in runs):
        where = ", ".join(args.runs_dir) + (f" matching {' '.join(args.datasets)}" if args.datasets else "")
        if args.skip_empty:
            print(f"no finished runs under {where}: {args.output} left as it is", file=sys.stderr)
            return 0
        fail(f"no finished runs (summary.json) under {where}")
    groups = group_runs(runs)
    infos = {env: dataset_info(env) for env in sorted({g.env for g in groups})}
    output = Path(args.output)
    figures = output.with_suffix("")  # results/scores.md -> results/scores/
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):
        stale.unlink()
    finished = [r for r in runs if r.finished]
    sweeps = sweeps_behind(runs_dirs, finished)
    commits = sorted({_short(r.commit) for r in finished})
    lines = [f"# {args.title}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m common.reporting.results "
             f"--runs-dir {' '.join(args.runs_dir)}"
             f"{' --datasets ' + ' '.join(args.datasets) if args.datasets else ''}"
             f"{' --algos ' + ' '.join(args.algos) if args.algos else ''}` from {len(finished)} finished runs "
             f"({len(runs) - len(finished)} unfinished, {len(skipped)} skipped), made at commit "
             f"{', '.join(commits)}.",
             *([f"Runs made by: `{args.command}`."] if args.command else []),
             *([f"Sweeps: {'; '.join(sweeps)}."] if sweeps else []), "",
             "## Datasets", "",
             "The data's score is the dataset's mean episode return, normalised with the reference scores the "
             "runs use: 100 * (R - ref_min) / (ref_max - ref_min). Checksums: the sha256 the local builder "
             "records in the Minari metadata.", "",
             *datasets_table(infos, finished), "",
             "## Scores", "",
             "Final: the run's last evaluation (summary.json); best: the highest evaluation in its metrics.jsonl "
             "(optimistic: chosen with the evaluation episodes themselves). Each is the mean over the seeds "
             "listed ± the standard deviation over them (ddof 0) of each seed's mean over its evaluation "
             "episodes. Flagged seeds (missing, unfinished, or skipped for corrupt metrics) are not averaged in. "
             "In parentheses after an algorithm: the settings its runs used that differ from what the file picks "
             "for that dataset at the current commit (the flags they were given; the step budget, evaluation "
             "cadence and where they ran are columns or left out).",
             "", *scores_table(groups, infos), "", provenance(groups, infos), ""]
    if skipped:
        lines += ["Skipped (corrupt or partial metrics, not averaged in): "
                  + "; ".join(f"`{p}` ({why})" for p, why in skipped) + ".", ""]

    agg = aggregate_scores(groups)
    lines += ["## Aggregate over datasets", ""]
    if agg is None:
        lines += ["No dataset has finished runs with normalised scores from every algorithm: no aggregate.", ""]
    else:
        bootstrap(agg, args.reps, args.bootstrap_seed)
        in_agg = [g for g in groups if g.env in agg.datasets and g.label in agg.scores]
        caption = provenance(in_agg, infos)
        lines += [f"IQM (mean of the middle 50% of all runs x datasets, rliable's aggregate_iqm) and mean of the "
                  f"final normalised scores over {len(agg.datasets)} datasets, with 95% stratified-bootstrap "
                  f"intervals (rliable, percentile method, {args.reps} resamples of the seeds within each dataset, "
                  f"seed {args.bootstrap_seed}). Seeds per algorithm: "
                  f"{'; '.join(k + ': ' + ', '.join(map(str, v)) for k, v in agg.seeds.items())}.", "",
                  *aggregate_table(agg), "", caption, "",
                  *([f"Not in the aggregate: {'; '.join(agg.notes)}.", ""] if agg.notes else [])]
        if not args.no_figures:
            names = aggregate_figures(agg, figures, caption, args.reps, args.bootstrap_seed)
            lines += [f"![IQM and mean with 95% intervals]({figures.name}/{names[0]})", "",
                      f"![performance profiles: fraction of runs above each score]({figures.name}/{names[1]})", ""]

    lines += ["## Learning curves", ""]
    if args.no_figures:
        lines += ["(not drawn: --no-figures)", ""]
    for env in sorted(infos):
        on_env = [g for g in groups if g.env == env]
        if args.no_figures or not any(g.runs and g.finals() is not None for g in on_env):
            continue
        name = f"curves-{env.replace('/', '-')}.png"
        curve_figure(env, on_env, infos[env], figures / name, provenance(on_env, infos))
        lines += [f"![{env}: normalised score against steps, mean ± std over seeds]({figures.name}/{name})", ""]

    tuned = [g for g in groups if g.runs and g.runs[0].online_steps]
    if tuned:
        lines += ["## Offline to online fine-tuning", "",
                  "Rows whose runs continued with an online phase (`--online-steps`): the normalised score at the "
                  "switch (the last offline evaluation), after the online env steps, their difference and the "
                  "cumulative regret of the online episodes (1 - success, or 1 - normalised return / 100 where the "
                  "env reports no success), each the mean ± std over the seeds listed.", "",
                  *finetune_table(tuned), ""]
        if not args.no_figures:
            for env in sorted({g.env for g in tuned}):
                on_env = [g for g in tuned if g.env == env]
                name = f"finetune-{env.replace('/', '-')}.png"
                finetune_figure(env, on_env, infos[env], figures / name, provenance(on_env, infos))
                lines += [f"![{env}: normalised score against steps across the switch to the online phase]"
                          f"({figures.name}/{name})", ""]

    if args.published:
        lines += ["## Other data: published numbers", "",
                  "Reported by the papers on their own datasets, environment versions and budgets: other data, "
                  "not comparable with the rows above.", "", *published_table(Path(args.published)), ""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {output} and {len(list(figures.glob('*.png')))} figures in {figures}/", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from common.errors import EXIT_USER_ERROR, UserError

    parser = argparse.ArgumentParser(prog="python -m common.reporting.results", description=__doc__.split("\n")[0])
    parser.add_argument("--runs-dir", nargs="+", default=["runs"], help="where the runs are (one or more folders)")
    parser.add_argument("--output", default="results/scores.md",
                        help="markdown file to write; figures go to the folder of the same name (results/scores/)")
    parser.add_argument("--title", default="Normalised scores", help="heading of the page")
    parser.add_argument("--command", default=None, help="the command that made the runs (recorded)")
    parser.add_argument("--datasets", nargs="+", default=None, help="only datasets matching these patterns "
                        "(fnmatch, e.g. 'local/pendulum/*')")
    parser.add_argument("--algos", nargs="+", default=None, help="only these algorithms")
    parser.add_argument("--published", default=None, help="JSON list of {dataset, algorithm, score, source}: "
                        "shown apart, labelled as other data")
    parser.add_argument("--reps", type=int, default=10_000, help="bootstrap resamples (rliable; default 10000: "
                        "IQM costs about 0.4 ms a resample and algorithm on one core)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap (reproducible intervals)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--skip-empty", action="store_true", help="no finished run matches: leave --output as it "
                        "is and exit 0 (make results over suites not run yet)")
    args = parser.parse_args(argv)
    try:
        return report(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
