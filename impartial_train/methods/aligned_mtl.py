"""``aligned-mtl``: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianAggregator

_EPS32 = float(torch.finfo(torch.float32).eps)


class AlignedMTL(GramianAggregator):
    r"""Aligned-MTL: align the principal components of the stream gradients.

    Paper: D. Senushkin, N. Patakin, A. Kuznetsov, A. Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023, arXiv:2305.19000.

    Formula: eigendecomposition :math:`G = V \Lambda V^\top` of the Gramian restricted to its
    numerical rank R (eigenvalues above :math:`S \lambda_{max} \varepsilon_{32}`, the
    reference code's tolerance), :math:`B = \sqrt{\lambda_{R}} V_R \Lambda_R^{-1/2} V_R^\top`
    (:math:`\lambda_R` the smallest kept eigenvalue), weights :math:`w = B 1`. Equivalently, with
    the SVD :math:`J = U \Sigma W^\top`, :math:`A(J) = \sigma_{min} 1^\top U W^\top`: the stream
    gradients are replaced by orthogonal ones of equal norm :math:`\sigma_{min}` spanning the
    same space, and summed (uniform task preferences).

    Properties: permutation invariant, positively homogeneous; not non-conflicting. One stream:
    the identity. A zero Gramian gives 0. Stateless. Note: ``torch.linalg.eigh`` synchronises a
    CUDA device with the host (the only method here that does); it runs on the Gramian scaled
    to unit mean diagonal plus a tiny shift (cuSOLVER can fail on an exact zero matrix).
    """

    name = "aligned-mtl"
    uses_losses = False

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        s = gramian.shape[0]
        dt, dev = gramian.dtype, gramian.device
        scale = gramian.diagonal().mean()
        g = gramian / torch.where(scale > 0, scale, 1.0)
        shift = 1e-30
        eye = torch.eye(s, dtype=dt, device=dev)
        lam, vec = torch.linalg.eigh(g + shift * eye)
        lam = lam - shift
        tol = lam.amax().clamp_min(0.0) * s * _EPS32
        keep = lam > tol
        lam_min = torch.where(keep, lam, torch.inf).amin()
        inv_sqrt = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0).sqrt(), 0.0)
        b = (vec * inv_sqrt) @ vec.T * lam_min.sqrt()
        w = b.sum(1)
        return torch.where(keep.any() & torch.isfinite(w).all(), w, torch.zeros_like(w))
