"""Shared test fixtures: a private Minari root and small datasets the tests build themselves.

Nothing here downloads anything. The pendulum datasets come from a scripted controller (energy pumping
for the swing-up, PD control at the top; about -140 return against about -1200 for uniform random
actions), so the learning tests know the expert's return exactly and build their data in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.datasets import save_episodes  # noqa: E402
from common.envs.pendulum import pendulum_expert  # noqa: E402,F401  (the scripted expert of the test datasets)

torch.set_num_threads(1)


def cartpole_expert(obs: np.ndarray) -> np.ndarray:
    """Scripted CartPole-v1 controller (push towards where the pole falls); returns 500 every episode."""
    x, x_dot, theta, theta_dot = obs[..., 0], obs[..., 1], obs[..., 2], obs[..., 3]
    return (theta + 0.3 * theta_dot + 0.01 * x + 0.1 * x_dot > 0).astype(np.int64)


def epsilon_greedy(policy, epsilon: float, n_actions: int, seed: int):
    """`policy` with probability 1 - epsilon, a uniformly random action otherwise."""
    rng = np.random.default_rng(seed)

    def act(obs):
        return int(rng.integers(n_actions)) if rng.uniform() < epsilon else int(policy(obs))

    return act


def rollout_episodes(env_id: str, policy, episodes: int, seed: int, noise: float = 0.0,
                     rng: np.random.Generator | None = None) -> list[dict]:
    """Whole episodes of `policy` (obs -> action, or None for uniform random) with Gaussian action noise."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    rng = rng or np.random.default_rng(seed)
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            action = env.action_space.sample() if policy is None else policy(obs)
            if noise and policy is not None:
                action = np.clip(action + noise * rng.standard_normal(action.shape),
                                 env.action_space.low, env.action_space.high).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            o.append(obs), a.append(action), r.append(reward), te.append(terminated), tr.append(truncated)
            if terminated or truncated:
                break
        out.append({"observations": np.asarray(o), "actions": np.asarray(a), "rewards": np.asarray(r),
                    "terminations": np.asarray(te), "truncations": np.asarray(tr), "seed": seed + i})
    env.close()
    return out


def mean_return(episodes: list[dict]) -> float:
    return float(np.mean([np.sum(e["rewards"]) for e in episodes]))


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory) -> Path:
    """A private Minari root for the whole test session (MINARI_DATASETS_PATH points to it)."""
    root = tmp_path_factory.mktemp("minari")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = previous


@pytest.fixture(scope="session")
def pendulum_refs(minari_root) -> dict:
    """Reference returns measured on 20 evaluation episodes: uniform random and the scripted expert."""
    random_eps = rollout_episodes("Pendulum-v1", None, 20, seed=50_000)
    expert_eps = rollout_episodes("Pendulum-v1", pendulum_expert, 20, seed=50_000)
    return {"random": mean_return(random_eps), "expert": mean_return(expert_eps)}


@pytest.fixture(scope="session")
def pendulum_expert_id(minari_root, pendulum_refs) -> str:
    """`test/pendulum/expert-v0`: 50 episodes (10k steps) of the scripted expert with action noise 0.1."""
    dataset_id = "test/pendulum/expert-v0"
    episodes = rollout_episodes("Pendulum-v1", pendulum_expert, 50, seed=0, noise=0.1)
    save_episodes(dataset_id, episodes, "Pendulum-v1", ref_min_score=pendulum_refs["random"],
                  ref_max_score=pendulum_refs["expert"], algorithm_name="scripted-expert")
    return dataset_id


@pytest.fixture(scope="session")
def pendulum_mixed_id(minari_root, pendulum_refs) -> str:
    """`test/pendulum/mixed-v0`: 15 expert episodes and 45 uniform-random episodes (12k steps)."""
    dataset_id = "test/pendulum/mixed-v0"
    expert = rollout_episodes("Pendulum-v1", pendulum_expert, 15, seed=1_000, noise=0.1)
    random = rollout_episodes("Pendulum-v1", None, 45, seed=2_000)
    save_episodes(dataset_id, expert + random, "Pendulum-v1", ref_min_score=pendulum_refs["random"],
                  ref_max_score=pendulum_refs["expert"], algorithm_name="scripted-expert+random")
    return dataset_id


