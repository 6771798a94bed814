"""MMVAE (Shi et al., 2019) on PolyDigits, trained on the stratified IWAE bound.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). As
``mmvae.py``, with K importance samples per mixture component: each modality's loss is its
log-likelihood weighted by the detached normalised importance weights, so the terms sum to a
surrogate with exactly the IWAE gradient. Losses: ``img0``, ``img1``, ``img2``, ``label`` and
``kl``.

Overrides (environment variables read at import; or assign the module constants):

- ``IMPARTIAL_PAIRS`` (``PAIRS_PER_DIGIT``, 2): items per training digit (2: 2876 train, 718 val);
- ``IMPARTIAL_DATA_SEED`` (``DATA_SEED``, 0);
- ``IMPARTIAL_LATENT_DIM`` (``LATENT_DIM``, 16), ``IMPARTIAL_HIDDEN_DIM`` (``HIDDEN_DIM``, 128);
- ``IMPARTIAL_SPLIT_LOSSES`` (``SPLIT_LOSSES``, 0): 1 makes every reconstruction term its own loss,
  ``<modality>_from_<source>`` (see ``examples/multimodal.py``);
- ``IMPARTIAL_SAMPLES`` (``NUM_SAMPLES``, 8): importance samples K per component.
"""

from examples.config import env_int
from examples.data.common import TensorDictDataset, first_batch
from examples.data.polydigits import load_polydigits
from examples.multimodal import MMVAE, digit_classifiers, evaluate_multimodal

PAIRS_PER_DIGIT = env_int("IMPARTIAL_PAIRS", 2)
DATA_SEED = env_int("IMPARTIAL_DATA_SEED", 0)
LATENT_DIM = env_int("IMPARTIAL_LATENT_DIM", 16)
HIDDEN_DIM = env_int("IMPARTIAL_HIDDEN_DIM", 128)
SPLIT_LOSSES = bool(env_int("IMPARTIAL_SPLIT_LOSSES", 0))
NUM_SAMPLES = env_int("IMPARTIAL_SAMPLES", 8)
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return load_polydigits(PAIRS_PER_DIGIT, seed=DATA_SEED)


def build_model():
    return MMVAE(
        latent_dim=LATENT_DIM,
        hidden_dim=HIDDEN_DIM,
        split_losses=SPLIT_LOSSES,
        objective="iwae",
        num_samples=NUM_SAMPLES,
    )


def train_dataset():
    return TensorDictDataset(data().train)


def val_dataset():
    return TensorDictDataset(data().val)


def example_batch():
    return first_batch(train_dataset(), EXAMPLE_BATCH_SIZE)


def compute_losses(model, batch):
    return model(batch)


def evaluate(model, loader):
    return evaluate_multimodal(model, loader, digit_classifiers(PAIRS_PER_DIGIT, DATA_SEED))
