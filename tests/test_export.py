"""Policy export (common/export/policy.py): the TorchScript and ONNX files of a run equal `load_policy(run)` when
loaded without this library; policies that are no function of one observation are refused in one line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_algorithm, run_config

from common.checkpoint import load_policy
from common.datasets import load_dataset
from common.export import policy as export

# algorithm file -> (dataset fixture, its own fields); every run is tiny (TINY_RUN, hidden layers 16 wide)
EXPORTED = {
    "bc": ("pendulum_mixed_id", {}),
    "iql": ("pendulum_mixed_id", {}),
    "td3_bc": ("pendulum_mixed_id", {}),
    "cql": ("pendulum_mixed_id", {}),
    "bc_expressive": ("pendulum_mixed_id", {"head": "gmm"}),  # act samples: its deterministic mode is exported
    # (n,) int64 action indices; 300 steps: after fewer, the tiny Q-network picks one action everywhere
    "bcq_discrete": ("cartpole_mixed_id", {"max_steps": 300}),
}
TINY_RUN = dict(max_steps=20, batch_size=32, eval_episodes=1)
TINY_WIDTH = 16
CHECK_ROWS = 1000

# Loads every exported file with torch and onnxruntime only, in an isolated interpreter (`python -I`: neither the
# repository nor PYTHONPATH on sys.path), as a user's program without this library would.
LOADER = """
import json, sys
import numpy as np, onnxruntime, torch
for job in json.loads(sys.argv[1]):
    obs = np.load(job["obs"])
    policy = torch.jit.load(job["torchscript"])
    np.save(job["torchscript_actions"], policy(torch.from_numpy(obs)).numpy())
    session = onnxruntime.InferenceSession(job["onnx"], providers=["CPUExecutionProvider"])
    np.save(job["onnx_actions"], session.run(None, {"obs": obs})[0])
assert not any(name.split(".")[0] in ("common", "algorithms") for name in sys.modules)
"""


def tiny_run(name: str, dataset_id: str, folder: Path, **fields) -> str:
    """A run of `algorithms/<name>.py` of TINY_RUN steps with every hidden layer TINY_WIDTH wide: its run dir."""
    module = load_algorithm(name)
    defaults = module.Config()
    widths = {f.name: (TINY_WIDTH,) * len(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)
              if f.name.endswith("hidden_dims")}
    return module.train(run_config(module.Config, dataset_id, folder, **{**TINY_RUN, **widths, **fields}))["run_dir"]


def observations_near(dataset_id: str, rows: int = CHECK_ROWS) -> np.ndarray:
    """`rows` raw observations of the dataset plus noise of 0.3 its per-dimension std (some outside the data)."""
    obs = np.concatenate([e.observations for e in load_dataset(dataset_id, download=False).episodes])
    rng = np.random.default_rng(1)
    picked = obs[rng.integers(len(obs), size=rows)]
    return (picked + 0.3 * obs.std(0) * rng.standard_normal(picked.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(request, tmp_path_factory) -> dict:
    """Per algorithm: run dir, observations, load_policy's actions, the tool's exit statuses and error lines,
    and the actions of its two exported files computed in an isolated interpreter. The ONNX file goes to its
    default place, the TorchScript one to --out."""
    folder = tmp_path_factory.mktemp("export")
    out, jobs = {}, []
    for name, (fixture, fields) in EXPORTED.items():
        dataset_id = request.getfixturevalue(fixture)
        run_dir = tiny_run(name, dataset_id, folder / name, **fields)
        obs = observations_near(dataset_id)
        np.save(folder / f"{name}-obs.npy", obs)
        job = {"obs": str(folder / f"{name}-obs.npy"), "torchscript": str(folder / f"{name}-policy.pt"),
               "onnx": str(Path(run_dir) / "policy.onnx"), "torchscript_actions": str(folder / f"{name}-ts.npy"),
               "onnx_actions": str(folder / f"{name}-onnx.npy")}
        with contextlib.redirect_stderr(io.StringIO()) as stderr:
            status = (export.main([run_dir, "--format", "torchscript", "--out", job["torchscript"]]),
                      export.main([run_dir, "--format", "onnx"]))
        out[name] = {"run_dir": run_dir, "obs": obs, "expected": load_policy(run_dir)(obs), "job": job,
                     "status": status, "stderr": stderr.getvalue()}
        if status == (0, 0):
            jobs.append(job)
    subprocess.run([sys.executable, "-I", "-W", "ignore::DeprecationWarning", "-c", LOADER, json.dumps(jobs)],
                   cwd=folder, check=True, capture_output=True, timeout=120)
    for entry in out.values():
        if entry["status"] == (0, 0):
            entry["torchscript"] = np.load(entry["job"]["torchscript_actions"])
            entry["onnx"] = np.load(entry["job"]["onnx_actions"])
    return out


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_exported_file_equals_load_policy_without_this_library(exported, name, fmt):
    entry = exported[name]
    assert entry["status"] == (0, 0), entry["stderr"]
    got, expected = entry[fmt], entry["expected"]
    assert got.shape == expected.shape == ((CHECK_ROWS,) if name == "bcq_discrete" else (CHECK_ROWS, 1))
    if name == "bcq_discrete":
        assert got.dtype == np.int64 and np.array_equal(got, expected)
        assert len(np.unique(got)) == 2  # both actions occur: a constant policy would pass trivially
    else:
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert np.ptp(expected) > 1e-3  # the actions vary with the observation


def test_exported_files_carry_their_contract(exported):
    entry = exported["td3_bc"]
    files = {"policy.json": ""}
    torch.jit.load(entry["job"]["torchscript"], _extra_files=files)
    import onnx

    onnx_meta = {p.key: p.value for p in onnx.load(entry["job"]["onnx"]).metadata_props}
    for metadata in (json.loads(files["policy.json"]), json.loads(onnx_meta["policy.json"])):
        assert metadata["algo"] == "td3_bc" and metadata["method"] == "act" and metadata["obs_dim"] == 3
        assert metadata["normalizer"] and metadata["action_low"] == [-2.0] and metadata["action_high"] == [2.0]
    expressive = {"policy.json": ""}
    torch.jit.load(exported["bc_expressive"]["job"]["torchscript"], _extra_files=expressive)
    assert json.loads(expressive["policy.json"])["method"] == "act_deterministic"


def _write_and_run(module: export.ExportedPolicy, obs: np.ndarray, folder: Path) -> dict[str, np.ndarray]:
    """Trace `module`, write both formats and run each file on `obs`, as the tool does."""
    traced, _ = export.trace(module, torch.from_numpy(obs[: export.TRACE_ROWS]))
    export.write_torchscript(traced, folder / "p.pt", {})
    export.write_onnx(traced, torch.from_numpy(obs[: export.TRACE_ROWS]), folder / "p.onnx", {})
    return {fmt: export.run_file(folder / file, fmt, obs) for fmt, file in (("torchscript", "p.pt"),
                                                                             ("onnx", "p.onnx"))}


def test_normaliser_and_per_dimension_bounds_are_inside_the_graph(tmp_path):
    mean, std = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    low, high = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.25])
    module = export.ExportedPolicy(lambda obs: 3.0 * obs, mean, std, low, high)
    obs = np.random.default_rng(0).normal(0.0, 3.0, (200, 2)).astype(np.float32)
    expected = np.clip(3.0 * (obs - mean.numpy()) / std.numpy(), low.numpy(), high.numpy())
    for fmt, got in _write_and_run(module, obs, tmp_path).items():
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=fmt)
        assert (got == low.numpy()).any() and (got == high.numpy()).any(), fmt  # the clip was reached


class _LatentAgent:
    """A deterministic act with a random draw, as bcq's: the latent comes from a generator reseeded per call."""

    def __init__(self):
        self.net, self.generator = torch.nn.Linear(2, 2), torch.Generator()

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        self.generator.manual_seed(0)
        z = torch.randn(1, 2, generator=self.generator)
        return self.net(obs) + z


