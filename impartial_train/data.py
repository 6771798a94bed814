"""Data plumbing of the training loop: devices, batches, seeded DataLoaders, seeding."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate

from impartial_train.errors import TrainingError

__all__ = [
    "batch_size_of",
    "dataset_len",
    "loader_generators",
    "make_loader",
    "resolve_device",
    "seed_all",
    "to_device",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; a clear error for an unavailable CUDA."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA device"
            raise TrainingError(
                f"device {str(device)!r} requested but CUDA is not available ({build}): "
                "use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(
                f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    return dev


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (dicts, lists, tuples, namedtuples)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        moved = {k: to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(moved)  # type: ignore[call-arg]
        except TypeError:
            return moved
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """The leading dimension of the first tensor in ``batch`` (1 when there is none)."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor):
            return int(item.shape[0]) if item.dim() > 0 else 1
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return 1


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    collate_fn: Callable[[list], Any] = default_collate,
) -> DataLoader:
    """A DataLoader that shuffles with its own generator seeded with ``seed``.

    With ``world > 1`` each rank gets its contiguous share of every global batch of
    ``batch_size`` (see :class:`~impartial_train.distributed.ShardedBatchSampler`).
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        if world > 1:
            raise TrainingError(
                "data-parallel training needs a map-style dataset (with __len__ and "
                "__getitem__), not an iterable one"
            )
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn)
    if world == 1:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate_fn,
            generator=generator,
        )
    from impartial_train.distributed import ShardedBatchSampler

    sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        batch_sampler=ShardedBatchSampler(BatchSampler(sampler, batch_size, False), rank, world),
        collate_fn=collate_fn,
        generator=generator,
    )


def loader_generators(loader: Any) -> list[torch.Generator | None]:
    """The generators a DataLoader draws from (its own and its sampler's), for RNG snapshots."""
    found: list[torch.Generator] = []
    for obj in (
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
        getattr(
            getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None), "sampler", None
        ),
    ):
        gen = getattr(obj, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return list(found)


def dataset_len(loader: Any) -> int | None:
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)
