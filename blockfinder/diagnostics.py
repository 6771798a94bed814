"""Conflict diagnostics: how the stream gradients of each branch point relate on real batches.

For every branch point and batch, the stream gradients are taken at the point during an ordinary
backward pass (the hook engine records them and passes the plain sum on, so training state is
untouched apart from ``.grad`` which is restored), and summarised as pairwise cosine similarities,
the norm ratio (largest / smallest stream norm) and the share of conflicting pairs (cosine < 0).
Strong conflict or norm ratios of orders of magnitude say where modality collapse is likely.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blockfinder.context import ModuleStack, OpRecorder, distribution_validation_off
from blockfinder.losses import LossesFn, call_losses, default_losses
from blockfinder.report import BlockReport


@dataclass
class _Recording:
    gradient: torch.Tensor
    weights: torch.Tensor


class _Recorder(nn.Module):
    """An aggregator that sums the streams (vanilla) and keeps their Gramian."""

    def __init__(self, sink: list[torch.Tensor]) -> None:
        super().__init__()
        self.sink = sink

    def forward(self, J, *, gramian=None, losses=None, activation=None):
        gramian = J @ J.T if gramian is None else gramian
        self.sink.append(gramian.detach().double().cpu())
        weights = torch.ones(J.shape[0], dtype=J.dtype, device=J.device)
        return _Recording(gradient=J.sum(dim=0), weights=weights)


def _summary(gramians: list[torch.Tensor]) -> dict[str, Any]:
    cosines, ratios, conflicts, norms = [], [], [], []
    for g in gramians:
        n = g.diagonal().clamp_min(0).sqrt()
        cos = g / torch.outer(n, n).clamp_min(1e-300)
        s = g.shape[0]
        upper = torch.triu_indices(s, s, 1)
        pairs = cos[upper[0], upper[1]]
        cosines.append(cos)
        positive = n[n > 0]
        ratios.append(float(positive.max() / positive.min()) if len(positive) else float("nan"))
        conflicts.append(float((pairs < 0).double().mean()) if len(pairs) else 0.0)
        norms.append(n)
    cos = torch.stack(cosines).mean(0)
    s = cos.shape[0]
    upper = torch.triu_indices(s, s, 1)
    pairs = cos[upper[0], upper[1]]
    return {
        "cosine": cos.tolist(),
        "mean_cosine": float(pairs.mean()) if len(pairs) else 1.0,
        "min_cosine": float(pairs.min()) if len(pairs) else 1.0,
        "norms": torch.stack(norms).mean(0).tolist(),
        "norm_ratio": float(torch.tensor(ratios).nanmean()),
        "conflict_share": float(torch.tensor(conflicts).mean()),
    }


def measure(
    model: nn.Module,
    batches: Iterable[Any],
    losses: LossesFn | None = None,
    report: BlockReport | None = None,
) -> dict[str, Any]:
    """Stream-gradient statistics of every branch point over ``batches`` (see module docstring).

    Every loss counts as a stream owner here (regularizers included), so the reconstruction-vs-KL
    split is measured too. Each entry names the matching branch point of ``report`` when one
    has the same streams and kind (``id``), and the autograd node it was measured on.
    """
    from impartial_train.engine.hooks import HookEngine, plan_surgery, point_keys
    from impartial_train.engine.stats import PointStats

    losses_fn = losses or default_losses
    saved = {name: p.grad for name, p in model.named_parameters()}
    records: dict[tuple, dict[str, Any]] = {}
    count = 0
    try:
        for batch in batches:
            count += 1
            modules = ModuleStack(model)
            recorder = OpRecorder(modules)
            with distribution_validation_off(), torch.enable_grad(), modules, recorder:
                values = call_losses(losses_fn, model, batch)
            names = list(values)
            trainable = {id(p) for p in model.parameters() if p.requires_grad}
            points = plan_surgery(values, names, trainable)
            if not points:
                continue  # no branch point (or no trainable parameter): nothing to measure
            sinks: list[list[torch.Tensor]] = []
            for point, key in zip(points, point_keys(points, names)):
                streams = key[2]
                if key not in records:
                    func, module = recorder.origin.get(point.node, (type(point.node).__name__, ""))
                    records[key] = {"streams": streams, "func": func, "module": module, "g": []}
                sinks.append(records[key]["g"])
            engine = HookEngine(rescale=False)
            engine.install(
                points,
                [_Recorder(s) for s in sinks],
                [PointStats("", []) for _ in points],
                [None] * len(points),
                values.values(),
            )
            model.zero_grad(set_to_none=True)
            torch.stack([v.reshape(()) for v in values.values()]).sum().backward()
    finally:
        for name, p in model.named_parameters():
            p.grad = saved[name]
    entries = []
    for rec in records.values():
        if not rec["g"]:
            continue
        entry = {
            "id": _match(report, rec["streams"], rec["module"]),
            "where": rec["module"] or "<top>",
            "op": rec["func"],
            "streams": [list(s) for s in rec["streams"]],
            **_summary(rec["g"]),
        }
        entries.append(entry)
    return {"batches": count, "branch_points": entries}


def _match(
    report: BlockReport | None, streams: tuple[tuple[str, ...], ...], module: str
) -> int | None:
    """The report's branch point with these streams (and, to break ties, this module)."""
    if report is None:
        return None
    wanted = {frozenset(s) for s in streams}
    found = [bp for bp in report.branch_points if set(bp.streams) == wanted]
    if len(found) > 1:
        found = [bp for bp in found if bp.where == (module or "<top>")] or found
    return found[0].id if len(found) == 1 else None
