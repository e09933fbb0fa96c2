"""algorithms/rebrac.py against CORL's JAX file (algorithms/offline/rebrac.py), the authors' own code base.

The library's agent (its Config: 3 x 256 actor and LayerNorm critics, its initialisation; halfcheetah-medium's
settings: betas 0.001 / 0.01, lr 1e-3)
makes the initial weights, the batch (with the dataset's next actions) and the target-smoothing noise; CORL's
update_td3 runs from the same weights in a Python with JAX (`jax_side.py`), the noise handed to it in place of
jax.random.normal. The first update of both trains the critics, the actor and the targets (the authors'
i % policy_freq == 0 from i = 0).
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

RELPATH = "algorithms/offline/rebrac.py"
ROOT = Path(__file__).resolve().parents[3]
OBS_DIM, ACT_DIM, BATCH = 17, 6, 256
FLAX_LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default (torch's: 1e-5)
NETWORKS = ("actor", "actor_target", "critic", "critic_target")
LOSSES = {"critic_loss": "critic_loss", "actor_loss": "actor_loss", "actor_bc_penalty": "bc_mse_policy"}


def library_update(ctx: Context, layer_norm_eps: float | None) -> tuple[dict, dict, object]:
    """Build the agent (seed 0), update it once; returns (arrays for the JAX side, the state and losses after the
    update, its Config)."""
    rebrac = import_algorithm("rebrac")
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        # the authors' locomotion settings (halfcheetah-medium's betas)
        config = rebrac.Config(device="cpu", actor_beta=0.001, critic_beta=0.01, gamma=0.99, actor_lr=1e-3,
                               critic_lr=1e-3, reward_scale=1.0, batch_size=BATCH, max_steps=10)
        agent = rebrac.Agent(config, DataSpec(OBS_DIM, ACT_DIM, 1.0, False), torch.device("cpu"))
        if layer_norm_eps is not None:
            for norm in [*agent.critic.norms, *agent.critic_target.norms]:
                norm.eps = layer_norm_eps
        perturb_(agent.actor_target, agent.critic_target)
        state = lambda prefix: {f"{prefix}/{net}/{k}": v.detach().numpy().copy()  # noqa: E731
                                for net in NETWORKS for k, v in getattr(agent, net).state_dict().items()}
        arrays = state("init")
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype, terminal_rate=0.1)
        arrays.update({f"batch/{k}": v.numpy().copy() for k, v in batch.items()})
        torch.manual_seed(UPDATE_SEED)
        arrays["noise"] = torch.randn(BATCH, ACT_DIM).numpy()  # the update's one draw: randn_like(actions)
        torch.manual_seed(UPDATE_SEED)
        logs = agent.update(batch)
    after = state("after")
    after.update({f"logs/{name}": float(logs[f"train/{name}"]) for name in LOSSES})
    return arrays, after, config


def reference_update(ctx: Context, arrays: dict, config) -> dict:
    """CORL's update from the same arrays, in the JAX interpreter."""
    settings = {"checkout": str(ctx.corl), "relpath": RELPATH, "dtype": str(ctx.dtype).removeprefix("torch."),
                "obs_dim": OBS_DIM, "act_dim": ACT_DIM, "hidden": config.hidden_dims[0],
                "layers": len(config.hidden_dims), "actor_lr": config.actor_lr, "critic_lr": config.critic_lr,
                "gamma": config.gamma, "tau": config.tau, "actor_beta": config.actor_beta,
                "critic_beta": config.critic_beta, "policy_noise": config.policy_noise,
                "noise_clip": config.noise_clip}
    with tempfile.TemporaryDirectory(prefix="crosscheck_rebrac_") as tmp:
        inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(inp, **arrays)
        proc = subprocess.run([ctx.jax_python, "-m", "common.reporting.crosscheck.jax_side", inp, out,
                               json.dumps(settings)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
        if proc.returncode != 0:
            raise RuntimeError(f"the JAX side failed:\n{proc.stderr[-3000:]}")
        return dict(np.load(out))


def compare(ours: dict, theirs: dict) -> tuple[dict, dict]:
    losses = {name: abs(ours[f"logs/{name}"] - float(theirs[f"logs/{key}"])) for name, key in LOSSES.items()}
    params = {net: max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs if k.startswith(f"after/{net}/"))
              for net in NETWORKS}
    return losses, params


def rebrac(ctx: Context) -> Outcome:
    commit = reference.commit_of(ctx.corl, RELPATH)
    arrays, as_is, config = library_update(ctx, None)
    theirs = reference_update(ctx, arrays, config)
    _, flax_eps, _ = library_update(ctx, FLAX_LAYER_NORM_EPS)
    losses, params = compare(as_is, theirs)
    aligned_losses, aligned_params = compare(flax_eps, theirs)
    return Outcome("algorithms/rebrac.py", f"corl-team/CORL `{RELPATH}` (JAX) @ {commit[:12]}{commit[40:]}",
                   max(losses.values()), max(params.values()),
                   f"batch 256, the first update (critics, actor, targets); LayerNorm eps: torch's 1e-5 here, flax's "
                   f"1e-6 in CORL; with 1e-6 in the library's critics: losses {max(aligned_losses.values()):.1e}, "
                   f"parameters {max(aligned_params.values()):.1e}",
                   [summarise("LayerNorm eps 1e-5 (the library's)", losses, params),
                    summarise("LayerNorm eps 1e-6 (flax's)", aligned_losses, aligned_params)])


COMPARISONS = {"rebrac": (RELPATH, rebrac)}
