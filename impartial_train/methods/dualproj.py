"""``dualproj``: projection of the mean gradient onto the dual cone (Quinton & Rey, 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import cosine_matrix, project_dual_cone


class DualProj(GramianAggregator):
    r"""DualProj: the average gradient projected onto the dual cone of the rows.

    Paper: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    arXiv:2406.16232 (the DualProj aggregator, after Lopez-Paz & Ranzato's GEM projection).

    Formula: :math:`A(J) = \pi_J(\frac1S 1^\top J) = J^\top v`,
    :math:`v = \arg\min_{v \ge 1/S} v^\top G v` (Proposition 1), :math:`\pi_J` the projection
    onto :math:`\{x : J x \ge 0\}`.

    Solver: as UPGrad (interior point on unit rows, ridge 1e-10).

    Properties: permutation invariant, positively homogeneous, non-conflicting (up to the
    ridge). One stream: the identity. Stateless.
    """

    name = "dualproj"
    uses_losses = False

    def __init__(self, reg: float = 1e-10, iters: int = 20) -> None:
        super().__init__()
        self.reg = float(reg)
        self.iters = int(iters)

    def _repr_options(self) -> dict:
        return {"reg": self.reg}

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        cos, norms, nonzero = cosine_matrix(gramian)
        lower = torch.full((1, s), 1.0 / s, dtype=cos.dtype, device=cos.device)
        w = project_dual_cone(cos, norms, nonzero, lower, self.reg, self.iters)[0]
        return torch.where(torch.isfinite(w).all(), w, torch.full_like(w, 1.0 / s))
