"""``dualproj``: projection of the mean gradient onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dual_cone import DualConeAggregator


class DualProj(DualConeAggregator):
    r"""DualProj: the average gradient projected onto the dual cone of the rows.

    Paper: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    arXiv:2406.16232 (the DualProj aggregator, after Lopez-Paz & Ranzato's GEM projection).

    Formula: :math:`A(J) = \pi_J(\frac1S 1^\top J) = J^\top v`,
    :math:`v = \arg\min_{v \ge 1/S} v^\top G v` (Proposition 1), :math:`\pi_J` the projection
    onto :math:`\{x : J x \ge 0\}`.

    Solver: as UPGrad (block principal pivoting on the CPU, interior point elsewhere; unit rows,
    ridge 1e-10).

    Properties: permutation invariant, positively homogeneous, non-conflicting (up to the
    ridge). One stream: the identity. Stateless.
    """

    name = "dualproj"

    def _lower(self, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.full((1, s), 1.0 / s, dtype=dtype, device=device)
