"""--compile: every algorithm file's compiled update gives the eager update's numbers, without graph breaks.

Each file's Agent is built twice by the bench's tiny configuration (`bench.make_agent(..., tiny=True)`: every
hidden layer 8 wide, batch 8) from the same seed, once eager and once with `compile=True`, and both take the
same `STEPS` updates from the same synthetic batches with the torch RNG reseeded alike before each update.
Afterwards every tensor of `agent.state_dict()` (networks, targets, optimiser states) and every logged value
must agree to `RTOL`/`ATOL`: not bitwise, because a compiled update uses the foreach Adam (torch.compile traces
it; the eager update's fused Adam stays outside the graph), which rounds differently. Warm-up phases (BEAR's,
CQL's BC warm start) are set to 2 steps so that both of their graphs are compiled and compared.

Backends: the default suite compiles every file with "aot_eager" (Dynamo's graph capture and AOTAutograd,
the front half of what inductor does, run eagerly: seconds per file) and `INDUCTOR_FILES` with inductor
itself (C++ kernels on CPU; tens of seconds per file on a cold cache). `make test-compile`
(`COMPILE_FULL=1`) compiles every file with inductor. On a machine with CUDA the same comparison runs with
each file's own settings (inductor, mode="reduce-overhead": CUDA graphs) and checks that no graph was left
out of CUDA-graph capture.

Graph breaks: torch.optim breaks the graph around every `optimizer.step()` on purpose (`_use_grad` in
torch/optim/optimizer.py), so a compiled update is a few graphs back to back: forward+backward, each
optimiser step, the target update. Any other break (a host sync, a Python branch on a tensor, an untraceable
call) fails the test with its reason.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import ROOT
from torch._dynamo.utils import counters

from common.reporting import bench

ALGORITHM_FILES = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))
STEPS = 4
RTOL, ATOL = 1e-4, 1e-5  # after STEPS updates at the tiny sizes the measured gap is below 2e-6
INDUCTOR_FILES = ["bc", "td3_bc"]  # in the default suite: the simplest step, and one with two graph variants
WARMUP_FIELDS = ("warmup_steps", "bc_steps")  # warm-up phases get 2 steps, so both graphs are compiled
FULL = os.environ.get("COMPILE_FULL") == "1"
# torch.optim's deliberate break around optimizer.step(): the only break a compiled update may contain
OPTIMIZER_BREAK = "Call to `torch._dynamo.graph_break()`"


def flat_tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, keyed by its path."""
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, (dict, list, tuple)):
            out.update(flat_tensors(value, f"{prefix}{key}."))
    return out


def unexpected_breaks() -> dict[str, int]:
    """Graph breaks Dynamo recorded since `counters.clear()`, except torch.optim's around optimizer.step()."""
    reasons = {**counters["graph_break"], **counters["unimplemented"]}
    return {reason.splitlines()[0]: n for reason, n in reasons.items() if not reason.startswith(OPTIMIZER_BREAK)}


def build(name: str, device: torch.device, compiled: bool):
    """The bench's tiny agent, with warm-up phases shortened to 2 steps; same seed every time."""
    torch.manual_seed(0)
    agent, config, spec = bench.make_agent(name, device, compile_update=compiled, tiny=True,
                                           fields_after={field: 2 for field in WARMUP_FIELDS})
    source = bench.batch_source(name, spec, config, device, seed=1)
    return agent, config, source


