"""The cross-check tool's own machinery (python -m common.reporting.crosscheck), without any reference present.

The comparisons themselves need CORL's checkout and the JAX and d3rlpy interpreters, so they run by hand and
their numbers live in results/crosscheck.md; here: the table keeps one row per file and names the run, a missing
reference or interpreter is one line and exit status 2 with nothing written, weights land in the right place of
a per-critic layout, and a reference file imports with its training-only modules stubbed and then unstubbed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

from common.networks import CriticEnsemble
from common.reporting.crosscheck import reference, table
from common.reporting.crosscheck.__main__ import main
from common.reporting.crosscheck.matching import copy_to_reference, ensemble_pairs, max_diff_by_network

ROOT = Path(__file__).resolve().parent.parent


def row(file: str, loss: str, notes: str = "", run: str = "") -> list[str]:
    return [file, "corl-team/CORL `x.py` @ abc", loss, "1.0e-15", "float64", notes, run]


def test_rerun_replaces_the_row_of_its_file_and_names_the_commit(tmp_path):
    path = tmp_path / "crosscheck.md"
    table.update_table(path, [row("algorithms/iql.py", "1.0e-03"), row("algorithms/bc.py", "2.0e-16", "a | b")],
                       "python -m common.reporting.crosscheck --algos iql bc", "2026-01-01", "1111111")
    text = table.update_table(path, [row("algorithms/iql.py", "3.0e-16", run="`--algos iql`, 2026-02-02, 2222222")],
                              "python -m common.reporting.crosscheck --algos iql", "2026-02-02", "2222222",
                              order=["algorithms/iql.py", "algorithms/bc.py"])
    rows = table.read_rows(path)
    assert [r[0] for r in rows] == ["algorithms/iql.py", "algorithms/bc.py"]  # one row per file, in `order`
    assert rows[0][2] == "3.0e-16" and rows[1][2] == "2.0e-16"  # iql's replaced, bc's kept
    assert rows[1][5] == "a | b"  # a bar inside a cell survives the round trip
    assert "Last run: `python -m common.reporting.crosscheck --algos iql` on 2026-02-02, this repository at " \
           "2222222." in text
    assert "1111111" not in text and text.count("| algorithms/iql.py |") == 1


def test_missing_reference_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "crosscheck.md"
    proc = subprocess.run([sys.executable, "-m", "common.reporting.crosscheck", "--reference",
                           str(tmp_path / "no-such-checkout"), "--algos", "td3_bc", "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --reference")
    assert not out.exists()


def test_a_checkout_without_the_file_a_missing_interpreter_and_an_unknown_name_are_one_line_each(tmp_path, capsys):
    out = tmp_path / "crosscheck.md"
    cases = [(["--reference", str(tmp_path), "--algos", "iql"], "no algorithms/offline/iql.py there"),
             (["--algos", "cql"], "pass --reference"),
             (["--algos", "crr", "--d3rlpy-python", str(tmp_path / "python")], "no such interpreter"),
             (["--algos", "rebrac", "--reference", str(tmp_path)], "no algorithms/offline/rebrac.py"),
             (["--algos", "crr"], "pass --d3rlpy-python"),
             (["--algos", "sac"], "unknown comparison sac")]
    for args, message in cases:
        assert main([*args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    assert not out.exists()


def test_ensemble_members_land_in_per_critic_linear_layers():
    torch.manual_seed(0)
    ensemble = CriticEnsemble(3, 2, (8, 8), ensemble_size=2)
    critics = [nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
               for _ in range(2)]
    pairs = ensemble_pairs("critic", ensemble, critics)
    assert max(max_diff_by_network(pairs).values()) > 0.1  # independently initialised: far apart
    copy_to_reference(pairs)
    obs, actions = torch.randn(16, 3), torch.randn(16, 2)
    with torch.no_grad():
        ours = ensemble(obs, actions)  # (2, 16)
        theirs = torch.stack([critic(torch.cat([obs, actions], -1)).squeeze(-1) for critic in critics])
    torch.testing.assert_close(ours, theirs)
    assert max(max_diff_by_network(pairs).values()) == 0.0


def test_a_reference_file_imports_with_its_training_modules_stubbed_then_unstubbed(tmp_path):
    (tmp_path / "algo.py").write_text(
        "import d4rl\nimport gym\nimport pyrallis\nimport wandb\nfrom tqdm import trange\n\n"
        "def wrap_env(env: gym.Env) -> gym.Env:\n    return env\n\n"
        "@pyrallis.wrap()\ndef train(config):\n    return 2 * config\n")
    saved = {name: sys.modules.get(name) for name in reference.TRAINING_ONLY_MODULES}
    module = reference.import_file(tmp_path, "algo.py", "crosscheck_test_algo")
    assert module.train(21) == 42  # pyrallis.wrap left train() as it is
    assert {name: sys.modules.get(name) for name in reference.TRAINING_ONLY_MODULES} == saved
    assert reference.commit_of(tmp_path, "algo.py").startswith("unknown")


def test_speed_tool_alternates_the_sides_and_refuses_a_missing_reference_in_one_line(tmp_path, capsys):
    from common.reporting.crosscheck import speed

    calls = []
    mine, ref = speed.measure(lambda: calls.append("ours"), lambda: calls.append("theirs"), rounds=3, updates=5)
    assert len(mine) == len(ref) == 3
    timed = calls[2 * 5:]  # after one warm-up block of 5 each
    blocks = [timed[i] for i in range(0, len(timed), 5)]
    assert blocks == ["theirs", "ours", "ours", "theirs", "theirs", "ours"]  # who goes first alternates
    out = tmp_path / "speed.md"
    assert speed.main(["--reference", str(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no algorithms/offline/sac_n.py there" in err
    assert not out.exists()
