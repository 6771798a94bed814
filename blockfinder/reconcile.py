"""Reconcile a structural (fx/export) graph with the autograd ground truth.

fx and export graphs record data flow, not gradient flow. The captures already cut the edges they
can see carry no gradient (``detach``, comparisons, shape queries, integer values, ``no_grad``
regions, ``sample()``); this module handles what they could not see:

1. nodes whose replayed value does not require grad (an unknown non-differentiable op, a
   ``mark_non_differentiable`` output, a ``no_grad`` region inside a leaf module): their incoming
   edges carry no gradient;
2. then the parameter -> losses sets of the structural graph are compared with the autograd
   truth. Where the structural graph claims a parameter reaches a loss that autograd says it does
   not, each gradient edge on the paths responsible is checked against the replay's autograd graph
   (is the producer's autograd value an input of the consumer's, within the consumer's own ops?)
   and cut when it is not; cuts that would make any parameter reach fewer losses than autograd
   says are undone;
3. what remains different is recorded as one line per parameter; the report's ``parameters``
   always come from autograd.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from blockfinder.blocks import names_of, reach_bits
from blockfinder.fx_capture import StructuralCapture

_WALK_LIMIT = 200_000


@dataclass
class Reconciliation:
    """What reconciliation changed in the structural graph and what still differs."""

    cut: list[tuple[str, str]] = field(default_factory=list)  # edges set to grad=False
    differences: list[str] = field(default_factory=list)


def structural_parameters(graph: nx.DiGraph, losses: Sequence[str]) -> dict[str, frozenset[str]]:
    """Parameter -> losses reached through gradient edges."""
    reach = reach_bits(graph, losses)
    return {
        a["param"]: names_of(reach[n], losses)
        for n, a in graph.nodes(data=True)
        if a.get("op") == "parameter"
    }


def _cut(graph: nx.DiGraph, u: str, v: str, why: str, record: Reconciliation) -> None:
    edge = graph.edges[u, v]
    if edge.get("grad", True):
        edge["grad"] = False
        edge["cut"] = why
        record.cut.append((u, v))


def _autograd_value(
    capture: StructuralCapture, node: str, graph: nx.DiGraph
) -> tuple[Any, int] | None:
    attrs = graph.nodes[node]
    if attrs.get("op") == "parameter":
        tensor = capture.param_tensors.get(attrs.get("param"))
        if tensor is None or not tensor.requires_grad:
            return None
        edge = torch.autograd.graph.get_gradient_edge(tensor)
        return (edge.node, edge.output_nr)
    fact = (capture.facts or {}).get(node)
    return None if fact is None else fact.value


def _edge_in_autograd(
    start: tuple[Any, int], target: tuple[Any, int], stops: set[tuple[Any, int]]
) -> bool | None:
    """Is ``target`` reached walking the autograd graph back from ``start`` without passing
    through another input value (``stops``)? ``None`` when the walk is too long to tell."""
    if start == target:
        return True
    seen: set[Any] = set()
    stack = [start[0]]
    steps = 0
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        steps += 1
        if steps > _WALK_LIMIT:
            return None
        for next_node, index in node.next_functions:
            if next_node is None:
                continue
            value = (next_node, index)
            if value == target:
                return True
            if value in stops:
                continue
            stack.append(next_node)
    return False


def reconcile(
    capture: StructuralCapture,
    truth: Mapping[str, frozenset[str]],
    losses: Sequence[str],
) -> Reconciliation:
    """Cut the structural graph's gradient edges that autograd shows carry no gradient; report
    every parameter whose loss set still differs from ``truth`` (trainable parameter -> losses)."""
    graph = capture.graph
    record = Reconciliation()
    facts = capture.facts or {}
    # 1. values the replay computed without grad carry none
    for node, fact in facts.items():
        if fact.kind == "tensor" and fact.requires_grad is False and node in graph:
            for pred in list(graph.pred[node]):
                _cut(graph, pred, node, "no grad in replay", record)
    found = structural_parameters(graph, losses)
    # 2. edges on the paths of parameters that reach too much
    extra = {
        p: found[p] - truth.get(p, frozenset())
        for p in found
        if p in truth and found[p] - truth.get(p, frozenset())
    }
    if extra and capture.facts is not None:
        _cut_unconfirmed(capture, graph, extra, truth, losses, record)
        found = structural_parameters(graph, losses)
    # 3. what still differs
    label = capture.capture
    for param in truth:
        mine = found.get(param)
        if mine is None:
            if truth[param]:
                record.differences.append(
                    f"parameter '{param}': not in the {label} graph; autograd reaches "
                    f"{_fmt(truth[param])} (report uses autograd)"
                )
            continue
        if mine != truth[param]:
            record.differences.append(
                f"parameter '{param}': {label} graph reaches {_fmt(mine)}, autograd reaches "
                f"{_fmt(truth[param])} (report uses autograd)"
            )
    return record


def _cut_unconfirmed(
    capture: StructuralCapture,
    graph: nx.DiGraph,
    extra: Mapping[str, frozenset[str]],
    truth: Mapping[str, frozenset[str]],
    losses: Sequence[str],
    record: Reconciliation,
) -> None:
    param_nodes = {a["param"]: n for n, a in graph.nodes(data=True) if a.get("op") == "parameter"}
    loss_nodes = {a["loss"]: n for n, a in graph.nodes(data=True) if a.get("op") == "loss"}
    grad_graph = nx.subgraph_view(graph, filter_edge=lambda u, v: graph.edges[u, v].get("grad"))
    candidates: set[tuple[str, str]] = set()
    for param, wrong in extra.items():
        down = nx.descendants(grad_graph, param_nodes[param]) | {param_nodes[param]}
        up: set[str] = set()
        for loss in wrong:
            if loss in loss_nodes:
                up |= nx.ancestors(grad_graph, loss_nodes[loss]) | {loss_nodes[loss]}
        on_path = down & up
        for u in on_path:
            for v in grad_graph.succ[u]:
                if v in on_path:
                    candidates.add((u, v))
    values: dict[str, tuple[Any, int] | None] = {}

    def value(node: str) -> tuple[Any, int] | None:
        if node not in values:
            values[node] = _autograd_value(capture, node, graph)
        return values[node]

    trial = Reconciliation()
    for u, v in sorted(candidates):
        if graph.nodes[v].get("op") == "loss":
            continue
        target, start = value(u), value(v)
        if target is None or start is None:
            continue
        stops = {value(w) for w in graph.pred[v] if w != u}
        stops.discard(None)
        stops.discard(target)
        if _edge_in_autograd(start, target, stops) is False:  # type: ignore[arg-type]
            _cut(graph, u, v, "not in the replay's autograd graph", trial)
    if not trial.cut:
        return
    after = structural_parameters(graph, losses)
    if any(not truth[p] <= after.get(p, frozenset()) for p in truth if p in after):
        for u, v in trial.cut:  # a cut removed true reach: the check was wrong, undo all
            graph.edges[u, v]["grad"] = True
            graph.edges[u, v].pop("cut", None)
        return
    record.cut.extend(trial.cut)


def _fmt(names: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(names)) + "}" if names else "no loss"
