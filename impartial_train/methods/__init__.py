"""Multitask aggregation methods: map the S x D matrix of stream gradients to one gradient.

Contract with the engines (docs/architecture.md, "Aggregators"; docs/methods.md): every method is
an :class:`Aggregator` module, ``forward(J, *, gramian=None, losses=None, activation=None)``
returns an :class:`Aggregation` (``gradient`` (D,), ``weights`` (S,) or None). Gramian-based
methods subclass :class:`GramianAggregator` and implement ``weights(gramian, losses)``.
``build("gradnorm+pcgrad")`` makes one instance (one per branch point: state is per instance).
"""

from ._base import Aggregation, Aggregator, GramianAggregator, RowScaler
from ._registry import available, build
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

__all__ = [
    "IMTLG",
    "MGDA",
    "NSGD",
    "RLW",
    "Aggregation",
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "Compose",
    "DualProj",
    "GradDrop",
    "GradNorm",
    "GradVac",
    "GramianAggregator",
    "Mean",
    "NashMTL",
    "PCGrad",
    "RowScaler",
    "Sum",
    "UPGrad",
    "available",
    "build",
]
