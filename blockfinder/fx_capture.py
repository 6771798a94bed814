"""Structural capture with a custom ``torch.fx`` Tracer, and the conversion of any fx graph (fx or
``torch.export``) to the dependency-graph contract of ``docs/architecture.md``.

What the tracer adds to plain ``symbolic_trace`` (which fails on every typical VAE):

- the batch (nested dict/list/tuple of tensors) is flattened with ``torch.utils._pytree``: each
  tensor becomes one placeholder, other leaves stay constants; the model and the losses callable
  are traced together through a small harness module that shares the model's submodules, so node,
  module and parameter names are the model's own;
- every ``torch.distributions`` construction, ``kl_divergence`` call and custom
  ``autograd.Function.apply`` becomes ONE opaque node; the distribution's ``rsample``/``sample``/
  ``log_prob``/``entropy`` calls and ``mean``/``stddev``/``variance`` reads are one node each.
  User code binds these names at import (``from torch.distributions import Normal``), so the names
  are patched in the globals of the user's modules (and on the model's modules and classes) for the
  duration of the trace, and always restored;
- ``is_leaf_module`` with a depth control (default: the built-in ``torch.nn`` layers are leaves);
- the grad mode at each node's creation is recorded (symbolic tracing runs the Python code, so a
  ``with torch.no_grad():`` region is visible as the grad mode while its nodes are created);
- a replay of the traced program on the example batch (an :class:`torch.fx.Interpreter`, in the
  recorded grad modes) gives shapes, dtypes, which values are containers or distributions, and
  each value's autograd node (used by :mod:`blockfinder.reconcile`).
"""

from __future__ import annotations

import bisect
import builtins
import dis
import inspect
import math
import operator
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.autograd.function import Function
from torch.distributions import Distribution
from torch.distributions.kl import kl_divergence

from blockfinder.context import distribution_validation_off
from blockfinder.losses import LossesFn, default_losses

# --------------------------------------------------------------------------------------------
# The result of a structural capture (fx, export or draft_export)


@dataclass
class StructuralCapture:
    """A data-flow graph of the program, converted to the dependency-graph contract.

    ``facts`` maps dependency-graph node names to what a replay of the program on the example
    batch saw (fx only): shape, dtype, whether the value requires grad and its autograd value
    ``(grad_fn, output_nr)``; :mod:`blockfinder.reconcile` uses it to find edges that carry no
    gradient.
    """

    capture: str
    graph: nx.DiGraph
    losses: tuple[str, ...]
    specializations: list[str] = field(default_factory=list)
    fx_graph: fx.Graph | None = None
    root: nn.Module | None = None
    facts: dict[str, NodeFacts] | None = field(default=None, repr=False)
    param_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Batch flattening and the harness module


@dataclass
class FlatBatch:
    """The batch as a flat list of leaves: tensors become program inputs, the rest constants."""

    leaves: list[Any]
    spec: Any
    tensor_positions: list[int]
    names: list[str]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.tensor_positions]

    def rebuild(self, tensors: Sequence[Any]) -> Any:
        leaves = list(self.leaves)
        for pos, value in zip(self.tensor_positions, tensors):
            leaves[pos] = value
        return pytree.tree_unflatten(leaves, self.spec)


def _key_name(path: Sequence[Any]) -> str:
    parts: list[str] = []
    for key in path:
        value = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
        parts.append(str(value))
    name = "_".join(parts) or "batch"
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    if not name[0].isalpha() and name[0] != "_":
        name = f"batch_{name}"
    return name


def flatten_batch(batch: Any) -> FlatBatch:
    """Flatten ``batch`` (nested dict/list/tuple) into leaves; name each tensor by its key path."""
    with_paths, spec = pytree.tree_flatten_with_path(batch)
    leaves = [leaf for _, leaf in with_paths]
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    names: list[str] = []
    seen: set[str] = set()
    for i in positions:
        base = _key_name(with_paths[i][0])
        name, count = base, 1
        while name in seen:
            name, count = f"{base}_{count}", count + 1
        seen.add(name)
        names.append(name)
    return FlatBatch(leaves=leaves, spec=spec, tensor_positions=positions, names=names)


