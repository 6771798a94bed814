"""Heterogeneous tabular IWAE trained with doubly reparameterised gradients (DReG).

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). DReG
(Tucker et al., 2018), as in the paper's code: the decoder is applied twice to the K samples, once
to the detached samples (decoder path, weights w~) and once with its own weights detached (encoder
path, weights w~^2, with log q evaluated at detached variational parameters). So the attributes'
gradients meet both at the decoder trunk's output on the decoder path and at the trunk's output on
the encoder path. Losses: one per attribute (named after it, both paths) and ``"kl"``; their sum is
a surrogate whose gradient is the DReG estimator.

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
        objective="dreg",
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