@pytest.fixture(scope="session")
def cartpole_mixed_id(minari_root) -> str:
    """`test/cartpole/mixed-v0`: the scripted expert at epsilon 0.1 (4 episodes), 0.5 (10), 1.0 (30).

    Behaviour return about 90 against 500 for the expert: a dataset where improvement is possible.
    """
    dataset_id = "test/cartpole/mixed-v0"
    episodes, seed = [], 3_000
    for epsilon, count in ((0.1, 4), (0.5, 10), (1.0, 30)):
        for _ in range(count):
            episodes += rollout_episodes("CartPole-v1", epsilon_greedy(cartpole_expert, epsilon, 2, seed), 1,
                                         seed=seed)
            seed += 1
    save_episodes(dataset_id, episodes, "CartPole-v1", ref_min_score=22.0, ref_max_score=500.0,
                  algorithm_name="scripted-expert, epsilon-greedy 0.1/0.5/1.0")
    return dataset_id


@pytest.fixture(scope="session")
def pendulum_no_reward_id(minari_root) -> str:
    """`test/pendulum/no-reward-v0`: 3 uniform-random Pendulum episodes whose rewards are all 0 (bad input)."""
    dataset_id = "test/pendulum/no-reward-v0"
    episodes = rollout_episodes("Pendulum-v1", None, 3, seed=9)
    for episode in episodes:
        episode["rewards"] = np.zeros_like(episode["rewards"])
    save_episodes(dataset_id, episodes, "Pendulum-v1")
    return dataset_id


@pytest.fixture(scope="session")
def inverted_pendulum_random_id(minari_root) -> str:
    """`test/inverted-pendulum/random-v0`: 150 uniform-random InvertedPendulum-v5 episodes (about 900 steps,
    one in six ends in a termination: |angle| > 0.2)."""
    dataset_id = "test/inverted-pendulum/random-v0"
    save_episodes(dataset_id, rollout_episodes("InvertedPendulum-v5", None, 150, seed=11), "InvertedPendulum-v5")
    return dataset_id


@pytest.fixture(scope="session")
def fork_expert_id(minari_root) -> str:
    """`local/fork/expert-v0` exactly as `python -m common.build fork` builds it: the two-mode expert of
    PointFork-v0 (common/envs/fork.py), left or right 50/50, action noise 0.1; 5000 steps, about 425 episodes."""
    from common.build import recipe

    assert recipe.main(["fork", "--qualities", "expert", "--skip-existing"]) == 0
    return "local/fork/expert-v0"


def behaviour_return(dataset_id: str) -> float:
    """Mean episode return of a dataset: the behaviour policy's return."""
    from common.datasets import load_dataset

    return float(np.mean([e.total_return for e in load_dataset(dataset_id).episodes]))


def run_config(config_type, env: str, tmp_path: Path, **overrides):
    """A config for a fast in-process test run: outputs under tmp_path, no periodic evaluation."""
    fields = dict(env=env, seed=0, device="cpu", threads=1, eval_every=0, eval_episodes=5,
                  log_every=500, checkpoint_every=0, runs_dir=str(tmp_path / "runs"), download=False)
    fields.update(overrides)
    return config_type(**fields)


def load_algorithm(name: str):
    """Import `algorithms/<name>.py` (the algorithm files are scripts, not a package)."""
    from common.checkpoint import import_algorithm

    return import_algorithm(name)


