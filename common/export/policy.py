"""A run's deterministic policy as one file that runs without this library: TorchScript or ONNX.

    python -m common.export runs/td3_bc/local-pendulum-medium-v0/0-20261124-101500 --format onnx
    python -m common.export RUN --format torchscript --out td3_bc-pendulum.pt

The file maps raw (flattened) observations `obs`, float32 of shape (n, obs_dim), to `action`: float32
(n, act_dim), or int64 (n,) action indices for discrete actions (0-based, as `load_policy` returns them: the
env's action is index + the space's `start`, 0 for most envs). Inside the graph, in this order:
  1. the run's observation normaliser, (obs - mean) / std with the dataset's statistics from the checkpoint
     (left out for runs trained on raw observations);
  2. the agent's deterministic policy, the one `common.checkpoint.load_policy(run)` returns: `act`, or for an
     agent whose `act` samples (`SAMPLES_ACTIONS`), its deterministic mode `act_deterministic` (bc_expressive:
     the mean of the most probable mixture component, ...; crr --eval-policy cwp: the Gaussian's mean);
  3. the action bounds: each dimension clipped to the dataset's action space [low, high], as the evaluation
     clips it (the checkpoint's +-max_action when the dataset is not stored on this machine; no clip for
     discrete actions).
Its metadata (`policy.json`: algorithm, dataset, step, shapes, bounds, the method exported) travels in the file:
`torch.jit.load(f, _extra_files={"policy.json": ""})`, or the ONNX model's `metadata_props`.

Refused in one line (exit status 2), as `load_policy`'s contract has no function of one observation for them:
  * a history-dependent agent (`history_dependent`: dt, diffusion_bc with action chunks): its action depends
    on the episode so far (returns-to-go, the chunk being executed);
  * a sampling agent without a deterministic mode (diffusion_bc): its action is a draw;
  * a run that is not a policy (`NOT_A_POLICY`: ope).
dt and diffusion_bc keep working through `load_policy(run)` (diffusion_bc's draws with `sample=True`).

How: the agent's policy method is wrapped in a small nn.Module (`ExportedPolicy`) and traced once
(`torch.jit.trace`) on a few observations. The TorchScript file is that trace; the ONNX file is the same trace
converted by torch's TorchScript-based exporter (`torch.onnx.export(..., dynamo=False)`, opset 17), so both
formats hold one graph (torch's default exporter, dynamo=True, wrote equal files for every algorithm file here
too, but it needs onnxscript and takes about 3 s a file against 0.1 s). A random draw inside a deterministic
`act` is, by the contract, the same at every call (bcq's latents come from a generator reseeded on every call):
the draws are recorded once and stored in the graph as constants. Tracing records one path through the code,
so the file is checked before it is written: loaded back (torch.jit.load / onnxruntime) and compared with
`load_policy(run)` (clipped as the evaluation clips) on 1,000 observations drawn around the dataset's
statistics and on a batch of one; a file that disagrees on the batch of one, or on more rows than an argmax
near a tie explains (MAX_ARGMAX_FLIP_SHARE), is not written. torch 2.13 marks `torch.jit.trace/save/load` and
the TorchScript-based ONNX exporter deprecated (DeprecationWarning); this tool hides those warnings (they are
about torch's future, not this file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.checkpoint import load_agent, load_policy  # noqa: E402
from common.errors import EXIT_USER_ERROR, UserError, fail  # noqa: E402

FORMATS = {"torchscript": "policy.pt", "onnx": "policy.onnx"}  # --format -> file name in the run directory
ONNX_OPSET = 17  # read by onnxruntime >= 1.13 and most other ONNX runtimes; the policies here need nothing newer
CHECK_ROWS = 1000  # observations the written file is compared on against load_policy
TRACE_ROWS = 3  # the trace's example batch: not 1, so that no size-1 broadcast is mistaken for the batch size
ATOL = RTOL = 1e-5  # |file - load_policy| <= ATOL + RTOL |load_policy|, per action entry (float32 rounding)
# An argmax over nearly equal values (bcq's candidate choice, a discrete file's greedy action) may pick another
# row under onnxruntime's float rounding (its matmuls differ from torch's by ~1e-7): up to this share of the
# checked rows may differ, and the summary line counts them; more means the graph is wrong and nothing is written.
MAX_ARGMAX_FLIP_SHARE = 0.01

# torch functions that draw random numbers: inside a deterministic act their results are constants (see above)
_T = torch.Tensor
RANDOM_DRAWS = {torch.randn, torch.rand, torch.randint, torch.normal, torch.randn_like, torch.rand_like,
                torch.randint_like, torch.multinomial, torch.bernoulli, torch.poisson, torch.randperm,
                _T.normal_, _T.uniform_, _T.bernoulli_, _T.exponential_, _T.geometric_, _T.cauchy_,
                _T.log_normal_, _T.random_, _T.multinomial, _T.bernoulli}


class ExportedPolicy(nn.Module):
    """Raw observations (n, obs_dim) float32 -> the action the evaluation takes: the normaliser (when the run
    has one), the agent's deterministic `policy` (normalised observations -> actions), then the clip to
    [action_low, action_high] (each (act_dim,); None for discrete actions)."""

    def __init__(self, policy: Callable[[torch.Tensor], torch.Tensor], obs_mean: torch.Tensor | None,
                 obs_std: torch.Tensor | None, action_low: torch.Tensor | None, action_high: torch.Tensor | None):
        super().__init__()
        self.policy = policy
        self.register_buffer("obs_mean", obs_mean)
        self.register_buffer("obs_std", obs_std)
        self.register_buffer("action_low", action_low)
        self.register_buffer("action_high", action_high)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if self.obs_mean is not None:
            obs = (obs - self.obs_mean) / self.obs_std  # common.datasets.ObsNormalizer, in float32
        action = self.policy(obs)
        if self.action_low is not None:
            action = torch.clamp(action, self.action_low, self.action_high)  # np.clip in common.evaluation
        return action


def deterministic_policy(agent, run: str | Path, algo: str) -> tuple[Callable, str]:
    """(the agent's deterministic policy method, its name), as `load_policy` picks it; `UserError` for the
    agents whose policy is no function of one observation (history-dependent, sampling without a mode)."""
    if getattr(agent, "history_dependent", False):
        fail(f"{run} is a {algo}.py run, whose policy depends on the episode so far (its history, not the "
             f"observation alone), so no file mapping one observation to an action can reproduce it; "
             f"load_policy(run) returns it with the history it keeps")
    if getattr(agent, "SAMPLES_ACTIONS", False):
        if not callable(getattr(agent, "act_deterministic", None)):
            fail(f"{run} is a {algo}.py run, whose policy samples its actions and has no deterministic mode, so "
                 f"there is no deterministic action to export; load_policy(run, sample=True) is its sampling policy")
        return agent.act_deterministic, "act_deterministic"
    return agent.act, "act"


def freeze(obj, seen: set[int] | None = None) -> None:
    """`requires_grad_(False)` on every module and tensor reachable from `obj`'s attributes (the tracer stores
    the weights act uses as constants, which it refuses for tensors that require grad)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        obj.requires_grad_(False)
    elif isinstance(obj, torch.Tensor):
        if obj.is_leaf:
            obj.requires_grad_(False)
    elif isinstance(obj, dict):
        for value in obj.values():
            freeze(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            freeze(value, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for value in vars(obj).values():
            freeze(value, seen)


class _RecordDraws(TorchFunctionMode):
    """Keeps the result of every random draw made while it is active, in call order."""

    def __init__(self):
        super().__init__()
        self.draws: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in RANDOM_DRAWS:
            self.draws.append(out.detach().clone())
        return out


class _ReplayDraws(TorchFunctionMode):
    """Answers the k-th random draw with the k-th recorded result: a tensor made outside the trace, so the
    tracer stores it as a constant instead of a random op."""

    def __init__(self, draws: list[torch.Tensor]):
        super().__init__()
        self.draws = list(draws)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in RANDOM_DRAWS:
            return func(*args, **(kwargs or {}))
        if not self.draws:
            raise RuntimeError("act drew more random numbers while traced than when it was run")
        draw = self.draws.pop(0)
        return args[0].copy_(draw) if func.__name__.endswith("_") else draw  # in-place draws fill their tensor


def trace(module: ExportedPolicy, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, list[str]]:
    """`torch.jit.trace` of `module` on `example` (k, obs_dim) with its random draws as constants: (the traced
    module, the tracer's warnings, for a failed check to quote)."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder = _RecordDraws()
        with recorder:
            module(example)
        with _ReplayDraws(recorder.draws):
            traced = torch.jit.trace(module, example, check_trace=False)
    return traced, [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def write_torchscript(traced: torch.jit.ScriptModule, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.save's own, in torch 2.13
        torch.jit.save(traced, str(path), _extra_files={"policy.json": json.dumps(metadata)})


def write_onnx(traced: torch.jit.ScriptModule, example: torch.Tensor, path: Path, metadata: dict) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation, in torch 2.13
        torch.onnx.export(traced, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["obs"], output_names=["action"],
                          dynamic_axes={"obs": {0: "n"}, "action": {0: "n"}})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = "policy.json", json.dumps(metadata)
    onnx.save(model, str(path))


def run_file(path: Path, fmt: str, obs: np.ndarray) -> np.ndarray:
    """The exported file's actions for `obs` (n, obs_dim) float32, loaded as a user would load it."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's own, in torch 2.13
            policy = torch.jit.load(str(path))
        with torch.no_grad():
            return policy(torch.from_numpy(obs)).numpy()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"obs": obs})[0]