def run_updates(agent, config, source, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """STEPS updates; the logs of each are copied to the host right away (before the next update, as
    `Run.log` does: a CUDA graph's outputs are overwritten by its next replay)."""
    logs = []
    for step in range(STEPS):
        batch = source.sample(config.batch_size)
        torch.manual_seed(100 + step)
        logs.append({k: v.detach().cpu().clone() for k, v in agent.update(batch).items()})
    return logs


def compare(name: str, device: torch.device, backend: str | None, rtol: float, atol: float) -> None:
    torch._dynamo.reset()
    counters.clear()
    # Dynamo's settings are global: each file is tested with what it sets itself (another file's Agent may
    # have switched on the tracing of loss.backward() earlier in this process); restored afterwards
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        eager, config, eager_source = build(name, device, compiled=False)
        eager_logs = run_updates(eager, config, eager_source, device)

        real_compile = torch.compile

        def compile_with_backend(fn, **kwargs):
            if backend is not None:
                kwargs["backend"] = backend
            return real_compile(fn, **kwargs)

        torch.compile = compile_with_backend  # the file's own torch.compile call, on the backend asked for
        try:
            compiled, _, compiled_source = build(name, device, compiled=True)
        finally:
            torch.compile = real_compile
        compiled_logs = run_updates(compiled, config, compiled_source, device)

    breaks = unexpected_breaks()
    assert not breaks, f"{name}: graph breaks besides torch.optim's around optimizer.step(): {breaks}"
    assert counters["stats"]["unique_graphs"] > 0, f"{name}: --compile compiled nothing"
    if device.type == "cuda":
        skips = dict(counters["inductor"])
        assert not skips.get("cudagraph_skips"), f"{name}: graphs left out of CUDA-graph capture: {skips}"

    for step, (a, b) in enumerate(zip(eager_logs, compiled_logs)):
        assert a.keys() == b.keys(), f"{name}: log keys differ at update {step + 1}"
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{name}: {key} at update {step + 1}: {m}")
    a, b = flat_tensors(eager.state_dict()), flat_tensors(compiled.state_dict())
    assert a.keys() == b.keys(), f"{name}: state keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for key in a:
        # atol in units of the tensor's own scale: Adam's moments of a large-gradient layer (EDAC's second-order
        # term at 8-wide layers amplifies the two Adams' rounding, 3e-8 in the weights after one step) differ by
        # about rtol of their largest entry in their smallest ones
        scale = max(1.0, float(a[key].abs().max())) if a[key].is_floating_point() and a[key].numel() else 1.0
        torch.testing.assert_close(b[key].to(a[key].device, a[key].dtype), a[key], rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"{name}: state {key} after {STEPS} updates: {m}")


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_compiled_update_matches_eager_aot(name):
    compare(name, torch.device("cpu"), "aot_eager", RTOL, ATOL)


@pytest.mark.parametrize("name", ALGORITHM_FILES if FULL else INDUCTOR_FILES)
def test_compiled_update_matches_eager_inductor(name, monkeypatch):
    # inductor draws its own random numbers unless told to call torch's, as eager does
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    compare(name, torch.device("cpu"), None, RTOL, ATOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_compiled_update_matches_eager_cuda_graphs(name, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    # a graph left out of CUDA-graph capture raises, saying why (mutated inputs, CPU tensors, ...)
    monkeypatch.setattr(torch._inductor.config.triton, "cudagraph_or_error", True)
    # TF32 off on both sides, so that the two differ by kernel choice and summation order only
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    compare(name, torch.device("cuda"), None, 1e-3, 1e-4)


def optimizer_flags(agent) -> dict[str, list[dict]]:
    """The implementation flags of every optimiser an agent holds, per parameter group."""
    return {name: [{k: group.get(k) for k in ("fused", "foreach", "capturable")} for group in opt.param_groups]
            for name, opt in vars(agent).items() if isinstance(opt, torch.optim.Optimizer)}


@pytest.mark.parametrize("name", ALGORITHM_FILES)
def test_checkpoint_resumes_with_or_without_compile(name):
    """--compile may change on resume: a loaded agent keeps its own optimiser implementation (the compiled
    run's capturable foreach Adam would fail in an eager update on CPU), and updates."""
    cpu = torch.device("cpu")
    eager, config, spec = bench.make_agent(name, cpu, compile_update=False, tiny=True)
    compiled, _, _ = bench.make_agent(name, cpu, compile_update=True, tiny=True)
    eager_flags, compiled_flags = optimizer_flags(eager), optimizer_flags(compiled)
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    eager.load_state_dict(compiled_state)
    compiled.load_state_dict(eager_state)
    assert optimizer_flags(eager) == eager_flags and optimizer_flags(compiled) == compiled_flags
    logs = eager.update(bench.batch_source(name, spec, config, cpu).sample(config.batch_size))
    assert all(torch.isfinite(v).all() for v in logs.values())


def test_graph_breaks_are_detected():
    """The graph-break check can fail: a Python branch on a tensor's value breaks the graph."""
    torch._dynamo.reset()
    counters.clear()

    def branchy(x):
        return x * 2 if x.sum() > 0 else x

    torch.compile(branchy, backend="eager")(torch.ones(3))
    assert "Data-dependent branching" in unexpected_breaks()
