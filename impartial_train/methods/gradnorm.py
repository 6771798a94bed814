"""``gradnorm``: gradient normalisation with learnable loss weights (Chen et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import LazyStateMixin, RowScaler
from ._solvers import row_norms


class GradNorm(LazyStateMixin, RowScaler):
    r"""GradNorm: learnable per-stream weights that equalise the weighted gradient norms.

    Paper: Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich, "GradNorm: Gradient
    Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018,
    arXiv:1711.02257.

    Formula: weights :math:`w` (an ``nn.Parameter``, ``self.weight``), :math:`G_i = w_i \|g_i\|`,
    :math:`\bar G = \mathrm{mean}_i G_i`, relative inverse training rate
    :math:`r_i = \tilde L_i / \mathrm{mean}_j \tilde L_j` with :math:`\tilde L_i = L_i(t)/L_i(0)`
    (the losses of the first call that passes ``losses``; without losses :math:`r_i = 1`, the
    equal-norm variant). The GradNorm loss
    :math:`L_{grad} = \sum_i |G_i - \bar G\, r_i^\alpha|` (target :math:`\bar G r_i^\alpha` held
    constant) is differentiated in closed form, :math:`\partial L_{grad}/\partial w_i =
    \mathrm{sign}(G_i - \bar G r_i^\alpha) \|g_i\|`, and **accumulated into** ``weight.grad``
    during ``forward`` (training mode only), so the user's optimizer (which must include
    ``aggregator.parameters()``) updates the weights at its next step. At each call the weights
    are first clipped at 0 and renormalised to sum to S (in place), as in the paper; the
    aggregate is :math:`\sum_i w_i g_i`.

    Deviation (default ``scale_invariant=True``): :math:`L_{grad}` is divided by :math:`\bar G`
    (held constant), so the weight update does not depend on the gradients' scale (mixed
    precision loss scaling, branch points of very different magnitude). ``False`` gives the
    paper's raw gradient. Loss ratios use the losses as given (GradNorm assumes positive
    losses); a non-positive or non-finite ratio counts as 0 and a zero initial loss as ratio 1.

    Properties: positively homogeneous; permutation invariant only for a fresh state (the
    weights are tied to stream indices); not non-conflicting. One stream: the identity (w = 1).
    Row scaling (may come first in ``gradnorm+pcgrad``). **Stateful**: ``weight`` (Parameter)
    and ``initial_losses`` (buffer) round-trip through ``state_dict``; both are sized by
    ``num_streams`` or at the first call (the Parameter keeps its identity, so an optimizer
    built before the first call still works). If S differs from the state, that step uses
    w = 1 and touches nothing.

    Args:
        alpha: restoring-force exponent (paper: 1.5 by default, task dependent).
        num_streams: S, to create the weights at construction.
        scale_invariant: divide the GradNorm loss by the mean weighted norm (see above).
    """

    name = "gradnorm"
    _lazy_state = ("weight", "initial_losses")
    initial_losses: Tensor

    def __init__(
        self, alpha: float = 1.5, num_streams: int | None = None, scale_invariant: bool = True
    ) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.scale_invariant = bool(scale_invariant)
        s = int(num_streams) if num_streams else 0
        self.weight = nn.Parameter(torch.ones(s))
        self.register_buffer("initial_losses", torch.zeros(0))

    def _repr_options(self) -> dict:
        return {"alpha": self.alpha, "scale_invariant": self.scale_invariant}

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        if not self._state_fits("weight", s, lambda: torch.ones(s, device=dev)):
            return torch.ones(s, dtype=dt, device=dev)
        with torch.no_grad():
            w = self.weight.detach().to(dev, dt).clamp_min(0.0)
            total = w.sum()
            w = torch.where(total > 0, w * (s / torch.where(total > 0, total, 1.0)), 1.0)
            self.weight.copy_(w)
        norms = row_norms(gramian)
        weighted = w * norms
        mean_norm = weighted.mean()
        target = mean_norm.expand(s)
        if losses is not None:  # noqa: SIM102 - the state is only touched when losses come
            if self._state_fits("initial_losses", s, lambda: losses.to(dev)):
                initial = self.initial_losses.to(dev, dt)
                ok = torch.isfinite(initial) & (initial != 0)
                ratio = torch.where(ok, losses / torch.where(ok, initial, 1.0), 1.0)
                ratio = torch.where(torch.isfinite(ratio), ratio, 0.0).clamp_min(0.0)
                mean_ratio = ratio.mean()
                rel = torch.where(mean_ratio > 0, ratio / mean_ratio.clamp_min(1e-300), 1.0)
                target = mean_norm * rel**self.alpha
        grad = torch.sign(weighted - target) * norms
        if self.scale_invariant:
            grad = torch.where(mean_norm > 0, grad / mean_norm.clamp_min(1e-300), 0.0)
        if self.training and self.weight.requires_grad:
            g = grad.to(self.weight.dtype)
            if self.weight.grad is None:
                self.weight.grad = g
            else:
                self.weight.grad.add_(g)
        return w
