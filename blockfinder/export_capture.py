"""Fallback structural captures: ``torch.export.export(strict=False)``, then ``draft_export``.

Both give an aten-level fx graph with the best metadata (``nn_module_stack`` per node,
``graph_signature`` for parameters and buffers), converted to the same dependency-graph contract as
the fx capture (:func:`blockfinder.fx_capture.to_dependency_graph`). Differences handled here:

- parameters arrive as placeholders; tied weights may be lifted under either name: canonicalized
  by identity;
- ``torch.no_grad`` regions arrive as ``wrap_with_set_grad_enabled(False, ...)`` calls (or
  ``_set_grad_enabled`` nodes): no gradient edges into them;
- tuple-returning aten ops (``split``, ``chunk``, ``unbind``, ``broadcast_tensors`` inside
  ``mse_loss`` and distribution constructors) are reasoned about per output (``getitem``), and the
  i-th output of ``broadcast_tensors`` depends on the i-th input only;
- export specialises on the example batch's shapes, and draft_export keeps the branch the example
  batch took at each data-dependent ``if``: both are recorded in ``specializations``.

Nothing global is changed for good: distribution validation, grad mode, RNG state, log levels,
stderr, module training flags and hooks are restored even when export fails.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from blockfinder.context import distribution_validation_off, preserved_modules
from blockfinder.fx_capture import (
    Harness,
    NodeFacts,
    StructuralCapture,
    _param_attrs,
    flatten_batch,
    op_name,
    target_string,
    to_dependency_graph,
)
from blockfinder.losses import LossesFn, default_losses

_LOGGERS = (
    "torch._export",
    "torch.export",
    "torch._dynamo",
    "torch.fx.experimental.symbolic_shapes",
    "torch._subclasses.fake_tensor",
    "torch._functorch",
)  # not "torch.__trace": draft_export reads its report from that logger


@contextmanager
def quiet_export() -> Iterator[None]:
    """Silence export's warnings and log lines while capturing; restore the levels after."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        # export prints the partial graph of a failed trace to stderr itself
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _facts(node: fx.Node) -> NodeFacts:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        dtype = val.dtype
        try:
            shape = tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):
            shape = None
        return NodeFacts(
            kind="tensor",
            shape=shape,
            dtype=str(dtype).replace("torch.", ""),
            floating=dtype.is_floating_point or dtype.is_complex,
        )
    if isinstance(val, (tuple, list)):
        return NodeFacts(kind="container")
    if val is None:
        return NodeFacts()
    return NodeFacts(kind="other", requires_grad=False)


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = next(reversed(stack.values()))[0]
    return path if isinstance(path, str) else ""


def _is_set_grad_hop(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node.target) == "wrap_with_set_grad_enabled"


def _grad_modes(graph: fx.Graph) -> dict[str, bool]:
    """Grad mode of every node: ``_set_grad_enabled`` calls switch it in program order."""
    modes: dict[str, bool] = {}
    enabled = True
    for node in graph.nodes:
        if node.op == "call_function" and op_name(node.target) == "_set_grad_enabled":
            enabled = bool(node.args[0]) if node.args else enabled
        modes[node.name] = enabled
        if _is_set_grad_hop(node) and node.args and node.args[0] is False:
            modes[node.name] = False
    return modes


def _specializations(capture: str, flat_names: list[str], tensors: list[torch.Tensor]) -> str:
    shapes = ", ".join(
        f"{name}: [{', '.join(map(str, t.shape))}]" for name, t in zip(flat_names, tensors)
    )
    return f"{capture}: input shapes specialised to the example batch ({shapes})"


def _draft_failures(ep: Any) -> list[str]:
    report = getattr(ep, "_report", None)
    if report is None:
        return []
    files = dict(getattr(report, "str_to_filename", {}) or {})
    try:  # file names interned by an earlier export are not repeated in the report
        from torch._logging.structured import INTERN_TABLE

        for name, index in INTERN_TABLE.items():
            files.setdefault(index, name)
    except ImportError:
        pass
    lines: list[str] = []
    for failure in getattr(report, "failures", []):
        data = getattr(failure, "data", {}) or {}
        kind = getattr(getattr(failure, "failure_type", None), "name", "FAILURE")
        stack = data.get("user_stack") or []
        where = ""
        if stack:
            frame = stack[-1]
            filename = frame.get("filename")
            filename = files.get(filename, filename) if isinstance(filename, int) else filename
            short = str(filename).rsplit("/", 1)[-1] if filename is not None else "?"
            code = str(frame.get("loc", "")).split("  #", 1)[0].strip()
            where = f" `{code}` ({short}:{frame.get('line')})"
        if kind == "DATA_DEPENDENT_ERROR":
            lines.append(
                f"draft_export: data-dependent branch{where} specialised to the example batch "
                f"({data.get('expr')} -> {data.get('result')})"
            )
        else:
            lines.append(f"draft_export: {kind.lower()}{where} specialised to the example batch")
    return lines


