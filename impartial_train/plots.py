"""Pictures and tables of training runs: ``curves.png``, ``compare.png``, summary tables.

matplotlib (Agg backend) is imported only when a picture is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "metric_columns",
    "order_columns",
    "plot_compare",
    "plot_curves",
    "summary_tables",
]

SKIP = ("epoch", "split", "examples", "branch_points")
PANELS_PER_PAGE = 16


def metric_columns(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric columns of the history rows, in order of first appearance."""
    cols: dict[str, None] = {}
    for row in history:
        for key, value in row.items():
            if key in SKIP or isinstance(value, bool):
                continue
            if isinstance(value, int | float) or value is None:
                cols.setdefault(key, None)
    return list(cols)


def _series(history, split: str, column: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in history:
        if row.get("split") != split:
            continue
        value = row.get(column)
        if isinstance(value, int | float) and math.isfinite(value):
            xs.append(row["epoch"])
            ys.append(float(value))
    return xs, ys


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cols = min(4, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 2.9 * rows), squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.set_visible(False)
    return plt, fig, flat[:n]


def _style(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _save(plt, fig, path: Path) -> None:
    from blockfinder.atomic import atomic_write

    # fixed margins: tight_layout would cost more than the drawing itself
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.1, top=0.92, wspace=0.3, hspace=0.55)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)


def _losses_first(columns: list[str], history) -> list[str]:
    """Columns present on train rows (losses, total) first, then the evaluate() metrics."""
    train = {k for r in history if r.get("split") == "train" for k in r}
    val = {k for r in history if r.get("split") == "val" for k in r}
    losses = [c for c in columns if c in train and (c in val or not val)]
    return losses + [c for c in columns if c not in losses]


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """One panel per loss (and ``total``, and each evaluate() metric): train and val vs epoch."""
    columns = _losses_first(metric_columns(history), history)
    if not columns:
        return
    plt, fig, axes = _figure(len(columns))
    for ax, column in zip(axes, columns):
        for split, style, color in (("train", "-", "C0"), ("val", "--", "C1")):
            xs, ys = _series(history, split, column)
            if xs:
                ax.plot(xs, ys, style, color=color, marker="o", markersize=2.5, label=split)
        _style(ax, column)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    _save(plt, fig, Path(path))


def order_columns(columns: Sequence[str], losses: Iterable[str]) -> list[str]:
    """Summary first: ``total``, the ``evaluate()`` metrics without a ``/``, the losses, then the
    per-item metrics (``impute_error/<attr>``, ...), each group in the given order."""
    losses = set(losses)
    groups: list[list[str]] = [[], [], [], []]
    for c in columns:
        rank = 0 if c == "total" else 2 if c in losses else 3 if "/" in c else 1
        groups[rank].append(c)
    return [c for group in groups for c in group]


def _page_paths(path: Path, pages: int) -> list[Path]:
    """``compare.png``, ``compare-2.png``, ... (one per page)."""
    return [path] + [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(2, pages + 1)]


def plot_compare(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    columns: Sequence[str],
    split: str,
    path: str | Path,
    per_page: int = PANELS_PER_PAGE,
) -> list[Path]:
    """One panel per column, every column, ``per_page`` panels per picture (``compare.png``,
    then ``compare-2.png``, ...): one curve per method on ``split`` (the mean over its runs,
    one per seed, with their range shaded). Returns the pictures written; stale pages of an
    earlier, longer comparison are removed."""
    path = Path(path)
    columns = list(columns)
    pages = [columns[i : i + per_page] for i in range(0, len(columns), per_page)]
    paths = _page_paths(path, len(pages))
    for k in range(len(pages) + 1, 10_000):  # pages left over from an earlier comparison
        stale = path.with_name(f"{path.stem}-{k}{path.suffix}")
        if not stale.exists():
            break
        stale.unlink()
    for page, (chunk, target) in enumerate(zip(pages, paths), start=1):
        plt, fig, axes = _figure(len(chunk))
        for ax, column in zip(axes, chunk):
            for index, (method, runs) in enumerate(histories.items()):
                series = [_series(h, split, column) for h in runs]
                if not any(xs for xs, _ in series):
                    series = [_series(h, "train", column) for h in runs]
                by_epoch: dict[int, list[float]] = {}
                for xs, ys in series:
                    for x, y in zip(xs, ys):
                        by_epoch.setdefault(x, []).append(y)
                if not by_epoch:
                    continue
                epochs = sorted(by_epoch)
                mean = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
                color = f"C{index % 10}"
                ax.plot(epochs, mean, marker="o", markersize=2.5, label=method, color=color)
                if len(runs) > 1:
                    low = [min(by_epoch[e]) for e in epochs]
                    high = [max(by_epoch[e]) for e in epochs]
                    ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)
            _style(ax, f"{column} ({split})")
            ax.legend(fontsize=7)
        if len(pages) > 1:
            fig.suptitle(f"page {page} of {len(pages)}", fontsize=9)
        _save(plt, fig, target)
    return paths[: len(pages)]


def _fmt(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-" if value is None else str(value)
    if not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _last(history, split: str) -> Mapping[str, Any] | None:
    rows = [r for r in history if r.get("split") == split]
    return rows[-1] if rows else None


def _first(history, split: str) -> Mapping[str, Any] | None:
    rows = [r for r in history if r.get("split") == split]
    return rows[0] if rows else None


def summary_tables(history: Sequence[Mapping[str, Any]], seconds: float, out: Path | None):
    """Rich tables: per loss/metric the first and final train values and the final val value;
    per branch point the final epoch's mean weights and stream cosine."""
    from rich.table import Table

    first, last, val = _first(history, "train"), _last(history, "train"), _last(history, "val")
    epochs = last["epoch"] if last else 0
    where = f" — outputs in {out}" if out is not None else ""
    table = Table(title=f"training summary: {epochs} epoch(s), {seconds:.1f} s{where}")
    both = first is not None and last is not None and first["epoch"] != last["epoch"]
    table.add_column("loss / metric")
    if both:
        table.add_column(f"train, epoch {first['epoch']}", justify="right")
    table.add_column(f"train, epoch {epochs}", justify="right")
    if val is not None:
        table.add_column(f"val, epoch {val['epoch']}", justify="right")
    for column in _losses_first(metric_columns(history), history):
        cells = [_fmt(last.get(column)) if last else "-"]
        if both:
            cells.insert(0, _fmt(first.get(column)))
        if val is not None:
            cells.append(_fmt(val.get(column)))
        style = "bold" if column == "total" else None
        table.add_row(column, *cells, style=style)
    tables = [table]
    points = (last or {}).get("branch_points") or {}
    if points:
        bp = Table(title=f"branch points (means over epoch {epochs})")
        bp.add_column("branch point")
        bp.add_column("streams")
        bp.add_column("weights", justify="right")
        bp.add_column("mean cos", justify="right")
        bp.add_column("min cos", justify="right")
        for name, point in points.items():
            weights = point.get("weights") or []
            cosine = point.get("cosine") or []
            off = [c for i, line in enumerate(cosine) for j, c in enumerate(line) if i < j]
            bp.add_row(
                name,
                " | ".join(point.get("streams", [])),
                " ".join(f"{w:.3g}" for w in weights),
                _fmt(sum(off) / len(off)) if off else "-",
                _fmt(min(off)) if off else "-",
            )
        tables.append(bp)
    return tables
