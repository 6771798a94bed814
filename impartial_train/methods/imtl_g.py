"""``imtl-g``: impartial multi-task learning, gradient balance (Liu et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import cosine_matrix, lstsq_tikhonov


class IMTLG(GramianAggregator):
    r"""IMTL-G: the combination whose projections on every unit task direction are equal.

    Paper: L. Liu, Y. Li, Z. Kuang, J.-H. Xue, Y. Chen, W. Yang, Q. Liao, W. Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021 (OpenReview IMPnRXEWpvr; no arXiv version).
    The gradient-balance part (IMTL-G) of the paper.

    Formula: find :math:`\alpha` with :math:`\sum_i \alpha_i = 1` such that
    :math:`d = \sum_i \alpha_i g_i` satisfies :math:`d \cdot u_i = d \cdot u_1` for every unit
    direction :math:`u_i = g_i / \|g_i\|`. The paper's closed form
    :math:`\alpha_{2:S} = g_1 U^\top (D U^\top)^{-1}` (D, U: differences of raw and unit rows) is
    the same solution; equivalently :math:`\alpha \propto G^{-1} n` with n the row norms.

    Computed on the unit rows: with :math:`d = \sum_i \beta_i u_i`, solve the bordered system
    :math:`C\beta - c\,1 = 0`, :math:`\sum_i \beta_i n_{min}/n_i = 1` (C the cosine matrix),
    then :math:`\alpha_i \propto \beta_i / n_i`. Singular systems (duplicate, colinear, opposite
    rows, S > D) get the minimum-norm least-squares solution (iterated Tikhonov, 6 steps with a
    ridge 1e-8 of the mean squared singular value: a pseudo-inverse with a relative cut-off
    ~1e-4, without SVD or host sync; rows closer than that to colinear count as colinear):
    opposite rows give :math:`c = 0`, d = 0; duplicates share their weight. A zero row has no
    direction: its weight is 0 and it imposes no constraint.

    Properties: permutation invariant, positively homogeneous, scale invariant per row (the
    weights on unit directions do not depend on the row norms); not guaranteed non-conflicting
    (the common projection c may be negative). One stream: the identity. Stateless.
    """

    name = "imtl-g"
    uses_losses = False

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        cos, norms, nonzero = cosine_matrix(gramian)
        n_min = torch.where(nonzero, norms, torch.inf).amin()
        m = torch.where(nonzero, n_min / norms, 0.0)
        # The bordered system [[C, -1_nz], [m^T, 0]] [beta; c] = e_S.
        k = torch.cat(
            (
                torch.cat((cos, nonzero.to(cos.dtype).neg_().unsqueeze(1)), 1),
                torch.nn.functional.pad(m, (0, 1)).unsqueeze(0),
            )
        )
        rhs = torch.zeros(s + 1, dtype=cos.dtype, device=cos.device)
        rhs[s] = 1.0
        alpha = m * lstsq_tikhonov(k, rhs)[:s]
        total = alpha.sum()
        ok = torch.isfinite(total) & (total.abs() > 1e-12)
        return torch.where(ok, alpha / total, 1.0 / s)
