"""Experts for imitation: pi*(s), the oracle an interactive learner (dagger.py) queries at the states it visits.

    from common.experts import load_expert
    expert = load_expert("runs/datasets/pendulum-seed0", dataset)   # see load_expert for every form
    a_star = expert(obs)                 # flat observations (n, obs_dim) -> (n, act_dim), or (n,) indices

An expert is one of (`load_expert`):
  * a run directory or checkpoint.pt of this library: its final policy, through `common.checkpoint.load_policy`;
  * a local dataset build folder (`runs/datasets/<name>-seed<seed>`): the final policy of the builder's behaviour
    agent (the policy behind the build's "expert" quality), acting deterministically. The builder writes it as a
    policy file (`POLICY_FILE`, beside `agent/agent_state.pt`): plain tensors, loaded with `weights_only=True`, so
    loading it runs no code from it; this module reads the file and never imports the builder;
  * `package.module:factory`: a zero-argument factory, importable from the current directory or PYTHONPATH,
    returning a callable from one flat observation (obs_dim,) to one env action.

A policy with a `reset(n, seed)` method is stateful per episode (a scripted expert that picks a mode per
episode, such as common/envs/fork.py's): `Expert.reset(n, seed)` resets it at the start of every n episodes run
side by side, and it then acts on their batch (n, obs_dim), row i for episode i.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from common.checkpoint import import_algorithm, load_checkpoint, load_policy, save_checkpoint
from common.datasets import DataSpec, OfflineDataset, flatten_observation
from common.errors import UserError, fail

# The policy file a build folder keeps its final policy in (in `<build>/agent/`, beside the agent's state):
# an MLP's layers (weight, bias) with ReLU between them, and an action head. Written by the builder
# (common/build/behavior_sac.py, behavior_dqn.py) through `save_policy_file`, read by `load_policy_file`.
POLICY_FILE = "expert_policy.pt"
POLICY_FORMAT = 1
AGENT_STATE_FILE = "agent_state.pt"  # the builder's resumable agent state: marks a build folder
# the builder's command that writes POLICY_FILE into a build folder made before builds wrote it
EXPORT_COMMAND = {False: "python -m common.build.behavior_sac --export-expert {}",
                  True: "python -m common.build.behavior_dqn --export-expert {}"}


class Expert:
    """pi*(s) for a batch of flat observations; continuous actions clipped to the bounds, discrete ones as
    indices 0..n-1 (env action minus `start`).

    `policy` maps one flat observation to one env action, or, with `batched` (and for any policy with a
    `reset(n, seed)` method), a batch (n, obs_dim) to n env actions.
    """

    def __init__(self, policy: Callable[[np.ndarray], object], description: str, space: gym.Space,
                 batched: bool = False):
        self.policy, self.description, self.space = policy, description, space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self.resettable = callable(getattr(policy, "reset", None))
        self.batched = batched or self.resettable

    def reset(self, n: int, seed: int) -> None:
        """Start n episodes side by side: a stateful expert draws its per-episode choices from `seed` (a
        stateless one has nothing to reset). Call it at every episode start, before the first query."""
        if self.resettable:
            self.policy.reset(n, seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """a* for `obs` (n, obs_dim): (n, act_dim) float32, or (n,) int64 indices."""
        obs = np.asarray(obs, dtype=np.float32)
        if self.batched:
            actions = np.asarray(self.policy(obs))
            if self.discrete:
                return actions.reshape(len(obs)).astype(np.int64) - int(self.space.start)
            out = actions.astype(np.float32).reshape(len(obs), -1)
            return np.clip(out, self.space.low.reshape(-1), self.space.high.reshape(-1))
        actions = [self.policy(o) for o in obs]
        if self.discrete:
            return np.array([int(np.asarray(a).reshape(-1)[0]) for a in actions], np.int64) - int(self.space.start)
        out = np.stack([np.asarray(a, np.float32).reshape(self.space.shape) for a in actions])
        return np.clip(out.reshape(len(out), -1), self.space.low.reshape(-1), self.space.high.reshape(-1))

    def check(self, dataset: OfflineDataset) -> None:
        """Act once on the env's first observation: one clear line if the expert does not fit the env."""
        env = dataset.make_env()
        obs, _ = env.reset(seed=0)
        env.close()
        flat = flatten_observation(obs, dataset.observation_space)
        try:
            self.reset(1, 0)
            raw = np.asarray(self.policy(flat[None]))[0] if self.batched else np.asarray(self.policy(flat))
        except UserError:
            raise
        except Exception as err:
            fail(f"--expert {self.description} cannot act on this env's observations (shape {flat.shape}): "
                 f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if self.discrete:
            ok = raw.size == 1 and np.issubdtype(raw.dtype, np.integer) and \
                self.space.start <= int(raw.reshape(-1)[0]) < self.space.start + self.space.n
            need = f"one integer action in [{self.space.start}, {self.space.start + self.space.n})"
        else:
            ok = raw.size == int(np.prod(self.space.shape)) and np.issubdtype(raw.dtype, np.floating) \
                and bool(np.all(np.isfinite(raw)))
            need = f"a finite float action of shape {self.space.shape}"
        if not ok:
            fail(f"--expert {self.description} returned {raw.dtype} of shape {raw.shape} ({raw.reshape(-1)[:4]}); "
                 f"the env of '{dataset.name}' needs {need}: its action space does not match")


def load_expert(spec: str | None, dataset: OfflineDataset) -> Expert:
    """The expert `spec` names (a run directory or checkpoint, a build folder, `package.module:factory`; None:
    the build folder of the local build `dataset` is), checked against the env's spaces; one clear line
    (`UserError`) when it cannot be loaded or does not fit."""
    space = dataset.action_space
    if spec is None:
        path = default_build_folder(dataset)
        expert = Expert(build_policy(path, dataset), f"{path} (the build of {dataset.minari_id})", space, batched=True)
    elif re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) and not Path(spec).exists():
        expert = Expert(factory_policy(spec), spec, space)
    elif not Path(spec).exists():
        fail(f"--expert {spec}: no such file or folder, and not package.module:factory")
    elif is_build_folder(Path(spec)):
        expert = Expert(build_policy(Path(spec), dataset), spec, space, batched=True)
    else:
        expert = Expert(run_policy(spec, dataset), spec, space, batched=True)
    expert.check(dataset)
    return expert


