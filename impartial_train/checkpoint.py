"""Checkpoints of a training run: atomic writes, RNG states, file hashes.

A checkpoint holds only plain containers, numbers, strings and tensors (random states are
converted), so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterable
from typing import Any

import torch

from blockfinder.atomic import atomic_write

__all__ = [
    "FORMAT",
    "TrainingInterrupted",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_atomic",
    "sha256_file",
]

FORMAT = 1


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``: a reader
    (or a crash) never sees a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :class:`impartial_train.Trainer` (tensors on the CPU)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# random states


def _numpy():
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return None
    return np


def capture_rng(generators: Iterable[torch.Generator | None] = ()) -> dict[str, Any]:
    """The states of every random generator a training step may use.

    torch (CPU and, when initialised, CUDA), Python's ``random``, numpy's global generator, and the
    given ``generators`` (e.g. the DataLoader's), as plain data.
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "generators": [None if g is None else g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = _numpy()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [
            str(kind),
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    return state


def restore_rng(state: dict[str, Any], generators: Iterable[torch.Generator | None] = ()) -> None:
    """Restore what :func:`capture_rng` captured (the same ``generators``, in the same order)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    np = _numpy()
    if np is not None and state.get("numpy") is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    for gen, saved in zip(generators, state.get("generators", [])):
        if gen is not None and saved is not None:
            gen.set_state(saved)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal (SIGINT: Ctrl-C, or SIGTERM) after saving a checkpoint it
    can resume from. ``signal``: the signal's number (the CLI exits with 128 + it)."""

    def __init__(
        self,
        checkpoint: str,
        epoch: int,
        step: int,
        steps: int | None = None,
        signal: int = 2,
    ) -> None:
        self.checkpoint = str(checkpoint)
        self.epoch = int(epoch)  # completed epochs
        self.step = int(step)  # batches done in the next epoch (0: at an epoch boundary)
        self.steps = steps
        self.signal = int(signal)
        super().__init__(self.describe())

    def describe(self) -> str:
        from impartial_train.signals import signal_name

        if self.step:
            where = f"epoch {self.epoch + 1}, step {self.step}"
            if self.steps:
                where += f"/{self.steps}"
        else:
            where = f"the end of epoch {self.epoch}"
        return (
            f"interrupted ({signal_name(self.signal)}) at {where}; checkpoint saved to "
            f"{self.checkpoint}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "epoch": self.epoch,
            "step": self.step,
            "steps": self.steps,
            "signal": self.signal,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingInterrupted:
        return cls(
            data["checkpoint"],
            data["epoch"],
            data["step"],
            data.get("steps"),
            data.get("signal", 2),
        )