def random_batch(n: int, obs_dim: int, act_dim: int, max_action: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random transition batch for update tests: standard-normal observations and rewards, actions uniform
    in [-max_action, max_action], terminals with probability 0.3; the same tensors for the same arguments."""
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, obs_dim, generator=g),
            "actions": 2 * max_action * torch.rand(n, act_dim, generator=g) - max_action,
            "rewards": torch.randn(n, generator=g), "next_obs": torch.randn(n, obs_dim, generator=g),
            "terminals": (torch.rand(n, generator=g) < 0.3).float()}


def checkpoint_agent(run_dir) -> dict:
    """The agent's state saved in `<run_dir>/checkpoint.pt`."""
    return torch.load(f"{run_dir}/checkpoint.pt", weights_only=False)["agent"]


def train_straight_and_resumed(module, dataset_id: str, tmp_path: Path, first_steps: int, total_steps: int,
                               **config) -> tuple[dict, dict, dict, dict]:
    """Train `module` straight to `total_steps` (under tmp_path/a), and to `first_steps` then resumed to
    `total_steps` (under tmp_path/b). Returns (straight summary, resumed summary, straight agent state,
    resumed agent state), the states read from each run's final checkpoint.pt."""
    straight = module.train(run_config(module.Config, dataset_id, tmp_path / "a", max_steps=total_steps, **config))
    first = module.train(run_config(module.Config, dataset_id, tmp_path / "b", max_steps=first_steps, **config))
    resumed = module.train(run_config(module.Config, dataset_id, tmp_path / "b", max_steps=total_steps,
                                      resume=first["run_dir"], **config))
    assert resumed["run_dir"] == first["run_dir"]
    return straight, resumed, checkpoint_agent(straight["run_dir"]), checkpoint_agent(resumed["run_dir"])


def assert_states_equal(a: dict, b: dict, nets) -> None:
    """Every tensor of `a[net]` equals (torch.equal) the one of `b[net]`, for each net in `nets`."""
    for net in nets:
        assert a[net].keys() == b[net].keys(), (net, sorted(a[net].keys() ^ b[net].keys()))
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs between the two runs"


def env_step_samples(env_id: str, count: int, seed: int, **env_kwargs) -> tuple[dict[str, np.ndarray], object]:
    """`count` steps of the env itself from varied states, for checking a termination rule against the env:
    returns ({obs, actions, next_obs, terminated, state}, the env's spec with its kwargs), where `state` is the
    simulator's state_vector() after the step (NaN for envs without one). Every other step starts
    from a state set by hand (MuJoCo envs: positions and velocities perturbed, now and then one joint far
    out), so that many steps leave the healthy ranges; the others continue random-action play."""
    env = gym.make(env_id, **env_kwargs)
    env.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    base = env.unwrapped
    rows = {"obs": [], "actions": [], "next_obs": [], "terminated": [], "state": []}
    obs, _ = env.reset(seed=seed)
    for i in range(count):
        if i % 2 == 1 and hasattr(base, "set_state"):
            qpos = base.init_qpos + rng.normal(0.0, 0.4, base.model.nq)
            if rng.uniform() < 0.1:
                qpos[rng.integers(2, base.model.nq)] = rng.choice([-1.0, 1.0]) * rng.uniform(95.0, 110.0)
            base.set_state(qpos, rng.normal(0.0, 2.0, base.model.nv))
            obs = base._get_obs()
        action = env.action_space.sample()
        next_obs, _, terminated, truncated, _ = env.step(action)
        state = base.state_vector() if hasattr(base, "state_vector") else np.full(1, np.nan)
        for key, value in (("obs", obs), ("actions", action), ("next_obs", next_obs), ("terminated", terminated),
                           ("state", state)):
            rows[key].append(value)
        obs = env.reset(seed=seed + i + 1)[0] if terminated or truncated else next_obs
    spec = env.spec
    env.close()
    return {k: np.asarray(v, dtype=bool if k == "terminated" else np.float32) for k, v in rows.items()}, spec


def run_algorithm_cli(name: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python algorithms/<name>.py ARGS` in a subprocess, offline, in this session's Minari root (if set)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # never wait on the network in tests
    return subprocess.run([sys.executable, str(ROOT / "algorithms" / f"{name}.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 2, no traceback, and exactly one `error:` line on stderr, containing `pattern`."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


def train_rows(run_dir, key: str = "train/actor_loss") -> dict[int, dict[str, float]]:
    """step -> the train/ values logged there, for the metrics rows that hold `key`."""
    import json

    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if key in r}


def assert_same_train_logs(straight: dict, resumed: dict, key: str = "train/actor_loss",
                           steps: list[int] | None = None) -> None:
    """The resumed run logged the straight run's train/ values at each of its steps (it may log one more row where
    its first segment ended); `steps`: the straight run's steps exactly."""
    want, got = train_rows(straight["run_dir"], key), train_rows(resumed["run_dir"], key)
    if steps is not None:
        assert sorted(want) == steps
    assert want and all(step in got and want[step] == got[step] for step in want)


def assert_same_online_phase(straight: dict, resumed: dict, rows: int | None = None,
                             summary_keys=("normalized_score_mean", "offline_normalized_score_mean",
                                           "online_regret", "online_episodes")) -> dict[str, torch.Tensor]:
    """Two runs with an online phase ended alike: every column of the online buffer in their last checkpoints
    (`rows` of them, when given) and the summary's scores and regret. Returns the first run's buffer."""
    buffers = [torch.load(f"{r['run_dir']}/checkpoint.pt", weights_only=True)["sampler"]["rows"]
               for r in (straight, resumed)]
    if rows is not None:
        assert buffers[0]["obs"].shape[0] == rows
    for key in buffers[0]:
        assert torch.equal(buffers[0][key], buffers[1][key]), key
    for key in summary_keys:
        assert straight[key] == resumed[key], key
    return buffers[0]
