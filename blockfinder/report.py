"""Result dataclasses of an analysis: :class:`BranchPoint`, :class:`ImpartialityBlock`,
:class:`BlockReport`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import networkx as nx

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BranchPoint:
    """A shared node whose differentiable users fall into >= 2 groups with different reach sets.

    In backward, the gradients of the groups (the *streams*) join here.
    """

    id: int
    block: int
    kind: Literal["activation", "parameter"]
    where: str  # module path (activation) or parameter name (parameter)
    node: str  # graph node name
    shape: tuple[int, ...] | None
    streams: tuple[frozenset[str], ...]  # reach set (loss names) of each stream, in a stable order
    users: tuple[tuple[str, ...], ...] = ()  # graph node names of the users in each stream

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "block": self.block,
            "kind": self.kind,
            "where": self.where,
            "node": self.node,
            "shape": list(self.shape) if self.shape is not None else None,
            "streams": [sorted(s) for s in self.streams],
        }


@dataclass(frozen=True)
class ImpartialityBlock:
    """A maximal connected set of shared nodes: where the gradients of two or more losses meet."""

    id: int
    losses: frozenset[str]
    nodes: tuple[str, ...]
    parameters: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "losses": sorted(self.losses),
            "nodes": len(self.nodes),
            "parameters": list(self.parameters),
        }


@dataclass
class BlockReport:
    """Everything an analysis found; ``to_json()`` gives schema version 1."""

    losses: tuple[str, ...]
    regularizers: tuple[str, ...]
    parameters: dict[str, frozenset[str]]
    blocks: list[ImpartialityBlock]
    branch_points: list[BranchPoint]
    capture: str
    specializations: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. which capture layers failed and why
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    graph: nx.DiGraph | None = None
    loss_values: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The losses that take part in surgery (every loss but the regularizers)."""
        return tuple(n for n in self.losses if n not in self.regularizers)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "capture": self.capture,
            "specializations": list(self.specializations),
            "losses": list(self.losses),
            "regularizers": list(self.regularizers),
            "parameters": {k: sorted(v) for k, v in self.parameters.items()},
            "blocks": [b.to_json() for b in self.blocks],
            "branch_points": [b.to_json() for b in self.branch_points],
        }
        if self.differences:
            out["differences"] = list(self.differences)
        if self.notes:
            out["notes"] = list(self.notes)
        if self.aliases:
            out["aliases"] = {k: list(v) for k, v in self.aliases.items()}
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        return out

    def dumps(self, indent: int = 2) -> str:
        """``to_json()`` as strict JSON text: NaN and infinities (e.g. a diagnostic of a stream
        with a zero gradient) become null, sets become sorted lists."""
        plain = json.loads(json.dumps(self.to_json(), default=_json_default))
        return json.dumps(_finite_or_null(plain), indent=indent, allow_nan=False)

    def shared_parameters(self) -> Mapping[str, frozenset[str]]:
        """Parameters reached by two or more losses."""
        return {k: v for k, v in self.parameters.items() if len(v) >= 2}


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, frozenset | set):
        return sorted(obj)
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _finite_or_null(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON has no literal for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_null(v) for v in obj]
    return obj
