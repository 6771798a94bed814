"""``build(spec, **kwargs)`` and ``available()``: methods by name."""

from __future__ import annotations

import inspect
from typing import Any

from ._base import Aggregator
from .aligned_mtl import AlignedMTL
from .cagrad import CAGrad
from .compose import Compose
from .dualproj import DualProj
from .graddrop import GradDrop
from .gradnorm import GradNorm
from .gradvac import GradVac
from .imtl_g import IMTLG
from .mean import Mean
from .mgda import MGDA
from .nash_mtl import NashMTL
from .nsgd import NSGD
from .pcgrad import PCGrad
from .rlw import RLW
from .sum import Sum
from .upgrad import UPGrad

METHODS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        Sum,
        Mean,
        PCGrad,
        GradDrop,
        GradVac,
        MGDA,
        IMTLG,
        GradNorm,
        NSGD,
        CAGrad,
        NashMTL,
        AlignedMTL,
        UPGrad,
        DualProj,
        RLW,
    )
}

#: Options that ``build`` accepts for any spec and passes only to the methods that take them.
COMMON_OPTIONS = ("num_streams",)


def available() -> list[str]:
    """Names of the methods ``build`` knows (compose them with ``+``)."""
    return sorted(METHODS)


def _options(cls: type[Aggregator]) -> list[str]:
    """The named options of ``cls`` (a class without its own ``__init__`` has none: the
    ``*args, **kwargs`` of ``nn.Module.__init__`` are not options)."""
    params = inspect.signature(cls.__init__).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.name != "self" and p.kind in named]


def _lookup(part: str, spec: str) -> type[Aggregator]:
    key = part.strip().lower().replace("_", "-")
    if key not in METHODS:
        shown = repr(part.strip()) if part.strip() else "an empty name"
        raise ValueError(
            f"unknown aggregation method {shown} in {spec!r}; available: {', '.join(available())}"
            " (compose row-scaling methods with '+', e.g. 'gradnorm+pcgrad')"
        )
    return METHODS[key]


def build(spec: str | Aggregator, **kwargs: Any) -> Aggregator:
    """An aggregator from a method name (``"imtl-g"``) or a composition (``"gradnorm+pcgrad"``).

    ``kwargs`` go to every method of the spec whose constructor takes them (e.g. ``seed``,
    ``alpha``); an option no method takes is a ValueError naming it. ``num_streams`` (S, when the
    engine knows it) is accepted for any spec and sizes the state of stateful methods at
    construction. An ``Aggregator`` instance is returned as is.
    """
    if isinstance(spec, Aggregator):
        extra = [k for k in kwargs if k not in COMMON_OPTIONS]
        if extra:
            raise ValueError(
                f"options {', '.join(map(repr, extra))} can only be given with a method name, "
                f"not with an aggregator instance ({spec.name!r})"
            )
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"an aggregation method is a name or an Aggregator; got {type(spec).__name__}"
        )
    classes = [_lookup(part, spec) for part in spec.split("+")]
    accepted = [_options(cls) for cls in classes]
    for key in kwargs:
        if key in COMMON_OPTIONS:
            continue
        if not any(key in acc for acc in accepted):
            takes = sorted({o for acc in accepted for o in acc} - set(COMMON_OPTIONS))
            raise ValueError(
                f"unknown option {key!r} for aggregation method {spec!r}; "
                f"it takes: {', '.join(takes) if takes else 'no options'}"
            )
    instances: list[Aggregator] = []
    for cls, acc in zip(classes, accepted):
        opts = {k: v for k, v in kwargs.items() if k in acc and v is not None}
        instances.append(cls(**opts))
    return instances[0] if len(instances) == 1 else Compose(*instances)