def describe(spec: DataSpec) -> str:
    """`3-d observations, 1-d actions` / `4-d observations, 2 discrete actions`."""
    actions = f"{spec.act_dim} discrete actions" if spec.discrete else f"{spec.act_dim}-d actions"
    return f"{spec.obs_dim}-d observations, {actions}"


def check_spaces(what: str, saved: DataSpec, dataset: OfflineDataset) -> None:
    """One line when a policy made for `saved` spaces meets the env of `dataset`."""
    if (saved.obs_dim, saved.act_dim, saved.discrete) != (dataset.spec.obs_dim, dataset.spec.act_dim,
                                                          dataset.spec.discrete):
        fail(f"{what} has {describe(saved)}; the env of '{dataset.name}' has {describe(dataset.spec)}")


# --------------------------------------------------------------------------------------------------
# A run of this library
# --------------------------------------------------------------------------------------------------


def run_policy(path: str, dataset: OfflineDataset) -> Callable[[np.ndarray], np.ndarray]:
    """A run directory or checkpoint of this library as a batched policy (`common.checkpoint.load_policy`),
    spaces checked; runs that are not a policy of the state alone are refused."""
    ckpt = load_checkpoint(path)
    algo, config = ckpt.get("algo"), ckpt.get("config", {})
    if algo == "ope":
        evaluated = f" (it evaluated {config['policy']})" if config.get("policy") else ""
        fail(f"--expert {path}: an ope.py run estimates the value of a policy and is not one itself; pass the run "
             f"of the policy it evaluated{evaluated}")
    if algo == "dt" or (algo == "diffusion_bc" and config.get("action_horizon", 1) > 1):
        fail(f"--expert {path}: a {algo}.py policy depends on the episode so far (a history or a plan of action "
             f"chunks); DAgger queries the expert one state at a time: pass a policy of the state")
    saved = DataSpec(**ckpt["spec"])
    check_spaces(f"--expert {path}: its policy ({algo} on {config.get('env')})", saved, dataset)
    # a sampling policy's deterministic mode where it has one (bc_expressive), else its samples (diffusion_bc)
    agent_class = import_algorithm(algo, ckpt.get("algo_file")).Agent
    samples_only = getattr(agent_class, "SAMPLES_ACTIONS", False) and not hasattr(agent_class, "act_deterministic")
    if samples_only:
        print(f"note: --expert {path}: a {algo}.py policy has no deterministic mode; the expert samples its "
              f"labels (seeded with the run's --seed)", file=sys.stderr, flush=True)
    policy = load_policy(path, sample=samples_only)
    if saved.discrete:
        start = int(dataset.action_space.start)
        return lambda obs: np.asarray(policy(obs)).reshape(len(obs)) + start
    return policy


# --------------------------------------------------------------------------------------------------
# A build folder: the policy file its builder wrote
# --------------------------------------------------------------------------------------------------


def save_policy_file(path: str | Path, layers: list[torch.nn.Linear], head: str, info: dict,
                     scale: torch.Tensor | None = None, center: torch.Tensor | None = None, start: int = 0) -> Path:
    """Write an MLP policy as plain tensors: `layers` applied in order with ReLU between them, then `head`:
    "tanh_box", a = center + scale * tanh(x) (continuous actions (B, act_dim)), or "argmax", a = argmax_i x_i +
    start (discrete env actions (B,)). `info`: plain values shown in messages (env, agent, step)."""
    if head not in ("tanh_box", "argmax"):
        raise ValueError(f"unknown policy head {head!r}")
    cpu = lambda t: t.detach().to("cpu", torch.float32).clone()
    state = {"format": POLICY_FORMAT, "head": head, "info": dict(info), "start": int(start),
             "layers": [{"weight": cpu(layer.weight), "bias": cpu(layer.bias)} for layer in layers],
             "scale": None if scale is None else cpu(scale), "center": None if center is None else cpu(center)}
    return save_checkpoint(path, state)


