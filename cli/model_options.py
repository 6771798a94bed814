"""Model options: ``--model-arg KEY=VALUE`` of both CLIs, declared by ``OPTIONS`` in a model file.

A model file declares its options with their defaults in a module-level dict::

    OPTIONS = {"table": "diamonds", "missing": 0.2, "rows": 5000, "dropout": 0.0, "plot": False}

``--model-arg KEY=VALUE`` (repeatable) overrides one of them. Values are parsed to the type of
the default: ``bool`` (true/false, yes/no, on/off, 1/0), ``int``, ``float`` (an integer is
accepted), ``str`` (as given), a list or tuple (comma-separated strings), and ``None`` (no type
declared: int, float, bool, none, else the string). The model file reads ``OPTIONS[...]`` when its
functions are called: the CLI replaces the module's ``OPTIONS`` with the defaults updated by the
given values before calling any of them.

Every problem is one line: an unknown key lists the valid keys, a value that does not parse says
which type the option wants. A model file that finds a value unusable (a table that does not
exist, a rate out of range) raises :class:`blockfinder.errors.OptionError`, which the CLIs print as
one line naming the option.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from blockfinder.errors import BlockfinderError

__all__ = [
    "DEFAULTS_ATTR",
    "ModelOptionError",
    "apply_model_options",
    "declared_options",
    "parse_model_args",
    "parse_option",
]

DEFAULTS_ATTR = "__impartial_option_defaults__"
"""Module attribute keeping the file's own defaults, so that options can be applied again."""

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class ModelOptionError(BlockfinderError):
    """A ``--model-arg`` names no option of the model file, or its value does not parse."""


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "an integer"
    if isinstance(default, float):
        return "a number"
    if isinstance(default, list | tuple):
        return "a comma-separated list"
    return "a string"


def parse_option(key: str, text: str, default: Any) -> Any:
    """``text`` parsed to the type of ``default`` (see the module docstring).

    Raises ``ValueError`` with the reason when the text does not parse.
    """
    value = text.strip()
    if isinstance(default, bool):
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {text!r}")
        return number
    if isinstance(default, list | tuple):
        items = [part.strip() for part in value.split(",") if part.strip()]
        return type(default)(items)
    if default is None:
        return _guess(value)
    return text


def _guess(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    return text


def parse_model_args(items: Sequence[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}`` (texts, unparsed); a later key overrides an earlier one."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ModelOptionError(f"--model-arg expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def declared_options(module: ModuleType, shown: str) -> dict[str, Any] | None:
    """The model file's own ``OPTIONS`` defaults (``None`` when it declares none)."""
    defaults = getattr(module, DEFAULTS_ATTR, None)
    if defaults is not None:
        return dict(defaults)
    options = getattr(module, "OPTIONS", None)
    if options is None:
        return None
    if not isinstance(options, Mapping):
        raise ModelOptionError(
            f"OPTIONS in {shown} is {type(options).__name__}, not a dict: write e.g. "
            "OPTIONS = {'table': 'diamonds', 'missing': 0.2}"
        )
    bad = [k for k in options if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ModelOptionError(
            f"OPTIONS in {shown} has the key {bad[0]!r}: option names must be identifiers"
        )
    defaults = dict(options)
    setattr(module, DEFAULTS_ATTR, defaults)
    return dict(defaults)


def apply_model_options(
    module: ModuleType, shown: str, given: Mapping[str, str] | Sequence[str] | None
) -> dict[str, Any]:
    """Set ``module.OPTIONS`` to the file's defaults updated by ``given`` (texts, or KEY=VALUE
    items); returns the given options, parsed (what config.json records).

    Applying again starts from the file's own defaults, not from the previous values.
    """
    texts = parse_model_args(given) if not isinstance(given, Mapping) else dict(given)
    defaults = declared_options(module, shown)
    if defaults is None:
        if texts:
            first = next(iter(texts))
            raise ModelOptionError(
                f"--model-arg {first}=...: {shown} declares no options (add a module-level "
                "OPTIONS = {'name': default, ...} to the file and read OPTIONS['name'] in it)"
            )
        return {}
    parsed: dict[str, Any] = {}
    for key, text in texts.items():
        if key not in defaults:
            valid = ", ".join(defaults) or "(none)"
            raise ModelOptionError(
                f"--model-arg {key}: {shown} has no option {key!r}; valid keys: {valid}"
            )
        try:
            parsed[key] = parse_option(key, text, defaults[key])
        except ValueError as exc:
            raise ModelOptionError(
                f"--model-arg {key}={text}: {exc} ({key!r} of {shown} is {_kind(defaults[key])}, "
                f"default {defaults[key]!r})"
            ) from None
    module.OPTIONS = {**defaults, **parsed}
    return parsed
