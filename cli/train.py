"""``impartial-train``: train the model of a model file impartially (a thin layer over Trainer).

impartial-train MODEL.py [--method NAME|A+B] [--method-arg KEY=VALUE ...] [--epochs N]
                [--batch-size B] [--lr LR] [--optimizer adam|adamw|sgd] [--weight-decay W]
                [--seed S] [--device auto|cpu|cuda] [--out DIR] [--resume] [--val-every K]
                [--no-rescale] [--regularizer NAME ...] [--compare M1,M2,...] [--devices N]
                [--debug]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from blockfinder.errors import BlockfinderError
from cli._console import ArgumentParser, UsageError, err_console, out_console, run_cli, seed_number
from cli.model_options import parse_model_args

PROG = "impartial-train"
DEFAULT_METHOD = "pcgrad"
DEFAULTS: dict[str, Any] = {
    "method": DEFAULT_METHOD,
    "method_arg": [],
    "epochs": 10,
    "batch_size": None,  # the model file's BATCH_SIZE, else 32
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "seed": 0,
    "device": "auto",
    "val_every": 1,
    "rescale": True,
    "verify": True,
    "regularizer": None,
    "compare": None,
    "devices": 1,
    "model_arg": [],
    "seeds": None,
    "steps": None,
}
#: options taken from the run's config.json on --resume when not given again
RESUMED = tuple(DEFAULTS)
FALLBACK_BATCH_SIZE = 32


# --------------------------------------------------------------------------------------------
# arguments


def _number(kind, minimum: float, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if (
            (kind is float and not math.isfinite(value))
            or value < minimum
            or (strict and value == minimum)
        ):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            raise argparse.ArgumentTypeError(f"expected a value {bound}, got {text}")
        return value

    return parse


def _seed_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}")
    seeds = [seed_number(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is listed twice in {text!r}")
    return seeds


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu or cuda, got {text!r}")


def build_parser() -> ArgumentParser:
    from blockfinder import __version__
    from impartial_train.trainer import OPTIMIZERS

    parser = ArgumentParser(
        prog=PROG,
        description="Train the model of a model file with multitask gradient surgery at its "
        "branch points (or plainly with --method sum). Outputs: config.json, metrics.jsonl, "
        "checkpoint.pt, curves.png in --out.",
        epilog="Model file: build_model(), train_dataset(), optionally val_dataset(), "
        "compute_losses(model, batch), REGULARIZERS, evaluate(model, loader), BATCH_SIZE. "
        "Ctrl-C saves a checkpoint; --resume continues it exactly.",
    )
    parser.add_argument("model", metavar="MODEL.py", help="the model file")
    parser.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the model file (repeatable; its OPTIONS lists them), e.g. "
        "--model-arg table=data.csv",
    )
    parser.add_argument(
        "--method",
        metavar="NAME|A+B",
        help=f"aggregation method, or a composition A+B; 'sum' is vanilla training "
        f"(default: {DEFAULT_METHOD})",
    )
    parser.add_argument(
        "--method-arg",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the method (repeatable), e.g. --method-arg alpha=1.5",
    )
    parser.add_argument("--epochs", type=_number(int, 0, False), metavar="N", help="(default: 10)")
    parser.add_argument(
        "--steps",
        type=_number(int, 1, False),
        metavar="N",
        help="train for N optimizer steps instead of --epochs (rounded up to whole epochs: "
        "ceil(N / batches per epoch))",
    )
    parser.add_argument(
        "--batch-size",
        type=_number(int, 1, False),
        metavar="B",
        help="batch size (the global batch with --devices); default: the model file's "
        f"BATCH_SIZE, else {FALLBACK_BATCH_SIZE}",
    )
    parser.add_argument("--lr", type=_number(float, 0, True), metavar="LR", help="(default: 1e-3)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="(default: adam)")
    parser.add_argument(
        "--weight-decay", type=_number(float, 0, False), metavar="W", help="(default: 0)"
    )
    parser.add_argument("--seed", type=seed_number, metavar="S", help="random seed (default: 0)")
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="S1,S2,...",
        help="one run per seed (in --out/seed-<s>/, or --out/<method>/seed-<s>/ with --compare), "
        "then mean ± std per loss and metric (compare.json)",
    )
    parser.add_argument("--device", type=_device, metavar="auto|cpu|cuda", help="(default: auto)")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: runs/<model>-<method>-<YYYYmmdd-HHMMSS>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (default --out: the latest run of "
        "this model); options not given again are those of the run",
    )
    parser.add_argument(
        "--val-every",
        type=_number(int, 1, False),
        metavar="K",
        help="validate (and evaluate()) every K epochs and after the last (default: 1)",
    )
    parser.add_argument(
        "--no-rescale",
        dest="rescale",
        action="store_const",
        const=False,
        help="do not rescale combined gradients to the norm of the plain sum",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_const",
        const=False,
        help="skip the engines' self-check (on the first step of each input structure, surgery "
        "with the identity combination must give plain backward's gradients)",
    )
    parser.add_argument(
        "--regularizer",
        action="append",
        metavar="NAME",
        help="a loss excluded from surgery (repeat or separate with commas); default: the "
        "file's REGULARIZERS, else 'kl' if there is such a loss",
    )
    parser.add_argument(
        "--compare",
        metavar="M1,M2,...",
        help="train each method with the same seed and data (in --out/<method>/), then "
        "compare them (compare.json, compare.png)",
    )
    parser.add_argument(
        "--devices",
        type=_number(int, 1, False),
        metavar="N",
        help="data-parallel training on N processes (DDP; gloo on CPU, nccl on GPU)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def parse_value(text: str) -> Any:
    """``KEY=VALUE`` values: int, then float, then bool/None words, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    return text


