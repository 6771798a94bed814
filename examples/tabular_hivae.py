"""HI-VAE (Nazabal et al., 2020) on a heterogeneous table with 20% of the entries missing.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). A
Gumbel-softmax mixture component s ~ q(s|x) and z ~ q(z|x, s); p(z|s) = N(mu(s), I); every
attribute head reads both z and s, so the attributes' gradients meet at z and at s. Losses: one per
attribute (named after it) and ``"kl"`` (KL of s, exact, plus the one-sample KL of z).

Overrides (environment variables read at import; or assign the module constants): those of
``tabular_vae.py`` (``IMPARTIAL_DATASET`` = ``DATASET``, default diamonds; ``IMPARTIAL_ROWS``,
``IMPARTIAL_MISSING_RATE``, ``IMPARTIAL_DATA_SEED``, ``IMPARTIAL_LATENT_DIM``,
``IMPARTIAL_HIDDEN_DIM``) and ``IMPARTIAL_MIXTURE_DIM`` (``MIXTURE_DIM``, default 8);
``TEMPERATURE`` (0.5) is the Gumbel-softmax temperature.
"""

from examples.config import env_float, env_int, env_str
from examples.data.common import TensorDictDataset, first_batch
from examples.data.tabular import load_tabular
from examples.tabular import HIVAE, evaluate_tabular

DATASET = env_str("IMPARTIAL_DATASET", "diamonds")
MAX_ROWS = env_int("IMPARTIAL_ROWS", 5000)
MISSING_RATE = env_float("IMPARTIAL_MISSING_RATE", 0.2)
DATA_SEED = env_int("IMPARTIAL_DATA_SEED", 0)
LATENT_DIM = env_int("IMPARTIAL_LATENT_DIM", 8)
HIDDEN_DIM = env_int("IMPARTIAL_HIDDEN_DIM", 64)
MIXTURE_DIM = env_int("IMPARTIAL_MIXTURE_DIM", 8)
TEMPERATURE = 0.5
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return load_tabular(DATASET, max_rows=MAX_ROWS, missing_rate=MISSING_RATE, seed=DATA_SEED)


def build_model():
    return HIVAE(
        data().schema,
        latent_dim=LATENT_DIM,
        hidden_dim=HIDDEN_DIM,
        mixture_dim=MIXTURE_DIM,
        temperature=TEMPERATURE,
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
