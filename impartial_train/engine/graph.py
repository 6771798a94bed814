"""Graph engine: gradient surgery compiled into a rewritten ``torch.fx`` program.

Once per input structure the losses callable is traced with a :class:`GraphTracer` (the
:class:`~blockfinder.fx_capture.BlockTracer` with no leaf module, so that every parameter is a
``get_attr`` node), the traced program is replayed once on the batch (that replay is the step's
forward), and :func:`~impartial_train.engine.hooks.plan_surgery` finds the branch points on the
replay's autograd graph, exactly as the hook engine does. Each branch point is mapped back to the fx
node that produced its value and the node's users are split into the point's streams: every stream
gets its own alias of the value from one :class:`Branch` autograd function, whose backward receives
the S stream gradients and aggregates them with ``combine_streams`` (shared with the hook engine).
Users that are containers or distributions carrying the value (``chunk``, ``Normal(mu, sigma)``)
are cloned once per stream. Regularizer-only and non-differentiable users keep the original value:
their gradient bypasses the surgery.

Later steps with the same input structure run the rewritten program (generated Python code, no
autograd-graph walk, no hooks). The mapping is checked against the plan node by node (every autograd
consumer of a branch value must be created by a user assigned to the consumer's stream); where it
cannot be made exact, the graph engine refuses the input structure and says why (``engine="auto"``
then uses the hook engine).
"""

from __future__ import annotations

import operator
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.distributions import Distribution

from blockfinder.context import ModuleStack, OpRecorder, distribution_validation_off
from blockfinder.errors import BlockfinderError
from blockfinder.fx_capture import (
    BlockTracer,
    Harness,
    Replay,
    flatten_batch,
    op_name,
    opaque_names,
)
from blockfinder.losses import LossesFn, check_losses
from impartial_train.engine.combine import combine_streams
from impartial_train.engine.hooks import (
    ON,
    SurgeryPoint,
    plan_surgery,
    point_label,
    stream_losses,
)
from impartial_train.engine.snapshot import (
    Snapshot,
    cuda_devices,
    restore_rng,
    rng_changed,
    rng_state,
)
from impartial_train.engine.stats import PointStats


class GraphUnavailable(BlockfinderError):
    """The graph engine cannot run this model on this input structure; the message says why."""