def test_random_draws_of_a_deterministic_act_are_constants_of_the_graph(tmp_path):
    agent = _LatentAgent()
    export.freeze(agent)
    module = export.ExportedPolicy(agent.act, None, None, None, None)
    obs = np.random.default_rng(0).standard_normal((500, 2)).astype(np.float32)
    expected = agent.act(torch.from_numpy(obs)).numpy()
    for fmt, got in _write_and_run(module, obs, tmp_path).items():
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=fmt)
    traced, _ = export.trace(module, torch.from_numpy(obs[:3]))
    assert "randn" not in str(traced.graph)


def test_a_file_that_does_not_reproduce_the_policy_is_not_written(exported, monkeypatch, capsys, tmp_path):
    """Python control flow on values: the trace records one branch, the check sees the other and refuses."""
    def branching(agent, run, algo):
        return (lambda obs: agent.act(obs) if float(obs[0, 0]) > 0 else -agent.act(obs)), "act"

    monkeypatch.setattr(export, "deterministic_policy", branching)
    policy = load_policy(exported["bc"]["run_dir"])
    # the reference branches row by row, as the function does when it is run row by row
    monkeypatch.setattr(export, "load_policy", lambda run: lambda obs: np.where(obs[:, :1] > 0, 1, -1) * policy(obs))
    out = tmp_path / "policy.onnx"
    assert export.main([exported["bc"]["run_dir"], "--format", "onnx", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("error: ") and "does not reproduce load_policy" in error
    assert not out.exists() and not out.with_name("policy.onnx.tmp").exists()


@pytest.mark.parametrize("name, fields, reason", [
    ("dt", {"embed_dim": TINY_WIDTH, "context_len": 5}, "depends on the episode so far"),
    ("diffusion_bc", {"diffusion_steps": 3}, "samples its actions and has no deterministic mode"),
    ("diffusion_bc", {"diffusion_steps": 3, "action_horizon": 4, "execute_steps": 2}, "depends on the episode so far"),
], ids=["dt", "diffusion_bc", "diffusion_bc-chunks"])
def test_policies_of_no_single_observation_are_refused_in_one_line(tmp_path, pendulum_mixed_id, capsys, name,
                                                                    fields, reason):
    run_dir = tiny_run(name, pendulum_mixed_id, tmp_path, max_steps=5, **fields)
    capsys.readouterr()
    for fmt in export.FORMATS:
        assert export.main([run_dir, "--format", fmt]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and error.startswith(f"error: {run_dir} is a {name}.py run") and reason in error
        assert not (Path(run_dir) / export.FORMATS[fmt]).exists()
