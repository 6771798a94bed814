"""Shared part of UPGrad and DualProj: weights from projections onto the dual cone of the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import cosine_matrix, project_dual_cone


class DualConeAggregator(GramianAggregator):
    """Weights ``w = sum_k v_k`` where ``v_k = argmin_{v >= lower_k} v^T G v`` (the projection of
    ``J^T lower_k`` onto the dual cone {x : J x >= 0}, Quinton & Rey 2024, Prop. 1); subclasses
    give the lower bounds (one row per projection) in ``_lower``.

    Args:
        reg: the ridge (>= 0) that makes each projection unique and bounded.
        iters: interior-point iterations (>= 1).
    """

    uses_losses = False

    def __init__(self, reg: float = 1e-10, iters: int = 20) -> None:
        super().__init__()
        if not reg >= 0:
            raise ValueError(f"{self.name}: reg must be >= 0, got {reg!r}")
        if int(iters) < 1:
            raise ValueError(f"{self.name}: iters must be >= 1, got {iters!r}")
        self.reg = float(reg)
        self.iters = int(iters)
        # The free sets of the last solution: the next step's likely support (a start only,
        # never a result; not state: the weights do not depend on it).
        self._free: Tensor | None = None

    def _repr_options(self) -> dict:
        return {"reg": self.reg}

    def _lower(self, s: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        raise NotImplementedError

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        cos, norms, nonzero = cosine_matrix(gramian)
        lower = self._lower(s, cos.dtype, cos.device)
        v, self._free = project_dual_cone(
            cos, norms, nonzero, lower, self.reg, self.iters, self._free
        )
        w = v.sum(0)
        return torch.where(torch.isfinite(w).all(), w, torch.full_like(w, 1.0 / s))
