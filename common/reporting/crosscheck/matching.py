"""Putting the library's agent and a reference on the same weights, batch and random draws, and measuring the gap.

A comparison names each parameter once, as a pair (the library's tensor, the reference's tensor) of views with
the same layout (a `CriticEnsemble` member's (in, out) weight against an nn.Linear's (out, in) weight seen
transposed). The same pairs copy the library's initial weights into the reference before the update and give
the max abs difference after it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

BATCH_SEED = 1  # the random batch
UPDATE_SEED = 1234  # torch's global generator, reseeded alike before each side's update
TARGET_NOISE = 0.05  # std of the noise added to target networks (below)

Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]  # (name, library's tensor, reference's tensor)


@dataclass
class Context:
    """What a comparison needs from the command line."""
    corl: Path | None = None  # a CORL checkout (or a bare git mirror of one)
    jax_python: str | None = None  # a Python with jax, flax, optax and chex
    d3rlpy_python: str | None = None  # a Python with d3rlpy
    d3rlpy_checkout: Path | None = None  # optional: a d3rlpy checkout put first on that Python's path
    dtype: torch.dtype = torch.float64


@dataclass
class Outcome:
    """One row of the table: the largest differences over the settings compared, and how they were obtained."""
    file: str  # the library's file (and its variant flag where one file gives several rows)
    reference: str  # repository, file, version
    loss_diff: float
    param_diff: float
    notes: str
    details: list[str] = field(default_factory=list)  # per setting and network, printed, not tabled


def linears(module: nn.Module) -> list[nn.Linear]:
    """The nn.Linear layers of a module, in the order they were defined (the order they are applied)."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def linear_pairs(name: str, ours: list[nn.Linear], theirs: list[nn.Linear]) -> Pairs:
    """nn.Linear against nn.Linear, layer by layer."""
    if len(ours) != len(theirs):
        raise ValueError(f"{name}: {len(ours)} linear layers here, {len(theirs)} in the reference")
    pairs = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        pairs += [(f"{name}.{i}.weight", a.weight, b.weight), (f"{name}.{i}.bias", a.bias, b.bias)]
    return pairs


def member_pairs(name: str, ensemble: nn.Module, member: int, theirs: list[nn.Linear]) -> Pairs:
    """Member `member` of a `CriticEnsemble` (weight (K, in, out), bias (K, 1, out)) against one critic's
    nn.Linear layers (weight (out, in))."""
    if len(ensemble.layers) != len(theirs):
        raise ValueError(f"{name}: {len(ensemble.layers)} layers here, {len(theirs)} in the reference")
    pairs = []
    for i, (layer, linear) in enumerate(zip(ensemble.layers, theirs)):
        pairs += [(f"{name}.{i}.weight", layer.weight[member], linear.weight.T),
                  (f"{name}.{i}.bias", layer.bias[member, 0], linear.bias)]
    return pairs


def ensemble_pairs(name: str, ensemble: nn.Module, critics: list[nn.Module]) -> Pairs:
    """All members of a `CriticEnsemble` against a list of separate critics (Q_1, Q_2, ...)."""
    return [pair for k, critic in enumerate(critics) for pair in member_pairs(f"{name}{k + 1}", ensemble, k,
                                                                               linears(critic))]


@torch.no_grad()
def copy_to_reference(pairs: Pairs) -> None:
    """The library's values into the reference's tensors (the reference starts where the library starts)."""
    for name, ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ValueError(f"{name}: shape {tuple(ours.shape)} here, {tuple(theirs.shape)} in the reference")
        theirs.copy_(ours)


def max_diff_by_network(pairs: Pairs) -> dict[str, float]:
    """max |ours - theirs| per network (the name up to its first dot)."""
    out: dict[str, float] = {}
    for name, ours, theirs in pairs:
        network = name.split(".")[0]
        out[network] = max(out.get(network, 0.0), (ours.detach() - theirs.detach()).abs().max().item())
    return out


def loss_diffs(pairs: dict[str, tuple[float, float]]) -> dict[str, float]:
    """|ours - theirs| per named loss."""
    return {name: abs(float(ours) - float(theirs)) for name, (ours, theirs) in pairs.items()}


@torch.no_grad()
def perturb_(*modules: nn.Module, seed: int = 99) -> None:
    """Add N(0, TARGET_NOISE^2) to every parameter of `modules` (the target networks), so that targets differ
    from the networks they track and a mix-up of the two shows in the comparison."""
    g = torch.Generator().manual_seed(seed)
    for module in modules:
        for p in module.parameters():
            p.add_(TARGET_NOISE * torch.randn(p.shape, generator=g, dtype=p.dtype))


def random_batch(batch: int, obs_dim: int, act_dim: int, dtype: torch.dtype, seed: int = BATCH_SEED,
                 terminal_rate: float = 0.3, max_action: float = 1.0) -> dict[str, torch.Tensor]:
    """Transitions with standard-normal observations and rewards, uniform actions in the box, and a share
    `terminal_rate` of terminals; `next_actions` for the files that read the dataset's next action."""
    g = torch.Generator().manual_seed(seed)
    box = lambda: max_action * (2 * torch.rand(batch, act_dim, generator=g, dtype=dtype) - 1)  # noqa: E731
    return {"obs": torch.randn(batch, obs_dim, generator=g, dtype=dtype), "actions": box(),
            "rewards": torch.randn(batch, generator=g, dtype=dtype),
            "next_obs": torch.randn(batch, obs_dim, generator=g, dtype=dtype), "next_actions": box(),
            "terminals": (torch.rand(batch, generator=g, dtype=dtype) < terminal_rate).to(dtype)}


def as_columns(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The batch as CORL's trainers take it: [obs, actions, rewards (B, 1), next_obs, terminals (B, 1)]."""
    return [batch["obs"].clone(), batch["actions"].clone(), batch["rewards"][:, None].clone(),
            batch["next_obs"].clone(), batch["terminals"][:, None].clone()]


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Networks, optimiser states, draws and `Tensor.float()` casts made inside are of `dtype` (float64: the
    comparison then sees the algorithm, not float32 rounding; CORL casts masks with `.float()`, e.g. IQL's
    (1 - done.float()) * 0.99, which would round the discount to float32)."""
    saved, saved_float = torch.get_default_dtype(), torch.Tensor.float
    torch.set_default_dtype(dtype)
    torch.Tensor.float = lambda tensor, *args, **kwargs: tensor.to(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
        torch.Tensor.float = saved_float


@contextlib.contextmanager
def replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """`owner.name = value` inside the block, restored after it (a random draw handed in, a log-density)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def summarise(setting: str, losses: dict[str, float], params: dict[str, float]) -> str:
    """One printed line per setting: every loss's and every network's difference."""
    return (f"{setting}: losses " + ", ".join(f"{k} {v:.1e}" for k, v in losses.items())
            + "; parameters " + ", ".join(f"{k} {v:.1e}" for k, v in params.items()))
