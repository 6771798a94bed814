"""Network building blocks shared by the example models."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

MIN_SCALE = 1e-3
"""Lower bound of every learned standard deviation (keeps log-densities finite)."""


def linear(layer: nn.Linear, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
    """``layer(x)``; with ``detach_params`` the layer's weights are used but receive no gradient.

    Used for the encoder path of DReG (Tucker et al., 2018), where the decoder is evaluated on the
    encoder's samples but only the encoder may learn from that evaluation.
    """
    if not detach_params:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.detach()
    return F.linear(x, layer.weight.detach(), bias)


class MLP(nn.Module):
    """Fully connected network ``sizes[0] -> ... -> sizes[-1]``.

    The activation follows every hidden layer, and the last one too when ``activate_output``.
    ``forward(x, detach_params=True)`` applies the same weights without letting gradients reach
    them.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: type[nn.Module] = nn.ReLU,
        activate_output: bool = False,
    ):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {sizes}")
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.activation = activation()
        self.activate_output = activate_output

    def forward(self, x: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = linear(layer, x, detach_params)
            if i < last or self.activate_output:
                x = self.activation(x)
        return x


def positive(raw: torch.Tensor, minimum: float = MIN_SCALE) -> torch.Tensor:
    """Map an unconstrained tensor to ``(minimum, inf)`` with a softplus."""
    return F.softplus(raw) + minimum


class GaussianEncoder(nn.Module):
    """``x -> Normal(loc(x), scale(x))``, a diagonal Gaussian posterior (Kingma & Welling, 2014)."""

    def __init__(self, input_dim: int, hidden_dim: int, latent_dim: int, num_layers: int = 2):
        super().__init__()
        self.body = MLP([input_dim] + [hidden_dim] * num_layers, nn.Tanh, activate_output=True)
        self.loc = nn.Linear(hidden_dim, latent_dim)
        self.raw_scale = nn.Linear(hidden_dim, latent_dim)

    def forward(self, x: torch.Tensor) -> Normal:
        h = self.body(x)
        return Normal(self.loc(h), positive(self.raw_scale(h)), validate_args=False)
