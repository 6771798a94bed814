"""Each aggregator against an independent, straightforward computation of its paper's formula.

The stream gradients come from torch.autograd on a small model with 2-4 losses meeting at a
shared activation (the branch point); the references work on the rows themselves (D-space),
with plain loops, closed forms, grids or brute-force enumeration, never through the Gramian
solvers of the package.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from impartial_train.methods import build

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def model_jacobian(num_losses: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: d L_i / d h for a shared activation h (batch 5 x 4 features, D = 20)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=gen, dtype=F64)
    trunk = nn.Linear(3, 4).to(F64)
    heads = [nn.Linear(4, 2).to(F64) for _ in range(num_losses)]
    with torch.no_grad():
        for p in [*trunk.parameters(), *(q for h in heads for q in h.parameters())]:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    h = torch.tanh(trunk(x))
    targets = torch.randn(num_losses, 5, 2, generator=gen, dtype=F64)
    kinds = [
        lambda o, t: ((o - t) ** 2).mean(),
        lambda o, t: 30.0 * (o - t).abs().mean(),
        lambda o, t: 0.01 * nn.functional.softplus(o * t).sum(),
        lambda o, t: -nn.functional.logsigmoid(o.sum(1) - t.sum(1)).mean(),
    ]
    losses = [kinds[i % 4](heads[i](h), targets[i]) for i in range(num_losses)]
    rows = [torch.autograd.grad(loss, h, retain_graph=True)[0].flatten() for loss in losses]
    j = torch.stack(rows)
    total = torch.autograd.grad(sum(losses), h)[0].flatten()
    torch.testing.assert_close(j.sum(0), total)  # the rows are the streams of the sum
    return j, torch.stack([loss.detach() for loss in losses])


CASES = [(s, seed) for s in (2, 3, 4) for seed in (0, 1)]


def case_ids(cases):
    return [f"S{s}-seed{seed}" for s, seed in cases]


def units(j):
    return j / j.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------------- PCGrad


def ref_pcgrad_rows(j, orders):
    rows = []
    for i in range(j.shape[0]):
        g = j[i].clone()
        for k in orders[i]:
            dot = g @ j[k]
            if dot < 0:
                g = g - dot / (j[k] @ j[k]) * j[k]
        rows.append(g)
    return torch.stack(rows)


@pytest.mark.parametrize(("s", "seed"), CASES, ids=case_ids(CASES))
def test_pcgrad_fixed_order(s, seed):
    j, _ = model_jacobian(s, seed)
    orders = [[k for k in range(s) if k != i] for i in range(s)]
    ref = ref_pcgrad_rows(j, orders)
    out = build("pcgrad", shuffle=False)(j)
    torch.testing.assert_close(out.gradient, ref.sum(0))
    if s == 2:  # the defining property: no conflict left after projection
        assert ref[0] @ j[1] >= -1e-12 and ref[1] @ j[0] >= -1e-12


def test_pcgrad_random_order_is_one_of_the_orders():
    j, _ = model_jacobian(3, 2)
    j = j * torch.tensor([[1.0], [-1.0], [1.0]], dtype=F64)  # make them conflict
    candidates = []
    for perms in itertools.product(
        *[list(itertools.permutations([k for k in range(3) if k != i])) for i in range(3)]
    ):
        candidates.append(ref_pcgrad_rows(j, perms).sum(0))
    cand = torch.stack(candidates)
    seen = set()
    agg = build("pcgrad", seed=0)
    for _ in range(40):
        g = agg(j).gradient
        dist = (cand - g).norm(dim=1)
        assert dist.min() < 1e-10
        seen.add(int(dist.argmin()))
    assert len({tuple(c.tolist()) for c in cand}) > 1 and len(seen) > 1


# -------------------------------------------------------------------------------- GradVac


def ref_gradvac(j, targets, beta, orders):
    """One step of Algorithm 2 (Wang et al. 2021) with explicit vectors; updates targets."""
    new = []
    for i in range(j.shape[0]):
        g = j[i].clone()
        for k in orders[i]:
            phi = (g @ j[k]) / (g.norm() * j[k].norm())
            tgt = targets[i, k]
            if phi < tgt:
                coef = g.norm() * (tgt * (1 - phi**2).sqrt() - phi * (1 - tgt**2).sqrt())
                g = g + coef / (j[k].norm() * (1 - tgt**2).sqrt()) * j[k]
            targets[i, k] = (1 - beta) * tgt + beta * phi
        new.append(g)
    return torch.stack(new).sum(0)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_gradvac_matches_reference_over_steps(s):
    agg = build("gradvac", beta=0.4, shuffle=False)
    targets = torch.zeros(s, s, dtype=F64)
    orders = [[k for k in range(s) if k != i] for i in range(s)]
    for step in range(4):
        j, _ = model_jacobian(s, 10 + step)
        ref = ref_gradvac(j, targets, 0.4, orders)
        out = agg(j)
        torch.testing.assert_close(out.gradient, ref)
        torch.testing.assert_close(agg.targets.to(F64), targets, rtol=1e-6, atol=1e-7)
    assert targets.abs().sum() > 0


# --------------------------------------------------------------------------------- IMTL-G


def ref_imtlg(j):
    """The paper's closed form (as in LibMTL): alpha_{2:S} = g_1 U^T (D U^T)^-1."""
    u = units(j)
    d = j[:1] - j[1:]
    uu = u[:1] - u[1:]
    alpha = j[0] @ uu.T @ torch.linalg.inv(d @ uu.T)
    alpha = torch.cat((1 - alpha.sum().reshape(1), alpha))
    return alpha @ j, alpha


