"""Figure 5: multimodal demonstrations (lecture: "What can go wrong in imitation learning? 2. Multimodal
demonstration data": "The data takes two different actions here! If we use l2 loss, what action will the
agent take?" ... "Use expressive distribution class to fit p(a|s): e.g. Gaussian mixture, ... diffusion").

A self-contained toy (until the library's two-mode dataset and expressive BC heads exist): a point in the
plane starts near (0, 0) and must reach (0, 10); a round obstacle sits at (0, 5). Half of the demonstrations
pass it on the left, half on the right. The action is the step (dx, dy), at most `STEP` long. Three policies
are cloned from the same demonstrations:
  l2 BC            a deterministic MLP trained by mean squared error: it learns the mean of the two modes,
                   straight ahead, into the obstacle;
  Gaussian mixture an MLP giving a K-component mixture, trained by negative log-likelihood; deployed with
                   the mean of its most likely component;
  diffusion        a DDPM over actions conditioned on the state (epsilon-prediction, `DIFFUSION_STEPS`
                   noise levels), deployed by deterministic DDIM sampling from one noise draw per episode.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

START, GOAL, OBSTACLE, RADIUS = np.array([0.0, 0.0]), np.array([0.0, 10.0]), np.array([0.0, 5.0]), 1.3
STEP = 0.5  # largest step length
SPLIT_Y = 3.1  # demonstrations go straight up to (0, SPLIT_Y), just below the obstacle, then split diagonally:
WAYPOINTS_X = (0.0, 1.9, 1.9)  # the same state, two actions; then (+-1.9, 4.9), (+-1.9, 6) and the goal
WAYPOINTS_Y = (SPLIT_Y, 4.9, 6.0)
DEMOS = 100  # demonstrations (half each side)
START_NOISE, ACTION_NOISE = 0.2, 0.1  # demonstrators' start spread and action noise (std)
MAX_STEPS = 40
COMPONENTS = 4
DIFFUSION_STEPS = 25
TRAIN_STEPS = 2000
DIFFUSION_TRAIN_STEPS = 5000  # the denoiser needs longer than the one-shot heads
LATENT_SCALE = 0.5  # std of the diffusion policy's initial noise at deployment (1: plain sampling)
HIDDEN = 128
SEED = 0


def waypoints(side: float) -> np.ndarray:
    """The demonstrator's waypoints on one side (-1 left, +1 right), the goal last."""
    return np.array([[side * x, y] for x, y in zip(WAYPOINTS_X, WAYPOINTS_Y)] + [list(GOAL)])


def demonstrator_action(pos: np.ndarray, side: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """A step of at most STEP towards the current waypoint; `target_index` (n,) advances in place when the
    waypoint is within reach."""
    targets = np.stack([waypoints(sd)[i] for sd, i in zip(side, target_index)])
    reached = (np.linalg.norm(targets - pos, axis=1) < STEP) & (target_index < len(WAYPOINTS_X))
    target_index += reached
    targets = np.stack([waypoints(sd)[i] for sd, i in zip(side, target_index)])
    d = targets - pos
    return STEP * d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), STEP)


def demonstrations(n: int = DEMOS, seed: int = SEED) -> dict[str, np.ndarray]:
    """(obs, actions) of `n` demonstrations, half passing left (side -1), half right; small noise."""
    rng = np.random.default_rng(seed)
    side = np.where(np.arange(n) % 2 == 0, -1.0, 1.0)
    pos = START + START_NOISE * rng.standard_normal((n, 2))
    index = np.zeros(n, np.int64)
    obs, actions = [], []
    for _ in range(MAX_STEPS):
        active = np.linalg.norm(pos - GOAL, axis=1) > STEP
        a = demonstrator_action(pos, side, index) + ACTION_NOISE * rng.standard_normal((n, 2))
        obs.append(pos[active].copy())
        actions.append(a[active])
        pos = pos + np.where(active[:, None], a, 0.0)
    return {"obs": np.concatenate(obs).astype(np.float32), "actions": np.concatenate(actions).astype(np.float32)}


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, out_dim))


def _normalise(obs: torch.Tensor) -> torch.Tensor:
    return (obs - torch.tensor([0.0, 5.0])) / torch.tensor([2.0, 3.0])


class L2Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp(2, 2)

    def loss(self, obs, actions):
        # L = E_(s,a)~D || pi(s) - a ||^2
        return (self.net(_normalise(obs)) - actions).square().sum(-1).mean()

    def act(self, obs, latent):
        return self.net(_normalise(obs))


