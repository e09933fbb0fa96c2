"""Ensembles of small networks evaluated as one: the batched linear layer and the critic ensemble.

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
    (TD3, SAC, CQL, IQL) are K = 2; BEAR's and SAC-N's ensembles are larger.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...], ensemble_size: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim, *hidden_dims, 1]
        self.layers = nn.ModuleList(VectorizedLinear(i, o, ensemble_size) for i, o in zip(dims[:-1], dims[1:]))
        self.ensemble_size = ensemble_size
        self._register_load_state_dict_pre_hook(_sequential_keys_to_layers)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_weights: bool = False) -> torch.Tensor:
        """Q-values (K, B). `detach_weights`: differentiable in the inputs only, never into the critics' weights
        (an actor's loss Q(s, pi(s)) then trains the actor alone)."""
        x = torch.cat([obs, actions], -1).unsqueeze(0).expand(self.ensemble_size, -1, -1)
        for i, layer in enumerate(self.layers):
            weight, bias = (layer.weight.detach(), layer.bias.detach()) if detach_weights else (layer.weight,
                                                                                                 layer.bias)
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.squeeze(-1)

    def q1(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q_1(s, a) alone, shape (B,), differentiable in the inputs only: an actor objective that reads the
        first critic (TD3, BCQ) costs neither the other members' forward nor their backward."""
        x = torch.cat([obs, actions], -1)
        for i, layer in enumerate(self.layers):
            x = torch.addmm(layer.bias[0].detach(), x, layer.weight[0].detach())
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


def _sequential_keys_to_layers(state_dict, prefix, *args) -> None:
    """Checkpoints written before the ensemble was shared kept some critics as `nn.Sequential(linear, ReLU,
    ...)`, keys `net.<2i>.weight`: they load as `layers.<i>.weight`."""
    for key in [k for k in state_dict if k.startswith(prefix + "net.")]:
        index, rest = key[len(prefix) + 4:].split(".", 1)
        state_dict[f"{prefix}layers.{int(index) // 2}.{rest}"] = state_dict.pop(key)
