"""Combining the stream gradients of one branch point: shared by both engines."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from impartial_train.engine.stats import PointStats
from impartial_train.methods._base import GramianAggregator, RowScaler, prepare_losses

# Relative norm of the combined gradient under which it is not rescaled (see combine_streams).
_STATIONARY = 1e-6

# Methods whose forward is the generic "weights from the Gramian, then w @ J": the engine calls
# their ``weights`` directly with the Gramian it already has. This runs in every backward, where a
# tensor operation on S x S data costs microseconds of dispatch and nothing of arithmetic, so the
# generic path's re-checks (shape, float64 cast, symmetrisation, finiteness) are skipped here.
_WEIGHTS_ONLY = (GramianAggregator.forward, RowScaler.forward)


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
    grads = [stash[i] for i in present]
    if all(g.shape == grads[0].shape for g in grads):
        rows = torch.stack(grads).reshape(len(grads), -1)
    else:
        rows = torch.stack([g.reshape(-1) for g in grads])
    stats.dropped = []
    work = rows if rows.dtype in (torch.float32, torch.float64) else rows.float()
    # float64 Gramian: nearly colinear streams (the common case at a shared trunk) lose their
    # differences in float32 inner products, and the S x S solves amplify that.
    rows64 = work if work.dtype == torch.float64 else work.double()
    gramian = rows64 @ rows64.mT
    # A row is finite exactly when its squared norm is (float64 cannot overflow on finite
    # float32 rows), and the trace is finite exactly when every squared norm is: one reduction
    # instead of another pass over the S x D rows. Dropping streams changes S, so this is the one
    # value read back to the host per branch point.
    if not math.isfinite(gramian.trace().item()):
        finite = torch.isfinite(gramian.diagonal())
        keep = [i for i, ok in zip(present, finite.tolist()) if ok]
        stats.dropped = [i for i in present if i not in keep]
        if not keep:
            stats.gramian, stats.weights = None, None
            return rows.sum(dim=0)
        rows, work, rows64 = rows[finite], work[finite], rows64[finite]
        gramian = gramian[finite][:, finite]
        present = keep
    if gramian_hook is not None:
        gramian = gramian_hook(gramian)
    stream_losses = losses
    if losses is not None and len(present) < len(stash):
        stream_losses = losses[present]
    if len(present) == 1:
        gradient, weights = None, torch.ones(1, dtype=torch.float64, device=work.device)
    elif type(method).forward in _WEIGHTS_ONLY:
        weights = method.weights(gramian, prepare_losses(stream_losses, work))
        gradient = None
    else:
        result = method(work, gramian=gramian, losses=stream_losses, activation=activation)
        gradient, weights = result.gradient, result.weights
    applied = weights
    if rescale:
        target2 = gramian.sum().clamp_min(0)
        if weights is not None:
            w = weights if weights.dtype == torch.float64 else weights.double()
            current2 = (w @ gramian) @ w
        else:
            current2 = gradient.double().square().sum()
        # At (numerically) Pareto-stationary points MGDA, PCGrad or CAGrad can return a
        # combined gradient orders of magnitude below the plain sum; scaling that noise up to the
        # sum's norm overflowed float32 and made training diverge (MGDA on movies and wine in
        # docs/results.md). Below 1e-6 of the sum's norm the small step is kept as it is.
        # (current2 <= 0 is never significant, so its quotient is never selected)
        significant = current2 > (_STATIONARY * _STATIONARY) * target2
        scale = torch.where(significant, (target2 / current2).sqrt(), 1.0)
        stats.scale = scale.detach() if scale.requires_grad else scale
        if gradient is None:
            applied = weights * scale
        else:
            gradient = gradient * scale.to(gradient.dtype)
    if gradient is None:
        if getattr(method, "exact_combination", False):
            # large weights whose combination cancels (near Pareto-stationary rows): float64
            gradient = applied.to(torch.float64) @ rows64
        else:
            gradient = applied.to(work.dtype) @ work
    # (tensors of a backward without create_graph never require grad: nothing to detach)
    stats.gramian = gramian.detach() if gramian.requires_grad else gramian
    if weights is not None and weights.requires_grad:
        weights = weights.detach()
    stats.weights = weights
    return gradient if gradient.dtype == rows.dtype else gradient.to(rows.dtype)