class Harness(nn.Module):
    """``forward(*tensors)`` rebuilds the batch and returns ``losses_fn(model, batch)``.

    It shares the model's submodules, parameters and buffers (same dicts), so that every path in
    a traced or exported program is the model's own; it registers nothing on the model.
    """

    def __init__(self, model: nn.Module, losses_fn: LossesFn, flat: FlatBatch) -> None:
        super().__init__()
        self.__dict__["_modules"] = model._modules
        self.__dict__["_parameters"] = model._parameters
        self.__dict__["_buffers"] = model._buffers
        self.__dict__["_bf_model"] = model
        self.__dict__["_bf_losses"] = losses_fn
        self.__dict__["_bf_flat"] = flat
        self.training = model.training

    def forward(self, *tensors: torch.Tensor) -> Any:
        batch = self._bf_flat.rebuild(tensors)
        return self._bf_losses(self._bf_model, batch)


# --------------------------------------------------------------------------------------------
# Opaque distributions, kl_divergence and autograd.Function


def _find_proxy(*objects: Any) -> fx.Proxy | None:
    stack = list(objects)
    while stack:
        obj = stack.pop()
        if isinstance(obj, fx.Proxy):
            return obj
        if isinstance(obj, (tuple, list)):
            stack.extend(obj)
        elif isinstance(obj, Mapping):
            stack.extend(obj.values())
    return None


class OpaqueCallable:
    """Stands in for a distribution class (or ``kl_divergence``) while tracing.

    Called with a traced value among its arguments it records one ``call_function`` node whose
    target is the original callable; otherwise it calls the original. ``isinstance`` checks and
    attribute reads are answered by the original.
    """

    def __init__(self, original: Any) -> None:
        self.__dict__["_bf_original"] = original

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = _find_proxy(args, kwargs)
        original = self.__dict__["_bf_original"]
        if proxy is None:
            return original(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", original, args, kwargs)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self.__dict__["_bf_original"])

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self.__dict__["_bf_original"])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_bf_original"], name)

    def __repr__(self) -> str:
        return f"<opaque {self.__dict__['_bf_original']!r}>"


def _is_opaque_target(value: Any) -> bool:
    if value is kl_divergence:
        return True
    return isinstance(value, type) and issubclass(value, Distribution) and value is not Distribution


# Factory functions whose size or device arguments may be traced values (``x.size(0)``,
# ``x.device``): recorded as one node each instead of failing inside the C++ argument parser.
FACTORY_NAMES = (
    "rand", "randn", "randint", "randperm", "zeros", "ones", "empty", "full", "arange",
    "linspace", "logspace", "eye",
)  # fmt: skip

_APPLY_TARGETS: dict[type, Callable[..., Any]] = {}


def function_apply_target(cls: type) -> Callable[..., Any]:
    """The node target for ``cls.apply``: a named function calling the (unpatched) ``apply``."""
    target = _APPLY_TARGETS.get(cls)
    if target is None:

        def target(*args: Any, **kwargs: Any) -> Any:
            return cls.apply(*args, **kwargs)

        target.__name__ = target.__qualname__ = f"{cls.__name__}_apply"
        target._bf_function = cls  # type: ignore[attr-defined]
        _APPLY_TARGETS[cls] = target
    return target


_STDLIB = frozenset(getattr(sys, "stdlib_module_names", ())) | {"builtins", "__future__"}
_NOT_USER = frozenset(
    {
        "torch",
        "numpy",
        "networkx",
        "blockfinder",
        "impartial_train",
        "functorch",
        "sympy",
        "_pytest",
    }
    | {"pytest", "pluggy", "typing_extensions", "scipy", "pandas", "sklearn", "rich", "graphviz"}
)


def _is_user_module(module: types.ModuleType | None) -> bool:
    if module is None:
        return False
    top = module.__name__.partition(".")[0]
    return top not in _STDLIB and top not in _NOT_USER


def _globals_of(obj: Any) -> dict[str, Any] | None:
    func = getattr(obj, "__func__", obj)
    if isinstance(func, types.FunctionType):
        return func.__globals__
    if isinstance(obj, type):
        return None
    for cls in type(obj).__mro__:  # a callable object: its class's __call__
        call = cls.__dict__.get("__call__")
        if isinstance(call, types.FunctionType):
            return call.__globals__
        if call is not None:
            break
    return None


