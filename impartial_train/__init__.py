"""impartial_train: train a multi-loss model impartially, with gradient surgery at its branch points."""

from blockfinder._version import __version__

__all__ = ["__version__"]
