"""The library's files against CORL's PyTorch files (github.com/corl-team/CORL), both in this process.

Each comparison builds the library's agent from its own Config (seed 0; halfcheetah's sizes, 17-d observations
and 6-d actions in [-1, 1]), perturbs its target networks, copies every weight into CORL's networks (built by
CORL's own classes and trainer, at the sizes and settings that mirror the library's), feeds both one random
batch, reseeds torch's generator alike before each side's update (or hands both the same pre-drawn noise where
they draw in different shapes), takes one update on each and compares the losses and every parameter. CORL's
file is imported from the checkout with its training-only imports (d4rl, gym, pyrallis, wandb, tqdm) stubbed.
Where the two differ on purpose, the row says how, and what the difference is once the reference's choice is
put in its place.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from common.checkpoint import import_algorithm
from common.datasets import DataSpec
from common.networks import tanh_gaussian_log_prob
from common.reporting.crosscheck import reference
from common.reporting.crosscheck.matching import (UPDATE_SEED, Context, Outcome, as_columns, copy_to_reference,
                                                  default_dtype, ensemble_pairs, linear_pairs, linears,
                                                  loss_diffs, max_diff_by_network, perturb_,
                                                  random_batch, replaced, summarise)

REPOSITORY = "corl-team/CORL"
OBS_DIM, ACT_DIM, BATCH = 17, 6, 256
CPU = torch.device("cpu")
SPEC = DataSpec(OBS_DIM, ACT_DIM, 1.0, False)


def adam(module: nn.Module, lr: float) -> torch.optim.Adam:
    """CORL's optimiser: torch.optim.Adam with its defaults (for-loop implementation on CPU)."""
    return torch.optim.Adam(module.parameters(), lr=lr)


def load(ctx: Context, relpath: str) -> tuple:
    """CORL's file as a module, and the table's reference cell."""
    module = reference.import_file(ctx.corl, relpath, "corl_" + relpath.replace("/", "_").removesuffix(".py"))
    commit = reference.commit_of(ctx.corl, relpath)
    return module, f"{REPOSITORY} `{relpath}` @ {commit[:12]}{commit[40:]}"


def outcome(file: str, cell: str, results: list[tuple[str, dict, dict]], notes: str) -> Outcome:
    """The row from the settings compared: [(setting, loss diffs, parameter diffs per network)]."""
    return Outcome(file, cell, max(v for _, losses, _ in results for v in losses.values()),
                   max(v for _, _, params in results for v in params.values()), notes,
                   [summarise(*result) for result in results])


# ------------------------------------------------------------------------------------------------------------
# TD3+BC: algorithms/offline/td3_bc.py
# ------------------------------------------------------------------------------------------------------------

def td3_bc(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/offline/td3_bc.py")
    lib = import_algorithm("td3_bc")
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = lib.Config(device="cpu", max_steps=10)
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.actor_target, agent.critic_target)
        actor, critic_1, critic_2 = corl.Actor(OBS_DIM, ACT_DIM, 1.0), corl.Critic(OBS_DIM, ACT_DIM), corl.Critic(
            OBS_DIM, ACT_DIM)
        trainer = corl.TD3_BC(max_action=1.0, actor=actor, actor_optimizer=adam(actor, config.actor_lr),
                              critic_1=critic_1, critic_1_optimizer=adam(critic_1, config.critic_lr),
                              critic_2=critic_2, critic_2_optimizer=adam(critic_2, config.critic_lr),
                              discount=config.gamma, tau=config.tau, policy_noise=config.policy_noise,
                              noise_clip=config.noise_clip, policy_freq=config.policy_freq, alpha=config.alpha)
        pairs = lambda: [*linear_pairs("actor", linears(agent.actor), linears(trainer.actor)),  # noqa: E731
                         *linear_pairs("actor_target", linears(agent.actor_target), linears(trainer.actor_target)),
                         *ensemble_pairs("critic", agent.critic, [trainer.critic_1, trainer.critic_2]),
                         *ensemble_pairs("critic_target", agent.critic_target,
                                         [trainer.critic_1_target, trainer.critic_2_target])]
        copy_to_reference(pairs())
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        # one update with the delayed actor step: both counters one short of policy_freq
        agent.total_it = trainer.total_it = config.policy_freq - 1
        torch.manual_seed(UPDATE_SEED)  # the smoothing noise: randn_like(actions) on both sides
        ours = agent.update(batch)
        torch.manual_seed(UPDATE_SEED)
        theirs = trainer.train(as_columns(batch))
    losses = loss_diffs({"critic_loss": (ours["train/critic_loss"], theirs["critic_loss"]),
                         "actor_loss": (ours["train/actor_loss"], theirs["actor_loss"])})
    return outcome("algorithms/td3_bc.py", cell, [("critic + actor + targets", losses, max_diff_by_network(pairs()))],
                   "an update with the delayed actor step (both step counters set one short of policy_freq)")


# ------------------------------------------------------------------------------------------------------------
# IQL: algorithms/offline/iql.py
# ------------------------------------------------------------------------------------------------------------

