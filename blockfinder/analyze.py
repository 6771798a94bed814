"""``analyze(model, batch, losses=None, regularizers=("kl",))``: the library entry point.

Capture in layers (docs/architecture.md, DESIGN decision 1): the autograd graph of one eager run is
the ground truth (always); the structural graph the user sees comes from the first of fx ->
export -> draft_export that succeeds, reconciled with the truth; if none does, the autograd graph
itself is analysed. Global state (RNG, buffers, training flags, hooks, grad mode, distribution
validation, patched names) is the same after the call as before, whatever happens.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd.function import BackwardCFunction
from torch.distributions import Distribution

from blockfinder.autograd_capture import AutogradCapture, capture_autograd
from blockfinder.blocks import analyze_graph, names_of, reach_bits
from blockfinder.context import preserved_modules
from blockfinder.errors import BlockfinderError, RegularizerError
from blockfinder.export_capture import capture_export
from blockfinder.fx_capture import StructuralCapture, capture_fx
from blockfinder.losses import LossesFn
from blockfinder.reconcile import reconcile
from blockfinder.report import BlockReport

CAPTURES = ("fx", "export", "draft_export")


def _capture_with(name: str, **options: Any) -> Callable[..., StructuralCapture]:
    if name == "fx":
        return lambda m, b, f: capture_fx(m, b, f, **options)
    if name == "export":
        return lambda m, b, f: capture_export(m, b, f)
    if name == "draft_export":
        return lambda m, b, f: capture_export(m, b, f, draft=True)
    raise BlockfinderError(f"unknown capture {name!r}: choose from {', '.join(CAPTURES)}")


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """One line: the exception type and the first line of its message."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore the RNG, the model's buffers, training flags and hooks, the grad mode, the
    distribution validation default and the garbage collector's state after the block, whatever
    happens inside (the collector is paused meanwhile)."""
    devices = sorted(
        {t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda}
    )
    buffers = [
        (module, name, buf, buf.detach().clone())
        for module in model.modules()
        for name, buf in module._buffers.items()
        if buf is not None
    ]
    validate = Distribution._validate_args
    collecting = gc.isenabled()
    gc.disable()  # captures allocate many small objects: cyclic GC passes would dominate
    try:
        with torch.random.fork_rng(devices=devices), preserved_modules(model):
            yield
    finally:
        if collecting:
            gc.enable()
        Distribution.set_default_validate_args(validate)
        with torch.no_grad():
            for module, name, original, saved in buffers:
                module._buffers[name] = original
                if original.shape == saved.shape:
                    original.copy_(saved)


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _refine_custom_functions(
    truth: AutogradCapture,
    model: nn.Module,
    params: dict[str, frozenset[str]],
) -> str | None:
    """A custom ``autograd.Function`` may return ``None`` for an input its graph node links to:
    the graph walk says the gradient flows, backward says it does not. When the truth graph has
    such nodes, ask backward (one ``autograd.grad`` per loss) which parameters each loss reaches.
    Returns a note when that could not be done."""
    if not any(isinstance(value[0], BackwardCFunction) for value in truth.value_of.values()):
        return None
    named = {name: p for name, p in model.named_parameters() if name in params}
    candidates = [name for name in named if params[name]]
    if not candidates:
        return None
    tensors = [named[name] for name in candidates]
    reached: dict[str, set[str]] = {name: set() for name in candidates}
    try:
        for loss, value in truth.losses.items():
            if value.grad_fn is None:
                continue
            grads = torch.autograd.grad(value, tensors, allow_unused=True, retain_graph=True)
            for name, grad in zip(candidates, grads):
                if grad is not None:
                    reached[name].add(loss)
    except Exception as exc:  # e.g. reentrant checkpointing does not support autograd.grad
        return f"custom autograd functions: backward check failed ({short_reason(exc)})"
    for name in candidates:
        params[name] = frozenset(reached[name]) & params[name]
    return None


def analyze(
    model: nn.Module,
    batch: Any,
    losses: LossesFn | None = None,
    regularizers: Iterable[str] = ("kl",),
    *,
    strict_regularizers: bool = False,
) -> BlockReport:
    """Find the impartiality blocks and branch points of ``model`` on one example ``batch``.

    ``losses(model, batch)`` must return a mapping of named scalar losses (default: ``model(batch)``
    does). Regularizers are analysed like any other loss and marked in the report; names that are
    not among the losses are ignored unless ``strict_regularizers`` (then a
    :class:`BlockfinderError` lists the valid names).
    """
    return run_analysis(model, batch, losses, regularizers, strict_regularizers=strict_regularizers)


def run_analysis(
    model: nn.Module,
    batch: Any,
    losses: LossesFn | None = None,
    regularizers: Iterable[str] = ("kl",),
    *,
    strict_regularizers: bool = False,
    captures: Iterable[str] = CAPTURES,
    leaf_depth: int | None = None,
    track_grad_mode: bool = True,
    threads: int | None = 1,
) -> BlockReport:
    """:func:`analyze` with the structural captures to try, in order (``()``: autograd only),
    the fx options (``leaf_depth``: modules that deep are opaque; ``track_grad_mode``) and the
    number of intra-op threads during the analysis (``None``: torch's setting).

    One thread by default: the analysis is Python-bound and runs the model on one example batch
    (twice: eager, then the fx replay); on a loaded machine, intra-op thread pools made those
    runs 5-20x slower (docs/benchmarks.md, "Analysis speed"). The setting is restored after."""
    if not isinstance(model, nn.Module):
        raise BlockfinderError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    captures = tuple(captures)
    for name in captures:
        _capture_with(name)
    with preserved_state(model), _intra_op_threads(threads):
        return _run(
            model,
            batch,
            losses,
            regularizers,
            strict_regularizers=strict_regularizers,
            captures=captures,
            fx_options={"leaf_depth": leaf_depth, "track_grad_mode": track_grad_mode},
        )


def _run(
    model: nn.Module,
    batch: Any,
    losses: LossesFn | None,
    regularizers: Iterable[str],
    *,
    strict_regularizers: bool,
    captures: tuple[str, ...],
    fx_options: dict[str, Any],
) -> BlockReport:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    truth = capture_autograd(model, batch, losses)
    timings["autograd_capture"] = time.perf_counter() - start
    loss_names = tuple(truth.losses)
    requested = tuple(dict.fromkeys(regularizers))
    unknown = [r for r in requested if r not in loss_names]
    if unknown and strict_regularizers:
        raise RegularizerError(tuple(unknown), loss_names)
    regs = tuple(r for r in requested if r in loss_names)

    start = time.perf_counter()
    reach = reach_bits(truth.graph, loss_names)
    reach_of = {
        a["param"]: reach[n] for n, a in truth.graph.nodes(data=True) if a.get("op") == "parameter"
    }
    # named_parameters() gives each tied parameter once, under its canonical (first) name
    params = {
        name: names_of(reach_of.get(name, 0), loss_names)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    refined = _refine_custom_functions(truth, model, params)
    timings["autograd_reach"] = time.perf_counter() - start

    structural: StructuralCapture | None = None
    notes: list[str] = []
    for name in captures:
        start = time.perf_counter()
        try:
            candidate = _capture_with(name, **fx_options)(model, batch, losses)
            if set(candidate.losses) != set(loss_names):
                raise BlockfinderError(
                    f"captured losses {sorted(candidate.losses)} differ from {sorted(loss_names)}"
                )
            structural = candidate
        except Exception as exc:  # a structural layer failing is expected: fall back
            notes.append(f"{name} capture failed ({short_reason(exc)})")
        finally:
            timings[name] = time.perf_counter() - start
        if structural is not None:
            break

    differences: list[str] = []
    specializations: list[str] = []
    if refined:
        notes.append(refined)
    if structural is not None:
        start = time.perf_counter()
        differences = reconcile(structural, params, loss_names).differences
        timings["reconcile"] = time.perf_counter() - start
        graph, capture = structural.graph, structural.capture
        timings.update(structural.timings)
        specializations = list(structural.specializations)
    else:
        graph, capture = truth.graph, "autograd"

    start = time.perf_counter()
    analysis = analyze_graph(graph, loss_names)
    timings["analysis"] = time.perf_counter() - start
    return BlockReport(
        losses=loss_names,
        regularizers=regs,
        parameters=params,
        blocks=analysis.blocks,
        branch_points=analysis.branch_points,
        capture=capture,
        specializations=specializations,
        differences=differences,
        notes=notes,
        aliases=truth.aliases,
        graph=graph,
        loss_values={k: float(v.detach()) for k, v in truth.losses.items()},
        timings=timings,
    )
