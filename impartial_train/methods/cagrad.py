"""``cagrad``: conflict-averse gradient descent (Liu et al., NeurIPS 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import SUPPORTS_MAX, all_supports, barrier_newton

_RESCALES = (0, 1, 2)


class CAGrad(GramianAggregator):
    r"""CAGrad: the best worst-case improvement in a ball around the average gradient.

    Paper: B. Liu, X. Liu, X. Jin, P. Stone, Q. Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021, arXiv:2110.14048.

    Formula: with :math:`g_0 = \frac1S \sum_i g_i` and :math:`\rho = c \|g_0\|`,
    :math:`d = \arg\max_d \min_i g_i \cdot d` s.t. :math:`\|d - g_0\| \le \rho`. The paper solves
    the dual over the simplex, :math:`w = \arg\min_{w \in \Delta} g_w \cdot g_0 + \rho \|g_w\|`,
    and returns :math:`d = g_0 + \frac{\rho}{\|g_w\|} g_w`. ``rescale`` as in the official code:
    0 none, 1 divide by :math:`1 + c^2` (the code's default), 2 divide by :math:`1 + c`.

    Deviation: the default is ``rescale=2`` so that identical rows (and one stream) give exactly
    their mean / the identity (with 1 the identity would be scaled by 1.2 for c = 0.5); the
    engine's norm rescaling (on by default) makes the choice immaterial.

    Weak Pareto stationarity (a fallback, documented in docs/methods.md): where some
    non-negative combination of the rows vanishes (0 in their convex hull), the maximiser is not
    unique (a whole piece of the ball can reach the best worst case 0) and :math:`g_w = 0`, so
    the paper's formula is undefined there and, next to such a J, arbitrarily sensitive. The
    rows are therefore augmented with :math:`\sqrt{\epsilon}` times the identity in S extra
    coordinates (Gramian :math:`G + \epsilon \bar G I`, :math:`\bar G` the mean squared row
    norm, ``reg`` = :math:`\epsilon` = 1e-10): the augmented rows are linearly independent, so
    the problem has one solution, which depends continuously on J; d is its part in the
    original coordinates, :math:`d = J^\top (\frac1S 1 + \eta)`, :math:`\eta \ge 0`. Away from
    stationarity this changes d by about :math:`\epsilon` relative.

    Solver: the maximiser lies on the sphere, and on its support T (the rows with
    :math:`g_i \cdot d` equal to the worst case :math:`\tau`) it solves
    :math:`G_{TT}\eta_T = \tau 1 - (G b)_T`, :math:`\eta^\top G \eta = \rho^2`: linear in
    :math:`\tau`, then a quadratic for :math:`\tau` (larger root). Every candidate so built is
    feasible (on the sphere), so the one of largest worst case :math:`\min_i g_i \cdot d` is the
    optimum as soon as the optimal support is among the candidates. Up to 8 streams every
    support is tried (one batched solve of the :math:`2^S - 1` systems: exact, no iterations);
    above, a primal log-barrier Newton method on the smooth perspective form
    :math:`\min_{w \in \Delta, t > 0} g_w \cdot g_0 + \frac{w^\top G w}{2t} + \frac{\rho^2 t}{2}`
    (48 steps, bordered KKT solves, a batched line search) proposes the supports
    (:math:`w_i > \theta \max w`, five thresholds), and its own point, moved onto the sphere, is
    a candidate too. No host synchronisation either way. The final :math:`w^\top J` is
    accumulated in float64 (``exact_combination``): near stationarity the weights are large and
    their combination cancels.

    Properties: permutation invariant, positively homogeneous; not non-conflicting in general
    (as c grows, the direction approaches MGDA's). c = 0 gives the mean. One stream: the
    identity (with the default ``rescale=2``). Stateless.

    Args:
        c: radius of the ball relative to :math:`\|g_0\|` (paper: 0.5 default, in [0, 1)).
        rescale: 0, 1 or 2 (see above).
        iters: barrier iterations (more than 8 streams).
        reg: the augmentation :math:`\epsilon` (> 0) that makes the solution unique.
    """

    name = "cagrad"
    uses_losses = False
    exact_combination = True

    def __init__(self, c: float = 0.5, rescale: int = 2, iters: int = 48, reg: float = 1e-10):
        super().__init__()
        if not c >= 0:
            raise ValueError(f"cagrad: c must be >= 0, got {c}")
        if rescale not in _RESCALES:
            raise ValueError(f"cagrad: rescale must be 0, 1 or 2, got {rescale!r}")
        if not reg > 0:
            raise ValueError(f"cagrad: reg must be > 0, got {reg!r}")
        if int(iters) < 1:
            raise ValueError(f"cagrad: iters must be >= 1, got {iters!r}")
        self.c = float(c)
        self.rescale = int(rescale)
        self.iters = int(iters)
        self.reg = float(reg)

    def _repr_options(self) -> dict:
        return {"c": self.c, "rescale": self.rescale, "reg": self.reg}

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        scale = gramian.diagonal().mean()
        eye = torch.eye(s, dtype=dt, device=dev)
        g = gramian / torch.where(scale > 0, scale, 1.0) + self.reg * eye
        b = torch.full((s,), 1.0 / s, dtype=dt, device=dev)
        h = g @ b
        r2 = (self.c * self.c) * (b @ h)
        if s <= SUPPORTS_MAX:
            masks, blocks, _ = all_supports(s, dt, dev)
            eta = _best_on_sphere(g, h, r2, masks, blocks, eye)
        else:
            x = _barrier(g, h, r2, b, self.c, self.iters)
            w, t = x[:s].clamp_min(0.0), x[s]
            top = w.amax()
            masks = torch.stack([w > f * top for f in (0.5, 1e-1, 1e-2, 1e-3, 1e-5)])
            blocks = masks.unsqueeze(-1) & masks.unsqueeze(-2)
            # the barrier's own point d - g_0 = J^T w / t, moved onto the sphere
            eta0 = w / t
            eta0 = eta0 * (r2 / (eta0 @ g @ eta0).clamp_min(1e-300)).sqrt()
            eta = _best_on_sphere(g, h, r2, masks.to(dt), blocks, eye, extra=eta0)
        divisor = {1: 1 + self.c**2, 2: 1 + self.c}.get(self.rescale, 1.0)
        out = (b + eta) / divisor
        # rho = 0 (c = 0, or every row zero): d = g_0, the plain mean
        ok = (r2 > 0) & (scale > 0) & torch.isfinite(out).all()
        return torch.where(ok, out, b / divisor)


def _best_on_sphere(
    g: Tensor,
    h: Tensor,
    r2: Tensor,
    masks: Tensor,
    blocks: Tensor,
    eye: Tensor,
    extra: Tensor | None = None,
) -> Tensor:
    """max_eta min_i (h + g eta)_i s.t. eta^T g eta = r2, among the candidates of the supports.

    ``g`` positive definite. Row k of ``masks`` (0/1 values; ``blocks`` the matching T x T
    masks) is a support T; its candidate solves g_TT eta_T = tau 1 - h_T (eta = 0 off T) with
    the larger tau that puts it on the sphere. ``extra``: one more point on the sphere. Every
    candidate is feasible, so the largest worst case wins.
    """
    rhs = torch.stack((masks, masks * h), -1)
    sol, _ = torch.linalg.solve_ex(torch.where(blocks, g, eye), rhs)
    a, c = sol[..., 0], sol[..., 1]
    big_a, big_b, big_c = a.sum(-1), c.sum(-1), c @ h
    disc = big_b * big_b - big_a * (big_c - r2)
    tau = (big_b + disc.clamp_min(0.0).sqrt()) / big_a
    eta = tau.unsqueeze(-1) * a - c
    valid = disc >= 0
    if extra is not None:
        eta = torch.cat((eta, extra.unsqueeze(0)))
        valid = torch.cat((valid, valid.new_ones(1)))
    worst = (h + eta @ g).amin(-1)
    worst = torch.where(valid & torch.isfinite(worst), worst, -torch.inf)
    return eta[worst.argmax()]


def _barrier(g: Tensor, h: Tensor, r2: Tensor, b: Tensor, c: float, iters: int) -> Tensor:
    """The dual in the perspective form, by the log-barrier method: (w, t) with t = ||g_w||/rho.

    With rho ||y|| = min_t ||y||^2 / (2t) + rho^2 t / 2 the dual min_w g_w . g_0 + rho ||g_w||
    becomes smooth and jointly convex in (w, t).
    """
    s = g.shape[0]
    dev, dt = g.device, g.dtype
    rr = r2.clamp_min(1e-300)

    def value(x: Tensor) -> Tensor:
        w, t = x[..., :s], x[..., s]
        return w @ h + ((w @ g) * w).sum(-1) / (2 * t) + 0.5 * rr * t

    def grad_hess(x: Tensor) -> tuple[Tensor, Tensor]:
        w, t = x[:s], x[s:]
        gw = g @ w
        q = w @ gw
        grad = torch.cat((h + gw / t, 0.5 * (rr - q / t.square())))
        hess = torch.empty(s + 1, s + 1, dtype=dt, device=dev)
        hess[:s, :s] = g / t
        hess[:s, s] = -gw / t.square()
        hess[s, :s] = hess[:s, s]
        hess[s, s] = q / t**3
        return grad, hess

    # Start: uniform w, and the t that is optimal for it (||g_0|| / rho = 1 / c).
    t0 = torch.full((1,), 1.0 / max(c, 1e-12), dtype=dt, device=dev)
    x0 = torch.cat((b, t0))
    a = torch.cat((torch.ones_like(b), torch.zeros_like(t0)))
    return barrier_newton(value, grad_hess, x0, a, iters)