def _iql_setting(ctx: Context, corl, lib, policy: str, halve_critic_eps: bool = False) -> tuple[str, dict, dict]:
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = lib.Config(device="cpu", max_steps=1000, expectile=0.7, beta=3.0, policy=policy, actor_dropout=0.0)
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.target_critic)
        hidden, layers = config.hidden_dims[0], len(config.hidden_dims)
        policy_class = corl.GaussianPolicy if policy == "gaussian" else corl.DeterministicPolicy
        actor = policy_class(OBS_DIM, ACT_DIM, 1.0, hidden_dim=hidden, n_hidden=layers).to(ctx.dtype)
        q_network = corl.TwinQ(OBS_DIM, ACT_DIM, hidden_dim=hidden, n_hidden=layers)
        v_network = corl.ValueFunction(OBS_DIM, hidden_dim=hidden, n_hidden=layers)
        trainer = corl.ImplicitQLearning(
            max_action=1.0, actor=actor, actor_optimizer=adam(actor, config.lr), q_network=q_network,
            # Adam's first step is lr g / (|g| + eps): on CORL's half-size gradient, eps / 2 gives the library's step
            q_optimizer=torch.optim.Adam(q_network.parameters(), lr=config.lr, eps=5e-9 if halve_critic_eps else 1e-8),
            v_network=v_network, v_optimizer=adam(v_network, config.lr),
            iql_tau=config.expectile, beta=config.beta, max_steps=config.max_steps, discount=config.gamma,
            tau=config.tau, device="cpu")

        def pairs():
            out = [*linear_pairs("actor", linears(agent.actor), linears(trainer.actor)),
                   *linear_pairs("value", linears(agent.value), linears(trainer.vf)),
                   *ensemble_pairs("critic", agent.critic, [trainer.qf.q1, trainer.qf.q2]),
                   *ensemble_pairs("target_critic", agent.target_critic, [trainer.q_target.q1, trainer.q_target.q2])]
            if policy == "gaussian":
                out.append(("actor.log_std", agent.log_std, trainer.actor.log_std))
            return out

        copy_to_reference(pairs())
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        ours = agent.update(batch)
        theirs = trainer.train(as_columns(batch))
    # CORL's q_loss is the mean of the two critics' losses, the library's their sum (the paper's): ours / 2
    losses = loss_diffs({"value_loss": (ours["train/value_loss"], theirs["value_loss"]),
                         "q_loss": (ours["train/q_loss"] / 2, theirs["q_loss"]),
                         "actor_loss": (ours["train/actor_loss"], theirs["actor_loss"])})
    setting = f"--policy {policy}" + (", CORL's critic Adam eps 5e-9" if halve_critic_eps else "")
    return setting, losses, max_diff_by_network(pairs())


def iql(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/offline/iql.py")
    lib = import_algorithm("iql")
    results = [_iql_setting(ctx, corl, lib, policy) for policy in ("gaussian", "deterministic")]
    aligned = _iql_setting(ctx, corl, lib, "gaussian", halve_critic_eps=True)
    result = outcome("algorithms/iql.py", cell, results,
                     "Gaussian and deterministic policies; all three losses from the pre-step networks in both; CORL's "
                     "q_loss is the mean over the two critics, the library's their sum (the paper's; compared as sum "
                     "/ 2): Adam's first step lr g / (|g| + eps) differs where |g| is near eps; with CORL's critic "
                     f"Adam eps halved (the same step): losses {max(aligned[1].values()):.1e}, parameters "
                     f"{max(aligned[2].values()):.1e}")
    result.details.append(summarise(*aligned))
    return result


# ------------------------------------------------------------------------------------------------------------
# CQL: algorithms/offline/cql.py
# ------------------------------------------------------------------------------------------------------------

class PreDrawn:
    """Hands out pre-drawn noise in call order: CORL's reparameterised samples (Normal.rsample, one per call) and
    its uniform actions (Tensor.uniform_), the library's sample_tanh_gaussian and torch.rand."""

    def __init__(self, normal: list[torch.Tensor], ours_normal: list[torch.Tensor], uniform: torch.Tensor):
        self.normal, self.ours_normal, self.uniform = list(normal), list(ours_normal), uniform

    def rsample(self, distribution, sample_shape=torch.Size()):
        eps = self.normal.pop(0)
        assert eps.shape == distribution.loc.shape, (eps.shape, distribution.loc.shape)
        return distribution.loc + eps * distribution.scale

    def uniform_(self, tensor, low=0.0, high=1.0):
        assert tensor.shape == self.uniform.shape, (tensor.shape, self.uniform.shape)
        return tensor.copy_(low + (high - low) * self.uniform)

    def sample_tanh_gaussian(self, mean, log_std, max_action, num_samples):
        eps = self.ours_normal.pop(0)
        assert eps.shape == (mean.shape[0], num_samples, mean.shape[-1]), eps.shape
        mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
        u = mean + log_std.exp() * eps
        return max_action * torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std, max_action)

    def rand(self, *shape, **kwargs):
        return self.uniform.clone()

    @contextlib.contextmanager
    def reference_side(self):
        """The draws patched into CORL's update."""
        with replaced(torch.distributions.Normal, "rsample", lambda d, shape=torch.Size(): self.rsample(d)), \
                replaced(torch.Tensor, "uniform_", lambda t, low=0.0, high=1.0: self.uniform_(t, low, high)):
            yield

    @contextlib.contextmanager
    def library_side(self, module):
        """The draws patched into the library's update (`module`: the algorithm file)."""
        with replaced(module, "sample_tanh_gaussian", self.sample_tanh_gaussian), replaced(torch, "rand", self.rand):
            yield


