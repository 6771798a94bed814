"""Per-branch-point statistics of the last backward pass, from the Gramian computed anyway."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PointStats:
    """What happened at one branch point in the last backward.

    Tensors are kept on the device they were computed on and converted only when read
    (``to_dict``), so logging never forces a device synchronisation inside backward.
    """

    where: str
    streams: list[list[str]]
    gramian: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    dropped: list[int] = field(default_factory=list)
    scale: torch.Tensor | None = None

    @property
    def norms(self) -> torch.Tensor | None:
        if self.gramian is None:
            return None
        return self.gramian.diagonal().clamp_min(0).sqrt()

    @property
    def cosine(self) -> torch.Tensor | None:
        if self.gramian is None:
            return None
        norms = self.norms
        denom = torch.outer(norms, norms).clamp_min(torch.finfo(self.gramian.dtype).tiny)
        return (self.gramian / denom).clamp(-1.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        def plain(t: torch.Tensor | None):
            return None if t is None else t.detach().double().cpu().tolist()

        return {
            "where": self.where,
            "streams": self.streams,
            "norms": plain(self.norms),
            "cosine": plain(self.cosine),
            "weights": plain(self.weights),
            "dropped": list(self.dropped),
        }