def parse_method_args(items: Sequence[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--method-arg expects KEY=VALUE, got {item!r}")
        if not key.isidentifier():
            raise UsageError(f"--method-arg {item!r}: {key!r} is not an option name")
        out[key] = parse_value(value.strip())
    return out


def check_method(spec: str, method_args: Mapping[str, Any]) -> None:
    """Build the method once: unknown names and bad options become one-line usage errors."""
    from impartial_train.methods import available, build

    if not spec or not spec.strip():
        raise UsageError(f"--method needs a name; available: {', '.join(available())}")
    try:
        build(spec, **dict(method_args))
    except ValueError as exc:
        text = str(exc)
        if text.startswith("unknown aggregation method"):
            raise UsageError(f"--method: {text}") from exc
        raise UsageError(f"bad --method-arg: {text}") from exc
    except TypeError as exc:
        raise UsageError(f"bad --method-arg for method {spec!r}: {exc}") from exc


def _accepted_args(spec: str, method_args: Mapping[str, Any]) -> dict[str, Any]:
    """The method args that ``spec`` takes (for --compare, where methods differ)."""
    from impartial_train.methods import build

    out = {}
    for key, value in method_args.items():
        try:
            build(spec, **{key: value})
        except (ValueError, TypeError):
            continue
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# options


def _split_list(items: Sequence[str] | None) -> list[str]:
    return [p.strip() for item in items or [] for p in item.split(",") if p.strip()]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _new_out(stem: str, label: str) -> Path:
    base = Path("runs") / f"{_safe(stem)}-{_safe(label)}-{_timestamp()}"
    out, k = base, 2
    while out.exists():
        out = base.with_name(f"{base.name}-{k}")
        k += 1
    return out


def _latest_run(stem: str, label: str | None) -> Path | None:
    """The newest ``runs/<stem>-<label>-*`` directory holding a checkpoint (or, for a
    comparison, a method subdirectory holding one)."""
    runs = Path("runs")
    if not runs.is_dir():
        return None
    pattern = f"{_safe(stem)}-{_safe(label)}-*" if label else f"{_safe(stem)}-*"
    found = []
    for d in runs.glob(pattern):
        marks = [d / "checkpoint.pt", *d.glob("*/checkpoint.pt"), *d.glob("*/*/checkpoint.pt")]
        times = [m.stat().st_mtime for m in marks if m.is_file()]
        if times:
            found.append((max(times), str(d)))
    return Path(max(found)[1]) if found else None


def resolve_options(args: argparse.Namespace, model_path: Path) -> tuple[dict[str, Any], Path]:
    """Fill the options: explicit ones, then (on --resume) the run's config.json, then defaults.

    Returns (options, output directory)."""
    explicit = {k: getattr(args, k) for k in RESUMED if getattr(args, k, None) is not None}
    if args.compare is not None and args.method is not None:
        raise UsageError("--compare and --method exclude each other: list the methods in --compare")
    if args.seeds is not None and args.seed is not None:
        raise UsageError("--seed and --seeds exclude each other: list every seed in --seeds")
    if args.steps is not None and args.epochs is not None:
        raise UsageError("--epochs and --steps exclude each other: give the budget once")
    stem = model_path.stem
    if args.out:
        out = Path(args.out)
    elif args.resume:
        label = "compare" if args.compare else args.method
        latest = _latest_run(stem, label)
        if latest is None:
            where = f"runs/{_safe(stem)}-{_safe(label)}-*" if label else f"runs/{_safe(stem)}-*"
            raise UsageError(
                f"--resume: no earlier run with a checkpoint in {where}: pass --out DIR of the "
                "run to continue"
            )
        out = latest
    else:
        out = None  # decided once the method is known
    saved: dict[str, Any] = {}
    if args.resume and out is not None:
        config = out / "config.json"
        if config.is_file():
            try:
                saved = dict(json.loads(config.read_text()).get("options") or {})
            except (OSError, ValueError):
                saved = {}
    if "model_arg" in explicit and saved.get("model_arg") is not None:
        before, now = parse_model_args(saved["model_arg"]), parse_model_args(explicit["model_arg"])
        if {**before, **now} != before:
            raise UsageError(
                f"--resume: the run in {out} was trained with model options "
                f"{' '.join(f'{k}={v}' for k, v in before.items()) or '(defaults)'}: resume "
                "without --model-arg, or train into another --out"
            )
    options = dict(DEFAULTS)
    options.update({k: v for k, v in saved.items() if k in RESUMED and v is not None})
    if "compare" in explicit or "method" in explicit:  # one or the other, never both
        options["compare"] = explicit.get("compare")
        options["method"] = explicit.get("method", DEFAULT_METHOD)
    options.update({k: v for k, v in explicit.items() if k not in ("compare", "method")})
    if "epochs" in explicit:  # a budget given again replaces the run's
        options["steps"] = None
    if isinstance(options.get("method_arg"), Mapping):  # saved as parsed
        options["method_arg"] = [f"{k}={v}" for k, v in options["method_arg"].items()]
    if out is None:
        label = "compare" if options["compare"] else options["method"]
        out = _new_out(stem, label + ("-seeds" if options.get("seeds") else ""))
    return options, out


# --------------------------------------------------------------------------------------------
# preparing a run (parent process and data-parallel workers alike)


def _regularizers(requested: list[str] | None, mf: Any, loss_names: Sequence[str]) -> list[str]:
    if requested:
        source = "--regularizer"
    elif mf.regularizers is not None:
        requested, source = list(mf.regularizers), f"REGULARIZERS in {mf.name}"
    else:
        return [r for r in ("kl",) if r in loss_names]
    unknown = [r for r in requested if r not in loss_names]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise BlockfinderError(
            f"unknown regularizer{plural} {', '.join(map(repr, unknown))} (from {source}): the "
            f"losses are {', '.join(loss_names)}"
        )
    return list(dict.fromkeys(requested))


def _wrap_evaluate(mf: Any):
    if mf.evaluate is None:
        return None
    from cli.loader import ModelFileError, _raised, _user_root

    user_fn = mf.evaluate

    def evaluate(model, loader):
        try:
            return user_fn(model, loader)
        except BlockfinderError:
            raise
        except Exception as exc:
            raise _raised(
                f"evaluate(model, loader) in {mf.name}",
                exc,
                mf.path,
                _user_root(mf),
                "fix evaluate()",
                cls=ModelFileError,
            ) from exc

    return evaluate


def _check_train_dataset(mf: Any) -> None:
    from cli.loader import ModelFileError

    if mf.train_dataset is None:
        raise ModelFileError(
            f"{mf.name} defines no train_dataset(): add 'def train_dataset(): return "
            "torch.utils.data.TensorDataset(...)' (a Dataset of training examples) to train it"
        )


def _batch_size(mf: Any, options: Mapping[str, Any]) -> int:
    if options.get("batch_size"):
        return int(options["batch_size"])
    value = getattr(mf.module, "BATCH_SIZE", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return FALLBACK_BATCH_SIZE


def build_run(
    mf: Any,
    options: Mapping[str, Any],
    method: str,
    device: Any,
    regularizers: list[str] | None,
    config: Mapping[str, Any],
    probe: bool,
):
    """Seed, build the model and datasets, probe the losses once, make the Trainer.

    Returns (trainer, train dataset, val dataset or None, evaluate or None)."""

    from blockfinder.context import run_without_grad
    from cli.loader import (
        call_build_model,
        call_example_batch,
        call_train_dataset,
        call_val_dataset,
        make_losses_fn,
    )
    from impartial_train.data import seed_all
    from impartial_train.trainer import Trainer, to_device

    seed = int(options["seed"])
    seed_all(seed)
    model = call_build_model(mf)
    train_ds = call_train_dataset(mf)
    val_ds = call_val_dataset(mf)
    # finiteness on the first call only: the Trainer watches the epoch means, and a check per
    # step would synchronise with the device every step
    losses_fn = make_losses_fn(mf, check_finite="first")
    if probe or regularizers is None:
        # one forward on the example batch: loss names (regularizers) and early one-line errors;
        # the model's state (e.g. BatchNorm statistics) is put back afterwards
        batch = to_device(call_example_batch(mf, train_ds), device)
        model.to(device)
        model.train()
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        names = list(run_without_grad(losses_fn, model, batch))
        model.load_state_dict(saved)
        regularizers = _regularizers(regularizers, mf, names)
    method_args = _accepted_args(method, parse_method_args(options["method_arg"]))
    trainer = Trainer(
        model,
        losses_fn,
        method=method,
        regularizers=regularizers,
        optimizer=options["optimizer"],
        lr=options["lr"],
        weight_decay=options["weight_decay"],
        method_args=method_args,
        rescale=options["rescale"],
        verify=options["verify"],
        device=device,
        seed=seed,
        batch_size=_batch_size(mf, options),
        progress=True,
        summary=not (options.get("compare") or options.get("seeds")),
        console=out_console(),
        model_file=mf.path,
        config=config,
    )
    return trainer, train_ds, val_ds, _wrap_evaluate(mf)


def _run_config(
    options: Mapping[str, Any], method: str, out: Path, argv: Sequence[str], mf, top: bool = False
):
    """config.json's command and options; ``top``: the directory above the runs of --compare or
    --seeds (a run's own config names its seed, not the list)."""
    opts = {k: options.get(k) for k in RESUMED}
    opts["method"] = None if method == "compare" else method
    if method != "compare":
        opts["compare"] = None
    if not top:
        opts["seeds"] = None
    opts["method_arg"] = parse_method_args(options["method_arg"])
    return {
        "command": [PROG, *argv],
        "options": {**opts, "out": str(out), "model": str(mf.path)},
    }


def _fit(trainer, train_ds, val_ds, evaluate, options, out: Path, resume: bool, lock=True):
    return trainer.fit(
        train_ds,
        epochs=int(options["epochs"]),
        val=val_ds,
        evaluate=evaluate,
        val_every=int(options["val_every"]),
        out=out,
        resume=resume,
        lock=lock,
    )


def ddp_worker(rank: int, world: int, payload: dict[str, Any]) -> Any:
    """One process of ``--devices N`` (spawned by :func:`impartial_train.distributed.launch`)."""
    import torch

    from cli.loader import load_model_file

    mf = load_model_file(payload["model"], payload["options"]["model_arg"])
    device = payload["device"]
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    trainer, train_ds, val_ds, evaluate = build_run(
        mf,
        payload["options"],
        payload["method"],
        device,
        payload["regularizers"],
        payload["config"],
        probe=False,
    )
    history = _fit(
        trainer,
        train_ds,
        val_ds,
        evaluate,
        payload["options"],
        Path(payload["out"]),
        payload["resume"],
        lock=False,  # the parent process holds the run directory's lock
    )
    return history if rank == 0 else None


def _resolve_device(options: Mapping[str, Any]):
    import torch

    from impartial_train.trainer import TrainingError, resolve_device

    devices = int(options["devices"])
    requested = options["device"]
    if devices > 1:
        if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
            return "cpu"
        if requested == "auto" and torch.cuda.device_count() < devices:
            return "cpu"
        resolve_device("cuda")
        if torch.cuda.device_count() < devices:
            raise TrainingError(
                f"--devices {devices} on CUDA needs {devices} GPUs, found "
                f"{torch.cuda.device_count()}: use fewer --devices or --device cpu"
            )
        return "cuda"
    return resolve_device(requested)


def _epochs_for(steps: int, train_ds: Any, trainer: Any) -> int:
    """Whole epochs that hold at least ``steps`` optimizer steps."""
    try:
        n = len(train_ds)
    except TypeError:
        n = 0
    if not n:
        raise UsageError(
            "--steps needs a training dataset with a length (len(train_dataset())): use --epochs"
        )
    return math.ceil(steps / math.ceil(n / trainer.batch_size))


def train_one(
    mf: Any,
    options: Mapping[str, Any],
    method: str,
    out: Path,
    resume: bool,
    argv: Sequence[str],
) -> list[dict[str, Any]]:
    """Train one method into ``out`` (on ``--devices`` processes), holding its run lock."""
    from impartial_train.distributed import rank
    from impartial_train.runlock import run_lock

    with run_lock(out, enabled=rank() == 0):
        return _train_one(mf, options, method, out, resume, argv)


def _train_one(mf, options, method, out: Path, resume: bool, argv) -> list[dict[str, Any]]:
    from impartial_train.trainer import CHECKPOINT

    if not resume and (out / CHECKPOINT).exists():
        raise UsageError(
            f"{out} already holds a run (checkpoint.pt): pass --resume to continue it, or choose "
            "another --out"
        )
    config = _run_config(options, method, out, argv, mf)
    device = _resolve_device(options)
    requested = _split_list(options.get("regularizer"))
    # the parent builds and probes everything once, so that every user error is reported here
    devices = int(options["devices"])
    trainer, train_ds, val_ds, evaluate = build_run(
        mf, options, method, device if devices == 1 else "cpu", requested or None, config, True
    )
    if options.get("steps"):
        options = {**options, "epochs": _epochs_for(int(options["steps"]), train_ds, trainer)}
    if devices == 1:
        return _fit(trainer, train_ds, val_ds, evaluate, options, out, resume)
    from impartial_train.distributed import launch

    payload = {
        "model": str(mf.path),
        "options": dict(options),
        "method": method,
        "device": str(device),
        "regularizers": list(trainer.regularizers),
        "config": config,
        "out": str(out.resolve()),
        "resume": resume,
    }
    del trainer
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    results = launch(ddp_worker, devices, args=(payload,), backend=backend)
    return results[0] or []


# --------------------------------------------------------------------------------------------
# --compare


def _final_row(history: Sequence[Mapping[str, Any]], split: str) -> dict[str, Any]:
    rows = [r for r in history if r.get("split") == split]
    return dict(rows[-1]) if rows else {}


def _run_dirs(out: Path, methods: Sequence[str], seeds: Sequence[int] | None, single: bool):
    """``{(method, seed): directory}``: ``out/<method>/`` for --compare, with --seeds one
    ``seed-<s>/`` below it (a single method with --seeds: ``out/seed-<s>/``)."""
    dirs = {}
    for method in methods:
        base = out if single else out / _safe(method)
        for seed in seeds or [None]:
            dirs[(method, seed)] = base if seed is None else base / f"seed-{seed}"
    return dirs


def compare(
    mf: Any, options: Mapping[str, Any], out: Path, resume: bool, argv: Sequence[str]
) -> int:
    """``--compare`` and/or ``--seeds``: one run per (method, seed), then the scored table,
    compare.json and compare.png (schema: docs/architecture.md, "compare.json")."""
    from blockfinder.atomic import atomic_write
    from impartial_train.plots import metric_columns, order_columns, plot_compare
    from impartial_train.scoring import best_methods, directions, paired_counts, seed_stats

    single = options.get("compare") is None
    methods = [options["method"]] if single else _split_list([options["compare"]])
    if len(methods) < 1:
        raise UsageError("--compare needs a comma-separated list of methods, e.g. sum,pcgrad")
    duplicates = sorted({m for m in methods if methods.count(m) > 1})
    if duplicates:
        raise UsageError(f"--compare lists {', '.join(duplicates)} more than once")
    method_args = parse_method_args(options["method_arg"])
    for method in methods:
        check_method(method, _accepted_args(method, method_args))
    unused = [
        k for k in method_args if not any(k in _accepted_args(m, method_args) for m in methods)
    ]
    if unused:
        raise UsageError(
            f"bad --method-arg: no compared method takes {', '.join(map(repr, unused))}"
        )
    seeds = options.get("seeds")
    dirs = _run_dirs(out, methods, seeds, single)
    if resume and not any((d / "checkpoint.pt").is_file() for d in dirs.values()):
        raise UsageError(
            f"cannot resume: no checkpoint.pt in the runs of {out} (train without --resume "
            "first, or point --out at an earlier --compare/--seeds run)"
        )
    out.mkdir(parents=True, exist_ok=True)
    config = _run_config(options, methods[0] if single else "compare", out, argv, mf, top=True)
    config["methods"], config["seeds"] = methods, seeds
    atomic_write(out / "config.json", json.dumps(config, indent=2, default=str) + "\n")
    histories: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
    console = out_console()
    for seed in seeds or [None]:  # seeds outermost: an interrupted run has whole seeds
        for method in methods:
            sub = dirs[(method, seed)]
            console.rule(f"[bold]{method}[/bold]{'' if seed is None else f' seed {seed}'} -> {sub}")
            sub_resume = resume and (sub / "checkpoint.pt").is_file()
            run_options = dict(options) if seed is None else {**options, "seed": seed}
            histories[method].append(train_one(mf, run_options, method, sub, sub_resume, argv))
    runs = [h for hs in histories.values() for h in hs]
    split = "val" if all(_final_row(h, "val") for h in runs) else "train"
    finals = {m: [_final_row(h, split) for h in hs] for m, hs in histories.items()}
    losses = {k for h in runs for r in h if r.get("split") == "train" for k in r}
    columns: list[str] = []
    for h in runs:
        for c in metric_columns([r for r in h if r.get("split") == split]):
            if c not in columns:
                columns.append(c)
    columns = order_columns(columns, losses)
    way = directions(columns, losses, mf.metrics)
    stats = seed_stats(finals, columns)
    best = best_methods(stats, way)
    reference = methods[0]
    summary = {
        "schema": 2,
        "split": split,
        "epochs": max((int(r["epoch"]) for h in runs for r in h), default=0),
        "steps": options.get("steps"),
        "seed": (seeds or [int(options["seed"])])[0],
        "seeds": seeds or [int(options["seed"])],
        "reference": reference,
        "columns": columns,
        "direction": way,
        "higher_is_better": {c: None if d is None else d == "max" for c, d in way.items()},
        "best": best,
        "methods": {
            m: {
                "out": str(out if single else out / _safe(m)),
                "runs": {str(seed): str(dirs[(m, seed)]) for seed in seeds or [None]},
                "final": {c: stats[m][c].mean for c in columns},
                "std": {c: stats[m][c].std for c in columns},
                "n": {c: stats[m][c].n for c in columns},
                "per_seed": {c: stats[m][c].values for c in columns},
                **(
                    {}
                    if m == reference
                    else {
                        "vs_reference": {
                            c: paired_counts(stats[m][c], stats[reference][c], way[c])
                            for c in columns
                        }
                    }
                ),
            }
            for m in methods
        },
    }
    atomic_write(out / "compare.json", json.dumps(summary, indent=2) + "\n")
    try:
        pictures = plot_compare(histories, columns, split, out / "compare.png")
    except ImportError:
        pictures = []
        err_console().print("matplotlib is not installed: compare.png not written")
    _print_compare(summary, out, pictures)
    return 0


def _cell(summary: Mapping[str, Any], method: str, column: str) -> str:
    from impartial_train.plots import _fmt

    entry = summary["methods"][method]
    mean, std = entry["final"][column], entry["std"][column]
    text = _fmt(mean)
    if len(summary["seeds"]) > 1 and mean is not None:
        text += f" ± {_fmt(std)}"
        if entry["n"][column] < len(summary["seeds"]):
            text += f" (n={entry['n'][column]})"
    paired = entry.get("vs_reference", {}).get(column)
    if paired and paired["wins"] is not None and len(summary["seeds"]) > 1:
        text += f" [{paired['wins']}/{paired['n']}]"
    if summary["best"].get(column) == method:
        return f"[bold green]{text} *[/]"
    return text


def _print_compare(summary: Mapping[str, Any], out: Path, pictures: Sequence[Path]) -> None:
    from rich.markup import escape
    from rich.table import Table

    seeds = summary["seeds"]
    several = len(seeds) > 1
    title = f"final {summary['split']} values" + (
        f", mean ± std over seeds {','.join(map(str, seeds))}" if several else ""
    )
    caption = (
        "↓ lower is better, ↑ higher is better, unmarked: no declared direction (METRICS in "
        "the model file); * beats every other method in every seed"
    )
    if several and len(summary["methods"]) > 1:
        caption += f"; [w/n]: seeds where it beats {summary['reference']}"
    table = Table(caption=escape(caption))
    table.add_column("loss / metric")
    for m in summary["methods"]:
        table.add_column(escape(m), justify="right")
    for c in summary["columns"]:
        mark = {"min": " ↓", "max": " ↑"}.get(summary["direction"][c] or "", "")
        table.add_row(escape(c) + mark, *(_cell(summary, m, c) for m in summary["methods"]))
    console = out_console()
    console.print(title, style="bold", highlight=False, markup=False)
    console.print(table)
    shown = ", ".join(p.name for p in pictures) or "no picture"
    console.print(f"compare.json and {shown} in {out}", highlight=False, markup=False)


# --------------------------------------------------------------------------------------------
# entry point


def _resume_command(model_arg: str, out: Path) -> str:
    return shlex.join([PROG, model_arg, "--out", str(out), "--resume"])


def _main(argv: list[str]) -> int:
    from cli.loader import load_model_file
    from impartial_train.checkpoint import TrainingInterrupted
    from impartial_train.distributed import rank
    from impartial_train.runlock import run_lock
    from impartial_train.signals import TrainingAborted

    args = build_parser().parse_args(argv)
    model_path = Path(args.model)
    options, out = resolve_options(args, model_path)
    if options.get("compare") is None:
        method_args = parse_method_args(options["method_arg"])
        check_method(options["method"], method_args)
    mf = load_model_file(args.model, options["model_arg"])
    _check_train_dataset(mf)
    several = options.get("compare") is not None or options.get("seeds")
    if args.resume and not several and not (out / "checkpoint.pt").is_file():
        raise UsageError(
            f"cannot resume: there is no checkpoint.pt in {out} (train without --resume first, "
            "or point --out at an earlier run)"
        )
    try:
        if options.get("compare") is not None or options.get("seeds"):
            with run_lock(out, enabled=rank() == 0):
                return compare(mf, options, out, args.resume, argv)
        train_one(mf, options, options["method"], out, args.resume, argv)
    except TrainingInterrupted as exc:
        from rich.text import Text

        err_console().print(
            Text(f"{exc.describe()}; resume with: {_resume_command(args.model, out)}", "yellow"),
            soft_wrap=True,
        )
        return 128 + exc.signal
    except TrainingAborted as exc:
        from rich.text import Text

        if exc.checkpoint is None:  # aborted in the parent of --devices ranks
            saved = sorted(out.rglob("checkpoint.pt"), key=lambda p: p.stat().st_mtime)
            if saved:  # the newest (a comparison has one per method and seed)
                exc = TrainingAborted(exc.signal, str(saved[-1]))
        tail = f": {_resume_command(args.model, out)}" if exc.checkpoint is not None else ""
        err_console().print(Text(f"{exc.describe()}{tail}", "yellow"), soft_wrap=True)
        return 128 + exc.signal
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``impartial-train`` console script."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
