"""Hook engine: gradient surgery on the autograd graph of each step, in one backward pass.

After the forward pass, the autograd graph of the losses is walked (milliseconds) and the branch
points are found on it with the same reach-set rule as :mod:`blockfinder.blocks`. For a branch value
``v`` (output ``i`` of autograd node ``N``) every consumer of ``v`` gets a post-hook that takes its
contribution to ``v``'s gradient out of the engine's accumulation and into the stream it belongs to;
a pre-hook on ``N`` runs once all consumers are done, aggregates the streams and hands ``N`` the
result. Regularizer-only streams are never taken out: they reach ``N`` unchanged. This works for any
model that runs eagerly (Python control flow, ``detach``, ``no_grad``, custom autograd functions)
and imposes nothing on the user's tensors.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from blockfinder.autograd_capture import walk
from impartial_train.engine.combine import combine_streams
from impartial_train.engine.stats import PointStats

MethodFactory = Callable[[], torch.nn.Module]


@dataclass
class SurgeryPoint:
    """One branch point on this step's autograd graph.

    ``consumers``: ``(node, slots, stream)`` for consumers whose outputs all lie in one stream;
    ``split_consumers``: multi-output consumers whose outputs lie in different streams (``chunk``,
    ``split``, ``unbind``): ``(node, slots, {stream: output indices})``; stream ``-1`` is a
    regularizer-only group whose contribution bypasses the surgery.
    """

    node: Any
    index: int
    streams: list[int]
    consumers: list[tuple[Any, list[int], int]]
    split_consumers: list[tuple[Any, list[int], dict[int, list[int]]]]


def stream_losses(
    losses: Mapping[str, torch.Tensor], names: Sequence[str], masks: Sequence[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """Per branch point, the (S,) losses of its streams: ``masks[i]`` (streams x losses, 0/1) is
    None where the point's method does not read them (``uses_losses``), and nothing is computed
    when no method does (this runs every step)."""
    if all(mask is None for mask in masks):
        return [None] * len(masks)
    values = torch.stack([losses[n].detach().reshape(()) for n in names])
    return [None if m is None else m.to(values.device, values.dtype) @ values for m in masks]


def point_label(point: SurgeryPoint, origin: Mapping[Any, tuple[str, str]]) -> str:
    """``function@module`` of the point's value, from the op origins recorded in the forward."""
    func, module = origin.get(point.node, (None, ""))
    return f"{func or type(point.node).__name__}@{module or '<top>'}"


def point_keys(points: Sequence[SurgeryPoint], names: Sequence[str]) -> list[tuple]:
    """A key per point that is stable across steps of one structure: (autograd node type, output
    index, streams as loss names, rank among points with the same first three)."""
    ranks: dict[tuple, int] = {}
    keys = []
    for point in points:
        streams = tuple(tuple(n for i, n in enumerate(names) if b >> i & 1) for b in point.streams)
        base = (type(point.node).__name__, point.index, streams)
        rank = ranks.get(base, 0)
        ranks[base] = rank + 1
        keys.append((*base, rank))
    return keys


