"""The engines' self-check: surgery with the identity combination must give plain backward's
parameter gradients.

Run on the first step of each input structure (and of each newly built program). The identity
combination sums the streams through the engine's own machinery (hooks, countdowns, Branch
nodes, the rewritten program), so anything in that machinery that changes a gradient shows up
as a difference, whatever its cause: a hook the engine does not honour, a program that records
other gradient paths than the model, a bug. Gradients are taken with ``torch.autograd.grad`` on
the step's own graph (``retain_graph``), so ``.grad`` and the methods' state are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import BackwardCFunction

from blockfinder.errors import BlockfinderError


class SurgeryCheckError(BlockfinderError):
    """No engine reproduces plain backward with the identity combination on this model."""


@dataclass
class CheckResult:
    """The outcome of one self-check: the worst relative parameter-gradient difference, where it
    is, the tolerance it was held to and the seconds the check took."""

    worst: float
    parameter: str
    tolerance: float
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.worst <= self.tolerance

    def describe(self) -> str:
        if self.passed:
            return f"self-check passed (worst relative difference {self.worst:.1e}, " + (
                f"{1000 * self.seconds:.0f} ms)"
            )
        shown = "missing" if math.isinf(self.worst) else f"{self.worst:.2g} relative"
        return f"gradient of '{self.parameter}' differs from plain backward ({shown})"


def total_loss(losses: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The sum of the losses that carry gradient (None: none does)."""
    parts = [v.reshape(()) for v in losses.values() if v.requires_grad]
    if not parts:
        return None
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def parameter_gradients(
    losses: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """d(sum of losses)/d(params) on the losses' graph, which stays usable afterwards."""
    total = total_loss(losses)
    if total is None:
        return [None] * len(params)
    return list(torch.autograd.grad(total, params, retain_graph=True, allow_unused=True))


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance: summation order alone moves float32 results by ~1e-7."""
    return max(1e-4, 64 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


def compare(
    names: Sequence[str],
    plain: Sequence[torch.Tensor | None],
    got: Sequence[torch.Tensor | None],
) -> CheckResult:
    """The worst per-parameter difference ``|got - plain| / (|plain| + floor)`` (a missing
    gradient counts as zero) against the relative tolerance of the parameters' dtype.

    ``floor`` is the rounding noise of the largest gradient (64 eps of its norm) divided by the
    tolerance: a gradient that is mathematically zero (a bias in front of a batch norm) is
    rounding noise, which another summation order changes completely."""
    dtypes = [t.dtype for t in (*plain, *got) if t is not None]
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps, default=torch.float32)
    limit = tolerance(dtype)
    norms = [0.0 if p is None else float(p.detach().double().norm()) for p in plain]
    floor = 64 * torch.finfo(dtype).eps * max(norms, default=0.0) / limit + 1e-30
    worst, where = 0.0, ""
    for name, a, b, norm in zip(names, plain, got, norms):
        if a is None and b is None:
            continue
        if a is None or b is None:
            diff = float((a if a is not None else b).detach().double().norm())
        else:
            diff = float((a.detach().double() - b.detach().double()).norm())
        relative = diff / (norm + floor) if math.isfinite(diff) else math.inf
        if relative > worst:
            worst, where = relative, name
    return CheckResult(worst=worst, parameter=where, tolerance=limit)


def likely_cause(point: Any) -> str:
    """A guess, from the autograd nodes around a hook-engine branch point, at why surgery there
    changed a gradient."""
    nodes = (
        [point.node] + [c for c, _, _ in point.consumers] + [c for c, _, _ in point.split_consumers]
    )
    names = {type(n).__name__ for n in nodes}
    if any("BackwardHook" in n for n in names):
        return "a module backward hook at this value"
    if any(isinstance(n, BackwardCFunction) for n in nodes):
        return "a custom autograd.Function that uses this value"
    if point.split_consumers:
        return "a multi-output operation (chunk, split, unbind) that uses this value"
    return "an autograd feature the hook engine does not model"
