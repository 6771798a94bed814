"""Heterogeneous tabular IWAE trained with doubly reparameterised gradients (DReG).

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). DReG
(Tucker et al., 2018), as in the paper's code: the decoder is applied twice to the K samples, once
to the detached samples (decoder path, weights w~) and once with its own weights detached (encoder
path, weights w~^2, with log q evaluated at detached variational parameters). So the attributes'
gradients meet both at the decoder trunk's output on the decoder path and at the trunk's output on
the encoder path. Losses: one per attribute (named after it, both paths) and ``"kl"``; their sum is
a surrogate whose gradient is the DReG estimator.

Overrides (environment variables read at import; or assign the module constants): those of
``tabular_vae.py`` (``IMPARTIAL_DATASET`` = ``DATASET``, default diamonds; ``IMPARTIAL_ROWS``,
``IMPARTIAL_MISSING_RATE``, ``IMPARTIAL_DATA_SEED``, ``IMPARTIAL_LATENT_DIM``,
``IMPARTIAL_HIDDEN_DIM``) and ``IMPARTIAL_SAMPLES`` (``NUM_SAMPLES``, K, default 8).
"""

from examples.config import env_float, env_int, env_str
from examples.data.common import TensorDictDataset, first_batch
from examples.data.tabular import load_tabular
from examples.tabular import HeterogeneousVAE, evaluate_tabular

DATASET = env_str("IMPARTIAL_DATASET", "diamonds")
MAX_ROWS = env_int("IMPARTIAL_ROWS", 5000)
MISSING_RATE = env_float("IMPARTIAL_MISSING_RATE", 0.2)
DATA_SEED = env_int("IMPARTIAL_DATA_SEED", 0)
LATENT_DIM = env_int("IMPARTIAL_LATENT_DIM", 8)
HIDDEN_DIM = env_int("IMPARTIAL_HIDDEN_DIM", 64)
NUM_SAMPLES = env_int("IMPARTIAL_SAMPLES", 8)
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return load_tabular(DATASET, max_rows=MAX_ROWS, missing_rate=MISSING_RATE, seed=DATA_SEED)


def build_model():
    return HeterogeneousVAE(
        data().schema,
        latent_dim=LATENT_DIM,
        hidden_dim=HIDDEN_DIM,
        objective="dreg",
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
    return evaluate_tabular(model, loader)
