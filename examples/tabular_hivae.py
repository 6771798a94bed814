"""HI-VAE (Nazabal et al., 2020) on a heterogeneous table with 20% of the entries missing.

A model file for ``blockfinder`` and ``impartial-train`` (protocol: docs/architecture.md). A
Gumbel-softmax mixture component s ~ q(s|x) and z ~ q(z|x, s); p(z|s) = N(mu(s), I); every
attribute head reads both z and s, so the attributes' gradients meet at z and at s. Losses: one per
attribute (named after it) and ``"kl"`` (KL of s, exact, plus the one-sample KL of z).

Options (``--model-arg KEY=VALUE``): those of ``tabular_vae.py`` (``table``, ``kinds``,
``drop``, ``rows``, ``missing``, ``val``, ``data_seed``, ``latent``, ``latent_frac``, ``hidden``,
``dropout``; its encoder has two hidden layers), ``mixture`` (components of s, default 8;
``IMPARTIAL_MIXTURE_DIM``) and ``temperature`` (Gumbel-softmax, 0.5).
"""

from examples.config import env_float, env_int, env_str
from examples.data.common import TensorDictDataset, first_batch
from examples.data.tabular import table_from_options
from examples.tabular import HIVAE, TABULAR_METRICS, evaluate_tabular, latent_size

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
    "dropout": 0.0,
    "mixture": env_int("IMPARTIAL_MIXTURE_DIM", 8),
    "temperature": 0.5,
}
METRICS = TABULAR_METRICS
BATCH_SIZE = 128  # suggested DataLoader batch size
EXAMPLE_BATCH_SIZE = 64

REGULARIZERS = ["kl"]


def data():
    return table_from_options(OPTIONS)


def build_model():
    schema = data().schema
    return HIVAE(
        schema,
        latent_dim=latent_size(OPTIONS, schema),
        hidden_dim=OPTIONS["hidden"],
        mixture_dim=OPTIONS["mixture"],
        temperature=OPTIONS["temperature"],
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
