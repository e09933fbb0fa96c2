"""Decision Transformer (DT): return-conditioned behaviour cloning with a causal GPT over (R^, s, a) tokens.

Lecture sections: "Variant Behavior Cloning", "Return-conditioned policies" (imitate the whole dataset with
a policy conditioned on the empirical return-to-go R^_t = sum_{t' >= t} r_t', max_pi sum log pi(a | s, R^);
at test time start from a desired target return R^_0 and decrement it by every reward received) and
"Decision Transformer: Reinforcement Learning via Sequence Modeling" / "Transformer structure" (the policy
is a GPT: stacked self-attention layers with residual connections and a causal mask, so that a token only
attends to tokens before it).
Paper: Chen, Lu, Rajeswaran, Lee, Grover, Laskin, Abbeel, Srinivas & Mordatch 2021, "Decision Transformer:
Reinforcement Learning via Sequence Modeling".

Usage:
    python algorithms/dt.py --env hopper-medium-v2
    python algorithms/dt.py --env local/pendulum/medium-replay-v0 --max-steps 5000
    python algorithms/dt.py --env hopper-medium-v2 --target-returns 3600 1800 --return-scale 0.001

The model (`DecisionTransformer`) embeds each timestep's return-to-go R^_t, state s_t and action a_t with
its own linear layer, adds a learned embedding of the absolute timestep t to all three (no positional
embedding), interleaves them into 3K tokens (R^_1, s_1, a_1, ..., R^_K, s_K, a_K), applies LayerNorm and
dropout, runs a GPT (pre-LayerNorm blocks, causal self-attention through `F.scaled_dot_product_attention`
with `is_causal=True`), and predicts a_t from the output at the state token s_t only, through
Linear + tanh * max_action. Because of the causal mask that prediction sees R^_<=t, s_<=t and a_<t, never
a_t itself. The loss is the mean squared error over the real (not padded) positions of each window; the
paper trains no return or state prediction.

Sampling (`SequenceSampler`): episodes are laid end to end in one table on the training device, each
followed by K - 1 padding rows (zeros, mask 0), so that the K rows from any step of an episode on never
reach into the next episode. A window is one uniform draw over all steps of the dataset (the episode is
then chosen with probability proportional to its length and the start uniformly within it, as the
paper's and CORL's samplers do), plus index arithmetic and one row gather: no DataLoader, no Python loop
per sample. Windows that run past the end of an episode are padded on the right (as CORL does); with a
causal mask padding after the real steps cannot change any real step's output, and the mask removes the
padded positions from the loss.

Timestep embedding: one row per timestep 0 .. max_episode_len - 1, where max_episode_len is the longest
episode in the data or the evaluation env's time limit, whichever is larger (1000 on D4RL). Timesteps past
the table are clipped to its last row. Only padded positions (whose outputs are masked and causally
invisible) and an evaluation env running longer than any data and its own time limit can reach past it;
CORL instead enlarges the table by K rows that only padded positions ever read, which therefore never train.

Evaluation follows the slide's test-time loop for every target return at once: all `eval_episodes`
episodes of all targets are stepped together in one vector env (`evaluate_stateful`); each starts with
R^_0 = its target, feeds the last K steps (timesteps absolute) and after each step sets R^ <- R^ - r. The
first (highest) target's result is logged as `eval/return_mean` etc., every target's as
`eval/target_<R>/return_mean` etc. `common.checkpoint.load_policy` returns the same loop for the first target
(`Agent.stateful_policy`): an object called once per step with the observation and the previous reward, reset
between episodes. Target returns must be finite and within 100x the data's largest |episode return|.

Per-dataset settings live in `DATASET_SETTINGS` below: the paper's target returns (hopper 3600/1800,
halfcheetah 12000/6000, walker2d 5000/2500) and return-to-go scale 1/1000; for local builds and other
datasets the targets come from the dataset's reference scores (the expert score and the midpoint of random
and expert; without reference scores the best episode return and the midpoint of worst and best) and the
scale is 1 / the largest |episode return|, so that R^ is of order 1 (antmaze: CORL's 1.0/0.5 at scale 1).
Flags override every one of them. The rest are the paper's for every dataset: K = 20, embedding 128,
3 layers, 1 head, dropout 0.1, ReLU, AdamW lr 1e-4, weight decay 1e-4, linear warm-up over 10k steps,
gradient clipping at 0.25, batch 64, 100k steps (fewer on the small local sets, with the warm-up a tenth of
them as in the paper).

--compile compiles the whole update, gradient clipping and the AdamW step included (common/optim.py); dropout
draws its masks from torch's generator on the device, whose state checkpoints save.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# the nearest folder above this file that holds common/ (this repository, or a project it was copied into)
sys.path.insert(0, next((str(p) for p in Path(__file__).resolve().parents if (p / "common" / "__init__.py").is_file()),
                        os.path.dirname(os.path.abspath(__file__))))
from common.datasets import DataSpec, ObsNormalizer, OfflineDataset, load_dataset  # noqa: E402
from common.errors import fail  # noqa: E402
from common.evaluation import eval_log_entries, evaluate_stateful, make_eval_envs  # noqa: E402
from common.optim import adam, load_optimizer, update_step  # noqa: E402
from common.runs import Run, apply_dataset_settings, resolve_config, run_cli, setup  # noqa: E402

PAPER_BATCH_SIZE = 64  # the paper's (and CORL's) minibatch of 64 windows of K steps


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
    """minibatch size: windows of K steps (the paper's 64)"""
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
    # --- decision transformer ---
    target_returns: tuple[float, ...] | None = None
    """target returns R^_0 the test-time loop starts from, one evaluation per target, the first reported as
    eval/return_mean (None: from DATASET_SETTINGS; empty: the dataset's reference expert score and the
    midpoint of its reference scores, else its best episode return and the midpoint of worst and best)"""
    return_scale: float | None = None
    """the model reads R^_t * return_scale, in training and at test time alike (None: from DATASET_SETTINGS,
    1/1000 on D4RL locomotion; 0: 1 / the largest |episode return| of the dataset)"""
    context_len: int = 20
    """K: the timesteps (R^_t, s_t, a_t) the transformer sees at once, 3K tokens (the paper's 20)"""
    embed_dim: int = 128
    """width of the token embeddings and of the transformer (the paper's 128)"""
    n_layers: int = 3
    """transformer blocks (the paper's 3)"""
    n_heads: int = 1
    """attention heads per block (the paper's 1); must divide embed_dim"""
    dropout: float = 0.1
    """dropout on the embeddings, the attention weights and both residual branches (the paper's 0.1)"""
    activation: Literal["relu", "gelu"] = "relu"
    """nonlinearity of the blocks' MLPs: relu in the paper's code, gelu in GPT-2 and CORL"""
    lr: float = 1e-4
    """AdamW learning rate after warm-up (the paper's 1e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay, on every parameter as the paper's code does (1e-4)"""
    warmup_steps: int | None = None
    """linear learning-rate warm-up: step t uses lr * min((t + 1) / warmup_steps, 1) (None: from
    DATASET_SETTINGS: the paper's 10k of its 100k steps; on the small local sets a tenth of their default steps)"""
    grad_clip: float = 0.25
    """clip the gradient's global norm to this before each step (the paper's 0.25)"""
    max_episode_len: int | None = None
    """rows of the timestep embedding, timesteps 0 .. max_episode_len - 1 (None: the longest episode in
    the data or the evaluation env's time limit, whichever is larger); larger timesteps are clipped"""
    normalize_obs: bool = True
    """standardise observations with the dataset's mean and std, as the paper's code does (eps 1e-3 here,
    1e-6 there)"""


D4RL_EPISODE_LEN = 1000  # D4RL locomotion's time limit: the table size when no dataset says otherwise
# targets beyond this many times the data's largest |episode return| (or 1) are refused: far outside anything
# the model saw (the paper's targets are at most 2x the data's best), most likely a typo or a unit error
TARGET_RETURN_LIMIT = 100.0
FROM_DATA = {"target_returns": (), "return_scale": 0.0}  # derived from the dataset in train()


def _paper(high: float, low: float) -> dict:
    """The paper's targets (its gym experiment script) with R^ divided by 1000, 100k steps."""
    return {"target_returns": (high, low), "return_scale": 1e-3, "max_steps": 100_000, "warmup_steps": 10_000}


HOPPER, HALFCHEETAH, WALKER2D = _paper(3600.0, 1800.0), _paper(12000.0, 6000.0), _paper(5000.0, 2500.0)
ANTMAZE = {"target_returns": (1.0, 0.5), "return_scale": 1.0, "max_steps": 100_000,  # CORL's antmaze config
           "warmup_steps": 10_000}

# Per-dataset settings: a field left at None takes the value of the first row whose pattern matches the
# --env name or its Minari id. The small local sets (Pendulum, 200-step episodes) need fewer steps, and
# their warm-up keeps the paper's proportion (a tenth of the run).
DATASET_SETTINGS: list[tuple[str, dict]] = [
    ("hopper-*", HOPPER), ("mujoco/hopper/*", HOPPER),
    ("halfcheetah-*", HALFCHEETAH), ("mujoco/halfcheetah/*", HALFCHEETAH),
    ("walker2d-*", WALKER2D), ("mujoco/walker2d/*", WALKER2D),
    ("antmaze-*", ANTMAZE), ("D4RL/antmaze/*", ANTMAZE),
    ("local/pendulum/*", {**FROM_DATA, "max_steps": 10_000, "warmup_steps": 1_000}),
    ("test/*", {**FROM_DATA, "max_steps": 2_000, "warmup_steps": 200}),
    ("*", {**FROM_DATA, "max_steps": 100_000, "warmup_steps": 10_000}),
]


# --------------------------------------------------------------------------------------------------
# The transformer
# --------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which token i attends to tokens j <= i only (nanoGPT's)."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)  # queries, keys and values in one product
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d) + causal mask) v, the mask replacing the sum over all n tokens by j in [1, i]
        # (lecture: "Transformer structure")
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, tokens, width)))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) (GPT-2's pre-LayerNorm block)."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float, activation: str):
        super().__init__()
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.attention = CausalSelfAttention(embed_dim, n_heads, dropout)
        self.mlp_norm = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim),
                                 nn.ReLU() if activation == "relu" else nn.GELU(),
                                 nn.Linear(4 * embed_dim, embed_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class DecisionTransformer(nn.Module):
    """pi(a_t | R^_<=t, s_<=t, a_<t): a GPT over the interleaved tokens (R^_1, s_1, a_1, ..., R^_K, s_K, a_K)."""

    def __init__(self, obs_dim: int, act_dim: int, max_action: float, config: Config, max_episode_len: int):
        super().__init__()
        d = config.embed_dim
        self.max_action, self.max_timestep = max_action, max_episode_len
        self.timestep_embedding = nn.Embedding(max_episode_len, d)  # replaces the positional embedding
        self.return_embedding = nn.Linear(1, d)
        self.state_embedding = nn.Linear(obs_dim, d)
        self.action_embedding = nn.Linear(act_dim, d)
        self.embedding_norm = nn.LayerNorm(d)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.Sequential(*[Block(d, config.n_heads, config.dropout, config.activation)
                                      for _ in range(config.n_layers)])
        self.output_norm = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, act_dim)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """N(0, 0.02) weights and zero biases everywhere, as CORL does (GPT-2's initialisation, which the
        paper's code uses inside its GPT-2 and leaves at PyTorch's default for the embeddings and head)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, returns_to_go: torch.Tensor, obs: torch.Tensor, actions: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
        """The transformer's outputs at all 3T tokens, (B, 3T, d), in the order R^_1, s_1, a_1, R^_2, ..."""
        batch, steps = returns_to_go.shape
        time = self.timestep_embedding(timesteps.clamp(max=self.max_timestep - 1))
        tokens = torch.stack([self.return_embedding(returns_to_go.unsqueeze(-1)) + time,
                              self.state_embedding(obs) + time, self.action_embedding(actions) + time], dim=2)
        x = self.embedding_dropout(self.embedding_norm(tokens.view(batch, 3 * steps, -1)))
        return self.blocks(x)

    def forward(self, returns_to_go: torch.Tensor, obs: torch.Tensor, actions: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """Predicted actions (B, T, act_dim), a_t read from the output at the state token s_t."""
        batch, steps = returns_to_go.shape
        state_tokens = self.hidden_states(returns_to_go, obs, actions, timesteps).view(batch, steps, 3, -1)[:, :, 1]
        return self.max_action * torch.tanh(self.action_head(self.output_norm(state_tokens)))


def masked_mse(predicted: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_(b,t) m_bt || predicted_bt - a_bt ||^2 / (sum m_bt * act_dim): the MSE over real positions only."""
    squared = (predicted - actions).square().sum(-1)
    return (squared * mask).sum() / (mask.sum() * actions.shape[-1])


# --------------------------------------------------------------------------------------------------
# Agent
# --------------------------------------------------------------------------------------------------


class Agent:
    """The Decision Transformer, its AdamW optimiser with linear warm-up, and the update rule."""

    def __init__(self, config: Config, spec: DataSpec, device: torch.device):
        if spec.discrete:
            fail("dt.py is for continuous actions (Box); this dataset has discrete actions")
        # fields left at None (e.g. an Agent built straight from Config(), as the benchmark does) get the
        # per-dataset values of config.env, exactly as train() fills them
        config = apply_dataset_settings(config, DATASET_SETTINGS, quiet=True)
        self.config, self.spec, self.device = config, spec, device
        self.max_episode_len = config.max_episode_len or D4RL_EPISODE_LEN
        self.model = DecisionTransformer(spec.obs_dim, spec.act_dim, spec.max_action, config,
                                         self.max_episode_len).to(device)
        # a tensor learning rate: the warm-up changes it in place, so a compiled update never retraces
        self.lr = torch.tensor(0.0, device=device)
        self.params = list(self.model.parameters())
        # AdamW: Adam with decoupled weight decay (torch.optim.AdamW is exactly this Adam)
        self.optimizer = adam(self.params, self.lr, config, weight_decay=config.weight_decay,
                              decoupled_weight_decay=True)
        self.step = 0  # updates done so far (drives the warm-up)
        # zero_grad, then _update_impl (torch.compile'd whole under --compile)
        self._update = update_step(self._update_impl, config, self.optimizer)

    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # lr_t = lr * min((t + 1) / warmup_steps, 1)   (the paper's LambdaLR warm-up, t counted from 0)
        self.lr.fill_(self.config.lr * min((self.step + 1) / max(self.config.warmup_steps, 1), 1.0))
        self.step += 1
        return self._update(batch["returns_to_go"], batch["obs"], batch["actions"], batch["timesteps"],
                            batch["mask"])

    def _update_impl(self, returns_to_go: torch.Tensor, obs: torch.Tensor, actions: torch.Tensor,
                     timesteps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        predicted = self.model(returns_to_go, obs, actions, timesteps)
        # max_pi sum_(s,a)~D log pi(a | s, R^)  with a deterministic pi and a Gaussian of fixed variance:
        # L = E_windows [ sum_t m_t || pi(R^_<=t, s_<=t, a_<t) - a_t ||^2 ] / E[ sum_t m_t ]
        # (lecture: "Return-conditioned policies"; m_t = 0 on padding)
        loss = masked_mse(predicted, actions, mask)
        logs = {"train/action_loss": loss.detach(), "train/lr": self.lr.clone()}  # before the backward
        loss.backward(inputs=self.params)  # the parameters named, as every file's traced backward does
        # the global gradient norm, clipped to grad_clip (logged before clipping)
        logs["train/grad_norm"] = nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return logs

    def _check_targets(self) -> None:
        if not self.config.target_returns or not self.config.return_scale:
            fail("target returns and the return scale come from the dataset here: train() fills them, or set "
                 "--target-returns and --return-scale")

    # the policy depends on the episode so far: common.checkpoint.load_policy returns `stateful_policy`
    history_dependent = True

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """a_0 = Transformer(R^_0, s_0) for the first target return: the first step of the test-time loop,
        with no history (right only at an episode's first step; `rollout` and `stateful_policy` run the loop)."""
        self._check_targets()
        target = self.config.target_returns[0] * self.config.return_scale
        self.model.eval()
        action = self.model(torch.full((obs.shape[0], 1), target, device=obs.device), obs.unsqueeze(1),
                            torch.zeros(obs.shape[0], 1, self.spec.act_dim, device=obs.device),
                            torch.zeros(obs.shape[0], 1, dtype=torch.long, device=obs.device))[:, 0]
        self.model.train()
        return action

    def rollout(self, target_returns: torch.Tensor) -> "ReturnConditionedRollout":
        """A fresh test-time loop for len(target_returns) episodes, one target return each."""
        self._check_targets()
        return ReturnConditionedRollout(self, target_returns)

    def stateful_policy(self, num_envs: int, target_return: float | None = None) -> "ReturnConditionedRollout":
        """The test-time loop for `num_envs` episodes, all from R^_0 = `target_return` (None: the run's first
        target, the one reported as eval/return_mean): called as policy(obs (n, obs_dim), rewards (n,)), the
        protocol of `common.evaluation.evaluate_stateful` (what `common.checkpoint.load_policy` returns)."""
        self._check_targets()
        target = self.config.target_returns[0] if target_return is None else float(target_return)
        return ReturnConditionedRollout(self, torch.full((num_envs,), target))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        load_optimizer(self.optimizer, state["optimizer"])
        # the optimiser's saved lr replaced our tensor: point it back, so the warm-up keeps driving it
        self.optimizer.param_groups[0]["lr"] = self.lr
        self.step = int(state["step"])


class ReturnConditionedRollout:
    """The slide's test-time loop for n episodes at once ("Return-conditioned policies: At test stage").

    Called once per env step with the observations (n, obs_dim) and the rewards of the previous step (n,)
    (zeros at the first step): R^_t = R^_(t-1) - r_(t-1) starting from R^_0 = the target, then
    a_t = Transformer(R^, s, a over the last K steps, a_t's own slot still zero) read at s_t. The last K
    steps live in rolling buffers on the device; timesteps are absolute.
    """

    def __init__(self, agent: Agent, target_returns: torch.Tensor):
        n, k, device = len(target_returns), agent.config.context_len, agent.device
        self.model, self.scale, self.context_len = agent.model, agent.config.return_scale, k
        self.remaining = target_returns.to(device=device, dtype=torch.float32).clone()  # R^_t, unscaled
        self.returns_to_go = torch.zeros(n, k, device=device)
        self.obs = torch.zeros(n, k, agent.spec.obs_dim, device=device)
        self.actions = torch.zeros(n, k, agent.spec.act_dim, device=device)
        self.timesteps = torch.zeros(n, k, dtype=torch.long, device=device)
        self.t = 0

    @torch.no_grad()
    def __call__(self, obs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        # R^_t = R^_(t-1) - r_(t-1)   (lecture: "Return-conditioned policies", test stage step 5)
        self.remaining -= rewards
        if self.t >= self.context_len:  # the window is full: drop its oldest step
            for buffer in (self.returns_to_go, self.obs, self.actions, self.timesteps):
                buffer.copy_(buffer.roll(-1, dims=1))
        slot = min(self.t, self.context_len - 1)  # later slots are zero: causally invisible to this one
        self.returns_to_go[:, slot] = self.remaining * self.scale
        self.obs[:, slot] = obs
        self.actions[:, slot] = 0.0
        self.timesteps[:, slot] = self.t
        training = self.model.training
        self.model.eval()
        action = self.model(self.returns_to_go, self.obs, self.actions, self.timesteps)[:, slot]
        self.model.train(training)
        self.actions[:, slot] = action
        self.t += 1
        return action


# --------------------------------------------------------------------------------------------------
# What train() uses: the window sampler, data checks and per-dataset values, evaluation of every target
# --------------------------------------------------------------------------------------------------


class SequenceSampler:
    """Windows of K consecutive steps, each from one episode, drawn on the device by index arithmetic.

    Episodes are laid end to end in one float table, each followed by K - 1 padding rows, with columns
    observation | action | R^ * return_scale | mask (1 on real steps, 0 on padding). A window is drawn by
    one uniform integer over all N steps (episode e is hit with probability len(e) / N, the start uniformly
    inside it), and is the K table rows from that step's row on: one gather, never crossing an episode.
    (Each episode is padded to its own length + K - 1, not all to the longest: a rectangular (episodes,
    longest + K - 1) tensor would be several times larger on medium-replay sets, whose many short early
    episodes sit beside 1000-step ones.)
    Returns tensors `returns_to_go` (B, K), `obs` (B, K, obs_dim), `actions` (B, K, act_dim), `timesteps`
    (B, K) int64 (absolute, clipped to max_timestep - 1) and `mask` (B, K). The generator's state is saved
    in checkpoints, so a resumed run draws the same windows.
    """

    def __init__(self, episodes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], context_len: int,
                 max_timestep: int, device: torch.device | str, seed: int):
        """`episodes`: (observations (N, obs_dim), actions (N, act_dim), scaled returns-to-go (N,)) each."""
        self.device, self.context_len, self.max_timestep = torch.device(device), context_len, max_timestep
        self.obs_dim, self.act_dim = episodes[0][0].shape[1], episodes[0][1].shape[1]
        pad = context_len - 1
        lengths = np.array([len(rtg) for _, _, rtg in episodes], dtype=np.int64)
        width = self.obs_dim + self.act_dim + 2
        table = np.zeros((int(lengths.sum()) + pad * len(episodes), width), dtype=np.float32)
        first_row = np.concatenate([[0], np.cumsum(lengths + pad)[:-1]])
        for (obs, actions, rtg), row, n in zip(episodes, first_row, lengths):
            table[row:row + n] = np.concatenate([obs, actions, rtg[:, None], np.ones((n, 1))], axis=1)
        # for every step of the dataset: its table row and its timestep inside its episode
        step_row = np.concatenate([row + np.arange(n) for row, n in zip(first_row, lengths)])
        step_time = np.concatenate([np.arange(n) for n in lengths])
        self.num_steps = len(step_row)
        self.table = torch.as_tensor(table, device=self.device)
        self.step_index = torch.as_tensor(np.stack([step_row, step_time], 1), device=self.device)
        self.offsets = torch.arange(context_len, device=self.device)
        self.widths = [self.obs_dim, self.act_dim, 1, 1]
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.num_steps, (batch_size,), device=self.device, generator=self.generator)
        row, time = self.step_index.index_select(0, idx).unbind(1)
        rows = (row[:, None] + self.offsets).view(-1)
        block = self.table.index_select(0, rows).view(batch_size, self.context_len, -1)
        obs, actions, rtg, mask = block.split(self.widths, dim=2)
        timesteps = (time[:, None] + self.offsets).clamp_(max=self.max_timestep - 1)
        return {"returns_to_go": rtg.squeeze(2), "obs": obs, "actions": actions, "timesteps": timesteps,
                "mask": mask.squeeze(2)}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def synthetic_batch_source(spec: DataSpec, config: Config, device: torch.device, seed: int = 0) -> SequenceSampler:
    """The benchmark's data (common/reporting/bench.py): 100 random episodes of 1000 steps (100k steps, as
    the benchmark's transition data), sampled exactly as training samples."""
    rng = np.random.default_rng(seed)
    episodes = [(rng.standard_normal((D4RL_EPISODE_LEN, spec.obs_dim)).astype(np.float32),
                 rng.uniform(-1, 1, (D4RL_EPISODE_LEN, spec.act_dim)).astype(np.float32),
                 rng.standard_normal(D4RL_EPISODE_LEN).astype(np.float32)) for _ in range(100)]
    return SequenceSampler(episodes, config.context_len, config.max_episode_len or D4RL_EPISODE_LEN, device, seed)


def check_episodes(dataset: OfflineDataset, context_len: int) -> None:
    """One clear line for data DT cannot use: no episode boundaries, episodes under 2 steps, K too long."""
    episodes = dataset.episodes
    if not any(bool(e.terminations[-1] or e.truncations[-1]) for e in episodes):
        fail(f"'{dataset.name}' has no episode boundaries (no episode ends in a termination or truncation): "
             f"returns-to-go need whole episodes; store the data episode by episode")
    short = [i for i, e in enumerate(episodes) if len(e) < 2]
    if short:
        fail(f"'{dataset.name}' has {len(short)} episode(s) shorter than 2 steps (episode {short[0]} has "
             f"{len(episodes[short[0]])}); DT models sequences: drop them or use another dataset")
    longest = max(len(e) for e in episodes)
    if context_len > longest:
        fail(f"--context-len {context_len} is longer than the longest episode of '{dataset.name}' ({longest} "
             f"steps); use --context-len {longest} or less")


def dataset_values(config: Config, dataset: OfflineDataset) -> Config:
    """Fill the values that come from the dataset: target returns, return scale, timestep table size."""
    returns = np.array([e.total_return for e in dataset.episodes])
    values = {}
    if not config.target_returns:
        if dataset.ref_source is not None:
            high, low = dataset.ref_max_score, 0.5 * (dataset.ref_min_score + dataset.ref_max_score)
        else:
            high, low = float(returns.max()), 0.5 * float(returns.min() + returns.max())
        values["target_returns"] = (round(float(high), 3), round(float(low), 3))
    if not config.return_scale:
        values["return_scale"] = 1.0 / max(float(np.abs(returns).max()), 1e-6)
    if config.max_episode_len is None:
        time_limit = getattr(dataset.eval_env_spec, "max_episode_steps", None) or 0
        values["max_episode_len"] = max(max(len(e) for e in dataset.episodes), int(time_limit))
    if values:
        print("from the dataset: " + ", ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr, flush=True)
    return replace(config, **values)


def check_config(config: Config, dataset: OfflineDataset) -> None:
    """One clear line for unusable settings; a warning for targets the data does not cover."""
    if config.context_len < 1:
        fail(f"--context-len must be at least 1, got {config.context_len}")
    if config.embed_dim < 1 or config.n_heads < 1 or config.embed_dim % config.n_heads:
        fail(f"--n-heads {config.n_heads} must divide --embed-dim {config.embed_dim} (both positive)")
    if config.n_layers < 1:
        fail(f"--n-layers must be at least 1, got {config.n_layers}")
    if not 0.0 <= config.dropout < 1.0:
        fail(f"--dropout must lie in [0, 1), got {config.dropout}")
    if config.warmup_steps < 0 or config.grad_clip <= 0 or config.lr <= 0:
        fail(f"need --warmup-steps >= 0, --grad-clip > 0 and --lr > 0 (got {config.warmup_steps}, "
             f"{config.grad_clip}, {config.lr})")
    if not math.isfinite(config.return_scale) or config.return_scale <= 0:
        fail(f"--return-scale must be positive, got {config.return_scale}")
    longest = max(len(e) for e in dataset.episodes)
    if config.max_episode_len < longest:
        fail(f"--max-episode-len {config.max_episode_len} is shorter than the longest episode ({longest} steps)")
    returns = [e.total_return for e in dataset.episodes]
    low, high = min(returns), max(returns)
    # a NaN or huge target only shows at evaluation, as NaN actions the env refuses: refuse it before the run
    limit = TARGET_RETURN_LIMIT * max(abs(low), abs(high), 1.0)
    for target in config.target_returns:
        if not math.isfinite(target):
            fail(f"--target-returns must be finite numbers, got {target}")
        if abs(target) > limit:
            fail(f"--target-returns {target:g} is more than {TARGET_RETURN_LIMIT:g} times the largest |episode return| "
                 f"of '{dataset.name}' ({max(abs(low), abs(high)):.4g}); DT conditions on returns like the data's: "
                 f"use a target near {low:.4g} .. {high:.4g}")
    for target in config.target_returns:
        if not low <= target <= high:
            print(f"warning: target return {target:g} lies outside the episode returns of '{dataset.name}' "
                  f"({low:.1f} .. {high:.1f}); DT rarely achieves returns the data does not show",
                  file=sys.stderr, flush=True)


def sequence_sampler(dataset: OfflineDataset, normalizer: ObsNormalizer | None, config: Config,
                     device: torch.device) -> SequenceSampler:
    """The training windows: (normalised) observations, actions and R^_t * return_scale per episode."""
    norm = normalizer or (lambda x: x)
    # R^_t = sum_(t' >= t) r_t' within the episode, undiscounted   (lecture: "Return-conditioned policies")
    episodes = [(norm(e.observations[:-1]), e.actions.astype(np.float32),
                 (e.returns_to_go(1.0).astype(np.float64) * config.return_scale).astype(np.float32))
                for e in dataset.episodes]
    return SequenceSampler(episodes, config.context_len, config.max_episode_len, device, config.seed)


def evaluate_targets(agent: Agent, dataset: OfflineDataset, normalizer: ObsNormalizer | None, config: Config,
                     device: torch.device, envs, video=None) -> list[dict]:
    """The test-time loop for every target return at once: eval_episodes episodes per target, one result each
    (`video`: records the first target's first episodes, those of the reported score)."""
    targets = torch.tensor(config.target_returns, dtype=torch.float32).repeat_interleave(config.eval_episodes)
    return evaluate_stateful(agent.rollout(targets), dataset, normalizer, config.eval_episodes, config.seed,
                             device, envs, groups=len(config.target_returns), video=video)


def target_log_entries(config: Config, results: list[dict]) -> dict[str, float]:
    """`eval/target_<R>/return_mean` etc. for every target return."""
    out = {}
    for target, result in zip(config.target_returns, results):
        out.update({k.replace("eval/", f"eval/target_{target:g}/", 1): v for k, v in eval_log_entries(result).items()})
    return out


def train(config: Config) -> dict:
    config = resolve_config(config, DATASET_SETTINGS)  # resumed settings, checks, per-dataset defaults
    device = setup(config.seed, config.device, config.threads)
    dataset = load_dataset(config.env, download=config.download)
    if dataset.discrete:
        fail(f"dt.py is for continuous actions; '{config.env}' has discrete actions")
    check_episodes(dataset, config.context_len)
    config = dataset_values(config, dataset)
    check_config(config, dataset)
    normalizer = None
    if config.normalize_obs:
        normalizer = ObsNormalizer.from_data(np.concatenate([e.observations[:-1] for e in dataset.episodes]))
    sampler = sequence_sampler(dataset, normalizer, config, device)
    agent = Agent(config, dataset.spec, device)

    run = Run("dt", config, dataset, device, normalizer)
    start = run.resume(agent, sampler)
    envs = make_eval_envs(dataset, config.eval_episodes * len(config.target_returns))
    for step in run.steps(start):
        logs = agent.update(sampler.sample(config.batch_size))
        if run.should_log(step):
            run.log(step, logs)
        if run.should_eval(step):
            with run.timed():
                results = evaluate_targets(agent, dataset, normalizer, config, device, envs, run.video_for(step))
                run.log_eval(step, results[0])
                run.log(step, target_log_entries(config, results))
        if run.should_checkpoint(step):
            with run.timed():
                run.save_checkpoint(step, agent, sampler)
    results = evaluate_targets(agent, dataset, normalizer, config, device, envs, run.video_for(run.total_steps))
    run.log_eval(config.max_steps, results[0])
    run.log(config.max_steps, target_log_entries(config, results))
    envs.close()
    per_target = [{"target_return": t, "return_mean": r["return_mean"], "return_std": r["return_std"],
                   "normalized_score_mean": r["normalized_mean"], "normalized_score_std": r["normalized_std"]}
                  for t, r in zip(config.target_returns, results)]
    for entry in per_target:
        print(f"  target {entry['target_return']:g}: return {entry['return_mean']:.1f} +- {entry['return_std']:.1f}"
              + ("" if entry["normalized_score_mean"] is None else
                 f", normalized score {entry['normalized_score_mean']:.1f}"), file=sys.stderr)
    return run.finish(results[0], extra={"targets": per_target})


if __name__ == "__main__":
    run_cli(train, Config)
