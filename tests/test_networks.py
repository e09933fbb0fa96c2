"""common/networks.py: the critic ensemble equals K separate MLPs (with and without LayerNorm), its q1 and
detached-weight forms, the EDAC initialisation, old checkpoints' keys, and the tanh-Gaussian density."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from common.networks import CriticEnsemble, VectorizedLinear, sample_tanh_gaussian, tanh_gaussian_log_prob


def member_by_member(critic: CriticEnsemble, obs: torch.Tensor, actions: torch.Tensor, k: int) -> torch.Tensor:
    """Member k as a plain MLP of nn.Linear (and nn.LayerNorm) built from its weights."""
    x = torch.cat([obs, actions], -1)
    for i, layer in enumerate(critic.layers):
        linear = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
        linear.weight.data, linear.bias.data = layer.weight[k].T.clone(), layer.bias[k, 0].clone()
        x = linear(x)
        if i < len(critic.layers) - 1:
            x = torch.relu(x)
            if critic.norms is not None:
                norm = nn.LayerNorm(x.shape[-1])
                norm.weight.data = critic.norms[i].weight[k, 0].clone()
                norm.bias.data = critic.norms[i].bias[k, 0].clone()
                x = norm(x)
    return x.squeeze(-1)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_the_ensemble_is_k_separate_critics(layer_norm):
    torch.manual_seed(0)
    critic = CriticEnsemble(3, 2, (16, 16), ensemble_size=4, layer_norm=layer_norm)
    if layer_norm:  # away from LayerNorm's initial scale 1 and shift 0, so that they are checked too
        for norm in critic.norms:
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)
    obs, actions = torch.randn(7, 3), torch.randn(7, 2)
    q = critic(obs, actions)
    assert q.shape == (4, 7)
    for k in range(4):
        torch.testing.assert_close(q[k], member_by_member(critic, obs, actions, k))
    torch.testing.assert_close(critic.q1(obs, actions), q[0])


def test_detached_weights_train_the_inputs_only():
    critic = CriticEnsemble(3, 2, (8,), ensemble_size=2, layer_norm=True)
    actions = torch.randn(5, 2, requires_grad=True)
    critic(torch.randn(5, 3), actions, detach_weights=True).sum().backward()
    assert actions.grad is not None and all(p.grad is None for p in critic.parameters())
    critic.q1(torch.randn(5, 3), actions).sum().backward()
    assert all(p.grad is None for p in critic.parameters())


def test_edac_init_sets_hidden_biases_and_a_small_head():
    critic = CriticEnsemble(3, 2, (32, 32), ensemble_size=5).edac_init_()
    assert all(torch.all(layer.bias == 0.1) for layer in critic.layers[:-1])
    head = critic.layers[-1]
    assert head.weight.abs().max() <= 3e-3 and head.bias.abs().max() <= 3e-3 and head.weight.std() > 1e-3
    bound = 1 / math.sqrt(5)  # hidden weights keep nn.Linear's U(+-1/sqrt(fan_in))
    assert critic.layers[0].weight.abs().max() <= bound


def test_vectorized_linear_initialises_each_member_as_nn_linear():
    torch.manual_seed(0)
    layer = VectorizedLinear(100, 50, 3)
    weight = layer.weight.detach()
    assert weight.abs().max() <= 0.1 and float(weight.std()) == pytest.approx(0.1 / math.sqrt(3), rel=0.05)


def test_checkpoints_with_sequential_critic_keys_load():
    critic = CriticEnsemble(3, 2, (8, 8), ensemble_size=2)
    old = {f"net.{2 * i}.{name}": tensor for i, layer in enumerate(critic.layers)
           for name, tensor in layer.state_dict().items()}  # nn.Sequential(linear, ReLU, linear, ...)
    clone = CriticEnsemble(3, 2, (8, 8), ensemble_size=2)
    clone.load_state_dict(old)
    obs, actions = torch.randn(4, 3), torch.randn(4, 2)
    torch.testing.assert_close(clone(obs, actions), critic(obs, actions))


@pytest.mark.parametrize("max_action", [1.0, 2.0, 0.4])
def test_tanh_gaussian_log_prob_is_the_density_on_the_action_box(max_action):
    """Against torch.distributions: a Normal pushed through tanh and the scaling by max_action."""
    torch.manual_seed(0)
    mean, log_std = torch.randn(6, 3), 0.3 * torch.randn(6, 3)
    actions, log_prob = sample_tanh_gaussian(mean, log_std, max_action, 5)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Independent(torch.distributions.Normal(mean, log_std.exp()), 1),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(0.0, max_action)])
    expected = dist.log_prob(actions.transpose(0, 1).clamp(-max_action * (1 - 1e-6), max_action * (1 - 1e-6)))
    torch.testing.assert_close(log_prob, expected.transpose(0, 1), atol=1e-3, rtol=1e-4)
    u = torch.atanh(actions / max_action)
    torch.testing.assert_close(tanh_gaussian_log_prob(u, mean.unsqueeze(1), log_std.unsqueeze(1), max_action),
                               log_prob, atol=1e-4, rtol=1e-5)
