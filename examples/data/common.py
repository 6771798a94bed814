"""Small dataset utilities shared by the tabular and multimodal example data."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate


class TensorDictDataset(Dataset):
    """A dataset of dicts of tensors: item ``i`` is ``{key: tensor[i]}``.

    ``torch.utils.data.default_collate`` stacks the items of a batch back into a dict of batched
    tensors, so a DataLoader over this dataset yields exactly what the example models consume.
    The tensors are shared (never copied) with the cached arrays they were built from.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        tensors = dict(tensors)
        if not tensors:
            raise ValueError("TensorDictDataset needs at least one tensor")
        lengths = {key: len(value) for key, value in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"tensors of different lengths: {lengths}")
        self.tensors = tensors
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def first_batch(dataset: Dataset, batch_size: int) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` items of ``dataset`` collated exactly as a DataLoader would."""
    size = min(batch_size, len(dataset))
    return default_collate([dataset[i] for i in range(size)])


def split_indices(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """A seeded random partition of ``range(n)`` into sorted (train, val) index arrays."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = rng.permutation(n)
    n_val = max(1, round(n * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
