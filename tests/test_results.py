"""Score tables, curves and aggregates from hand-made run directories whose numbers are known by hand.

Two datasets: A is stored in the test Minari root (two episodes of returns -3 and -6, reference scores -10
and 0: the data scores 55.0; a recorded sha256), B is not stored (no checksum, no data score).

    final normalised scores      seed 0   seed 1   seed 2
    iql on A                     60       70       80      (evaluations at 500: 65, 50, 90)
    bc  on A                     40       50       unfinished at step 500 of 1000
    iql on B                     20       missing  30
    bc  on B                     10       20       60      (plus a corrupt run and a partial one, skipped)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.datasets import save_episodes
from common.reporting import results
from common.reporting.results import main

A, B = "test/results/a-v0", "local/none/b-v0"
SHA = "ab" * 32


@pytest.fixture(scope="module")
def dataset_a(minari_root) -> str:
    episodes = []
    for reward in (-1.0, -2.0):
        episodes.append({"observations": np.zeros((4, 3), np.float32), "actions": np.zeros((3, 1), np.float32),
                         "rewards": np.full(3, reward), "terminations": np.zeros(3, bool),
                         "truncations": np.array([False, False, True])})
    if not (minari_root / A).exists():
        save_episodes(A, episodes, "Pendulum-v1", ref_min_score=-10.0, ref_max_score=0.0,
                      algorithm_name="hand-made", extra_metadata={"sha256": SHA})
    return A


def write_run(root: Path, algo: str, env: str, seed: int, final: float | None, evals: dict[int, float] | None = None,
              steps: int = 1000, commit: str = "abc123def4567", stamp: str = "20261124-000000",
              finished: bool = True, **config) -> Path:
    """A run directory as `common.runs.Run` writes it: config.json, metrics.jsonl and (finished) summary.json."""
    run = root / algo / env.replace("/", "-") / f"{seed}-{stamp}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"env": env, "seed": seed, "max_steps": steps, "threads": 1,
                                                 "runs_dir": str(root), "device": "cpu", **config}))
    evals = {**(evals or {}), **({steps: final} if finished else {})}
    lines = []
    for step in range(500, steps + 1, 500):
        if not finished and step > 500:
            break
        lines.append({"step": step, "train/loss": 1.0, "perf/steps_per_sec": 100.0})
        if step in evals:
            score = evals[step]
            lines.append({"step": step, "eval/return_mean": -100.0 + (score or 0.0), "eval/return_std": 1.0,
                          **({} if score is None else {"eval/normalized_score_mean": score})})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (run / "summary.json").write_text(json.dumps({
            "algo": algo, "env": env, "seed": seed, "steps": steps, "return_mean": -100.0 + (final or 0.0),
            "normalized_score_mean": final, "eval_episodes": 10, "git_commit": commit, "minari_id": env}))
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory, dataset_a):
    root = tmp_path_factory.mktemp("results")
    runs = root / "runs"
    for seed, final, mid in ((0, 60.0, 65.0), (1, 70.0, 50.0), (2, 80.0, 90.0)):
        # seed 2 was made before --discount became --gamma: one row all the same
        write_run(runs, "iql", A, seed, final, {500: mid}, **({"discount": 0.99} if seed == 2 else {"gamma": 0.99}))
    write_run(runs, "bc", A, 0, 40.0)
    write_run(runs, "bc", A, 1, 50.0)
    write_run(runs, "bc", A, 2, None, finished=False)
    write_run(runs, "iql", B, 0, 20.0)
    write_run(runs, "ope", B, 0, 99.0)  # an OPE run repeats the evaluated policy's score: never a row
    nan_final = write_run(runs, "iql", B, 1, 20.0)  # its summary's final score NaN: skipped, never averaged in
    summary = json.loads((nan_final / "summary.json").read_text())
    (nan_final / "summary.json").write_text(json.dumps({**summary, "normalized_score_mean": float("nan")}))
    write_run(runs, "iql", B, 2, 30.0)
    for seed, final in ((0, 10.0), (1, 20.0), (2, 60.0)):
        write_run(runs, "bc", B, seed, final)
    corrupt = write_run(runs, "bc", B, 1, 999.0, stamp="20261123-000000")  # older: would lose anyway, but
    with open(corrupt / "metrics.jsonl", "a") as f:
        f.write('{"step": 1000, "eval/ret')                               # a cut line in a finished run
    partial = write_run(runs, "bc", B, 0, 999.0, stamp="20261125-000000")  # newer: would win if read
    (partial / "metrics.jsonl").write_text(json.dumps({"step": 500, "train/loss": 1.0}) + "\n")
    published = root / "published.json"
    published.write_text(json.dumps([{"dataset": "hopper-medium-replay-v2", "algorithm": "iql", "score": 94.7,
                                      "source": "Kostrikov et al. 2021, Table 1"}]))
    out = root / "out" / "scores.md"
    code = main(["--runs-dir", str(runs), "--output", str(out), "--reps", "2000",
                 "--published", str(published)])
    return {"code": code, "text": out.read_text(), "figures": out.with_suffix(""), "runs": runs,
            "corrupt": corrupt, "partial": partial, "nan_final": nan_final}


def row(text: str, env: str, algo: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {env} | {algo} |"))


def test_rows_equal_the_hand_computed_means_and_stds(report):
    assert report["code"] == 0
    text = report["text"]
    # iql on A: finals 60 70 80 -> 70.0 ± sqrt(200/3) = 8.2; bests 65 70 90 -> 75.0 ± sqrt(350/3) = 10.8
    assert row(text, A, "iql") == (f"| {A} | iql | 1000 | 0, 1, 2 | 70.0 ± 8.2 | 75.0 ± 10.8 | 55.0 | "
                                   f"-30.0 ± 8.2 | 10 | - | abc123def456 |")
    assert row(text, A, "bc") == (f"| {A} | bc | 1000 | 0, 1 | 45.0 ± 5.0 | 45.0 ± 5.0 | 55.0 | -55.0 ± 5.0 | 10 | "
                                  f"seed 2 unfinished (logged to step 500, no checkpoint, of 1000 steps) | "
                                  f"abc123def456 |")
    assert row(text, B, "iql") == (f"| {B} | iql | 1000 | 0, 2 | 25.0 ± 5.0 | 25.0 ± 5.0 | n/a | -75.0 ± 5.0 | 10 | "
                                   f"seed 1 missing | abc123def456 |")
    # bc on B: 10 20 60 -> 30.0 ± sqrt(1400/3) = 21.6; the corrupt (999) and partial (999) runs are not in it
    assert row(text, B, "bc").startswith(f"| {B} | bc | 1000 | 0, 1, 2 | 30.0 ± 21.6 | 30.0 ± 21.6 | n/a |")


def test_ope_runs_are_not_score_rows(report):
    assert not [line for line in report["text"].splitlines() if line.startswith("| ") and "| ope |" in line]


def test_corrupt_and_partial_metrics_are_skipped_with_a_warning_naming_them(report, capsys):
    text = report["text"]
    assert f"`{report['corrupt']}` (metrics.jsonl line 4 is not JSON)" in text
    assert f"`{report['partial']}` (metrics.jsonl has no evaluation at the final step 1000 (partial metrics))" in text
    assert f"`{report['nan_final']}` (summary.json holds a non-finite final score)" in text
    runs, skipped = results.collect_runs([report["runs"]])
    assert {p for p, _ in skipped} == {report["corrupt"], report["partial"], report["nan_final"]}
    assert f"warning: skipping {report['corrupt']}" in capsys.readouterr().err


def test_aggregate_iqm_and_mean_equal_the_hand_computed_ones(report):
    # Seeds finished on both datasets: iql 0, 2 -> [[60, 20], [80, 30]]: IQM mean(30, 60) = 45, mean 47.5;
    # bc 0, 1 -> [[40, 10], [50, 20]]: IQM mean(20, 40) = 30, mean 30.
    text = report["text"]
    iql = next(line for line in text.splitlines() if line.startswith("| iql | 2 x 2 |"))
    bc = next(line for line in text.splitlines() if line.startswith("| bc | 2 x 2 |"))
    for line, iqm, mean, low, high in ((iql, 45.0, 47.5, 20, 80), (bc, 30.0, 30.0, 10, 50)):
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell, point in zip(cells[2:], (iqm, mean)):
            value, lo, hi = (float(v) for v in cell.replace("[", "").replace("]", "").replace(",", "").split())
            assert value == point and low <= lo <= value <= hi <= high, cell
    assert "iql: seeds 1 left out (not finished on every dataset)" in text
    assert "bc: seeds 2 left out (not finished on every dataset)" in text


def test_every_table_names_datasets_checksums_seeds_budget_and_commit(report):
    text = report["text"]
    line = (f"Datasets: {B} (no checksum); {A} (sha256 {SHA[:12]}). Seeds: 0, 1, 2. Steps: 1000. "
            f"Commit: abc123def456.")
    assert text.count(line) == 2  # under the scores table and the aggregate table
    assert f"| {A} | {A} | sha256 {SHA} | 2 | 6 | -4.5 | 55.0 |" in text
    assert f"| {B} | {B} | no checksum |" in text


def test_figures_are_written_and_published_numbers_stand_apart(report):
    names = sorted(p.name for p in report["figures"].glob("*.png"))
    assert names == ["aggregate.png", "curves-local-none-b-v0.png", "curves-test-results-a-v0.png", "profiles.png"]
    text = report["text"]
    other = text.index("## Other data: published numbers")
    assert text.index("| hopper-medium-replay-v2 | iql | 94.7 | Kostrikov et al. 2021, Table 1 |") > other
    assert "other data" in text[other:other + 300].lower()


def test_learning_curve_is_the_mean_and_std_over_seeds_at_each_step(report):
    runs, _ = results.collect_runs([report["runs"]], datasets=[A], algos=["iql"])
    (group,) = results.group_runs(runs)
    steps, mean, std = results.curve_of(group)
    assert steps == [500, 1000]
    np.testing.assert_allclose(mean, [(65 + 50 + 90) / 3, 70.0])
    np.testing.assert_allclose(std, [np.std([65, 50, 90]), np.std([60, 70, 80])])


def test_runs_differing_in_settings_are_separate_rows(tmp_path):
    write_run(tmp_path, "iql", B, 0, 10.0, expectile=0.7)
    write_run(tmp_path, "iql", B, 1, 20.0, expectile=0.7)
    write_run(tmp_path, "iql", B, 0, 90.0, expectile=0.9, stamp="20261124-000001")
    write_run(tmp_path, "iql", B, 1, 70.0, expectile=0.9, stamp="20261124-000001", threads=4)  # threads: same row
    out = tmp_path / "scores.md"
    assert main(["--runs-dir", str(tmp_path), "--output", str(out), "--no-figures", "--reps", "200"]) == 0
    text = out.read_text()
    assert f"| {B} | iql | 1000 | 0, 1 | 15.0 ± 5.0 |" in text  # 0.7: what iql.py picks for B, so no label
    assert f"| {B} | iql (expectile=0.9) | 1000 | 0, 1 | 80.0 ± 10.0 |" in text


def test_runs_without_reference_scores_show_returns_only(tmp_path):
    write_run(tmp_path, "bc", B, 0, None)
    out = tmp_path / "scores.md"
    assert main(["--runs-dir", str(tmp_path), "--output", str(out), "--no-figures"]) == 0
    assert f"| {B} | bc | 1000 | 0 | n/a (no reference scores) | n/a (no reference scores) | n/a | -100.0 (one seed) |" \
        in out.read_text()


def test_no_runs_is_an_error(tmp_path):
    assert main(["--runs-dir", str(tmp_path), "--output", str(tmp_path / "x.md")]) == 2


def test_dirty_commits_stay_marked(tmp_path):
    write_run(tmp_path, "bc", B, 0, 90.0, commit="0123456789abcdef-dirty")
    out = tmp_path / "scores.md"
    assert main(["--runs-dir", str(tmp_path), "--output", str(out), "--no-figures"]) == 0
    assert "| 0123456789ab-dirty |" in out.read_text()


def test_a_row_names_the_settings_its_runs_changed_from_the_files_defaults(tmp_path, dataset_a):
    default = results.read_run(write_run(tmp_path, "iql", A, 0, 50.0))
    changed = results.read_run(write_run(tmp_path, "iql", A, 1, 50.0, expectile=0.9, batch_size=64))
    unknown = results.read_run(write_run(tmp_path, "no_such_algo", A, 0, 50.0, expectile=0.9))
    assert results.changed_settings(default) == ""  # where, how long and how often it ran are not settings
    assert results.changed_settings(changed) == "batch_size=64, expectile=0.9"
    assert results.changed_settings(unknown) is None  # no file to compare with: the row keeps its plain label
    assert {g.label for g in results.group_runs([default, changed])} == {"iql", "iql (batch_size=64, expectile=0.9)"}


def test_figures_keep_every_label_inside_the_canvas_and_waste_no_half_page(tmp_path):
    """The aggregate figure: long row labels (bc_expressive, a label with its changed settings) drawn fully
    inside the saved image, the panels filling most of it, rows in the algorithm files' order and each
    algorithm in the colour it has in every figure."""
    labels = ["td3_bc", "bc_expressive", "diffusion_bc (warmup_steps=100, lr=0.001)", "awac", "iql"]
    scores = {label: np.full((3, 2), 10.0 * i) for i, label in enumerate(labels)}
    agg = results.Aggregate(["A", "B"], scores, {k: [0, 1, 2] for k in labels}, [],
                            point={k: np.array([v.mean(), v.mean()]) for k, v in scores.items()},
                            interval={k: np.array([[v.mean() - 2] * 2, [v.mean() + 2] * 2]) for k, v in scores.items()})
    fig = results.interval_figure(agg)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    ticks = [t for ax in fig.axes for t in ax.get_yticklabels() if t.get_text()]
    assert [t.get_text() for t in ticks[:5]][::-1] == results.ordered(labels)  # first algorithm on top
    shown = [t for ax in fig.axes for t in ax.get_xticklabels()  # the tick labels drawn (inside the x limits)
             if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]
    for text in [*ticks, *shown]:
        box = text.get_window_extent(renderer)
        assert box.x0 >= canvas.x0 - 1 and box.x1 <= canvas.x1 + 1 and box.y0 >= canvas.y0 - 1 \
            and box.y1 <= canvas.y1 + 1, f"label {text.get_text()!r} is cut: {box} outside {canvas}"
    covered = sum(ax.get_window_extent(renderer).height for ax in fig.axes[:1]) / canvas.height
    assert covered > 0.6, f"the panels fill {covered:.0%} of the figure's height"
    colours = {t.get_text(): results.algorithm_colour(t.get_text()) for t in ticks}
    assert colours["iql"] != colours["awac"] and results.algorithm_colour("iql (lr=0.1)") == colours["iql"]
    results._save(fig, tmp_path / "a.png", "caption " * 40)
    assert (tmp_path / "a.png").stat().st_size > 0


def test_fine_tuning_rows_give_the_switch_score_the_final_score_and_the_regret(tmp_path, dataset_a):
    """Runs with an online phase: their final evaluation sits at steps + online_steps, and a table shows the score
    at the switch -> after the online phase by hand (seeds 0, 1: switch 10, 20 -> final 50, 80; regret .5, .3)."""
    runs = tmp_path / "runs"
    for seed, switch, final, regret in ((0, 10.0, 50.0, 0.5), (1, 20.0, 80.0, 0.3)):
        run = write_run(runs, "iql", A, seed, final, {500: switch}, steps=1000, online_steps=500)
        summary = json.loads((run / "summary.json").read_text())
        summary.update(steps=500, online_steps=500, offline_normalized_score_mean=switch, online_regret=regret)
        (run / "summary.json").write_text(json.dumps(summary))
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "max_steps": 500}))
    out = tmp_path / "out.md"
    assert main(["--runs-dir", str(runs), "--output", str(out), "--reps", "200"]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith(f"| {A} | iql") and "| 500 | 500 |" in line)
    assert row == (f"| {A} | iql (online_steps=500) | 500 | 500 | 0, 1 | 15.0 ± 5.0 | 65.0 ± 15.0 | 50.0 ± 10.0 | "
                   f"0.40 ± 0.10 |")
    assert (out.with_suffix("") / f"finetune-{A.replace('/', '-')}.png").is_file()