def load_policy_file(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], DataSpec, dict]:
    """Read a policy file (`save_policy_file`) without running code from it: returns the batched policy
    (n, obs_dim) -> env actions (n, act_dim) or (n,), the spaces it was made for (max_action 1.0, unused)
    and its `info`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        layers = [(layer["weight"], layer["bias"]) for layer in state["layers"]]
        head, info, start, scale, center = state["head"], state["info"], state["start"], state["scale"], state["center"]
        if state["format"] != POLICY_FORMAT or head not in ("tanh_box", "argmax") or not layers:
            raise ValueError(f"format {state['format']}, head {head}, {len(layers)} layers")
    except Exception as err:
        fail(f"cannot read the policy file {path}: {type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''}")
    discrete = head == "argmax"
    spec = DataSpec(obs_dim=layers[0][0].shape[1], act_dim=layers[-1][0].shape[0], discrete=discrete, max_action=1.0)

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        for i, (weight, bias) in enumerate(layers):
            x = F.linear(x, weight, bias)
            if i < len(layers) - 1:
                x = F.relu(x)
        return (x.argmax(dim=-1) + start if discrete else center + scale * torch.tanh(x)).numpy()

    return policy, spec, info


def is_build_folder(path: Path) -> bool:
    """A build folder of the local builder (`<build>/agent/agent_state.pt`), its agent/ folder, or either file."""
    if path.is_file():
        return path.name in (AGENT_STATE_FILE, POLICY_FILE)
    return any((folder / name).is_file() for folder in (path / "agent", path)
               for name in (AGENT_STATE_FILE, POLICY_FILE))


def build_policy(path: Path, dataset: OfflineDataset) -> Callable[[np.ndarray], np.ndarray]:
    """The final policy of a build folder (its policy file), spaces checked."""
    folder = path.parent if path.is_file() else (path / "agent" if (path / "agent").is_dir() else path)
    file = path if path.name == POLICY_FILE else folder / POLICY_FILE
    if not file.is_file():
        build = folder.parent if folder.name == "agent" else folder
        fail(f"--expert {path}: the build folder has no {POLICY_FILE} (built before builds wrote their final "
             f"policy); write it with `{EXPORT_COMMAND[dataset.spec.discrete].format(build)}`")
    policy, saved, info = load_policy_file(file)
    check_spaces(f"--expert {path}: its policy ({info.get('agent')} on {info.get('env')})", saved, dataset)
    if info.get("env") != dataset.eval_env_spec.id:
        print(f"note: the expert of {path} was trained on {info.get('env')}, the env here is "
              f"{dataset.eval_env_spec.id}", file=sys.stderr)
    return policy


def default_build_folder(dataset: OfflineDataset) -> Path:
    """runs/datasets/<name>-seed<seed>, the builder's default build folder of a local build `local/<name>/...`."""
    match = re.fullmatch(r"local/([\w-]+)/[\w-]+-v\d+", dataset.minari_id)
    seed = dataset.metadata.get("seed")
    if match is None or seed is None:
        fail(f"--expert is needed: '{dataset.name}' is not a local build whose build folder keeps the expert "
             f"(give a run directory, a build folder or package.module:factory)")
    name = f"{match.group(1)}-seed{seed}"
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if is_build_folder(root / "runs" / "datasets" / name):
            return root / "runs" / "datasets" / name
    fail(f"--expert is needed: the build folder runs/datasets/{name} of '{dataset.minari_id}' is not here "
         f"(rebuild with `python -m common.build {match.group(1)}`, or give --expert)")


# --------------------------------------------------------------------------------------------------
# package.module:factory
# --------------------------------------------------------------------------------------------------


def factory_policy(spec: str) -> Callable[[np.ndarray], object]:
    """`package.module:factory`: import the module, call factory() and return the callable it gives."""
    module_name, attr = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        fail(f"--expert {spec}: cannot import {module_name}: {type(err).__name__}: {err}")
    if not callable(getattr(module, attr, None)):
        fail(f"--expert {spec}: {module_name} has no callable {attr}")
    try:
        policy = getattr(module, attr)()
    except Exception as err:
        fail(f"--expert {spec}: {attr}() failed (it must take no arguments and return a callable "
             f"observation -> action): {type(err).__name__}: {err}")
    if not callable(policy):
        fail(f"--expert {spec}: {attr}() returned {type(policy).__name__}, not a callable observation -> action")
    return policy