def _user_namespaces(model: nn.Module, losses_fn: Any, depth: int = 2) -> list[dict[str, Any]]:
    """The globals of the user's modules reachable from the model's classes and the losses fn."""
    found: dict[int, dict[str, Any]] = {}
    frontier: list[dict[str, Any]] = []

    def add(namespace: dict[str, Any] | None) -> None:
        if namespace is not None and id(namespace) not in found:
            found[id(namespace)] = namespace
            frontier.append(namespace)

    def add_module_of(obj: Any) -> None:
        module = sys.modules.get(getattr(obj, "__module__", None) or "")
        if _is_user_module(module):
            add(module.__dict__)

    add(_globals_of(losses_fn))
    add_module_of(losses_fn)
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls is nn.Module or cls is object:
                break
            add_module_of(cls)
    for _ in range(depth):
        current, frontier[:] = list(frontier), []
        for namespace in current:
            for value in list(namespace.values()):
                if isinstance(value, types.ModuleType):
                    if _is_user_module(value):
                        add(value.__dict__)
                elif isinstance(value, (types.FunctionType, type)):
                    add_module_of(value)
    return list(found.values())


@contextmanager
def opaque_names(model: nn.Module, losses_fn: Any) -> Iterator[None]:
    """Patch distribution classes, ``kl_divergence``, ``autograd.Function.apply`` and torch's
    factory functions (:data:`FACTORY_NAMES`) for tracing.

    Patched: the ``torch.distributions`` package namespace, the globals of the user's modules,
    attributes of the model's modules (instance and class) that hold a distribution class, and the
    factory functions in the ``torch`` namespace. Every patch is undone on exit, whatever happens.
    """
    patches: list[tuple[dict[str, Any] | type, str, Any]] = []
    wrappers: dict[int, OpaqueCallable] = {}

    def wrapper(value: Any) -> OpaqueCallable:
        opaque = wrappers.get(id(value))
        if opaque is None:
            opaque = wrappers[id(value)] = OpaqueCallable(value)
        return opaque

    namespaces = [torch.distributions.__dict__, torch.distributions.kl.__dict__]
    namespaces += _user_namespaces(model, losses_fn)
    classes: list[type] = []
    for module in model.modules():
        namespaces.append(module.__dict__)
        for cls in type(module).__mro__:
            if cls is nn.Module or cls is object:
                break
            if cls not in classes and _is_user_module(sys.modules.get(cls.__module__)):
                classes.append(cls)
    original_apply = Function.__dict__["apply"]
    try:
        for name in FACTORY_NAMES:  # torch.rand(x.size(0), 3, device=x.device)
            value = torch.__dict__.get(name)
            if value is not None:
                patches.append((torch.__dict__, name, value))
                torch.__dict__[name] = wrapper(value)
        for namespace in namespaces:
            for name, value in list(namespace.items()):
                if _is_opaque_target(value):
                    patches.append((namespace, name, value))
                    namespace[name] = wrapper(value)
        for cls in classes:
            for name, value in list(vars(cls).items()):
                if _is_opaque_target(value):
                    patches.append((cls, name, value))
                    setattr(cls, name, wrapper(value))

        def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
            proxy = _find_proxy(args, kwargs)
            if proxy is None:
                return original_apply.__get__(None, cls)(*args, **kwargs)
            target = function_apply_target(cls)
            return proxy.tracer.create_proxy("call_function", target, args, kwargs)

        Function.apply = classmethod(apply)  # type: ignore[assignment, method-assign]
        yield
    finally:
        Function.apply = original_apply  # type: ignore[method-assign]
        for where, name, value in reversed(patches):
            if isinstance(where, dict):
                where[name] = value
            else:
                setattr(where, name, value)


# --------------------------------------------------------------------------------------------
# The tracer


