"""Base classes of the aggregators: the contract with the engines (see docs/architecture.md)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["Aggregation", "Aggregator", "GramianAggregator", "RowScaler"]


@dataclass
class Aggregation:
    """Result of an aggregator.

    ``gradient``: the (D,) combined gradient. ``weights``: the (S,) weights w with
    ``gradient == w @ J`` when the method is linear in J (else None).
    """

    gradient: Tensor
    weights: Tensor | None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the final weighted sum: J's own, at least float32 (half precision overflows)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _finite_or_zero(t: Tensor) -> Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def gramian_of(matrix: Tensor, gramian: Tensor | None = None) -> Tensor:
    """The S x S Gramian J J^T in float64 (computed when not given), symmetrised, non-finite -> 0.

    Non-finite entries are zeroed so that the small solvers never raise (the engines drop
    non-finite streams anyway; the final ``w @ J`` keeps any non-finite value visible).
    """
    if gramian is None:
        j64 = matrix.detach().to(torch.float64)
        g = j64 @ j64.T
    else:
        g = gramian.detach().to(device=matrix.device, dtype=torch.float64)
        g = 0.5 * (g + g.T)
    return _finite_or_zero(g)


def combine(matrix: Tensor, weights: Tensor, exact: bool = False) -> Aggregation:
    """``Aggregation(w @ J, w)`` computed in J's dtype (float32 at least; float64 with
    ``exact``), returned in J's dtype."""
    cd = _compute_dtype(matrix.dtype)
    if exact:
        w64 = weights.to(device=matrix.device, dtype=torch.float64)
        gradient = (w64 @ matrix.to(torch.float64)).to(matrix.dtype)
    else:
        gradient = (weights.to(device=matrix.device, dtype=cd) @ matrix.to(cd)).to(matrix.dtype)
    return Aggregation(gradient=gradient, weights=weights.to(device=matrix.device, dtype=cd))


def check_matrix(matrix: Tensor) -> None:
    if not isinstance(matrix, Tensor) or matrix.dim() != 2:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"aggregators take the S x D matrix of stream gradients; got {shape}")


class Aggregator(nn.Module):
    """Maps the S x D matrix J of stream gradients at a branch point to one D gradient.

    ``forward(J, *, gramian=None, losses=None, activation=None) -> Aggregation``:
    ``gramian`` is J @ J.T when the engine has it (all-reduced under data parallelism), ``losses``
    the (S,) detached loss of each stream when known, ``activation`` the forward value at the
    branch point (flattened to (D,), GradDrop only).
    """

    name: ClassVar[str] = ""
    #: Whether the method only rescales rows (so that it may come first in a composition ``a+b``).
    row_scaling: ClassVar[bool] = False
    # True when the method reads the forward value at the branch point (``activation``); the
    # graph engine then keeps it for backward (the hook engine has no access to it)
    uses_activation: ClassVar[bool] = False
    # Whether the method reads the stream losses; the engines gather them (a few tensor operations
    # per step) only for methods that do. True unless a method says otherwise, so that a user's
    # own aggregator always gets them.
    uses_losses: ClassVar[bool] = True
    # Whether the final weighted sum w @ J must be accumulated in float64: for methods whose
    # weights can be large while their combination is small (near Pareto-stationary rows), where
    # float32 accumulation leaves only rounding noise.
    exact_combination: ClassVar[bool] = False

    def forward(
        self,
        J: Tensor,
        *,
        gramian: Tensor | None = None,
        losses: Tensor | None = None,
        activation: Tensor | None = None,
    ) -> Aggregation:
        raise NotImplementedError

    def extra_repr(self) -> str:
        opts = getattr(self, "_repr_options", None)
        return ", ".join(f"{k}={v!r}" for k, v in opts().items()) if opts else ""


class GramianAggregator(Aggregator):
    """An aggregator whose weights depend only on the Gramian J J^T (and the losses).

    Subclasses implement ``weights(gramian, losses)``: ``gramian`` is a finite float64 S x S
    matrix on J's device, ``losses`` a float64 (S,) tensor or None; return (S,) float64 weights.
    The gradient is ``w @ J``.
    """

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        J: Tensor,
        *,
        gramian: Tensor | None = None,
        losses: Tensor | None = None,
        activation: Tensor | None = None,
    ) -> Aggregation:
        check_matrix(J)
        if J.shape[0] == 0:
            return Aggregation(J.new_zeros(J.shape[1]), J.new_zeros(0))
        with torch.no_grad():
            g = gramian_of(J, gramian)
            w = self.weights(g, prepare_losses(losses, J))
        return combine(J, w, self.exact_combination)


