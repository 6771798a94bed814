"""``pcgrad``: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator, RandomMixin, random_orders


class PCGrad(RandomMixin, GramianAggregator):
    r"""PCGrad, "Gradient Surgery for Multi-Task Learning".

    Paper: T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman, C. Finn, NeurIPS 2020,
    arXiv:2001.06782 (Algorithm 1).

    Formula: for every stream i, start from :math:`g_i^{PC} = g_i`; for every other stream j in a
    random order, if :math:`g_i^{PC} \cdot g_j < 0` then
    :math:`g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\|g_j\|^2} g_j`
    (projection against the *original* g_j). Result :math:`\sum_i g_i^{PC}`.

    Computed in stream space: each :math:`g_i^{PC}` is tracked as coefficients :math:`C_i` over
    the rows (:math:`g_i^{PC} = C_i J`), so every inner product is read from the Gramian
    (:math:`g_i^{PC} \cdot g_j = (C G)_{ij}`); the weights are :math:`w = 1^\top C`. The S inner
    loops run simultaneously, one random permutation of the other streams per row, drawn from a
    ``torch.Generator`` seeded by ``seed`` (its state is saved in the state dict).

    Properties: positively homogeneous (the weights depend on the Gramian only through ratios);
    permutation invariant in distribution only (the order is random); for two streams the
    projected gradients and the result have no negative inner product with either stream
    (non-conflicting for S = 2, not in general). One stream: the identity. Stateless apart from
    the random generator.

    Args:
        seed: seed of the generator (None: non-deterministic).
        shuffle: draw a random order each call (as in the paper); ``False`` uses ascending order.
    """

    name = "pcgrad"
    uses_losses = False

    def __init__(self, seed: int | None = None, shuffle: bool = True) -> None:
        super().__init__()
        self._init_random(seed)
        self.shuffle = shuffle

    def _repr_options(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle}

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        coef = torch.eye(s, dtype=dt, device=dev)
        if s == 1:
            return coef[0]
        orders = random_orders(s, self.generator(dev) if self.shuffle else None, dev)
        sq = gramian.diagonal()
        inv_sq = torch.where(sq > 0, sq.reciprocal(), 0.0)
        # Step k projects every row i against j = orders[i, k] at once: dots from the rows
        # G[j] (G is symmetric), the 1/||g_j||^2 factors, and the one-hot matrices that write
        # the correction into column j, all gathered before the loop.
        targets = gramian[orders].unbind(1)
        factors = inv_sq[orders].unbind(1)
        # (a comparison, not F.one_hot, which checks its input's range on the host)
        columns = (orders.unsqueeze(-1) == torch.arange(s, device=dev)).to(dt).unbind(1)
        for g_j, f_j, e_j in zip(targets, factors, columns):
            dots = (coef * g_j).sum(-1)
            coef = torch.addcmul(coef, (dots.clamp_max(0.0) * f_j).unsqueeze(-1), e_j, value=-1.0)
        return coef.sum(0)
