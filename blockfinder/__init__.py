"""blockfinder: find the impartiality blocks of a multi-loss PyTorch model.

>>> report = blockfinder.analyze(model, batch, losses=compute_losses, regularizers=("kl",))
>>> report.branch_points, report.blocks, report.to_json()
"""

from blockfinder._version import __version__
from blockfinder.analyze import analyze
from blockfinder.errors import (
    BlockfinderError,
    CaptureError,
    LossError,
    ModelRunError,
    RegularizerError,
)
from blockfinder.report import BlockReport, BranchPoint, ImpartialityBlock

__all__ = [
    "BlockReport",
    "BlockfinderError",
    "BranchPoint",
    "CaptureError",
    "ImpartialityBlock",
    "LossError",
    "ModelRunError",
    "RegularizerError",
    "__version__",
    "analyze",
]
