"""MoPoE (Sutter et al., 2021) on PolyDigits: mixture of subset products of experts.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md).
Modalities (docs/datasets.md): ``img0`` (digit, Bernoulli), ``img1`` (rotated on a textured
background, Normal), ``img2`` (mirrored, blurred, inverted, Laplace), ``label`` (one-hot,
Categorical). The posterior is a uniform mixture over the products of experts of all 15 non-empty
subsets of modalities; the sample of every subset posterior is decoded by every decoder. Losses:
``img0``, ``img1``, ``img2``, ``label`` (minus the reconstruction log-likelihood, averaged over the
subsets) and ``kl`` (mean KL of the subset posteriors to the prior).

Overrides (environment variables read at import; or assign the module constants):

- ``IMPARTIAL_PAIRS`` (``PAIRS_PER_DIGIT``, 2): items per training digit (2: 2876 train, 718 val);
- ``IMPARTIAL_DATA_SEED`` (``DATA_SEED``, 0);
- ``IMPARTIAL_LATENT_DIM`` (``LATENT_DIM``, 16), ``IMPARTIAL_HIDDEN_DIM`` (``HIDDEN_DIM``, 128);
- ``IMPARTIAL_SPLIT_LOSSES`` (``SPLIT_LOSSES``, 0): 1 makes every reconstruction term its own loss,
  ``<modality>_from_<source>`` (see ``examples/multimodal.py``).
"""

from examples.config import env_int
from examples.data.common import TensorDictDataset, first_batch
from examples.data.polydigits import load_polydigits
from examples.multimodal import MoPoE, digit_classifiers, evaluate_multimodal

PAIRS_PER_DIGIT = env_int("IMPARTIAL_PAIRS", 2)
DATA_SEED = env_int("IMPARTIAL_DATA_SEED", 0)
LATENT_DIM = env_int("IMPARTIAL_LATENT_DIM", 16)
HIDDEN_DIM = env_int("IMPARTIAL_HIDDEN_DIM", 128)
SPLIT_LOSSES = bool(env_int("IMPARTIAL_SPLIT_LOSSES", 0))
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return load_polydigits(PAIRS_PER_DIGIT, seed=DATA_SEED)


def build_model():
    return MoPoE(latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM, split_losses=SPLIT_LOSSES)


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
