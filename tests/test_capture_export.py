"""The export / draft_export fallbacks: aten-level tuple ops reasoned about per output, no_grad
regions, tied weights, specializations, and no global state changed."""

from __future__ import annotations

import logging
import sys
import warnings

import pytest
import torch
import zoo
from torch import nn
from torch.distributions import Distribution

from blockfinder.analyze import run_analysis
from blockfinder.blocks import analyze_graph
from blockfinder.export_capture import capture_export


def test_tuple_ops_do_not_merge_reach_of_unrelated_outputs():
    model, batch, _ = zoo.make("tuple_ops")
    capture = capture_export(model, batch)
    graph = capture.graph
    analysis = analyze_graph(graph, capture.losses)
    # broadcast_tensors(a, b): output 0 feeds "p" only, output 1 "q" only
    assert graph.nodes["lin_a.weight"]["reach"] == 0b01
    assert graph.nodes["lin_b.weight"]["reach"] == 0b10
    broadcasts = [n for n, a in graph.nodes(data=True) if a["target"] == "aten.broadcast_tensors"]
    assert broadcasts
    for node in broadcasts:  # kept for the record, inert: no gradient enters it
        assert graph.nodes[node]["container"] is True
        assert not any(e["grad"] for _, _, e in graph.in_edges(node, data=True))
    # split: each output keeps its own reach; the producer is the branch point
    (split,) = [n for n, a in graph.nodes(data=True) if a["target"] == "aten.split"]
    reaches = sorted(graph.nodes[u]["reach"] for u in graph.succ[split])
    assert reaches == [0b01, 0b10]
    (bp,) = analysis.branch_points
    assert bp.where == "lin_c" and [sorted(s) for s in bp.streams] == [["p"], ["q"]]
    assert not graph.nodes[bp.node].get("container")


def test_mse_loss_broadcast_is_looked_through():
    model, batch, _ = zoo.make("heterogeneous_vae")
    capture = capture_export(model, batch)
    graph = capture.graph
    analyze_graph(graph, capture.losses)
    heads = {
        name: graph.nodes[f"heads.{name}.weight"]["reach"]
        for name in ("age", "smoker", "region", "visits")
    }
    # each head's weights reach its own loss only (no merging through broadcast containers)
    assert sorted(heads.values()) == [0b0001, 0b0010, 0b0100, 0b1000]


def test_no_grad_region_carries_no_gradient():
    model, batch, _ = zoo.make("no_grad_target")
    capture = capture_export(model, batch)
    graph = capture.graph
    analyze_graph(graph, capture.losses)
    assert graph.nodes["target.weight"]["reach"] == 0
    hop = [n for n, a in graph.nodes(data=True) if "wrap_with_set_grad_enabled" in a["target"]]
    assert hop and not any(e["grad"] for _, _, e in graph.in_edges(hop[0], data=True))


def test_tied_weights_are_canonical():
    model, batch, _ = zoo.make("tied_weights")
    graph = capture_export(model, batch).graph
    params = {a["param"] for _, a in graph.nodes(data=True) if a["op"] == "parameter"}
    assert "embed.weight" in params and "out.weight" not in params


def test_module_paths_from_nn_module_stack():
    model, batch, _ = zoo.make("sequence")
    graph = capture_export(model, batch).graph
    modules = {a["module"] for _, a in graph.nodes(data=True) if a["op"] == "call"}
    assert {"cell", "readout", "summary", ""} <= modules


def _global_state(model: nn.Module):
    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training)
        for m in model.modules()
    ]
    levels = [logging.getLogger(n).level for n in ("torch._export", "torch.export", "torch")]
    return (
        Distribution._validate_args,
        torch.is_grad_enabled(),
        hooks,
        levels,
        sys.stderr,
        list(warnings.filters),
        torch.get_rng_state(),
    )


@pytest.mark.parametrize(
    ("name", "draft", "fails"),
    [("mvae", False, False), ("masked_multimodal", False, True), ("mvae", True, False)],
)
def test_export_changes_no_global_state(name, draft, fails):
    model, batch, _ = zoo.make(name)
    model.eval()  # a non-default flag must survive too
    Distribution.set_default_validate_args(False)
    try:
        before = _global_state(model)
        if fails:
            with pytest.raises(Exception, match="data-dependent"):
                capture_export(model, batch, draft=draft)
        else:
            capture_export(model, batch, draft=draft)
        after = _global_state(model)
    finally:
        Distribution.set_default_validate_args(True)
    assert after[:-1] == before[:-1]
    assert torch.equal(after[-1], before[-1])


def test_export_fallback_when_fx_fails_keeps_state(capsys):
    model, batch, _ = zoo.make("sequence")
    before = _global_state(model)
    report = run_analysis(model, batch, regularizers=())
    assert report.capture == "export"
    after = _global_state(model)
    assert after[:-1] == before[:-1]
    captured = capsys.readouterr()
    assert captured.out == "" and "def forward" not in captured.err
