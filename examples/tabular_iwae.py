"""Heterogeneous tabular IWAE: the tabular VAE trained on the importance-weighted bound.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). Same
network as ``tabular_vae.py``; the objective is the IWAE bound with K samples (Burda et al., 2016):
the decoder is applied to all K latent samples. Each attribute's loss is its log-likelihood weighted
by the detached normalised importance weights, so the sum of the terms has exactly the IWAE gradient
(the value is a surrogate, not the bound). Losses: one per attribute (named after it) and ``"kl"``
(the weighted log q(z|x) - log p(z)).

Options (``--model-arg KEY=VALUE``): those of ``tabular_vae.py`` (``table``, ``kinds``,
``drop``, ``rows``, ``missing``, ``val``, ``data_seed``, ``latent``, ``latent_frac``, ``hidden``,
``layers``, ``dropout``) and ``samples`` (K, default 8; ``IMPARTIAL_SAMPLES``).
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
    "samples": env_int("IMPARTIAL_SAMPLES", 8),
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
        objective="iwae",
        num_samples=OPTIONS["samples"],
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
