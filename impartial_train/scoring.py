"""Scoring a comparison: metric directions, seed statistics, paired wins and the "best" mark.

Used by ``impartial-train --compare`` and ``--seeds`` (``compare.json``, the printed table):

- **Directions.** Losses (every column of the training rows: each loss and ``total``) are lower
  is better. ``evaluate()`` metrics have the direction the model file declares in
  ``METRICS = {"name": "max", "error*": "min"}`` (exact names first, then glob patterns in the
  order given). An undeclared metric has no direction: it is tabulated, never marked best and
  counted in no win.
- **Seeds.** Per method and column: the value of every seed (``None`` where a run has none or a
  non-finite one), mean and standard deviation (n - 1; 0 for one seed) of the finite ones.
- **Paired wins against the reference** (the first method): per seed where both have a finite
  value, which is lower / higher / equal; ``wins`` is the count in the column's better
  direction.
- **Best.** A method is marked best in a directed column only if it beats every other method in
  every seed, paired by seed (strictly; a missing value loses). With one seed this is the best
  value; with several it is the method that wins across seeds, and often none is.
"""

from __future__ import annotations

import fnmatch
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SeedStats",
    "best_methods",
    "directions",
    "paired_counts",
    "seed_stats",
]


def directions(
    columns: Iterable[str], losses: Iterable[str], declared: Mapping[str, str] | None
) -> dict[str, str | None]:
    """``{column: "min" | "max" | None}`` (see the module docstring)."""
    losses = set(losses)
    declared = dict(declared or {})
    out: dict[str, str | None] = {}
    for column in columns:
        if column in losses:
            out[column] = "min"
        elif column in declared:
            out[column] = declared[column]
        else:
            out[column] = next(
                (way for pattern, way in declared.items() if fnmatch.fnmatchcase(column, pattern)),
                None,
            )
    return out


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class SeedStats:
    """One method's values of one column over the seeds."""

    values: list[float | None] = field(default_factory=list)

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def n(self) -> int:
        return len(self.finite)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.finite) if self.finite else None

    @property
    def std(self) -> float | None:
        if not self.finite:
            return None
        return statistics.stdev(self.finite) if len(self.finite) > 1 else 0.0


def seed_stats(
    finals: Mapping[str, Sequence[Mapping[str, Any]]], columns: Sequence[str]
) -> dict[str, dict[str, SeedStats]]:
    """``{method: {column: SeedStats}}`` from each method's final rows, one per seed (in the
    same seed order for every method)."""
    return {
        method: {c: SeedStats([_finite(row.get(c)) for row in rows]) for c in columns}
        for method, rows in finals.items()
    }


def paired_counts(
    mine: SeedStats, reference: SeedStats, direction: str | None
) -> dict[str, int | None]:
    """Seeds where ``mine`` is lower / higher / equal to ``reference`` (both finite), and the
    wins in ``direction`` (``None`` without one)."""
    lower = higher = equal = 0
    for a, b in zip(mine.values, reference.values):
        if a is None or b is None:
            continue
        if a < b:
            lower += 1
        elif a > b:
            higher += 1
        else:
            equal += 1
    wins = {"min": lower, "max": higher}.get(direction) if direction else None
    return {
        "lower": lower,
        "higher": higher,
        "equal": equal,
        "n": lower + higher + equal,
        "wins": wins,
    }


def _beats(a: float | None, b: float | None, direction: str) -> bool:
    if a is None:
        return False
    if b is None:
        return True
    return a < b if direction == "min" else a > b


def best_methods(
    stats: Mapping[str, Mapping[str, SeedStats]], directions_: Mapping[str, str | None]
) -> dict[str, str]:
    """``{column: method}`` for the directed columns where one method beats every other method
    in every seed (see the module docstring); needs at least two methods."""
    methods = list(stats)
    best: dict[str, str] = {}
    if len(methods) < 2:
        return best
    for column, direction in directions_.items():
        if direction is None:
            continue
        for method in methods:
            mine = stats[method][column].values
            if not mine or any(v is None for v in mine):
                continue
            if all(
                _beats(a, b, direction)
                for other in methods
                if other != method
                for a, b in zip(mine, stats[other][column].values)
            ):
                best[column] = method
                break
    return best
