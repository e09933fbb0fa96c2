"""Copy-a-file: one algorithm file plus `common/`, copied into another project, trains, resumes, builds the
embedded default on first use, and `load_policy` loads its runs; the copy finds its own `common/` first.

Two layouts, each with a decoy `common/` package where the old path set-up looked first (the folder above the
copied file): flat (`project/iql.py`, `project/common/`) and under a subfolder (`project/rl/iql.py`,
`project/rl/common/`, the user's own `project/common/` beside it).

The embedded default is built through the core's one seam to the builder: `python -m common.build pendulum
--skip-existing` in a child process, with the copy's folder first on PYTHONPATH. Building the real suite takes
minutes, so the copied builder's entry point is replaced by a stand-in that writes a small
`local/pendulum/medium-replay-v0` (uniform-random episodes, reference scores stored): the test checks that the
core finds and runs the copy's builder and then loads what it wrote, not the builder itself
(tests/test_build.py tests the builder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

DECOY = "raise ImportError('the decoy common/ above the copied file was imported instead of its own')\n"

STAND_IN_BUILDER = '''"""Stand-in for `python -m common.build pendulum --skip-existing` (tests/test_copy.py)."""
import sys

import gymnasium as gym
import numpy as np

from common.datasets import save_episodes

assert sys.argv[1:] == ["pendulum", "--skip-existing"], sys.argv
env = gym.make("Pendulum-v1")
env.action_space.seed(0)
episodes = []
for i in range(5):
    obs, _ = env.reset(seed=i)
    o, a, r, te, tr = [obs], [], [], [], []
    while True:
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        o.append(obs), a.append(action), r.append(reward), te.append(terminated), tr.append(truncated)
        if terminated or truncated:
            break
    episodes.append({"observations": np.asarray(o), "actions": np.asarray(a), "rewards": np.asarray(r),
                     "terminations": np.asarray(te), "truncations": np.asarray(tr), "seed": i})
save_episodes("local/pendulum/medium-replay-v0", episodes, "Pendulum-v1", ref_min_score=-1200.0,
              ref_max_score=-140.0, algorithm_name="stand-in builder")
print("stand-in builder wrote local/pendulum/medium-replay-v0", file=sys.stderr)
'''


def copy_library(target: Path) -> None:
    """iql.py and the whole common/ folder into `target`, the builder's entry point replaced by the stand-in."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "algorithms" / "iql.py", target / "iql.py")
    shutil.copytree(ROOT / "common", target / "common", ignore=shutil.ignore_patterns("__pycache__"))
    (target / "common" / "build" / "__main__.py").write_text(STAND_IN_BUILDER)


def decoy(folder: Path) -> None:
    (folder / "common").mkdir(parents=True)
    (folder / "common" / "__init__.py").write_text(DECOY)


def run(args: list[str], cwd: Path, minari: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repository on the path
    env.update(MINARI_DATASETS_PATH=str(minari), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("layout", ["flat", "subfolder"])
def test_a_copied_file_trains_resumes_builds_the_default_and_loads_its_runs(tmp_path, layout):
    project = tmp_path / "project"
    library = project if layout == "flat" else project / "rl"
    copy_library(library)
    decoy(project.parent if layout == "flat" else project)  # where the old set-up looked first
    minari = tmp_path / "minari"  # empty: the embedded default is not built yet
    flags = ["--max-steps", "40", "--eval-every", "0", "--eval-episodes", "2", "--log-every", "20",
             "--checkpoint-every", "20", "--device", "cpu", "--no-download"]
    script = str((library / "iql.py").relative_to(project))

    first = run([script, *flags], cwd=project, minari=minari)
    assert first.returncode == 0, first.stderr
    assert "stand-in builder wrote" in first.stderr  # the copy's builder, run by the core's seam
    run_dir = next((project / "runs" / "iql").glob("*/*"))
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40

    resumed = run([script, "--resume", str(run_dir), "--max-steps", "60"], cwd=project, minari=minari)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 40" in resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 60

    # load_policy from the project's own code, with the copy's folder on the path as the user's code would have
    code = (f"import sys; sys.path.insert(0, {str(library)!r}); import numpy as np; "
            "from common.checkpoint import load_policy; "
            f"print(load_policy({str(run_dir)!r})(np.zeros(3, np.float32)).shape)")
    loaded = run(["-c", code], cwd=project, minari=minari)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "(1,)"
