"""``cagrad``: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import barrier_newton

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

    Solver: with :math:`\rho \|y\| = \min_{t > 0} \frac{\|y\|^2}{2t} + \frac{\rho^2 t}{2}`,
    the dual becomes the smooth, jointly convex problem
    :math:`\min_{w \in \Delta, t > 0} g_w \cdot g_0 + \frac{w^\top G w}{2t} + \frac{\rho^2 t}{2}`
    (the perspective of a quadratic; :math:`t^* = \|g_w\| / \rho`), free of the kink at
    :math:`g_w = 0` that defeats Newton-type solvers when the rows are nearly Pareto-stationary.
    It is solved on the Gramian normalised by its mean diagonal by a primal log-barrier Newton
    method (48 steps, barrier weight 1 -> 1e-14, bordered KKT solves, batched backtracking line
    search: no host sync); then :math:`\lambda = \rho / \|g_w\|` (or :math:`1/t` where
    :math:`g_w \approx 0`). Mean gradient zero (or c = 0): d is the mean gradient.

    Properties: permutation invariant, positively homogeneous; not non-conflicting in general
    (as c grows, the direction approaches MGDA's). c = 0 gives the mean. One stream: the
    identity (with the default ``rescale=2``). Stateless.

    Args:
        c: radius of the ball relative to :math:`\|g_0\|` (paper: 0.5 default, in [0, 1)).
        rescale: 0, 1 or 2 (see above).
        iters: interior-point iterations.
    """

    name = "cagrad"
    uses_losses = False

    def __init__(self, c: float = 0.5, rescale: int = 2, iters: int = 48) -> None:
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
        r2 = radius.square().clamp_min(1e-300)

        def value(x: Tensor) -> Tensor:
            w, t = x[..., :s], x[..., s]
            q = ((w @ g) * w).sum(-1)
            return w @ gb + q / (2 * t) + 0.5 * r2 * t

        def grad_hess(x: Tensor) -> tuple[Tensor, Tensor]:
            w, t = x[:s], x[s:]
            gw = g @ w
            q = w @ gw
            grad = torch.cat((gb + gw / t, 0.5 * (r2 - q / t.square())))
            hess = torch.empty(s + 1, s + 1, dtype=dt, device=dev)
            hess[:s, :s] = g / t
            hess[:s, s] = -gw / t.square()
            hess[s, :s] = hess[:s, s]
            hess[s, s] = q / t**3
            return grad, hess

        # Start: uniform w, and the t that is optimal for it (||g_0|| / rho = 1 / c).
        t0 = torch.full((1,), 1.0 / max(self.c, 1e-12), dtype=dt, device=dev)
        x0 = torch.cat((b, t0))
        a = torch.cat((torch.ones_like(b), torch.zeros_like(t0)))
        x = barrier_newton(value, grad_hess, x0, a, self.iters)
        w = x[:s].clamp_min(0.0)
        w = w / w.sum()
        # lambda = rho / ||g_w||: the barrier's t = ||g_w|| / rho is only accurate to about the
        # square root of the objective's accuracy, so use the closed form unless g_w ~ 0 (where
        # the Gramian cannot resolve ||g_w|| and t is the better estimate).
        q = w @ g @ w
        lam = torch.where(q > 1e-8, radius / q.clamp_min(1e-300).sqrt(), 1.0 / x[s])
        divisor = {1: 1 + self.c**2, 2: 1 + self.c}.get(self.rescale, 1.0)
        out = (b + lam * w) / divisor
        # rho = 0 (c = 0 or zero mean gradient): d = g_0, the plain mean.
        ok = (radius > 0) & torch.isfinite(out).all()
        return torch.where(ok, out, b / divisor)
