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

from collections.abc import Callable, Mapping, Sequence
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


@dataclass
class _PointRun:
    """The state of one branch point during one backward pass.

    The hooks on the autograd graph hold it, so it must not hold the graph's nodes (through the
    ``SurgeryPoint``): the graph and its hooks would keep each other alive after the step, out
    of reach of Python's garbage collector. ``index`` is the point's output slot of its node,
    ``parameter`` whether the node accumulates into a parameter.
    """

    index: int
    parameter: bool
    method: torch.nn.Module
    stats: PointStats
    losses: torch.Tensor | None
    stash: list[torch.Tensor | None] = field(default_factory=list)
    bypass: torch.Tensor | None = None
    # the zero-strided gradient sent to the point's node in place of the first stream's
    placeholder: torch.Tensor | None = None


class HookEngine:
    """Installs the hooks of :func:`plan_surgery`'s points on one step's autograd graph."""

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
    ) -> None:
        runs = [
            _PointRun(
                index=p.index,
                parameter=getattr(p.node, "variable", None) is not None,
                method=m,
                stats=s,
                losses=lo,
                stash=[None] * len(p.streams),
            )
            for p, m, s, lo in zip(points, methods, stats, stream_losses)
        ]
        post: dict[Any, list[tuple[int, _PointRun, int | None]]] = {}
        pre_split: dict[Any, list[tuple[list[int], _PointRun, dict[int, list[int]]]]] = {}
        targets: dict[Any, list[_PointRun]] = {}
        for run, point in zip(runs, points):
            targets.setdefault(point.node, []).append(run)
            for consumer, slots, stream in point.consumers:
                for slot in slots:
                    post.setdefault(consumer, []).append((slot, run, stream))
            for consumer, slots, groups in point.split_consumers:
                pre_split.setdefault(consumer, []).append((slots, run, groups))
                for slot in slots:
                    post.setdefault(consumer, []).append((slot, run, None))
        for consumer, entries in pre_split.items():
            consumer.register_prehook(_split_prehook(consumer, entries))
        for consumer, entries in post.items():
            consumer.register_hook(_consumer_hook(entries))
        for node, node_runs in targets.items():
            node.register_prehook(self._target_prehook(node_runs))

    def _target_prehook(self, runs: list[_PointRun]):
        def hook(grad_outputs):
            grads = list(grad_outputs)
            changed = False
            for run in runs:
                combined = self._combine(run)
                # this backward is over for the point: a later one (retain_graph) starts afresh
                bypass, placeholder = run.bypass, run.placeholder
                run.bypass = run.placeholder = None
                if combined is None and bypass is None:
                    continue
                current = grads[run.index]
                # current holds the regularizer streams (plus the placeholder; just the
                # placeholder when no regularizer reaches the point), bypass the
                # regularizer-only parts of split consumers: neither goes through the method
                total = None if current is placeholder else current
                for part in (combined, bypass):
                    if part is not None:
                        part = part.reshape(current.shape).to(current.dtype)
                        total = part if total is None else total + part
                grads[run.index] = total
                changed = True
            return tuple(grads) if changed else None

        return hook

    def _combine(self, run: _PointRun) -> torch.Tensor | None:
        stash, run.stash = run.stash, [None] * len(run.stash)
        return combine_streams(
            stash, run.method, run.stats, run.losses, self.rescale, self.gramian_hook
        )


def _consumer_hook(entries: list[tuple[int, _PointRun, int | None]]):
    def hook(grad_inputs, grad_outputs):
        grads = list(grad_inputs)
        for slot, run, stream in entries:
            grad = grads[slot]
            if grad is None:
                continue
            if stream is not None:
                previous = run.stash[stream]
                run.stash[stream] = grad if previous is None else previous + grad
            if run.placeholder is not None:
                grads[slot] = None
            else:
                # The engine must still see a defined gradient for the target; a zero-strided
                # placeholder costs no memory and is replaced in the target's pre-hook.
                grads[slot] = run.placeholder = grad.new_zeros(()).expand_as(grad)
        return tuple(grads)

    return hook


def _split_prehook(node, entries):
    """For multi-output consumers with outputs in different streams: one call per stream."""

    def hook(grad_outputs):
        for slots, run, groups in entries:
            for stream, outs in groups.items():
                masked = [g if i in outs else None for i, g in enumerate(grad_outputs)]
                if all(g is None for g in masked):
                    continue
                contribution = node(*masked)
                if isinstance(contribution, torch.Tensor):
                    contribution = (contribution,)
                for slot in slots:
                    grad = contribution[slot]
                    if grad is None:
                        continue
                    if stream < 0:
                        run.bypass = grad if run.bypass is None else run.bypass + grad
                    else:
                        prev = run.stash[stream]
                        run.stash[stream] = grad if prev is None else prev + grad
        return None

    return hook