class GraphTracer(BlockTracer):
    """:class:`BlockTracer` that traces through every module: parameters are ``get_attr`` nodes, so
    a parameter used by several streams (a decoder applied to several samples) can be branched.

    A submodule whose forward cannot be traced (a tensor-valued ``if``, a shape check such as
    ``BatchNorm1d``'s ``input.dim()`` test) is rolled back and recorded as one opaque
    ``call_module`` node that runs eagerly; ``leaves`` maps its path to the reason. Branch points
    inside such a module cannot be rewritten (the engine says so); those outside it can. A failure
    in the model's own ``forward`` or in the losses callable fails the trace.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.leaves: dict[str, str] = {}
        self._parameter_cache: dict[str, Any] | None = None
        # parameters trainable when tracing starts: one the forward freezes with
        # ``requires_grad_(False)`` is read through ``detach`` while it is frozen, as autograd
        # records it (a constant), and the program does the same at every step
        self._trainable = {id(p) for p in model.parameters() if p.requires_grad}
        self._frozen: dict[fx.Node, fx.Node] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        self._parameter_cache = parameter_proxy_cache
        proxy = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(proxy, fx.Proxy) and self._is_frozen(attr_val):
            return self.proxy(self._frozen_node(proxy.node))
        return proxy

    def create_arg(self, a: Any) -> Any:
        arg = super().create_arg(a)
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and self._is_frozen(a):
            return self._frozen_node(arg)
        return arg

    def _is_frozen(self, value: Any) -> bool:
        return (
            isinstance(value, nn.Parameter)
            and not value.requires_grad
            and id(value) in self._trainable
        )

    def _frozen_node(self, node: fx.Node) -> fx.Node:
        frozen = self._frozen.get(node)
        if frozen is None or frozen.graph is not self.graph:
            frozen = self._frozen[node] = self.create_node("call_method", "detach", (node,), {})
        return frozen

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if (
            id(m) not in self._paths
            and not any(True for _ in m.parameters())
            and not any(True for _ in m.buffers())
        ):
            return forward(*args, **kwargs)  # a stateless module of the losses (nn.MSELoss())
        path = self.path_of_module(m)
        if path == "" or path in self.leaves:
            return super().call_module(m, forward, args, kwargs)
        nodes = self.graph.nodes
        marker = next(reversed(nodes), None)
        module_stack = dict(self.module_stack)
        depth = len(self._stack)
        stores = (m.__dict__, m._parameters, m._buffers, m._modules)
        saved = [dict(store) for store in stores]
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            reason = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        else:
            changed = [
                k
                for store, before in zip(stores, saved)
                for k in store.keys() | before.keys()
                if store.get(k, _MISSING) is not before.get(k, _MISSING)
            ]
            if not changed:
                return result
            reason = f"changes its attribute '{sorted(changed)[0]}' while running"
        for store, before in zip(stores, saved):
            store.clear()
            store.update(before)
        created = []
        for node in reversed(nodes):
            if node is marker:
                break
            created.append(node)
        for node in created:  # newest first: users go before what they use
            self.graph.erase_node(node)
        erased = set(created)
        for key, frozen in list(self._frozen.items()):
            if key in erased or frozen in erased:
                del self._frozen[key]
        cache = self._parameter_cache or {}
        for name, proxy in list(cache.items()):
            if getattr(proxy, "node", None) in erased:
                del cache[name]
        self.module_stack.clear()
        self.module_stack.update(module_stack)
        del self._stack[depth:]
        self.leaves[path] = reason
        return super().call_module(m, forward, args, kwargs)


# --------------------------------------------------------------------------------------------
# The Branch autograd function


@dataclass
class StepState:
    """What the Branch nodes of one step need in backward (one object per forward call)."""

    methods: Sequence[nn.Module]
    stats: Sequence[PointStats]
    losses: list[torch.Tensor | None]
    rescale: bool = True
    gramian_hook: Callable[[torch.Tensor], torch.Tensor] | None = None
    # "on": surgery; "identity" (the self-check) or "off": the streams' plain sum
    mode: str = ON


class Branch(torch.autograd.Function):
    """Forward: ``count`` aliases of ``x`` (one per stream). Backward: the streams' gradients
    (``None`` where a stream sent none) combined by the branch point's method."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: StepState, index: int, count: int):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.step, ctx.index = step, index
        ctx.shape, ctx.dtype = x.shape, x.dtype
        uses = getattr(step.methods[index], "uses_activation", False)
        ctx.activation = x.detach() if uses else None
        return tuple(x.view_as(x) for _ in range(count))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        step: StepState = ctx.step
        i = ctx.index
        if step.mode != ON:
            parts = [g for g in grads if g is not None]
            return (torch.stack(parts).sum(0) if parts else None), None, None, None
        combined = combine_streams(
            list(grads),
            step.methods[i],
            step.stats[i],
            step.losses[i],
            step.rescale,
            step.gramian_hook,
            activation=ctx.activation,
        )
        ctx.activation = None
        if combined is not None:
            combined = combined.reshape(ctx.shape).to(ctx.dtype)
        return combined, None, None, None


def branch(x: torch.Tensor, step: StepState, index: int, count: int) -> tuple[torch.Tensor, ...]:
    """The call the rewritten program makes at branch point ``index``."""
    return Branch.apply(x, step, index, count)


# --------------------------------------------------------------------------------------------
# Guards: what the traced program froze that the user may change between steps

_SCALARS = (bool, int, float, complex, str, type(None))
_MISSING = object()


