"""``upgrad``: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import cosine_matrix, project_dual_cone


class UPGrad(GramianAggregator):
    r"""UPGrad: the mean of every stream gradient projected onto the dual cone of the rows.

    Paper: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    arXiv:2406.16232 (Section 3, UPGrad; Proposition 1 for the projection).

    Formula: :math:`A(J) = \frac1S \sum_i \pi_J(g_i)`, where :math:`\pi_J` projects onto the dual
    cone :math:`\{x : J x \ge 0\}`. By Proposition 1, :math:`\pi_J(J^\top u) = J^\top v` with
    :math:`v = \arg\min_{v \ge u} v^\top G v`, so the weights are
    :math:`w = \sum_i v^{(i)}` with :math:`u = e_i / S`.

    Solver: the S small quadratic programs run as one batch of the primal-dual interior-point
    method (see MGDA) on the unit rows, with a ridge :math:`10^{-10}\sum_i \|v_i g_i\|^2`
    that makes each solution unique and bounded (the paper's reference code uses a ridge too).
    A zero row keeps its lower bound.

    Properties: permutation invariant, positively homogeneous, non-conflicting
    (:math:`J A(J) \ge 0`, up to the ridge), linear under scaling of the rows' weights. One
    stream: the identity. Stateless.

    Args:
        reg: the ridge.
        iters: interior-point iterations.
    """

    name = "upgrad"
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
        lower = torch.eye(s, dtype=cos.dtype, device=cos.device) / s
        v = project_dual_cone(cos, norms, nonzero, lower, self.reg, self.iters)
        w = v.sum(0)
        return torch.where(torch.isfinite(w).all(), w, torch.full_like(w, 1.0 / s))
