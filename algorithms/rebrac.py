"""ReBRAC: TD3+BC with decoupled behaviour penalties, one in the actor's loss (beta_1) and one in the critic's
target (beta_2), LayerNorm in the critics, deeper networks and large batches.

Lecture sections: "Idea: TD3+BC" (TD3's twin critics, target policy smoothing and delayed policy updates; the
actor's `lambda Q(s, pi(s)) - (pi(s) - a)^2`), and "Policy-Constrained Methods" ("Match the distance: TD3+BC";
the constraint d(pi, pi_beta) <= eps relaxed into penalties): ReBRAC puts the distance penalty in both steps,
policy improvement (as TD3+BC) and policy evaluation (as BRAC's value penalty), each with its own weight.
Paper: Tarasov, Kurenkov, Nikulin & Kolesnikov 2023, "Revisiting the Minimalist Approach to Offline
Reinforcement Learning" (NeurIPS 2023). Settings and update order from the authors' code as CORL runs it
(corl-team/CORL algorithms/offline/rebrac.py, JAX; configs identical to DT6A/ReBRAC before its "calibration"
merge).

Usage:
    python algorithms/rebrac.py                               # embedded default: local pendulum data
    python algorithms/rebrac.py --env hopper-medium-v2
    python algorithms/rebrac.py --env antmaze-umaze-v2 --batch-size 256   # antmaze, Adroit, maze2d: batch 256
    python algorithms/rebrac.py --online-steps 20000          # then 20k env steps of online fine-tuning

Continuous actions only. The authors tuned beta_1 (`--actor-beta`) and beta_2 (`--critic-beta`) per dataset,
and the learning rates, gamma and the reward scale per family (antmaze: r x 100, gamma 0.999, critic lr 5e-5):
all in `DATASET_SETTINGS` below; flags override them. The batch is 1024 for locomotion and 256 for antmaze,
Adroit and maze2d, where it must be given as `--batch-size 256` (the shared field has one default; train()
prints a note). A dataset without a row (kitchen, Minari's other sets) needs --actor-beta and --critic-beta.
Observations are not normalised (the authors' setting; d3rlpy's reproduction normalises, `--normalize-obs`).
The authors evaluate antmaze on 100 episodes (`--eval-episodes 100`).

Online fine-tuning (--online-steps N; common/online.py) as CORL's finetune/rebrac.py: the policy acts greedily,
a = pi_phi(s) (`online_explore_noise` 0.0, CORL's expl_noise in every config; a positive value adds Gaussian noise);
every batch is half offline rows, half online rows (`online_mix` 0.5, CORL's mixing_ratio); one update per env
step; the optimisers carry on (CORL's reset_opts false). From the first online update on, beta_1 decays as
beta_1 max(0.5, 1 - k / N_on) after k online updates (CORL's max(min_decay_coef, (N_on + N_off - t) / N_on):
linear to beta_1 / 2 at mid-phase, flat after; `online_actor_beta_floor`), and beta_2 becomes 0
(`online_critic_beta`), for the offline rows of a batch too. Online rewards are scaled by reward_scale as the
offline ones. CORL's antmaze fine-tuning configs keep the offline configs' batch 256, learning rates and gamma
but differ in two values: normalize_reward false (raw rewards, no r x 100) and umaze's beta_2 (1.0 for 0.002);
this file keeps the offline settings in both phases.

The critic's penalty reads the dataset's next action a'_D, so each transition carries `next_actions`, built
from the episodes in `transitions_with_next_actions()`: the last step of an episode that ends by termination
keeps a placeholder (the (1 - d) mask removes the penalty with the bootstrap), and the last step of an episode
cut by a time limit (or by the end of the data) is dropped, as the authors' loader drops it (see there why).
Online rows take a'_D from the online buffer: the action the policy took at the next step (CORL stores the
policy's action at s' recomputed when the step is stored: the same up to one update of the actor) and, for an
episode's last step, its own action a_T (the buffer keeps every step; none is dropped). After a termination the
(1 - d) mask removes the penalty, as offline. After a time-limit truncation the target bootstraps from s_{T+1}
but its penalty compares a~' = pi'(s_{T+1}) + eps with a_T, the action at the state before: beta_2 ||a~' - a_T||^2
exceeds the other rows' by about how far the policy's action moves in one step, so that one backup per
truncated episode (1 in 200 on Pendulum, 1 in 1000 on D4RL locomotion) is lowered a little more than the rest.
With CORL's beta_2 = 0 online (`online_critic_beta` 0.0) the penalty is multiplied by 0 and this never matters.

--compile compiles the whole update (both losses, both Adam steps, the target updates; the smoothing noise drawn
on the device inside). The delayed actor update is a Python bool, so the step compiles to two graphs (with and
without the actor); the actor's logs are copied for the steps in between. beta_1 and beta_2 are device tensors
that the online phase changes in place, so the online updates replay the same two graphs. torch.optim breaks the
graph around each optimizer.step() on purpose; zero_grad runs outside the compiled step (common/optim.py).
"""

