"""impartial_train: train a multi-loss model impartially, with surgery at its branch points.

>>> imodel = impartial_train.wrap(model, example_batch, losses=compute_losses, method="pcgrad")
>>> out = imodel(batch); sum(out.values()).backward(); optimizer.step()
"""

from blockfinder._version import __version__
from impartial_train import methods
from impartial_train.checkpoint import TrainingInterrupted
from impartial_train.errors import ResumeError, TrainingError
from impartial_train.trainer import Trainer
from impartial_train.wrap import GraphUnavailable, ImpartialModel, wrap

__all__ = [
    "GraphUnavailable",
    "ImpartialModel",
    "ResumeError",
    "Trainer",
    "TrainingError",
    "TrainingInterrupted",
    "__version__",
    "methods",
    "wrap",
]
