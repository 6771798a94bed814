"""``analyze(model, batch, losses=None, regularizers=("kl",))``: the library entry point."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from torch import nn

from blockfinder.autograd_capture import capture_autograd, parameter_names
from blockfinder.blocks import analyze_graph, names_of
from blockfinder.errors import BlockfinderError
from blockfinder.losses import LossesFn
from blockfinder.report import BlockReport


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
    if not isinstance(model, nn.Module):
        raise BlockfinderError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    truth = capture_autograd(model, batch, losses)
    timings["autograd_capture"] = time.perf_counter() - start
    loss_names = tuple(truth.losses)
    requested = tuple(dict.fromkeys(regularizers))
    unknown = [r for r in requested if r not in loss_names]
    if unknown and strict_regularizers:
        raise BlockfinderError(
            f"unknown regularizer {', '.join(map(repr, unknown))}: the losses are "
            f"{', '.join(loss_names)}"
        )
    regs = tuple(r for r in requested if r in loss_names)

    start = time.perf_counter()
    graph = truth.graph
    analysis = analyze_graph(graph, loss_names)
    timings["analysis"] = time.perf_counter() - start

    names, aliases = parameter_names(model)
    params: dict[str, frozenset[str]] = {}
    reach_of = {
        a["param"]: a["reach"] for _, a in graph.nodes(data=True) if a.get("op") == "parameter"
    }
    for param_id, name in names.items():
        del param_id
        params[name] = names_of(reach_of.get(name, 0), loss_names)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    params = {k: v for k, v in params.items() if k in trainable}
    return BlockReport(
        losses=loss_names,
        regularizers=regs,
        parameters=params,
        blocks=analysis.blocks,
        branch_points=analysis.branch_points,
        capture="autograd",
        specializations=[],
        aliases=aliases,
        graph=graph,
        loss_values={k: float(v.detach()) for k, v in truth.losses.items()},
        timings=timings,
    )
