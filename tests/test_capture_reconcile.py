"""Reconciliation of structural graphs with the autograd truth."""

from __future__ import annotations

import networkx as nx
import torch
import zoo
from torch import nn

from blockfinder.analyze import run_analysis
from blockfinder.fx_capture import StructuralCapture
from blockfinder.reconcile import reconcile


def _cut_edges(graph):
    return {(u, v): e["cut"] for u, v, e in graph.edges(data=True) if e.get("cut")}


def test_detach_inside_a_leaf_module_is_cut():
    model, batch, _ = zoo.make("hidden_detach")
    report = run_analysis(model, batch, regularizers=(), captures=("fx",), leaf_depth=1)
    assert report.capture == "fx" and report.differences == []
    assert _cut_edges(report.graph) == {
        ("refine.proj.weight", "refine"): "not in the replay's autograd graph",
        ("refine.proj.bias", "refine"): "not in the replay's autograd graph",
    }
    assert report.parameters["refine.proj.weight"] == frozenset()
    assert report.parameters == zoo.autograd_reach(model, batch)
    # without the leaf, the tracer sees the detach itself and nothing needs cutting
    deep = run_analysis(model, batch, regularizers=(), captures=("fx",))
    assert _cut_edges(deep.graph) == {}


def test_unseen_no_grad_region_is_reported_as_a_difference():
    model, batch, _ = zoo.make("no_grad_target")
    report = run_analysis(model, batch, regularizers=(), captures=("fx",), track_grad_mode=False)
    assert report.capture == "fx"
    assert report.differences == [
        "parameter 'target.weight': fx graph reaches {consistency}, autograd reaches no loss "
        "(report uses autograd)",
        "parameter 'target.bias': fx graph reaches {consistency}, autograd reaches no loss "
        "(report uses autograd)",
    ]
    assert report.parameters["target.weight"] == frozenset()
    assert report.parameters == zoo.autograd_reach(model, batch)


def test_custom_function_without_input_gradient_is_a_difference():
    model, batch, _ = zoo.make("custom_function")
    report = run_analysis(model, batch, regularizers=(), captures=("fx",))
    assert report.differences == [
        "parameter 'log_coeff': fx graph reaches {domain}, autograd reaches no loss "
        "(report uses autograd)"
    ]
    assert report.parameters["log_coeff"] == frozenset()
    # export inlines the function's forward, which does not use the coefficient
    exported = run_analysis(model, batch, regularizers=(), captures=("export",))
    assert exported.differences == []


class Quantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = torch.round(x * 4) / 4
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return None


class QuantizedSide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = self.body(x)
        return {"a": self.a(h).pow(2).mean(), "b": self.b(Quantize.apply(h)).pow(2).mean()}


def test_values_without_grad_in_the_replay_cut_their_inputs():
    torch.manual_seed(0)
    model, x = QuantizedSide(), torch.randn(5, 3)
    report = run_analysis(model, x, regularizers=(), captures=("fx",))
    assert _cut_edges(report.graph) == {("body", "quantize_apply"): "no grad in replay"}
    assert report.differences == []
    assert report.branch_points == []
    assert report.parameters == zoo.autograd_reach(model, x)


def test_reconcile_without_replay_records_differences_only():
    graph = nx.DiGraph()
    graph.add_node("w", op="parameter", param="w", module="")
    graph.add_node("x", op="call", module="", target="mul")
    graph.add_node("loss_a", op="loss", loss="a", module="")
    graph.add_edge("w", "x", grad=True)
    graph.add_edge("x", "loss_a", grad=True)
    capture = StructuralCapture(capture="export", graph=graph, losses=("a",))
    record = reconcile(capture, {"w": frozenset(), "v": frozenset({"a"})}, ("a",))
    assert record.cut == []
    assert record.differences == [
        "parameter 'w': export graph reaches {a}, autograd reaches no loss (report uses autograd)",
        "parameter 'v': not in the export graph; autograd reaches {a} (report uses autograd)",
    ]