@pytest.mark.parametrize(("s", "seed"), CASES, ids=case_ids(CASES))
def test_imtlg_closed_form(s, seed):
    j, _ = model_jacobian(s, seed)
    ref, alpha = ref_imtlg(j)
    out = build("imtl-g")(j)
    torch.testing.assert_close(out.gradient, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.weights, alpha, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (1e-6, 1.0, 1e6), (1e-12, 1e3, 1.0)])
def test_imtlg_equal_projections_on_unit_directions(scales):
    j, _ = model_jacobian(3, 4)
    j = j * torch.tensor(scales, dtype=F64)[:, None]
    d = build("imtl-g")(j).gradient
    proj = units(j) @ d
    assert (proj - proj[0]).abs().max() <= 1e-8 * proj.abs().max()
    assert abs(float(proj[0])) > 0


def test_imtlg_degenerate_systems():
    j, _ = model_jacobian(2, 5)
    # colinear rows: any d along them has equal projections; duplicates share the weight
    dup = build("imtl-g")(torch.stack([j[0], j[0]]))
    torch.testing.assert_close(dup.weights, torch.tensor([0.5, 0.5], dtype=F64))
    torch.testing.assert_close(dup.gradient, j[0])
    col = build("imtl-g")(torch.stack([j[0], 5 * j[0], j[1]]))
    p = units(torch.stack([j[0], j[1]])) @ col.gradient
    assert abs(float(p[0] - p[1])) <= 1e-8 * float(p.abs().max())
    # opposite rows: the only equal projection is 0
    opp = build("imtl-g")(torch.stack([j[0], -2 * j[0]]))
    assert opp.gradient.norm() <= 1e-9 * j[0].norm()


# ----------------------------------------------------------------------------------- MGDA


def simplex_grid(s, n):
    if s == 2:
        t = torch.linspace(0, 1, n + 1, dtype=F64)
        return torch.stack([t, 1 - t], 1)
    pts = [(a, b, n - a - b) for a in range(n + 1) for b in range(n + 1 - a)]
    return torch.tensor(pts, dtype=F64) / n


def min_norm_two(v1, v2):
    """Exact min-norm point of the segment [v1, v2] (Sener & Koltun, Algorithm 1 line search)."""
    gamma = ((v2 - v1) @ v2) / ((v1 - v2) @ (v1 - v2))
    gamma = gamma.clamp(0, 1)
    return torch.stack([gamma, 1 - gamma])


@pytest.mark.parametrize(("s", "seed"), [c for c in CASES if c[0] <= 3], ids=case_ids(CASES[:4]))
def test_mgda_is_the_min_norm_point(s, seed):
    j, _ = model_jacobian(s, seed)
    out = build("mgda")(j)
    d = out.gradient
    grid = simplex_grid(s, 4000 if s == 2 else 300)
    best = (grid @ j).norm(dim=1).min()
    assert d.norm() <= best + 1e-12
    assert d.norm() >= best - 2e-3 * j.norm(dim=1).max()  # grid resolution
    # KKT of min ||J^T w|| on the simplex: g_i . d >= ||d||^2, equality on the support
    kkt = j @ d - d @ d
    scale = j.norm(dim=1).max() ** 2
    assert (kkt >= -1e-10 * scale).all()
    assert (kkt[out.weights > 1e-6].abs() <= 1e-8 * scale).all()
    assert (out.weights >= 0).all() and abs(float(out.weights.sum()) - 1) < 1e-10


