"""``rlw``: random loss weighting (Lin et al., TMLR 2022)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import RandomMixin, RowScaler


class RLW(RandomMixin, RowScaler):
    r"""Random Loss Weighting (RLW).

    Paper: B. Lin, F. Ye, Y. Xu, H. Shi, Y. Zhang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, arXiv:2111.10603.

    Formula: each call draws :math:`z \sim N(0, I_S)` and uses :math:`w = \mathrm{softmax}(z)`,
    :math:`A(J) = w^\top J` (the paper's default normal-softmax variant; weights sum to 1).

    Properties: positively homogeneous; permutation invariant in distribution; not
    non-conflicting. One stream: the identity (softmax of one value is 1). Row scaling, so it may
    come first in a composition. Stateless apart from the generator (seedable with ``seed``; its
    state is saved in the state dict).
    """

    name = "rlw"
    uses_losses = False

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._init_random(seed)

    def _repr_options(self) -> dict:
        return {"seed": self.seed}

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        z = torch.randn(
            s, generator=self.generator(gramian.device), device=gramian.device, dtype=gramian.dtype
        )
        return torch.softmax(z, dim=0)