def capture_export(
    model: nn.Module,
    batch: Any,
    losses_fn: LossesFn | None = None,
    *,
    draft: bool = False,
) -> StructuralCapture:
    """Export ``losses_fn(model, batch)`` (``draft_export`` if ``draft``); convert to the contract.

    Raises whatever export raises (the caller records it and falls back).
    """
    losses_fn = losses_fn or default_losses
    flat = flatten_batch(batch)
    harness = Harness(model, losses_fn, flat)
    args = tuple(flat.tensors)
    start = time.perf_counter()
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with (
        distribution_validation_off(),
        torch.enable_grad(),
        quiet_export(),
        preserved_modules(model),
        torch.random.fork_rng(devices=devices),  # draft_export runs the model for real
    ):
        if draft:
            ep = torch.export.draft_export(harness, args, strict=False)
        else:
            ep = torch.export.export(harness, args, strict=False)
    capture = "draft_export" if draft else "export"
    timings = {capture: time.perf_counter() - start}
    start = time.perf_counter()
    graph = ep.graph
    signature = ep.graph_signature
    canonical, attrs, tensors = _param_attrs(model)
    from torch.export.graph_signature import InputKind, OutputKind

    kinds: dict[str, tuple[str, str | None]] = {}
    user_inputs = iter(flat.names)
    for spec in signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        if spec.kind == InputKind.PARAMETER:
            kinds[name] = ("parameter", spec.target)
        elif spec.kind == InputKind.BUFFER:
            kinds[name] = ("buffer", spec.target)
        elif spec.kind == InputKind.USER_INPUT:
            kinds[name] = ("input", next(user_inputs, name))
        else:
            kinds[name] = ("constant", spec.target)
    modes = _grad_modes(graph)

    def classify(node: fx.Node) -> dict[str, Any]:
        if node.op == "placeholder":
            kind, target = kinds.get(node.name, ("constant", None))
            if kind == "parameter" and target in canonical:
                return {"op": "parameter", "param": canonical[target]}
            if kind == "input":
                return {"op": "input", "name": target, "target": "input", "module": ""}
            module = str(target or "").rpartition(".")[0] if kind == "buffer" else ""
            return {"op": "buffer", "target": kind, "module": module}
        if node.op == "get_attr":  # submodules of higher-order ops
            return {"op": "skip"}
        if node.op == "call_function" and op_name(node.target) in ("_set_grad_enabled",):
            return {"op": "skip"}
        return {"op": "call", "module": _module_of(node)}

    user_outputs = [
        i for i, spec in enumerate(signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT
    ]
    out_spec = ep.call_spec.out_spec

    def outputs(node: fx.Node) -> Mapping[str, Any]:
        values = node.args[0]
        nodes = [values[i] for i in user_outputs]
        tree = pytree.tree_unflatten(nodes, out_spec) if out_spec is not None else nodes
        if not isinstance(tree, Mapping):
            raise TypeError(f"the exported losses are a {type(tree).__name__}, not a mapping")
        return {str(k): v for k, v in tree.items()}

    facts = {node.name: _facts(node) for node in graph.nodes}
    converted = to_dependency_graph(
        graph,
        classify=classify,
        facts=facts,
        outputs=outputs,
        target_of=lambda n: target_string(n, None),
        grad_enabled=lambda n: modes.get(n.name, True),
        param_attrs=attrs,
    )
    specializations = [_specializations(capture, flat.names, flat.tensors)]
    if draft:
        specializations += _draft_failures(ep)
    timings[f"{capture}_convert"] = time.perf_counter() - start
    return StructuralCapture(
        capture=capture,
        graph=converted.graph,
        losses=converted.losses,
        specializations=specializations,
        fx_graph=graph,
        root=None,
        param_tensors=tensors,
        timings=timings,
    )
