"""TD3+BC: TD3 whose actor loss adds a behaviour-cloning term, with Q normalised by its own scale.

Lecture sections: "Idea: TD3+BC" (TD3's twin critics, target policy smoothing and delayed policy updates,
plus `lambda Q(s, pi(s)) - (pi(s) - a)^2` with `lambda = alpha / mean|Q|` and state normalisation), under
"Policy-Constrained Offline RL" ("Match the distance: TD3+BC").
Paper: Fujimoto & Gu 2021, "A Minimalist Approach to Offline Reinforcement Learning" (TD3: Fujimoto et al.
2018, "Addressing Function Approximation Error in Actor-Critic Methods").

Usage:
    python algorithms/td3_bc.py                               # embedded default: local pendulum data
    python algorithms/td3_bc.py --env hopper-medium-v2
    python algorithms/td3_bc.py --online-steps 20000          # then 20k env steps of online fine-tuning

Continuous actions only. The paper uses one set of hyperparameters for every D4RL dataset (alpha = 2.5,
1M steps); only the training length differs here, for the small local and test datasets, in
`DATASET_SETTINGS` below; flags override it.
Online fine-tuning (--online-steps; common/online.py) has no published protocol for TD3+BC (CORL's finetune/
suite has none, and the paper is offline only). This file does what the TD3 family does: the policy acts as TD3
explores, pi(s) + N(0, (sigma max_action)^2) with sigma = --online-explore-noise 0.1 (TD3's expl_noise, whose
flag TD3+BC's code keeps), clipped to the action box; online transitions join the offline data in one buffer sampled uniformly (as CORL's
AWAC, IQL and CQL fine-tuning); one update per env step; the loss keeps its BC term and alpha unchanged online
(no switch).
Beware on tasks with dense negative rewards such as Pendulum: lambda divides by mean|Q|, which there is a
large baseline (hundreds) next to the few units by which the action changes Q, so alpha = 2.5 leaves the
actor cloning the data's mean action; a much larger --alpha is needed (the tests use 200 on a mixed
expert/random pendulum set, where the uniform-random half covers the whole action range).

--compile compiles the whole update (forward, backward, both Adam steps, both target updates; static shapes;
the smoothing noise drawn on the device inside) and on CUDA replays it as CUDA graphs (mode reduce-overhead).
The delayed actor update is a Python bool, so the step is compiled twice (with and without the actor); the
actor's logs are copied for the steps in between (a CUDA graph's outputs are overwritten by its next replay).
torch.optim breaks the graph around every optimizer.step() on purpose, so the step runs as up to 5 graphs
(critic forward+backward, its Adam step, the actor's, its Adam step, the target updates) back to back;
zero_grad runs just before, outside the compiled step (torch.compile does not trace it).
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, TensorSampler, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.networks import CriticEnsemble  # noqa: E402
from common.online import OnlinePhase  # noqa: E402
from common.optim import adam, keep, load_optimizer, update_step  # noqa: E402
from common.runs import Run, resolve_config, run_cli, setup  # noqa: E402


@dataclass
class Config:
    # --- shared by every algorithm (same names, order and meaning in every file) ---
    env: str = "local/pendulum/medium-replay-v0"
    """dataset: a D4RL name (hopper-medium-v2), a Minari id (mujoco/hopper/expert-v0) or a local build
    (local/pendulum/medium-replay-v0); `python -m common.datasets --list` shows what is stored locally"""
    seed: int = 0
    """seed for network initialisation, minibatch sampling and evaluation episodes"""
    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu, cuda or cuda:N"""
    threads: int = 1
    """torch CPU threads (1 is fastest for small MLPs and never stalls when another process holds a core)"""
    max_steps: int | None = None
    """gradient steps (None: from DATASET_SETTINGS)"""
    batch_size: int = 256
    """minibatch size (the papers' 256)"""
    eval_every: int = 5_000
    """evaluate every this many steps (0: only at the end)"""
    eval_episodes: int = 10
    """evaluation episodes, stepped together in a vector env"""
    log_every: int = 1_000
    """write metrics every this many steps"""
    checkpoint_every: int = 10_000
    """write a checkpoint every this many steps (and at the end)"""
    checkpoint_dir: str | None = None
    """where checkpoint.pt goes (None: the run directory)"""
    resume: str | None = None
    """continue from this run directory (or checkpoint file) with the same --env and --seed"""
    track: bool = False
    """log to Weights & Biases (respects WANDB_MODE, e.g. offline)"""
    wandb_project: str = "offline-rl"
    """Weights & Biases project"""
    runs_dir: str = "runs"
    """runs go to <runs_dir>/<algo>/<dataset>/<seed>-<time>/"""
    download: bool = True
    """download Minari datasets that are not stored locally (when online)"""
    compile: bool = False
    """torch.compile the update (faster after a warm-up compilation)"""
    online_steps: int = 0
    """env steps of online fine-tuning after the offline phase, one update each (0: offline only; see
    common/online.py; a file whose Agent cannot explore refuses any other value)"""
    capture_video: bool = False
    """record the final evaluation's first episodes (and, with --eval-every, periodic ones) as MP4 in the run
    directory, and to W&B with --track"""
    # --- TD3+BC ---
    alpha: float = 2.5
    """alpha in lambda = alpha / (1/N sum |Q(s_i, a_i)|): weight of the Q term against the BC term"""
    gamma: float = 0.99
    """gamma, the discount in y = r + gamma (1 - d) min_i Q_theta'_i(s', a~)"""
    tau: float = 0.005
    """tau in the target updates theta' <- tau theta + (1 - tau) theta'"""
    policy_noise: float = 0.2
    """sigma~ of the target policy smoothing noise eps ~ clip(N(0, sigma~), -c, c), times max_action"""
    noise_clip: float = 0.5
    """c, the clip of the target policy smoothing noise, times max_action"""
    policy_freq: int = 2
    """d: the actor and the target networks are updated every d critic updates ("if t mod d")"""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor pi_phi"""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics Q_theta1, Q_theta2"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the actor and of each critic"""
    normalize_obs: bool = True
    """state normalisation s_i = (s_i - mu_i) / (sigma_i + eps) with eps = 1e-3 (the paper's trick)"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = None
    """fraction of each online-phase batch drawn from the offline data (None: uniform over the offline and online
    rows, one growing buffer; no published TD3+BC rule: the single buffer of CORL's AWAC, IQL and CQL
    fine-tuning)"""
    online_explore_noise: float = 0.1
    """sigma of the exploration noise when acting online, a = clip(pi(s) + N(0, (sigma max_action)^2)) (TD3's
    online_explore_noise 0.1, Fujimoto et al. 2018; unclipped noise, the action clipped to the box)"""


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The paper trains 1M steps on every D4RL dataset; the small local and test
# datasets (a few thousand transitions of Pendulum) need far fewer.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("local/pendulum/*", {"max_steps": 30_000}),
    ("test/*", {"max_steps": 5_000}),
    ("*", {"max_steps": 1_000_000}),
]


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy pi_phi(s) = max_action * tanh(MLP(s))."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, act_dim)
        self.max_action = max_action

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class Agent:
    """Actor, twin critics, their targets and optimisers, and the TD3+BC update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("TD3+BC needs continuous (Box) actions; this dataset has discrete actions "
                 "(use a discrete method such as bc on it)")
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.actor = Actor(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims, 2).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.total_it = 0  # python int: choosing whether to update the actor needs no device sync
        zero = torch.zeros((), device=device)
        # the actor's logs from its last update (TD3 updates it every `policy_freq` steps)
        self.actor_logs = {"train/actor_loss": zero, "train/bc_loss": zero, "train/lambda": zero,
                           "train/q_policy": zero}
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.total_it += 1
        # Delayed policy updates: "if t mod d then" update phi and the target networks   (lecture: "Idea: TD3+BC")
        # (a Python bool: --compile compiles the step twice, with and without the actor update)
        update_actor = self.total_it % self.config.policy_freq == 0
        logs = self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["terminals"],
                            update_actor)
        if update_actor:
            self.actor_logs = keep({key: logs[key] for key in self.actor_logs})  # logged until the next
        return {**logs, **self.actor_logs}

    def _update_impl(self, obs, actions, rewards, next_obs, terminals, update_actor: bool) -> dict[str, torch.Tensor]:
        logs = self._critic_step(obs, actions, rewards, next_obs, terminals)
        if update_actor:
            logs.update(self._actor_step(obs, actions))
        return logs

    def _critic_step(self, obs, actions, rewards, next_obs, terminals) -> dict[str, torch.Tensor]:
        c = self.config
        with torch.no_grad():
            # a~ <- pi_phi'(s') + eps,  eps ~ clip(N(0, sigma~), -c, c)   (target policy smoothing)
            noise = (torch.randn_like(actions) * c.policy_noise * self.max_action).clamp(
                -c.noise_clip * self.max_action, c.noise_clip * self.max_action)
            next_actions = (self.actor_target(next_obs) + noise).clamp(-self.max_action, self.max_action)
            # y = r + gamma (1 - d) min_{i=1,2} Q_theta'_i(s', a~)   (lecture: "Idea: TD3+BC", TD3's target)
            target_q = self.critic_target(next_obs, next_actions).min(0).values
            y = rewards + c.gamma * (1.0 - terminals) * target_q
        q = self.critic(obs, actions)  # (2, B)
        # theta_i <- argmin_theta_i N^-1 sum (y - Q_theta_i(s, a))^2, both critics (summed)
        critic_loss = ((q - y) ** 2).mean(1).sum()
        # logged values are taken before the backward (which consumes the graph they hang on)
        logs = {"train/critic_loss": critic_loss.detach(), "train/q_data": q.detach()[0].mean()}
        critic_loss.backward()
        self.critic_optimizer.step()
        return logs

    def _actor_step(self, obs, actions) -> dict[str, torch.Tensor]:
        c = self.config
        pi = self.actor(obs)
        q1 = self.critic.q1(obs, pi)  # Q_theta1(s, pi(s)); the actor's gradient stops at the action
        # lambda = alpha / ( 1/N sum_i |Q(s_i, a_i)| ), a constant   (lecture: "Idea: TD3+BC"; Q taken at
        # a_i = pi(s_i), as the paper's code: lmbda = alpha / Q.abs().mean().detach())
        lmbda = c.alpha / q1.abs().mean().detach()
        bc_loss = F.mse_loss(pi, actions)
        # pi = argmax_pi E_(s,a)~D [ lambda Q(s, pi(s)) - (pi(s) - a)^2 ]   (as a loss to minimise)
        actor_loss = -lmbda * q1.mean() + bc_loss
        logs = {"train/actor_loss": actor_loss.detach(), "train/bc_loss": bc_loss.detach(),
                "train/lambda": lmbda, "train/q_policy": q1.detach().mean()}
        actor_loss.backward()
        self.actor_optimizer.step()
        with torch.no_grad():
            # theta'_i <- tau theta_i + (1 - tau) theta'_i ;  phi' <- tau phi + (1 - tau) phi'
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), c.tau)
            torch._foreach_lerp_(list(self.actor_target.parameters()), list(self.actor.parameters()), c.tau)
        return logs

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action pi_phi(s)."""
        return self.actor(obs)

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The online phase's action, TD3's exploration: pi_phi(s) + eps, eps ~ N(0, (sigma max_action)^2) with sigma
        = online_explore_noise (torch's global RNG, saved in checkpoints), clipped to the action bounds."""
        action = self.actor(obs)
        noise = torch.randn_like(action) * self.config.online_explore_noise * self.max_action
        return (action + noise).clamp(-self.max_action, self.max_action)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q_theta1, Q_theta2)(s, a), shape (batch,): the estimate TD3's target trusts."""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
                "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "total_it": self.total_it,
                "actor_logs": {k: v.clone() for k, v in self.actor_logs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        self.total_it = int(state["total_it"])
        self.actor_logs = {k: v.to(self.device) for k, v in state["actor_logs"].items()}


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"TD3+BC needs continuous actions; '{config.env}' has discrete actions")
    data = dataset.transitions()
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({"obs": norm(data["obs"]), "actions": data["actions"], "rewards": data["rewards"],
                             "next_obs": norm(data["next_obs"]), "terminals": data["terminals"]},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py)
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_transform="none")

    run = Run("td3_bc", config, dataset, device, normalizer)
    start = run.resume(agent, phase)
    envs = make_eval_envs(dataset, config.eval_episodes)
    for step in run.steps(start):
        if phase.online(step):  # the online phase: the current policy acts once in the env, the step is stored
            episode = phase.interact()
            if episode:
                run.log(step, episode)
        logs = agent.update(phase.sample(config.batch_size))
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                run.log_eval(step, evaluate(agent.act, dataset, normalizer, config.eval_episodes,
                                            config.seed, device, envs, video=run.video_for(step)))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, phase)
    result = evaluate(agent.act, dataset, normalizer, config.eval_episodes, config.seed, device, envs,
                      video=run.video_for(run.total_steps))
    run.log_eval(run.total_steps, result)
    envs.close()
    return run.finish(result, phase.summary())


if __name__ == "__main__":
    run_cli(train, Config)
