"""``mgda``: MGDA-UB, the min-norm point of the convex hull (Sener & Koltun, NeurIPS 2018)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ._base import GramianAggregator
from ._solvers import CROSSOVER_ITERS, cosine_matrix, simplex_min_norm

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(GramianAggregator):
    r"""MGDA-UB: multiple-gradient descent on the shared representation.

    Paper: O. Sener, V. Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
    2018, arXiv:1810.04650. At a branch point the rows are gradients w.r.t. the shared
    representation, which is exactly the paper's upper-bound (UB) variant.

    Formula: :math:`w = \arg\min_{w \in \Delta_S} \|\sum_i w_i \tilde g_i\|^2` with
    :math:`\tilde g_i = g_i / \nu_i`, and :math:`A(J) = \sum_i w_i g_i`. The normaliser
    :math:`\nu_i` follows ``gradient_normalizers`` of the paper's code: ``none`` (1),
    ``l2`` (:math:`\|g_i\|`), ``loss`` (:math:`L_i`), ``loss+`` (:math:`L_i \|g_i\|`). As in the
    paper's code, the weights found on the normalised rows are applied to the raw rows.
    ``|L_i|`` is used (VAE losses may be negative); without ``losses``, a loss normaliser falls
    back to 1 (with a warning, once).

    Solver: on the unit rows, :math:`\min x^\top C x` s.t.
    :math:`\sum_i x_i n_{min}/n_i = 1, x \ge 0` (C the cosine matrix), then
    :math:`w \propto x_i / n_i`; this is insensitive to per-row scales. Up to 8 streams every
    support is solved at once (one batched solve of the 2^S - 1 bordered KKT systems; each
    candidate is made feasible and the least objective wins): exact, in a dozen tensor
    operations. Above 8 streams, ``iters`` iterations of a primal-dual interior-point method
    (Mehrotra predictor-corrector, batched LU) followed by a crossover (the supports the iterate
    points to are solved exactly; the best candidate wins). Either way the result satisfies the
    KKT conditions (every :math:`g_i \cdot d \ge \|d\|^2`, with equality on the support) to
    ~1e-9 of the squared row scale (tested up to 16 streams, degenerate cases included). A
    1e-12 ridge on C makes the solution unique (duplicate rows share their weight, to ~1e-3).
    If some row is zero, the min-norm point is 0: the weight goes to the zero rows.

    Properties (``none``): permutation invariant, positively homogeneous, non-conflicting
    (:math:`J A(J) \ge \|A(J)\|^2 \ge 0`). With a normaliser, still permutation invariant and
    positively homogeneous, not guaranteed non-conflicting. One stream: the identity. Stateless.

    Args:
        normalization: one of ``none`` (default), ``l2``, ``loss``, ``loss+``.
        iters: interior-point iterations before the crossover (more than 8 streams).
    """

    name = "mgda"

    @property
    def uses_losses(self) -> bool:  # type: ignore[override]
        return self.normalization in ("loss", "loss+")

    def __init__(self, normalization: str = "none", iters: int = CROSSOVER_ITERS) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"mgda: normalization must be one of {', '.join(NORMALIZATIONS)}; "
                f"got {normalization!r}"
            )
        self.normalization = normalization
        self.iters = int(iters)
        self._warned = False

    def _repr_options(self) -> dict:
        return {"normalization": self.normalization}

    def _normalisers(self, norms: Tensor, losses: Tensor | None) -> Tensor:
        ones = torch.ones_like(norms)
        kind = self.normalization
        if kind in ("loss", "loss+"):
            if losses is None:
                if not self._warned:
                    warnings.warn(
                        f"mgda: normalization {kind!r} needs the stream losses, which were not "
                        "given; using 1 instead of the loss",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    self._warned = True
                loss_part = ones
            else:
                a = losses.abs()
                loss_part = torch.where(torch.isfinite(a) & (a > 0), a, 1.0)
        else:
            loss_part = ones
        norm_part = torch.where(norms > 0, norms, 1.0) if kind in ("l2", "loss+") else ones
        return loss_part * norm_part

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        cos, norms, nonzero = cosine_matrix(gramian)
        if self.normalization != "none":
            norms = norms / self._normalisers(norms, losses)
        cos.diagonal().add_(1e-12)
        w = simplex_min_norm(cos, torch.where(nonzero, norms, 1.0), self.iters)
        zero = (~nonzero).to(w.dtype)
        count = zero.sum()
        w = torch.where(count > 0, zero / count, w)
        return torch.where(torch.isfinite(w).all(), w, 1.0 / s)
