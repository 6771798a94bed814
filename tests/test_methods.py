"""Contract, properties and robustness of the aggregators (impartial_train.methods).

Reference computations of each paper's formula live in test_methods_reference.py.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from impartial_train.methods import (
    Aggregation,
    Aggregator,
    Compose,
    GramianAggregator,
    available,
    build,
)

F64 = torch.float64

ALL = [
    "sum",
    "mean",
    "pcgrad",
    "graddrop",
    "gradvac",
    "mgda",
    "imtl-g",
    "gradnorm",
    "nsgd",
    "cagrad",
    "nash-mtl",
    "aligned-mtl",
    "upgrad",
    "dualproj",
    "rlw",
]
RANDOM = {"pcgrad", "graddrop", "gradvac", "rlw"}
# Exactly permutation invariant (deterministic given a fresh state / a shared seed).
PERMUTATION_INVARIANT = [
    "sum",
    "mean",
    "graddrop",
    "mgda",
    "imtl-g",
    "gradnorm",
    "nsgd",
    "cagrad",
    "nash-mtl",
    "aligned-mtl",
    "upgrad",
    "dualproj",
]
NON_CONFLICTING = ["mgda", "upgrad", "dualproj"]
HOMOGENEOUS = ALL  # every method claims A(sJ) = s A(J) for s > 0 (with its default options)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str, seed: int = 0, **kwargs) -> Aggregator:
    if name in RANDOM:
        kwargs.setdefault("seed", seed)
    return build(name, **kwargs)


def randn(s: int, d: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(s, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@st.composite
def degenerate(draw, max_streams: int = 4, min_streams: int = 1):
    """Matrices with the degenerate structures the engines can meet."""
    s = draw(st.integers(min_streams, max_streams))
    d = draw(st.integers(1, 6))
    j = randn(s, d, draw(st.integers(0, 2**16)))
    kind = draw(
        st.sampled_from(
            [
                *("generic", "zero", "zero_row", "duplicate", "colinear", "opposite"),
                *("tiny", "huge", "tiny_and_huge", "all_tiny", "all_huge"),
            ]
        )
    )
    a = draw(st.integers(0, s - 1))
    b = draw(st.integers(0, s - 1))
    if kind == "zero":
        j.zero_()
    elif kind == "zero_row":
        j[a] = 0
    elif kind == "duplicate":
        j[b] = j[a]
    elif kind == "colinear":
        j[b] = draw(st.sampled_from([0.25, 3.0, -2.0, -1e-3])) * j[a]
    elif kind == "opposite":
        j[b] = -j[a]
    elif kind == "tiny":
        j[a] *= 1e-12
    elif kind == "huge":
        j[a] *= 1e12
    elif kind == "tiny_and_huge":
        j[a] *= 1e-12
        j[b] *= 1e12
    elif kind == "all_tiny":
        j *= 1e-12
    elif kind == "all_huge":
        j *= 1e12
    dtype = draw(st.sampled_from([torch.float32, F64]))
    return j.to(dtype)


def losses_for(j: torch.Tensor) -> torch.Tensor:
    return torch.linspace(0.5, 2.0, j.shape[0], dtype=F64)


# ----------------------------------------------------------------------------- registry, build


def test_available_lists_exactly_the_methods():
    assert available() == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_build_each_method(name):
    agg = build(name)
    assert isinstance(agg, Aggregator)
    assert agg.name == name
    out = agg(randn(3, 5))
    assert isinstance(out, Aggregation)
    assert out.gradient.shape == (5,)
    assert out.weights is None if name == "graddrop" else out.weights.shape == (3,)


def test_build_normalises_spelling_and_passes_instances_through():
    assert build("IMTL_G").name == "imtl-g"
    assert build(" PCGrad ").name == "pcgrad"
    inst = build("mgda")
    assert build(inst) is inst
    assert build(inst, num_streams=3) is inst
    with pytest.raises(ValueError, match="only be given with a method name"):
        build(inst, normalization="l2")


def test_unknown_method_lists_available_names():
    with pytest.raises(ValueError) as err:
        build("pcgard")
    msg = str(err.value)
    assert "'pcgard'" in msg
    for name in ALL:
        assert name in msg
    with pytest.raises(ValueError, match="unknown aggregation method"):
        build("gradnorm+")
    with pytest.raises(ValueError):
        build(3)  # type: ignore[arg-type]


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="'alpah'") as err:
        build("gradnorm", alpah=1.0)
    assert "alpha" in str(err.value)  # lists what it takes
    with pytest.raises(ValueError, match="'seed'"):
        build("mgda", seed=0)
    with pytest.raises(ValueError, match="normalization"):
        build("mgda", normalization="l3")


def test_bad_option_values_are_value_errors():
    with pytest.raises(ValueError, match="it takes: no options"):
        build("sum", alpha=1.0)
    with pytest.raises(ValueError, match="it takes: no options"):
        build("imtl-g", kwargs=1)  # not an option, though nn.Module.__init__ takes **kwargs
    with pytest.raises(ValueError, match="leak must be a number"):
        build("graddrop", leak="0.1,0.2")
    for name in ("upgrad", "dualproj"):
        with pytest.raises(ValueError, match="reg must be >= 0"):
            build(name, reg=-1.0)
        with pytest.raises(ValueError, match="iters must be >= 1"):
            build(name, iters=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        build("pcgrad", seed="abc")


def test_composition_keeps_half_precision_rows_finite():
    # NSGD scales a row 1e6 times smaller than the others by ~1e5 and more: beyond float16
    j = randn(3, 6, 9)
    j[0] *= 1e-6
    j = j.half()
    # (leak 1 keeps every row: the result is the sum of the scaled rows, no random drop)
    out = make("nsgd+graddrop", seed=0, leak=1.0)(j)
    ref = make("nsgd+graddrop", seed=0, leak=1.0)(j.float())
    assert out.gradient.dtype == torch.float16 and torch.isfinite(out.gradient).all()
    torch.testing.assert_close(out.gradient.float(), ref.gradient, rtol=1e-2, atol=1e-2)


def test_options_go_to_the_methods_that_take_them():
    agg = build("gradnorm+pcgrad", alpha=0.5, seed=3, num_streams=3)
    assert isinstance(agg, Compose)
    assert agg.name == "gradnorm+pcgrad"
    gn, pc = agg.methods
    assert gn.alpha == 0.5 and pc.seed == 3
    assert gn.weight.shape == (3,)  # num_streams sized the state
    assert build("sum", num_streams=4).name == "sum"  # accepted by any spec


def test_composition_requires_row_scaling_prefix():
    for spec in ("pcgrad+mgda", "mgda+sum", "graddrop+sum"):
        with pytest.raises(ValueError, match="row-scaling") as err:
            build(spec)
        assert spec.split("+")[0] in str(err.value)
    build("rlw+nsgd+upgrad")  # several scalers are fine
    build("nsgd+graddrop")


def test_composition_scales_rows_then_aggregates():
    j = randn(3, 6, 1)
    agg = build("gradnorm+pcgrad", shuffle=False, num_streams=3)
    gn, _ = agg.methods
    with torch.no_grad():
        gn.weight.copy_(torch.tensor([0.5, 2.0, 0.5]))  # sums to S = 3
    out = agg(j)
    d = torch.tensor([0.5, 2.0, 0.5], dtype=F64)
    ref = build("pcgrad", shuffle=False)(d[:, None] * j)
    torch.testing.assert_close(out.gradient, ref.gradient)
    torch.testing.assert_close(out.weights, d * ref.weights)
    torch.testing.assert_close(out.weights @ j, out.gradient)
    # gradnorm wrote the gradient of its loss during forward
    assert gn.weight.grad is not None and gn.weight.grad.abs().sum() > 0


def test_composition_with_a_rows_method_last():
    j = randn(3, 6, 2)
    agg = build("nsgd+graddrop", seed=0)
    out = agg(j)
    assert out.weights is None
    scales = build("nsgd")(j).weights
    ref = build("graddrop", seed=0)(scales[:, None] * j)
    torch.testing.assert_close(out.gradient, ref.gradient)
    direct = Compose(build("mean"), build("imtl-g"))
    torch.testing.assert_close(direct(j).gradient, build("imtl-g")(j).gradient / 3)
    with pytest.raises(ValueError):
        Compose()


# ------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", ALL)
def test_weights_reproduce_the_gradient_and_given_gramian_is_used(name):
    j = randn(4, 7, 3)
    out = make(name)(j, losses=losses_for(j))
    if out.weights is not None:
        torch.testing.assert_close(out.weights @ j, out.gradient, rtol=1e-10, atol=1e-12)
    agg = make(name, seed=5)
    g = j @ j.T
    a = agg(j, gramian=g, losses=losses_for(j))
    b = make(name, seed=5)(j, losses=losses_for(j))
    torch.testing.assert_close(a.gradient, b.gradient, rtol=1e-9, atol=1e-12)
    if isinstance(agg, GramianAggregator):
        # the weights come from the Gramian given, not from J's own
        j2 = randn(4, 7, 8)
        given = make(name, seed=5)(j, gramian=j2 @ j2.T, losses=losses_for(j))
        own = make(name, seed=5)(j2, losses=losses_for(j))
        torch.testing.assert_close(given.weights, own.weights, rtol=1e-9, atol=1e-12)
    if isinstance(agg, GramianAggregator) and name not in RANDOM:
        # the result depends on J only through the Gramian: a rotated J gives rotated output
        q, _ = torch.linalg.qr(randn(7, 7, 4))
        rot = make(name)(j @ q, losses=losses_for(j))
        torch.testing.assert_close(rot.gradient, out.gradient @ q, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_shape_are_kept(name, dtype):
    j = randn(3, 5, 7).to(dtype)
    out = make(name)(j)
    assert out.gradient.dtype == dtype and out.gradient.device == j.device
    assert torch.isfinite(out.gradient.float()).all()
    if out.weights is not None:
        assert out.weights.dtype in (dtype, torch.float32)


@pytest.mark.parametrize("name", ALL)
def test_no_streams_and_bad_input(name):
    out = make(name)(torch.zeros(0, 4))
    assert out.gradient.shape == (4,) and (out.gradient == 0).all()
    with pytest.raises(ValueError):
        make(name)(torch.zeros(4))


@pytest.mark.parametrize("name", ALL)
def test_non_finite_rows_never_crash(name):
    j = randn(3, 5, 8)
    j[1, 2] = float("nan")
    j[2, 0] = float("inf")
    out = make(name)(j, losses=torch.tensor([1.0, float("nan"), 2.0]))
    assert out.gradient.shape == (5,)


@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
@SETTINGS
def test_one_stream_is_the_identity(name, data):
    d = data.draw(st.integers(1, 8))
    scale = data.draw(st.sampled_from([0.0, 1e-12, 1e-3, 1.0, 1e12]))
    j = randn(1, d, data.draw(st.integers(0, 1000))) * scale
    out = make(name)(j, losses=torch.tensor([0.7]))
    torch.testing.assert_close(out.gradient, j[0], rtol=1e-7, atol=1e-300)


@pytest.mark.parametrize("name", ALL)
@given(j=degenerate())
@SETTINGS
def test_finite_on_degenerate_inputs(name, j):
    out = make(name)(j, losses=losses_for(j))
    assert torch.isfinite(out.gradient).all(), out
    if out.weights is not None:
        assert torch.isfinite(out.weights).all(), out
    # and without losses, with the Gramian handed over in J's dtype (as an engine may)
    out = make(name)(j, gramian=j @ j.T)
    assert torch.isfinite(out.gradient).all()


@pytest.mark.parametrize("name", PERMUTATION_INVARIANT)
@given(j=degenerate(), perm_seed=st.integers(0, 1000))
@SETTINGS
def test_permutation_invariance(name, j, perm_seed):
    j = j.to(F64)
    s = j.shape[0]
    perm = torch.randperm(s, generator=torch.Generator().manual_seed(perm_seed))
    losses = losses_for(j)
    a = make(name)(j, losses=losses)
    b = make(name)(j[perm], losses=losses[perm])
    scale = j.norm(dim=1).max().clamp_min(1e-300)
    tol = 1e-7 * scale * s
    assert (a.gradient - b.gradient).abs().max() <= tol, (a, b)


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_two_streams_are_order_free(name):
    j = randn(2, 6, 9)
    a = make(name, seed=1)(j).gradient
    b = make(name, seed=2)(j.flip(0)).gradient
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", HOMOGENEOUS)
@given(j=degenerate(), s=st.sampled_from([1e-6, 0.01, 3.0, 1e5]))
@SETTINGS
def test_positive_homogeneity(name, j, s):
    j = j.to(F64)
    losses = losses_for(j)
    a = make(name, seed=4)(j, losses=losses).gradient
    b = make(name, seed=4)(s * j, losses=losses).gradient
    scale = j.norm(dim=1).max()
    rel = 1e-6
    assert ((b - s * a).abs() <= rel * s * scale + 1e-300).all(), (a, b / s)


@pytest.mark.parametrize("name", NON_CONFLICTING)
@given(j=degenerate(max_streams=5))
@SETTINGS
def test_non_conflicting(name, j):
    j = j.to(F64)
    d = make(name)(j).gradient
    norms = j.norm(dim=1)
    # J A(J) >= 0 up to the solver tolerance, relative to each row and the largest row
    assert (j @ d >= -1e-7 * norms * norms.max()).all(), (j @ d, norms)


@given(j=degenerate(min_streams=9, max_streams=12))
@SETTINGS
def test_mgda_above_the_enumeration_limit_is_a_non_conflicting_simplex_point(j):
    """More than 8 streams: interior point + crossover, on every degenerate structure."""
    j = j.to(F64)
    out = build("mgda")(j)
    assert torch.isfinite(out.gradient).all() and torch.isfinite(out.weights).all()
    assert (out.weights >= 0).all() and abs(float(out.weights.sum()) - 1.0) < 1e-9
    norms = j.norm(dim=1)
    assert (j @ out.gradient >= -1e-7 * norms * norms.max()).all(), (j @ out.gradient, norms)


@given(j=degenerate(max_streams=5))
@SETTINGS
def test_nash_mtl_is_non_conflicting_on_generic_rows(j):
    j = j.to(F64)
    # excluded: near-total conflict, where no positive bargaining solution exists (the ridge
    # then gives d ~ 0): detected as a min-norm point ~ 0
    mgda = build("mgda")(j).gradient
    assume(mgda.norm() > 1e-3 * j.norm(dim=1).max())
    d = build("nash-mtl")(j).gradient
    norms = j.norm(dim=1)
    assert (j @ d >= -1e-6 * norms * norms.max()).all()


def test_pcgrad_two_streams_have_no_conflict_after_projection():
    for seed in range(20):
        j = randn(2, 4, seed)
        out = make("pcgrad", seed=seed)(j)
        assert (j @ out.gradient >= -1e-12).all()


# ------------------------------------------------------------------------------------- state


def _steps(agg, mats, losses=None):
    return [agg(m, losses=losses).gradient for m in mats]


def test_gradvac_state_dict_round_trip():
    mats = [randn(3, 6, k) for k in range(5)]
    a = build("gradvac", beta=0.3, seed=7)
    _steps(a, mats[:3])
    assert a.targets.shape == (3, 3) and a.targets.abs().sum() > 0
    state = a.state_dict()
    b = build("gradvac", beta=0.3, seed=99)  # fresh: lazily sized, another seed
    b.load_state_dict(state)
    torch.testing.assert_close(b.targets, a.targets)
    for m in mats[3:]:  # the generator state travelled too: same random orders
        torch.testing.assert_close(b(m).gradient, a(m).gradient)
    torch.testing.assert_close(b.targets, a.targets)
    c = build("gradvac", beta=0.3, num_streams=3)
    assert c.targets.shape == (3, 3)
    c.load_state_dict(state)


def test_gradvac_state_changes_behaviour():
    mats = [randn(3, 6, k) for k in range(4)]
    a = build("gradvac", beta=0.5, shuffle=False)
    fresh = build("gradvac", beta=0.5, shuffle=False)
    _steps(a, mats[:3])
    assert not torch.allclose(a(mats[3]).gradient, fresh(mats[3]).gradient)


def test_gradnorm_state_dict_round_trip_and_optimizer():
    mats = [randn(3, 6, k) * torch.tensor([[1.0], [10.0], [0.1]], dtype=F64) for k in range(6)]
    losses = [
        torch.tensor([1.0, 2.0, 3.0]) * (1 - 0.1 * k) ** torch.arange(1.0, 4.0) for k in range(6)
    ]
    a = build("gradnorm", alpha=1.0)
    opt = torch.optim.SGD(a.parameters(), lr=0.05)  # built before the first call
    for m, ls in zip(mats[:4], losses[:4]):
        opt.zero_grad()
        a(m, losses=ls)
        opt.step()
    assert a.weight.shape == (3,)
    assert not torch.allclose(a.weight.detach(), torch.ones(3))  # the optimizer moved them
    state = a.state_dict()
    b = build("gradnorm", alpha=1.0)
    b.load_state_dict(state)
    torch.testing.assert_close(b.weight.detach(), a.weight.detach())
    torch.testing.assert_close(b.initial_losses, a.initial_losses)
    a.weight.grad = None
    out_a = a(mats[4], losses=losses[4])
    out_b = b(mats[4], losses=losses[4])
    torch.testing.assert_close(out_a.gradient, out_b.gradient)
    torch.testing.assert_close(a.weight.grad, b.weight.grad)
    assert abs(float(out_a.weights.sum()) - 3.0) < 1e-6  # renormalised to sum S


def test_gradnorm_accumulates_and_renormalises():
    j = randn(2, 5, 3) * torch.tensor([[1.0], [4.0]], dtype=F64)
    agg = build("gradnorm", num_streams=2)
    agg(j)
    first = agg.weight.grad.clone()
    agg(j)
    torch.testing.assert_close(agg.weight.grad, 2 * first)
    # the small row must gain weight: its gradient-norm loss pushes w_0 up (negative grad)
    assert first[0] < 0 < first[1]
    with torch.no_grad():
        agg.weight.copy_(torch.tensor([3.0, 1.0]))
    out = agg(j)
    torch.testing.assert_close(out.weights, torch.tensor([1.5, 0.5], dtype=F64))
    agg.eval()
    agg.weight.grad = None
    agg(j)
    assert agg.weight.grad is None  # evaluation mode writes no gradient


def test_nsgd_state_dict_round_trip():
    mats = [randn(3, 4, k) for k in range(5)]
    a = build("nsgd", update_at=2)
    _steps(a, mats[:3])
    b = build("nsgd", update_at=2)
    b.load_state_dict(a.state_dict())
    assert int(b.counter) == 3
    torch.testing.assert_close(b.initial_norms, a.initial_norms)
    torch.testing.assert_close(b(mats[3]).gradient, a(mats[3]).gradient)


@pytest.mark.parametrize("name", ["gradvac", "gradnorm", "nsgd"])
def test_changed_stream_count_leaves_state_alone(name):
    agg = build(name)
    agg(randn(3, 4, 0), losses=torch.ones(3))
    before = {k: v.clone() for k, v in agg.state_dict().items() if isinstance(v, torch.Tensor)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = agg(randn(2, 4, 1), losses=torch.ones(2))
    assert torch.isfinite(out.gradient).all()
    assert any("streams" in str(w.message) for w in caught)
    after = agg.state_dict()
    for k, v in before.items():
        if k != "counter":
            torch.testing.assert_close(after[k], v)


def test_random_methods_are_reproducible_by_seed():
    j = randn(4, 6, 2)
    for name in sorted(RANDOM):
        a = _steps(make(name, seed=11), [j, j])
        b = _steps(make(name, seed=11), [j, j])
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
    # and they are random: different seeds differ, successive calls differ
    assert not torch.allclose(make("rlw", seed=1)(j).gradient, make("rlw", seed=2)(j).gradient)
    agg = make("pcgrad", seed=0)
    outs = {tuple(agg(randn(4, 2, 5)).gradient.tolist()) for _ in range(20)}
    assert len(outs) > 1


def test_stateless_methods_have_no_state():
    for name in ALL:
        keys = set(make(name).state_dict())
        expected = {
            "gradvac": {"targets", "_extra_state"},
            "gradnorm": {"weight", "initial_losses"},
            "nsgd": {"initial_norms", "counter"},
        }.get(name, {"_extra_state"} if name in RANDOM else set())
        assert keys == expected, name


def test_mgda_loss_normalisation_needs_losses():
    j = randn(3, 4, 0)
    agg = build("mgda", normalization="loss+")
    with pytest.warns(RuntimeWarning, match="losses"):
        out = agg(j)
    torch.testing.assert_close(out.gradient, build("mgda", normalization="l2")(j).gradient)


def test_every_pair_of_scaler_and_method_composes():
    scalers = [n for n in ALL if build(n).row_scaling]
    assert set(scalers) == {"sum", "mean", "gradnorm", "nsgd", "rlw"}
    j = randn(3, 4, 1)
    for a, b in itertools.product(scalers, ALL):
        out = build(f"{a}+{b}", **({"seed": 0} if {a, b} & RANDOM else {}))(j)
        assert torch.isfinite(out.gradient).all()


@pytest.mark.parametrize("s", [2, 5, 12, 24])
def test_principal_pivoting_is_exact_from_any_start(s):
    """Block principal pivoting (UPGrad and DualProj on the CPU): the KKT conditions of
    min 1/2 x^T Q x + q^T x, x >= 0 (q in Q's range) hold to rounding, from an empty, a full or
    a random start, on full-rank and rank-deficient (ridged) Q, and the objective is never above
    the interior point's."""
    from impartial_train.methods._solvers import nonneg_qp, principal_pivoting

    gen = torch.Generator().manual_seed(s)
    for rank in (s, max(1, s // 3)):
        a = torch.randn(s, rank, generator=gen, dtype=F64)
        q_mat = a @ a.T / rank + 1e-10 * torch.eye(s, dtype=F64)
        # as in UPGrad and DualProj, q = Q shift: the solution is bounded however flat Q is
        q_vec = torch.randn(6, s, generator=gen, dtype=F64) @ q_mat
        starts = [None, torch.ones(6, s, dtype=torch.bool), torch.rand(6, s, generator=gen) < 0.5]
        ip = nonneg_qp(q_mat.expand(6, s, s), q_vec, 30)
        for start in starts:
            x, free = principal_pivoting(q_mat, q_vec, start)
            assert x is not None
            y = x @ q_mat + q_vec
            tol = 1e-9 * (1 + x.abs().amax())
            assert (x >= 0).all() and (y >= -tol).all() and (x * y).abs().max() <= tol
            assert torch.equal(free, x > 0) or ((x > 0) <= free).all()

            def objective(v):
                return 0.5 * ((v @ q_mat) * v).sum(-1) + (q_vec * v).sum(-1)

            assert (objective(x) <= objective(ip.clamp_min(0)) + 1e-12).all()


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
def test_a_stale_warm_start_changes_nothing(name):
    """UPGrad and DualProj start from the last call's support: after other matrices (another S
    too), the result equals a fresh instance's."""
    agg = build(name)
    agg(randn(5, 7, 1))
    agg(randn(3, 7, 2))
    for seed in (3, 4):
        j = randn(5, 7, seed) - 0.5 * randn(1, 7, seed + 10)
        torch.testing.assert_close(agg(j).gradient, build(name)(j).gradient, rtol=1e-10, atol=1e-12)
