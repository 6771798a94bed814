"""``a+b``: composition of row-scaling methods with a final method."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import (
    Aggregation,
    Aggregator,
    GramianAggregator,
    _compute_dtype,
    check_matrix,
    gramian_of,
    prepare_losses,
)


class Compose(GramianAggregator):
    r"""Composition ``a+b+...+z``: every method but the last rescales the rows, the last aggregates.

    With the per-row factors :math:`d` of the leading methods (applied in order, each seeing the
    Gramian already rescaled by the previous ones), the last method runs on
    :math:`G' = D G D` (:math:`D = \mathrm{diag}(d)`, i.e. on the rows :math:`d_i g_i`) and the
    final weights are :math:`d \circ w_{last}`. E.g. ``gradnorm+pcgrad``: GradNorm's learnt
    weights scale the rows, then PCGrad projects the scaled rows. When the last method needs the
    rows (GradDrop) it gets :math:`D J` and the weights are None.

    Properties: those shared by all parts; stateful if any part is. ``state_dict`` holds the
    parts' state under ``methods.<k>.``.
    """

    def __init__(self, *methods: Aggregator) -> None:
        super().__init__()
        if len(methods) == 1 and isinstance(methods[0], (list, tuple)):
            methods = tuple(methods[0])
        if not methods:
            raise ValueError("Compose needs at least one method")
        for m in methods:
            if not isinstance(m, Aggregator):
                raise ValueError(f"Compose takes aggregators; got {type(m).__name__}")
        for m in methods[:-1]:
            if not m.row_scaling:
                raise ValueError(
                    f"cannot compose {'+'.join(x.name for x in methods)!r}: {m.name!r} is not a "
                    "row-scaling method; only the last method of a composition may combine the "
                    "rows (row-scaling methods: gradnorm, mean, nsgd, rlw, sum)"
                )
        self.methods = nn.ModuleList(methods)
        self.uses_activation = methods[-1].uses_activation
        self.exact_combination = methods[-1].exact_combination  # type: ignore[misc]
        self.name = "+".join(m.name for m in methods)  # type: ignore[misc]
        self.row_scaling = all(m.row_scaling for m in methods)  # type: ignore[misc]

    @property
    def uses_losses(self) -> bool:  # type: ignore[override]
        return any(m.uses_losses for m in self.methods)

    @property
    def _last(self) -> Aggregator:
        return self.methods[-1]

    def _prescale(self, gramian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor]:
        d = torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
        for m in list(self.methods)[:-1]:
            s = m.scales(gramian, losses)
            d = d * s
            gramian = s.unsqueeze(1) * gramian * s.unsqueeze(0)
        return d, gramian

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        d, g = self._prescale(gramian, losses)
        return d * self._last.scales(g, losses)

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        d, g = self._prescale(gramian, losses)
        return d * self._last.weights(g, losses)

    def forward(
        self,
        J: Tensor,
        *,
        gramian: Tensor | None = None,
        losses: Tensor | None = None,
        activation: Tensor | None = None,
    ) -> Aggregation:
        if isinstance(self._last, GramianAggregator):
            return super().forward(J, gramian=gramian, losses=losses)
        # the last method needs the rows (GradDrop): it gets the rescaled rows D J
        check_matrix(J)
        if J.shape[0] == 0:
            return Aggregation(J.new_zeros(J.shape[1]), J.new_zeros(0))
        cd = _compute_dtype(J.dtype)
        with torch.no_grad():
            d, g = self._prescale(gramian_of(J, gramian), prepare_losses(losses, J))
        # in at least float32: the factors (NSGD's 1 / ||g_i||) overflow half precision
        scaled = d.to(cd).unsqueeze(1) * J.to(cd)
        out = self._last(scaled, gramian=g, losses=losses, activation=activation)
        weights = None if out.weights is None else d.to(out.weights.dtype) * out.weights
        return Aggregation(out.gradient.to(J.dtype), weights)

    def extra_repr(self) -> str:
        return f"spec={self.name!r}"
