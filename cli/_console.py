"""Shared console helpers of both CLIs: rich consoles, one-line errors, exit codes.

``run_cli(main_fn, argv)`` runs a CLI body and maps what it raises to an exit status:

- a user error (:class:`~blockfinder.errors.BlockfinderError` and subclasses, bad command-line
  arguments, an ``OSError`` naming a file: an output path that is a directory or cannot be
  created) -> one red line ``error: ...`` on stderr, exit 2 (traceback only with ``--debug``);
- ``KeyboardInterrupt`` -> ``interrupted``, exit 130;
- anything else -> ``internal error: ... (rerun with --debug for the traceback)``, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from blockfinder.errors import BlockfinderError

__all__ = [
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ArgumentParser",
    "UsageError",
    "err_console",
    "error_line",
    "info",
    "one_line",
    "out_console",
    "run_cli",
    "seed_number",
    "warn",
]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(BlockfinderError):
    """Bad command-line arguments."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors become :class:`UsageError` (one line, exit 2)
    instead of printing the usage block and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _width() -> int | None:
    """Terminal width, or a wide default when the output is not a terminal (files, pipes, tests),
    so that tables are not squeezed to 80 columns."""
    if os.environ.get("COLUMNS"):
        return None  # rich reads COLUMNS itself
    return None if sys.stdout.isatty() else 160


def out_console() -> Console:
    """A console on the current ``sys.stdout`` (created per call: tests swap the streams)."""
    return Console(file=sys.stdout, highlight=False, width=_width())


def err_console() -> Console:
    """A console on the current ``sys.stderr``."""
    return Console(file=sys.stderr, highlight=False, width=_width())


def one_line(message: object) -> str:
    """Collapse a message into one line (user exceptions may carry several)."""
    parts = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return " ".join(parts)


def error_line(message: object, prefix: str = "error") -> None:
    """Print ``prefix: message`` as one red line on stderr (never wrapped, no markup)."""
    text = Text(f"{prefix}: {one_line(message)}", style="bold red")
    err_console().print(text, soft_wrap=True)


def warn(message: object) -> None:
    """One yellow line on stderr."""
    err_console().print(Text(one_line(message), style="yellow"), soft_wrap=True)


def info(message: object, style: str | None = None) -> None:
    """One line on stdout (markup not interpreted)."""
    out_console().print(Text(str(message), style=style or ""), soft_wrap=True)


def _print_traceback(exc: BaseException) -> None:
    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    sys.stderr.flush()


def seed_number(text: str) -> int:
    """argparse type of ``--seed``: an integer in the range ``torch.manual_seed`` accepts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range [-2**63, 2**64)")
    return value


def run_cli(
    main_fn: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    debug: bool | None = None,
) -> int:
    """Run ``main_fn(argv)`` and turn what it raises into an exit status (see module docstring).

    ``debug`` defaults to ``--debug`` being among the arguments (known before parsing, so that
    argument errors honour it too) or ``IMPARTIAL_DEBUG=1`` in the environment.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if debug is None:
        debug = "--debug" in args or os.environ.get("IMPARTIAL_DEBUG", "") not in ("", "0")
    try:
        code = main_fn(args)
    except SystemExit as exc:  # --help, --version, or an explicit exit inside main_fn
        if exc.code is None:
            return EXIT_OK
        if isinstance(exc.code, int):
            return exc.code
        error_line(exc.code)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        error_line("interrupted", prefix="error")
        return EXIT_INTERRUPTED
    except BlockfinderError as exc:
        if debug:
            _print_traceback(exc)
        error_line(exc)
        return EXIT_USAGE
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error worth a message
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return EXIT_INTERNAL
    except OSError as exc:
        if exc.filename is None:
            return _internal_error(exc, debug)
        if debug:
            _print_traceback(exc)
        error_line(f"{exc.strerror or one_line(exc)}: {exc.filename}")
        return EXIT_USAGE
    except Exception as exc:
        return _internal_error(exc, debug)
    return EXIT_OK if code is None else int(code)


def _internal_error(exc: BaseException, debug: bool) -> int:
    message = f"{type(exc).__name__}: {one_line(exc)}"
    if debug:
        _print_traceback(exc)
    else:
        message += " (rerun with --debug for the traceback)"
    error_line(message, prefix="internal error")
    return EXIT_INTERNAL
