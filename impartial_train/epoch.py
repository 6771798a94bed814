"""Per-epoch sums of one rank: loss values weighted by batch size, branch point statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from impartial_train.errors import TrainingError

__all__ = ["RESERVED_COLUMNS", "EpochState"]

RESERVED_COLUMNS = ("epoch", "split", "total", "examples", "branch_points")


class EpochState:
    """Sums of one epoch on one rank: loss values weighted by batch size, branch point stats."""

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names: list[str] | None = list(names) if names is not None else None
        self.sums: torch.Tensor | None = None
        self.count = 0
        self.steps = 0
        self.points: dict[str, dict[str, Any]] = {}
        self._seen: dict[str, Any] = {}

    def add_losses(self, losses: Mapping[str, torch.Tensor], n: int) -> None:
        if self.names is None:
            clash = [k for k in losses if k in RESERVED_COLUMNS]
            if clash:
                raise TrainingError(
                    f"loss name {clash[0]!r} clashes with a column of the metrics rows "
                    f"({', '.join(RESERVED_COLUMNS)}): rename that loss"
                )
            self.names = list(losses)
        elif list(losses) != self.names:
            missing = [k for k in self.names if k not in losses]
            extra = [k for k in losses if k not in self.names]
            raise TrainingError(
                "the losses changed during training (missing: "
                f"{', '.join(missing) or '-'}; new: {', '.join(extra) or '-'}): every batch must "
                "return the same named losses"
            )
        values = torch.stack([losses[k].detach().reshape(()).double() for k in self.names]) * n
        self.sums = values if self.sums is None else self.sums + values
        self.count += n
        self.steps += 1

    def add_stats(self, imodel: Any) -> None:
        stats = getattr(imodel, "_stats", None)
        if stats is None:  # pragma: no cover - older wrap: fall back to the public dicts
            return
        for st in stats.values():
            gramian = st.gramian
            if gramian is None or self._seen.get(st.where) is gramian:
                continue
            self._seen[st.where] = gramian
            size = len(st.streams)
            entry = self.points.setdefault(
                st.where,
                {"streams": ["+".join(s) for s in st.streams], "steps": 0, "skipped": 0},
            )
            weights = st.weights
            if gramian.shape[0] != size or weights is None or weights.shape[0] != size:
                entry["skipped"] += 1  # a stream was dropped (non-finite) this step
                continue
            scale = st.scale if st.scale is not None else torch.ones((), device=gramian.device)
            parts = {
                "weights": weights.detach().double(),
                "norms": st.norms.detach().double(),
                "cosine": st.cosine.detach().double(),
                "scale": torch.as_tensor(scale).detach().double().reshape(()),
            }
            for key, value in parts.items():
                entry[key] = value if key not in entry else entry[key] + value
            entry["steps"] += 1

    def running_means(self) -> dict[str, float]:
        if self.sums is None or not self.count or self.names is None:
            return {}
        values = (self.sums / self.count).tolist()
        return dict(zip(self.names, values))

    def point_means(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for where, entry in self.points.items():
            steps = entry["steps"]
            row: dict[str, Any] = {"streams": entry["streams"], "steps": steps}
            for key in ("weights", "norms", "cosine", "scale"):
                if key in entry and steps:
                    row[key] = (entry[key] / steps).cpu().tolist()
            if entry["skipped"]:
                row["steps_with_dropped_streams"] = entry["skipped"]
            out[where] = row
        return out

    def state(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "sums": None if self.sums is None else self.sums.cpu(),
            "count": self.count,
            "steps": self.steps,
            "points": {
                k: {kk: (vv.cpu() if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
                for k, v in self.points.items()
            },
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], device: torch.device) -> EpochState:
        self = cls(state.get("names"))
        sums = state.get("sums")
        self.sums = None if sums is None else sums.to(device)
        self.count = int(state.get("count", 0))
        self.steps = int(state.get("steps", 0))
        self.points = {
            k: {kk: (vv.to(device) if isinstance(vv, torch.Tensor) else vv) for kk, vv in v.items()}
            for k, v in state.get("points", {}).items()
        }
        return self
