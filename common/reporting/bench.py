"""Throughput benchmark: gradient updates per second of every algorithm against the FLOP floor.

    python -m common.reporting.bench                      # all algorithms, CPU (and CUDA when present), 1 thread
    python -m common.reporting.bench --algos bc iql --threads 2 --seconds 5

For each algorithm it builds the agent from the file's own `Config` (default network sizes, batch 256)
for halfcheetah's sizes (17-d observations, 6-d actions; 4 actions for discrete algorithms), feeds it
minibatches drawn on the device from synthetic data, and times three windows of about `--seconds` each
after a warm-up, keeping the best. Algorithms with a warm-up phase (BEAR's, CQL's BC warm start) are
timed on their main update. The floor is what arithmetic alone allows: FLOPs per update (counted by
`torch.utils.flop_counter`'s registry (FlopCount below) and averaged over 4 updates, so that TD3's delayed actor
update counts at its rate) divided by the matrix-multiply rate measured
in the same run (256x256x256 fp32 products on the same device and thread count). `% floor` is the
measured rate over that bound. Results go to stdout and `results/bench.md` (machine, threads, commit).

Compiled rows (on CUDA always, on CPU with `--compile`): the file's own `--compile` path (torch.compile of
the whole update; on CUDA mode "reduce-overhead", i.e. replayed as CUDA graphs), each agent compiled from a
clean Dynamo cache; its warm-up column is the time of the untimed first updates, compilation included, and
its FLOPs are the eager row's (the same maths).

    python -m common.reporting.bench --concurrent 1 2 4 8 --algos iql --device cuda --compile

`--concurrent N ...` measures instead how many seed-updates/s one device gives to N training processes at
once (one seed each, the same algorithm): N worker processes build and warm up their agent, start one timing
window of `--seconds` together, and their updates/s are summed (written to results/bench-concurrent.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.checkpoint import import_algorithm  # noqa: E402
from common.datasets import DataSpec, TensorSampler  # noqa: E402
from common.runs import apply_dataset_settings, git_commit, settings_table, tune_cpu_allocator  # noqa: E402

class FlopCount(TorchDispatchMode):
    """FLOPs of every op FlopCounterMode knows (its registry), without its module tracking: that tracking's
    backward hooks refuse updates that call torch.autograd.grad inside a backward (EDAC's second-order term)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


# Every algorithm file defines an `Agent`; each one found in algorithms/ gets a row.
ALGORITHMS = sorted(p.stem for p in (ROOT / "algorithms").glob("*.py") if not p.stem.startswith("_"))
OBS_DIM, ACT_DIM, N_DISCRETE_ACTIONS = 17, 6, 4  # halfcheetah's sizes; a small discrete action set
DATA_ROWS = 100_000
BENCH_DATASET_NAME = "halfcheetah-medium-v2"  # which DATASET_SETTINGS row the benchmark's configs take
TINY_WIDTH, TINY_BATCH = 8, 8  # the overhead measurement's sizes: the same update with next to no arithmetic
FLOP_WINDOW = 4  # updates whose FLOPs are counted and averaged (a multiple of every update period)
# warm-up phases (BEAR's and CQL's BC warm starts) are skipped: the benchmark times the main update
SKIP_WARMUP_PHASES = {"warmup_steps": 0, "bc_steps": 0}


def synthetic_batch_source(spec: DataSpec, device: torch.device, seed: int = 0) -> TensorSampler:
    """Random transitions with every key any algorithm reads, kept on `device`."""
    rng = np.random.default_rng(seed)
    n = DATA_ROWS
    actions = (rng.integers(0, spec.act_dim, n) if spec.discrete
               else rng.uniform(-1, 1, (n, spec.act_dim)).astype(np.float32))
    arrays = {
        "obs": rng.standard_normal((n, spec.obs_dim)).astype(np.float32),
        "actions": actions,
        "rewards": rng.standard_normal(n).astype(np.float32),
        "next_obs": rng.standard_normal((n, spec.obs_dim)).astype(np.float32),
        "terminals": (rng.uniform(size=n) < 0.01).astype(np.float32),
        "returns_to_go": rng.standard_normal(n).astype(np.float32),
    }
    return TensorSampler(arrays, device, seed)


def batch_source(name: str, spec: DataSpec, config, device: torch.device, seed: int = 0):
    """Where the benchmark's batches come from: the algorithm file's own
    `synthetic_batch_source(spec, config, device, seed)` when it defines one (a sequence model samples
    windows of episodes, not transitions), else `synthetic_batch_source` above."""
    own = getattr(import_algorithm(name), "synthetic_batch_source", None)
    return own(spec, config, device, seed) if own else synthetic_batch_source(spec, device, seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int = 256, repeats: int = 2000) -> float:
    """Measured fp32 FLOP/s of size x size x size matrix products (the floor's denominator)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    for _ in range(50):
        torch.mm(a, b, out=out)
    sync(device)
    best = 0.0
    for _ in range(3):  # best of three: the floor should be the machine's, not a noisy moment's
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - start))
    return best


def make_agent(name: str, device: torch.device, compile_update: bool, tiny: bool = False,
               fields_after: dict | None = None):
    """The file's Agent at its default sizes, or (`tiny`) with every hidden layer TINY_WIDTH wide and
    batch TINY_BATCH: the same operations in the same order with next to no arithmetic. `fields_after`:
    Config fields set last, those the file has (tests/test_compile.py gives warm-up phases 2 steps)."""
    module = import_algorithm(name)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    overrides = {"max_steps": 1_000_000, "device": str(device), "compile": compile_update}
    if tiny:
        defaults = module.Config()
        overrides["batch_size"] = TINY_BATCH
        overrides.update({f: (TINY_WIDTH,) * len(getattr(defaults, f)) for f in fields if f.endswith("hidden_dims")})
        overrides.update({f: TINY_WIDTH for f in fields if f.endswith("embed_dim")})  # transformers' width
    config = module.Config(**{k: v for k, v in overrides.items() if k in fields})
    # the per-dataset fields as they would be for a D4RL locomotion dataset of the same sizes
    config = apply_dataset_settings(dataclasses.replace(config, env=BENCH_DATASET_NAME),
                                    settings_table(module, config), quiet=True)
    config = dataclasses.replace(config, **{k: v for k, v in SKIP_WARMUP_PHASES.items() if k in fields})
    config = dataclasses.replace(config, **{k: v for k, v in (fields_after or {}).items() if k in fields})
    discrete = bool(getattr(module, "DISCRETE_ONLY", False))
    spec = DataSpec(OBS_DIM, N_DISCRETE_ACTIONS if discrete else ACT_DIM, 1.0, discrete)
    if compile_update:
        # a compiled agent starts from a clean Dynamo cache (and CUDA-graph trees), as in a fresh process: its
        # warm-up includes its whole compilation, and agents built earlier count nothing against the
        # recompile limit (torch.optim's step is compiled once per optimiser)
        torch._dynamo.reset()
    agent = module.Agent(config, spec, device)
    if hasattr(agent, "prepare_bench"):
        # an agent whose update reads more than the minibatch (a model-based agent: its model buffer) fills it
        # from synthetic data first
        agent.prepare_bench(synthetic_batch_source(spec, device))
    return agent, config, spec


def time_sampling(source, batch_size: int, device: torch.device, seconds: float) -> float:
    """Seconds per `source.sample(batch_size)` alone: best of three windows of about `seconds`."""
    for _ in range(10):
        source.sample(batch_size)
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        source.sample(batch_size)
    sync(device)
    count = max(10, int(seconds / max((time.perf_counter() - start) / 10, 1e-7)))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(count):
            source.sample(batch_size)
        sync(device)
        best = min(best, (time.perf_counter() - start) / count)
    return best


def time_updates(agent, source: TensorSampler, batch_size: int, device: torch.device, seconds: float,
                 warmup: int, count_flops: bool = False) -> tuple[float, float, dict, float]:
    """(best updates/s over three windows of about `seconds`, FLOPs per update, last logs, seconds taken by
    the `warmup` untimed first updates: a compiled update's compilation and CUDA-graph recording)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        logs = agent.update(source.sample(batch_size))
    sync(device)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()  # the windows are sized on updates after the warm-up
    for _ in range(10):
        logs = agent.update(source.sample(batch_size))
    sync(device)
    per_update = (time.perf_counter() - start) / 10
    flops = 0.0
    if count_flops:
        # averaged over FLOP_WINDOW updates: delayed actor updates (TD3's every 2nd step) count at their rate
        with FlopCount() as counter:
            for _ in range(FLOP_WINDOW):
                agent.update(source.sample(batch_size))
        flops = counter.total / FLOP_WINDOW
    updates = max(5, int(seconds / max(per_update, 1e-6)))
    best = 0.0
    for _ in range(3):  # best of three windows, as for the matmul rate
        start = time.perf_counter()
        for _ in range(updates):
            logs = agent.update(source.sample(batch_size))
        sync(device)
        best = max(best, updates / (time.perf_counter() - start))
    return best, flops, logs, warmup_seconds


def bench_algorithm(name: str, device: torch.device, seconds: float, warmup: int, compile_update: bool,
                    rate: float, flops: float | None = None) -> dict:
    """Updates/s at the default sizes, the FLOP floor, and the framework's per-update overhead. `flops`: the
    FLOPs per update when already counted (a compiled row takes its eager row's: the same maths)."""
    agent, config, spec = make_agent(name, device, compile_update)
    source = batch_source(name, spec, config, device)
    best, counted, logs, warmup_seconds = time_updates(agent, source, config.batch_size, device, seconds, warmup,
                                                       count_flops=flops is None)
    flops = counted if flops is None else flops
    # sampling alone (the updates/s above include it): its share of one update's time
    sample_time = time_sampling(source, config.batch_size, device, seconds / 6)
    for value in logs.values():  # the run must stay finite to count
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise RuntimeError(f"{name}: non-finite value in the benchmark's updates")
    # the same update at width TINY_WIDTH, batch TINY_BATCH: what dispatch, autograd and the optimisers cost
    # when the arithmetic is next to nothing
    tiny, tiny_config, tiny_spec = make_agent(name, device, compile_update, tiny=True)
    tiny_rate, _, _, _ = time_updates(tiny, batch_source(name, tiny_spec, tiny_config, device),
                                      tiny_config.batch_size, device, seconds / 3, warmup)
    overhead = 1.0 / tiny_rate
    floor = rate / flops if flops else float("nan")
    bound = 1.0 / (overhead + flops / rate)
    return {"algo": name, "device": str(device), "updates_per_sec": best, "mflops_per_update": flops / 1e6,
            "floor_updates_per_sec": floor, "pct_floor": 100.0 * best / floor if flops else float("nan"),
            "overhead_us": overhead * 1e6, "bound_updates_per_sec": bound, "pct_bound": 100.0 * best / bound,
            "batch_size": config.batch_size, "compiled": compile_update,
            "sample_us": sample_time * 1e6, "pct_sampling": 100.0 * sample_time * best,
            "warmup_s": warmup_seconds}


def bench_phases(name: str, device: torch.device, seconds: float, compile_update: bool, rate: float) -> list[dict]:
    """Rows for the operations an Agent names in `bench_phases(source) -> {phase: callable}` besides its update
    (a model-based agent's rollout round): calls/s at the default sizes against their FLOP floor, best of three
    windows of about `seconds` (at least one call each)."""
    agent, config, spec = make_agent(name, device, compile_update)
    if not hasattr(agent, "bench_phases"):
        return []
    rows = []
    for phase, call in agent.bench_phases(synthetic_batch_source(spec, device)).items():
        with FlopCount() as counter:  # the first call: warm-up and FLOP count
            call()
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        calls = max(1, int(seconds / (time.perf_counter() - start)))
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            sync(device)
            best = max(best, calls / (time.perf_counter() - start))
        flops, nan = counter.total, float("nan")
        floor = rate / flops if flops else nan
        rows.append({"algo": f"{name}: {phase}", "device": str(device), "updates_per_sec": best,
                     "mflops_per_update": flops / 1e6, "floor_updates_per_sec": floor,
                     "pct_floor": 100.0 * best / floor if flops else nan, "overhead_us": nan,
                     "bound_updates_per_sec": nan, "pct_bound": nan, "batch_size": config.batch_size,
                     "compiled": compile_update, "sample_us": nan, "pct_sampling": nan})
    return rows


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{model}, {os.cpu_count()} cores"


def concurrent_worker(args) -> int:
    """One process of `--concurrent`: build and warm up the agent (seed = worker index), print "ready", wait
    for a line on stdin, run updates for `--seconds`, print {"updates_per_sec": ...} as JSON."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    name = args.algos[0]
    torch.manual_seed(args.worker)
    agent, config, spec = make_agent(name, device, args.compile)
    source = batch_source(name, spec, config, device, seed=args.worker)
    for _ in range(args.warmup):
        agent.update(source.sample(config.batch_size))
    sync(device)
    print("ready", flush=True)
    sys.stdin.readline()  # the go signal: every worker starts its window at once
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for _ in range(10):
            agent.update(source.sample(config.batch_size))
        count += 10
    sync(device)
    print(json.dumps({"updates_per_sec": count / (time.perf_counter() - start)}), flush=True)
    return 0


def concurrent_rates(args, n: int) -> list[float]:
    """Updates/s of each of `n` worker processes timed together (see `concurrent_worker`)."""
    command = [sys.executable, "-m", "common.reporting.bench", "--algos", args.algos[0], "--device", args.device,
               "--threads", str(args.threads), "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    command += ["--compile"] if args.compile else []
    workers = [subprocess.Popen(command + ["--worker", str(i)], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for i in range(n)]

    def next_line(worker, starts: str) -> str:  # the worker's next stdout line starting with `starts`
        for line in worker.stdout:
            if line.startswith(starts):
                return line
        raise RuntimeError(f"a --concurrent worker stopped early (exit {worker.wait()})")

    try:
        for worker in workers:  # wait until every worker has compiled and warmed up
            next_line(worker, "ready")
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        rates = [json.loads(next_line(worker, "{"))["updates_per_sec"] for worker in workers]
    except BaseException:
        for worker in workers:
            worker.kill()
        raise
    finally:
        for worker in workers:
            worker.wait()
    return rates


def concurrent_main(args) -> int:
    """Aggregate seed-updates/s of N concurrent training processes on one device, for each N of --concurrent."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    name = args.algos[0]
    print(f"{name} on {device} ({machine_description(torch.device(device))}), {args.threads} thread(s) per process"
          f"{', compiled' if args.compile else ''}: processes at once -> updates/s each, sum", flush=True)
    rows = []
    for n in args.concurrent:
        rates = concurrent_rates(args, n)
        rows.append((n, rates))
        print(f"  {n:3d} -> {' '.join(f'{r:.1f}' for r in rates)}  sum {sum(rates):.1f} "
              f"({sum(rates) / (sum(rows[0][1]) / rows[0][0]):.2f}x the first row's per-process rate)", flush=True)
    output = Path(args.output)
    if output.name == "bench.md":  # the default: keep the main table
        output = output.with_name("bench-concurrent.md")
    lines = ["# Concurrent training processes on one device", "",
             f"Command: `python -m common.reporting.bench --concurrent {' '.join(map(str, args.concurrent))} --algos "
             f"{name} --device {device} --threads {args.threads} --seconds {args.seconds}"
             f"{' --compile' if args.compile else ''}`  ",
             f"Commit: `{git_commit()}`; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch "
             f"{torch.__version__}; {machine_description(torch.device(device))}  ",
             "Each process trains one seed (the bench's synthetic data, default sizes); all start one window "
             "together after their warm-up; aggregate = sum of their updates/s.", "",
             "| processes | updates/s of each | aggregate seed-updates/s | x the first row's per-process rate |",
             "|---|---|---|---|"]
    for n, rates in rows:
        lines.append(f"| {n} | {' '.join(f'{r:.1f}' for r in rates)} | {sum(rates):.1f} | "
                     f"{sum(rates) / (sum(rows[0][1]) / rows[0][0]):.2f} |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")
    return 0



def _cell(value, decimals: int = 1) -> str:
    """A table cell: '-' for a quantity that does not apply (NaN), three significant digits below 10 (a rollout
    round's 0.153 calls/s, not 0.2), else `decimals` places."""
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "-"
    if 0 < abs(value) < 10 and decimals:
        return f"{value:.3g}"
    return f"{value:.{decimals}f}"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.reporting.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="*", default=ALGORITHMS, help="algorithms to measure")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (pinned)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each of the 3 timing windows")
    parser.add_argument("--warmup", type=int, default=20, help="untimed updates first (they size the windows)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, and CUDA too when present")
    parser.add_argument("--compile", action="store_true",
                        help="also measure torch.compile'd updates on CPU (on CUDA they are always measured)")
    parser.add_argument("--concurrent", type=int, nargs="*", default=None, metavar="N",
                        help="instead: aggregate updates/s of N processes training at once on one device, for each N "
                             "(the first algorithm of --algos, on --device, compiled with --compile)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # one --concurrent process
    parser.add_argument("--output", default=str(ROOT / "results" / "bench.md"), help="markdown report")
    args = parser.parse_args(argv)
    unknown = [a for a in args.algos if not (ROOT / "algorithms" / f"{a}.py").is_file()]
    if unknown:
        print(f"error: unknown algorithm(s) {', '.join(unknown)} (have: {', '.join(ALGORITHMS)})",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as training does (common.runs.setup)
    if args.worker is not None:
        return concurrent_worker(args)
    if args.concurrent:
        return concurrent_main(args)
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        print("error: --device cuda asked for, but torch sees no CUDA GPU", file=sys.stderr)
        return 2

    rows, rates = [], {}
    for device in devices:
        rates[str(device)] = rate = matmul_rate(device)
        print(f"{device}: {machine_description(device)}; 256^3 fp32 matmul {rate / 1e9:.1f} GFLOP/s "
              f"({args.threads} thread{'s' if args.threads > 1 else ''})", flush=True)
        for name in args.algos:
            flops = None
            # compiled rows: on CUDA always (CUDA graphs are where compiling pays), on CPU with --compile
            for compiled in ([False, True] if args.compile or device.type == "cuda" else [False]):
                torch.manual_seed(0)
                row = bench_algorithm(name, device, args.seconds, args.warmup, compiled, rate, flops)
                flops = row["mflops_per_update"] * 1e6
                rows.append(row)
                print(f"  {name:14s}{' (compiled)' if compiled else '':11s} {row['updates_per_sec']:9.1f} "
                      f"updates/s  {row['mflops_per_update']:8.1f} MFLOP/update  floor "
                      f"{row['floor_updates_per_sec']:9.1f}/s  {row['pct_floor']:5.1f}% of floor  overhead "
                      f"{row['overhead_us']:6.0f} us  floor+overhead {row['bound_updates_per_sec']:8.1f}/s  "
                      f"{row['pct_bound']:5.1f}%  batch {row['batch_size']}  sampling {row['sample_us']:6.0f} us "
                      f"({row['pct_sampling']:4.1f}% of an update)  warm-up {row['warmup_s']:.1f} s", flush=True)
                for phase_row in bench_phases(name, device, args.seconds, compiled, rate):  # e.g. a rollout round
                    rows.append(phase_row)
                    print(f"  {phase_row['algo']:25s} {phase_row['updates_per_sec']:9.3f} calls/s    "
                          f"{phase_row['mflops_per_update']:10.1f} MFLOP/call  floor "
                          f"{phase_row['floor_updates_per_sec']:9.3f}/s  {phase_row['pct_floor']:5.1f}% of floor",
                          flush=True)

    commit = git_commit()
    lines = ["# Throughput benchmark", "",
             f"Command: `python -m common.reporting.bench --threads {args.threads} --seconds {args.seconds}"
             f"{' --compile' if args.compile else ''}"
             f"{' --algos ' + ' '.join(args.algos) if args.algos and args.algos != ALGORITHMS else ''}"
             f"{' --output ' + str(args.output) if Path(args.output).resolve() != ROOT / 'results' / 'bench.md' else ''}`"
             f"{' (or `make bench`)' if not args.algos or args.algos == ALGORITHMS else ''}  ",
             f"Commit: `{commit}`; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"torch {torch.__version__}; torch threads {args.threads}  ",
             f"Sizes: obs {OBS_DIM}, actions {ACT_DIM} (discrete: {N_DISCRETE_ACTIONS}), each file's default "
             f"networks and batch size; synthetic data kept on the device.  ",
             "Floor = measured 256x256x256 fp32 matmul rate / FLOPs per update (torch's flop formulas, averaged over "
             f"{FLOP_WINDOW} updates); best of three timing windows.  ",
             f"Overhead = time of the same update with every hidden layer {TINY_WIDTH} wide and batch "
             f"{TINY_BATCH} (dispatch, autograd, optimisers, sampling: what the framework costs per update with "
             "next to no arithmetic); floor+overhead = 1 / (overhead + FLOPs / matmul rate), the rate eager "
             "PyTorch could reach if every matmul ran at the measured rate and every other kernel were free.  ",
             "Sampling = time of drawing one minibatch alone (the updates/s include it), and its share of one "
             "update's time; sequence models draw windows of episodes.  ",
             f"Warm-up = seconds of the {args.warmup} untimed first updates: for a compiled row (`--compile`: each "
             "file's own compiled update, on CUDA replayed as CUDA graphs) its compilation and CUDA-graph "
             "recording; compiled rows take their FLOPs from the eager row.  ",
             "Rows `<algorithm>: <phase>` time another operation of that algorithm (a model-based method's rollout "
             "round at its default size): their updates/s column is calls/s, their MFLOP per call.", ""]
    for device in devices:
        lines.append(f"- {device}: {machine_description(device)}, matmul {rates[str(device)] / 1e9:.1f} GFLOP/s")
    lines += ["", "| algorithm | device | compiled | updates/s | MFLOP/update | floor updates/s | % of floor | "
              "overhead us/update | floor+overhead updates/s | % of floor+overhead | batch | sampling us | "
              "sampling % of update | warm-up s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["updates_per_sec"], r["mflops_per_update"], r["floor_updates_per_sec"], r["pct_floor"],
                 (r["overhead_us"], 0), r["bound_updates_per_sec"], r["pct_bound"], r["batch_size"],
                 (r["sample_us"], 0), r["pct_sampling"], r.get("warmup_s", float("nan"))]
        lines.append(f"| {r['algo']} | {r['device']} | {'yes' if r['compiled'] else 'no'} | "
                     + " | ".join(_cell(*c) if isinstance(c, tuple) else _cell(c) for c in cells) + " |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
