"""Blocks several files share and that drifted when copied: the batched linear layer, the critic ensemble, and
the tanh-squashed Gaussian policy's sampling and log-density.

Written once, not copied per file: nine copies of the batched layer had drifted into five versions (two
initialisation idioms, three forward styles, two state-dict layouts). The small networks an algorithm reads
with its losses (an MLP, an actor, a VAE) stay in the algorithm files; this module holds the one block whose
point is speed, not the algorithm: K members' matmuls as one `baddbmm`, which a reader may treat as
"K critics" (`CriticEnsemble(obs_dim, act_dim, hidden_dims, K)` returns Q-values of shape (K, B)).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class VectorizedLinear(nn.Module):
    """K independent linear layers applied as one batched matmul: (K, B, in) -> (K, B, out).

    `weight` (K, in, out) and `bias` (K, 1, out) are initialised as nn.Linear's, member by member: uniform in
    +-1/sqrt(in), the weight drawn before the bias.
    """

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class CriticEnsemble(nn.Module):
    """K critics Q_1..Q_K(s, a), each an MLP on [s, a] with ReLU hidden layers, evaluated together.

    `forward(obs (B, obs_dim), actions (B, act_dim))` returns Q-values of shape (K, B). Twin critics
    (TD3, SAC, CQL, IQL) are K = 2; BEAR's and SAC-N's ensembles are larger. `layer_norm`: each hidden layer is
    Linear -> ReLU -> LayerNorm, with a LayerNorm (scale and shift) per member (ReBRAC's critics, as the
    authors' and d3rlpy's). `edac_init_()` re-initialises as SAC-N / EDAC / ReBRAC do.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], ensemble_size: int = 2,
                 layer_norm: bool = False):
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims, 1]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size
        # per member and hidden layer: LayerNorm's scale (K, 1, width) and shift, after the ReLU
        self.norms = nn.ModuleList(_EnsembleLayerNorm(width, ensemble_size) for width in hidden_dims) \
            if layer_norm else None
        self._register_load_state_dict_pre_hook(_sequential_keys_to_layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_weights: bool = False) -> torch.Tensor:
        """Q-values (K, B) of one input for every member, obs (B, obs_dim) and actions (B, act_dim), or of one input
        per member, obs (K, B, obs_dim) and actions (K, B, act_dim) (EDAC differentiates each member in its own
        copy of the action). `detach_weights`: differentiable in the inputs only, never into the critics' weights
        (an actor's loss Q(s, pi(s)) then trains the actor alone)."""
        x = torch.cat([obs, actions], -1)
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.ensemble_size, -1, -1)
        for i, layer in enumerate(self.layers):
            weight, bias = (layer.weight.detach(), layer.bias.detach()) if detach_weights else (layer.weight,
                                                                                                 layer.bias)
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.layers) - 1:
                x = F.relu(x)
                if self.norms is not None:
                    x = self.norms[i](x, detach_weights)
        return x.squeeze(-1)

    def q1(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_1(s, a) alone, shape (B,), differentiable in the inputs only: an actor objective that reads the
        first critic (TD3, BCQ) costs neither the other members' forward nor their backward."""
        x = torch.cat([obs, actions], -1)
        for i, layer in enumerate(self.layers):
            x = torch.addmm(layer.bias[0].detach(), x, layer.weight[0].detach())
            if i < len(self.layers) - 1:
                x = F.relu(x)
                if self.norms is not None:
                    x = self.norms[i](x.unsqueeze(0), True, member=0).squeeze(0)
        return x.squeeze(-1)

    @torch.no_grad()
    def edac_init_(self, hidden_bias: float = 0.1, head_bound: float = 3e-3) -> "CriticEnsemble":
        """The initialisation of SAC-N / EDAC (the authors' and CORL's) and ReBRAC: hidden weights as nn.Linear
        (kept), hidden biases `hidden_bias`, the head's weight and bias uniform in +-`head_bound`."""
        for layer in self.layers[:-1]:
            layer.bias.fill_(hidden_bias)
        nn.init.uniform_(self.layers[-1].weight, -head_bound, head_bound)
        nn.init.uniform_(self.layers[-1].bias, -head_bound, head_bound)
        return self


class _EnsembleLayerNorm(nn.Module):
    """LayerNorm over the features of each member's activations (K, B, width), with a scale and a shift per
    member (K critics with a LayerNorm each, evaluated together)."""

    def __init__(self, width: int, ensemble_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ensemble_size, 1, width))
        self.bias = nn.Parameter(torch.zeros(ensemble_size, 1, width))
        self.width, self.eps = width, eps

    def forward(self, x: torch.Tensor, detach_weights: bool = False, member: int | None = None) -> torch.Tensor:
        weight, bias = (self.weight, self.bias) if member is None else (self.weight[member:member + 1],
                                                                        self.bias[member:member + 1])
        if detach_weights:
            weight, bias = weight.detach(), bias.detach()
        return torch.addcmul(bias, F.layer_norm(x, (self.width,), eps=self.eps), weight)


def _sequential_keys_to_layers(state_dict, prefix, *args) -> None:
    """Checkpoints written before the ensemble was shared kept some critics as `nn.Sequential(linear, ReLU,
    ...)`, keys `net.<2i>.weight`: they load as `layers.<i>.weight`."""
    for key in [k for k in state_dict if k.startswith(prefix + "net.")]:
        index, rest = key[len(prefix) + 4:].split(".", 1)
        state_dict[f"{prefix}layers.{int(index) // 2}.{rest}"] = state_dict.pop(key)


# The tanh-squashed Gaussian of SAC-style actors (CQL, MOPO, COMBO): its copies drifted (one left out the
# -log(max_action) of the scaling), so its density is written once.


def _log_one_minus_tanh_sq(u: torch.Tensor) -> torch.Tensor:
    """log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), finite for any u."""
    return 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))


def tanh_gaussian_log_prob(u: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor,
                           max_action: float) -> torch.Tensor:
    """log pi(a|s) of a = max_action * tanh(u), as a density over the action box (last dim summed).

    log pi(a|s) = sum_i [ log N(u_i; mu_i, sigma_i) - log(1 - tanh(u_i)^2) - log(max_action) ]. The last term
    (the Jacobian of the scaling) makes log pi a density in the same units as the uniform proposal's
    log(1 / (2 max_action))^|A|, so the two can be mixed in the importance-sampled logsumexp; for
    max_action = 1 (D4RL) it is zero and this is the reference code's log-likelihood.
    """
    normal = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return (normal - _log_one_minus_tanh_sq(u) - math.log(max_action)).sum(-1)


def sample_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor, max_action: float,
                         num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised samples a ~ pi(.|s): mean/log_std (B, A) -> actions (B, n, A), log pi(a|s) (B, n)."""
    mean, log_std = mean.unsqueeze(1), log_std.unsqueeze(1)
    u = mean + log_std.exp() * torch.randn(mean.shape[0], num_samples, mean.shape[-1], device=mean.device)
    return max_action * torch.tanh(u), tanh_gaussian_log_prob(u, mean, log_std, max_action)
