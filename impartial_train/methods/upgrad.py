"""``upgrad``: unconflicting projection of gradients (Quinton & Rey, 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dual_cone import DualConeAggregator


class UPGrad(DualConeAggregator):
    r"""UPGrad: the mean of every stream gradient projected onto the dual cone of the rows.

    Paper: P. Quinton, V. Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    arXiv:2406.16232 (Section 3, UPGrad; Proposition 1 for the projection).

    Formula: :math:`A(J) = \frac1S \sum_i \pi_J(g_i)`, where :math:`\pi_J` projects onto the dual
    cone :math:`\{x : J x \ge 0\}`. By Proposition 1, :math:`\pi_J(J^\top u) = J^\top v` with
    :math:`v = \arg\min_{v \ge u} v^\top G v`, so the weights are
    :math:`w = \sum_i v^{(i)}` with :math:`u = e_i / S`.

    Solver: the S small quadratic programs run as one batch on the unit rows, with a ridge
    :math:`10^{-10}\sum_i \|v_i g_i\|^2` that makes each solution unique and bounded (the
    paper's reference code uses a ridge too): on the CPU by block principal pivoting, an
    active-set method that stops at the exact solution and starts from the last call's support;
    elsewhere by the primal-dual interior-point method of MGDA (see docs/methods.md). A zero row
    keeps its lower bound.

    Properties: permutation invariant, positively homogeneous, non-conflicting
    (:math:`J A(J) \ge 0`, up to the ridge), linear under scaling of the rows' weights. One
    stream: the identity. Stateless.

    Args:
        reg: the ridge.
        iters: interior-point iterations.
    """

    name = "upgrad"

    def _lower(self, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.eye(s, dtype=dtype, device=device) / s
