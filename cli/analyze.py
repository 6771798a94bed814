"""``blockfinder``: find the impartiality blocks of the model in a model file.

blockfinder analyze MODEL.py [-o blocks.svg] [--json blocks.json] [--depth N | --ops]
                             [--regularizer NAME ...] [--measure N] [--model-arg KEY=VALUE ...]
                             [--no-render] [--debug]
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blockfinder.atomic import atomic_write
from blockfinder.errors import BlockfinderError, RegularizerError
from blockfinder.render import FORMATS
from cli._console import (
    ArgumentParser,
    UsageError,
    err_console,
    info,
    out_console,
    run_cli,
    seed_number,
    warn,
)

DEFAULT_PICTURE = "blocks.svg"


# --------------------------------------------------------------------------------------------
# arguments


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> ArgumentParser:
    from blockfinder import __version__

    parser = ArgumentParser(
        prog="blockfinder",
        description="Find where the gradients of a model's losses meet (impartiality blocks and "
        "branch points) from a model file.",
        epilog="Model file protocol: build_model() and example_batch() (or train_dataset()), "
        "optionally compute_losses(model, batch) and REGULARIZERS = ['kl', ...].",
    )
    parser.add_argument("--version", action="version", version=f"blockfinder {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    p = sub.add_parser(
        "analyze",
        help="analyse a model file: blocks, branch points, picture, JSON",
        description="Analyse the model of a model file: print its impartiality blocks and branch "
        "points, draw them, and optionally write JSON and measure gradient conflicts.",
    )
    p.add_argument("model", metavar="MODEL.py", help="the model file")
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help=f"picture to write: .svg, .png, .pdf or .dot (default: {DEFAULT_PICTURE})",
    )
    p.add_argument("--json", metavar="OUT.json", help="write the report as JSON (schema 1)")
    p.add_argument("--no-render", action="store_true", help="do not draw a picture")
    level = p.add_mutually_exclusive_group()
    level.add_argument(
        "--depth",
        type=_positive_int,
        default=None,  # not 2: argparse's exclusivity check compares with the default by identity
        metavar="N",
        help="draw modules collapsed to N levels of their dotted path (default: 2)",
    )
    level.add_argument("--ops", action="store_true", help="draw every operation (small graphs)")
    p.add_argument(
        "--regularizer",
        action="append",
        default=None,
        metavar="NAME",
        help="a loss excluded from surgery (repeat or separate with commas); default: the file's "
        "REGULARIZERS, else 'kl' if there is such a loss",
    )
    p.add_argument(
        "--measure",
        type=_positive_int,
        default=None,
        metavar="N",
        help="measure stream gradient conflicts at each branch point over N batches",
    )
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the model file (repeatable; its OPTIONS lists them), e.g. "
        "--model-arg table=data.csv",
    )
    p.add_argument("--seed", type=seed_number, default=0, help="random seed (default: 0)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def _picture_path(args: Any) -> Path | None:
    if args.no_render:
        return None
    out = Path(args.output) if args.output else Path(DEFAULT_PICTURE)
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        shown = f"'{out.suffix}'" if out.suffix else "no extension"
        raise UsageError(
            f"cannot write a picture with {shown} ({out}): name the output .svg, .png, .pdf or "
            ".dot (or pass --no-render)"
        )
    return out


# --------------------------------------------------------------------------------------------
# the analysis


def _requested_regularizers(args: Any, mf: Any) -> tuple[tuple[str, ...] | None, str]:
    """The regularizers asked for and where (None: the default, ``kl`` when there is one)."""
    if args.regularizer:
        requested = [r.strip() for item in args.regularizer for r in item.split(",") if r.strip()]
        return tuple(dict.fromkeys(requested)), "--regularizer"
    if mf.regularizers is not None:
        return tuple(dict.fromkeys(mf.regularizers)), f"REGULARIZERS in {mf.name}"
    return None, ""


def _measure(mf: Any, model: Any, batch: Any, losses_fn: Any, report: Any, n: int, seed: int):
    from blockfinder.diagnostics import measure
    from cli.loader import batch_size_of, make_batches

    batches = make_batches(mf, n, batch_size=batch_size_of(batch), seed=seed)
    return measure(model, batches, losses_fn, report)


def cmd_analyze(args: Any) -> int:
    import torch

    from cli.loader import call_build_model, call_example_batch, load_model_file, make_losses_fn

    picture = _picture_path(args)  # fail on a bad -o before any work
    json_path = Path(args.json) if args.json else None

    mf = load_model_file(args.model, args.model_arg)
    torch.manual_seed(args.seed)
    model = call_build_model(mf)
    batch = call_example_batch(mf)
    losses_fn = make_losses_fn(mf)
    requested, source = _requested_regularizers(args, mf)

    from blockfinder import analyze

    try:
        with err_console().status(f"analysing {mf.name}…"):
            report = analyze(
                model,
                batch,
                losses=losses_fn,
                regularizers=("kl",) if requested is None else requested,
                strict_regularizers=requested is not None,
            )
    except RegularizerError as exc:
        names = ", ".join(repr(r) for r in exc.unknown)
        plural = "s" if len(exc.unknown) > 1 else ""
        raise BlockfinderError(
            f"unknown regularizer{plural} {names} (from {source}): the losses are "
            f"{', '.join(exc.losses)}"
        ) from exc

    if args.measure:
        with err_console().status(f"measuring gradient conflicts over {args.measure} batches…"):
            report.diagnostics = _measure(
                mf, model, batch, losses_fn, report, args.measure, args.seed
            )

    print_report(report, model, mf.name)

    written: list[str] = []
    if json_path is not None:
        atomic_write(json_path, report.dumps() + "\n")
        written.append(f"report: {json_path}")
    if picture is not None:
        if report.graph is None:
            warn("the analysis returned no dependency graph: no picture drawn")
        else:
            from blockfinder.render import render

            result = render(report, picture, depth=args.depth or 2, ops=args.ops)
            if result.rendered:
                written.append(f"picture: {result.path_written}")
            else:
                warn(result.message)
                written.append(f"graph (dot source): {result.path_written}")
    for line in written:
        info(f"wrote {line}", style="green")
    return 0


# --------------------------------------------------------------------------------------------
# the terminal report


def _fmt_value(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.4g}"


def _ordered(names: Sequence[str] | frozenset[str], order: Sequence[str]) -> list[str]:
    pos = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: (pos.get(n, len(pos)), n))


def _stream_text(stream: frozenset[str], order: Sequence[str]) -> str:
    return "+".join(_ordered(stream, order)) or "-"


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]" if shape is not None else "-"


def _param_sizes(model: Any) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters(remove_duplicate=False)}


def print_report(report: Any, model: Any, name: str) -> None:
    from rich.table import Table
    from rich.text import Text

    con = out_console()
    order = list(report.losses)
    regs = set(report.regularizers)
    sizes = _param_sizes(model)

    con.print(Text(f"blockfinder: {name}", style="bold"), soft_wrap=True)
    losses = Table(title="losses", title_justify="left", show_edge=False, pad_edge=False)
    losses.add_column("loss")
    losses.add_column("value", justify="right")
    losses.add_column("role")
    for n in order:
        losses.add_row(
            n,
            _fmt_value(report.loss_values.get(n)),
            Text("regularizer", style="dim") if n in regs else "task",
        )
    con.print(losses)

    cap = Text("capture: ", style="bold")
    cap.append(str(report.capture), style="")
    timing = sum(v for v in report.timings.values() if isinstance(v, int | float))
    if timing:
        cap.append(f"  ({timing * 1000:.0f} ms)", style="dim")
    con.print(cap, soft_wrap=True)
    for s in report.specializations:
        con.print(Text(f"  • specialised: {s}", style="yellow"), soft_wrap=True)
    for note in report.notes:
        con.print(Text(f"  • {note}", style="dim"), soft_wrap=True)
    for d in report.differences:
        con.print(
            Text(f"  • difference from the autograd graph: {d}", style="yellow"), soft_wrap=True
        )
    for canon, alias in (report.aliases or {}).items():
        con.print(
            Text(f"  tied: {canon} = {', '.join(alias)}", style="dim"),
            soft_wrap=True,
        )

    if not report.blocks:
        tasks = report.tasks
        if len(tasks) < 2:
            what = "single loss" if len(tasks) == 1 else "no task losses"
            con.print(Text(f"{what}: no impartiality blocks", style="bold"), soft_wrap=True)
        else:
            con.print(
                Text("the losses share no trainable parameters: no impartiality blocks"),
                style="bold",
                soft_wrap=True,
            )
    else:
        blocks = Table(title="impartiality blocks", title_justify="left")
        blocks.add_column("block", justify="right")
        blocks.add_column("losses met")
        blocks.add_column("nodes", justify="right")
        blocks.add_column("parameters", justify="right")
        blocks.add_column("elements", justify="right")
        for b in report.blocks:
            elements = sum(sizes.get(p, 0) for p in b.parameters)
            blocks.add_row(
                str(b.id),
                ", ".join(_ordered(b.losses, order)),
                str(len(b.nodes)),
                str(len(b.parameters)),
                f"{elements:,}",
            )
        con.print(blocks)

        bps = Table(title="branch points", title_justify="left")
        for col, just in (
            ("BP", "right"),
            ("block", "right"),
            ("kind", "left"),
            ("where", "left"),
            ("shape", "left"),
            ("streams", "left"),
        ):
            bps.add_column(col, justify=just)  # type: ignore[arg-type]
        for bp in report.branch_points:
            bps.add_row(
                str(bp.id),
                str(bp.block),
                bp.kind,
                bp.where,
                _shape(bp.shape),
                " | ".join(_stream_text(s, order) for s in bp.streams),
            )
        if report.branch_points:
            con.print(bps)
        else:
            con.print(Text("no branch points", style="bold"))

    shared = report.shared_parameters()
    if shared:
        groups: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
        for pname, reach in shared.items():
            module = pname.rpartition(".")[0] or "(top level)"
            groups[(module, tuple(_ordered(reach, order)))].append(pname)
        table = Table(title="parameters shared by two or more losses", title_justify="left")
        table.add_column("module")
        table.add_column("params", justify="right")
        table.add_column("elements", justify="right")
        table.add_column("losses")
        for (module, reach), names in groups.items():
            table.add_row(
                module,
                str(len(names)),
                f"{sum(sizes.get(p, 0) for p in names):,}",
                ", ".join(f"{r} (reg)" if r in regs else r for r in reach),
            )
        con.print(table)

    if report.diagnostics:
        print_diagnostics(report, con)


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return fmt.format(f) if math.isfinite(f) else str(f)


def print_diagnostics(report: Any, con: Any = None) -> None:
    from rich.table import Table
    from rich.text import Text

    con = con or out_console()
    diag = report.diagnostics or {}
    where = {bp.id: bp.where for bp in report.branch_points}
    table = Table(
        title=f"gradient conflicts at the branch points over {diag.get('batches', '?')} batches",
        title_justify="left",
    )
    table.add_column("BP", justify="right")
    table.add_column("where")
    table.add_column("mean cosine", justify="right")
    table.add_column("min cosine", justify="right")
    table.add_column("norm ratio", justify="right")
    table.add_column("conflict share", justify="right")
    rows = diag.get("branch_points") or []
    for row in rows:
        mean, low = row.get("mean_cosine"), row.get("min_cosine")
        low_text = Text(_num(low)) if low is not None else Text("-")
        if low is not None and low < 0:
            low_text.stylize("red")
        bp_id = row.get("id")
        table.add_row(
            "-" if bp_id is None else str(bp_id),
            str(where.get(bp_id, row.get("where", "?"))),
            _num(mean) if mean is not None else "-",
            low_text,
            _num(row.get("norm_ratio"), "{:.3g}"),
            _num(row.get("conflict_share"), "{:.0%}"),
        )
    if rows:
        con.print(table)
    else:
        con.print(Text("no branch points to measure", style="bold"))


# --------------------------------------------------------------------------------------------
# entry point


def _main(argv: list[str]) -> int:
    parser = build_parser()
    # `blockfinder model.py ...` is short for `blockfinder analyze model.py ...`
    if argv and argv[0].endswith(".py") and not argv[0].startswith("-"):
        argv = ["analyze", *argv]
    args = parser.parse_args(argv)
    if args.command is None:
        raise UsageError("choose a command: 'blockfinder analyze MODEL.py'")
    if args.command == "analyze":
        return cmd_analyze(args)
    raise UsageError(f"unknown command {args.command!r}")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    """The ``blockfinder`` console script."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