def plan_surgery(
    loss_tensors: Mapping[str, torch.Tensor],
    tasks: Sequence[str],
    trainable: set[int],
    reach: dict[tuple[Any, int], int] | None = None,
) -> list[SurgeryPoint]:
    """Find the branch points of this step's autograd graph where >= 2 task streams meet.

    ``trainable``: ids of the trainable parameters (leaves that are not parameters are inputs).
    Losses not in ``tasks`` are regularizers: their streams bypass the surgery. When ``reach`` is
    given it receives the reach bitset (over the losses' order) of every autograd value.
    """
    names = list(loss_tensors)
    task_mask = 0
    root_bits: dict[tuple[Any, int], int] = {}
    for bit, name in enumerate(names):
        tensor = loss_tensors[name]
        if name in tasks:
            task_mask |= 1 << bit
        if tensor.grad_fn is not None:
            value = (tensor.grad_fn, tensor.output_nr)
            root_bits[value] = root_bits.get(value, 0) | 1 << bit
    walked = walk(root_bits)
    # Reverse topological order over autograd nodes (Kahn on consumer counts).
    inputs = walked.inputs
    pending: dict[Any, int] = {node: 0 for node in walked.nodes}
    for node in walked.nodes:
        for next_node, _ in inputs[node]:
            if next_node is not None:
                pending[next_node] += 1
    ready = [node for node, count in pending.items() if count == 0]
    order: list[Any] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for next_node, _ in inputs[node]:
            if next_node is not None:
                pending[next_node] -= 1
                if pending[next_node] == 0:
                    ready.append(next_node)
    value_reach: dict[tuple[Any, int], int] = {}
    node_reach: dict[Any, int] = {}
    for node in order:
        bits = 0
        for index in walked.outputs[node]:
            value = (node, index)
            vbits = root_bits.get(value, 0)
            for consumer in walked.uses[value]:
                vbits |= node_reach[consumer]
            value_reach[value] = vbits
            bits |= vbits
        node_reach[node] = bits
    trainable_dep: dict[Any, bool] = {}
    for node in reversed(order):
        variable = getattr(node, "variable", None)
        if variable is not None:
            trainable_dep[node] = id(variable) in trainable
        else:
            trainable_dep[node] = any(
                trainable_dep.get(n, False) for n, _ in inputs[node] if n is not None
            )
    points: list[SurgeryPoint] = []
    for node in reversed(order):
        if not trainable_dep[node]:
            continue
        for index in sorted(walked.outputs[node]):
            value = (node, index)
            if (value_reach[value] & task_mask).bit_count() < 2:
                continue
            users = walked.uses[value]
            if len(users) == 1 and len(walked.outputs[users[0]]) == 1:
                continue
            point = _plan_point(value, walked, value_reach, node_reach, task_mask)
            if point is not None:
                points.append(point)
    if reach is not None:
        reach.update(value_reach)
    return points


def _plan_point(value, walked, value_reach, node_reach, task_mask) -> SurgeryPoint | None:
    node, index = value
    groups: dict[int, list[tuple[Any, list[int], list[int] | None]]] = {}
    seen: set[Any] = set()
    for consumer in walked.uses[value]:
        if consumer in seen:
            continue
        seen.add(consumer)
        slots = [s for s, nf in enumerate(walked.inputs[consumer]) if nf == value]
        outputs = walked.outputs[consumer]
        by_reach: dict[int, list[int]] = {}
        for out in outputs:
            by_reach.setdefault(value_reach[(consumer, out)], []).append(out)
        by_reach.pop(0, None)
        if len(by_reach) <= 1:
            groups.setdefault(node_reach[consumer], []).append((consumer, slots, None))
        else:
            for bits, outs in by_reach.items():
                groups.setdefault(bits, []).append((consumer, slots, outs))
    groups.pop(0, None)
    task_groups = sorted(
        (bits for bits in groups if bits & task_mask), key=lambda b: ((b & -b).bit_length(), b)
    )
    if len(task_groups) < 2:
        return None
    stream_of = {bits: i for i, bits in enumerate(task_groups)}
    consumers: list[tuple[Any, list[int], int]] = []
    split: dict[Any, tuple[list[int], dict[int, list[int]]]] = {}
    for bits, members in groups.items():
        stream = stream_of.get(bits, -1)
        for consumer, slots, outs in members:
            if outs is None:
                if stream >= 0:
                    consumers.append((consumer, slots, stream))
            else:
                split.setdefault(consumer, (slots, {}))[1].setdefault(stream, []).extend(outs)
    return SurgeryPoint(
        node=node,
        index=index,
        streams=task_groups,
        consumers=consumers,
        split_consumers=[(c, s, g) for c, (s, g) in split.items()],
    )


# How the hooks of one installation treat a backward pass (see ``Installed.mode``).
ON, IDENTITY, OFF = "on", "identity", "off"


class _Switch:
    """The mode of one point's hooks: ``on`` (surgery), ``identity`` (the streams are summed
    through the same machinery: the self-check) or ``off`` (the hooks pass every gradient
    through untouched: plain backward)."""

    __slots__ = ("mode",)

    def __init__(self) -> None:
        self.mode = ON


