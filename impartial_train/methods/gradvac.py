"""``gradvac``: Gradient Vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator, LazyStateMixin, RandomMixin, random_orders
from ._solvers import row_norms

# Targets are clipped to |phi_hat| <= this value inside the update formula, whose denominator
# sqrt(1 - phi_hat^2) vanishes for a target of +-1 (e.g. after many steps with duplicate rows).
_TARGET_LIMIT = 1.0 - 1e-4


class GradVac(LazyStateMixin, RandomMixin, GramianAggregator):
    r"""Gradient Vaccine.

    Paper: Z. Wang, Y. Tsvetkov, O. Firat, Y. Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021, arXiv:2010.05874
    (Algorithm 2).

    Formula: for every stream i, :math:`g_i' = g_i`; for every other stream j in random order, with
    :math:`\phi_{ij} = \cos(g_i', g_j)` and the EMA target :math:`\hat\phi_{ij}`:
    if :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math:: g_i' \leftarrow g_i' + \frac{\|g_i'\| (\hat\phi_{ij}\sqrt{1-\phi_{ij}^2}
              - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2})}{\|g_j\| \sqrt{1-\hat\phi_{ij}^2}} g_j ,

    and always :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij}`
    (targets start at 0). Result :math:`\sum_i g_i'`. As for PCGrad, each :math:`g_i'` is tracked
    as coefficients over the rows and all quantities come from the Gramian.

    Properties: positively homogeneous (cosines and norm ratios only); permutation invariant in
    distribution only; not non-conflicting in general. One stream: the identity. **Stateful**:
    the S x S targets (buffer ``targets``, sized at the first call or by ``num_streams``) and the
    generator state round-trip through ``state_dict``. If S differs from the stored state (the
    engine dropped a stream), the step runs with zero targets and leaves the state unchanged.

    Args:
        beta: EMA rate of the targets (the paper uses 1e-2).
        seed, shuffle: random order as in :class:`PCGrad`.
        num_streams: S, to size the state at construction (else at the first call).
    """

    name = "gradvac"
    uses_losses = False
    _lazy_state = ("targets",)
    targets: Tensor

    def __init__(
        self,
        beta: float = 0.01,
        seed: int | None = None,
        shuffle: bool = True,
        num_streams: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
        self._init_random(seed)
        self.beta = float(beta)
        self.shuffle = shuffle
        s = int(num_streams) if num_streams else 0
        self.register_buffer("targets", torch.zeros(s, s))

    def _repr_options(self) -> dict:
        return {"beta": self.beta, "seed": self.seed, "shuffle": self.shuffle}

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        coef = torch.eye(s, dtype=dt, device=dev)
        stateful = self._state_fits("targets", s, lambda: torch.zeros(s, s, device=dev))
        if s == 1:
            return coef[0]
        phi_hat = self.targets.to(dev, dt) if stateful else torch.zeros(s, s, dtype=dt, device=dev)
        orders = random_orders(s, self.generator(dev) if self.shuffle else None, dev)
        norms = row_norms(gramian)
        rows = torch.arange(s, device=dev)
        for k in range(s - 1):
            j = orders[:, k]
            cg = coef @ gramian
            dots = cg[rows, j]
            norm_i = (cg * coef).sum(1).clamp_min(0.0).sqrt()
            den = norm_i * norms[j]
            phi = torch.where(den > 0, dots / torch.where(den > 0, den, 1.0), 0.0).clamp(-1, 1)
            target = phi_hat[rows, j]
            tc = target.clamp(-_TARGET_LIMIT, _TARGET_LIMIT)
            root_t = (1 - tc * tc).sqrt()
            num = norm_i * (tc * (1 - phi * phi).clamp_min(0).sqrt() - phi * root_t)
            step = num / (torch.where(norms[j] > 0, norms[j], 1.0) * root_t)
            coef[rows, j] += torch.where((phi < target) & (den > 0), step, 0.0)
            phi_hat[rows, j] = (1 - self.beta) * target + self.beta * phi
        if stateful:
            self.targets.copy_(phi_hat)
        return coef.sum(0)
