"""``mean``: the average of the stream gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Aggregation, RowScaler, check_matrix, combine


class Mean(RowScaler):
    r"""Average :math:`A(J) = \frac{1}{S} 1^\top J`.

    Paper: none (baseline). Properties: permutation invariant, positively homogeneous, linear
    (w = 1/S). Not non-conflicting. One stream: the identity. Stateless.
    """

    name = "mean"
    uses_losses = False

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        return torch.full((s,), 1.0 / s, dtype=gramian.dtype, device=gramian.device)

    def forward(self, J, *, gramian=None, losses=None, activation=None) -> Aggregation:
        check_matrix(J)
        s = J.shape[0]
        w = torch.full((s,), 1.0 / max(s, 1), dtype=torch.float64, device=J.device)
        return combine(J, w)