class BlockTracer(fx.Tracer):
    """``torch.fx`` Tracer for whole multi-loss programs (model + losses callable).

    ``leaf_depth``: modules whose dotted path has at least this many parts are leaves (opaque
    ``call_module`` nodes); ``None`` keeps fx's default (built-in ``torch.nn`` layers are leaves).
    """

    def __init__(self, model: nn.Module, leaf_depth: int | None = None) -> None:
        super().__init__(autowrap_modules=(math,))
        self.proxy_buffer_attributes = True
        self.leaf_depth = leaf_depth
        self._paths: dict[int, str] = {}
        for name, module in model.named_modules():
            self._paths.setdefault(id(module), name)
        self._param_names: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(id(param), name)
        self._buffer_names: dict[int, str] = {}
        for name, buf in model.named_buffers(remove_duplicate=False):
            self._buffer_names.setdefault(id(buf), name)
        self._stack: list[str] = []
        self._constants: dict[int, str] = {}
        self._code_cache: dict[types.CodeType, tuple[list[int], list[dis.Instruction]]] = {}

    def path_of_module(self, mod: nn.Module) -> str:
        path = self._paths.get(id(mod))
        if path is None:
            raise NameError(f"module {type(mod).__name__} is not a submodule of the model")
        return path

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == "":
            return False
        if self.leaf_depth is not None and module_qualified_name.count(".") + 1 >= self.leaf_depth:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        self._stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._stack.pop()

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if isinstance(attr_val, torch.Tensor):
            table = self._param_names if isinstance(attr_val, nn.Parameter) else self._buffer_names
            name = table.get(id(attr_val))
            if name is not None:
                proxy = parameter_proxy_cache.get(name)
                if proxy is None:
                    proxy = parameter_proxy_cache[name] = self.create_proxy(
                        "get_attr", name, (), {}
                    )
                return proxy
        return attr_val

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, nn.Parameter):
            name = self._param_names.get(id(a))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        if isinstance(a, Distribution):  # a distribution built from constants, e.g. a prior
            name = self._constants.get(id(a))
            if name is None:
                name = self._constants[id(a)] = f"_bf_constant_{len(self._constants)}"
                self.root.__dict__[name] = a
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[override]
        # Not TracerBase.create_node: it copies the whole module stack into every node's meta,
        # which costs more than the rest of node creation on deep models.
        node = self.graph.create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["bf_grad_enabled"] = torch.is_grad_enabled()
        node.meta["bf_module"] = self._stack[-1] if self._stack else ""
        return node

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def instructions(self, code: types.CodeType) -> tuple[list[int], list[dis.Instruction]]:
        entry = self._code_cache.get(code)
        if entry is None:
            instructions = list(dis.get_instructions(code))
            entry = self._code_cache[code] = ([i.offset for i in instructions], instructions)
        return entry


class _Proxy(fx.Proxy):
    """``Proxy`` whose tuple unpacking (``a, b = x.chunk(2)``) does not disassemble the calling
    function again at every call: the tracer caches each code object's instructions."""

    def __iter__(self) -> Iterator[fx.Proxy]:
        frame = inspect.currentframe()
        calling = frame.f_back if frame is not None else None
        tracer = self.tracer
        if calling is None or not isinstance(tracer, BlockTracer) or sys.version_info < (3, 11):
            return super().__iter__()
        offsets, instructions = tracer.instructions(calling.f_code)
        index = bisect.bisect_left(offsets, calling.f_lasti)
        if index < len(instructions) and instructions[index].opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(instructions[index].argval))  # type: ignore[index]
        return tracer.iter(self)


# --------------------------------------------------------------------------------------------
# Replay: shapes, dtypes, containers and autograd values of every node


@dataclass
class NodeFacts:
    """What a capture knows about one fx node's value."""

    kind: str = "unknown"  # "tensor" | "container" | "distribution" | "other" | "unknown"
    # "other": a plain value (number, size, dtype, ...) that carries no gradient
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    floating: bool | None = None
    requires_grad: bool | None = None
    value: Any = None  # autograd value (grad_fn or AccumulateGrad, output_nr) of a tensor


def facts_of(value: Any) -> NodeFacts:
    if isinstance(value, torch.Tensor):
        dtype = value.dtype
        facts = NodeFacts(
            kind="tensor",
            shape=tuple(value.shape),
            dtype=str(dtype).replace("torch.", ""),
            floating=dtype.is_floating_point or dtype.is_complex,
            requires_grad=value.requires_grad,
        )
        if value.requires_grad:
            edge = torch.autograd.graph.get_gradient_edge(value)
            facts.value = (edge.node, edge.output_nr)
        return facts
    if isinstance(value, Distribution):
        return NodeFacts(kind="distribution", requires_grad=None)
    if value is None or isinstance(value, _PLAIN_VALUES):
        return NodeFacts(kind="other", requires_grad=False)
    # tuples, lists, dicts and any other object (a dataclass of tensors, a model output):
    # gradient may flow through it to its elements, so it is looked through like a tuple
    return NodeFacts(kind="container")


_PLAIN_VALUES = (
    bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device, torch.SymInt,
    torch.SymFloat, torch.SymBool, type, slice, range, types.FunctionType,
)  # fmt: skip


class Replay(fx.Interpreter):
    """Runs the traced graph on the example batch in the recorded grad modes; keeps NodeFacts."""

    def __init__(self, root: nn.Module, graph: fx.Graph) -> None:
        super().__init__(root, garbage_collect_values=True, graph=graph)
        self.facts: dict[str, NodeFacts] = {}

    def run_node(self, n: fx.Node) -> Any:
        wanted = n.meta.get("bf_grad_enabled", True)
        if wanted != torch.is_grad_enabled():
            torch._C._set_grad_enabled(wanted)
        result = super().run_node(n)
        if n.op != "output":
            self.facts[n.name] = facts_of(result)
        return result


