"""Combining the stream gradients of one branch point: shared by both engines."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from impartial_train.engine.stats import PointStats

# Relative norm of the combined gradient under which it is not rescaled (see combine_streams).
_STATIONARY = 1e-6


def combine_streams(
    stash: Sequence[torch.Tensor | None],
    method: torch.nn.Module,
    stats: PointStats,
    losses: torch.Tensor | None = None,
    rescale: bool = True,
    gramian_hook: Callable[[torch.Tensor], torch.Tensor] | None = None,
    activation: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Aggregate the streams' gradients (``None``: the stream sent none this step).

    Non-finite streams are dropped for this step and listed in ``stats.dropped``; if every
    stream is non-finite the plain sum is returned, so that the user's usual NaN handling (e.g.
    ``GradScaler`` skipping the step) applies. With ``rescale`` the result is scaled to the norm of
    the plain sum (Javaloy et al. 2022, as in their code). ``activation`` is the forward value at
    the branch point, for methods that read it (GradDrop). Returns a flat (D,) tensor.
    """
    present = [i for i, g in enumerate(stash) if g is not None]
    if not present:
        return None
    rows = torch.stack([stash[i].reshape(-1) for i in present])
    stats.dropped = []
    work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    # float64 Gramian: nearly colinear streams (the common case at a shared trunk) lose their
    # differences in float32 inner products, and the S x S solves amplify that.
    rows64 = work.double()
    gramian = rows64 @ rows64.T
    # A row is finite exactly when its squared norm is (float64 cannot overflow on finite
    # float32 rows), so the diagonal tells without another pass over the S x D rows.
    finite = torch.isfinite(gramian.diagonal())
    if not bool(finite.all()):
        keep = [i for i, ok in zip(present, finite.tolist()) if ok]
        stats.dropped = [i for i in present if i not in keep]
        if not keep:
            stats.gramian, stats.weights = None, None
            return rows.sum(dim=0)
        rows, work = rows[finite], work[finite]
        gramian = gramian[finite][:, finite]
        present = keep
    if gramian_hook is not None:
        gramian = gramian_hook(gramian)
    stream_losses = losses[present] if losses is not None else None
    if len(present) == 1:
        gradient = work[0]
        weights = torch.ones(1, dtype=work.dtype, device=work.device)
    else:
        result = method(work, gramian=gramian, losses=stream_losses, activation=activation)
        gradient, weights = result.gradient, result.weights
    if rescale:
        g64 = gramian.double()
        target = g64.sum().clamp_min(0).sqrt()
        if weights is not None:
            w = weights.double()
            current = (w @ g64 @ w).clamp_min(0).sqrt()
        else:
            current = gradient.double().norm()
        # At (numerically) Pareto-stationary points MGDA, PCGrad or CAGrad can return a
        # combined gradient orders of magnitude below the plain sum; scaling that noise up to the
        # sum's norm overflowed float32 and made training diverge (MGDA on movies and wine in
        # docs/results.md). Below 1e-6 of the sum's norm the small step is kept as it is.
        significant = current > _STATIONARY * target
        scale = torch.where(significant, target / current.clamp_min(1e-300), 1.0)
        gradient = gradient * scale.to(gradient.dtype)
        stats.scale = scale
    stats.gramian = gramian.detach()
    stats.weights = None if weights is None else weights.detach()
    return gradient.to(rows.dtype)
