"""``cagrad``: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import interior_point

_RESCALES = (0, 1, 2)


class CAGrad(GramianAggregator):
    r"""CAGrad: the best worst-case improvement in a ball around the average gradient.

    Paper: B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021, arXiv:2110.14048.

    Formula: with :math:`g_0 = \frac1S \sum_i g_i` and :math:`\rho = c \|g_0\|`, the primal
    :math:`\max_d \min_i g_i \cdot d` s.t. :math:`\|d - g_0\| \le \rho` is solved through its dual
    over the simplex, :math:`w = \arg\min_{w \in \Delta} g_w \cdot g_0 + \rho \|g_w\|`
    (:math:`g_w = \sum_i w_i g_i`), and :math:`d = g_0 + \frac{\rho}{\|g_w\|} g_w`, i.e. weights
    :math:`\frac1S + \frac{\rho}{\|g_w\|} w`. ``rescale`` as in the official code: 0 none,
    1 divide by :math:`1 + c^2` (the code's default), 2 divide by :math:`1 + c`.

    Deviation: the default is ``rescale=2`` so that identical rows (and one stream) give exactly
    their mean / the identity (with 1 the identity would be scaled by 1.2 for c = 0.5); the
    engine's norm rescaling (on by default) makes the choice immaterial.

    Solver: the dual is convex (linear + norm) on the simplex; it is solved by the same
    primal-dual interior-point method as MGDA with the exact Hessian of the objective
    (:math:`\|g_w\|` smoothed as :math:`\sqrt{\|g_w\|^2 + 10^{-16}}` in units of the mean squared
    row norm; the official code smooths with 1e-8), on the Gramian normalised by its mean
    diagonal. Mean gradient zero: d = g_0 = 0 (weights 1/S).

    Properties: permutation invariant, positively homogeneous; not non-conflicting in general
    (it is for c large enough, where it tends to MGDA). c = 0 gives the mean. One stream: the
    identity (rescale 2 or 0 scaled... see above; the default gives the identity). Stateless.

    Args:
        c: radius of the ball relative to :math:`\|g_0\|` (paper: 0.5 default, in [0, 1)).
        rescale: 0, 1 or 2 (see above).
        iters: interior-point iterations.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5, rescale: int = 2, iters: int = 30) -> None:
        super().__init__()
        if c < 0:
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        if rescale not in _RESCALES:
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.iters = int(iters)

    def _repr_options(self) -> dict:
        return {"c": self.c, "rescale": self.rescale}

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        scale = gramian.diagonal().mean()
        g = gramian / torch.where(scale > 0, scale, 1.0)
        b = torch.full((s,), 1.0 / s, dtype=dt, device=dev)
        gb = g @ b
        radius = self.c * (b @ gb).clamp_min(0.0).sqrt()
        delta = 1e-16

        def grad_hess(w: Tensor) -> tuple[Tensor, Tensor]:
            gw = (g @ w.unsqueeze(-1)).squeeze(-1)
            rho = ((w * gw).sum(-1, keepdim=True).clamp_min(0.0) + delta).sqrt()
            grad = gb + radius * gw / rho
            outer = gw.unsqueeze(-1) * gw.unsqueeze(-2)
            hess = radius * (g / rho.unsqueeze(-1) - outer / rho.unsqueeze(-1) ** 3)
            return grad, hess

        x = interior_point(grad_hess, b.clone(), torch.ones_like(b), self.iters)
        x = x.clamp_min(0.0)
        x = x / x.sum()
        gw_norm = (x @ g @ x).clamp_min(0.0).sqrt()
        lam = radius / gw_norm.clamp_min(delta**0.5)
        w = b + lam * x
        if self.rescale == 1:
            w = w / (1 + self.c**2)
        elif self.rescale == 2:
            w = w / (1 + self.c)
        return torch.where(torch.isfinite(w).all(), w, b)
