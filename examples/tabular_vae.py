"""Heterogeneous tabular VAE (ELBO) with 20% of the entries missing.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). The
encoder sees the observed entries and the mask; a shared decoder trunk feeds one likelihood head per
attribute (Normal, LogNormal, Poisson, Categorical, Bernoulli). Losses: one per attribute, named
after it (minus its log-likelihood over the observed entries, averaged over the batch), and
``"kl"``.
The attributes' gradients meet at the output of the shared trunk (one stream per head).

Default data: ggplot2/diamonds (5000 rows), where the Poisson price attribute's gradients dominate.
Overrides (environment variables read at import; or assign the module constants):

- ``IMPARTIAL_DATASET`` (``DATASET``): diamonds, cps1988, rwm5yr, movies, labour, wine,
  breast_cancer (docs/datasets.md);
- ``IMPARTIAL_ROWS`` (``MAX_ROWS``, 5000; 0 = all rows), ``IMPARTIAL_MISSING_RATE``
  (``MISSING_RATE``, 0.2), ``IMPARTIAL_DATA_SEED`` (``DATA_SEED``, 0);
- ``IMPARTIAL_LATENT_DIM`` (``LATENT_DIM``, 8), ``IMPARTIAL_HIDDEN_DIM`` (``HIDDEN_DIM``, 64).
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
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return load_tabular(DATASET, max_rows=MAX_ROWS, missing_rate=MISSING_RATE, seed=DATA_SEED)


def build_model():
    return HeterogeneousVAE(data().schema, latent_dim=LATENT_DIM, hidden_dim=HIDDEN_DIM)


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
