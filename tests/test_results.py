"""Score tables: grouping over seeds, mean and std, provenance columns."""

from __future__ import annotations

import json

from common.reporting.results import main


def write_summary(root, algo, env, seed, score, ret, commit="abc123def4567"):  # noqa: PLR0913
    run = root / algo / env.replace("/", "-") / f"{seed}-20261124-000000"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "algo": algo, "env": env, "seed": seed, "steps": 1000, "return_mean": ret,
        "normalized_score_mean": score, "eval_episodes": 10, "git_commit": commit}))


def test_scores_are_grouped_over_seeds_with_provenance(tmp_path):
    write_summary(tmp_path, "iql", "local/pendulum/medium-replay-v0", 0, 80.0, -200.0)
    write_summary(tmp_path, "iql", "local/pendulum/medium-replay-v0", 1, 90.0, -100.0)
    write_summary(tmp_path, "bc", "local/pendulum/medium-replay-v0", 0, None, -900.0)
    out = tmp_path / "scores.md"
    assert main(["--runs-dir", str(tmp_path), "--output", str(out)]) == 0
    text = out.read_text()
    assert "| local/pendulum/medium-replay-v0 | iql | 1000 | 0, 1 | 85.0 ± 5.0 | -150.0 ± 50.0 | 10 | abc123def456 |" in text
    assert "| local/pendulum/medium-replay-v0 | bc | 1000 | 0 | n/a (no reference scores) | -900.0 (one seed) |" in text


def test_no_runs_is_an_error(tmp_path):
    assert main(["--runs-dir", str(tmp_path), "--output", str(tmp_path / "x.md")]) == 2


def test_dirty_commits_stay_marked(tmp_path):
    write_summary(tmp_path, "bc", "local/pendulum/expert-v0", 0, 90.0, -150.0, commit="0123456789abcdef-dirty")
    out = tmp_path / "scores.md"
    assert main(["--runs-dir", str(tmp_path), "--output", str(out)]) == 0
    assert "| 0123456789ab-dirty |" in out.read_text()