def _cql_setting(ctx: Context, corl, lib, lagrange: bool) -> tuple[str, dict, dict]:
    n, alpha, gap = 10, 5.0, 0.8
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        # the library's Lagrange form is alpha' (alpha gap - tau); CORL's alpha' alpha (gap - g): tau = alpha g
        config = lib.Config(device="cpu", max_steps=10, cql_alpha=alpha, cql_num_samples=n, lagrange=lagrange,
                            lagrange_threshold=alpha * gap if lagrange else -1.0, bc_steps=0, policy_lr=1e-4,
                            critic_lr=3e-4, reward_transform="none")
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.target_critic)
        # log sigma = the network's output as the library's: CORL's learned multiplier 1 and offset 0 (not -1)
        actor = corl.TanhGaussianPolicy(OBS_DIM, ACT_DIM, 1.0, log_std_multiplier=1.0, log_std_offset=0.0)
        critic_1, critic_2 = (corl.FullyConnectedQFunction(OBS_DIM, ACT_DIM, n_hidden_layers=len(config.hidden_dims))
                              for _ in range(2))
        trainer = corl.ContinuousCQL(
            critic_1=critic_1, critic_1_optimizer=adam(critic_1, config.critic_lr), critic_2=critic_2,
            critic_2_optimizer=adam(critic_2, config.critic_lr), actor=actor,
            actor_optimizer=adam(actor, config.policy_lr), target_entropy=-float(ACT_DIM), discount=config.gamma,
            policy_lr=config.policy_lr, qf_lr=config.critic_lr, soft_target_update_rate=config.tau, bc_steps=0,
            cql_n_actions=n, cql_lagrange=lagrange, cql_target_action_gap=gap, cql_temp=config.cql_temperature,
            cql_alpha=alpha, device="cpu")
        for module in (actor, trainer.log_alpha, trainer.log_alpha_prime):  # CORL's Scalars are float32 always
            module.to(ctx.dtype)
        with torch.no_grad():
            agent.lagrange_log_alpha.fill_(trainer.log_alpha_prime.constant.item())  # CORL starts log alpha' at 1
        pairs = lambda: [*linear_pairs("actor", linears(agent.actor), linears(trainer.actor.base_network)),  # noqa
                         *ensemble_pairs("critic", agent.critic, [trainer.critic_1, trainer.critic_2]),
                         *ensemble_pairs("target_critic", agent.target_critic,
                                         [trainer.target_critic_1, trainer.target_critic_2]),
                         ("log_alpha", agent.log_entropy_alpha, trainer.log_alpha.constant),
                         ("log_alpha_prime", agent.lagrange_log_alpha, trainer.log_alpha_prime.constant)]
        copy_to_reference(pairs())
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        # every draw, shared: CORL samples a ~ pi(.|s) for the actor, a' ~ pi(.|s') for the target, n per state at s
        # and at s' for CQL (in that order), and n uniform actions; the library draws (1 + n) at s, (1 + n) at s'
        g = torch.Generator().manual_seed(UPDATE_SEED)
        eps_actor, eps_target = (torch.randn(BATCH, 1, ACT_DIM, generator=g) for _ in range(2))
        eps_current, eps_next = (torch.randn(BATCH, n, ACT_DIM, generator=g) for _ in range(2))
        uniform = torch.rand(BATCH, n, ACT_DIM, generator=g)
        draws = PreDrawn([eps_actor[:, 0], eps_target[:, 0], eps_current, eps_next],
                         [torch.cat([eps_actor, eps_current], 1), torch.cat([eps_target, eps_next], 1)], uniform)
        with draws.library_side(lib):
            ours = agent.update(batch)
        with draws.reference_side():
            theirs = trainer.train(as_columns(batch))
        assert not draws.normal and not draws.ours_normal, "a side drew fewer samples than the other"
    losses = loss_diffs({
        "td_loss": (ours["train/td_loss"], theirs["qf1_loss"] + theirs["qf2_loss"]),
        "cql_gap": (ours["train/cql_gap"], (theirs["cql_qf1_diff"] + theirs["cql_qf2_diff"]) / 2),
        "critic_loss": (ours["train/critic_loss"], theirs["qf1_loss"] + theirs["qf2_loss"]
                        + theirs["cql_min_qf1_loss"] + theirs["cql_min_qf2_loss"]),
        "actor_loss": (ours["train/actor_loss"], theirs["policy_loss"]),
        "alpha": (ours["train/entropy_alpha"], theirs["alpha"])})
    return "Lagrange" if lagrange else "fixed alpha", losses, max_diff_by_network(pairs())


def cql(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/offline/cql.py")
    lib = import_algorithm("cql")
    results = [_cql_setting(ctx, corl, lib, lagrange) for lagrange in (False, True)]
    return outcome("algorithms/cql.py", cell, results,
                   "fixed alpha 5 and Lagrange (CORL's gap 0.8 = the library's tau 4 at alpha 5; log alpha' from "
                   "CORL's 1); CORL's log-std multiplier and offset set to 1 and 0 (the library has neither: "
                   "left out of the comparison; CORL clips log sigma at -20, the library at -5, not reached "
                   "here); no BC warm-up; the same draws handed to both")


# ------------------------------------------------------------------------------------------------------------
# AWAC: algorithms/offline/awac.py
# ------------------------------------------------------------------------------------------------------------

def _awac_setting(ctx: Context, corl, lib, critic_lr: float) -> tuple[str, dict, dict]:
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        # CORL's weights exp(A / lambda) clipped at 100: the library's `--weighting exp`
        config = lib.Config(device="cpu", max_steps=10, weighting="exp", temperature=1.0, max_weight=100.0)
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.target_critic)
        hidden = config.actor_hidden_dims[0]
        actor = corl.Actor(OBS_DIM, ACT_DIM, hidden, min_log_std=-5.0, max_log_std=2.0).to(ctx.dtype)
        # CORL's Gaussian mean is the MLP's raw output; the library's max_action * tanh(MLP): a Tanh appended here
        actor._mlp.append(nn.Tanh())
        critic_1, critic_2 = corl.Critic(OBS_DIM, ACT_DIM, hidden), corl.Critic(OBS_DIM, ACT_DIM, hidden)
        trainer = corl.AdvantageWeightedActorCritic(
            actor=actor, actor_optimizer=adam(actor, config.lr), critic_1=critic_1,
            critic_1_optimizer=adam(critic_1, critic_lr), critic_2=critic_2,
            critic_2_optimizer=adam(critic_2, critic_lr), gamma=config.gamma, tau=config.tau,
            awac_lambda=config.temperature, exp_adv_max=config.max_weight)
        for group in agent.critic_optimizer.param_groups:
            group["lr"] = critic_lr
        pairs = lambda: [*linear_pairs("actor", linears(agent.actor), linears(trainer._actor)),  # noqa: E731
                         ("actor.log_std", agent.log_std, trainer._actor._log_std),
                         *ensemble_pairs("critic", agent.critic, [trainer._critic_1, trainer._critic_2]),
                         *ensemble_pairs("target_critic", agent.target_critic,
                                         [trainer._target_critic_1, trainer._target_critic_2])]
        copy_to_reference(pairs())
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        # both sample a' ~ pi(.|s') first, then a ~ pi(.|s) for V(s), (B, A) each
        torch.manual_seed(UPDATE_SEED)
        ours = agent.update(batch)
        torch.manual_seed(UPDATE_SEED)
        theirs = trainer.update(as_columns(batch))
    losses = {"critic_loss": abs(float(ours["train/critic_loss"]) - theirs["critic_loss"])}
    params = max_diff_by_network(pairs())
    if critic_lr > 0:
        # CORL's actor reads the critics after their step, the library's before it: the actor is compared
        # in the setting below, where the critics do not move
        params.pop("actor")
        return "critics and targets (full update)", losses, params
    losses["actor_loss"] = abs(float(ours["train/actor_loss"]) - theirs["actor_loss"])
    return "actor (critic lr 0)", losses, params


