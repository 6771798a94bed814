"""Errors of training runs (one-line user messages; the CLI prints them and exits 2)."""

from __future__ import annotations

from blockfinder.errors import BlockfinderError

__all__ = ["ResumeError", "TrainingError"]


class TrainingError(BlockfinderError):
    """Training cannot go on (diverged losses, bad evaluate() result, bad options)."""


class ResumeError(BlockfinderError):
    """No checkpoint to resume, or one that belongs to another model or method."""
