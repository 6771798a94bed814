"""The hook engine against direct computations with torch.autograd.grad (no methods package)."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from impartial_train.engine.hooks import HookEngine, plan_surgery
from impartial_train.engine.stats import PointStats


@dataclass
class _Result:
    gradient: torch.Tensor
    weights: torch.Tensor


class Weighted(nn.Module):
    """Fixed stream weights: the simplest aggregator whose result is easy to compute by hand."""

    def __init__(self, weights):
        super().__init__()
        self.w = torch.tensor(weights)
        self.seen = []

    def forward(self, J, *, gramian=None, losses=None, activation=None):
        self.seen.append(J.detach().clone())
        w = self.w[: J.shape[0]].to(J.dtype)
        return _Result(w @ J, w)


def install(losses, model, tasks, methods, rescale=False):
    points = plan_surgery(losses, tasks, {id(p) for p in model.parameters()})
    stats = [PointStats("", []) for _ in points]
    HookEngine(rescale=rescale).install(
        points, methods[: len(points)], stats, [None] * len(points), losses.values()
    )
    return points, stats


class Heads(nn.Module):
    """Shared trunk, one head per task, plus a KL-like regularizer on the trunk input."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 4)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(3))

    def forward(self, x):
        z = self.enc(x)
        h = self.trunk(z)
        out = {
            f"t{i}": (head(h) - x[:, i : i + 1]).pow(2).mean() for i, head in enumerate(self.heads)
        }
        out["kl"] = z.pow(2).mean()
        return out


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_one_branch_point_weighted_equals_manual():
    torch.manual_seed(0)
    model, x = Heads(), torch.randn(6, 5)
    out = model(x)
    points, stats = install(out, model, ["t0", "t1", "t2"], [Weighted([0.5, 2.0, -1.0])])
    assert len(points) == 1 and points[0].streams == [1, 2, 4]
    sum(out.values()).backward()
    got = grads(model)

    model.zero_grad()
    z = model.enc(x)
    h = model.trunk(z)
    hd = h.detach().requires_grad_()
    task_losses = [(head(hd) - x[:, i : i + 1]).pow(2).mean() for i, head in enumerate(model.heads)]
    g = [torch.autograd.grad(t, hd, retain_graph=True)[0] for t in task_losses]
    combined = 0.5 * g[0] + 2.0 * g[1] - 1.0 * g[2]
    upstream = [p for n, p in model.named_parameters() if not n.startswith("heads")]
    via_h = torch.autograd.grad(h, upstream, combined, retain_graph=True)
    via_kl = torch.autograd.grad(z.pow(2).mean(), upstream, allow_unused=True)
    names = [n for n, _ in model.named_parameters() if not n.startswith("heads")]
    for name, a, b in zip(names, via_h, via_kl):
        expected = a + (b if b is not None else 0)
        torch.testing.assert_close(got[name], expected)
    for i, head in enumerate(model.heads):
        hw = torch.autograd.grad(task_losses[i], head.weight)[0]
        torch.testing.assert_close(got[f"heads.{i}.weight"], hw)
    assert stats[0].gramian.shape == (3, 3)


def test_rescale_matches_plain_sum_norm():
    torch.manual_seed(1)
    model, x = Heads(), torch.randn(6, 5)
    out = model(x)
    method = Weighted([3.0, 0.1, 1.0])
    _, stats = install(out, model, ["t0", "t1", "t2"], [method], rescale=True)
    sum(out.values()).backward()
    J = method.seen[0]
    assert torch.allclose(
        stats[0].scale.float(), J.sum(0).norm() / (method.w @ J).norm(), rtol=1e-5
    )


def test_regularizers_and_single_task_are_not_surgery_points():
    torch.manual_seed(2)
    model, x = Heads(), torch.randn(6, 5)
    out = model(x)
    assert plan_surgery(out, ["t0"], {id(p) for p in model.parameters()}) == []


def test_parameter_branch_point_decoder_reused_for_two_samples():
    torch.manual_seed(3)
    dec = nn.Linear(3, 2)
    model = nn.ModuleDict({"dec": dec})
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    out = {"a": dec(z1).pow(2).mean(), "b": (dec(z2) - 1).pow(2).mean()}
    points, _ = install(out, model, ["a", "b"], [Weighted([1.0, 0.0]), Weighted([1.0, 0.0])])
    kinds = sorted(type(p.node).__name__ for p in points)
    assert kinds == ["AccumulateGrad", "AccumulateGrad"]  # weight and bias
    sum(out.values()).backward()
    expected = torch.autograd.grad(dec(z1).pow(2).mean(), [dec.weight, dec.bias])
    torch.testing.assert_close(dec.weight.grad, expected[0])
    torch.testing.assert_close(dec.bias.grad, expected[1])


