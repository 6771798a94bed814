"""Comparison scoring (impartial_train.scoring) and the CLI's --seeds/--steps on a user's CSV."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from impartial_train.plots import order_columns
from impartial_train.scoring import SeedStats, best_methods, directions, paired_counts, seed_stats

ROOT = Path(__file__).resolve().parents[1]


def test_losses_are_lower_is_better_and_metrics_only_when_declared():
    columns = ["neg_elbo", "elbo_loss", "negative_loglik", "total", "acc", "err/a", "err_b", "x"]
    losses = ["neg_elbo", "elbo_loss", "negative_loglik", "total"]
    got = directions(columns, losses, {"acc": "max", "err*": "min", "x*": "max", "x": "min"})
    assert got == {
        "neg_elbo": "min",
        "elbo_loss": "min",
        "negative_loglik": "min",
        "total": "min",
        "acc": "max",
        "err/a": "min",
        "err_b": "min",
        "x": "min",  # an exact name wins over a pattern
    }
    assert directions(["accuracy", "test_loglik"], [], None) == {
        "accuracy": None,
        "test_loglik": None,
    }


def test_seed_statistics_skip_missing_and_non_finite_values():
    finals = {"a": [{"m": 1.0}, {"m": float("nan")}, {"m": 3.0}, {}]}
    stats = seed_stats(finals, ["m"])["a"]["m"]
    assert stats.values == [1.0, None, 3.0, None]
    assert stats.n == 2 and stats.mean == 2.0 and stats.std == pytest.approx(2**0.5)
    assert SeedStats([5.0]).std == 0.0 and SeedStats([None]).mean is None


def test_paired_counts_against_the_reference():
    mine, ref = SeedStats([1.0, 2.0, 3.0, None]), SeedStats([2.0, 2.0, 1.0, 0.0])
    assert paired_counts(mine, ref, "min") == {
        "lower": 1,
        "higher": 1,
        "equal": 1,
        "n": 3,
        "wins": 1,
    }
    assert paired_counts(mine, ref, "max")["wins"] == 1
    assert paired_counts(mine, ref, None)["wins"] is None


def _stats(table):
    return {m: {c: SeedStats(v) for c, v in cols.items()} for m, cols in table.items()}


def test_best_only_where_a_method_wins_in_every_seed():
    stats = _stats(
        {
            "sum": {"loss": [1.0, 1.0, 1.0], "acc": [0.5, 0.5, 0.5], "u": [1.0, 2.0, 3.0]},
            "pcgrad": {"loss": [0.9, 0.8, 0.7], "acc": [0.6, 0.4, 0.9], "u": [0.0, 0.0, 0.0]},
            "imtl-g": {"loss": [0.95, 0.9, 0.8], "acc": [0.55, 0.45, 0.4], "u": [9.0, 9.0, 9.0]},
        }
    )
    best = best_methods(stats, {"loss": "min", "acc": "max", "u": None})
    # pcgrad has the best mean accuracy (0.633) but loses seed 2 to sum: no star
    assert best == {"loss": "pcgrad"}


def test_best_needs_every_seed_and_a_strict_win():
    tie = _stats({"a": {"l": [1.0, 1.0]}, "b": {"l": [1.0, 2.0]}})
    assert best_methods(tie, {"l": "min"}) == {}
    missing = _stats({"a": {"l": [0.1, None]}, "b": {"l": [1.0, 2.0]}})
    assert best_methods(missing, {"l": "min"}) == {}
    beaten_missing = _stats({"a": {"l": [0.1, 0.2]}, "b": {"l": [1.0, None]}})
    assert best_methods(beaten_missing, {"l": "min"}) == {"l": "a"}
    assert best_methods(_stats({"a": {"l": [0.1]}}), {"l": "min"}) == {}


def test_summary_columns_come_first():
    columns = ["attr_a", "kl", "total", "err/a", "err_mean", "acc"]
    assert order_columns(columns, ["attr_a", "kl", "total"]) == [
        "total",
        "err_mean",
        "acc",
        "attr_a",
        "kl",
        "err/a",
    ]


@pytest.mark.slow
def test_own_csv_from_another_directory_with_seeds_and_steps(tmp_path):
    rng = np.random.default_rng(0)
    n = 160
    pd.DataFrame(
        {
            "id": np.arange(n),
            "size": rng.lognormal(2, 0.5, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "count": rng.poisson(3, n),
            "flag": rng.choice(["yes", "no"], n),
        }
    ).to_csv(tmp_path / "mine.csv", index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-m",
        "cli.train",
        str(ROOT / "examples" / "tabular_vae.py"),
        "--model-arg",
        f"table={tmp_path / 'mine.csv'}",
        "--model-arg",
        "hidden=16",
        "--compare",
        "sum,imtl-g",
        "--seeds",
        "0,1",
        "--steps",
        "5",
        "--out",
        "cmp",
    ]
    proc = subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mean ± std over seeds 0,1" in proc.stdout and "±" in proc.stdout
    assert "dropped (identifier" in proc.stderr  # the cleaning is reported
    out = elsewhere / "cmp"
    summary = json.loads((out / "compare.json").read_text())
    assert summary["schema"] == 2 and summary["seeds"] == [0, 1] and summary["steps"] == 5
    assert summary["epochs"] == 5  # 128 training rows, batch 128: one step per epoch
    assert summary["reference"] == "sum" and "vs_reference" in summary["methods"]["imtl-g"]
    assert summary["direction"]["impute_error_mean"] == "min"
    assert summary["direction"]["baseline_impute_error_mean"] == "min"
    assert summary["direction"]["test_loglik_mean"] == "max"
    for method in ("sum", "imtl-g"):
        entry = summary["methods"][method]
        assert len(entry["per_seed"]["impute_error_mean"]) == 2
        for seed in (0, 1):
            assert (out / method / f"seed-{seed}" / "checkpoint.pt").is_file()
    pages = {p.name for p in out.glob("compare*.png")}
    n_pages = -(-len(summary["columns"]) // 16)
    assert n_pages > 1 and pages == {"compare.png"} | {
        f"compare-{k}.png" for k in range(2, n_pages + 1)
    }
    config = json.loads((out / "imtl-g" / "seed-1" / "config.json").read_text())
    assert config["options"]["model_arg"][0].startswith("table=")
    assert config["options"]["seed"] == 1 and config["trainer"]["epochs"] == 5


TINY = str(ROOT / "tests" / "models_train" / "tiny.py")


def test_one_method_over_seeds(tmp_path, capsys):
    from cli.train import main

    out = tmp_path / "seeds"
    assert (
        main([TINY, "--method", "sum", "--seeds", "3,4", "--epochs", "1", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "mean ± std over seeds 3,4" in printed
    summary = json.loads((out / "compare.json").read_text())
    assert list(summary["methods"]) == ["sum"] and summary["best"] == {}
    assert set(summary["methods"]["sum"]["runs"]) == {"3", "4"}
    assert (out / "seed-3" / "metrics.jsonl").is_file() and (
        out / "seed-4" / "checkpoint.pt"
    ).is_file()
    top = json.loads((out / "config.json").read_text())
    assert top["options"]["seeds"] == [3, 4] and top["options"]["method"] == "sum"
    run = json.loads((out / "seed-4" / "config.json").read_text())
    assert run["options"]["seeds"] is None and run["options"]["seed"] == 4
    # the same run with --resume continues (nothing left to train) and scores again
    assert main([TINY, "--out", str(out), "--resume"]) == 0
    assert "mean ± std over seeds 3,4" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--seed", "1", "--seeds", "1,2"], "--seed and --seeds exclude each other"),
        (["--epochs", "1", "--steps", "4"], "--epochs and --steps exclude each other"),
        (["--seeds", "1,1"], "a seed is listed twice"),
        (["--seeds", ","], "expected seeds like 0,1,2"),
        (["--steps", "0"], "expected a value >= 1"),
    ],
)
def test_seed_and_budget_errors(tmp_path, capsys, argv, fragment):
    from cli.train import main

    assert main([TINY, *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
