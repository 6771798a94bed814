"""Block analysis on the graphs of every capture: the rules of docs/architecture.md hold whatever
graph the analysis runs on (non-differentiable users make no streams, inputs and containers are
never branch points, blocks are maximal connected shared sets)."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
import zoo

from blockfinder.analyze import run_analysis

CAPTURES = [("fx",), ("export",), ()]
IDS = ["fx", "export", "autograd"]


@pytest.mark.parametrize("captures", CAPTURES, ids=IDS)
def test_non_differentiable_users_make_no_streams(captures):
    torch.manual_seed(0)
    model, x = zoo.NonDiffUsers(), torch.randn(8, 5)
    report = run_analysis(model, x, regularizers=(), captures=captures)
    assert report.capture == (captures[0] if captures else "autograd")
    assert report.branch_points == [] and report.blocks == []
    assert report.parameters == zoo.autograd_reach(model, x)


@pytest.mark.parametrize("captures", CAPTURES, ids=IDS)
@pytest.mark.parametrize("name", ["shared_decoder", "heterogeneous_vae", "tuple_ops"])
def test_inputs_and_containers_are_never_branch_points(name, captures):
    model, batch, case = zoo.make(name)
    report = run_analysis(model, batch, case.losses, case.regularizers, captures=captures)
    graph = report.graph
    for bp in report.branch_points:
        attrs = graph.nodes[bp.node]
        assert attrs["op"] in ("call", "parameter")
        assert not attrs.get("container")
        assert attrs["shared"] and attrs["grad"] and attrs["block"] == bp.block
        assert len(bp.streams) >= 2 and len(set(bp.streams)) == len(bp.streams)
    inputs = [n for n, a in graph.nodes(data=True) if a["op"] == "input"]
    assert inputs or not captures  # the autograd graph has no inputs that need no grad
    assert not any(graph.nodes[n]["shared"] for n in inputs)


@pytest.mark.parametrize("captures", CAPTURES, ids=IDS)
def test_blocks_are_maximal_connected_shared_sets(captures):
    model, batch, _ = zoo.make("heterogeneous_vae")
    report = run_analysis(model, batch, captures=captures)
    graph = report.graph
    (block,) = report.blocks
    assert block.losses == frozenset(report.losses)
    assert {"trunk.0.weight", "encoder.mu.weight"} <= set(block.parameters)
    assert not any(p.startswith("heads.") for p in block.parameters)
    shared = [n for n, a in graph.nodes(data=True) if a["shared"]]
    assert set(shared) == set(block.nodes)
    undirected = graph.subgraph(shared).to_undirected()
    assert nx.is_connected(undirected)
    assert {bp.block for bp in report.branch_points} == {block.id}


def test_regularizer_streams_are_marked_not_dropped():
    model, batch, _ = zoo.make("mvae")
    report = run_analysis(model, batch, regularizers=("kl",), captures=("fx",))
    assert report.tasks == ("image", "text")
    kl_streams = [bp for bp in report.branch_points if frozenset({"kl"}) in bp.streams]
    assert len(kl_streams) == 2
    assert report.shared_parameters()["encoders.image.mu.weight"] == frozenset(
        {"image", "text", "kl"}
    )


def test_analysis_is_deterministic():
    first = run_analysis(*zoo.make("mopoe")[:2], captures=("fx",))
    second = run_analysis(*zoo.make("mopoe")[:2], captures=("fx",))
    assert [bp.to_json() for bp in first.branch_points] == [
        bp.to_json() for bp in second.branch_points
    ]
    assert [b.to_json() for b in first.blocks] == [b.to_json() for b in second.blocks]
