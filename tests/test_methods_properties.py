"""Aggregator properties on structured families of matrices (after torchjd's aggregator tests).

The families: random matrices of a chosen rank, scaled by 0 to 1e15; strongly stationary
matrices (a positive combination of the rows vanishes); strictly weakly stationary ones (a
non-negative, not a positive, combination vanishes); non weakly stationary ones (none does);
zero matrices. Each property is asserted for exactly the methods that docs/methods.md lists with
it (the table there is checked against ``CLAIMS``). Built once, from a fixed seed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from impartial_train.methods import build

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")

_GEN = torch.Generator().manual_seed(0)


def _orthonormal_complement(q: torch.Tensor) -> torch.Tensor:
    """A random m x (m - k) matrix with orthonormal columns orthogonal to q's (m x k)."""
    m, k = q.shape
    a = torch.randn(m, m - k, generator=_GEN, dtype=F64)
    return torch.linalg.qr(a - q @ (q.T @ a))[0]


def _orthonormal(n: int) -> torch.Tensor:
    return _orthonormal_complement(torch.zeros(n, 0, dtype=F64))


def _with_left(u: torch.Tensor, n: int, rank: int) -> torch.Tensor:
    """u's first ``rank`` columns as left singular vectors, random singular values and right
    singular vectors."""
    sigma = torch.randn(rank, generator=_GEN, dtype=F64).abs()
    return (u[:, :rank] * sigma) @ _orthonormal(n)[:rank]


def random_rank(m: int, n: int, rank: int) -> torch.Tensor:
    return _with_left(_orthonormal(m), n, rank)


def strongly_stationary(m: int, n: int, rank: int) -> torch.Tensor:
    """Rows orthogonal to a positive v: v^T J = 0 with v > 0."""
    v = torch.randn(m, generator=_GEN, dtype=F64).abs()
    return _with_left(_orthonormal_complement((v / v.norm()).unsqueeze(1)), n, rank)


def strictly_weakly_stationary(m: int, n: int, rank: int) -> torch.Tensor:
    """v^T J = 0 for a v >= 0 with zeros, and a non-negative left singular vector v' (disjoint
    support, positive singular value) rules out every positive combination."""
    u = torch.randn(m, generator=_GEN, dtype=F64).abs()
    split = int(torch.randint(1, m, (), generator=_GEN))
    order = torch.randperm(m, generator=_GEN)
    v, v2 = torch.zeros(m, dtype=F64), torch.zeros(m, dtype=F64)
    v[order[:split]] = u[order[:split]] / u[order[:split]].norm()
    v2[order[split:]] = u[order[split:]] / u[order[split:]].norm()
    basis = torch.stack([v, v2], 1)
    left = torch.cat((basis, _orthonormal_complement(basis)), 1)
    return _with_left(left[:, 1:], n, rank)


def non_weakly_stationary(m: int, n: int, rank: int) -> torch.Tensor:
    """A positive left singular vector with a positive singular value: no v >= 0, v != 0 has
    v^T J = 0."""
    u = torch.randn(m, generator=_GEN, dtype=F64).abs()
    u = (u / u.norm()).unsqueeze(1)
    return _with_left(torch.cat((u, _orthonormal_complement(u)), 1), n, rank)


_RANDOM_DIMS = [(1, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9)]
_STATIONARY_DIMS = [(12, 10, 10), (12, 10, 5), (12, 10, 1), (12, 40, 1), (12, 40, 11)]
SCALES = [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]

RANDOM = [random_rank(*d) for d in _RANDOM_DIMS]
ZERO = [torch.zeros(m, n, dtype=F64) for m, n in [(1, 1), (4, 3), (9, 11)]]
STRONG = [strongly_stationary(*d) for d in _STATIONARY_DIMS]
STRICTLY_WEAK = [strictly_weakly_stationary(*d) for d in _STATIONARY_DIMS]
NON_WEAK = [non_weakly_stationary(*d) for d in _STATIONARY_DIMS]
SCALED = [s * j for s in SCALES for j in RANDOM]
TYPICAL = ZERO + RANDOM + STRONG + STRICTLY_WEAK + NON_WEAK