# --------------------------------------------------------------------------------------------
# Conversion of an fx graph to the dependency-graph contract

# Functions, methods and attributes whose result carries no gradient to their inputs.
NONDIFF_NAMES = frozenset(
    {
        "detach", "detach_", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
        "randn_like", "randint_like", "new_zeros", "new_ones", "new_empty", "new_full",
        "new_tensor", "argmax", "argmin", "argsort", "argwhere", "nonzero", "eq", "ne", "lt", "le",
        "gt", "ge", "greater", "greater_equal", "less", "less_equal", "equal", "not_equal",
        "isnan", "isinf", "isfinite", "isposinf", "isneginf", "isclose", "allclose", "isin",
        "logical_and", "logical_or", "logical_not", "logical_xor", "bucketize", "searchsorted",
        "multinomial", "randint", "randperm", "one_hot", "size", "dim", "numel", "ndimension",
        "nelement", "item", "tolist", "long", "int", "bool", "short", "byte", "char",
        "is_floating_point", "is_complex", "is_contiguous", "stride", "data_ptr", "get_device",
        "shape", "dtype", "device", "data", "ndim", "is_cuda", "requires_grad", "layout",
        "sym_size", "sym_numel", "sym_stride", "_assert_scalar", "sym_constrain_range_for_size",
        "not_", "contains", "truth", "is_", "is_not", "len", "isinstance", "sample", "sample_n",
        "_local_scalar_dense", "scalar_tensor", "sym_ite", "sym_not", "sym_max", "sym_min",
        "_set_grad_enabled", "signbit", "count_nonzero", "histc", "bincount", "unique",
        "unique_consecutive", "type_as_int", "floor_divide", "remainder_int",
    }
)  # fmt: skip

# Tuple-returning ops whose i-th output depends only on the i-th input.
ELEMENTWISE_TUPLE_NAMES = frozenset({"broadcast_tensors", "meshgrid", "atleast_1d", "atleast_2d"})
ELEMENTWISE_TUPLE_NAMES = ELEMENTWISE_TUPLE_NAMES | {"atleast_3d"}

# Ops known to return tuples (used when no replay or metadata says what a value is).
TUPLE_NAMES = frozenset(
    {
        "chunk", "split", "unbind", "tensor_split", "split_with_sizes", "hsplit", "vsplit",
        "dsplit", "topk", "sort", "max_dim", "min_dim", "std_mean", "var_mean", "aminmax",
        "frexp", "lstsq", "qr", "svd", "eigh", "slogdet", "broadcast_tensors", "meshgrid",
        "unique", "kthvalue", "mode", "median_dim", "cummax", "cummin",
    }
)  # fmt: skip