def test_chunk_outputs_are_separate_streams():
    torch.manual_seed(4)
    lin = nn.Linear(3, 4)
    model = nn.ModuleDict({"lin": lin})
    x = torch.randn(5, 3)
    a, b = lin(x).chunk(2, dim=1)
    out = {"a": a.pow(2).mean(), "b": b.sum() * 0.1, "kl": a.mean()}
    points, _ = install(out, model, ["a", "b"], [Weighted([2.0, 1.0])])
    assert len(points) == 1 and type(points[0].node).__name__ == "AddmmBackward0"
    sum(out.values()).backward()
    y = lin(x)
    ya, yb = y.chunk(2, dim=1)
    ga = torch.autograd.grad(ya.pow(2).mean(), y, retain_graph=True)[0]
    gb = torch.autograd.grad(yb.sum() * 0.1, y, retain_graph=True)[0]
    gk = torch.autograd.grad(ya.mean(), y, retain_graph=True)[0]
    # chunk 0 reaches {a, kl}: one stream, so its KL part is weighted with it
    expected = torch.autograd.grad(y, lin.weight, 2 * (ga + gk) + gb)[0]
    torch.testing.assert_close(lin.weight.grad, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_stream_is_dropped_and_reported(bad):
    torch.manual_seed(5)
    model, x = Heads(), torch.randn(6, 5)
    out = model(x)
    out["t1"] = out["t1"] * torch.tensor(bad)
    method = Weighted([1.0, 1.0, 1.0])
    _, stats = install(out, model, ["t0", "t1", "t2"], [method])
    sum(out.values()).backward()
    assert stats[0].dropped == [1]
    assert method.seen[0].shape[0] == 2
    assert all(torch.isfinite(model.get_parameter(n).grad).all() for n in ["enc.weight"])


def test_rescale_leaves_a_pareto_stationary_result_unscaled():
    """A min-norm method can return ~0 next to a large plain sum; rescaling it to the sum's norm
    would blow numerical noise up to a full step (it made MGDA diverge in the reproduction)."""
    from impartial_train.engine.combine import combine_streams

    torch.manual_seed(8)
    stash = [torch.randn(50), torch.randn(50)]

    class NearZero(nn.Module):
        def forward(self, J, *, gramian=None, losses=None, activation=None):
            w = torch.tensor([1e-9, 0.0], dtype=J.dtype)
            return _Result(w @ J, w)

    stats = PointStats("", [])
    out = combine_streams(stash, NearZero(), stats, rescale=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 1e-9 * stash[0])
    assert float(stats.scale) == 1.0

    # a small but significant result is still rescaled to the plain sum's norm
    class Small(nn.Module):
        def forward(self, J, *, gramian=None, losses=None, activation=None):
            w = torch.tensor([1e-3, 0.0], dtype=J.dtype)
            return _Result(w @ J, w)

    out = combine_streams(stash, Small(), stats, rescale=True)
    torch.testing.assert_close(out.norm(), (stash[0] + stash[1]).norm())


class Thirds(nn.Module):
    """One activation chunked in three: two task parts and a regularizer part."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)

    def forward(self, x):
        a, b, c = torch.tanh(self.lin(x)).chunk(3, dim=1)
        return {"a": a.pow(2).mean(), "b": (b - 1).pow(2).mean(), "kl": c.abs().mean()}


@pytest.mark.parametrize("engine", ["hook", "graph"])
def test_regularizer_alone_and_a_retained_second_backward(engine):
    import impartial_train as it

    torch.manual_seed(0)
    model, x = Thirds(), torch.randn(5, 4)
    imodel = it.wrap(model, x, method="mean", engine=engine)
    plain = torch.autograd.grad(model(x)["kl"], model.lin.weight)[0]
    for _ in range(2):  # the graph engine's first step of a structure runs through hooks
        out = imodel(x)
        # a backward that reaches the branch point through the regularizer only
        (kl_only,) = torch.autograd.grad(out["kl"], model.lin.weight)
        torch.testing.assert_close(kl_only, plain)
        out = imodel(x)
        total = sum(out.values())
        (first,) = torch.autograd.grad(total, model.lin.weight, retain_graph=True)
        (second,) = torch.autograd.grad(total, model.lin.weight)
        torch.testing.assert_close(second, first)


def test_hook_engine_leaves_nothing_alive_after_the_step():
    """The hooks on a step's graph must not keep the graph (and its activations) alive."""
    import gc
    import weakref

    import impartial_train as it

    torch.manual_seed(0)
    model = Thirds()
    imodel = it.wrap(model, torch.randn(5, 4), method="mean", engine="hook")
    refs = []
    for step in range(6):
        x = torch.randn(5, 4)
        refs.append(weakref.ref(x))  # saved by the Linear's backward
        out = imodel(x)
        if step % 2:
            sum(out.values()).backward()
        del out, x
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


@pytest.mark.parametrize("engine", ["hook", "graph"])
def test_statistics_hold_no_graph_after_a_create_graph_backward(engine):
    import impartial_train as it

    torch.manual_seed(0)
    model, x = Thirds(), torch.randn(5, 4)
    imodel = it.wrap(model, x, method="imtl-g", engine=engine)
    for _ in range(2):
        out = imodel(x)
        torch.autograd.grad(sum(out.values()), model.lin.weight, create_graph=True)
    (stats,) = imodel._stats.values()
    for value in (stats.gramian, stats.weights, stats.scale):
        assert not value.requires_grad