# What each method claims (docs/methods.md's property column, checked below): P permutation
# invariant, H positively homogeneous, NC non-conflicting, LS linear under scaling, SS strongly
# stationary (A(J) = 0 only where a positive combination of the rows vanishes).
CLAIMS = {
    "sum": {"P", "H", "LS", "SS"},
    "mean": {"P", "H", "LS", "SS"},
    "pcgrad": {"H"},
    "graddrop": {"P", "H"},
    "gradvac": {"H"},
    "mgda": {"P", "H", "NC"},
    "imtl-g": {"P", "H"},
    "gradnorm": {"P", "H"},
    "nsgd": {"P", "H"},
    "cagrad": {"P", "H"},
    "nash-mtl": {"P", "H", "NC"},
    "aligned-mtl": {"P", "H"},
    "upgrad": {"P", "H", "NC", "LS", "SS"},
    "dualproj": {"P", "H", "NC", "SS"},
    "rlw": {"H"},
}
SEEDED = {"pcgrad", "graddrop", "gradvac", "rlw"}


def claiming(prop: str) -> list[str]:
    return [name for name, props in CLAIMS.items() if prop in props]


def aggregate(name: str, j: torch.Tensor, **kwargs) -> torch.Tensor:
    if name in SEEDED:
        kwargs.setdefault("seed", 0)
    return build(name, **kwargs)(j).gradient


def scale_of(j: torch.Tensor) -> float:
    return float(j.double().norm(dim=1).max())


def test_docs_property_table_matches_the_claims():
    text = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    for name, props in CLAIMS.items():
        row = re.search(rf"^\| `{re.escape(name)}` \|.*$", text, re.M)
        assert row, name
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        listed = {p.strip() for p in re.split(r"[,;]", cells[3])}
        claimed = {p.split(" ")[0] for p in listed}
        assert claimed == props, (name, listed)


