"""Model-file protocol loader shared by both CLIs (``blockfinder`` and ``impartial-train``).

A model file is a plain Python file that defines ``build_model()`` and ``example_batch()`` (or
``train_dataset()``), optionally ``compute_losses(model, batch)``, ``REGULARIZERS``,
``val_dataset()`` and ``evaluate(model, loader)``; see ``shared/DESIGN.md``.

Every problem is raised as :class:`ModelFileError` (or :class:`~blockfinder.errors.LossError` /
:class:`~blockfinder.errors.ModelRunError` for the losses call) with a one-line message saying what
is wrong, where, and how to fix it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import traceback
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from blockfinder.errors import BlockfinderError, LossError, ModelRunError, OptionError

__all__ = [
    "ModelFile",
    "ModelFileError",
    "batch_size_of",
    "call_build_model",
    "call_example_batch",
    "call_train_dataset",
    "call_val_dataset",
    "load_model_file",
    "make_batches",
    "make_losses_fn",
    "validate_losses",
]

_MAX_DETAIL = 300  # characters of a user exception message kept in the one-line error


class ModelFileError(BlockfinderError):
    """The model file is missing, is not Python, fails to import or breaks the protocol."""


@dataclass
class ModelFile:
    """The protocol names found in a model file (``None`` where the file does not define them)."""

    module: ModuleType
    build_model: Callable[[], Any]
    example_batch: Callable[[], Any] | None
    compute_losses: Callable[[Any, Any], Any] | None
    regularizers: list[str] | None
    train_dataset: Callable[[], Any] | None
    val_dataset: Callable[[], Any] | None
    evaluate: Callable[[Any, Any], Any] | None
    path: Path
    options: dict[str, Any] | None = None
    """The model options in force (``OPTIONS`` after ``--model-arg``); ``None``: none declared."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """The ``--model-arg`` values given, parsed."""
    metrics: dict[str, str] | None = None
    """``METRICS``: the direction (``"min"``/``"max"``) of ``evaluate()`` metrics, by name or
    glob pattern."""

    @property
    def name(self) -> str:
        """The file name as shown in messages (relative to the current directory when inside it)."""
        return _display(self.path)


# --------------------------------------------------------------------------------------------
# messages


def _display(path: Path | str) -> str:
    p = Path(path)
    try:
        rel = p.resolve().relative_to(Path.cwd().resolve())
        return str(rel)
    except (ValueError, OSError):
        return str(p)


def _one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    """Collapse a (possibly multi-line) message into one line of at most ``limit`` characters."""
    parts = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = " ".join(parts)
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return line


def _describe_exception(exc: BaseException) -> str:
    msg = _one_line(str(exc))
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def _is_library_file(filename: str) -> bool:
    return (
        "site-packages" in filename
        or "dist-packages" in filename
        or filename.startswith("<")
        or filename.startswith(sys.prefix)
        or filename.startswith(sys.base_prefix)
    )


def _user_frame(exc: BaseException, user_file: Path, user_root: Path | None) -> str | None:
    """``file:line`` of the innermost traceback frame in the user's code: the model file itself,
    or another file of its directory / package (not an installed library); ``None`` if none."""
    frames = traceback.extract_tb(exc.__traceback__)
    try:
        target = str(user_file.resolve())
        root = str(user_root.resolve()) if user_root is not None else None
    except OSError:
        return None
    for fr in reversed(frames):
        fn = fr.filename
        try:
            resolved = str(Path(fn).resolve())
        except OSError:
            continue
        if resolved == target or (
            root is not None and resolved.startswith(root + os.sep) and not _is_library_file(fn)
        ):
            return f"{_display(fn)}:{fr.lineno}"
    return None


def _raised(
    what: str,
    exc: BaseException,
    mf_path: Path,
    user_root: Path | None,
    fix: str = "",
    cls: type[BlockfinderError] = ModelFileError,
) -> BlockfinderError:
    if isinstance(exc, OptionError):  # the user's option, not the file's code, is wrong
        err = ModelFileError(f"bad model option: {_one_line(str(exc))} (from {what})")
        err.__cause__ = exc
        return err
    where = _user_frame(exc, mf_path, user_root)
    at = f" (at {where})" if where else ""
    tail = f": {fix}" if fix else ""
    err = cls(f"{what} raised {_describe_exception(exc)}{at}{tail}")
    err.__cause__ = exc
    return err


def _user_root(mf: ModelFile) -> Path:
    return Path(getattr(mf.module, "__impartial_root__", mf.path.parent))


# --------------------------------------------------------------------------------------------
# importing


def _package_chain(path: Path) -> tuple[Path, list[str]]:
    """Walk up from the file's directory while it holds ``__init__.py``.

    Returns (directory to put on sys.path, dotted name parts of the module)."""
    parts = [path.stem]
    d = path.parent
    while (d / "__init__.py").is_file():
        parts.insert(0, d.name)
        if d.parent == d:
            break
        d = d.parent
    return d, parts


def _check_source(path: Path, shown: str) -> None:
    if not path.exists():
        raise ModelFileError(f"model file {shown} does not exist: check the path")
    if path.is_dir():
        raise ModelFileError(f"{shown} is a directory: pass the model file (a .py file) inside it")
    if path.suffix != ".py":
        raise ModelFileError(
            f"{shown} is not a Python file (expected a .py model file that defines build_model())"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {shown}: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        raise ModelFileError(
            f"{shown} is not Python source (it contains binary data): pass the model .py file"
        )


def _syntax_error(exc: SyntaxError, shown: str) -> ModelFileError:
    fname = _display(exc.filename) if exc.filename else shown
    loc = f"{fname}:{exc.lineno}" if exc.lineno else fname
    msg = _one_line(exc.msg or str(exc))
    err = ModelFileError(
        f"syntax error in {loc}: {msg} (the model file must be valid Python: fix that line)"
    )
    err.__cause__ = exc
    return err


def _import_module(path: Path, shown: str) -> tuple[ModuleType, Path]:
    """Import ``path`` (as ``pkg.sub.module`` inside a package, else standalone).

    Returns (module, user root directory)."""
    base, parts = _package_chain(path)
    if len(parts) > 1:
        dotted = ".".join(parts)
        top = parts[0]
        if not all(p.isidentifier() for p in parts):
            raise ModelFileError(
                f"cannot import {shown} as module '{dotted}': every directory of a package and the "
                "file name must be valid Python identifiers (rename them)"
            )
        existing = sys.modules.get(top)
        if existing is not None:
            ex_paths = [str(Path(p).resolve()) for p in getattr(existing, "__path__", [])]
            if str((base / top).resolve()) not in ex_paths:
                where = getattr(existing, "__file__", None) or "a built-in module"
                raise ModelFileError(
                    f"the package '{top}' holding {shown} clashes with the already imported "
                    f"module '{top}' ({where}): rename the directory {base / top}"
                )
        base_s = str(base)
        if base_s not in sys.path:
            sys.path.insert(0, base_s)
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(dotted)
        except SyntaxError as exc:
            raise _syntax_error(exc, shown) from exc
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            raise _raised(
                f"importing {shown}",
                exc,
                path,
                base / top,
                "fix the error in the file (rerun with --debug for the traceback)",
            ) from exc
        mod_file = getattr(module, "__file__", None)
        if mod_file is None or Path(mod_file).resolve() != path.resolve():
            raise ModelFileError(
                f"importing {shown} as '{dotted}' found another module ({mod_file}): "
                "rename the file or its package"
            )
        module.__impartial_root__ = str(base / top)  # type: ignore[attr-defined]
        return module, base / top

    # standalone file: its directory on sys.path (so it can import its neighbours)
    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = path.stem
    existing = sys.modules.get(name)
    if not name.isidentifier() or (
        existing is not None
        and Path(getattr(existing, "__file__", "") or "").resolve() != path.resolve()
    ):
        safe = "".join(c if c.isalnum() else "_" for c in name)
        digest = zlib.crc32(str(path).encode("utf-8", "surrogateescape"))
        name = f"_impartial_model_{safe}_{digest:08x}"  # stable across processes
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"cannot import {shown}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise _syntax_error(exc, shown) from exc
    except (KeyboardInterrupt, GeneratorExit):
        sys.modules.pop(name, None)
        raise
    except BaseException as exc:
        sys.modules.pop(name, None)
        raise _raised(
            f"importing {shown}",
            exc,
            path,
            path.parent,
            "fix the error in the file (rerun with --debug for the traceback)",
        ) from exc
    module.__impartial_root__ = str(path.parent)  # type: ignore[attr-defined]
    return module, path.parent


def _optional_callable(module: ModuleType, name: str, shown: str, signature: str):
    obj = getattr(module, name, None)
    if obj is None:
        return None
    if not callable(obj):
        raise ModelFileError(
            f"{name} in {shown} is {_a(type(obj).__name__)}, not a function: define "
            f"'def {name}{signature}:'"
        )
    return obj


def _regularizers(module: ModuleType, shown: str) -> list[str] | None:
    regs = getattr(module, "REGULARIZERS", None)
    if regs is None:
        return None
    fix = "write e.g. REGULARIZERS = ['kl'] (a list of loss names)"
    if isinstance(regs, str | bytes) or not isinstance(regs, Iterable):
        raise ModelFileError(
            f"REGULARIZERS in {shown} is {_a(type(regs).__name__)}, not a list of names: {fix}"
        )
    out = list(regs)
    bad = [r for r in out if not isinstance(r, str)]
    if bad:
        raise ModelFileError(
            f"REGULARIZERS in {shown} holds {type(bad[0]).__name__} {bad[0]!r}, not a loss name: "
            f"{fix}"
        )
    return out


def _metrics(module: ModuleType, shown: str) -> dict[str, str] | None:
    declared = getattr(module, "METRICS", None)
    if declared is None:
        return None
    fix = "write e.g. METRICS = {'accuracy': 'max', 'error*': 'min'}"
    if not isinstance(declared, Mapping):
        raise ModelFileError(
            f"METRICS in {shown} is {_a(type(declared).__name__)}, not a dict: {fix}"
        )
    for name, direction in declared.items():
        if not isinstance(name, str) or direction not in ("min", "max"):
            raise ModelFileError(
                f"METRICS in {shown} maps {name!r} to {direction!r}: keys are metric names (or "
                f"glob patterns), values 'min' (lower is better) or 'max'; {fix}"
            )
    return dict(declared)


def load_model_file(
    path: str | os.PathLike[str], model_args: Mapping[str, str] | Iterable[str] | None = None
) -> ModelFile:
    """Import a model file and collect its protocol names (see the module docstring).

    ``model_args`` (``--model-arg`` texts: ``{key: text}`` or ``["key=text", ...]``) set the
    file's ``OPTIONS`` (:mod:`cli.model_options`) before any of its functions is called.
    """
    from cli.model_options import apply_model_options

    p = Path(path).expanduser()
    shown = _display(p)
    _check_source(p, shown)
    p = p.resolve()
    module, _root = _import_module(p, shown)
    given = model_args if isinstance(model_args, Mapping) else list(model_args or [])
    parsed = apply_model_options(module, shown, given)
    options = getattr(module, "OPTIONS", None)

    build = getattr(module, "build_model", None)
    if build is None:
        raise ModelFileError(
            f"{shown} defines no build_model(): add 'def build_model(): return MyModel()' "
            "returning the torch.nn.Module to analyse"
        )
    if not callable(build):
        raise ModelFileError(
            f"build_model in {shown} is {_a(type(build).__name__)}, not a function: define "
            "'def build_model(): return MyModel()'"
        )
    example = _optional_callable(module, "example_batch", shown, "()")
    train = _optional_callable(module, "train_dataset", shown, "()")
    if example is None and train is None:
        raise ModelFileError(
            f"{shown} defines neither example_batch() nor train_dataset(): add "
            "'def example_batch(): return ...' returning one batch as passed to the losses"
        )
    return ModelFile(
        module=module,
        build_model=build,
        example_batch=example,
        compute_losses=_optional_callable(module, "compute_losses", shown, "(model, batch)"),
        regularizers=_regularizers(module, shown),
        train_dataset=train,
        val_dataset=_optional_callable(module, "val_dataset", shown, "()"),
        evaluate=_optional_callable(module, "evaluate", shown, "(model, loader)"),
        path=p,
        options=dict(options) if isinstance(options, Mapping) else None,
        model_args=parsed,
        metrics=_metrics(module, shown),
    )


# --------------------------------------------------------------------------------------------
# calling the protocol functions


def call_build_model(mf: ModelFile):
    """Call ``build_model()``; the result must be a ``torch.nn.Module`` instance."""
    import torch

    try:
        model = mf.build_model()
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:
        raise _raised(
            f"build_model() in {mf.name}", exc, mf.path, _user_root(mf), "fix build_model()"
        ) from exc
    if isinstance(model, type) and issubclass(model, torch.nn.Module):
        raise ModelFileError(
            f"build_model() in {mf.name} returned the class {model.__name__}, not an instance: "
            f"return {model.__name__}(...)"
        )
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(
            f"build_model() in {mf.name} returned {_type_name(model)}, not a torch.nn.Module: "
            "return the model instance"
        )
    return model


def _type_name(obj: Any) -> str:
    """``None``, ``a dict``, ``an int``, ``a numpy.ndarray``: the type of ``obj``."""
    if obj is None:
        return "None"
    t = type(obj)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return _a(name)


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def call_train_dataset(mf: ModelFile):
    """Call ``train_dataset()`` (``None`` when the file does not define it)."""
    return _call_dataset(mf, "train_dataset", mf.train_dataset)


def call_val_dataset(mf: ModelFile):
    """Call ``val_dataset()`` (``None`` when the file does not define it)."""
    return _call_dataset(mf, "val_dataset", mf.val_dataset)


def _call_dataset(mf: ModelFile, name: str, fn: Callable[[], Any] | None):
    if fn is None:
        return None
    try:
        ds = fn()
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:
        raise _raised(
            f"{name}() in {mf.name}", exc, mf.path, _user_root(mf), f"fix {name}()"
        ) from exc
    if ds is None or not (hasattr(ds, "__getitem__") or hasattr(ds, "__iter__")):
        raise ModelFileError(
            f"{name}() in {mf.name} returned {_type_name(ds)}, not a torch.utils.data.Dataset: "
            "return a Dataset (e.g. torch.utils.data.TensorDataset)"
        )
    return ds


def _dataset_len(ds: Any) -> int | None:
    try:
        return len(ds)
    except TypeError:
        return None


def _loader(ds: Any, batch_size: int, *, shuffle: bool, seed: int):
    import torch
    from torch.utils.data import DataLoader, IterableDataset
    from torch.utils.data._utils.collate import default_collate

    gen = torch.Generator()
    gen.manual_seed(seed)
    iterable = isinstance(ds, IterableDataset) or not hasattr(ds, "__getitem__")
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        collate_fn=default_collate,
        generator=gen,
    )


def _first_batch(mf: ModelFile, ds: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    try:
        return next(iter(_loader(ds, batch_size, shuffle=shuffle, seed=seed)))
    except StopIteration:
        raise ModelFileError(
            f"train_dataset() in {mf.name} is empty: it must hold at least one example"
        ) from None
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except BaseException as exc:
        raise _raised(
            f"taking a batch of size {batch_size} from train_dataset() in {mf.name}",
            exc,
            mf.path,
            _user_root(mf),
            "its items must be tensors, numbers or dicts/tuples of them "
            "(or define example_batch())",
        ) from exc


def call_example_batch(mf: ModelFile, dataset: Any = None):
    """One batch: ``example_batch()``, or else the first ``min(len, 32)`` items of
    ``train_dataset()`` (``dataset`` when the caller has built it already) collated with
    ``default_collate``."""
    if mf.example_batch is not None:
        try:
            batch = mf.example_batch()
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            raise _raised(
                f"example_batch() in {mf.name}", exc, mf.path, _user_root(mf), "fix example_batch()"
            ) from exc
        if batch is None:
            raise ModelFileError(
                f"example_batch() in {mf.name} returned None: return one batch as passed to the "
                "losses (a tensor, or a dict/tuple of tensors)"
            )
        return batch
    ds = dataset if dataset is not None else call_train_dataset(mf)
    if ds is None:  # load_model_file guarantees one of the two; keep the message anyway
        raise ModelFileError(
            f"{mf.name} defines neither example_batch() nor train_dataset(): add "
            "'def example_batch(): return ...'"
        )
    n = _dataset_len(ds)
    if n == 0:
        raise ModelFileError(
            f"train_dataset() in {mf.name} is empty: it must hold at least one example"
        )
    return _first_batch(mf, ds, min(n, 32) if n is not None else 32)


def batch_size_of(batch: Any) -> int | None:
    """The leading dimension of the first tensor found in ``batch`` (``None`` if there is none)."""
    import torch

    stack = [batch]
    seen = 0
    while stack and seen < 1000:
        seen += 1
        b = stack.pop(0)
        if isinstance(b, torch.Tensor):
            return int(b.shape[0]) if b.dim() > 0 else None
        if isinstance(b, Mapping):
            stack.extend(b.values())
        elif isinstance(b, list | tuple):
            stack.extend(b)
    return None


def make_batches(mf: ModelFile, n: int, *, batch_size: int | None = None, seed: int = 0) -> list:
    """``n`` batches: from ``train_dataset()`` through a seeded, shuffled DataLoader (cycled when
    it holds fewer batches), or else ``example_batch()`` repeated."""
    if n <= 0:
        return []
    ds = call_train_dataset(mf)
    if ds is None:
        return [call_example_batch(mf) for _ in range(n)]
    if batch_size is None:
        batch_size = 32
    size = _dataset_len(ds)
    if size == 0:
        raise ModelFileError(f"train_dataset() in {mf.name} is empty: it must hold examples")
    if size is not None:
        batch_size = max(1, min(batch_size, size))
    out: list = []
    epoch = 0
    while len(out) < n:
        loader = _loader(ds, batch_size, shuffle=True, seed=seed + epoch)
        got = 0
        try:
            for b in loader:
                out.append(b)
                got += 1
                if len(out) >= n:
                    break
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as exc:
            raise _raised(
                f"iterating train_dataset() in {mf.name}", exc, mf.path, _user_root(mf)
            ) from exc
        if got == 0:
            raise ModelFileError(f"train_dataset() in {mf.name} yielded no batch")
        epoch += 1
    return out


# --------------------------------------------------------------------------------------------
# losses


def _is_tracing() -> bool:
    """True while torch.fx / dynamo / export trace the losses: validation must then stay silent."""
    import torch

    try:
        if torch.compiler.is_compiling():
            return True
        is_exporting = getattr(torch.compiler, "is_exporting", None)
        if is_exporting is not None and is_exporting():
            return True
    except Exception:  # pragma: no cover - defensive
        pass
    try:
        from torch.fx._symbolic_trace import is_fx_symbolic_tracing

        if is_fx_symbolic_tracing():
            return True
    except Exception:  # pragma: no cover
        pass
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            return True
    except Exception:  # pragma: no cover
        pass
    return False


def _eager_tensor(v: Any) -> bool:
    import torch

    return type(v) in (torch.Tensor, torch.nn.Parameter)


def validate_losses(
    result: Any, source: str, mf_name: str, *, check_finite: bool = True
) -> dict[str, Any]:
    """Check that ``result`` is a non-empty mapping of finite scalar tensors; return it as a dict.

    ``check_finite=False`` skips the finiteness check (the only one that synchronises with an
    accelerator).

    ``source`` names the call in messages: ``"model(batch)"`` or
    ``"compute_losses(model, batch)"``.
    """
    import torch

    fix = f"define compute_losses(model, batch) in {mf_name} or return a dict"
    if not isinstance(result, Mapping):
        what = "a Tensor" if isinstance(result, torch.Tensor) else _type_name(result)
        if source.startswith("model("):
            raise LossError(
                f"{source} returned {what}, not a mapping of named losses: "
                f"{fix} of scalar losses, e.g. {{'recon': ..., 'kl': ...}}"
            )
        raise LossError(
            f"{source} in {mf_name} returned {what}, not a mapping of named losses: "
            "return a dict of scalar losses, e.g. {'recon': ..., 'kl': ...}"
        )
    losses = dict(result)
    where = source if source.startswith("model(") else f"{source} in {mf_name}"
    if not losses:
        raise LossError(f"{where} returned an empty mapping: return at least one named loss")
    if _is_tracing():
        return losses
    for name, value in losses.items():
        if not isinstance(name, str):
            raise LossError(
                f"{where} returned a loss named {name!r} ({type(name).__name__}): "
                "loss names must be strings"
            )
        if not isinstance(value, torch.Tensor):
            raise LossError(
                f"loss '{name}' from {where} is {_type_name(value)}, not a tensor: "
                "compute it with torch operations on the model's outputs"
            )
        if not _eager_tensor(value):
            continue  # a tensor subclass of some tracing machinery: leave it alone
        if value.dim() != 0:
            shape = tuple(value.shape)
            hint = ".squeeze()" if value.numel() == 1 else ".mean() or .sum()"
            raise LossError(
                f"loss '{name}' from {where} has shape {shape}, not a scalar: reduce it "
                f"(e.g. {hint})"
            )
        if not value.is_floating_point():
            raise LossError(
                f"loss '{name}' from {where} has dtype {value.dtype}: losses must be "
                "floating-point scalars"
            )
        if not check_finite:
            continue
        try:
            val = float(value.detach())
        except Exception:  # pragma: no cover - exotic devices
            continue
        if not math.isfinite(val):
            raise LossError(
                f"loss '{name}' from {where} is {val} (not finite) on the example batch: "
                "check its computation (log of 0, division by 0, exploding values)"
            )
    return losses


def make_losses_fn(
    mf: ModelFile, *, check_finite: Literal["always", "first", "never"] = "always"
) -> Callable[[Any, Any], dict[str, Any]]:
    """``(model, batch) -> {name: scalar tensor}``: ``compute_losses`` if the file defines it, else
    ``model(batch)``. Raises :class:`LossError` / :class:`ModelRunError` with one-line messages.

    The result is always checked to be a mapping of scalar tensors; ``check_finite`` says when the
    values are checked to be finite: on every call, on the first call only (training loops: the
    check synchronises with an accelerator), or never.
    """
    user_fn = mf.compute_losses
    root = _user_root(mf)
    name = mf.name
    calls = [0]

    def finite_now() -> bool:
        calls[0] += 1
        return check_finite == "always" or (check_finite == "first" and calls[0] == 1)

    if user_fn is not None:

        def losses_fn(model, batch):
            try:
                result = user_fn(model, batch)
            except BlockfinderError:
                raise
            except (KeyboardInterrupt, GeneratorExit):
                raise
            except Exception as exc:
                if _is_tracing():
                    raise
                raise _raised(
                    f"compute_losses(model, batch) in {name}",
                    exc,
                    mf.path,
                    root,
                    "fix compute_losses() or the model",
                    cls=LossError,
                ) from exc
            return validate_losses(
                result, "compute_losses(model, batch)", name, check_finite=finite_now()
            )

    else:

        def losses_fn(model, batch):
            try:
                result = model(batch)
            except BlockfinderError:
                raise
            except (KeyboardInterrupt, GeneratorExit):
                raise
            except Exception as exc:
                if _is_tracing():
                    raise
                raise _raised(
                    f"model(batch) (model from {name})",
                    exc,
                    mf.path,
                    root,
                    "fix the model's forward or define compute_losses(model, batch)",
                    cls=ModelRunError,
                ) from exc
            return validate_losses(result, "model(batch)", name, check_finite=finite_now())

    losses_fn.__name__ = "compute_losses" if user_fn is not None else "model_losses"
    losses_fn.__qualname__ = losses_fn.__name__
    losses_fn.__doc__ = f"The losses of {name} (validated)."
    return losses_fn