class _Consumers:
    """The autograd consumers each point intercepts, for counting how many will run in a backward.

    Held only by the losses' own autograd nodes (their ``metadata``) and weakly by the hooks:
    consumers have no edge back to the losses, so the step's graph and this object are freed
    together by reference counting (a strong reference from a hook would form a cycle through
    C++ edges that Python's garbage collector cannot see).
    """

    def __init__(self, nodes: list[list[Any]]) -> None:
        self.nodes = nodes


@dataclass
class _PointRun:
    """The state of one branch point during one backward pass.

    The hooks on the autograd graph hold it, so it must not hold the graph's nodes (see
    :class:`_Consumers`). ``index`` is the point's output slot of its node, ``parameter`` whether
    the node accumulates into a parameter, ``position`` the point's entry in ``_Consumers``.
    """

    index: int
    parameter: bool
    position: int
    method: torch.nn.Module
    stats: PointStats
    losses: torch.Tensor | None
    switch: _Switch
    consumers: Callable[[], _Consumers | None]
    stash: list[torch.Tensor | None] = field(default_factory=list)
    bypass: torch.Tensor | None = None
    # the backward pass (autograd graph task) in progress and how many of the point's
    # intercepted consumers have still to run in it (None: no countdown, gradients pass as they are)
    task: int = -2
    remaining: int | None = None
    like: torch.Tensor | None = None  # a gradient of the value, for shape and dtype

    def begin(self) -> bool:
        """Called by every hook of the point: starts the countdown at the first hook of a new
        backward pass. False: this backward passes the point's gradients through untouched."""
        if self.switch.mode == OFF:
            return False
        task = torch._C._current_graph_task_id()
        if task != self.task:
            self.task = task
            self.stash = [None] * len(self.stash)
            self.bypass = self.like = None
            holder = self.consumers()
            # a backward from something other than the losses, after they were freed: the
            # intercepted consumers cannot be counted, so nothing is intercepted
            self.remaining = (
                None
                if holder is None
                else sum(map(torch._C._will_engine_execute_node, holder.nodes[self.position]))
            )
        return self.remaining is not None

    def add(self, stream: int, grad: torch.Tensor) -> None:
        if stream < 0:
            self.bypass = grad if self.bypass is None else self.bypass + grad
        else:
            previous = self.stash[stream]
            self.stash[stream] = grad if previous is None else previous + grad
        if self.like is None:
            self.like = grad


class Installed:
    """The hooks of one step. ``set_mode`` switches them between surgery, the identity
    combination and plain backward (the self-check runs the same graph in all three), for every
    point or (``only``) for one point while the others pass gradients through."""

    def __init__(self, runs: list[_PointRun]) -> None:
        self.runs = runs

    def set_mode(self, mode: str, only: int | None = None) -> None:
        for position, run in enumerate(self.runs):
            run.switch.mode = mode if only is None or position == only else OFF