@pytest.mark.parametrize("name", sorted(CLAIMS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_finite_on_every_family_and_scale(name, dtype):
    for j in TYPICAL + SCALED:
        out = aggregate(name, j.to(dtype))
        assert out.shape == j.shape[1:] and torch.isfinite(out).all(), (name, j.shape)


@pytest.mark.parametrize("name", claiming("P"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_permutation_invariant(name, dtype):
    """To 1e-6 of the largest row in float64 and 1e-4 relative in float32 (the input is the
    same float32 matrix, permuted: every difference is the method's own rounding)."""
    gen = torch.Generator().manual_seed(1)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    for j in TYPICAL + [1e-10 * j for j in RANDOM] + [1e15 * j for j in RANDOM]:
        j = j.to(dtype)
        ref = aggregate(name, j).double()
        for _ in range(2):
            perm = torch.randperm(j.shape[0], generator=gen)
            out = aggregate(name, j[perm]).double()
            assert (out - ref).norm() <= tol * scale_of(j), (name, j.shape, out, ref)


@pytest.mark.parametrize("name", claiming("H"))
def test_positively_homogeneous_over_scales(name):
    for j in RANDOM + STRONG + STRICTLY_WEAK:
        ref = aggregate(name, j)
        for s in (1e-10, 1e5, 1e15):
            out = aggregate(name, s * j)
            assert (out - s * ref).norm() <= 1e-6 * s * scale_of(j), (name, j.shape, s)


def conflict(j: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The most negative g_i . d relative to ||g_i|| times the largest row."""
    norms = j.norm(dim=1)
    return ((j @ d) / (norms.clamp_min(1e-300) * norms.max())).min()


@pytest.mark.parametrize("name", claiming("NC"))
def test_non_conflicting(name):
    """J A(J) >= 0: 1e-9 of the rows for the exact solvers; Nash-MTL up to its ridge's bound
    sqrt(S eps) (docs/methods.md)."""
    for j in TYPICAL:
        if j.shape[0] < 2 or not j.any():
            continue
        d = aggregate(name, j)
        if name == "nash-mtl":
            norms = j.norm(dim=1)
            rms = norms.square().mean().sqrt()
            bound = (j.shape[0] * 1e-8) ** 0.5 * norms * rms * (1 + 1e-6)
            assert (j @ d >= -bound).all(), j.shape
        else:
            assert conflict(j, d) >= -1e-9, (name, j.shape, conflict(j, d))


@pytest.mark.parametrize("c", [1.0, 2.0])
def test_cagrad_non_conflicting_from_c_one(c):
    """c >= 1: the ball around g_0 holds d = 0, whose worst case is 0, so the optimum conflicts
    with no row, up to the augmentation's share of the worst case, eps (1/S + eta_i) mean(G_ii),
    at most about sqrt(eps) = 1e-5 of the largest squared row."""
    for j in TYPICAL:
        if j.shape[0] >= 2 and j.any():
            d = aggregate("cagrad", j, c=c)
            assert (j @ d).min() >= -1e-5 * scale_of(j) ** 2, j.shape


@pytest.mark.parametrize("name", claiming("LS"))
def test_linear_under_scaling(name):
    """A(diag(a c1 + b c2) J) = a A(diag(c1) J) + b A(diag(c2) J) for positive c1, c2, a, b."""
    gen = torch.Generator().manual_seed(2)
    for j in TYPICAL:
        m = j.shape[0]
        for _ in range(3):
            c1, c2 = torch.rand(m, 2, generator=gen, dtype=F64).unbind(1)
            a, b = torch.rand(2, generator=gen, dtype=F64).unbind()
            x1 = aggregate(name, c1[:, None] * j)
            x2 = aggregate(name, c2[:, None] * j)
            x = aggregate(name, (a * c1 + b * c2)[:, None] * j)
            assert (x - (a * x1 + b * x2)).norm() <= 1e-7 * scale_of(j), (name, j.shape)


@pytest.mark.parametrize("name", claiming("SS"))
def test_strongly_stationary(name):
    """Where no positive combination of the rows vanishes, A(J) != 0."""
    for j in STRICTLY_WEAK + NON_WEAK:
        assert aggregate(name, j).norm() > 1e-3 * scale_of(j), (name, j.shape)


@pytest.mark.parametrize("name", ["cagrad", "nash-mtl"])
def test_continuous_next_to_stationary_rows(name):
    """The fallbacks at (weak) Pareto stationarity keep the output continuous: a 1e-12
    perturbation of a stationary or rank-deficient J moves it by at most 1e-6. (Zero rows are
    left out: Nash-MTL, like IMTL-G, is scale invariant per row, so a zero row that becomes a
    tiny one gets a full share in its new direction, by design.)"""
    gen = torch.Generator().manual_seed(3)
    for j in STRONG + STRICTLY_WEAK + RANDOM[1:3]:
        norms = j.norm(dim=1)
        if norms.min() <= 1e-8 * norms.max():
            continue
        ref = aggregate(name, j)
        noise = torch.randn(j.shape, generator=gen, dtype=F64)
        out = aggregate(name, j + 1e-12 * scale_of(j) * noise / noise.norm())
        assert (out - ref).norm() <= 1e-6 * scale_of(j), (name, j.shape)


@pytest.mark.parametrize(
    "family", [random_rank, strongly_stationary, strictly_weakly_stationary, non_weakly_stationary]
)
def test_cagrad_above_the_enumeration_limit_is_the_enumerated_optimum(family):
    """More than 8 streams: the barrier's supports and point give the same d as trying every
    support of the 10 or 11 streams."""
    from impartial_train.methods._solvers import all_supports
    from impartial_train.methods.cagrad import _best_on_sphere

    for dims in [(10, 12, 9), (11, 6, 4)]:
        j = family(*dims)
        agg = build("cagrad")
        g = j @ j.T
        s = g.shape[0]
        eye = torch.eye(s, dtype=F64)
        aug = g / g.diagonal().mean() + agg.reg * eye
        b = torch.full((s,), 1.0 / s, dtype=F64)
        h = aug @ b
        masks, blocks, _ = all_supports(s, F64, j.device)
        eta = _best_on_sphere(aug, h, agg.c**2 * (b @ h), masks, blocks, eye)
        ref = (b + eta) @ j / (1 + agg.c)
        assert (agg(j).gradient - ref).norm() <= 1e-9 * scale_of(j), (family.__name__, dims)