from __future__ import annotations

import copy
import fnmatch
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, OfflineDataset, TensorSampler, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import evaluate, make_eval_envs  # noqa: E402
from common.networks import CriticEnsemble  # noqa: E402
from common.online import OnlinePhase  # noqa: E402
from common.optim import adam, keep, load_optimizer, update_step  # noqa: E402
from common.runs import Run, resolve_config, run_cli, setup  # noqa: E402

PAPER_BATCH_SIZE = 1024  # the authors' locomotion batch (antmaze, Adroit and maze2d: 256)
SMALL_BATCH_SIZE = 256  # the authors' batch for antmaze, Adroit and maze2d


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
    batch_size: int = PAPER_BATCH_SIZE
    """minibatch size (the authors' 1024 for locomotion; give 256 for antmaze, Adroit and maze2d)"""
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
    # --- ReBRAC ---
    actor_beta: float | None = None
    """beta_1 in the actor's loss beta_1 ||pi(s) - a||^2 - lambda min_i Q_i(s, pi(s)) (None: from
    DATASET_SETTINGS, the authors' value for the dataset)"""
    critic_beta: float | None = None
    """beta_2 in the critic's target y = r + gamma (1 - d) [ min_i Q'_i(s', a~') - beta_2 ||a~' - a'_D||^2 ]
    (None: from DATASET_SETTINGS, the authors' value for the dataset)"""
    gamma: float | None = None
    """gamma, the discount in the target y (None: from DATASET_SETTINGS; 0.99, antmaze 0.999)"""
    tau: float = 0.005
    """tau in the target updates theta' <- tau theta + (1 - tau) theta'"""
    policy_noise: float = 0.2
    """sigma~ of the target policy smoothing noise eps ~ clip(N(0, sigma~), -c, c), times max_action"""
    noise_clip: float = 0.5
    """c, the clip of the target policy smoothing noise, times max_action"""
    policy_freq: int = 2
    """d: the actor and the targets are updated at steps 0, d, 2d, ... (counted from 0, as the authors' code)"""
    actor_lr: float | None = None
    """Adam learning rate of the actor pi_phi (None: from DATASET_SETTINGS; 1e-3 locomotion, 3e-4 otherwise)"""
    critic_lr: float | None = None
    """Adam learning rate of the twin critics (None: from DATASET_SETTINGS; 1e-3 locomotion, 5e-5 antmaze,
    3e-4 Adroit and maze2d)"""
    reward_scale: float | None = None
    """rewards are multiplied by this before training (None: from DATASET_SETTINGS; 100 on antmaze, "like in
    LAPO" in the authors' code, else 1)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the actor and of each critic (the authors' 3 x 256)"""
    normalize_obs: bool = False
    """state normalisation (s - mu) / (sigma + 1e-3) (off in all the authors' configs)"""
    # --- online fine-tuning (--online-steps) ---
    online_mix: float | None = 0.5
    """fraction of each online-phase batch drawn from the offline data (CORL's mixing_ratio 0.5: two buffers,
    half and half; None: uniform over the offline and online rows, one growing buffer)"""
    online_explore_noise: float = 0.0
    """sigma of the exploration noise when acting online, a = clip(pi(s) + N(0, (sigma max_action)^2)) (CORL's
    expl_noise 0.0 in every fine-tuning config: the greedy action pi(s))"""
    online_actor_beta_floor: float = 0.5
    """the floor of beta_1's online decay beta_1 max(floor, 1 - k / online_steps) after k online updates (CORL's
    min_decay_coef 0.5: beta_1 halves linearly over the first half of the online phase, then stays)"""
    online_critic_beta: float = 0.0
    """beta_2 from the first online update on (CORL's fine-tuning: 0, the critic's penalty off online)"""


