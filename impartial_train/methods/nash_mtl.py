"""``nash-mtl``: multitask learning as a bargaining game (Navon et al., ICML 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import cosine_matrix, nash_bargaining


class NashMTL(GramianAggregator):
    r"""Nash-MTL: the Nash bargaining solution, :math:`G \alpha = 1/\alpha`, :math:`\alpha > 0`.

    Paper: A. Navon, A. Shamsian, I. Achituve, H. Maron, K. Kawaguchi, G. Chechik, E. Fetaya,
    "Multi-Task Learning as a Bargaining Game", ICML 2022, arXiv:2202.01017.

    Formula: :math:`d = \sum_i \alpha_i g_i` with :math:`g_i \cdot d = 1/\alpha_i` for every i,
    the maximiser of :math:`\sum_i \log(g_i \cdot d)` over the unit-norm ball (scaled).

    Solver (instead of the paper's sequence of CVXPY problems): :math:`\alpha` is the unique
    minimiser of the strictly convex, self-concordant
    :math:`\phi(\beta) = \frac12 \beta^\top (C + \epsilon I) \beta - \sum_i \log \beta_i` on unit
    rows (C the cosine matrix, :math:`\alpha_i = \beta_i / \|g_i\|`), found by Newton's method
    (20 iterations, ``solve_ex``, no host sync) started from the best multiple of 1: while the
    Newton decrement :math:`\lambda > 1/4` a batched line search keeps the best of the lengths
    8, 4, ..., 2^-10 and the damped :math:`1/(1+\lambda)` (global convergence, stays positive),
    then full steps. A zero row gets weight 0.

    No positive solution (a documented fallback): where some non-negative combination of the
    rows vanishes (0 in their convex hull: weak Pareto stationarity, e.g. opposite rows, or
    rank-1 rows of both signs) the bargaining problem has no solution. The ridge
    :math:`\epsilon` (default 1e-8) defines the answer there and keeps it continuous in J: the
    streams of the vanishing combination get weights of order :math:`1/\sqrt{\epsilon}` (1e4)
    whose contributions cancel, so d is small along them (d ~ 0 for opposite rows) and keeps the
    other streams' bargaining direction. Because the weights are large while d is not, the final
    :math:`w^\top J` is accumulated in float64 (``exact_combination``); in float32 it would be
    rounding noise.

    Deviation: the paper's direction has norm :math:`\sqrt S` whatever the gradients; with
    ``rescale=True`` (default) the weights are multiplied by the root mean square row norm, which
    keeps the direction and makes the method positively homogeneous with one stream = identity.

    Properties: permutation invariant; positively homogeneous (with ``rescale``);
    non-conflicting up to the ridge: :math:`u_i \cdot d = 1/\beta_i - \epsilon\beta_i` and
    :math:`\epsilon \|\beta\|^2 \le S`, so :math:`g_i \cdot d \ge -\sqrt{S\epsilon}\,\|g_i\|\,r`
    with r the RMS row norm (4.5e-4 relative for 20 streams; non-conflicting up to rounding
    wherever a positive solution exists and stays below :math:`1/\sqrt\epsilon`). Stateless.

    Args:
        eps: ridge on the cosine matrix.
        rescale: multiply by the RMS row norm (see above).
        iters: Newton iterations.
    """

    name = "nash-mtl"
    uses_losses = False
    exact_combination = True

    def __init__(self, eps: float = 1e-8, rescale: bool = True, iters: int = 20) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"nash-mtl: eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.rescale = bool(rescale)
        self.iters = int(iters)

    def _repr_options(self) -> dict:
        return {"eps": self.eps, "rescale": self.rescale}

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        cos, norms, nonzero = cosine_matrix(gramian)
        eye = torch.eye(s, dtype=cos.dtype, device=cos.device)
        beta = nash_bargaining(cos + self.eps * eye, self.iters)
        alpha = torch.where(nonzero, beta / torch.where(nonzero, norms, 1.0), 0.0)
        if self.rescale:
            alpha = alpha * (norms.square().mean()).sqrt()
        return torch.where(torch.isfinite(alpha).all(), alpha, torch.zeros_like(alpha))
