"""Reach sets, shared nodes, impartiality blocks and branch points on a dependency graph.

Works on any graph that follows the contract in ``docs/architecture.md`` (autograd, fx or export
captures alike). Reach sets are int bitsets over the loss order, computed in one reverse-topological
pass; only edges with ``grad=True`` carry reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx

from blockfinder.report import BranchPoint, ImpartialityBlock


def names_of(bits: int, losses: Sequence[str]) -> frozenset[str]:
    """The loss names of a reach bitset."""
    return frozenset(name for i, name in enumerate(losses) if bits >> i & 1)


def _grad_successors(graph: nx.DiGraph, node: str):
    for user, attrs in graph.succ[node].items():
        if attrs.get("grad", True):
            yield user


def reach_bits(graph: nx.DiGraph, losses: Sequence[str]) -> dict[str, int]:
    """Reach bitset of every node through gradient edges: one pass over the graph in reverse
    topological order (Kahn)."""
    index = {name: i for i, name in enumerate(losses)}
    nodes, succ, pred = graph._node, graph._succ, graph._pred
    remaining = {node: len(users) for node, users in succ.items()}
    ready = [node for node, count in remaining.items() if count == 0]
    reach: dict[str, int] = {}
    while ready:
        node = ready.pop()
        attrs = nodes[node]
        if attrs.get("op") == "loss":
            bits = 1 << index[attrs["loss"]] if attrs.get("loss") in index else 0
        else:
            bits = 0
            for user, edge in succ[node].items():
                if edge.get("grad", True):
                    bits |= reach[user]
        reach[node] = bits
        for producer in pred[node]:
            remaining[producer] -= 1
            if remaining[producer] == 0:
                ready.append(producer)
    if len(reach) != len(nodes):
        raise ValueError("the dependency graph has a cycle")
    return reach


def compute_reach(graph: nx.DiGraph, losses: Sequence[str]) -> None:
    """Set ``reach`` (bitset of losses reached via gradient edges) and ``grad`` on every node."""
    order = list(nx.topological_sort(graph))
    for node in order:  # forward: does the value depend on a trainable parameter?
        attrs = graph.nodes[node]
        if attrs.get("op") == "parameter":
            attrs["grad"] = True
        elif attrs.get("op") in ("input", "buffer", "loss"):
            attrs["grad"] = attrs.get("op") == "loss" and any(
                graph.nodes[p].get("grad") for p, e in graph.pred[node].items() if e.get("grad")
            )
        else:
            attrs["grad"] = any(
                graph.nodes[p].get("grad", False)
                for p, e in graph.pred[node].items()
                if e.get("grad", True)
            )
    for node, bits in reach_bits(graph, losses).items():
        graph.nodes[node]["reach"] = bits


def _stream_users(graph: nx.DiGraph, node: str) -> list[str]:
    """Differentiable users of ``node``, looking through containers to their element users."""
    users: list[str] = []
    stack = list(_grad_successors(graph, node))
    seen: set[str] = set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if graph.nodes[user].get("container"):
            stack.extend(_grad_successors(graph, user))
        else:
            users.append(user)
    return users


@dataclass
class Analysis:
    """Blocks and branch points of one dependency graph."""

    blocks: list[ImpartialityBlock]
    branch_points: list[BranchPoint]


def _popcount(bits: int) -> int:
    return bin(bits).count("1")


def _stream_key(bits: int) -> tuple[int, int]:
    low = (bits & -bits).bit_length()
    return (low, bits)


def analyze_graph(graph: nx.DiGraph, losses: Sequence[str]) -> Analysis:
    """Mark shared nodes, group them into blocks and find the branch points (with their streams)."""
    compute_reach(graph, losses)
    shared = [
        n
        for n, a in graph.nodes(data=True)
        if a.get("grad")
        and a.get("op") not in ("loss", "input", "buffer")
        and _popcount(a.get("reach", 0)) >= 2
    ]
    shared_set = set(shared)
    for node, attrs in graph.nodes(data=True):
        attrs["shared"] = node in shared_set
        attrs["block"] = None
    sub = nx.Graph()
    sub.add_nodes_from(shared)
    for u, v, e in graph.edges(data=True):
        if e.get("grad", True) and u in shared_set and v in shared_set:
            sub.add_edge(u, v)
    position = {n: i for i, n in enumerate(graph.nodes)}
    components = sorted(
        (sorted(c, key=position.__getitem__) for c in nx.connected_components(sub)),
        key=lambda c: position[c[0]],
    )
    blocks: list[ImpartialityBlock] = []
    for block_id, members in enumerate(components):
        reach = 0
        params: list[str] = []
        for node in members:
            attrs = graph.nodes[node]
            attrs["block"] = block_id
            reach |= attrs["reach"]
            if attrs.get("op") == "parameter":
                params.append(attrs["param"])
        blocks.append(
            ImpartialityBlock(
                id=block_id,
                losses=names_of(reach, losses),
                nodes=tuple(members),
                parameters=tuple(params),
            )
        )
    branch_points: list[BranchPoint] = []
    for block in blocks:
        for node in block.nodes:
            attrs = graph.nodes[node]
            if attrs.get("container"):
                continue
            groups: dict[int, list[str]] = {}
            for user in _stream_users(graph, node):
                bits = graph.nodes[user].get("reach", 0)
                if bits:
                    groups.setdefault(bits, []).append(user)
            if len(groups) < 2:
                continue
            keys = sorted(groups, key=_stream_key)
            kind = "parameter" if attrs.get("op") == "parameter" else "activation"
            where = attrs["param"] if kind == "parameter" else (attrs.get("module") or "<top>")
            shape = attrs.get("shape")
            branch_points.append(
                BranchPoint(
                    id=len(branch_points),
                    block=block.id,
                    kind=kind,
                    where=where,
                    node=node,
                    shape=tuple(shape) if shape is not None else None,
                    streams=tuple(names_of(k, losses) for k in keys),
                    users=tuple(tuple(groups[k]) for k in keys),
                )
            )
    for bp in branch_points:
        graph.nodes[bp.node]["branch_point"] = bp.id
    return Analysis(blocks=blocks, branch_points=branch_points)
