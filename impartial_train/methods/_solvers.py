"""Small dense solvers for the S x S stream-space problems, in torch, without host sync.

Every routine runs a fixed number of iterations (no data-dependent Python branching, no
``.item()``), so it works unchanged on any device and never waits for the accelerator.
Inputs are float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "barrier_newton",
    "cosine_matrix",
    "interior_point",
    "lstsq_tikhonov",
    "nash_bargaining",
    "nonneg_qp",
    "project_dual_cone",
    "row_norms",
    "simplex_min_norm",
]


def row_norms(gramian: Tensor) -> Tensor:
    """Norms of the rows of J from its Gramian (diagonal clamped at 0 against rounding)."""
    return gramian.diagonal(dim1=-2, dim2=-1).clamp_min(0.0).sqrt()


def cosine_matrix(gramian: Tensor, norms: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine matrix U U^T of the unit rows, the row norms, and the mask of non-zero rows.

    A zero row gets the unit vector ``e_i`` (cosine 1 with itself, 0 with the others), so that the
    matrix stays a well-scaled Gramian; callers decide what a zero row means for their method.
    Working on cosines makes the solvers insensitive to per-row scales (1e-12 next to 1e12).
    """
    n = row_norms(gramian) if norms is None else norms
    nonzero = n > 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, n, 1.0), 0.0)
    cos = gramian * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    eye = torch.eye(gramian.shape[-1], dtype=gramian.dtype, device=gramian.device)
    keep = nonzero.unsqueeze(-1) & nonzero.unsqueeze(-2)
    cos = torch.where(keep, cos, eye).clamp(-1.0, 1.0)
    cos = torch.where(eye.bool(), torch.ones_like(cos), cos)
    return 0.5 * (cos + cos.transpose(-1, -2)), n, nonzero


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest t with v + t dv >= 0 (huge when no component decreases), per batch element."""
    return (v / (-dv).clamp_min(1e-300)).amin(dim=-1, keepdim=True)


_PRIMAL_REG = 1e-12

GradHess = Callable[[Tensor], tuple[Tensor, Tensor]]


def interior_point(
    grad_hess: GradHess, x0: Tensor, a: Tensor | None = None, iters: int = 30
) -> Tensor:
    """Primal-dual interior point (Mehrotra predictor-corrector) for a smooth convex objective.

    Minimises f(x) subject to x >= 0 and, when ``a`` is given, a^T x = 1 (batched over leading
    dimensions). ``grad_hess(x)`` returns the gradient and the Hessian of f. ``x0`` must be strictly
    positive (and satisfy the equality). A fixed number of iterations is run; the Newton systems
    are solved with ``lu_factor_ex``/``lu_solve``, so a singular system never raises, and a tiny
    primal regularisation of the Newton matrix (the residuals stay exact) keeps it invertible
    when the objective is flat along a direction (e.g. opposite rows).
    """
    x = x0
    z = torch.ones_like(x)
    y = torch.zeros_like(x[..., :1])
    tiny = torch.finfo(x.dtype).tiny
    n = x.shape[-1]
    if a is not None:
        # Bordered KKT matrix [[H, -a], [a^T, 0]] (no elimination through H^-1, which loses all
        # accuracy when the objective is flat along a direction that the equality removes).
        kkt = torch.zeros(*x.shape[:-1], n + 1, n + 1, dtype=x.dtype, device=x.device)
        kkt[..., :n, n] = -a
        kkt[..., n, :n] = a
    for _ in range(iters):
        g, hess = grad_hess(x)
        rd = g - z if a is None else g - z - a * y
        ratio = z / x
        mu = (x * z).mean(-1, keepdim=True)
        h = hess + torch.diag_embed(ratio + _PRIMAL_REG)
        rp = None
        if a is None:
            lu, piv, _ = torch.linalg.lu_factor_ex(h)
        else:
            kkt[..., :n, :n] = h
            lu, piv, _ = torch.linalg.lu_factor_ex(kkt)
            rp = (a * x).sum(-1, keepdim=True) - 1.0

        def solve(rhs: Tensor, lu=lu, piv=piv, rp=rp) -> tuple[Tensor, Tensor | None]:
            if rp is None:
                return torch.linalg.lu_solve(lu, piv, rhs.unsqueeze(-1)).squeeze(-1), None
            full = torch.cat((rhs, -rp), dim=-1).unsqueeze(-1)
            sol = torch.linalg.lu_solve(lu, piv, full).squeeze(-1)
            return sol[..., :n], sol[..., n:]

        # Predictor (affine) direction: complementarity target 0, i.e. rc = x z, rc / x = z.
        dx, _ = solve(-rd - z)
        dz = -z - ratio * dx
        t_aff = torch.minimum(_max_step(x, dx), _max_step(z, dz)).clamp(max=1.0)
        mu_aff = ((x + t_aff * dx) * (z + t_aff * dz)).mean(-1, keepdim=True)
        sigma = (mu_aff / mu).clamp(0.0, 1.0) ** 3
        # Corrector: rc = x z + dx_aff dz_aff - sigma mu.
        rc = x * z + dx * dz - sigma * mu
        dx, dy = solve(-rd - rc / x)
        dz = (-rc - z * dx) / x
        t = (0.99 * torch.minimum(_max_step(x, dx), _max_step(z, dz))).clamp(max=1.0)
        x = (x + t * dx).clamp_min(tiny)
        z = (z + t * dz).clamp_min(tiny)
        if dy is not None:
            y = y + t * dy
    return x


def nonneg_qp(q_mat: Tensor, q_vec: Tensor, a: Tensor | None = None, iters: int = 30) -> Tensor:
    """Solve min 1/2 x^T Q x + q^T x  s.t. x >= 0 (and a^T x = 1 when ``a`` is given), batched."""

    def grad_hess(x: Tensor) -> tuple[Tensor, Tensor]:
        return (q_mat @ x.unsqueeze(-1)).squeeze(-1) + q_vec, q_mat

    if a is None:
        x0 = torch.ones_like(q_vec)
    else:
        x0 = (1.0 / a.sum(-1, keepdim=True)).expand_as(a).clone()
    return interior_point(grad_hess, x0, a, iters)


def simplex_min_norm(cos: Tensor, norms: Tensor, iters: int = 30) -> Tensor:
    """Weights w on the simplex minimising ||sum_i w_i g_i|| (the min-norm point of the hull).

    Works on the unit rows: with w_i proportional to x_i / n_i, the problem is
    min x^T C x s.t. sum_i (n_min / n_i) x_i = 1, x >= 0, where C is the cosine matrix; this keeps
    the problem well scaled whatever the row norms. All norms must be positive.
    """
    a = norms.amin(-1, keepdim=True) / norms
    x = nonneg_qp(cos, torch.zeros_like(norms), a, iters)
    w = (a * x).clamp_min(0.0)
    return w / w.sum(-1, keepdim=True)


def project_dual_cone(
    cos: Tensor, norms: Tensor, nonzero: Tensor, lower: Tensor, reg: float, iters: int = 30
) -> Tensor:
    """Weights v = argmin_{v >= lower} v^T G v (+ reg * sum_i n_i^2 v_i^2), batched over ``lower``.

    J^T v is then the projection of J^T lower onto the dual cone {x : J x >= 0} (Quinton & Rey
    2024, Prop. 1). Solved on unit rows: beta = n * v, x = beta - n * lower >= 0, and the shift
    is normalised to unit max-norm (the solution is positively homogeneous in it). Zero rows
    keep their lower bound.
    """
    shift = norms * lower
    scale = shift.abs().amax(-1, keepdim=True)  # 0: the solution is v = lower exactly
    s = shift / torch.where(scale > 0, scale, 1.0)
    eye = torch.eye(cos.shape[-1], dtype=cos.dtype, device=cos.device)
    q_mat = cos + reg * eye
    q_vec = (q_mat @ s.unsqueeze(-1)).squeeze(-1)
    x = nonneg_qp(q_mat.expand(*s.shape[:-1], *q_mat.shape[-2:]), q_vec, None, iters)
    beta = (x.clamp_min(0.0) + s) * scale
    safe = torch.where(nonzero, norms, 1.0)
    return torch.where(nonzero, beta / safe, lower)


def lstsq_tikhonov(k: Tensor, rhs: Tensor, rel_eps: float = 1e-8, steps: int = 6) -> Tensor:
    """Minimum-norm least-squares solution of k x = rhs (batched), without SVD or host sync.

    Iterated Tikhonov: x_{t+1} = x_t + (k^T k + eps I)^{-1} k^T (rhs - k x_t), from x_0 = 0, with
    eps = rel_eps * trace(k^T k) / n. Components along singular values sigma with
    sigma^2 >> eps converge geometrically (factor eps / (sigma^2 + eps) per step); those with
    sigma^2 << eps stay near 0, as a pseudo-inverse with a relative cut-off ~ sqrt(rel_eps).
    """
    kt = k.transpose(-1, -2)
    normal = kt @ k
    n = normal.shape[-1]
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    scale = normal.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(k.dtype).tiny)
    reg = normal + (rel_eps * scale)[..., None, None] * eye
    lu, piv, _ = torch.linalg.lu_factor_ex(reg)
    x = torch.zeros_like(rhs)
    for _ in range(steps):
        res = rhs - (k @ x.unsqueeze(-1)).squeeze(-1)
        x = x + torch.linalg.lu_solve(lu, piv, (kt @ res.unsqueeze(-1))).squeeze(-1)
    return x


def nash_bargaining(a_mat: Tensor, iters: int = 40) -> Tensor:
    """The positive solution of A b = 1 / b for a positive definite A (batched).

    It minimises phi(b) = 1/2 b^T A b - sum(log b), a self-concordant function: Newton steps
    damped by 1 / (1 + lambda) (lambda the Newton decrement) stay inside b > 0 and converge from
    any start; once lambda < 1/4 the full step is taken (quadratic convergence). Start: the
    minimiser of phi along the ray through 1, c = sqrt(S / 1^T A 1).
    """
    s = a_mat.shape[-1]
    ones = torch.ones(a_mat.shape[:-1], dtype=a_mat.dtype, device=a_mat.device)
    quad = (ones.unsqueeze(-2) @ a_mat @ ones.unsqueeze(-1)).squeeze(-1)
    b = ones * (s / quad.clamp_min(torch.finfo(a_mat.dtype).tiny)).sqrt()
    eye = torch.eye(s, dtype=a_mat.dtype, device=a_mat.device)
    for _ in range(iters):
        grad = (a_mat @ b.unsqueeze(-1)).squeeze(-1) - 1.0 / b
        hess = a_mat + eye * (1.0 / (b * b)).unsqueeze(-1)
        step, _ = torch.linalg.solve_ex(hess, -grad.unsqueeze(-1))
        step = step.squeeze(-1)
        dec = (-(grad * step).sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
        t = torch.where(dec > 0.25, 1.0 / (1.0 + dec), 1.0)
        new = b + t * step
        b = torch.where(
            torch.isfinite(new).all(-1, keepdim=True) & (new > 0).all(-1, keepdim=True), new, b
        )
    return b


def barrier_newton(
    value: Callable[[Tensor], Tensor],
    grad_hess: GradHess,
    x0: Tensor,
    a: Tensor,
    iters: int = 48,
    mu_start: float = 1.0,
    mu_end: float = 1e-14,
    steps: int = 24,
) -> Tensor:
    """Primal log-barrier Newton method with a batched backtracking line search (one problem).

    Minimises f(x) s.t. x >= 0, a^T x = 1, for a smooth convex f that is not quadratic (where a
    primal-dual method without a merit function can oscillate). At iteration k it takes one
    equality-constrained Newton step on phi_k(x) = f(x) - mu_k sum(log x), with mu_k decreasing
    geometrically from ``mu_start`` to ``mu_end``; the step length is the best of
    {0, 1, 1/2, ..., 2^-(steps-1)} for phi_k among feasible points, all evaluated at once
    (``value`` takes a batch of points), so phi_k never increases and nothing is read back to
    the host. Final suboptimality is about n * mu_end.
    """
    n = x0.shape[-1]
    x = x0
    cands = torch.cat(
        (
            torch.zeros(1, dtype=x0.dtype, device=x0.device),
            0.5 ** torch.arange(steps, dtype=x0.dtype, device=x0.device),
        )
    )
    ratio = (mu_end / mu_start) ** (1.0 / max(iters - 1, 1))
    eye = torch.eye(n, dtype=x0.dtype, device=x0.device)
    kkt = torch.zeros(n + 1, n + 1, dtype=x0.dtype, device=x0.device)
    kkt[:n, n] = a
    kkt[n, :n] = a
    for k in range(iters):
        mu = mu_start * ratio**k
        g, hess = grad_hess(x)
        g = g - mu / x
        # The bordered KKT system [[H, a], [a^T, 0]]: eliminating through H^-1 instead loses
        # all accuracy when f is flat along a direction that the equality removes.
        kkt[:n, :n] = hess + eye * (mu / (x * x) + _PRIMAL_REG)
        rhs = torch.cat((-g, torch.zeros_like(g[:1])))
        sol, _ = torch.linalg.solve_ex(kkt, rhs)
        dx = torch.nan_to_num(sol[:n], nan=0.0, posinf=0.0, neginf=0.0)
        pts = x + cands.unsqueeze(1) * dx
        feasible = (pts > 0).all(1)
        logs = torch.where(pts > 0, pts, 1.0).log().sum(1)
        phi = torch.where(feasible, value(pts) - mu * logs, torch.inf)
        phi = torch.where(torch.isnan(phi), torch.inf, phi)
        x = pts.index_select(0, phi.argmin().reshape(1)).squeeze(0)
    return x
