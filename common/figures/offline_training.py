"""Train this library's algorithm files on a small in-memory pendulum dataset and track Q against the truth.

Used by figure 4 (naive off-policy divergence) and figure 8 (CQL's lower bound). The Agent of
`algorithms/<algo>.py` is built from its own `Config` and fed minibatches exactly as its `train()` does
(observations standardised with the dataset's statistics, a `TensorSampler` on the CPU); only the network
width, batch size and number of steps are made small, so that a figure trains in seconds. Every
`eval_every` updates it records the learned estimate Q(s0, pi(s0)) averaged over start states, and the
true discounted return of the same deterministic policy from the same start states (Monte Carlo in the
vectorised Pendulum, `toy_control.discounted_return`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from common.checkpoint import import_algorithm
from common.datasets import DataSpec, ObsNormalizer, TensorSampler
from common.figures.toy_control import MAX_TORQUE, discounted_return
from common.runs import apply_dataset_settings, settings_table

SPEC = DataSpec(obs_dim=3, act_dim=1, max_action=MAX_TORQUE, discrete=False)
TRUTH_HORIZON = 600  # gamma^600 < 0.003 for gamma <= 0.99: the Monte Carlo return is the infinite-horizon value
START_STATES = 64


def start_states(data: dict[str, np.ndarray], count: int = START_STATES, episode_steps: int = 200) -> np.ndarray:
    """(theta, theta_dot) of the dataset's first `count` episodes' initial observations."""
    first = data["obs"][::episode_steps][:count]
    return np.stack([np.arctan2(first[:, 1], first[:, 0]), first[:, 2]], 1).astype(np.float64)


def make_agent(algo: str, seed: int, hidden_dims: tuple[int, ...], batch_size: int, steps: int,
               spec: DataSpec = SPEC, **overrides):
    """The Agent of algorithms/<algo>.py with its Config's defaults, the test/* per-dataset settings for
    fields left at None (those of `env` when given in `overrides`), and the given small sizes and overrides,
    for data of shapes `spec` (default: the pendulum's)."""
    module = import_algorithm(algo)
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values = {"env": "test/pendulum-v0", "seed": seed, "device": "cpu", "max_steps": steps,
              "batch_size": batch_size, **{k: v for k, v in overrides.items() if k in fields}}
    values.update({f: hidden_dims for f in fields if f.endswith("hidden_dims")})
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"{algo}.Config has no field(s) {sorted(unknown)}")
    config = module.Config(**values)
    config = apply_dataset_settings(config, settings_table(module, config), quiet=True)
    torch.manual_seed(seed)
    return module.Agent(config, spec, torch.device("cpu"))


def train_and_track(algo: str, data: dict[str, np.ndarray], steps: int, eval_every: int, gamma: float,
                    seed: int = 0, hidden_dims: tuple[int, ...] = (64, 64), batch_size: int = 128,
                    reward_scale: float = 1.0, **overrides) -> dict:
    """Train algorithms/<algo>.py's Agent on `data` for `steps` updates; every `eval_every` updates record
    `q` (mean over start states of Q(s0, pi(s0))) and `true` (mean true discounted return of pi, rewards
    times `reward_scale` as in training). `gamma` is the discount of both (every file's --gamma). Returns
    {"steps", "q", "true"} as arrays."""
    torch.manual_seed(seed)
    agent = make_agent(algo, seed, hidden_dims, batch_size, steps, gamma=gamma, **overrides)
    normalizer = ObsNormalizer.from_data(data["obs"])
    sampler = TensorSampler({"obs": normalizer(data["obs"]), "actions": data["actions"],
                             "rewards": data["rewards"] * reward_scale,
                             "next_obs": normalizer(data["next_obs"]), "terminals": data["terminals"]}, "cpu", seed)
    starts = start_states(data)
    s0 = torch.as_tensor(normalizer(np.stack([np.cos(starts[:, 0]), np.sin(starts[:, 0]), starts[:, 1]], 1)))

    def policy(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return agent.act(torch.as_tensor(normalizer(obs))).numpy()

    record = {"steps": [], "q": [], "true": []}
    for step in range(1, steps + 1):
        agent.update(sampler.sample(batch_size))
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                q = float(agent.q_value(s0, agent.act(s0)).mean())
            record["steps"].append(step)
            record["q"].append(q)
            record["true"].append(float(reward_scale * discounted_return(policy, starts, gamma, TRUTH_HORIZON).mean()))
    return {k: np.array(v) for k, v in record.items()}