def awac(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/offline/awac.py")
    lib = import_algorithm("awac")
    config = lib.Config()
    results = [_awac_setting(ctx, corl, lib, config.lr), _awac_setting(ctx, corl, lib, 0.0)]
    return outcome("algorithms/awac.py", cell, results,
                   "`--weighting exp` (CORL's; the library's default is the paper's batch softmax); CORL's Gaussian "
                   "mean is the raw MLP output, a Tanh is appended to it here (the library's mean is max_action "
                   "tanh(MLP)); CORL's actor reads the critics after their step, the library's before: critics "
                   "and targets compared on the full update, the actor on an update with critic lr 0 on both sides")


# ------------------------------------------------------------------------------------------------------------
# BC: algorithms/offline/any_percent_bc.py
# ------------------------------------------------------------------------------------------------------------

def bc(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/offline/any_percent_bc.py")
    lib = import_algorithm("bc")
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = lib.Config(device="cpu", max_steps=10, policy="deterministic")
        agent = lib.Agent(config, SPEC, CPU)
        actor = corl.Actor(OBS_DIM, ACT_DIM, 1.0)
        trainer = corl.BC(max_action=1.0, actor=actor, actor_optimizer=adam(actor, config.lr))
        pairs = lambda: linear_pairs("policy", linears(agent.policy), linears(trainer.actor))  # noqa: E731
        copy_to_reference(pairs())
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        ours = agent.update(batch)
        theirs = trainer.train(as_columns(batch))
    losses = loss_diffs({"policy_loss": (ours["train/policy_loss"], theirs["actor_loss"])})
    return outcome("algorithms/bc.py", cell, [("deterministic", losses, max_diff_by_network(pairs()))],
                   "the update only (CORL's BC-10% data filter is `--top-fraction 0.1 --top-discount 0.99 "
                   "--top-count floor` here, not compared)")


# ------------------------------------------------------------------------------------------------------------
# DT: algorithms/offline/dt.py
# ------------------------------------------------------------------------------------------------------------

def _dt_pairs(agent, model) -> list:
    ours = agent.model
    shared_rows = ours.timestep_embedding.weight.shape[0]  # CORL's table has context_len more rows (padding only)
    out = [("embeddings.timestep", ours.timestep_embedding.weight, model.timestep_emb.weight[:shared_rows]),
           *linear_pairs("embeddings.return", [ours.return_embedding], [model.return_emb]),
           *linear_pairs("embeddings.state", [ours.state_embedding], [model.state_emb]),
           *linear_pairs("embeddings.action", [ours.action_embedding], [model.action_emb]),
           ("embeddings.norm_weight", ours.embedding_norm.weight, model.emb_norm.weight),
           ("embeddings.norm_bias", ours.embedding_norm.bias, model.emb_norm.bias),
           ("head.norm_weight", ours.output_norm.weight, model.out_norm.weight),
           ("head.norm_bias", ours.output_norm.bias, model.out_norm.bias),
           *linear_pairs("head.linear", [ours.action_head], [model.action_head[0]])]
    for i, (mine, theirs) in enumerate(zip(ours.blocks, model.blocks)):
        name = f"blocks.{i}"
        out += [(f"{name}.norm1_weight", mine.attention_norm.weight, theirs.norm1.weight),
                (f"{name}.norm1_bias", mine.attention_norm.bias, theirs.norm1.bias),
                (f"{name}.norm2_weight", mine.mlp_norm.weight, theirs.norm2.weight),
                (f"{name}.norm2_bias", mine.mlp_norm.bias, theirs.norm2.bias),
                # nn.MultiheadAttention's in_proj is [W_q; W_k; W_v], the library's qkv in the same order
                (f"{name}.qkv_weight", mine.attention.qkv.weight, theirs.attention.in_proj_weight),
                (f"{name}.qkv_bias", mine.attention.qkv.bias, theirs.attention.in_proj_bias),
                *linear_pairs(f"{name}.proj", [mine.attention.proj], [theirs.attention.out_proj]),
                *linear_pairs(f"{name}.mlp", linears(mine.mlp), linears(theirs.mlp))]
    return out


def _dt_setting(ctx: Context, corl, lib, padded: bool) -> tuple[str, dict, dict]:
    batch_size, episode_len = 64, 1000
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        # dropout 0 on both sides (their masks come from different draws); CORL's GELU
        config = lib.Config(device="cpu", max_steps=100, warmup_steps=10, dropout=0.0, activation="gelu",
                            target_returns=(1.0,), return_scale=1.0, max_episode_len=episode_len)
        agent = lib.Agent(config, SPEC, CPU)
        k = config.context_len
        model = corl.DecisionTransformer(
            state_dim=OBS_DIM, action_dim=ACT_DIM, seq_len=k, episode_len=episode_len,
            embedding_dim=config.embed_dim, num_layers=config.n_layers, num_heads=config.n_heads,
            attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0, max_action=1.0)
        # CORL's train(): AdamW (betas 0.9, 0.999), linear warm-up by LambdaLR, clip_grad_norm_ 0.25
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                      betas=(0.9, 0.999))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda steps: min((steps + 1) / config.warmup_steps, 1))
        pairs = lambda: _dt_pairs(agent, model)  # noqa: E731
        copy_to_reference(pairs())
        g = torch.Generator().manual_seed(1)
        obs = torch.randn(batch_size, k, OBS_DIM, generator=g)
        actions = 2 * torch.rand(batch_size, k, ACT_DIM, generator=g) - 1
        returns_to_go = torch.randn(batch_size, k, generator=g)
        timesteps = torch.randint(0, episode_len - k, (batch_size, 1), generator=g) + torch.arange(k)
        mask = torch.ones(batch_size, k)
        if padded:  # a quarter of the windows end early, padded on the right with zeros (as both samplers do)
            lengths = torch.randint(1, k, (batch_size // 4,), generator=g)
            mask[: batch_size // 4] = (torch.arange(k) < lengths[:, None]).to(mask.dtype)
            obs, actions, returns_to_go = obs * mask[..., None], actions * mask[..., None], returns_to_go * mask
        ours = agent.update({"returns_to_go": returns_to_go, "obs": obs, "actions": actions,
                             "timesteps": timesteps, "mask": mask})
        # CORL's training step, as its train() runs it
        predicted = model(states=obs, actions=actions, returns_to_go=returns_to_go, time_steps=timesteps,
                          padding_mask=~mask.to(torch.bool))
        loss = (nn.functional.mse_loss(predicted, actions.detach(), reduction="none") * mask.unsqueeze(-1)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
    # CORL averages the masked squared error over all positions, padding included; the library over the real
    # ones: the library's loss times the real fraction is CORL's
    real_fraction = mask.mean().item()
    losses = loss_diffs({"action_loss": (float(ours["train/action_loss"]) * real_fraction, loss.item())})
    return "windows with right padding" if padded else "full windows", losses, max_diff_by_network(pairs())


def dt(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/offline/dt.py")
    lib = import_algorithm("dt")
    results = [_dt_setting(ctx, corl, lib, padded) for padded in (False, True)]
    return outcome("algorithms/dt.py", cell, results,
                   "batch 64 x K 20, dropout 0 on both, GELU (CORL's; the library's default is ReLU); padded "
                   "windows: CORL's loss averages over padding too (compared as the library's loss times the real "
                   "fraction; Adam's first step does not see the factor up to eps); CORL's timestep table has K "
                   "extra rows (read by padding only), left out")


# ------------------------------------------------------------------------------------------------------------
# SAC-N, EDAC, LB-SAC: algorithms/offline/{sac_n,edac,lb_sac}.py
# ------------------------------------------------------------------------------------------------------------

def corl_log_prob_sampler(mean, log_std, max_action, num_samples):
    """sample_tanh_gaussian with CORL's log pi: log N(u; mu, sigma) - log(1 - tanh(u)^2 + 1e-6)."""
    mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
    u = mean + log_std.exp() * torch.randn(mean.shape[0], num_samples, mean.shape[-1], device=mean.device)
    log_prob = torch.distributions.Normal(mean, log_std.exp()).log_prob(u).sum(-1)
    return max_action * torch.tanh(u), log_prob - torch.log(1 - torch.tanh(u).pow(2) + 1e-6).sum(-1)


# CORL file -> (the library's --variant, eta, CORL's trainer class and its extra arguments)
ENSEMBLES = {"sac_n": ("sac-n", 0.0, "SACN", {}), "edac": ("edac", 1.0, "EDAC", {"eta": 1.0}),
             "lb_sac": ("lb-sac", 0.0, "LBSAC", {})}


def _ensemble_setting(ctx: Context, corl, lib, name: str, log_pi: str) -> tuple[str, dict, dict]:
    variant, eta, trainer_name, trainer_kwargs = ENSEMBLES[name]
    num_critics, hidden = 10, 256
    lr = 1.8e-3 if variant == "lb-sac" else 3e-4
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = lib.Config(device="cpu", max_steps=10, variant=variant, num_critics=num_critics, eta=eta,
                            actor_lr=lr, critic_lr=lr, alpha_lr=lr,
                            critic_loss="mean" if variant == "lb-sac" else "sum",
                            critic_layer_norm=False, edac_init=variant != "lb-sac", hidden_dims=(hidden,) * 3)
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.critic_target)
        if variant == "lb-sac":
            actor = corl.Actor(OBS_DIM, ACT_DIM, hidden, edac_init=False, max_action=1.0)
            critic = corl.VectorizedCritic(OBS_DIM, ACT_DIM, hidden, num_critics, layernorm=False, edac_init=False)
        else:
            actor = corl.Actor(OBS_DIM, ACT_DIM, hidden, max_action=1.0)
            critic = corl.VectorizedCritic(OBS_DIM, ACT_DIM, hidden, num_critics)
        trainer = getattr(corl, trainer_name)(actor=actor, actor_optimizer=adam(actor, lr), critic=critic,
                                              critic_optimizer=adam(critic, lr), gamma=config.gamma, tau=config.tau,
                                              alpha_learning_rate=lr, device="cpu", **trainer_kwargs)
        trainer.log_alpha.data = trainer.log_alpha.data.to(ctx.dtype)  # CORL's log alpha is float32 always
        trainer.alpha = trainer.log_alpha.exp().detach()

        def pairs():
            ours_critic = [m for m in trainer.critic.critic if hasattr(m, "ensemble_size")]
            ours_target = [m for m in trainer.target_critic.critic if hasattr(m, "ensemble_size")]
            out = [*linear_pairs("actor", [*linears(agent.actor.trunk), agent.actor.mu, agent.actor.log_std],
                                 [*linears(trainer.actor.trunk), trainer.actor.mu, trainer.actor.log_sigma]),
                   ("log_alpha", agent.log_alpha.view(1), trainer.log_alpha)]  # CORL's has shape (1,)
            for network, ensemble, layers in (("critic", agent.critic, ours_critic),
                                              ("critic_target", agent.critic_target, ours_target)):
                for i, (a, b) in enumerate(zip(ensemble.layers, layers)):  # the same (N, in, out) layout
                    out += [(f"{network}.{i}.weight", a.weight, b.weight), (f"{network}.{i}.bias", a.bias, b.bias)]
            return out

        copy_to_reference(pairs())
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        sampler = lib.sample_tanh_gaussian if log_pi == "exact" else corl_log_prob_sampler
        # three draws in the same order and shapes on both sides: alpha's a ~ pi(.|s), the actor's, a' ~ pi(.|s')
        with replaced(lib, "sample_tanh_gaussian", sampler):
            torch.manual_seed(UPDATE_SEED)
            ours = {k: float(v) for k, v in agent.update(batch).items()}
        torch.manual_seed(UPDATE_SEED)
        theirs = trainer.update(as_columns(batch))
    losses = loss_diffs({"alpha_loss": (ours["train/alpha_loss"], theirs["alpha_loss"]),
                         "actor_loss": (ours["train/actor_loss"], theirs["actor_loss"]),
                         "critic_loss": (ours["train/critic_loss"] + eta * ours.get("train/diversity_loss", 0.0),
                                         theirs["critic_loss"])})
    setting = "log pi as the library's" if log_pi == "exact" else "log pi with CORL's + 1e-6"
    return setting, losses, max_diff_by_network(pairs())


def _ensemble(ctx: Context, name: str) -> Outcome:
    corl, cell = load(ctx, f"algorithms/offline/{name}.py")
    lib = import_algorithm("sac_n")
    as_is = _ensemble_setting(ctx, corl, lib, name, "exact")
    aligned = _ensemble_setting(ctx, corl, lib, name, "corl")
    variant = ENSEMBLES[name][0]
    sizes = {"sac-n": "N 10", "edac": "N 10, eta 1",
             "lb-sac": "N 10, lr 1.8e-3, critic loss averaged over N"}[variant]
    notes = (f"{sizes}, batch 256, 3 x 256; log pi: the library's exact log(1 - tanh(u)^2), CORL's "
             f"log(1 - tanh(u)^2 + 1e-6); "
             f"with CORL's formula put in the library's sampler: losses {max(aligned[1].values()):.1e}, "
             f"parameters {max(aligned[2].values()):.1e}")
    if variant == "lb-sac":
        notes += ("; without LayerNorm (CORL's LB-SAC puts one shared LayerNorm before the ReLU, the library one per "
                  "member after it)")
    result = outcome(f"algorithms/sac_n.py --variant {variant}", cell, [as_is], notes)
    result.details.append(summarise(*aligned))
    return result


def sac_n(ctx: Context) -> Outcome:
    return _ensemble(ctx, "sac_n")


def edac(ctx: Context) -> Outcome:
    return _ensemble(ctx, "edac")


def lb_sac(ctx: Context) -> Outcome:
    return _ensemble(ctx, "lb_sac")


# ------------------------------------------------------------------------------------------------------------
# Cal-QL: algorithms/finetune/cal_ql.py
# ------------------------------------------------------------------------------------------------------------

def _cal_ql_setting(ctx: Context, corl, lib, lagrange: bool, alpha: float, layers: int,
                    calibrate: bool) -> tuple[str, dict, dict]:
    n, batch_size = 10, 64
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = lib.Config(device="cpu", max_steps=10, cql_alpha=alpha, lagrange=lagrange, sparse_reward=False,
                            reward_scale=1.0, reward_bias=0.0, cql_clip_diff_min=-200.0, cql_num_samples=n,
                            calibrate=calibrate, actor_hidden_dims=(256,) * 3, critic_hidden_dims=(256,) * layers)
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.target_critic)
        critic_1, critic_2 = (corl.FullyConnectedQFunction(OBS_DIM, ACT_DIM, True, layers) for _ in range(2))
        actor = corl.TanhGaussianPolicy(OBS_DIM, ACT_DIM, 1.0, orthogonal_init=True)
        trainer = corl.CalQL(
            critic_1=critic_1, critic_1_optimizer=adam(critic_1, config.critic_lr), critic_2=critic_2,
            critic_2_optimizer=adam(critic_2, config.critic_lr), actor=actor,
            actor_optimizer=adam(actor, config.policy_lr), target_entropy=-float(ACT_DIM), discount=config.gamma,
            alpha_multiplier=1.0, use_automatic_entropy_tuning=True, backup_entropy=False,
            policy_lr=config.policy_lr, qf_lr=config.critic_lr, soft_target_update_rate=config.tau, bc_steps=0,
            target_update_period=1, cql_n_actions=n, cql_importance_sample=True, cql_lagrange=lagrange,
            cql_target_action_gap=0.8, cql_temp=1.0, cql_alpha=alpha, cql_max_target_backup=True,
            cql_clip_diff_min=-200.0, cql_clip_diff_max=math.inf, device="cpu")
        if not calibrate:
            trainer.switch_calibration()
        for module in (actor, trainer.log_alpha, trainer.log_alpha_prime):  # CORL's Scalars are float32 always
            module.to(ctx.dtype)
        pairs = lambda: [*linear_pairs("actor", linears(agent.actor.net), linears(trainer.actor.base_network)),  # noqa
                         ("actor.log_std_multiplier", agent.actor.log_std_multiplier,
                          trainer.actor.log_std_multiplier.constant),
                         ("actor.log_std_offset", agent.actor.log_std_offset, trainer.actor.log_std_offset.constant),
                         *ensemble_pairs("critic", agent.critic, [trainer.critic_1, trainer.critic_2]),
                         *ensemble_pairs("target_critic", agent.target_critic,
                                         [trainer.target_critic_1, trainer.target_critic_2]),
                         ("log_alpha", agent.log_entropy_alpha, trainer.log_alpha.constant),
                         ("log_alpha_prime", agent.lagrange_log_alpha, trainer.log_alpha_prime.constant)]
        copy_to_reference(pairs())
        batch = random_batch(batch_size, OBS_DIM, ACT_DIM, ctx.dtype, terminal_rate=0.2)
        with torch.no_grad():  # returns-to-go around the policy actions' Q: about half of the bounds bind
            q_now = agent.critic(batch["obs"], agent.act(batch["obs"])).mean(0)
        g = torch.Generator().manual_seed(UPDATE_SEED)
        batch["returns_to_go"] = q_now + 0.3 * q_now.std() * torch.randn(batch_size, generator=g)
        # CORL samples (in call order) a ~ pi(.|s) for the actor, n a' ~ pi(.|s') for the max backup, n at s and
        # n at s' for CQL, then the uniform actions; the library (1 + n) at s and (n + n) at s'
        eps_actor = torch.randn(batch_size, 1, ACT_DIM, generator=g)
        eps_backup, eps_current, eps_next = (torch.randn(batch_size, n, ACT_DIM, generator=g) for _ in range(3))
        uniform = torch.rand(batch_size, n, ACT_DIM, generator=g)
        draws = PreDrawn([eps_actor[:, 0], eps_backup, eps_current, eps_next],
                         [torch.cat([eps_actor, eps_current], 1), torch.cat([eps_backup, eps_next], 1)], uniform)
        with draws.library_side(lib):
            ours = agent.update(batch)
        columns = as_columns(batch) + [batch["returns_to_go"][:, None]]
        with draws.reference_side():
            theirs = trainer.train(columns)
        assert not draws.normal and not draws.ours_normal, "a side drew fewer samples than the other"
    pairs_of_losses = {
        "td_loss": (ours["train/td_loss"], theirs["qf1_loss"] + theirs["qf2_loss"]),
        "cql_gap": (ours["train/cql_gap"], (theirs["cql_qf1_diff"] + theirs["cql_qf2_diff"]) / 2),
        "actor_loss": (ours["train/actor_loss"], theirs["policy_loss"]),
        "critic_loss": (ours["train/critic_loss"], theirs["qf1_loss"] + theirs["qf2_loss"]
                        + theirs["cql_min_qf1_loss"] + theirs["cql_min_qf2_loss"])}
    if lagrange:
        pairs_of_losses["alpha_prime"] = (ours["train/lagrange_alpha"], theirs["alpha_prime"])
    setting = f"{'Lagrange, ' if lagrange else ''}alpha {alpha:g}, {layers} critic layers" + (
        "" if calibrate else ", calibration off")
    return setting, loss_diffs(pairs_of_losses), max_diff_by_network(pairs())


def cal_ql(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/finetune/cal_ql.py")
    lib = import_algorithm("cal_ql")
    results = [_cal_ql_setting(ctx, corl, lib, True, 5.0, 5, True),  # CORL's antmaze config
               _cal_ql_setting(ctx, corl, lib, False, 1.0, 3, True),  # CORL's adroit config
               _cal_ql_setting(ctx, corl, lib, False, 1.0, 3, False)]  # CORL's online phase, calibration off
    return outcome("algorithms/cal_ql.py", cell, results,
                   "CORL's antmaze (Lagrange, 5 critic layers) and adroit settings, and calibration off; max-Q "
                   "backup; batch 64 with returns-to-go around Q (about half the bounds bind); the same draws "
                   "handed to both")


# ------------------------------------------------------------------------------------------------------------
# SPOT: algorithms/finetune/spot.py
# ------------------------------------------------------------------------------------------------------------

def _spot_pairs(agent, trainer) -> list:
    vae_ours = [agent.vae.encoder[0], agent.vae.encoder[2], agent.vae.mean, agent.vae.log_std,
                agent.vae.decoder[0], agent.vae.decoder[2], agent.vae.decoder[4]]
    v = trainer.vae
    vae_theirs = [v.encoder_shared[0], v.encoder_shared[2], v.mean, v.log_std, v.decoder[0], v.decoder[2],
                  v.decoder[4]]
    return [*linear_pairs("vae", vae_ours, vae_theirs),
            *linear_pairs("actor", linears(agent.actor), linears(trainer.actor)),
            *linear_pairs("actor_target", linears(agent.actor_target), linears(trainer.actor_target)),
            *ensemble_pairs("critic", agent.critic, [trainer.critic_1, trainer.critic_2]),
            *ensemble_pairs("critic_target", agent.critic_target, [trainer.critic_1_target, trainer.critic_2_target])]


def spot(ctx: Context) -> Outcome:
    corl, cell = load(ctx, "algorithms/finetune/spot.py")
    lib = import_algorithm("spot")
    support_lambda, lambda_end, online_steps, online_it, gamma, online_gamma = 0.25, 0.2, 1000, 300, 0.99, 0.995
    results = []
    with default_dtype(ctx.dtype):
        torch.manual_seed(0)
        config = lib.Config(env="antmaze-umaze-v2", device="cpu", support_lambda=support_lambda, actor_lr=1e-4,
                            critic_lr=3e-4, actor_dropout=0.0, actor_init_w=1e-3, critic_init_w=3e-3, gamma=gamma,
                            online_gamma=online_gamma, online_lambda_end=lambda_end, online_steps=online_steps,
                            max_steps=1000, vae_steps=1)
        agent = lib.Agent(config, SPEC, CPU)
        perturb_(agent.actor_target, agent.critic_target)
        vae = corl.VAE(OBS_DIM, ACT_DIM, None, 1.0, 750)
        vae.device = "cpu"
        actor = corl.Actor(OBS_DIM, ACT_DIM, 1.0, init_w=1e-3)
        critic_1, critic_2 = corl.Critic(OBS_DIM, ACT_DIM, init_w=3e-3), corl.Critic(OBS_DIM, ACT_DIM, init_w=3e-3)
        trainer = corl.SPOT(
            max_action=1.0, actor=actor, actor_optimizer=adam(actor, 1e-4), critic_1=critic_1,
            critic_1_optimizer=adam(critic_1, 3e-4), critic_2=critic_2, critic_2_optimizer=adam(critic_2, 3e-4),
            vae=vae, vae_optimizer=adam(vae, 1e-3), discount=gamma, tau=0.005, policy_noise=0.2, noise_clip=0.5,
            policy_freq=2, beta=0.5, lambd=support_lambda, num_samples=1, iwae=False, lambd_cool=True,
            lambd_end=lambda_end, max_online_steps=online_steps, device="cpu")
        copy_to_reference(_spot_pairs(agent, trainer))
        batch = random_batch(BATCH, OBS_DIM, ACT_DIM, ctx.dtype)
        batch["actions"] = batch["actions"] * 0.999  # inside the box: the VAE's density of a data action is finite

        # 1. one VAE step
        torch.manual_seed(UPDATE_SEED)
        theirs = trainer.vae_train(as_columns(batch))
        torch.manual_seed(UPDATE_SEED)
        ours = agent.vae_update(batch)
        results.append(("VAE step", loss_diffs({"vae_loss": (ours["vae/loss"], theirs["VAE/vae_loss"])}),
                        max_diff_by_network(_spot_pairs(agent, trainer))))

        # 2. one offline update with the actor step: CORL's counter counts its VAE step, so 1 here
        agent.total_it = 1
        torch.manual_seed(UPDATE_SEED + 1)
        theirs = trainer.train(as_columns(batch))
        torch.manual_seed(UPDATE_SEED + 1)
        ours = agent.update(batch)
        results.append(("offline update (actor step)", loss_diffs({
            "critic_loss": (ours["train/critic_loss"], theirs["critic_loss"]),
            "actor_loss": (ours["train/actor_loss"], theirs["actor_loss"]),
            "density_penalty": (ours["train/density_penalty"], theirs["neg_log_beta_mean"])}),
            max_diff_by_network(_spot_pairs(agent, trainer))))

        # 3. the switch to online as CORL's train() makes it (discount, fresh Adams, lambda cooling), then one
        # online update with the actor step at online iteration online_it
        trainer.is_online, trainer.discount = True, online_gamma
        trainer.actor_optimizer = adam(trainer.actor, 1e-4)
        trainer.critic_1_optimizer, trainer.critic_2_optimizer = adam(critic_1, 3e-4), adam(critic_2, 3e-4)
        trainer.online_it = online_it - 1
        agent.start_online()
        agent.online_it = online_it - 1
        trainer.total_it, agent.total_it = 3, 1  # the next update of each is an actor step
        flipped = {k: v.flip(0) for k, v in batch.items()}
        torch.manual_seed(UPDATE_SEED + 2)
        theirs = trainer.train(as_columns(flipped))
        torch.manual_seed(UPDATE_SEED + 2)
        ours = agent.update(flipped)
        results.append((f"online update (actor step, t = {online_it})", loss_diffs({
            "critic_loss": (ours["train/critic_loss"], theirs["critic_loss"]),
            "actor_loss": (ours["train/actor_loss"], theirs["actor_loss"]),
            "density_penalty": (ours["train/density_penalty"], theirs["neg_log_beta_mean"]),
            "lambda": (ours["train/lambda"], theirs["lambd"])}),
            max_diff_by_network(_spot_pairs(agent, trainer))))
    return outcome("algorithms/spot.py", cell, results,
                   "one VAE step, then an offline update with the actor step, then the switch to online (gamma "
                   "0.995, fresh Adams, lambda cooling) and an online update at t = 300; differences after each, "
                   "the largest shown")


COMPARISONS = {  # --algos name -> (CORL's file, the comparison)
    "td3_bc": ("algorithms/offline/td3_bc.py", td3_bc),
    "iql": ("algorithms/offline/iql.py", iql),
    "cql": ("algorithms/offline/cql.py", cql),
    "awac": ("algorithms/offline/awac.py", awac),
    "bc": ("algorithms/offline/any_percent_bc.py", bc),
    "dt": ("algorithms/offline/dt.py", dt),
    "sac_n": ("algorithms/offline/sac_n.py", sac_n),
    "edac": ("algorithms/offline/edac.py", edac),
    "lb_sac": ("algorithms/offline/lb_sac.py", lb_sac),
    "cal_ql": ("algorithms/finetune/cal_ql.py", cal_ql),
    "spot": ("algorithms/finetune/spot.py", spot),
}
