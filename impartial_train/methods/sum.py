"""``sum``: the plain sum of the stream gradients (vanilla training)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregation, RowScaler, check_matrix, combine


class Sum(RowScaler):
    r"""Plain sum :math:`A(J) = 1^\top J` (what autograd does without surgery).

    Paper: none (the baseline every multitask paper compares against).
    Properties: permutation invariant, positively homogeneous (A(sJ) = s A(J)), linear
    (weights w = 1). Not non-conflicting. One stream: the identity. Stateless.
    """

    name = "sum"
    uses_losses = False

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)

    def forward(self, J, *, gramian=None, losses=None, activation=None) -> Aggregation:
        check_matrix(J)  # no Gramian needed: skip the S x S x D product
        return combine(J, torch.ones(J.shape[0], dtype=torch.float64, device=J.device))