class HookEngine:
    """Installs the hooks of :func:`plan_surgery`'s points on one step's autograd graph.

    Each intercepted consumer of a branch value moves its contribution into its stream's stash
    and hands the value's node nothing, except the *last* of them to run in the backward pass
    (counted with the engine's own bookkeeping of which nodes will execute): it hands the
    combined gradient. So the value's node receives the combined gradient plus the regularizers'
    contributions, which pass untouched, before anything else sees the value's gradient: tensor
    hooks and ``retain_grad`` on the value and module backward hooks on the module that produced
    it see the combined total, as the semantics of surgery ask.
    """

    def __init__(self, rescale: bool = True, gramian_hook: Callable | None = None) -> None:
        self.rescale = rescale
        # gramian_hook(gramian) -> gramian: e.g. an all-reduce under data parallelism
        self.gramian_hook = gramian_hook

    def install(
        self,
        points: Sequence[SurgeryPoint],
        methods: Sequence[torch.nn.Module],
        stats: Sequence[PointStats],
        stream_losses: Sequence[torch.Tensor | None],
        roots: Iterable[torch.Tensor],
    ) -> Installed:
        """Install the hooks; ``roots`` are the loss tensors (their autograd nodes keep the
        bookkeeping of the hooks alive exactly as long as the graph)."""
        consumer_nodes: list[list[Any]] = []
        holder = _Consumers(consumer_nodes)
        reference = weakref.ref(holder)
        runs = []
        for position, (p, m, s, lo) in enumerate(zip(points, methods, stats, stream_losses)):
            nodes = list(dict.fromkeys([c for c, _, _ in p.consumers + p.split_consumers]))
            consumer_nodes.append(nodes)
            runs.append(
                _PointRun(
                    index=p.index,
                    parameter=getattr(p.node, "variable", None) is not None,
                    position=position,
                    method=m,
                    stats=s,
                    losses=lo,
                    switch=_Switch(),
                    consumers=reference,
                    stash=[None] * len(p.streams),
                )
            )
        for root in roots:
            node = root.grad_fn
            if node is not None:
                node.metadata["impartial_consumers"] = holder
        post: dict[Any, list[tuple[_PointRun, list[int], int | None]]] = {}
        pre_split: dict[Any, list[tuple[list[int], _PointRun, dict[int, list[int]]]]] = {}
        for run, point in zip(runs, points):
            for consumer, slots, stream in point.consumers:
                post.setdefault(consumer, []).append((run, slots, stream))
            for consumer, slots, groups in point.split_consumers:
                pre_split.setdefault(consumer, []).append((slots, run, groups))
                post.setdefault(consumer, []).append((run, slots, None))
        for consumer, entries in pre_split.items():
            consumer.register_prehook(_split_prehook(consumer, entries))
        for consumer, entries in post.items():
            consumer.register_hook(self._consumer_hook(entries))
        return Installed(runs)

    def _consumer_hook(self, entries: list[tuple[_PointRun, list[int], int | None]]):
        def hook(grad_inputs, grad_outputs):
            grads = list(grad_inputs)
            changed = False
            for run, slots, stream in entries:
                if not run.begin():
                    continue
                changed = True
                for slot in slots:
                    grad = grads[slot]
                    if grad is not None:
                        if stream is not None:  # (split consumers: added in their pre-hook)
                            run.add(stream, grad)
                        elif run.like is None:
                            run.like = grad
                        grads[slot] = None
                run.remaining -= 1
                if run.remaining == 0:
                    grads[slots[0]] = self._finish(run)
            return tuple(grads) if changed else None

        return hook

    def _finish(self, run: _PointRun) -> torch.Tensor | None:
        """The point's gradient once every intercepted consumer has run: the combined streams
        plus the regularizer-only parts of split consumers."""
        if run.switch.mode == IDENTITY:
            parts = [g for g in run.stash if g is not None]
            combined = torch.stack(parts).sum(0) if parts else None
            run.stash = [None] * len(run.stash)
        else:
            combined = self._combine(run)
        like, bypass = run.like, run.bypass
        run.like = run.bypass = None
        total = None
        for part in (combined, bypass):
            if part is not None:
                part = part.reshape(like.shape).to(like.dtype)
                total = part if total is None else total + part
        return total

    def _combine(self, run: _PointRun) -> torch.Tensor | None:
        stash, run.stash = run.stash, [None] * len(run.stash)
        return combine_streams(
            stash, run.method, run.stats, run.losses, self.rescale, self.gramian_hook
        )


def _split_prehook(node, entries):
    """For multi-output consumers with outputs in different streams: one call per stream."""

    def hook(grad_outputs):
        for slots, run, groups in entries:
            if not run.begin():
                continue
            for stream, outs in groups.items():
                masked = [g if i in outs else None for i, g in enumerate(grad_outputs)]
                if all(g is None for g in masked):
                    continue
                contribution = node(*masked)
                if isinstance(contribution, torch.Tensor):
                    contribution = (contribution,)
                for slot in slots:
                    grad = contribution[slot]
                    if grad is not None:
                        run.add(stream, grad)
        return None

    return hook