def assert_min_norm_kkt(j: torch.Tensor, out, tol: float = 1e-9) -> None:
    """KKT of min ||J^T w|| on the simplex (a certificate of optimality for this convex QP):
    g_i . d >= ||d||^2 for every row, with equality on the support of w."""
    d = out.gradient
    kkt = j @ d - d @ d
    scale = j.norm(dim=1).max() ** 2
    assert (kkt >= -tol * scale).all(), float(kkt.min() / scale)
    support = out.weights > 1e-6 * out.weights.max()
    assert (kkt[support].abs() <= 10 * tol * scale).all(), float(kkt[support].abs().max() / scale)
    assert (out.weights >= 0).all() and abs(float(out.weights.sum()) - 1) < 1e-10


def many_streams(s: int, seed: int, kind: str) -> torch.Tensor:
    j, _ = model_jacobian(s, seed)
    if kind == "duplicates":
        j[1] = j[0]
        j[2] = j[0]
    elif kind == "near_colinear":
        j = j + 5.0 * j.mean(0)
    elif kind == "opposite":
        j[1] = -0.5 * j[0]
    elif kind == "wide_norms":
        j[: s // 2] *= 1e4
    return j


@pytest.mark.parametrize(
    "kind", ["random", "duplicates", "near_colinear", "opposite", "wide_norms"]
)
@pytest.mark.parametrize("s", [5, 8, 9, 12, 16])
def test_mgda_min_norm_kkt_many_streams(s, kind):
    """Both solvers (every support up to 8 streams, interior point + crossover above) reach
    the min-norm point to within 1e-9 of the squared row scale, degenerate cases included."""
    for seed in (0, 1):
        j = many_streams(s, seed, kind)
        out = build("mgda")(j)
        assert_min_norm_kkt(j, out)
        if kind == "opposite":  # 0 is in the hull
            assert out.gradient.norm() <= 1e-6 * j.norm(dim=1).max()


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mgda_normalisations_two_streams(normalization, seed):
    j, losses = model_jacobian(2, seed)
    norms = j.norm(dim=1)
    nu = {
        "none": torch.ones(2, dtype=F64),
        "l2": norms,
        "loss": losses.abs(),
        "loss+": losses.abs() * norms,
    }[normalization]
    scaled = j / nu[:, None]
    w = min_norm_two(scaled[0], scaled[1])
    out = build("mgda", normalization=normalization)(j, losses=losses)
    torch.testing.assert_close(out.weights, w, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(out.gradient, w @ j, rtol=1e-8, atol=1e-12)


def test_mgda_zero_in_hull_and_zero_row():
    j, _ = model_jacobian(3, 3)
    opp = torch.stack([j[0], j[1], -j[0]])
    assert build("mgda")(opp).gradient.norm() <= 1e-9 * j.norm()
    zero = torch.stack([j[0], torch.zeros_like(j[0])])
    out = build("mgda")(zero)
    torch.testing.assert_close(out.weights, torch.tensor([0.0, 1.0], dtype=F64))


# --------------------------------------------------------------------------------- CAGrad


def cagrad_dual(w, g, c):
    """F(w) = g_w . g_0 + c ||g_0|| ||g_w|| for a batch of simplex points w."""
    s = g.shape[0]
    b = torch.full((s,), 1.0 / s, dtype=F64)
    r = c * (b @ g @ b).sqrt()
    return w @ g @ b + r * ((w @ g) * w).sum(-1).clamp_min(0).sqrt()


def ref_cagrad_two(j, c):
    """Two streams: the dual is convex on a segment; ternary search, then the paper's d."""
    g = j @ j.T
    lo, hi = 0.0, 1.0
    for _ in range(200):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        f1 = cagrad_dual(torch.tensor([[m1, 1 - m1]], dtype=F64), g, c)
        f2 = cagrad_dual(torch.tensor([[m2, 1 - m2]], dtype=F64), g, c)
        lo, hi = (m1, hi) if f1 > f2 else (lo, m2)
    w = torch.tensor([lo, 1 - lo], dtype=F64)
    g0 = j.mean(0)
    gw = w @ j
    return g0 + c * g0.norm() / gw.norm() * gw


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cagrad_two_streams(c, seed):
    j, _ = model_jacobian(2, seed)
    ref = ref_cagrad_two(j, c)
    out = build("cagrad", c=c, rescale=0)(j)
    torch.testing.assert_close(out.gradient, ref, rtol=1e-6, atol=1e-9 * float(j.norm()))
    torch.testing.assert_close(
        build("cagrad", c=c, rescale=1)(j).gradient, ref / (1 + c**2), rtol=1e-6, atol=1e-9
    )
    torch.testing.assert_close(
        build("cagrad", c=c)(j).gradient, ref / (1 + c), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["model", "opposite"])
def test_cagrad_three_streams_primal_dual(seed, kind):
    j, _ = model_jacobian(3, seed)
    if kind == "opposite":
        j[2] = -j[0]
    c = 0.5
    g = j @ j.T
    grid_min = cagrad_dual(simplex_grid(3, 300), g, c).min()
    d = build("cagrad", c=c, rescale=0)(j).gradient
    g0 = j.mean(0)
    scale = float(j.norm(dim=1).max()) ** 2
    # feasible for the primal: inside the ball around g_0
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-8)
    # optimal: its worst improvement reaches the dual optimum (strong duality) up to the grid
    worst = (j @ d).min()
    assert worst <= grid_min + 1e-9 * scale
    assert worst >= grid_min - 1e-3 * scale


def test_cagrad_limits():
    j, _ = model_jacobian(3, 6)
    torch.testing.assert_close(build("cagrad", c=0.0)(j).gradient, j.mean(0))
    same = torch.stack([j[0], j[0], j[0]])
    torch.testing.assert_close(build("cagrad")(same).gradient, j[0])


# ------------------------------------------------------------------------------- Nash-MTL


def ref_nash(g):
    """Solve G a = 1/a by L-BFGS on phi(u) = 1/2 e^u.G.e^u - sum(u), a = e^u (another method)."""
    u = torch.zeros(g.shape[0], dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [u],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        a = u.exp()
        loss = 0.5 * a @ g @ a - u.sum()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return u.detach().exp()


@pytest.mark.parametrize(("s", "seed"), CASES, ids=case_ids(CASES))
def test_nash_mtl_bargaining_solution(s, seed):
    j, _ = model_jacobian(s, seed)
    g = j @ j.T
    alpha = ref_nash(g)
    assert ((g @ alpha) * alpha - 1).abs().max() < 1e-6  # the reference solved it
    out = build("nash-mtl", rescale=False, eps=1e-12)(j)
    torch.testing.assert_close(out.weights, alpha, rtol=1e-6, atol=0)
    # the defining equations, and the default scaling by the RMS row norm
    assert ((g @ out.weights) * out.weights - 1).abs().max() < 1e-8
    rms = j.norm(dim=1).square().mean().sqrt()
    torch.testing.assert_close(build("nash-mtl")(j).weights, alpha * rms, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- Aligned-MTL


def ref_aligned(j):
    """Through the SVD of J itself: sigma_min 1^T U V^T over the numerical rank."""
    u, sig, vh = torch.linalg.svd(j, full_matrices=False)
    keep = sig**2 > j.shape[0] * sig.max() ** 2 * torch.finfo(torch.float32).eps
    u, sig, vh = u[:, keep], sig[keep], vh[keep]
    return sig.min() * u.sum(0) @ vh


@pytest.mark.parametrize(("s", "seed"), CASES, ids=case_ids(CASES))
def test_aligned_mtl_svd(s, seed):
    j, _ = model_jacobian(s, seed)
    out = build("aligned-mtl")(j)
    torch.testing.assert_close(out.gradient, ref_aligned(j), rtol=1e-8, atol=1e-12)
    # rank-deficient: a duplicated row is one principal component
    dup = torch.cat((j, j[:1]))
    torch.testing.assert_close(build("aligned-mtl")(dup).gradient, ref_aligned(dup))


# ------------------------------------------------------------------------- UPGrad, DualProj


def ref_project_dual_cone(j, g):
    """Projection of g onto {x : J x >= 0} by enumerating the active sets (brute force)."""
    s = j.shape[0]
    unit = units(j)
    best, best_dist = None, None
    for r in range(s + 1):
        for active in itertools.combinations(range(s), r):
            x = g.clone()
            if active:
                a = unit[list(active)]
                x = g - a.T @ (torch.linalg.pinv(a @ a.T) @ (a @ g))
            if (unit @ x >= -1e-10 * g.norm()).all():
                dist = (x - g).norm()
                if best is None or dist < best_dist:
                    best, best_dist = x, dist
    return best


def degenerate_variants(j):
    yield "model", j
    yield "opposite", torch.cat((j, -j[:1]))
    yield "scaled", j * torch.logspace(-6, 6, j.shape[0], dtype=F64)[:, None]
    yield "wide", j[:, :2].contiguous()


@pytest.mark.parametrize(("s", "seed"), CASES, ids=case_ids(CASES))
def test_upgrad_and_dualproj_brute_force(s, seed):
    j0, _ = model_jacobian(s, seed)
    for kind, j in degenerate_variants(j0):
        scale = j.norm(dim=1).max()
        up = build("upgrad")(j).gradient
        ref = torch.stack([ref_project_dual_cone(j, g) for g in j]).mean(0)
        assert (up - ref).norm() <= 1e-7 * scale, kind
        dp = build("dualproj")(j).gradient
        assert (dp - ref_project_dual_cone(j, j.mean(0))).norm() <= 1e-7 * scale, kind
        # no conflict with any row
        for d in (up, dp):
            assert (units(j) @ d >= -1e-8 * scale).all(), kind


# ------------------------------------------------------------------------------- GradNorm


@pytest.mark.parametrize("scale_invariant", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_gradnorm_weight_gradient_matches_autograd(scale_invariant, alpha):
    j, losses = model_jacobian(3, 7)
    agg = build("gradnorm", alpha=alpha, scale_invariant=scale_invariant, num_streams=3)
    agg(j, losses=losses)  # records L(0)
    with torch.no_grad():
        agg.weight.copy_(torch.tensor([0.5, 1.7, 0.8]))
    agg.weight.grad = None
    later = losses * torch.tensor([0.5, 0.9, 0.2], dtype=F64)
    out = agg(j, losses=later)
    # the GradNorm loss, differentiated by autograd on the rows themselves
    w = torch.tensor([0.5, 1.7, 0.8], dtype=F64, requires_grad=True)
    norms = (w[:, None] * j).norm(dim=1)
    mean = norms.mean().detach()
    ratio = later / losses
    r = ratio / ratio.mean()
    loss = (norms - mean * r**alpha).abs().sum()
    if scale_invariant:
        loss = loss / mean
    loss.backward()
    torch.testing.assert_close(agg.weight.grad.to(F64), w.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.gradient, w.detach() @ j, rtol=1e-6, atol=1e-9)


def test_gradnorm_training_equalises_weighted_norms():
    j, _ = model_jacobian(3, 8)
    j = j * torch.tensor([[0.1], [1.0], [10.0]], dtype=F64)
    norms = j.norm(dim=1)
    assert norms.max() / norms.min() > 100
    agg = build("gradnorm", num_streams=3)
    opt = torch.optim.Adam(agg.parameters(), lr=0.02)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.99)
    for _ in range(400):
        opt.zero_grad()
        out = agg(j)
        opt.step()
        sched.step()
    weighted = out.weights * norms  # no losses: the equal-norm variant
    assert weighted.max() / weighted.min() < 1.1
    assert abs(float(out.weights.sum()) - 3) < 1e-6


# ----------------------------------------------------------------------------------- NSGD


def test_nsgd_matches_reference_code():
    agg = build("nsgd", update_at=2)
    initial = torch.ones(3, dtype=F64)
    for step in range(5):
        j, _ = model_jacobian(3, 20 + step)
        norms = j.norm(dim=1)
        if step == 2:
            initial = norms.clone()
        ratio = norms / initial
        alpha = ratio / ratio.sum()
        common = (alpha * norms).sum()
        ref = (common / norms) @ j
        out = agg(j)
        torch.testing.assert_close(out.gradient, ref)
        # every row enters with the same norm
        torch.testing.assert_close((out.weights[:, None] * j).norm(dim=1), common.expand(3))


# ------------------------------------------------------------------------------------ RLW


def test_rlw_random_softmax_weights():
    j, _ = model_jacobian(4, 9)
    agg = build("rlw", seed=3)
    ws = torch.stack([agg(j).weights for _ in range(2000)])
    assert (ws > 0).all()
    torch.testing.assert_close(ws.sum(1), torch.ones(2000, dtype=F64))
    assert (ws.mean(0) - 0.25).abs().max() < 0.02
    assert ws.std(0).min() > 0.05
    # softmax of N(0, 1): the log-weight differences are normal with variance 2
    logs = ws.log()
    diff = logs[:, 0] - logs[:, 1]
    assert abs(float(diff.var()) - 2.0) < 0.25


# ------------------------------------------------------------------------------- GradDrop


def test_graddrop_keeps_agreeing_signs_and_picks_one_sign():
    j, _ = model_jacobian(3, 11)
    out = build("graddrop", seed=0)(j).gradient
    pos = j.clamp_min(0).sum(0)
    neg = j.clamp_max(0).sum(0)
    agree = (j >= 0).all(0) | (j <= 0).all(0)
    torch.testing.assert_close(out[agree], j.sum(0)[agree])
    picked = torch.isclose(out, pos) | torch.isclose(out, neg)
    assert picked.all()
    assert (~agree).any()


@pytest.mark.parametrize("activation", [None, "positive", "negative", "flat"])
def test_graddrop_sign_purity_probability(activation):
    d = 6000
    j = torch.tensor([[3.0], [-1.0]], dtype=F64).expand(2, d).contiguous()
    act = {
        None: None,
        "positive": torch.ones(d),
        "negative": -torch.ones(d),
        "flat": torch.rand(d) - 0.5,  # flattened to (D,): element-wise signs
    }[activation]
    out = build("graddrop", seed=1)(j, activation=act).gradient
    kept_positive = (out == 3.0).float().mean()
    assert ((out == 3.0) | (out == -1.0)).all()
    # P = (1 + (3 - 1) / (3 + 1)) / 2 = 0.75 whatever the activation sign (distributionally)
    assert abs(float(kept_positive) - 0.75) < 0.03


def test_graddrop_batch_separated_masks():
    batch, feats = 4, 3000
    j = torch.stack([torch.ones(batch * feats), -2 * torch.ones(batch * feats)]).to(F64)
    act = torch.ones(batch, feats)
    act[0] = -1.0  # one sample's sign flipped: G_i = sum_b sign(A) grad = (batch - 2) * grad
    out = build("graddrop", seed=2)(j, activation=act).gradient.reshape(batch, feats)
    # one decision per feature, shared by the whole batch
    assert (out == out[:1]).all()
    assert ((out[0] == 1.0) | (out[0] == -2.0)).all()
    # P = (1 + (2 - 4) / (2 + 4)) / 2 = 1/3
    assert abs(float((out[0] == 1.0).float().mean()) - 1 / 3) < 0.03
    with pytest.raises(ValueError):
        build("graddrop")(j, activation=torch.ones(5))


def test_graddrop_leak():
    j, _ = model_jacobian(3, 12)
    torch.testing.assert_close(build("graddrop", leak=1.0)(j).gradient, j.sum(0))
    half = build("graddrop", leak=[0.0, 1.0, 0.0], seed=0)(j).gradient
    none = build("graddrop", leak=0.0, seed=0)(j).gradient
    # same draws: the fully leaked row 1 comes back exactly where it had been dropped
    diff = half - none
    assert (torch.isclose(diff, torch.zeros_like(diff)) | torch.isclose(diff, j[1])).all()
    assert not torch.allclose(diff, torch.zeros_like(diff))
    with pytest.raises(ValueError):
        build("graddrop", leak=1.5)


def test_graddrop_one_stream_with_activation_is_identity():
    # the sign-corrected gradient can vanish while the gradient does not: a zero activation
    # (sign 0), or a batch sum that cancels; such elements carry no sign and are kept
    j = torch.tensor([[1.0, -2.0, 3.0, 0.5, -1.0, 1.0]], dtype=F64)
    flat = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0, -3.0])
    torch.testing.assert_close(build("graddrop", seed=0)(j, activation=flat).gradient, j[0])
    batched = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0]])
    # sign-corrected batch sums per feature: (1 - 1, -2 + 2, 3 + 1) = (0, 0, 4)
    j2 = torch.tensor([[1.0, -2.0, 3.0, -1.0, -2.0, 1.0]], dtype=F64)
    for seed in range(5):
        out = build("graddrop", seed=seed)(j2, activation=batched).gradient
        torch.testing.assert_close(out, j2[0])