def op_name(target: Any) -> str:
    """A short operation name: ``linear`` for ``torch.nn.functional.linear`` and ``aten.linear``."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None)
    if name is None:
        overload = getattr(target, "_overloadpacket", None)
        name = getattr(overload, "__name__", None) or str(target)
    if hasattr(target, "_overloadpacket"):  # aten OpOverload: "linear.default"
        name = target._overloadpacket.__name__
    return name.rsplit(".", 1)[-1]


def target_string(node: fx.Node, modules: Mapping[str, nn.Module] | None) -> str:
    """The ``target`` attribute of the dependency graph: ``nn.Linear``, ``Normal.rsample``,
    ``Tensor.chunk``, ``torch.nn.functional.linear``, ``aten.linear``, ..."""
    target = node.target
    if node.op == "call_module":
        module = modules.get(str(target)) if modules is not None else None
        if module is None:
            return str(target)
        cls = type(module)
        prefix = "nn." if cls.__module__.startswith("torch.nn") else ""
        return f"{prefix}{cls.__qualname__}"
    if node.op == "call_method":
        receiver = node.args[0] if node.args else None
        if isinstance(receiver, fx.Node) and _is_distribution_node(receiver):
            return f"{_distribution_name(receiver)}.{target}"
        return f"Tensor.{target}"
    if target is builtins.getattr and len(node.args) > 1:
        receiver = node.args[0]
        if isinstance(receiver, fx.Node) and _is_distribution_node(receiver):
            return f"{_distribution_name(receiver)}.{node.args[1]}"
        return f"Tensor.{node.args[1]}"
    if isinstance(target, type):
        return target.__qualname__
    if hasattr(target, "_overloadpacket"):
        return f"aten.{target._overloadpacket.__name__}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", str(target))
    if module in ("_operator", "operator", "builtins") or not module:
        return name
    if module.startswith("torch.distributions"):
        return name
    if module == "torch._C._nn":
        module = "torch.nn.functional"
    elif module.startswith("torch._C") or name.startswith("_VariableFunctionsClass."):
        module, name = "torch", name.rpartition(".")[2]
    return f"{module}.{name}"


def _is_distribution_node(node: fx.Node) -> bool:
    target = node.target
    if node.op == "call_function" and isinstance(target, type):
        return issubclass(target, Distribution)
    return False


def _distribution_name(node: fx.Node) -> str:
    return node.target.__name__  # type: ignore[union-attr]


@dataclass
class Converted:
    graph: nx.DiGraph
    losses: tuple[str, ...]
    name_of: dict[str, str]  # fx node name -> dependency-graph node name


def to_dependency_graph(
    fx_graph: fx.Graph,
    *,
    classify: Callable[[fx.Node], dict[str, Any]],
    facts: Mapping[str, NodeFacts],
    outputs: Callable[[fx.Node], Mapping[str, Any]],
    target_of: Callable[[fx.Node], str],
    leaf_params: Callable[[fx.Node], list[str]] | None = None,
    grad_enabled: Callable[[fx.Node], bool] | None = None,
    param_attrs: Mapping[str, dict[str, Any]] | None = None,
) -> Converted:
    """Convert an fx graph to the dependency-graph contract (node per value, gradient edges).

    ``classify(node)`` returns ``{"op": "input"|"parameter"|"buffer"|"call"|"skip", ...}`` with
    ``param``/``name``/``module`` where known; ``facts`` what is known of each value;
    ``outputs(output_node)`` maps loss names to fx nodes; ``leaf_params(node)`` lists the canonical
    parameters a ``call_module`` node uses; ``grad_enabled(node)`` the grad mode it ran in.
    """
    graph = nx.DiGraph()
    name_of: dict[str, str] = {}
    used: set[str] = {n.name for n in fx_graph.nodes}
    param_node: dict[str, str] = {}
    param_attrs = param_attrs or {}
    no_facts = NodeFacts()

    def parameter_node(param: str) -> str:
        node_name = param_node.get(param)
        if node_name is None:
            node_name = param if param not in used else f"{param}__param"
            used.add(node_name)
            param_node[param] = node_name
            attrs = {"op": "parameter", "target": "parameter", "param": param}
            attrs.update(module=param.rpartition(".")[0], shape=None, dtype=None)
            attrs.update(param_attrs.get(param, {}))
            graph.add_node(node_name, **attrs)
        return node_name

    def add_edge(src: str, dst: str, grad: bool) -> None:
        data = graph.get_edge_data(src, dst)
        if data is None:
            graph.add_edge(src, dst, grad=grad, count=1)
        else:
            data["count"] += 1
            data["grad"] = data["grad"] or grad

    def value_kind(node: fx.Node) -> str:
        return facts.get(node.name, no_facts).kind

    def carries_no_grad(node: fx.Node) -> bool:
        """The node's output never depends differentiably on its inputs."""
        if grad_enabled is not None and not grad_enabled(node):
            return True
        f = facts.get(node.name, no_facts)
        if f.kind == "tensor" and f.floating is False:
            return True
        if f.kind == "other":
            return True
        if node.op == "call_function" and node.target is builtins.getattr:
            return len(node.args) > 1 and node.args[1] in NONDIFF_NAMES
        if node.op == "call_module":
            return False
        if node.op == "call_function" and node.target is operator.getitem:
            return False
        return op_name(node.target) in NONDIFF_NAMES

    def is_container(node: fx.Node) -> bool:
        kind = value_kind(node)
        if kind in ("container", "distribution"):
            return True
        if kind != "unknown":
            return False
        if node.op == "call_function" and _is_distribution_node(node):
            return True
        if node.op == "call_function" and node.target is operator.getitem:
            source = node.args[0]
            return (
                isinstance(source, fx.Node)
                and is_container(source)
                and bool(node.users)
                and all(u.target is operator.getitem for u in node.users)
            )
        if node.op in ("call_function", "call_method"):
            return op_name(node.target) in TUPLE_NAMES and any(
                u.target is operator.getitem for u in node.users
            )
        return False

    losses: list[str] = []
    for node in fx_graph.nodes:
        if node.op == "output":
            for loss, value in outputs(node).items():
                losses.append(loss)
                loss_node = f"loss_{loss}"
                while loss_node in used:
                    loss_node += "_"
                used.add(loss_node)
                graph.add_node(
                    loss_node, op="loss", loss=loss, target="loss", module="", shape=(), grad=False
                )
                if isinstance(value, fx.Node) and value.name in name_of:
                    add_edge(name_of[value.name], loss_node, True)
            continue
        info = classify(node)
        op = info["op"]
        if op == "skip":
            continue
        if op == "parameter":
            name_of[node.name] = parameter_node(info["param"])
            continue
        f = facts.get(node.name, no_facts)
        name = info.get("name", node.name)
        if name != node.name:  # a batch key: keep it unless an fx node already has that name
            while name in used:
                name += "_input"
            used.add(name)
        name_of[node.name] = name
        attrs: dict[str, Any] = {
            "op": op,
            "target": info.get("target") or target_of(node),
            "module": info.get("module", ""),
            "shape": f.shape,
            "dtype": f.dtype,
            "fx": node.name,
        }
        if "param" in info:
            attrs["param"] = info["param"]
        container = is_container(node)
        if container:
            attrs["container"] = True
        if op == "call" and node.op == "call_function" and _is_distribution_node(node):
            attrs["distribution"] = True
        graph.add_node(name, **attrs)
        if op != "call":
            continue
        grad = not carries_no_grad(node)
        if (
            node.target is operator.getitem
            and isinstance(node.args[0], fx.Node)
            and isinstance(node.args[1], int)
        ):
            source = node.args[0]
            if (
                source.op in ("call_function", "call_method")
                and op_name(source.target) in ELEMENTWISE_TUPLE_NAMES
                and source.name in name_of
            ):
                # i-th output of broadcast_tensors & co: depends on the i-th input only
                inputs = source.args[0] if len(source.args) == 1 else source.args
                if isinstance(inputs, (list, tuple)) and node.args[1] < len(inputs):
                    item = inputs[node.args[1]]
                    if isinstance(item, fx.Node) and item.name in name_of:
                        shape = facts.get(item.name, no_facts).shape
                        if shape is not None and shape == f.shape:
                            # broadcasting to its own shape: the same value, no new node
                            graph.remove_node(name)
                            name_of[node.name] = name_of[item.name]
                            continue
                        add_edge(name_of[item.name], name, grad and _gives_grad(item, facts))
                    continue
        elementwise_tuple = (
            node.op in ("call_function", "call_method")
            and op_name(node.target) in ELEMENTWISE_TUPLE_NAMES
        )
        for src in node.all_input_nodes:
            if src.name not in name_of:
                continue
            edge_grad = grad and not elementwise_tuple and _gives_grad(src, facts)
            add_edge(name_of[src.name], name, edge_grad)
        if node.op == "call_module" and leaf_params is not None:
            for param in leaf_params(node):
                add_edge(parameter_node(param), name, grad)
    return Converted(graph=graph, losses=tuple(losses), name_of=name_of)


