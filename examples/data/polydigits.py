"""PolyDigits: a small offline multimodal dataset built from scikit-learn's bundled 8x8 digits.

Each item shows one digit *class* in four modalities (keys of the batch dict):

- ``img0`` (64,): a digit image as it is (grey levels scaled to [0, 1]);
- ``img1`` (64,): ANOTHER image of the same class (another writer), rotated by 90 degrees, dimmed
  and laid over a fixed smooth background texture, plus a small fixed per-item noise, clipped to
  [0, 1];
- ``img2`` (64,): a THIRD image of the same class, mirrored left-right, blurred (3x3 binomial
  filter) and inverted (1 - value);
- ``label`` (10,): the class, one-hot.

As in the MNIST-SVHN pairing of Shi et al. (2019), the modalities of an item share only the class,
not the writer: the latent space has to capture what the modalities have in common. The 1797 digits
are first split (seeded) into train/val digits, so no image appears in both splits; then each
training digit is used as ``img0`` of ``pairs_per_digit`` items whose ``img1``/``img2`` images are
drawn (seeded) from the other digits of its class in the same split. Everything is deterministic
given the seed and cached in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from examples.data.common import TensorDictDataset, split_indices

MODALITIES = ("img0", "img1", "img2", "label")
IMAGE_MODALITIES = ("img0", "img1", "img2")
NUM_CLASSES = 10
IMAGE_SIDE = 8
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
DEFAULT_PAIRS_PER_DIGIT = 2
DEFAULT_VAL_FRACTION = 0.2


def blur(images: np.ndarray) -> np.ndarray:
    """3x3 binomial blur ([1, 2, 1] / 4 along both axes) of (..., H, W) images, edges replicated."""
    kernel = (0.25, 0.5, 0.25)
    out = images
    for axis in (images.ndim - 2, images.ndim - 1):
        pad = [(0, 0)] * images.ndim
        pad[axis] = (1, 1)
        padded = np.pad(out, pad, mode="edge")
        length = out.shape[axis]
        out = sum(
            weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
            for offset, weight in enumerate(kernel)
        )
    return out


def background_texture(seed: int) -> np.ndarray:
    """The fixed smooth (8, 8) background of ``img1``: blurred uniform noise rescaled to [0, 1]."""
    rng = np.random.default_rng([seed, 1])
    texture = blur(blur(rng.uniform(size=(IMAGE_SIDE, IMAGE_SIDE))))
    texture -= texture.min()
    return texture / texture.max()


def transform_img1(images: np.ndarray, texture: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Rotate by 90 degrees, dim, add the background texture and the per-item noise, clip."""
    rotated = np.rot90(images, k=1, axes=(-2, -1))
    return np.clip(0.7 * rotated + 0.4 * texture + noise, 0.0, 1.0)


def transform_img2(images: np.ndarray) -> np.ndarray:
    """Mirror left-right, blur, invert."""
    return 1.0 - blur(images[..., ::-1])


@dataclass(frozen=True, eq=False)
class PolyDigits:
    """Train/val tensors (dicts keyed by :data:`MODALITIES`) and how they were built.

    ``train_sources``/``val_sources`` (items x 3) are the indices, in scikit-learn's
    ``load_digits``, of the images behind ``img0``, ``img1`` and ``img2`` of each item.
    """

    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    train_sources: np.ndarray
    val_sources: np.ndarray
    texture: np.ndarray
    pairs_per_digit: int
    seed: int

    def split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


def _build_split(
    images: np.ndarray,
    labels: np.ndarray,
    digits: np.ndarray,
    pairs: int,
    texture: np.ndarray,
    rng: np.random.Generator,
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    members = {c: digits[labels[digits] == c] for c in range(NUM_CLASSES)}
    anchors = np.repeat(digits, pairs)
    partners = np.empty((len(anchors), 2), dtype=np.int64)
    for row, anchor in enumerate(anchors):
        candidates = members[labels[anchor]]
        candidates = candidates[candidates != anchor]
        partners[row] = rng.choice(candidates, size=2, replace=len(candidates) < 2)
    noise = rng.normal(scale=0.05, size=(len(anchors), IMAGE_SIDE, IMAGE_SIDE))
    img1 = transform_img1(images[partners[:, 0]], texture, noise)
    img2 = transform_img2(images[partners[:, 1]])
    tensors = {
        "img0": images[anchors],
        "img1": img1,
        "img2": img2,
    }
    out = {
        key: torch.from_numpy(value.reshape(len(anchors), NUM_PIXELS).astype(np.float32))
        for key, value in tensors.items()
    }
    out["label"] = torch.from_numpy(np.eye(NUM_CLASSES, dtype=np.float32)[labels[anchors]])
    return out, np.column_stack([anchors, partners])


@lru_cache(maxsize=8)
def load_polydigits(
    pairs_per_digit: int = DEFAULT_PAIRS_PER_DIGIT,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
) -> PolyDigits:
    """Build PolyDigits (cached). Train has about ``0.8 * 1797 * pairs_per_digit`` items."""
    from sklearn.datasets import load_digits

    if pairs_per_digit < 1:
        raise ValueError(f"pairs_per_digit must be >= 1, got {pairs_per_digit}")
    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_digits, val_digits = split_indices(len(labels), val_fraction, rng)
    texture = background_texture(seed)
    train, train_sources = _build_split(images, labels, train_digits, pairs_per_digit, texture, rng)
    val, val_sources = _build_split(images, labels, val_digits, pairs_per_digit, texture, rng)
    return PolyDigits(train, val, train_sources, val_sources, texture, pairs_per_digit, seed)


def polydigits_dataset(split: str, **options) -> TensorDictDataset:
    """The ``"train"`` or ``"val"`` split of :func:`load_polydigits` as a torch Dataset of dicts."""
    return TensorDictDataset(load_polydigits(**options).split(split))


def class_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The digit class of each item of a batch (from its one-hot ``label``)."""
    return batch["label"].argmax(dim=-1)
