"""Optimisers and the compiled update: the plumbing every algorithm file's update runs on, written once.

An algorithm file builds its optimisers with `adam(...)`, wraps its update with `update_step(...)`, and loads
saved optimisers with `load_optimizer(...)`; its own update then reads as its losses (forward, loss,
`backward()`, `optimizer.step()`), eagerly, with nothing of this module in between:

    self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
    self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)
    ...
    logs = self._update(batch["obs"], ...)      # zero_grad of both optimisers, then the update

What `--compile` changes, all of it here:
- the update is `torch.compile`d whole (`dynamic=False`: every batch has the same shapes), with
  `trace_autograd_ops` on, so that `loss.backward()` is traced into the compiled graph too; on CUDA with
  mode "reduce-overhead", i.e. recorded once and replayed as CUDA graphs;
- the optimisers' gradients are zeroed just before the compiled step, outside it (torch.compile does not
  trace `zero_grad`); eagerly the same call does the same, so eager and compiled runs share one code path;
- Adam is the foreach implementation, which torch.compile traces into the step (the fused one it runs
  outside the graph), and capturable: its step count stays a device tensor, as a CUDA graph needs.
  Eagerly Adam is fused (one kernel for all parameters) where the torch build has it.
torch.optim breaks the graph around every `optimizer.step()` on purpose, so a compiled update runs as a
few graphs back to back (tests/test_compile.py checks that nothing else breaks it).

A checkpoint saved by an eager run may be resumed with `--compile`, and the other way round:
`load_optimizer` keeps the implementation this run built, not the one the state was saved with.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

# the flags that choose an Adam implementation; `load_optimizer` keeps this run's
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")


def fast_adam_flags(device: torch.device, compiled: bool) -> dict:
    """Adam's implementation flags for `device`: fused eagerly (foreach where fused is missing); foreach and
    capturable under --compile."""
    if compiled:
        return {"foreach": True, "capturable": True}
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


def adam(params: Iterable, lr: float | torch.Tensor, config: Any, **kwargs) -> torch.optim.Adam:
    """`torch.optim.Adam(params, lr, **kwargs)` with this run's fast implementation (`config.compile` decides).

    `params`: parameters or parameter groups, all on one device; `lr` may be a 0-d tensor (a schedule changes
    it in place, so a compiled update never retraces). `kwargs`: Adam's own (betas, eps, weight_decay).
    """
    params = list(params)
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    return torch.optim.Adam(params, lr=lr, **kwargs, **fast_adam_flags(first.device, bool(config.compile)))


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping the implementation `optimizer` was built with.

    A loaded state brings the flags it was saved with (a compiled run's capturable foreach Adam would fail in
    an eager update on CPU); the moments and step counts are the saved run's, the implementation this run's.
    """
    flags = [{k: group.get(k) for k in IMPLEMENTATION_FLAGS} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)


def update_step(fn: Callable, config: Any, *optimizers: torch.optim.Optimizer) -> Callable:
    """`fn` as the training loop calls it: the gradients of `optimizers` set to None, then `fn(*args)`.

    With `config.compile`, `fn` is torch.compile'd whole (backward included; CUDA graphs on CUDA) and the
    gradients are zeroed outside the compiled graph. `fn` must keep its tensors' shapes fixed from call to
    call and read nothing from the host (no `.item()`): a compiled graph is specialised on both.
    """
    if config.compile:
        torch._dynamo.config.trace_autograd_ops = True  # trace loss.backward() into the compiled step too
        device = _device_of(optimizers)
        mode = "reduce-overhead" if device is not None and device.type == "cuda" else None
        step = torch.compile(fn, mode=mode, dynamic=False)
    else:
        step = fn

    def zero_grad_then_step(*args, **kwargs):
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        return step(*args, **kwargs)

    zero_grad_then_step.compiled = bool(config.compile)
    return zero_grad_then_step


def keep(logs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of logged tensors that outlive the next update (a CUDA graph overwrites its outputs on the next
    replay): for logs an update keeps between steps, such as TD3's actor losses of its last actor update."""
    return {key: value.clone() for key, value in logs.items()}


def _device_of(optimizers) -> torch.device | None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                return param.device
    return None