def _gives_grad(src: fx.Node, facts: Mapping[str, NodeFacts]) -> bool:
    """Can a value carry gradient to its users at all (non-tensors and integers cannot)?"""
    f = facts.get(src.name)
    if f is None:
        return True
    if f.kind == "other":
        return False
    return not (f.kind == "tensor" and f.floating is False)


# --------------------------------------------------------------------------------------------
# fx capture


def _param_attrs(model: nn.Module) -> tuple[dict[str, str], dict[str, dict[str, Any]], dict]:
    """Canonical name of every parameter name (tied weights: the first), attributes, tensors."""
    canonical_by_id: dict[int, str] = {}
    canonical: dict[str, str] = {}
    attrs: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = canonical_by_id.setdefault(id(param), name)
        canonical[name] = first
        if first == name:
            tensors[name] = param
            attrs[name] = {
                "shape": tuple(param.shape),
                "dtype": str(param.dtype).replace("torch.", ""),
            }
            if not param.requires_grad:  # frozen: not a trainable parameter
                attrs[name].update(op="buffer", frozen=True)
    return canonical, attrs, tensors


def capture_fx(
    model: nn.Module,
    batch: Any,
    losses_fn: LossesFn | None = None,
    *,
    leaf_depth: int | None = None,
    replay: bool = True,
    track_grad_mode: bool = True,
) -> StructuralCapture:
    """Trace ``losses_fn(model, batch)`` with :class:`BlockTracer`; convert to the contract.

    Raises whatever tracing raises (the caller records it and falls back). ``replay`` runs the
    traced program once on the batch for shapes, dtypes and autograd values; ``track_grad_mode``
    marks nodes created under ``torch.no_grad`` (switch it off to see what reconciliation does).
    """
    import time

    losses_fn = losses_fn or default_losses
    timings: dict[str, float] = {}
    flat = flatten_batch(batch)
    harness = Harness(model, losses_fn, flat)
    tracer = BlockTracer(model, leaf_depth=leaf_depth)
    start = time.perf_counter()
    with distribution_validation_off(), torch.enable_grad(), opaque_names(model, losses_fn):
        graph = tracer.trace(harness, concrete_args=tuple(fx.PH for _ in flat.tensor_positions))
    timings["fx_trace"] = time.perf_counter() - start
    if not track_grad_mode:
        for node in graph.nodes:
            node.meta["bf_grad_enabled"] = True
    specializations: list[str] = []
    constants = [
        f"{_key_name(path)}={leaf!r}"
        for i, (path, leaf) in enumerate(pytree.tree_flatten_with_path(batch)[0])
        if i not in set(flat.tensor_positions)
    ]
    if constants:
        shown = ", ".join(c if len(c) <= 40 else c[:37] + "..." for c in constants[:4])
        more = f" and {len(constants) - 4} more" if len(constants) > 4 else ""
        specializations.append(f"fx: non-tensor batch entries traced as constants: {shown}{more}")

    facts: dict[str, NodeFacts] = {}
    start = time.perf_counter()
    if replay:
        interpreter = Replay(harness, graph)
        previous = torch.is_grad_enabled()
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        try:
            with distribution_validation_off(), torch.random.fork_rng(devices=devices):
                interpreter.run(*flat.tensors)
            facts = interpreter.facts
        except Exception as exc:  # shapes are best effort
            specializations.append(f"fx: replay for shapes failed ({type(exc).__name__})")
            facts = {}
        finally:
            torch._C._set_grad_enabled(previous)
    timings["fx_replay"] = time.perf_counter() - start

    start = time.perf_counter()
    canonical, attrs, tensors = _param_attrs(model)
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    modules = dict(model.named_modules(remove_duplicate=False))
    placeholders = iter(flat.names)

    def classify(node: fx.Node) -> dict[str, Any]:
        module = node.meta.get("bf_module", "")
        if node.op == "placeholder":
            return {"op": "input", "name": next(placeholders), "target": "input", "module": ""}
        if node.op == "get_attr":
            target = str(node.target)
            if target in canonical:
                return {"op": "parameter", "param": canonical[target]}
            kind = "buffer"
            return {"op": kind, "target": "buffer" if target in buffers else "constant"} | {
                "module": target.rpartition(".")[0] if target in buffers else module
            }
        if node.op == "call_module":
            return {"op": "call", "module": str(node.target)}
        return {"op": "call", "module": module}

    def leaf_params(node: fx.Node) -> list[str]:
        module = modules[str(node.target)]
        prefix = f"{node.target}." if node.target else ""
        return list(dict.fromkeys(canonical[prefix + n] for n, _ in module.named_parameters()))

    def outputs(node: fx.Node) -> Mapping[str, Any]:
        out = node.args[0]
        if not isinstance(out, Mapping):
            raise TypeError(f"the traced losses are a {type(out).__name__}, not a mapping")
        return {str(k): v for k, v in out.items()}

    converted = to_dependency_graph(
        graph,
        classify=classify,
        facts=facts,
        outputs=outputs,
        target_of=lambda n: target_string(n, modules),
        leaf_params=leaf_params,
        grad_enabled=lambda n: n.meta.get("bf_grad_enabled", True),
        param_attrs=attrs,
    )
    dep_facts: dict[str, NodeFacts] | None = None
    if facts:
        dep_facts = {}
        for fx_name, fact in facts.items():
            dep_name = converted.name_of.get(fx_name)
            if dep_name is not None and converted.graph.nodes[dep_name].get("op") != "parameter":
                dep_facts.setdefault(dep_name, fact)  # aliases (broadcast to own shape): producer
    timings["fx_convert"] = time.perf_counter() - start
    return StructuralCapture(
        capture="fx",
        graph=converted.graph,
        losses=converted.losses,
        specializations=specializations,
        fx_graph=graph,
        root=harness,
        facts=dep_facts,
        param_tensors=tensors,
        timings=timings,
    )
