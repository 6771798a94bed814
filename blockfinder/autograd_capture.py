"""Ground-truth capture: run the model eagerly once and walk the autograd graph from every loss.

The autograd graph records exactly what backward will traverse, so it follows any Python control
flow, ``detach``, ``torch.no_grad`` regions and custom autograd functions. Each graph node of the
result is one *value*: ``(autograd node, output index)``, so the outputs of ``chunk``/``split``/
``unbind`` are reasoned about separately.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn

from blockfinder.context import ModuleStack, OpRecorder, distribution_validation_off
from blockfinder.losses import LossesFn, call_losses, default_losses

Value = tuple[Any, int]  # (autograd node, output index)


@dataclass
class AutogradWalk:
    """The part of the autograd graph reachable from some roots.

    ``uses[v]`` lists, for value ``v``, the autograd nodes that consume it (with multiplicity);
    ``values`` are in discovery order; ``nodes`` are the distinct autograd nodes seen.
    """

    values: list[Value]
    uses: dict[Value, list[Any]]
    nodes: list[Any]
    outputs: dict[Any, list[int]]  # autograd node -> its output indices that are used
    inputs: dict[Any, tuple]  # autograd node -> its next_functions (read once: each read allocates)


def walk(roots: Iterable[Value]) -> AutogradWalk:
    """Walk the autograd graph backwards from ``roots`` (iteratively: graphs can be deep)."""
    values: list[Value] = []
    seen_values: set[Value] = set()
    uses: dict[Value, list[Any]] = {}
    outputs: dict[Any, list[int]] = {}
    nodes: list[Any] = []
    inputs: dict[Any, tuple] = {}
    stack: list[Any] = []

    def add_value(value: Value) -> None:
        if value in seen_values:
            return
        seen_values.add(value)
        values.append(value)
        uses.setdefault(value, [])
        node = value[0]
        if node not in outputs:
            outputs[node] = []
            nodes.append(node)
            stack.append(node)
        outputs[node].append(value[1])

    for root in roots:
        if root[0] is not None:
            add_value(root)
    while stack:
        node = stack.pop()
        nexts = inputs[node] = node.next_functions
        for value in nexts:
            if value[0] is None:
                continue
            add_value(value)
            uses[value].append(node)
    return AutogradWalk(values=values, uses=uses, nodes=nodes, outputs=outputs, inputs=inputs)


def parameter_names(model: nn.Module) -> tuple[dict[int, str], dict[str, tuple[str, ...]]]:
    """Canonical parameter name by ``id`` (tied weights: the first name) and the aliases of each."""
    names: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        canonical = names.setdefault(id(param), name)
        if canonical != name:
            aliases.setdefault(canonical, []).append(name)
    return names, {k: tuple(v) for k, v in aliases.items()}


_BACKWARD_SUFFIX = re.compile(r"Backward\d*$")


def _short_name(node: Any) -> str:
    name = _BACKWARD_SUFFIX.sub("", type(node).__name__) or type(node).__name__
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _metadata(node: Any, index: int) -> tuple[tuple[int, ...] | None, str | None]:
    try:
        meta = node._input_metadata[index]
        return tuple(meta.shape), str(meta.dtype).replace("torch.", "")
    except (AttributeError, IndexError, RuntimeError):
        return None, None


@dataclass
class AutogradCapture:
    """The eager run's losses and the autograd dependency graph built from them."""

    graph: nx.DiGraph
    losses: dict[str, torch.Tensor]
    aliases: dict[str, tuple[str, ...]]
    value_of: dict[str, Value] = field(repr=False)


