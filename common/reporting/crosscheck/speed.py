"""Updates per second of the library's files against CORL's, side by side in one process on this machine.

    python -m common.reporting.crosscheck.speed --reference ~/src/CORL              # sac_n and edac
    python -m common.reporting.crosscheck.speed --reference ~/src/CORL --algos edac --rounds 7

Each side is built at CORL's defaults for the file (halfcheetah's sizes: 17-d observations, 6-d actions, 3 x 256
layers, 10 critics, batch 256, float32; EDAC's eta 1), the library's agent from its own Config and CORL's from
its own classes and trainer. Both draw their batches the same way from the same 100,000 random transitions held
as tensors (uniform indices, then indexing: what CORL's ReplayBuffer.sample does), so the timed loop is sampling
plus one update, nothing else. The two sides alternate in rounds (CORL first in even rounds, the library first in
odd ones) after a warm-up, with one torch thread, and the table gives each side's median over rounds and their
ratio. Eager only: `--compile` is the library's own option and has its rows in results/bench.md. The result goes
to results/speed-vs-corl.md (a row per file replaced on rerun) and names the CPU, the threads and both commits.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from common.checkpoint import import_algorithm  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.reporting.crosscheck import corl, reference, table  # noqa: E402
from common.reporting.crosscheck.matching import Context  # noqa: E402
from common.runs import git_commit  # noqa: E402

OBS_DIM, ACT_DIM, HIDDEN, CRITICS, BATCH, BUFFER = 17, 6, 256, 10, 256, 100_000
ALGOS = ("sac_n", "edac")
COLUMNS = ("file", "reference (repository, file, commit)", "library updates/s", "reference updates/s",
           "library / reference", "rounds x updates", "machine", "run (command, date, commit)")
TITLE = "# Updates per second against CORL, side by side"


def buffer(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(BUFFER, OBS_DIM, generator=g), "actions": 2 * torch.rand(BUFFER, ACT_DIM, generator=g) - 1,
            "rewards": torch.randn(BUFFER, generator=g), "next_obs": torch.randn(BUFFER, OBS_DIM, generator=g),
            "terminals": (torch.rand(BUFFER, generator=g) < 0.01).float()}


def sides(ctx: Context, name: str):
    """(library step, CORL step, CORL's table cell): each step samples a batch and takes one update."""
    variant, eta, trainer_name, trainer_kwargs = corl.ENSEMBLES[name]
    module, cell = corl.load(ctx, f"algorithms/offline/{name}.py")
    lib = import_algorithm("sac_n")
    torch.manual_seed(0)
    config = lib.Config(device="cpu", max_steps=10, variant=variant, num_critics=CRITICS, eta=eta, batch_size=BATCH,
                        actor_lr=3e-4, critic_lr=3e-4, alpha_lr=3e-4, critic_loss="sum", critic_layer_norm=False,
                        edac_init=True, hidden_dims=(HIDDEN,) * 3)
    agent = lib.Agent(config, corl.SPEC, corl.CPU)
    actor = module.Actor(OBS_DIM, ACT_DIM, HIDDEN, max_action=1.0)
    critic = module.VectorizedCritic(OBS_DIM, ACT_DIM, HIDDEN, CRITICS)
    trainer = getattr(module, trainer_name)(actor=actor, actor_optimizer=corl.adam(actor, 3e-4), critic=critic,
                                            critic_optimizer=corl.adam(critic, 3e-4), gamma=0.99, tau=5e-3,
                                            alpha_learning_rate=3e-4, device="cpu", **trainer_kwargs)
    data = buffer()

    def ours():
        idx = torch.randint(BUFFER, (BATCH,))
        agent.update({k: v[idx] for k, v in data.items()})

    def theirs():
        idx = torch.randint(BUFFER, (BATCH,))
        trainer.update([data["obs"][idx], data["actions"][idx], data["rewards"][idx, None], data["next_obs"][idx],
                        data["terminals"][idx, None]])

    return ours, theirs, cell


def rate(step, updates: int) -> float:
    start = time.perf_counter()
    for _ in range(updates):
        step()
    return updates / (time.perf_counter() - start)


def measure(ours, theirs, rounds: int, updates: int) -> tuple[list[float], list[float]]:
    for step in (ours, theirs):  # warm-up: allocator, first-call paths
        rate(step, max(5, updates // 5))
    mine, ref = [], []
    for r in range(rounds):
        order = ((theirs, ref), (ours, mine)) if r % 2 == 0 else ((ours, mine), (theirs, ref))
        for step, out in order:
            out.append(rate(step, updates))
    return mine, ref


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m common.reporting.crosscheck.speed",
                                     description="Updates/s of sac_n.py against CORL's sac_n.py and edac.py.")
    parser.add_argument("--reference", type=Path, required=True, help="a checkout of github.com/corl-team/CORL")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per side (default 5)")
    parser.add_argument("--updates", type=int, default=50, help="updates per round (default 50)")
    parser.add_argument("--output", type=Path, default=Path("results/speed-vs-corl.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m common.reporting.crosscheck.speed " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.rounds < 1 or args.updates < 1:
            raise UserError("--rounds and --updates must be at least 1")
        for name in args.algos:
            if not reference.has_file(args.reference, f"algorithms/offline/{name}.py"):
                raise UserError(f"--reference {args.reference}: no algorithms/offline/{name}.py there "
                                "(a checkout of github.com/corl-team/CORL is expected)")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    ctx = Context(corl=args.reference, jax_python=None, d3rlpy_python=None, d3rlpy_checkout=None,
                  dtype=torch.float32)
    head, _, dirty = git_commit().partition("-")
    date, commit = datetime.date.today().isoformat(), head[:12] + (f"-{dirty}" if dirty else "")
    machine = f"{cpu_name()}, {torch.get_num_threads()} torch thread, torch {torch.__version__}"
    rows = []
    for name in args.algos:
        ours, theirs, cell = sides(ctx, name)
        mine, ref = measure(ours, theirs, args.rounds, args.updates)
        a, b = statistics.median(mine), statistics.median(ref)
        file = f"algorithms/sac_n.py --variant {corl.ENSEMBLES[name][0]}"
        print(f"{file}: {a:.1f} updates/s (rounds {', '.join(f'{x:.1f}' for x in mine)}); {cell}: {b:.1f} "
              f"(rounds {', '.join(f'{x:.1f}' for x in ref)}); ratio {a / b:.2f}")
        rows.append([file, cell, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}", f"{args.rounds} x {args.updates}", machine,
                     f"`{command}`, {date}, {commit}"])
    replaced = {row[0] for row in rows}
    kept = [row for row in read_rows(args.output) if row[0] not in replaced]
    about = (__doc__.split("\n\n", 2)[2].strip() + "\n\nMedians over rounds; CORL's optimiser is torch.optim.Adam "
             "with its defaults, the library's the fused one from common/optim.py.")
    text = "\n".join([TITLE, "", about, "", table.join_row(list(COLUMNS)), "|" + "---|" * len(COLUMNS),
                      *map(table.join_row, kept + rows), ""])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {len(rows)} row(s) to {args.output}")
    return 0


def read_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [table.split_row(line) for line in path.read_text().splitlines()
            if line.startswith("| algorithms/")]


if __name__ == "__main__":
    sys.exit(main())
