"""``graddrop``: gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import Aggregation, Aggregator, RandomMixin, _compute_dtype, check_matrix


class GradDrop(RandomMixin, Aggregator):
    r"""GradDrop, "Just Pick a Sign".

    Paper: Z. Chen, J. Ngiam, Y. Huang, T. Luong, H. Kretzschmar, Y. Chai, D. Anguelov, "Just Pick
    a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020,
    arXiv:2010.06808 (Algorithm 1).

    Formula, element-wise: with the sign-corrected gradients :math:`G_i = \mathrm{sign}(A) \circ
    \nabla_i` (A the activation at the branch point), the positive-sign purity
    :math:`P = \frac12 (1 + \frac{\sum_i G_i}{\sum_i |G_i|})` and :math:`U \sim
    \mathrm{Uniform}[0, 1)` drawn per element, keep :math:`\nabla_i` where
    (:math:`U < P` and :math:`G_i \ge 0`) or (:math:`U \ge P` and :math:`G_i \le 0`):
    :math:`M_i = I[U<P] I[G_i \ge 0] + I[U \ge P] I[G_i \le 0]`, result
    :math:`\sum_i (\ell_i + (1-\ell_i) M_i) \circ \nabla_i` with the leak :math:`\ell_i`.

    Details: the contract passes the activation flattened to (D,), so P is per element. When the
    activation is passed with its shape instead (batch first, ``numel == D``), the paper's
    batch-separated form is used: :math:`G_i = \sum_{batch} \mathrm{sign}(A) \circ \nabla_i`, one
    P and mask per feature, broadcast over the batch. Without an activation, sign(A) = 1. An
    element with :math:`G_i = 0` (no sign information, e.g. a zero activation) is always kept,
    so that one stream is exactly the identity (the paper's indicator would drop it).

    Needs the rows themselves (not Gramian-only); weights: None (the masks are not one weight per
    row). Properties: permutation invariant (U is shared by the streams), positively homogeneous
    (the masks depend on signs and ratios only), not non-conflicting. Stateless apart from the
    per-device generator (``seed``; its state is saved in the state dict).

    Args:
        leak: leak :math:`\ell` in [0, 1], one float for all streams or one per stream.
        seed: seed of the generator.
    """

    name = "graddrop"
    uses_losses = False
    uses_activation = True

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(leak, str):
            raise ValueError(
                f"graddrop: leak must be a number or a sequence of numbers, got {leak!r}"
            )
        values = [float(leak)] if isinstance(leak, (int, float)) else [float(x) for x in leak]
        if any(not 0.0 <= x <= 1.0 for x in values):
            raise ValueError(f"graddrop: leak values must be in [0, 1], got {leak!r}")
        self.leak = leak if isinstance(leak, (int, float)) else tuple(values)
        self._init_random(seed)

    def _repr_options(self) -> dict:
        return {"leak": self.leak, "seed": self.seed}

    def forward(
        self,
        J: Tensor,
        *,
        gramian: Tensor | None = None,
        losses: Tensor | None = None,
        activation: Tensor | None = None,
    ) -> Aggregation:
        check_matrix(J)
        s, d = J.shape
        if s == 0:
            return Aggregation(J.new_zeros(d), None)
        cd = _compute_dtype(J.dtype)
        with torch.no_grad():
            grads = J.detach().to(cd)
            batch_shape: tuple[int, ...] | None = None
            if activation is None:
                signed = grads
            else:
                act = activation.detach().to(J.device)
                if act.numel() != d:
                    raise ValueError(
                        f"graddrop: activation has {act.numel()} elements, J has {d} columns"
                    )
                if act.dim() >= 2:
                    batch_shape = tuple(act.shape)
                    rows = grads.reshape(s, *batch_shape) * act.sign().to(cd)
                    signed = rows.sum(1).reshape(s, -1)
                else:
                    signed = grads * act.reshape(d).sign().to(cd)
            num = signed.sum(0)
            den = signed.abs().sum(0)
            purity = 0.5 * (1 + torch.where(den > 0, num / torch.where(den > 0, den, 1), 0))
            gen = self.generator(J.device)
            u = torch.rand(purity.shape, generator=gen, device=J.device, dtype=cd)
            pos = (u < purity).unsqueeze(0)
            mask = (pos & (signed >= 0)) | (~pos & (signed <= 0))
            mask = mask.to(cd)
            if isinstance(self.leak, tuple):
                if len(self.leak) != s:
                    raise ValueError(f"graddrop: {len(self.leak)} leak values for {s} streams")
                leak = torch.tensor(self.leak, dtype=cd, device=J.device).unsqueeze(1)
                mask = leak + (1 - leak) * mask
            elif self.leak:
                mask = self.leak + (1 - self.leak) * mask
            if batch_shape is not None:
                mask = mask.reshape(s, 1, -1).expand(s, batch_shape[0], mask.shape[1])
                mask = mask.reshape(s, d)
        gradient = (mask * J.to(cd)).sum(0)
        return Aggregation(gradient.to(J.dtype), None)