# The authors' per-family settings (CORL configs/offline/rebrac/<family>/*.yaml, = DT6A/ReBRAC configs/rebrac):
LOCOMOTION = {"actor_lr": 1e-3, "critic_lr": 1e-3, "gamma": 0.99, "reward_scale": 1.0, "max_steps": 1_000_000}
ANTMAZE = {"actor_lr": 3e-4, "critic_lr": 5e-5, "gamma": 0.999, "reward_scale": 100.0, "max_steps": 1_000_000}
ADROIT = {"actor_lr": 3e-4, "critic_lr": 3e-4, "gamma": 0.99, "reward_scale": 1.0, "max_steps": 1_000_000}

# (beta_1, beta_2) per dataset, from the same configs (actor_bc_coef, critic_bc_coef); the authors swept
# beta_1 in {0.001, 0.01, 0.05, 0.1} and beta_2 in {0, 0.001, 0.01, 0.1, 0.5} (antmaze: smaller grids)
LOCOMOTION_BETAS = {
    "halfcheetah": {"random": (0.001, 0.1), "medium": (0.001, 0.01), "medium-replay": (0.01, 0.001),
                    "medium-expert": (0.01, 0.1), "expert": (0.01, 0.01), "full-replay": (0.001, 0.1)},
    "hopper": {"random": (0.001, 0.01), "medium": (0.01, 0.01), "medium-replay": (0.05, 0.5),
               "medium-expert": (0.1, 0.01), "expert": (0.1, 0.1), "full-replay": (0.01, 0.01)},
    "walker2d": {"random": (0.01, 0.0), "medium": (0.05, 0.1), "medium-replay": (0.05, 0.01),
                 "medium-expert": (0.01, 0.01), "expert": (0.01, 0.5), "full-replay": (0.01, 0.01)},
}
ANTMAZE_BETAS = {"umaze": (0.003, 0.002), "umaze-diverse": (0.003, 0.001), "medium-play": (0.001, 0.0005),
                 "medium-diverse": (0.001, 0.0), "large-play": (0.002, 0.001), "large-diverse": (0.002, 0.002)}
ADROIT_BETAS = {
    "pen": {"human": (0.1, 0.5), "cloned": (0.05, 0.5), "expert": (0.01, 0.01)},
    "door": {"human": (0.1, 0.1), "cloned": (0.01, 0.1), "expert": (0.05, 0.01)},
    "hammer": {"human": (0.01, 0.5), "cloned": (0.1, 0.5), "expert": (0.01, 0.01)},
    "relocate": {"human": (0.1, 0.01), "cloned": (0.1, 0.01), "expert": (0.05, 0.01)},
}
MAZE2D_BETAS = (0.003, 0.001)  # umaze, medium and large alike


def _betas(pair: tuple[float, float]) -> dict:
    return {"actor_beta": pair[0], "critic_beta": pair[1]}


# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. D4RL names first, then Minari's ids (a name-only match: Minari regenerated the
# data), then the local D4RL-recipe builds (local/hopper/medium-replay-v0, local/hopper-150k/...). The pendulum
# and test rows are this library's (the authors have no such data): see the comment there.
DATASET_SETTINGS: list[tuple[str, dict]] = [
    *[(pattern, {**LOCOMOTION, **_betas(pair)})
      for family, rows in LOCOMOTION_BETAS.items() for quality, pair in rows.items()
      for pattern in (f"{family}-{quality}-v*", f"mujoco/{family}/{quality}-v*", f"local/{family}*/{quality}-v*")],
    *[(pattern, {**ANTMAZE, **_betas(pair)}) for maze, pair in ANTMAZE_BETAS.items()
      for pattern in (f"antmaze-{maze}-v*", f"D4RL/antmaze/{maze}-v*")],
    *[(pattern, {**ADROIT, **_betas(pair)}) for task, rows in ADROIT_BETAS.items() for quality, pair in rows.items()
      for pattern in (f"{task}-{quality}-v*", f"D4RL/{task}/{quality}-v*")],
    *[(pattern, {**ADROIT, **_betas(MAZE2D_BETAS)}) for pattern in ("maze2d-*", "D4RL/pointmaze/*")],
    # Pendulum (per-step costs in [-16, 0]): lambda = 1 / mean|Q| divides by a large baseline (|Q| ~ 100-800 at
    # gamma 0.99) next to the few units by which the action changes Q, so the Q term pulls on the actor with
    # ~1e-2 and beta_1 must be of that order or smaller for the actor to leave the data's mean action: 0.003
    # (medium-replay, seed 0: score 5 -> 89 by step 9k, flat to 12k; beta_1 = 0.05 clones the mean action)
    ("local/pendulum/*", {**LOCOMOTION, "actor_beta": 0.003, "critic_beta": 0.01, "max_steps": 10_000}),
    ("test/*", {**LOCOMOTION, "actor_beta": 0.003, "critic_beta": 0.01, "max_steps": 5_000}),
    # anything else: the locomotion family's settings; beta_1 and beta_2 have no published value there, so
    # such a run asks for --actor-beta and --critic-beta (one line, before anything is written)
    ("*", LOCOMOTION),
]
# the families whose published batch is 256, not PAPER_BATCH_SIZE (the shared --batch-size has one default)
SMALL_BATCH_PATTERNS = ("antmaze-*", "D4RL/antmaze/*", "maze2d-*", "D4RL/pointmaze/*",
                        *[p for task in ADROIT_BETAS for p in (f"{task}-*", f"D4RL/{task}/*")])


def mlp(in_dim: int, hidden_dims: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers, last = [], in_dim
    for width in hidden_dims:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy pi_phi(s) = max_action * tanh(MLP(s)), without LayerNorm (the authors' actor_ln off).

    Initialised as the authors' (EDAC's): hidden weights as nn.Linear's, hidden biases 0.1, the head's weight
    and bias uniform in +-1e-3 (the first actions are all close to 0)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], max_action: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, act_dim)
        self.max_action = max_action
        with torch.no_grad():
            for layer in list(self.net)[:-1:2]:
                layer.bias.fill_(0.1)
            nn.init.uniform_(self.net[-1].weight, -1e-3, 1e-3)
            nn.init.uniform_(self.net[-1].bias, -1e-3, 1e-3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.net(obs))


