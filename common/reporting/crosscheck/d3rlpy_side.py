"""d3rlpy's CRR from given weights and batch: one update by CRRImpl.update, as d3rlpy's fit() calls it.

Run by `d3rlpy_crr.py` in a Python with d3rlpy, from the repository root:

    python -m common.reporting.crosscheck.d3rlpy_side IN.npz OUT.npz SETTINGS_JSON

IN holds the initial weights in d3rlpy's layout (`init/<module>/<state-dict key>` for policy, targ_policy,
q_funcs, targ_q_funcs) and the batch (`batch/<key>`); SETTINGS the sizes, CRR's settings, the dtype, the seed
and optionally a d3rlpy checkout to put first on the path. OUT gets the losses (`logs/<name>`), every parameter
after the update (`after/<module>/<key>`), d3rlpy's version (`version`) and the file that ran (`impl_path`).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

MODULES = ("policy", "targ_policy", "q_funcs", "targ_q_funcs")


def run(inp: str, out: str, s: dict) -> None:
    if s.get("checkout"):
        sys.path.insert(0, s["checkout"])
    # imported here: a d3rlpy checkout given in the settings goes first on the path
    import d3rlpy
    from d3rlpy.algos.qlearning.torch import crr_impl
    from d3rlpy.torch_utility import TorchMiniBatch

    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, s["dtype"]))  # d3rlpy's modules are made below, in this dtype
    arrays = dict(np.load(inp))
    config = d3rlpy.algos.CRRConfig(
        batch_size=s["batch"], actor_learning_rate=s["actor_lr"], critic_learning_rate=s["critic_lr"],
        gamma=s["gamma"], beta=s["beta"], n_action_samples=s["num_action_samples"], max_weight=s["max_weight"],
        tau=s["tau"], weight_type=s["filter"], advantage_type=s["advantage"], target_update_type=s["target_update"],
        target_update_interval=s["target_update_interval"], n_critics=s["num_critics"])
    algo = config.create(device="cpu:0")
    algo.create_impl((s["obs_dim"],), s["act_dim"])
    modules = algo.impl._modules
    for name in MODULES:
        prefix = f"init/{name}/"
        getattr(modules, name).load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items()
                                                if k.startswith(prefix)})
    b = {k[len("batch/"):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("batch/")}
    n = b["obs"].shape[0]
    batch = TorchMiniBatch(observations=b["obs"], actions=b["actions"], rewards=b["rewards"].view(n, 1),
                           next_observations=b["next_obs"], next_actions=torch.zeros_like(b["actions"]),
                           returns_to_go=torch.zeros(n, 1), terminals=b["terminals"].view(n, 1),
                           intervals=torch.ones(n, 1), device="cpu:0")
    torch.manual_seed(s["seed"])
    logs = algo.impl.update(batch, 0)
    saved = {f"logs/{k}": np.asarray(float(v)) for k, v in logs.items() if k in ("critic_loss", "actor_loss")}
    for name in MODULES:
        saved.update({f"after/{name}/{k}": v.detach().numpy() for k, v in getattr(modules, name).state_dict().items()})
    saved["version"], saved["impl_path"] = np.asarray(d3rlpy.__version__), np.asarray(crr_impl.__file__)
    np.savez(out, **saved)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