def differing_rows(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Rows (n,) where the file's action differs from the expected one beyond float32 rounding."""
    if got.shape != expected.shape:
        return np.ones(len(expected), dtype=bool)
    if expected.dtype.kind in "iu":
        return (got != expected).reshape(len(expected), -1).any(1)
    close = np.abs(got.astype(np.float64) - expected) <= ATOL + RTOL * np.abs(expected)
    return ~close.reshape(len(expected), -1).all(1)


def check_observations(ckpt: dict, rows: int = CHECK_ROWS) -> np.ndarray:
    """Raw observations (rows, obs_dim) float32 around the dataset's statistics: mean + std * N(0, 1) (N(0, 1)
    for a run without a normaliser); seed 0, the same for every run of the same dataset."""
    obs_dim = int(ckpt["spec"]["obs_dim"])
    noise = np.random.default_rng(0).standard_normal((rows, obs_dim)).astype(np.float32)
    if ckpt.get("normalizer"):
        mean, std = (np.asarray(ckpt["normalizer"][k], dtype=np.float32) for k in ("mean", "std"))
        return (mean + std * noise).astype(np.float32)
    return noise


def action_bounds(ckpt: dict) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(low, high, where they come from) of the run's Box actions, each (act_dim,) float32; (None, None, ...)
    for discrete actions. The dataset's action space when it is stored here (what the evaluation clips to),
    else +-max_action from the checkpoint."""
    spec = ckpt["spec"]
    if spec["discrete"]:
        return None, None, "discrete: action indices, no bounds"
    act_dim, max_action = int(spec["act_dim"]), float(spec["max_action"])
    env = ckpt.get("config", {}).get("env")
    try:
        import gymnasium as gym
        import minari

        from common.datasets import resolve_name

        minari_id = resolve_name(env).minari_id
        space = minari.load_dataset(minari_id).action_space
        if isinstance(space, gym.spaces.Box) and space.low.size == act_dim:
            low, high = space.low.reshape(-1).astype(np.float32), space.high.reshape(-1).astype(np.float32)
            box = f"[{low[0]:g}, {high[0]:g}]" if (low == low[0]).all() and (high == high[0]).all() else "per dimension"
            return low, high, f"{box}, the action space of {minari_id}"
    except Exception:  # not stored here (UserError, FileNotFoundError) or unreadable: the checkpoint's bound
        pass
    bound = np.full(act_dim, max_action, np.float32)
    return -bound, bound, f"+-{max_action:g} (the checkpoint's max_action: dataset '{env}' is not stored here)"


def check_against_load_policy(path: Path, fmt: str, run: str | Path, obs: np.ndarray, low: np.ndarray | None,
                              high: np.ndarray | None) -> tuple[int, float]:
    """Run the file at `path` on `obs` (n, obs_dim) and on its first row alone, and compare with
    `load_policy(run)` clipped to [low, high] as the evaluation clips it: (rows that differ beyond float32
    rounding, counting a differing batch of one as all rows; the largest difference on the agreeing rows)."""
    expected = load_policy(run)(obs)
    if low is not None:
        expected = np.clip(expected, low, high)
    try:
        got, single = run_file(path, fmt, obs), run_file(path, fmt, obs[:1])
    except Exception as err:
        fail(f"the exported {fmt} file of {run} fails when run: {type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''}")
    rows = differing_rows(got, expected)
    if differing_rows(single, expected[:1]).any():
        return len(obs), float("nan")
    agreeing = ~rows
    worst = float(np.abs(got[agreeing].astype(np.float64) - expected[agreeing]).max()) if agreeing.any() else 0.0
    return int(rows.sum()), worst


def default_output(run: str | Path, fmt: str) -> Path:
    """`<run dir>/policy.pt` or `policy.onnx` (beside the file when `run` names a checkpoint file)."""
    run = Path(run)
    return (run if run.is_dir() else run.parent) / FORMATS[fmt]


def export(run: str | Path, fmt: str, out: str | Path | None = None) -> tuple[Path, str]:
    """Write the run's deterministic policy to `out` (default `default_output`) as `fmt` ("torchscript" or
    "onnx"), checked against `load_policy(run)` first. Returns (the file, a one-line summary); `UserError` for a
    run with no deterministic policy of one observation, or a file that does not reproduce the policy."""
    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    agent, ckpt = load_agent(run)  # refuses runs that are not a policy (NOT_A_POLICY)
    algo, spec = ckpt.get("algo", "?"), ckpt["spec"]
    policy, method = deterministic_policy(agent, run, algo)
    freeze(agent)
    normalizer = ckpt.get("normalizer")
    mean, std = ((torch.as_tensor(np.asarray(normalizer[k], np.float32)) for k in ("mean", "std"))
                 if normalizer else (None, None))
    low, high, bounds_from = action_bounds(ckpt)
    module = ExportedPolicy(policy, mean, std, None if low is None else torch.from_numpy(low),
                            None if high is None else torch.from_numpy(high))
    obs = check_observations(ckpt)
    example = torch.from_numpy(obs[:TRACE_ROWS])
    try:
        traced, tracer_warnings = trace(module, example)
    except Exception as err:
        fail(f"{algo}.py's {method} could not be traced for export: {type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''}")
    obs_dim, act_dim = int(spec["obs_dim"]), int(spec["act_dim"])
    metadata = {"algo": algo, "env": ckpt.get("config", {}).get("env"), "step": ckpt.get("step"),
                "method": method, "obs_dim": obs_dim, "discrete": bool(spec["discrete"]),
                "action": [None, act_dim] if not spec["discrete"] else [None],
                "action_low": None if low is None else low.tolist(),
                "action_high": None if high is None else high.tolist(),
                "normalizer": normalizer is not None, "input": "obs: raw flattened observations (n, obs_dim) float32"}
    out = Path(out) if out is not None else default_output(run, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        try:
            if fmt == "torchscript":
                write_torchscript(traced, tmp, metadata)
            else:
                write_onnx(traced, example, tmp, metadata)
        except Exception as err:
            fail(f"{algo}.py's {method} could not be written as {fmt}: {type(err).__name__}: "
                 f"{str(err).splitlines()[0] if str(err) else ''}")
        differing, worst = check_against_load_policy(tmp, fmt, run, obs, low, high)
        if differing > MAX_ARGMAX_FLIP_SHARE * len(obs):
            hint = f"; the tracer warned: {tracer_warnings[0]}" if tracer_warnings else ""
            fail(f"the traced {fmt} graph of {algo}.py's {method} does not reproduce load_policy on {differing} of "
                 f"{len(obs)} observations (or on a batch of one): its {method} takes a path tracing cannot record "
                 f"(Python control flow on values, a random draw that depends on the batch){hint}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    shape = "(n,) int64 action indices" if spec["discrete"] else f"(n, {act_dim}) float32, clipped to {bounds_from}"
    agreement = (f"on {len(obs)} observations (max |difference| {worst:.1e})" if not differing else
                 f"on {len(obs) - differing} of {len(obs)} observations ({differing} differ: an argmax over nearly "
                 f"equal values, under the runtime's float rounding)")
    summary = (f"wrote {out}: {algo}.py's {method} (step {ckpt.get('step')}), raw obs (n, {obs_dim}) float32 -> "
               f"action {shape}; normaliser {'inside' if normalizer else 'none (trained on raw observations)'}; "
               f"equals load_policy {agreement}")
    return out, summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m common.export",
        description="Export a run's deterministic policy (raw observation -> action, normaliser and action "
                    "bounds inside) as a TorchScript or ONNX file that runs without this library.")
    parser.add_argument("run", help="run directory (or its checkpoint.pt)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS),
                        help="torchscript: load with torch.jit.load; onnx: load with onnxruntime (or any ONNX runtime)")
    parser.add_argument("--out", default=None,
                        help="output file (default: policy.pt or policy.onnx in the run directory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _, summary = export(args.run, args.format, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
