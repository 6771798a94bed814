"""The engines' self-check: on the first step of each input structure, surgery with the identity
combination must give plain backward's gradients; an engine bug is caught, not trained on."""

import pytest
import torch
from torch import nn

import impartial_train as it
from impartial_train.engine import graph as graph_engine
from impartial_train.engine import hooks as hook_engine
from impartial_train.engine.check import SurgeryCheckError, compare

pytestmark = pytest.mark.usefixtures("one_thread")


class Trunk(nn.Module):
    """A shared trunk read by two heads and a regularizer: one activation branch point."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.head_a, self.head_b = nn.Linear(6, 1), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return {
            "a": self.head_a(h).pow(2).mean(),
            "b": (self.head_b(h) - 1).abs().mean() * 3,
            "kl": h.pow(2).mean(),
        }


class Hooked(Trunk):
    """A tensor hook on the branch value: the graph engine cannot take over from the hooks."""

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        h.register_hook(lambda g: 2 * g)
        return {"a": self.head_a(h).pow(2).mean(), "b": self.head_b(h).abs().mean()}


def plain_grads(model, x, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    sum(model(x).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def step_grads(imodel, model, x, seed=0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    sum(imodel(x).values()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def miscounted_begin(original):
    """An injected hook-engine bug: the first consumer to run combines (the countdown is 1)."""

    def begin(self):
        fresh = torch._C._current_graph_task_id() != self.task
        ok = original(self)
        if ok and fresh:
            self.remaining = 1
        return ok

    return begin


@pytest.mark.parametrize("build", [Trunk, Hooked])
def test_an_injected_hook_engine_bug_is_caught_and_named(build, monkeypatch):
    torch.manual_seed(0)
    model, x = build(), torch.randn(5, 4)
    monkeypatch.setattr(
        hook_engine._PointRun, "begin", miscounted_begin(hook_engine._PointRun.begin)
    )
    with pytest.raises(SurgeryCheckError, match=r"hook engine, at branch point bp0:tanh.*differs"):
        it.wrap(model, method="mean", engine="hook")(x)
    if build is Hooked:  # auto: the graph engine is unavailable, so nothing can take over
        with pytest.raises(SurgeryCheckError, match="graph engine cannot take over"):
            it.wrap(model, method="mean", engine="auto")(x)
    # without the check the bug trains silently: this is what the check is for
    wrong = step_grads(it.wrap(model, method="mean", engine="hook", verify=False), model, x)
    want = plain_grads(model, x)
    assert not compare(list(want), list(want.values()), list(wrong.values())).passed


def test_an_injected_graph_engine_bug_falls_back_to_the_hook_engine(monkeypatch):
    def dropping_backward(ctx, *grads):  # injected: the last stream's gradient is lost
        kept = [g for g in grads[:-1] if g is not None]
        return (torch.stack(kept).sum(0) if kept else None), None, None, None

    monkeypatch.setattr(graph_engine.Branch, "backward", staticmethod(dropping_backward))
    torch.manual_seed(0)
    model, x = Trunk(), torch.randn(5, 4)
    want = plain_grads(model, x)
    imodel = it.wrap(model, method="mean", engine="auto")
    for _ in range(2):
        assert_close(want, step_grads(imodel, model, x))
        assert imodel.last_engine == "hook"
    (note,) = imodel.engine_notes
    assert "graph engine unavailable: its self-check failed" in note
    assert "self-check passed" in note  # the hook engine's own check
    with pytest.raises(SurgeryCheckError, match=r"under the graph engine.*use engine='hook'"):
        it.wrap(model, method="mean", engine="graph")(x)


@pytest.mark.parametrize("engine", ["hook", "graph"])
def test_the_check_changes_nothing_the_step_leaves_behind(engine):
    """Same losses, gradients, random numbers, buffers and statistics with and without it."""
    results = []
    for verify in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.3))
        head = Trunk()
        model.add_module("heads", head)

        def losses(m, x):
            h = m[2](m[1](m[0](x)))
            return {"a": m.heads.head_a(h).pow(2).mean(), "b": m.heads.head_b(h).abs().mean()}

        imodel = it.wrap(model, losses=losses, method="imtl-g", engine=engine, verify=verify)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)
        model.zero_grad()
        out = imodel(x)
        sum(out.values()).backward()
        after = torch.rand(3)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        (stats,) = imodel.last_stats().values()
        results.append((out, grads, after, model[1].running_mean.clone(), stats["weights"]))
        assert imodel.last_engine == engine
        assert ("self-check passed" in imodel.engine_notes[0]) == verify
    (out1, g1, r1, m1, w1), (out2, g2, r2, m2, w2) = results
    for name in out1:
        assert torch.equal(out1[name], out2[name]), name
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    assert torch.equal(r1, r2) and torch.equal(m1, m2) and w1 == w2


def test_compare_tolerates_rounding_noise_but_not_a_wrong_gradient():
    g = [torch.full((3,), 100.0), torch.full((2,), 1e-6)]  # the second: noise of a zero gradient
    noisy = [g[0] * (1 + 1e-7), torch.full((2,), -3e-6)]
    assert compare(["w", "b"], g, noisy).passed
    wrong = [g[0], torch.full((2,), 0.5)]  # small, but not noise
    result = compare(["w", "b"], g, wrong)
    assert not result.passed and result.parameter == "b"
    missing = compare(["w", "b"], [g[0], None], [g[0], torch.ones(2)])
    assert not missing.passed and missing.parameter == "b"
