"""What one forward pass of a model changes outside its outputs: random number generators and
buffers. A snapshot lets a step's forward be run again exactly (the self-check runs the eager
model and the engine's program on the same random numbers and the same running statistics)."""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence

import torch
from torch import nn


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices holding the model's parameters (whose RNG a step may consume)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})


def rng_state(devices: Sequence[int]) -> tuple:
    """The state of torch's CPU and CUDA generators, Python's ``random`` and numpy's."""
    numpy = sys.modules.get("numpy")
    return (
        torch.get_rng_state(),
        [torch.cuda.get_rng_state(d) for d in devices],
        random.getstate(),
        numpy.random.get_state() if numpy is not None else None,
    )


def rng_changed(before: tuple, after: tuple) -> list[str]:
    """The generators that moved between two :func:`rng_state` results."""
    changed = []
    if not torch.equal(before[0], after[0]) or any(
        not torch.equal(a, b) for a, b in zip(before[1], after[1])
    ):
        changed.append("torch")
    if before[2] != after[2]:
        changed.append("Python 'random'")
    if before[3] is not None and after[3] is not None:
        numpy = sys.modules["numpy"]
        if any(not numpy.array_equal(a, b) for a, b in zip(before[3], after[3])):
            changed.append("numpy")
    return changed


def restore_rng(state: tuple, devices: Sequence[int]) -> None:
    torch.set_rng_state(state[0])
    for device, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, device)
    random.setstate(state[2])
    numpy = sys.modules.get("numpy")
    if numpy is not None and state[3] is not None:
        numpy.random.set_state(state[3])


class Snapshot:
    """The generators' states and copies of the model's buffers, restorable any number of times."""

    def __init__(self, model: nn.Module) -> None:
        self.devices = cuda_devices(model)
        self.rng = rng_state(self.devices)
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def restore(self) -> None:
        restore_rng(self.rng, self.devices)
        with torch.no_grad():
            for buffer, saved in self.buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)
