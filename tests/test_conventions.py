"""Every algorithm file follows the library's shape: shared flags, docstring, Agent contract, bench row."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import ROOT, load_algorithm

from common.reporting import bench

# The shared Config fields, in this order, in every algorithm file (see shared/style.md).
SHARED_FIELDS = ["env", "seed", "device", "threads", "max_steps", "batch_size", "eval_every", "eval_episodes",
                 "log_every", "checkpoint_every", "checkpoint_dir", "resume", "track", "wandb_project",
                 "runs_dir", "download", "compile"]
ALGORITHM_FILES = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_algorithm_file_has_the_shared_shape(name):
    module = load_algorithm(name)
    doc = module.__doc__ or ""
    assert "Lecture" in doc or "lecture" in doc, f"{name}: docstring must name the lecture section"
    assert f"python algorithms/{name}.py" in doc, f"{name}: docstring must show a usage line"
    fields = [f.name for f in dataclasses.fields(module.Config)]
    assert fields[: len(SHARED_FIELDS)] == SHARED_FIELDS, f"{name}: shared Config fields differ"
    shared_defaults = {f.name: f.default for f in dataclasses.fields(load_algorithm("bc").Config)}
    for f in dataclasses.fields(module.Config):
        if f.name in SHARED_FIELDS and f.name not in ("env", "max_steps", "batch_size", "eval_every", "log_every",
                                                      "checkpoint_every"):  # batch_size: checked just below
            assert f.default == shared_defaults[f.name], f"{name}: default of {f.name} differs from bc.py"
    defaults = module.Config()
    # 256 as the papers, unless the file declares its paper's own (Decision Transformer: PAPER_BATCH_SIZE = 64)
    paper_batch_size = getattr(module, "PAPER_BATCH_SIZE", 256)
    assert defaults.batch_size == paper_batch_size, f"{name}: the paper's batch size is {paper_batch_size}"
    for attr in ("Agent", "train", "DATASET_SETTINGS"):
        assert hasattr(module, attr), f"{name}: missing {attr}"


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_agent_contract_and_state_round_trip(name):
    agent, config, spec = bench.make_agent(name, torch.device("cpu"), compile_update=False)
    source = bench.batch_source(name, spec, config, torch.device("cpu"))  # the file's own, e.g. windows
    logs = agent.update(source.sample(32))
    assert logs and all(k.startswith("train/") for k in logs)
    assert all(isinstance(v, torch.Tensor) for v in logs.values()), "logs stay tensors: no per-step sync"
    obs = bench.synthetic_batch_source(spec, torch.device("cpu")).sample(4)["obs"]
    action = agent.act(obs)
    assert action.shape[0] == 4
    clone, _, _ = bench.make_agent(name, torch.device("cpu"), compile_update=False)
    clone.load_state_dict(agent.state_dict())
    assert torch.equal(clone.act(obs), action)


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_bench_tiny_agent_runs_the_same_update_with_little_arithmetic(name):
    agent, config, spec = bench.make_agent(name, torch.device("cpu"), compile_update=False, tiny=True)
    assert config.batch_size == bench.TINY_BATCH
    widths = [getattr(config, f.name) for f in dataclasses.fields(config) if f.name.endswith("hidden_dims")]
    widths += [(getattr(config, f.name),) for f in dataclasses.fields(config) if f.name.endswith("embed_dim")]
    assert widths and all(set(w) == {bench.TINY_WIDTH} for w in widths)
    full, _, _ = bench.make_agent(name, torch.device("cpu"), compile_update=False)
    source = bench.batch_source(name, spec, config, torch.device("cpu"))
    assert set(agent.update(source.sample(config.batch_size))) == set(full.update(source.sample(32)))


def test_bench_harness_reports_rates_and_floor(tmp_path):
    out = tmp_path / "bench.md"
    assert bench.main(["--algos", "bc", "--seconds", "0.05", "--warmup", "5", "--device", "cpu",
                       "--output", str(out)]) == 0
    text = out.read_text()
    assert "| bc | cpu | no |" in text and "Commit:" in text and "torch threads 1" in text
    assert "% of floor+overhead" in text and "sampling % of update" in text
    assert bench.main(["--algos", "no_such_algo", "--output", str(out)]) == 2


def test_bench_table_cells_keep_small_rates_and_mark_what_does_not_apply():
    assert bench._cell(0.153) == "0.153"  # a rollout round per second: 0.1 would hide a 50% difference
    assert bench._cell(float("nan")) == "-"  # rollout rows have no overhead or sampling column
    assert bench._cell(745.72) == "745.7" and bench._cell(1418.4, 0) == "1418" and bench._cell(64) == "64"