def _is_scalar(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    return isinstance(value, tuple) and len(value) <= 16 and all(_is_scalar(v) for v in value)


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


@dataclass
class Guards:
    """Values the traced program depends on but does not read at run time.

    ``attrs``/``cells``: plain scalar attributes of the model's modules (``self.beta``), and scalar
    globals and closure variables read by the losses callable and the modules' ``forward`` (tracing
    freezes them as constants); ``tensors``: the parameters, buffers and tensor attributes the
    program holds (a replaced object, e.g. buffers after ``model.to(device)``, or a changed
    ``requires_grad`` needs a new program); ``children``: the module tree; ``flags``: every
    module's ``training`` flag (``Dropout``, ``BatchNorm`` branch on it in Python).
    """

    modules: list[nn.Module] = field(default_factory=list)
    flags: tuple[bool, ...] = ()
    attrs: list[tuple[dict, str, Any]] = field(default_factory=list)
    cells: list[tuple[Any, str, Any]] = field(default_factory=list)
    tensors: list[tuple[dict, str, Any, bool]] = field(default_factory=list)
    children: list[tuple[dict, tuple]] = field(default_factory=list)

    def mode_matches(self) -> bool:
        return tuple([m.training for m in self.modules]) == self.flags

    def changed(self) -> str | None:
        """What changed since tracing (None: the program is still the model's)."""
        for store, values in self.children:  # (modules compare by identity)
            if len(store) != len(values) or (values and tuple(store.values()) != values):
                return "the model's submodules changed"
        hooked = _module_hooks(self.modules)
        if hooked is not None:
            return f"module hooks were registered ({hooked})"
        for store, name, value in self.attrs:
            current = store.get(name, _MISSING)
            if current is not value and not _same(current, value):
                return f"'{name}' changed from {value!r} to {current!r}"
        for cell, name, value in self.cells:
            try:
                current = cell.cell_contents
            except ValueError:
                current = _MISSING
            if current is not value and not _same(current, value):
                return f"'{name}' changed from {value!r} to {current!r}"
        for store, name, obj, requires_grad in self.tensors:
            if store.get(name, _MISSING) is not obj:
                return f"'{name}' was replaced"
            if obj.requires_grad != requires_grad:
                return f"'{name}'.requires_grad changed"
        return None


_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _module_hooks(modules: Sequence[nn.Module]) -> str | None:
    """The first module with forward/backward hooks (a traced program would not call them)."""
    for module in modules:
        if (
            module._forward_hooks
            or module._forward_pre_hooks
            or module._backward_hooks
            or module._backward_pre_hooks
        ):
            return type(module).__name__
    registry = sys.modules["torch.nn.modules.module"]
    for name in _GLOBAL_HOOKS:
        if getattr(registry, name, None):
            return "global module hooks"
    return None


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _function_guards(fn: Any, guards: Guards, seen: set[int]) -> None:
    while hasattr(fn, "func") and not isinstance(fn, types.FunctionType):  # functools.partial
        fn = fn.func
    fn = getattr(fn, "__func__", fn)
    if not isinstance(fn, types.FunctionType):
        call = type(fn).__dict__.get("__call__")
        if not isinstance(call, types.FunctionType):
            return
        fn = call
    if id(fn) in seen:
        return
    seen.add(id(fn))
    namespace = fn.__globals__
    for name in sorted(_code_names(fn.__code__)):
        value = namespace.get(name, _MISSING)
        if value is not _MISSING and _is_scalar(value):
            guards.attrs.append((namespace, name, value))
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if _is_scalar(value):
            guards.cells.append((cell, name, value))


def _collect_guards(model: nn.Module, losses_fn: Any, graph: fx.Graph, objects: dict) -> Guards:
    modules = list(model.modules())
    guards = Guards(modules=modules, flags=tuple(m.training for m in modules))
    guards.children = [(m._modules, tuple(m._modules.values())) for m in modules]
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("_") or name == "training" or not _is_scalar(value):
                continue
            guards.attrs.append((module.__dict__, name, value))
    seen: set[int] = set()
    _function_guards(losses_fn, guards, seen)
    for cls in {type(m) for m in model.modules()}:
        forward = cls.__dict__.get("forward")
        if isinstance(forward, types.FunctionType) and not cls.__module__.startswith("torch."):
            _function_guards(forward, guards, seen)
    for node in graph.nodes:
        if node.op != "get_attr" or str(node.target).startswith(("_bf_constant", "_tensor_const")):
            continue  # (call_module targets are covered by the module-tree guard)
        owner_path, _, name = str(node.target).rpartition(".")
        owner = model.get_submodule(owner_path)
        obj = objects[node.target]
        if name in owner._parameters:
            store = owner._parameters
        elif name in owner._buffers:
            store = owner._buffers
        else:
            store = owner.__dict__
        if isinstance(obj, torch.Tensor):
            guards.tensors.append((store, name, obj, obj.requires_grad))
    return guards


# --------------------------------------------------------------------------------------------
# Tracing without side effects


@contextmanager
def _no_model_side_effects(model: nn.Module, changes: list[str]) -> Iterator[None]:
    """Snapshot the modules' attribute dicts; on exit restore them and list what had changed
    (a forward that stores values on the model, ``self.last_z = z``, cannot be replayed)."""
    paths = {id(m): name for name, m in model.named_modules()}
    snapshot = []
    for module in model.modules():
        stores = (module.__dict__, module._parameters, module._buffers, module._modules)
        snapshot.append((module, [(s, dict(s)) for s in stores]))
    try:
        yield
    finally:
        for module, stores in snapshot:
            for store, saved in stores:
                if store.keys() != saved.keys() or any(store[k] is not v for k, v in saved.items()):
                    diff = [k for k in store.keys() ^ saved.keys()] or [
                        k for k, v in saved.items() if store.get(k) is not v
                    ]
                    where = paths.get(id(module)) or "<model>"
                    changes.append(f"{where}.{diff[0]}" if diff else where)
                    store.clear()
                    store.update(saved)


def trace_program(
    model: nn.Module, losses_fn: LossesFn, batch: Any
) -> tuple[fx.Graph, Harness, list[torch.Tensor], dict[str, str]]:
    """Trace ``losses_fn(model, batch)`` with :class:`GraphTracer`; raise :class:`GraphUnavailable`
    (with the reason) where the traced program could not reproduce the eager one."""
    hooked = _module_hooks(list(model.modules()))
    if hooked is not None:
        raise GraphUnavailable(
            f"module hooks are registered ({hooked}); a traced program would not call them"
        )
    flat = flatten_batch(batch)
    harness = Harness(model, losses_fn, flat)
    tracer = GraphTracer(model)
    devices = cuda_devices(model)
    changes: list[str] = []
    flags = [(name, p, p.requires_grad) for name, p in model.named_parameters()]
    before = rng_state(devices)
    try:
        with (
            _no_model_side_effects(model, changes),
            distribution_validation_off(),
            torch.enable_grad(),
            opaque_names(model, losses_fn),
        ):
            graph = tracer.trace(harness, concrete_args=tuple(fx.PH for _ in flat.tensor_positions))
    except Exception as exc:
        restore_rng(before, devices)
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else ""
        raise GraphUnavailable(f"tracing failed: {type(exc).__name__}: {first}") from exc
    finally:  # a forward that froze parameters may have stopped before unfreezing them
        toggled = [name for name, p, flag in flags if p.requires_grad != flag]
        for _, p, flag in flags:
            p.requires_grad_(flag)
    drawn = rng_changed(before, rng_state(devices))
    restore_rng(before, devices)
    if toggled:
        raise GraphUnavailable(
            f"the forward pass changes requires_grad of '{toggled[0]}' and leaves it changed; a "
            "traced program would not repeat that"
        )
    if changes:
        raise GraphUnavailable(
            f"the forward pass changes the model's attributes ({', '.join(changes[:3])}); a traced "
            "program would not repeat that"
        )
    if drawn:
        raise GraphUnavailable(
            f"tracing drew {' and '.join(drawn)} random numbers that do not depend on the batch; "
            "the traced program would freeze them"
        )
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    if not isinstance(output.args[0], dict):
        raise GraphUnavailable("the traced losses are not a dict")
    return graph, harness, flat.tensors, tracer.leaves


# --------------------------------------------------------------------------------------------
# Planning replay: the step's forward, with what the mapping needs


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 4:
        return
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors_in(item, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth + 1)
    elif isinstance(obj, Distribution):
        for item in vars(obj).values():
            yield from _tensors_in(item, depth + 1)


def _edge(t: torch.Tensor) -> tuple[Any, int] | None:
    if not t.requires_grad:
        return None
    edge = torch.autograd.graph.get_gradient_edge(t)
    return (edge.node, edge.output_nr)


class _Where:
    """Stands in for :class:`ModuleStack` for :class:`OpRecorder`: the module path of the running
    node, or inside an opaque module call, of the module running there (as in eager)."""

    def __init__(self, modules: ModuleStack) -> None:
        self.modules = modules
        self.node_module = ""

    @property
    def current(self) -> str:
        return self.modules.stack[-1] if self.modules.stack else self.node_module


class PlanReplay(Replay):
    """The traced program run once on the batch: facts of every node (autograd values), which fx
    node created each autograd node (``owner``), which fx nodes produce each autograd value, and
    in-place changes of values that requires grad."""

    def __init__(self, root: nn.Module, graph: fx.Graph, where: _Where) -> None:
        super().__init__(root, graph)
        self.where = where
        self.owner: dict[Any, fx.Node] = {}
        self.producers: dict[tuple[Any, int], list[fx.Node]] = {}
        self.inplace: set[fx.Node] = set()
        self.mutated: list[str] = []
        self.leaves: dict[str, str] = {}  # opaque modules: path -> why
        self.stateful: set[fx.Node] = set()  # objects that cache values between their uses

    def run_node(self, n: fx.Node) -> Any:
        self.where.node_module = n.meta.get("bf_module", "")
        inputs = []
        objects = []
        for m in n.all_input_nodes:
            value = self.env.get(m)
            if isinstance(value, Distribution):
                objects.append((m, value, len(vars(value))))
            elif isinstance(value, torch.Tensor):
                inputs.append(value)
                fact = self.facts.get(m.name)
                if fact is not None and fact.kind == "tensor" and _edge(value) != fact.value:
                    self.mutated.append(f"{m.name} (before {n.name})")
        result = super().run_node(n)
        for m, value, size in objects:
            if len(vars(value)) != size:  # a lazy property cached on the object
                self.stateful.add(m)
        if n.op == "output":
            return result
        fact = self.facts[n.name]
        if fact.value is not None:
            self.producers.setdefault(fact.value, []).append(n)
        if isinstance(result, torch.Tensor) and any(result is t for t in inputs):
            for m in n.all_input_nodes:
                if self.env.get(m) is result and _edge(result) != self.facts[m.name].value:
                    self.inplace.add(n)  # an in-place operation on a value that requires grad
        self._claim(n, result)
        return result

    def _claim(self, n: fx.Node, result: Any) -> None:
        owner = self.owner
        stack = [t.grad_fn for t in _tensors_in(result) if t.grad_fn is not None]
        if n.op in ("placeholder", "get_attr"):
            for node in stack:
                owner.setdefault(node, n)
            return
        while stack:
            node = stack.pop()
            if node in owner:
                continue
            owner[node] = n
            for next_node, _ in node.next_functions:
                if next_node is not None and next_node not in owner:
                    stack.append(next_node)


# --------------------------------------------------------------------------------------------
# Mapping the plan onto the fx graph, checking it, and rewriting


# Carriers that may be recomputed once per stream (deterministic, no side effects).
_CLONABLE_NAMES = frozenset(
    {
        "getitem", "getattr", "chunk", "split", "unbind", "tensor_split", "split_with_sizes",
        "hsplit", "vsplit", "dsplit", "broadcast_tensors", "meshgrid", "atleast_1d", "atleast_2d",
        "atleast_3d", "var_mean", "std_mean", "sort", "topk", "max", "min", "aminmax",
        "kthvalue", "median", "mode", "cummax", "cummin", "frexp", "size", "to", "type",
        "type_as", "float", "double", "half", "bfloat16", "contiguous",
    }
)  # fmt: skip


@dataclass
class _PointMap:
    roots: list[fx.Node]
    carriers: list[fx.Node]
    leaves: dict[fx.Node, int]  # user -> stream (-1: keeps the original value, bypasses)
    flowing: set[fx.Node] = field(default_factory=set)  # bypass users that carry gradient


def _describe(node: fx.Node | None) -> str:
    if node is None:
        return "an operation outside the traced program"
    module = node.meta.get("bf_module", "")
    target = node.target if isinstance(node.target, str) else op_name(node.target)
    return f"'{target}' ({node.name}{' in ' + module if module else ''})"


def _map_point(
    point: SurgeryPoint, replay: PlanReplay, reach: Mapping[tuple[Any, int], int], label: str
) -> _PointMap:
    value = (point.node, point.index)
    producers = replay.producers.get(value, [])
    if not producers:
        owner = replay.owner.get(point.node)
        inside = _describe(owner)
        if owner is not None and owner.op == "call_module" and owner.target in replay.leaves:
            inside = (
                f"module '{owner.target}', which could not be traced "
                f"({replay.leaves[owner.target]})"
            )
        elif getattr(point.node, "variable", None) is not None:
            inside = "a module that could not be traced"
        raise GraphUnavailable(
            f"branch point {label} is a value computed inside {inside}; the traced program "
            "cannot branch it"
        )
    is_parameter = getattr(point.node, "variable", None) is not None
    roots = [n for n in producers if n.op == "get_attr"] if is_parameter else producers[:1]
    stream_of = {bits: i for i, bits in enumerate(point.streams)}
    carriers: list[fx.Node] = []
    leaves: dict[fx.Node, int] = {}
    flowing: set[fx.Node] = set()
    seen = set(roots)
    queue = list(roots)
    while queue:
        current = queue.pop(0)
        for user in current.users:
            if user in seen or user.op == "output":
                continue
            seen.add(user)
            fact = replay.facts.get(user.name)
            if fact is None:
                raise GraphUnavailable(f"{_describe(user)} did not run in the replay")
            if fact.kind in ("container", "distribution") or (
                fact.kind == "tensor" and fact.value == value
            ):
                carriers.append(user)
                queue.append(user)
            else:
                bits = reach.get(fact.value, 0) if fact.value is not None else 0
                leaves[user] = stream_of.get(bits, -1)
                if bits and leaves[user] < 0:
                    flowing.add(user)
    if any(n not in seen for n in producers):
        raise GraphUnavailable(f"branch point {label} is produced along several paths")
    for user, stream in leaves.items():
        if stream >= 0 and user in replay.inplace:
            raise GraphUnavailable(f"{_describe(user)} changes branch point {label} in place")
    mapped = _PointMap(roots, carriers, leaves, flowing)
    _check_point(point, replay, mapped, label)
    return mapped


def _check_point(point: SurgeryPoint, replay: PlanReplay, mapped: _PointMap, label: str) -> None:
    """Every autograd consumer of the branch value must be created by an fx user assigned to the
    consumer's stream, as the hook engine assigns it. A consumer created inside a carrier (e.g.
    the broadcast inside ``Normal(mu, sigma)``) passes every gradient below the carrier into one
    stream: all users below it must then be in that stream, none bypassing with gradient."""
    carriers = set(mapped.carriers)
    below: dict[fx.Node, set[int]] = {}

    def streams_below(node: fx.Node) -> set[int]:
        found = below.get(node)
        if found is None:
            found = below[node] = set()
            for user in node.users:
                if user in mapped.leaves:
                    if mapped.leaves[user] >= 0 or user in mapped.flowing:
                        found.add(mapped.leaves[user])
                elif user in carriers:
                    found |= streams_below(user)
        return found

    def fail(consumer: Any) -> GraphUnavailable:
        return GraphUnavailable(
            f"branch point {label}: the gradient of {_describe(replay.owner.get(consumer))} cannot "
            "be routed to its stream in the traced program"
        )

    for consumer, _, stream in point.consumers:
        owner = replay.owner.get(consumer)
        if owner in mapped.leaves:
            ok = mapped.leaves[owner] == stream
        elif owner in carriers:
            ok = streams_below(owner) == {stream}
        else:
            ok = False
        if not ok:
            raise fail(consumer)
    for consumer, _, groups in point.split_consumers:
        owner = replay.owner.get(consumer)
        if owner not in carriers:
            raise fail(consumer)
        for stream, outs in groups.items():
            for out in outs:
                users = [u for u in mapped.leaves if replay.facts[u.name].value == (consumer, out)]
                if not users or any(mapped.leaves[u] != stream for u in users):
                    raise fail(consumer)


def _clonable(node: fx.Node, replay: PlanReplay) -> bool:
    if node.op == "call_function" and isinstance(node.target, type):
        return issubclass(node.target, Distribution)
    if node.op == "call_method" and isinstance(node.args[0], fx.Node):
        receiver = replay.facts.get(node.args[0].name)
        if receiver is not None and receiver.kind == "distribution":
            return replay.facts[node.name].kind == "distribution"
    if node.op not in ("call_function", "call_method"):
        return False
    return op_name(node.target) in _CLONABLE_NAMES


def rewrite(
    graph: fx.Graph, replay: PlanReplay, maps: Sequence[_PointMap], counts: Sequence[int]
) -> int:
    """Insert one Branch per point and give every stream's users their alias (cloning carriers
    per stream). Returns the number of cloned nodes."""
    root_of: dict[fx.Node, int] = {}
    cpoints: dict[fx.Node, list[int]] = {}
    lpoints: dict[fx.Node, dict[int, int]] = {}
    for p, mapped in enumerate(maps):
        for root in mapped.roots:
            if root in root_of or root in cpoints:
                raise GraphUnavailable(f"{_describe(root)} is the value of two branch points")
            root_of[root] = p
        for carrier in mapped.carriers:
            cpoints.setdefault(carrier, []).append(p)
        for leaf, stream in mapped.leaves.items():
            lpoints.setdefault(leaf, {})[p] = stream
    if any(n in cpoints for n in root_of):
        raise GraphUnavailable("a branch value is carried by another branch point's value")

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    if anchor is None:
        with graph.inserting_before(next(iter(graph.nodes))):
            step = graph.placeholder("_impartial_step")
    else:
        with graph.inserting_after(anchor):
            step = graph.placeholder("_impartial_step")
    aliases: list[list[fx.Node]] = []
    for p, mapped in enumerate(maps):
        order = {n: i for i, n in enumerate(graph.nodes)}
        root = min(mapped.roots, key=order.__getitem__)
        with graph.inserting_after(root):
            node = graph.call_function(branch, (root, step, p, counts[p]))
        node.meta["bf_grad_enabled"] = True
        items = []
        for s in reversed(range(counts[p])):
            with graph.inserting_after(node):
                item = graph.call_function(operator.getitem, (node, s))
            item.meta["bf_grad_enabled"] = True
            items.append(item)
        aliases.append(items[::-1])

    memo: dict[tuple[fx.Node, tuple[int, ...]], fx.Node] = {}
    clones: list[fx.Node] = []

    def points_of(node: fx.Node) -> list[int]:
        if node in root_of:
            return [root_of[node]]
        return cpoints.get(node, [])

    def resolve(node: fx.Node, full: Mapping[int, int]) -> fx.Node:
        if node in root_of:
            stream = full[root_of[node]]
            return aliases[root_of[node]][stream] if stream >= 0 else node
        if node not in cpoints:
            return node
        key = tuple(full[p] for p in cpoints[node])
        found = memo.get((node, key))
        if found is not None:
            return found
        if all(s < 0 for s in key):
            memo[(node, key)] = node
            return node
        if not _clonable(node, replay) or node in replay.stateful:
            why = "caches values between its uses" if node in replay.stateful else "is not pure"
            raise GraphUnavailable(
                f"{_describe(node)} carries a branch value to several streams and cannot be "
                f"recomputed per stream ({why})"
            )
        context = dict(zip(cpoints[node], key)) | lpoints.get(node, {})
        with graph.inserting_after(node):
            clone = graph.node_copy(node, lambda m: resolve(m, _restrict(m, context)))
        memo[(node, key)] = clone
        clones.append(clone)
        return clone

    def _restrict(node: fx.Node, context: Mapping[int, int]) -> dict[int, int]:
        wanted = points_of(node)
        try:
            return {p: context[p] for p in wanted}
        except KeyError as exc:  # pragma: no cover - guarded by the mapping's construction
            raise GraphUnavailable(f"inconsistent stream context at {_describe(node)}") from exc

    new_args: dict[fx.Node, tuple[Any, Any]] = {}
    for node, assigned in lpoints.items():
        context = {p: -1 for p in cpoints.get(node, [])} | assigned

        def transform(m: fx.Node, context: Mapping[int, int] = context) -> fx.Node:
            return resolve(m, _restrict(m, context))

        new_args[node] = (
            fx.node.map_arg(node.args, transform),
            fx.node.map_arg(node.kwargs, transform),
        )
    for node, (args, kwargs) in new_args.items():
        node.args, node.kwargs = args, kwargs
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(cpoints, key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)
    _insert_grad_modes(graph)
    return len(clones)


def _insert_grad_modes(graph: fx.Graph) -> None:
    """Generated code does not see ``torch.no_grad()`` regions: switch the grad mode explicitly
    where the traced nodes were created with gradients off."""
    mode = True
    for node in list(graph.nodes):
        if node.op in ("placeholder", "get_attr"):
            continue
        want = True if node.op == "output" else node.meta.get("bf_grad_enabled", True)
        if want != mode:
            with graph.inserting_before(node):
                graph.call_function(torch._C._set_grad_enabled, (want,))
            mode = want


# --------------------------------------------------------------------------------------------
# The program and the engine


@dataclass
class GraphProgram:
    """The rewritten program of one input structure."""

    module: fx.GraphModule | None  # None: no branch point, the eager model is run as is
    names: tuple[str, ...]
    points: int
    guards: Guards
    clones: int = 0
    leaves: dict[str, str] = field(default_factory=dict)
    methods: list[nn.Module] = field(default_factory=list)
    stats: list[PointStats] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    checked: bool = False  # the self-check ran on it

    def bind(self, methods: Sequence[nn.Module], stats: Sequence[PointStats], masks) -> None:
        """The method, statistics and loss masks (streams x losses; None: the method does not
        read the losses) of each branch point."""
        self.methods, self.stats, self.masks = list(methods), list(stats), list(masks)

    def describe(self) -> str:
        if self.module is None:
            return "no branch point: the model runs as is"
        nodes = sum(1 for _ in self.module.graph.nodes)
        text = f"{self.points} branch point(s), {self.clones} cloned node(s), {nodes} fx nodes"
        if self.leaves:
            shown = ", ".join(f"{path} ({why})" for path, why in list(self.leaves.items())[:3])
            more = f" and {len(self.leaves) - 3} more" if len(self.leaves) > 3 else ""
            text += f"; run as opaque modules: {shown}{more}"
        return text


@dataclass
class Planned:
    """The result of the planning step: the replay's losses and the plan on its autograd graph
    (branch points, keys and labels) and the program (None: refused, ``reason`` says why)."""

    losses: dict[str, torch.Tensor]
    points: list[SurgeryPoint]
    origin: dict[Any, tuple[str, str]]
    program: GraphProgram | None
    reason: str | None = None


class GraphEngine:
    """Builds and runs rewritten programs; see the module docstring."""

    def build(
        self,
        model: nn.Module,
        losses_fn: LossesFn,
        batch: Any,
        regularizers: Sequence[str],
    ) -> Planned:
        """Trace, replay and plan; rewrite.

        Leaves the random number generators and buffers as they were (the step's forward is
        still to run). Raises :class:`GraphUnavailable` when tracing or the replay fails; a
        refusal after the replay is returned in ``Planned.reason``.
        """
        graph, harness, tensors, leaves = trace_program(model, losses_fn, batch)
        modules = ModuleStack(model)
        where = _Where(modules)
        replay = PlanReplay(harness, graph, where)
        replay.leaves = leaves
        # the replay serves the planning only: the step's forward runs afterwards, on the same
        # random numbers and buffers
        snapshot = Snapshot(model)
        recorder = OpRecorder(where)  # type: ignore[arg-type]
        previous = torch.is_grad_enabled()
        try:
            with modules, recorder:
                out = replay.run(*tensors)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            raise GraphUnavailable(
                "the traced program failed on the batch: "
                f"{type(exc).__name__}: {lines[0] if lines else ''}"
            ) from exc
        finally:
            torch._C._set_grad_enabled(previous)
            snapshot.restore()
        losses = check_losses(out)
        names = list(losses)
        tasks = [n for n in names if n not in regularizers]
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        reach: dict[tuple[Any, int], int] = {}
        points = plan_surgery(losses, tasks, trainable, reach=reach)
        planned = Planned(losses, points, recorder.origin, None)
        try:
            objects = {
                n.target: _fetch(harness, str(n.target))
                for n in graph.nodes
                if n.op in ("get_attr", "call_module")
            }
            guards = _collect_guards(model, losses_fn, graph, objects)
            if not points:  # nothing to rewrite: later steps run the model itself
                planned.program = GraphProgram(None, tuple(names), 0, guards)
                return planned
            if replay.mutated:
                raise GraphUnavailable(
                    "a value that requires grad is changed in place and then used: "
                    f"{replay.mutated[0]}"
                )
            maps = [_map_point(p, replay, reach, point_label(p, recorder.origin)) for p in points]
            clones = rewrite(graph, replay, maps, [len(p.streams) for p in points])
            _flatten_module_targets(graph, objects)
            graph.lint()
            module = fx.GraphModule(objects, graph, class_name="ImpartialProgram")
        except GraphUnavailable as exc:
            planned.reason = str(exc)
            return planned
        except Exception as exc:  # a model this engine does not foresee: the step stays valid
            planned.reason = f"rewriting failed: {type(exc).__name__}: {exc}"
            return planned
        planned.program = GraphProgram(module, tuple(names), len(points), guards, clones, leaves)
        return planned

    @staticmethod
    def run(
        program: GraphProgram,
        tensors: Sequence[torch.Tensor],
        rescale: bool,
        gramian_hook: Callable | None,
        mode: str = ON,
    ) -> tuple[dict[str, torch.Tensor], StepState]:
        """One forward of the rewritten program; the Branch nodes aggregate in its backward as
        the returned step state's ``mode`` says when it runs."""
        step = StepState(program.methods, program.stats, [None] * program.points, rescale)
        step.gramian_hook = gramian_hook
        step.mode = mode
        assert program.module is not None
        with torch.enable_grad():
            out = program.module(*tensors, step)
        step.losses = stream_losses(out, program.names, program.masks)
        return out, step


def _flatten_module_targets(graph: fx.Graph, objects: dict[str, Any]) -> None:
    """Give opaque modules flat names in the program (``_bf_module_enc_1``), so that building the
    GraphModule never walks into, or registers anything on, one of the user's modules."""
    names: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        name = names.get(target)
        if name is None:
            base = "_bf_module_" + target.replace(".", "_")
            name, count = base, 1
            while name in objects:
                name, count = f"{base}_{count}", count + 1
            names[target] = name
            objects[name] = objects[target]
        node.target = name
    for target in names:
        objects.pop(target, None)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = [
    "Branch",
    "GraphEngine",
    "GraphProgram",
    "GraphTracer",
    "GraphUnavailable",
    "Planned",
    "StepState",
    "branch",
    "trace_program",
]
