"""Reading size and dataset overrides from environment variables.

Every example model file reads its defaults through these helpers at import time, so that

    IMPARTIAL_DATASET=wine IMPARTIAL_ROWS=0 impartial-train examples/tabular_vae.py

changes the data without editing the file. The variables are listed in each file's docstring and in
``docs/datasets.md``.
"""

from __future__ import annotations

import os


def env_str(name: str, default: str) -> str:
    """The value of environment variable ``name``, or ``default`` when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int) -> int:
    """Integer environment variable ``name`` (``default`` when unset); a clear error otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def env_float(name: str, default: float) -> float:
    """Float environment variable ``name`` (``default`` when unset); a clear error otherwise."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be a number") from None
