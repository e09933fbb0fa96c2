"""algorithms/crr.py against d3rlpy's CRR (d3rlpy/algos/qlearning/torch/crr_impl.py), run in d3rlpy's own Python.

The library's agent (seed 0; 11-d observations and 3-d actions, hopper's; 256 x 256; batch 256) makes the weights,
its target networks perturbed, and they are loaded into d3rlpy's policy, target policy, Q-functions and target
Q-functions (`d3rlpy_side.py`). Both updates run right after torch.manual_seed(UPDATE_SEED) and draw the same
N(0, 1) numbers in the same order and shapes: a' ~ pibar(.|s') as (B, A), then the m policy samples as (m, B, A).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import import_algorithm
from common.datasets import DataSpec
from common.reporting.crosscheck import reference
from common.reporting.crosscheck.matching import (UPDATE_SEED, Context, Outcome, default_dtype, perturb_,
                                                  random_batch, summarise)

ROOT = Path(__file__).resolve().parents[3]
IMPL = "d3rlpy/algos/qlearning/torch/crr_impl.py"
OBS_DIM, ACT_DIM, BATCH = 11, 3, 256
# (filter, advantage, target update): d3rlpy's locomotion setting, the other filter and estimate, hard targets
SETTINGS = [("binary", "mean", "soft"), ("exp", "max", "soft"), ("binary", "mean", "hard")]


def policy_layout(actor) -> dict[str, torch.Tensor]:
    """The library's GaussianPolicy (trunk, mu, log_std) in d3rlpy's NormalPolicy names."""
    state = {}
    for i, layer in enumerate(m for m in actor.trunk if isinstance(m, torch.nn.Linear)):
        state[f"_encoder._layers.{2 * i}.weight"], state[f"_encoder._layers.{2 * i}.bias"] = layer.weight, layer.bias
    for ours, theirs in (("mu", "_mu"), ("log_std", "_logstd")):
        state[f"{theirs}.weight"], state[f"{theirs}.bias"] = getattr(actor, ours).weight, getattr(actor, ours).bias
    return state


def critic_layout(critic) -> dict[str, torch.Tensor]:
    """The library's CriticEnsemble (weight (K, in, out)) as d3rlpy's ModuleList of Q-functions (nn.Linear)."""
    state, last = {}, len(critic.layers) - 1
    for k in range(critic.ensemble_size):
        for i, layer in enumerate(critic.layers):
            name = f"{k}._fc" if i == last else f"{k}._encoder._layers.{2 * i}"
            state[f"{name}.weight"], state[f"{name}.bias"] = layer.weight[k].T, layer.bias[k, 0]
    return state


def library_state(agent, prefix: str) -> dict[str, np.ndarray]:
    modules = {"policy": policy_layout(agent.actor), "targ_policy": policy_layout(agent.actor_target),
               "q_funcs": critic_layout(agent.critic), "targ_q_funcs": critic_layout(agent.critic_target)}
    return {f"{prefix}/{name}/{k}": v.detach().numpy().copy() for name, state in modules.items()
            for k, v in state.items()}


def compare_setting(ctx: Context, filter_: str, advantage: str, target_update: str) -> tuple[tuple, str]:
    crr = import_algorithm("crr")
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = crr.Config(env="hopper-medium-v2", device="cpu", max_steps=1000, filter=filter_,
                            advantage=advantage, target_update=target_update, num_critics=1, batch_size=BATCH)
        agent = crr.Agent(config, DataSpec(OBS_DIM, ACT_DIM, 1.0, False), torch.device("cpu"))
        perturb_(agent.actor_target, agent.critic_target)
        arrays = library_state(agent, "init")
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        arrays.update({f"batch/{k}": v.numpy().copy() for k, v in batch.items() if k != "next_actions"})
        torch.manual_seed(UPDATE_SEED)
        logs = agent.update(batch)
    ours = library_state(agent, "after")
    settings = {"checkout": str(ctx.d3rlpy_checkout or ""), "dtype": str(ctx.dtype).removeprefix("torch."),
                "seed": UPDATE_SEED, "obs_dim": OBS_DIM, "act_dim": ACT_DIM, "batch": BATCH,
                "actor_lr": config.actor_lr, "critic_lr": config.critic_lr, "gamma": config.gamma, "beta": config.beta,
                "num_action_samples": config.num_action_samples, "max_weight": config.max_weight, "tau": config.tau,
                "filter": filter_, "advantage": advantage, "target_update": target_update,
                "target_update_interval": config.target_update_interval, "num_critics": config.num_critics}
    with tempfile.TemporaryDirectory(prefix="crosscheck_crr_") as tmp:
        inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(inp, **arrays)
        proc = subprocess.run([ctx.d3rlpy_python, "-m", "common.reporting.crosscheck.d3rlpy_side", inp, out,
                               json.dumps(settings)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise RuntimeError(f"the d3rlpy side failed:\n{proc.stderr[-3000:]}")
        theirs = dict(np.load(out))
    losses = {name: abs(float(logs[f"train/{name}"]) - float(theirs[f"logs/{name}"]))
              for name in ("critic_loss", "actor_loss")}
    params = {}
    for key in ours:
        module = key.split("/")[1]
        params[module] = max(params.get(module, 0.0), float(np.abs(ours[key] - theirs[key]).max()))
    return (f"{filter_}/{advantage}/{target_update}", losses, params), str(theirs["version"])


def crr(ctx: Context) -> Outcome:
    results, version = [], "?"
    for setting in SETTINGS:
        result, version = compare_setting(ctx, *setting)
        results.append(result)
    if ctx.d3rlpy_checkout:
        commit = reference.commit_of(ctx.d3rlpy_checkout, IMPL)
        cell = f"takuseno/d3rlpy `{IMPL}` @ {commit[:12]}{commit[40:]} ({version})"
    else:
        cell = f"takuseno/d3rlpy `{IMPL}` @ {version} (package)"
    return Outcome("algorithms/crr.py", cell, max(v for _, losses, _ in results for v in losses.values()),
                   max(v for _, _, params in results for v in params.values()),
                   "filters binary and exp, advantage mean and max, soft and hard targets; 1 critic, m 4; the same "
                   "draws on both sides (reseeded alike); d3rlpy sums its critics' losses into a float32 scalar "
                   "(compute_ensemble_q_function_error), so its logged critic loss is rounded to float32 (the "
                   "losses' difference); its gradients are not (the parameters')",
                   [summarise(*result) for result in results])


COMPARISONS = {"crr": (IMPL, crr)}
