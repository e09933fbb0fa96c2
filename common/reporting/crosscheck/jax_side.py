"""CORL's ReBRAC (JAX) from given weights, batch and smoothing noise: one update by its own update functions.

Run by `corl_jax.py` in a Python with jax, flax, optax and chex (no torch needed), from the repository root:

    python -m common.reporting.crosscheck.jax_side IN.npz OUT.npz SETTINGS_JSON

IN holds the library's initial weights (`init/<network>/<torch state-dict key>`), the batch (`batch/<key>`) and
the noise (`noise`); SETTINGS the sizes, hyperparameters, dtype and the reference checkout. OUT gets CORL's
losses (`logs/<name>`) and every parameter after the update (`after/<network>/<torch state-dict key>`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import FrozenDict

from common.reporting.crosscheck import reference


def actor_params(arrays: dict, prefix: str, layers: int):
    """The library's Actor (net.0, net.2, ...: nn.Linear (out, in)) as CORL's DetActor tree (Dense_i, kernel
    (in, out))."""
    return FrozenDict({"params": {f"Dense_{i}": {"kernel": jnp.asarray(arrays[f"{prefix}/net.{2 * i}.weight"].T),
                                                 "bias": jnp.asarray(arrays[f"{prefix}/net.{2 * i}.bias"])}
                                  for i in range(layers + 1)}})


def critic_params(arrays: dict, prefix: str, layers: int):
    """The library's CriticEnsemble (layers.i weight (K, in, out), bias (K, 1, out); norms.i (K, 1, width)) as
    CORL's EnsembleCritic tree (one vmapped Critic: Dense_i, LayerNorm_i, leading axis K)."""
    tree = {f"Dense_{i}": {"kernel": jnp.asarray(arrays[f"{prefix}/layers.{i}.weight"]),
                           "bias": jnp.asarray(arrays[f"{prefix}/layers.{i}.bias"][:, 0, :])}
            for i in range(layers + 1)}
    for i in range(layers):
        tree[f"LayerNorm_{i}"] = {"scale": jnp.asarray(arrays[f"{prefix}/norms.{i}.weight"][:, 0, :]),
                                  "bias": jnp.asarray(arrays[f"{prefix}/norms.{i}.bias"][:, 0, :])}
    return FrozenDict({"params": {"VmapCritic_0": tree}})


def flat_actor(params, layers: int) -> dict[str, np.ndarray]:
    tree = params["params"]
    out = {}
    for i in range(layers + 1):
        out[f"net.{2 * i}.weight"] = np.asarray(tree[f"Dense_{i}"]["kernel"]).T
        out[f"net.{2 * i}.bias"] = np.asarray(tree[f"Dense_{i}"]["bias"])
    return out


def flat_critic(params, layers: int) -> dict[str, np.ndarray]:
    tree = params["params"]["VmapCritic_0"]
    out = {}
    for i in range(layers + 1):
        out[f"layers.{i}.weight"] = np.asarray(tree[f"Dense_{i}"]["kernel"])
        out[f"layers.{i}.bias"] = np.asarray(tree[f"Dense_{i}"]["bias"])[:, None, :]
    for i in range(layers):
        out[f"norms.{i}.weight"] = np.asarray(tree[f"LayerNorm_{i}"]["scale"])[:, None, :]
        out[f"norms.{i}.bias"] = np.asarray(tree[f"LayerNorm_{i}"]["bias"])[:, None, :]
    return out


def run(inp: str, out: str, s: dict) -> None:
    if s["dtype"] == "float64":
        jax.config.update("jax_enable_x64", True)  # before any array is made
    corl = reference.import_file(Path(s["checkout"]), s["relpath"], "corl_rebrac")
    arrays = dict(np.load(inp))
    layers = s["layers"]
    actor_module = corl.DetActor(action_dim=s["act_dim"], hidden_dim=s["hidden"], layernorm=False, n_hiddens=layers)
    critic_module = corl.EnsembleCritic(hidden_dim=s["hidden"], num_critics=2, layernorm=True, n_hiddens=layers)
    actor = corl.ActorTrainState.create(apply_fn=actor_module.apply, params=actor_params(arrays, "init/actor", layers),
                                        target_params=actor_params(arrays, "init/actor_target", layers),
                                        tx=optax.adam(s["actor_lr"]))
    critic = corl.CriticTrainState.create(apply_fn=critic_module.apply,
                                          params=critic_params(arrays, "init/critic", layers),
                                          target_params=critic_params(arrays, "init/critic_target", layers),
                                          tx=optax.adam(s["critic_lr"]))
    batch = {"states": arrays["batch/obs"], "actions": arrays["batch/actions"], "rewards": arrays["batch/rewards"],
             "next_states": arrays["batch/next_obs"], "next_actions": arrays["batch/next_actions"],
             "dones": arrays["batch/terminals"]}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    noise = jnp.asarray(arrays["noise"])
    metrics = corl.Metrics.create(["critic_loss", "q_min", "actor_loss", "bc_mse_policy", "bc_mse_random",
                                   "action_mse"])
    # the target-smoothing noise: the library's draw, in place of jax.random.normal (update_critic's one call)
    real_normal = jax.random.normal
    jax.random.normal = lambda key, shape, *args, **kwargs: noise
    try:
        # the authors' first update (i % policy_freq == 0): critic, actor, targets
        _, actor, critic, metrics = corl.update_td3(
            key=jax.random.PRNGKey(0), actor=actor, critic=critic, batch=batch, metrics=metrics, gamma=s["gamma"],
            actor_bc_coef=s["actor_beta"], critic_bc_coef=s["critic_beta"], tau=s["tau"],
            policy_noise=s["policy_noise"], noise_clip=s["noise_clip"], normalize_q=True)
    finally:
        jax.random.normal = real_normal
    saved = {f"logs/{name}": np.asarray(acc[0] / steps[0]) for name, (acc, steps) in metrics.accumulators.items()
             if float(steps[0]) > 0}
    for network, params in (("actor", actor.params), ("actor_target", actor.target_params)):
        saved.update({f"after/{network}/{k}": v for k, v in flat_actor(params, layers).items()})
    for network, params in (("critic", critic.params), ("critic_target", critic.target_params)):
        saved.update({f"after/{network}/{k}": v for k, v in flat_critic(params, layers).items()})
    np.savez(out, **saved)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
