"""``nsgd``: normalised stream gradients, as in the impartial-VAE paper's code."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import LazyStateMixin, RowScaler
from ._solvers import row_norms


class NSGD(LazyStateMixin, RowScaler):
    r"""NSGD: every stream gradient rescaled to one common norm.

    Source: the ``NSGD`` method of the code of A. Javaloy, M. Meghdadi, I. Valera, "Mitigating
    Modality Collapse in Multimodal VAEs via Impartial Optimization", ICML 2022,
    arXiv:2206.04496 (github.com/adrianjav/impartial-vaes, ``torchmoo/mtl.py``): normalised
    gradient descent in the multitask sense, as in the normalised-gradient baselines of
    Javaloy & Valera, "RotoGrad", ICLR 2022, arXiv:2103.02631.

    Formula: :math:`A(J) = \sum_i \frac{\nu}{\|g_i\|} g_i` with the common norm
    :math:`\nu = \sum_i \alpha_i \|g_i\|`, :math:`\alpha_i \propto \|g_i\| / \|g_i^{(0)}\|`
    (convergence ratios), where :math:`\|g_i^{(0)}\|` are the norms recorded at call number
    ``update_at`` (counting from 0) and 1 before that, as in the reference code (so before
    ``update_at`` the common norm is :math:`\sum \|g_i\|^2 / \sum \|g_i\|`). A zero row stays
    zero; a zero recorded norm counts as ratio 0.

    Properties: positively homogeneous; permutation invariant (for a fresh state); not
    non-conflicting. One stream: the identity. Row scaling. **Stateful**: ``initial_norms`` and
    ``counter`` round-trip through ``state_dict``.

    Args:
        update_at: call index at which the reference norms are recorded (reference code: 20).
        num_streams: S, to size the state at construction.
    """

    name = "nsgd"
    uses_losses = False
    _lazy_state = ("initial_norms",)
    initial_norms: Tensor
    counter: Tensor

    def __init__(self, update_at: int = 20, num_streams: int | None = None) -> None:
        super().__init__()
        self.update_at = int(update_at)
        s = int(num_streams) if num_streams else 0
        self.register_buffer("initial_norms", torch.ones(s))
        self.register_buffer("counter", torch.zeros((), dtype=torch.long))

    def _repr_options(self) -> dict:
        return {"update_at": self.update_at}

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        norms = row_norms(gramian)
        initial = torch.ones_like(norms)
        if self._state_fits("initial_norms", s, lambda: torch.ones(s, device=dev)):
            record = self.counter.to(dev) == self.update_at
            initial = torch.where(record, norms, self.initial_norms.to(dev, dt))
            self.initial_norms.copy_(initial)
        self.counter.add_(1)
        ratio = torch.where(initial > 0, norms / torch.where(initial > 0, initial, 1.0), 0.0)
        total = ratio.sum()
        alpha = torch.where(total > 0, ratio / torch.where(total > 0, total, 1.0), 1.0 / s)
        common = (alpha * norms).sum()
        return torch.where(norms > 0, common / torch.where(norms > 0, norms, 1.0), 0.0)