class Agent:
    """Actor, twin LayerNorm critics, their targets and optimisers, and the ReBRAC update."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("ReBRAC needs continuous (Box) actions; this dataset has discrete actions "
                 "(use a discrete method such as bc on it)")
        self.config, self.spec, self.device = config, spec, device
        self.max_action = spec.max_action
        self.actor = Actor(spec.obs_dim, spec.act_dim, config.hidden_dims, spec.max_action).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        # Linear -> ReLU -> LayerNorm hidden blocks; hidden biases 0.1, head U(+-3e-3) (the authors' critic)
        self.critic = CriticEnsemble(spec.obs_dim, spec.act_dim, config.hidden_dims, 2,
                                     layer_norm=True).edac_init_().to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr, config)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr, config)
        self.total_it = 0  # python int: choosing whether to update the actor needs no device sync
        self.online, self.online_it = False, 0  # set by start_online; online updates so far (k in beta_1's decay)
        # beta_1 and beta_2 on the device, changed in place online (a compiled update never retraces)
        self.actor_beta = torch.tensor(float(config.actor_beta), device=device)
        self.critic_beta = torch.tensor(float(config.critic_beta), device=device)
        zero = torch.zeros((), device=device)
        # the actor's logs from its last update (it is updated every `policy_freq` steps)
        self.actor_logs = {"train/actor_loss": zero, "train/actor_bc_penalty": zero, "train/lambda": zero,
                           "train/q_policy": zero}
        # zero_grad of both optimisers, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.critic_optimizer, self.actor_optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.online:  # the online betas from the online update count, before every online update (resumed too)
            beta_1, beta_2 = self.online_betas(self.online_it)
            self.actor_beta.fill_(beta_1)
            self.critic_beta.fill_(beta_2)
            self.online_it += 1
        # Delayed policy updates: "if t mod d" update phi and the targets   (lecture: "Idea: TD3+BC"), with t
        # counted from 0 as the authors' `i % policy_freq == 0`: the very first update trains the actor too
        # (a Python bool: --compile compiles the step twice, with and without the actor update)
        update_actor = self.total_it % self.config.policy_freq == 0
        self.total_it += 1
        logs = self._update(batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"],
                            batch["next_actions"], batch["terminals"], update_actor)
        if update_actor:
            self.actor_logs = keep({key: logs[key] for key in self.actor_logs})  # logged until the next
        # the betas this update used (Run.log reads them at this step, before the next update refills them)
        return {**logs, **self.actor_logs, "train/actor_beta": self.actor_beta, "train/critic_beta": self.critic_beta}

    def _update_impl(self, obs, actions, rewards, next_obs, next_actions, terminals,
                     update_actor: bool) -> dict[str, torch.Tensor]:
        logs = self._critic_step(obs, actions, rewards, next_obs, next_actions, terminals)
        if update_actor:
            logs.update(self._actor_step(obs, actions))  # reads the critics just updated
        return logs

    def _critic_step(self, obs, actions, rewards, next_obs, next_actions, terminals) -> dict[str, torch.Tensor]:
        c, m = self.config, self.max_action
        with torch.no_grad():
            # a~' <- pi_phi'(s') + eps,  eps ~ clip(N(0, sigma~), -c, c)   (target policy smoothing)
            noise = (torch.randn_like(actions) * c.policy_noise * m).clamp(-c.noise_clip * m, c.noise_clip * m)
            smoothed = (self.actor_target(next_obs) + noise).clamp(-m, m)
            # ||a~' - a'_D||^2, summed over the action's dimensions, a'_D the dataset's next action
            critic_penalty = ((smoothed - next_actions) ** 2).sum(-1)
            target_q = self.critic_target(next_obs, smoothed).min(0).values
            # y = r + gamma (1 - d) [ min_{i=1,2} Q_theta'_i(s', a~') - beta_2 ||a~' - a'_D||^2 ]
            # (TD3's target, lecture: "Idea: TD3+BC", less BRAC's value penalty: the paper's critic objective)
            y = rewards + c.gamma * (1.0 - terminals) * (target_q - self.critic_beta * critic_penalty)
        q = self.critic(obs, actions)  # (2, B)
        # L_Q = sum_{i=1,2} N^-1 sum (Q_theta_i(s, a) - y)^2
        critic_loss = ((q - y) ** 2).mean(1).sum()
        # logged values are taken before the backward (which consumes the graph they hang on)
        logs = {"train/critic_loss": critic_loss.detach(), "train/q_data": q.detach().min(0).values.mean(),
                "train/critic_bc_penalty": critic_penalty.mean()}
        critic_loss.backward()
        self.critic_optimizer.step()
        return logs

    def _actor_step(self, obs, actions) -> dict[str, torch.Tensor]:
        c = self.config
        pi = self.actor(obs)
        q_pi = self.critic(obs, pi, detach_weights=True).min(0).values  # min_i Q_i(s, pi(s)); trains the actor only
        # lambda = 1 / ( N^-1 sum |min_i Q_i(s, pi(s))| ), a constant (stop_grad)
        lmbda = 1.0 / q_pi.abs().mean().detach()
        # ||pi(s) - a||^2, summed over the action's dimensions
        actor_penalty = ((pi - actions) ** 2).sum(-1)
        # pi = argmax_pi E_(s,a)~D [ lambda min_i Q_i(s, pi(s)) - beta_1 ||pi(s) - a||^2 ]   (the paper's actor
        # objective; lecture: "Idea: TD3+BC", with beta_1 on the BC term instead of alpha on Q), as a loss
        actor_loss = (self.actor_beta * actor_penalty - lmbda * q_pi).mean()
        logs = {"train/actor_loss": actor_loss.detach(), "train/actor_bc_penalty": actor_penalty.detach().mean(),
                "train/lambda": lmbda, "train/q_policy": q_pi.detach().mean()}
        actor_loss.backward()
        with torch.no_grad():
            # theta'_i <- tau theta_i + (1 - tau) theta'_i  (theta after this step's critic update)
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), c.tau)
            # phi' <- tau phi + (1 - tau) phi'  (phi before this step's actor update: the authors' code moves the
            # target actor toward the actor it just differentiated, one actor step behind TD3's order)
            torch._foreach_lerp_(list(self.actor_target.parameters()), list(self.actor.parameters()), c.tau)
        self.actor_optimizer.step()
        return logs

    # --- the online phase ----------------------------------------------------------------------------------------
    def online_betas(self, k: int) -> tuple[float, float]:
        """(beta_1, beta_2) of the online update that follows k online updates: beta_1 max(floor, 1 - k / N_on)
        (CORL's max(min_decay_coef, (N_on + N_off - t) / N_on) at update t = N_off + k: the first online update
        keeps beta_1, the decay reaches the floor at k = (1 - floor) N_on and stays) and online_critic_beta.
        N_on is the run's online_steps: a run resumed mid-phase with a larger --online-steps recomputes the decay
        with it (beta_1 may rise again)."""
        c = self.config
        return c.actor_beta * max(c.online_actor_beta_floor, 1.0 - k / max(c.online_steps, 1)), c.online_critic_beta

    def start_online(self) -> None:
        """The switch to the online phase (common/online.py calls it once): the betas follow `online_betas` from
        the next update on. The flag and the online update count are kept in the state (a resumed run neither
        switches twice nor restarts the decay)."""
        self.online = True

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action pi_phi(s)."""
        return self.actor(obs)

    @torch.no_grad()
    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The online phase's action: pi_phi(s) + eps, eps ~ N(0, (sigma max_action)^2) with sigma =
        online_explore_noise (torch's global RNG, saved in checkpoints), clipped to the action bounds; with sigma 0
        (CORL's expl_noise) the greedy pi_phi(s), drawing no random number."""
        action = self.actor(obs)
        if self.config.online_explore_noise == 0.0:
            return action
        noise = torch.randn_like(action) * self.config.online_explore_noise * self.max_action
        return (action + noise).clamp(-self.max_action, self.max_action)

    @torch.no_grad()
    def q_value(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """min(Q_theta1, Q_theta2)(s, a), shape (batch,): the estimate the actor climbs."""
        return self.critic(obs, actions).min(0).values

    def state_dict(self) -> dict:
        return {"actor": self.actor.state_dict(), "actor_target": self.actor_target.state_dict(),
                "critic": self.critic.state_dict(), "critic_target": self.critic_target.state_dict(),
                "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(), "total_it": self.total_it,
                "online": self.online, "online_it": self.online_it,
                "actor_logs": {k: v.clone() for k, v in self.actor_logs.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        load_optimizer(self.actor_optimizer, state["actor_optimizer"])
        load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        self.total_it = int(state["total_it"])
        # checkpoints made before online phases have no switch; the betas are refilled before each online update
        self.online, self.online_it = bool(state.get("online", False)), int(state.get("online_it", 0))
        self.actor_logs = {k: v.to(self.device) for k, v in state["actor_logs"].items()}


def transitions_with_next_actions(dataset: OfflineDataset, reward_scale: float) -> dict[str, np.ndarray]:
    """The dataset's transitions with `next_actions` a'_D = a_{t+1} of the same episode, rewards times
    `reward_scale`.

    The last step of an episode has no next action. After a termination none is needed: the target's
    (1 - d) removes the penalty with the bootstrap, so it keeps a placeholder (zeros). After a time-limit
    truncation (or the end of the stored data) the target still bootstraps from s', but beta_2 ||a~' - a'_D||^2
    cannot be computed: that step is dropped, as the authors' loader drops every timeout step. Keeping it
    without the penalty would make it the one backup in its episode not lowered by beta_2, a bias the critic
    would carry backwards; dropping it costs one transition per truncated episode (0.1% on D4RL's 1000-step
    episodes, 0.5% on Pendulum's 200).
    """
    data = dataset.transitions()
    last = np.cumsum([len(e) for e in dataset.episodes]) - 1  # each episode's last row
    next_actions = np.concatenate([data["actions"][1:], np.zeros_like(data["actions"][:1])])
    next_actions[last] = 0.0  # a_{t+1} across an episode boundary is another episode's: never read (below)
    keep_rows = np.ones(len(next_actions), dtype=bool)
    keep_rows[last[data["terminals"][last] == 0]] = False  # truncated (or cut) episodes' last steps
    return {"obs": data["obs"][keep_rows], "actions": data["actions"][keep_rows],
            "rewards": (data["rewards"] * np.float32(reward_scale))[keep_rows], "next_obs": data["next_obs"][keep_rows],
            "next_actions": next_actions[keep_rows], "terminals": data["terminals"][keep_rows]}


def synthetic_batch_source(spec: DataSpec, config: Config, device: torch.device, seed: int = 0) -> TensorSampler:
    """Random transitions with the dataset next actions the critic's penalty reads (for the bench and tests)."""
    rng = np.random.default_rng(seed)
    n = 100_000
    arrays = {"obs": rng.standard_normal((n, spec.obs_dim)), "actions": rng.uniform(-1, 1, (n, spec.act_dim)),
              "rewards": rng.standard_normal(n), "next_obs": rng.standard_normal((n, spec.obs_dim)),
              "next_actions": rng.uniform(-1, 1, (n, spec.act_dim)), "terminals": rng.uniform(size=n) < 0.01}
    return TensorSampler({k: v.astype(np.float32) for k, v in arrays.items()}, device, seed)


def check_config(config: Config) -> None:
    """One clear line for ReBRAC's settings outside their range (before anything is read or written)."""
    for name, symbol in (("actor_beta", "beta_1"), ("critic_beta", "beta_2"), ("online_critic_beta", "beta_2 online")):
        value = getattr(config, name)
        if not value >= 0.0:  # NaN fails too
            fail(f"--{name.replace('_', '-')} ({symbol}, the weight of a behaviour penalty) must be 0 or "
                 f"positive, got {value}")
    if not 0.0 <= config.online_actor_beta_floor <= 1.0:
        fail(f"--online-actor-beta-floor (the floor of beta_1's online decay, a fraction of beta_1) must lie in "
             f"[0, 1], got {config.online_actor_beta_floor}")
    if config.online_mix is not None and not 0.0 <= config.online_mix <= 1.0:
        fail(f"--online-mix must lie in [0, 1] (the offline share of a batch), got {config.online_mix}")
    if not config.online_explore_noise >= 0.0:
        fail(f"--online-explore-noise (a standard deviation) must be 0 or positive, got {config.online_explore_noise}")
    if config.policy_freq < 1:
        fail(f"--policy-freq must be at least 1, got {config.policy_freq}")
    if not (config.actor_lr > 0 and config.critic_lr > 0):
        fail(f"--actor-lr and --critic-lr must be positive, got {config.actor_lr} and {config.critic_lr}")


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    check_config(config)
    if config.batch_size != SMALL_BATCH_SIZE and any(fnmatch.fnmatch(config.env, p) for p in SMALL_BATCH_PATTERNS):
        print(f"note: the authors train '{config.env}' with batch {SMALL_BATCH_SIZE} (this run: "
              f"{config.batch_size}); pass --batch-size {SMALL_BATCH_SIZE} to match them", file=sys.stderr)
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"ReBRAC needs continuous actions; '{config.env}' has discrete actions")
    data = transitions_with_next_actions(dataset, config.reward_scale)
    if config.batch_size > len(data["obs"]):
        fail(f"--batch-size {config.batch_size} is larger than the dataset's {len(data['obs'])} transitions "
             f"(with a next action) of '{config.env}'; use a batch of at most that size")
    normalizer = ObsNormalizer.from_data(data["obs"]) if config.normalize_obs else None
    norm = normalizer or (lambda x: x)
    sampler = TensorSampler({**data, "obs": norm(data["obs"]), "next_obs": norm(data["next_obs"])},
                            device, config.seed)
    agent = Agent(config, dataset.spec, device)
    # the offline data, and with --online-steps the env the policy then acts in (common/online.py): online rewards
    # scaled as the offline ones, next actions filled by the online buffer (see the module docstring)
    phase = OnlinePhase(agent, dataset, sampler, normalizer, config, device, reward_affine=(config.reward_scale, 0.0))

    run = Run("rebrac", config, dataset, device, normalizer)
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