class MixturePolicy(nn.Module):
    """pi(a|s) = sum_k w_k(s) N(a; mu_k(s), diag sigma_k(s)^2)."""

    def __init__(self, k: int = COMPONENTS):
        super().__init__()
        self.k = k
        self.net = mlp(2, k * 5)

    def _heads(self, obs):
        out = self.net(_normalise(obs)).view(-1, self.k, 5)
        return out[..., 0].log_softmax(-1), out[..., 1:3], out[..., 3:5].clamp(-5, 2)

    def loss(self, obs, actions):
        # L = -E_(s,a)~D log sum_k w_k(s) N(a; mu_k(s), sigma_k(s)^2)
        log_w, mu, log_std = self._heads(obs)
        z = (actions[:, None] - mu) / log_std.exp()
        log_n = (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        return -(log_w + log_n).logsumexp(-1).mean()

    def act(self, obs, latent):
        log_w, mu, _ = self._heads(obs)
        return mu[torch.arange(len(obs)), log_w.argmax(-1)]


class DiffusionPolicy(nn.Module):
    """DDPM over actions: eps_theta(a_t, t, s) trained to predict the noise; linear beta schedule."""

    def __init__(self, steps: int = DIFFUSION_STEPS):
        super().__init__()
        self.steps = steps
        self.net = mlp(2 + 2 + 1, 2)
        # linear schedule with sum(beta) = 5: abar_T = 0.006, so a_T is (nearly) pure noise, as sampling assumes
        self.register_buffer("betas", torch.linspace(1e-3, 0.4, steps))
        self.register_buffer("alpha_bars", torch.cumprod(1 - self.betas, 0))

    def _eps(self, noisy, t, obs):
        return self.net(torch.cat([noisy, _normalise(obs), (t.float() / self.steps)[:, None]], -1))

    def loss(self, obs, actions):
        # L = E_(s,a)~D, t, eps [ || eps - eps_theta( sqrt(abar_t) a + sqrt(1 - abar_t) eps, t, s ) ||^2 ]
        t = torch.randint(0, self.steps, (len(obs),))
        eps = torch.randn_like(actions)
        abar = self.alpha_bars[t][:, None]
        noisy = abar.sqrt() * actions / STEP + (1 - abar).sqrt() * eps
        return (self._eps(noisy, t, obs) - eps).square().sum(-1).mean()

    def act(self, obs, latent):
        """Deterministic DDIM sampling (eta = 0) from the episode's fixed initial noise `latent` (n, 2): the
        same latent picks the same mode at every step of an episode (a fresh draw per step can switch modes
        and dither between them)."""
        a = latent
        for t in reversed(range(self.steps)):
            tt = torch.full((len(obs),), t)
            abar = self.alpha_bars[t]
            abar_prev = self.alpha_bars[t - 1] if t > 0 else torch.tensor(1.0)
            eps = self._eps(a, tt, obs)
            a0 = ((a - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0)  # actions / STEP lie in [-1, 1]
            a = abar_prev.sqrt() * a0 + (1 - abar_prev).sqrt() * eps
        return a * STEP


def train(policy: nn.Module, data: dict[str, np.ndarray], steps: int = TRAIN_STEPS, seed: int = SEED,
          batch_size: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    obs, actions = torch.as_tensor(data["obs"]), torch.as_tensor(data["actions"])
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(obs), (batch_size,), generator=g)
        loss = policy.loss(obs[idx], actions[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy


@torch.no_grad()
def rollout(policy: nn.Module, episodes: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """Run `policy` from noisy starts; returns paths (episodes, MAX_STEPS + 1, 2) (frozen after the end),
    `collided` and `reached` (episodes,) booleans."""
    rng = np.random.default_rng(seed + 1)
    # diffusion's initial noise, one draw per episode, at temperature LATENT_SCALE (low-temperature sampling)
    latent = LATENT_SCALE * torch.randn(episodes, 2, generator=torch.Generator().manual_seed(seed + 1))
    pos = START + START_NOISE * rng.standard_normal((episodes, 2))
    paths = [pos.copy()]
    collided = np.zeros(episodes, bool)
    reached = np.zeros(episodes, bool)
    for _ in range(MAX_STEPS):
        a = policy.act(torch.as_tensor(pos, dtype=torch.float32), latent).numpy().astype(np.float64)
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        a = a * np.minimum(1.0, STEP / np.maximum(norm, 1e-9))
        active = ~(collided | reached)
        pos = np.where(active[:, None], pos + a, pos)
        collided |= active & (np.linalg.norm(pos - OBSTACLE, axis=1) < RADIUS)
        reached |= active & ~collided & (np.linalg.norm(pos - GOAL, axis=1) < STEP)
        paths.append(pos.copy())
    return {"paths": np.stack(paths, 1), "collided": collided, "reached": reached}


def train_all(data, steps: int = TRAIN_STEPS, diffusion_steps: int = DIFFUSION_TRAIN_STEPS) -> dict[str, nn.Module]:
    torch.set_num_threads(1)
    return {"l2 BC": train(L2Policy(), data, steps), "Gaussian mixture BC": train(MixturePolicy(), data, steps),
            "diffusion BC": train(DiffusionPolicy(), data, diffusion_steps)}


def make(path) -> dict:
    """Draw figure 5 to `path` (PNG); return the numbers behind its claims."""
    import matplotlib.pyplot as plt

    data = demonstrations()
    policies = train_all(data)
    fig, axes = plt.subplots(1, 3, figsize=(13, 6), sharey=True)
    demo_paths = [np.concatenate([START[None], waypoints(side)]) for side in (-1.0, 1.0)]
    numbers = {}
    colors = {"l2 BC": "#cc0000", "Gaussian mixture BC": "#3d85c6", "diffusion BC": "#38761d"}
    for ax, (name, policy) in zip(axes, policies.items()):
        res = rollout(policy, 20)
        ax.add_patch(plt.Circle(OBSTACLE, RADIUS, color="dimgray", alpha=0.6))
        ax.scatter(data["obs"][::3, 0], data["obs"][::3, 1], s=2, color="lightgray")
        for demo in demo_paths:
            ax.plot(demo[:, 0], demo[:, 1], "--", color="gray", lw=1)
        for path_, hit in zip(res["paths"], res["collided"]):
            ax.plot(path_[:, 0], path_[:, 1], color=colors[name], lw=1.2, alpha=0.7)
            if hit:
                ax.plot(*path_[-1], "x", color="black", ms=6)
        ax.plot(*GOAL, "*", color="gold", ms=16, mec="black")
        ax.set_title(f"{name}: {res['collided'].mean():.0%} collide, {res['reached'].mean():.0%} reach the goal",
                     fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlim(-5, 5)
        ax.set_ylim(-1, 11)
        numbers[name] = {"collision rate": float(res["collided"].mean()), "success rate": float(res["reached"].mean())}
    fig.suptitle("Multimodal demonstrations (half pass left, half right; dashed): the l2 policy averages the modes "
                 "into the obstacle", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return numbers