class RowScaler(GramianAggregator):
    """A method that multiplies each row by a factor (w = scales); may come first in ``a+b``.

    ``scales(gramian, losses)`` may read only the diagonal of the Gramian (the squared row
    norms): when the engine passes no Gramian, ``forward`` builds just that diagonal (S x D work
    instead of S x S x D).
    """

    row_scaling: ClassVar[bool] = True

    def forward(
        self,
        J: Tensor,
        *,
        gramian: Tensor | None = None,
        losses: Tensor | None = None,
        activation: Tensor | None = None,
    ) -> Aggregation:
        check_matrix(J)
        if J.shape[0] == 0:
            return Aggregation(J.new_zeros(J.shape[1]), J.new_zeros(0))
        with torch.no_grad():
            if gramian is None:
                sq = torch.linalg.vector_norm(J.detach(), dim=1, dtype=torch.float64) ** 2
                g = torch.diag(_finite_or_zero(sq))
            else:
                g = gramian_of(J, gramian)
            w = self.scales(g, prepare_losses(losses, J))
        return combine(J, w)

    def scales(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        raise NotImplementedError

    def weights(self, gramian: Tensor, losses: Tensor | None) -> Tensor:
        return self.scales(gramian, losses)


def prepare_losses(losses: Tensor | None, matrix: Tensor) -> Tensor | None:
    if losses is None:
        return None
    losses = torch.as_tensor(losses).detach().to(device=matrix.device, dtype=torch.float64)
    if losses.shape != (matrix.shape[0],):
        raise ValueError(
            f"losses must have shape ({matrix.shape[0]},), one per stream; "
            f"got {tuple(losses.shape)}"
        )
    return losses


class LazyStateMixin:
    """State tensors whose size (the number of streams S) is only known at the first call.

    They are registered with size 0 and materialised in place on first use (a Parameter keeps
    its identity, so an optimizer built before the first step still updates it). Loading a
    state dict into a fresh instance resizes them first, so ``load_state_dict`` round-trips.
    """

    _lazy_state: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for attr in self._lazy_state:
            key = prefix + attr
            if key not in state_dict:
                continue
            incoming = state_dict[key]
            current = getattr(self, attr)
            if current.shape != incoming.shape:
                fresh = torch.zeros(incoming.shape, dtype=current.dtype, device=current.device)
                if isinstance(current, nn.Parameter):
                    current.data = fresh
                else:
                    setattr(self, attr, fresh)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _materialise(self, attr: str, value: Tensor) -> None:
        current = getattr(self, attr)
        if isinstance(current, nn.Parameter):
            current.data = value.to(dtype=current.dtype)
        else:
            setattr(self, attr, value.to(dtype=current.dtype))

    def _state_fits(self, attr: str, num_streams: int, initial: Callable[[], Tensor]) -> bool:
        """Whether the state ``attr`` is sized for ``num_streams`` streams; still empty, it is
        materialised as ``initial()`` first. When S changed (e.g. the engine dropped a non-finite
        stream), the state is left untouched and the caller runs this step statelessly; a
        warning is given once."""
        current: Tensor = getattr(self, attr)
        if current.numel() == 0:
            self._materialise(attr, initial())
            return True
        if current.shape[0] == num_streams:
            return True
        if not getattr(self, "_warned_size", False):
            warnings.warn(
                f"{type(self).__name__}: state sized for {current.shape[0]} streams, called with "
                f"{num_streams}; this step runs without the stored state (state left unchanged)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_size = True
        return False


class RandomMixin:
    """A seedable torch.Generator per device; its state travels in the state dict (extra state)."""

    def _init_random(self, seed: int | None) -> None:
        if seed is not None and not isinstance(seed, int):
            try:
                seed = int(seed)
            except (TypeError, ValueError):
                raise ValueError(f"seed must be an integer or None; got {seed!r}") from None
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(torch.device(device))
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[key] = gen
        return gen

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = state.get("seed", self.seed)
        self._generators = {}
        for key, gen_state in state.get("generators", {}).items():
            device = torch.device(key)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue
            gen = torch.Generator(device=device)
            gen.set_state(gen_state)
            self._generators[key] = gen


def random_orders(
    num_streams: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(S, S-1) long tensor: row i lists the other streams, in random order (or ascending order
    when ``generator`` is None)."""
    s = num_streams
    if generator is None:
        keys = torch.arange(s, dtype=torch.float64, device=device).expand(s, s).clone()
    else:
        keys = torch.rand(s, s, generator=generator, device=device, dtype=torch.float64)
    return keys.fill_diagonal_(float("inf")).argsort(dim=1)[:, : s - 1]