def build_graph(
    loss_tensors: Mapping[str, torch.Tensor],
    param_names: Mapping[int, str],
    origin: Mapping[Any, tuple[str, str]] | None = None,
) -> tuple[nx.DiGraph, dict[str, Value]]:
    """The dependency graph (contract in docs/architecture.md) of the losses' autograd graph."""
    origin = origin or {}
    roots = [(t.grad_fn, t.output_nr) for t in loss_tensors.values() if t.grad_fn is not None]
    walked = walk(roots)
    graph = nx.DiGraph()
    key: dict[Value, str] = {}
    counters: dict[str, int] = {}
    used_names: set[str] = set()
    # Forward creation order gives readable, deterministic names.
    ordered = sorted(
        walked.nodes, key=lambda n: n._sequence_nr() if hasattr(n, "_sequence_nr") else 0
    )
    for node in ordered:
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf tensor
            pname = param_names.get(id(variable))
            if pname is not None:
                base, attrs = pname, {"op": "parameter", "param": pname, "target": "parameter"}
                attrs["module"] = pname.rpartition(".")[0]
                attrs["grad"] = True
            else:
                base, attrs = "input", {"op": "input", "target": "input", "module": ""}
                attrs["grad"] = False
            attrs["shape"] = tuple(variable.shape)
            attrs["dtype"] = str(variable.dtype).replace("torch.", "")
            name = _unique(base, counters, used_names)
            key[(node, 0)] = name
            graph.add_node(name, **attrs)
            continue
        func, module = origin.get(node, (None, ""))
        base = func or _short_name(node)
        stem = _unique(base, counters, used_names)
        indices = sorted(walked.outputs[node])
        multi = len(getattr(node, "_input_metadata", ())) > 1
        for index in indices:
            name = f"{stem}.{index}" if multi else stem
            used_names.add(name)
            key[(node, index)] = name
            shape, dtype = _metadata(node, index)
            graph.add_node(
                name,
                op="call",
                target=func or type(node).__name__,
                autograd=type(node).__name__,
                module=module,
                shape=shape,
                dtype=dtype,
            )
    for node in walked.nodes:
        consumers = [key[(node, i)] for i in walked.outputs[node] if (node, i) in key]
        for next_node, index in node.next_functions:
            if next_node is None:
                continue
            producer = key[(next_node, index)]
            for consumer in consumers:
                if graph.has_edge(producer, consumer):
                    graph.edges[producer, consumer]["count"] += 1
                else:
                    graph.add_edge(producer, consumer, grad=True, count=1)
    _inherit_modules(graph)
    for name, tensor in loss_tensors.items():
        loss_node = _unique(f"loss_{name}", counters, used_names)
        graph.add_node(
            loss_node, op="loss", loss=name, target="loss", module="", shape=(), grad=False
        )
        if tensor.grad_fn is not None:
            graph.add_edge(key[(tensor.grad_fn, tensor.output_nr)], loss_node, grad=True, count=1)
    return graph, {v: k for k, v in key.items()}


def _inherit_modules(graph: nx.DiGraph) -> None:
    """Ops recorded by no torch function (e.g. the transpose inside ``linear``) take their user's
    module, so that module-level views group them with the layer they belong to."""
    for node in reversed(list(nx.topological_sort(graph))):
        attrs = graph.nodes[node]
        if attrs.get("op") != "call" or attrs.get("target") != attrs.get("autograd"):
            continue
        for user in graph.succ[node]:
            module = graph.nodes[user].get("module")
            if module:
                attrs["module"] = module
                break


def _unique(base: str, counters: dict[str, int], used: set[str]) -> str:
    count = counters.get(base, 0)
    name = base if count == 0 else f"{base}_{count}"
    while name in used:
        count += 1
        name = f"{base}_{count}"
    counters[base] = count + 1
    used.add(name)
    return name


def capture_autograd(
    model: nn.Module, batch: Any, losses_fn: LossesFn | None = None
) -> AutogradCapture:
    """Run ``losses_fn(model, batch)`` eagerly, recording modules, and build the autograd graph."""
    losses_fn = losses_fn or default_losses
    modules = ModuleStack(model)
    recorder = OpRecorder(modules)
    with distribution_validation_off(), torch.enable_grad(), modules, recorder:
        losses = call_losses(losses_fn, model, batch)
    names, aliases = parameter_names(model)
    graph, value_of = build_graph(losses, names, recorder.origin)
    return AutogradCapture(graph=graph, losses=losses, aliases=aliases, value_of=value_of)
