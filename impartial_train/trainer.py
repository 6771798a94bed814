"""``Trainer``: the training loop shared by the library and the ``impartial-train`` CLI.

>>> trainer = Trainer(model, losses=compute_losses, method="imtl-g", lr=1e-3, seed=0)
>>> history = trainer.fit(train_dataset, epochs=10, val=val_dataset, evaluate=evaluate, out="run")

One step: ``losses = imodel(batch)`` (:class:`~impartial_train.wrap.ImpartialModel`), ONE backward
of their sum (the surgery happens inside it), one optimizer step. ``method="sum"`` is vanilla
training through the same loop.

Outputs in ``out`` (when given): ``config.json``, ``metrics.jsonl`` (one row per epoch and split),
``checkpoint.pt`` (written atomically after every epoch and on Ctrl-C), ``curves.png`` and,
when ``torch.utils.tensorboard`` imports, TensorBoard events in ``tensorboard/``.

Metrics rows (``history``): ``epoch`` (1-based), ``split`` (``"train"`` / ``"val"``), the mean of
every loss by its name over the epoch's examples (each batch weighted by its size), ``total``
(their sum), the ``evaluate()`` metrics (on the val row; on the train row when there is no
validation data), ``examples``; and, on train rows of a run with surgery, ``branch_points``:
per branch point the method's weights, the stream gradient norms, the stream cosine matrix and the
rescaling factor, each **averaged over the epoch's steps** (``steps`` says over how many).

Reproducibility: a fresh ``fit`` seeds torch, ``random`` and numpy with ``seed``; the DataLoader
it builds shuffles with its own ``torch.Generator`` seeded with ``seed``; validation runs with
its own seeds and restores every random state afterwards, so it never changes training. A
checkpoint holds the states of every generator, so a run resumed from it (at an epoch boundary or
mid-epoch after Ctrl-C) produces exactly the metrics of an uninterrupted run.

Data parallelism: create the Trainer and call ``fit`` in every process of an initialised
``torch.distributed`` group (``impartial-train --devices N`` does this; see
:mod:`impartial_train.distributed` for how the surgery stays equal to one process's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from blockfinder.atomic import atomic_write
from blockfinder.context import run_without_grad
from impartial_train.checkpoint import (
    FORMAT,
    TrainingInterrupted,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_atomic,
    sha256_file,
)
from impartial_train.data import (
    batch_size_of,
    dataset_len,
    loader_generators,
    make_loader,
    resolve_device,
    seed_all,
    to_device,
)
from impartial_train.epoch import RESERVED_COLUMNS, EpochState
from impartial_train.errors import ResumeError, TrainingError
from impartial_train.runlock import RunDirectoryBusy, RunLock
from impartial_train.signals import StopRequest, TrainingAborted
from impartial_train.wrap import ImpartialModel

__all__ = [
    "OPTIMIZERS",
    "RESERVED_COLUMNS",
    "ResumeError",
    "RunDirectoryBusy",
    "Trainer",
    "TrainingAborted",
    "TrainingError",
    "TrainingInterrupted",
    "batch_size_of",
    "make_loader",
    "resolve_device",
    "to_device",
]

OPTIMIZERS = ("adam", "adamw", "sgd")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
CURVES = "curves.png"


def _plain(value: Any) -> Any:
    """A JSON-safe float for a number or a 0-d tensor (non-finite -> None)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu().item() if value.numel() == 1 else value.tolist()
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return value


def model_signature(model: nn.Module) -> str:
    """A hash of the model's class and its parameter/buffer names and shapes."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else ()
        digest.update(f"{name}:{shape};".encode())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of python, torch, numpy and this package."""
    from blockfinder import __version__

    out = {
        "impartial": __version__,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "platform": platform.platform(),
    }
    with contextlib.suppress(ImportError):
        import numpy as np

        out["numpy"] = str(np.__version__)
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    return out


def _batches(iterator: Iterator[Any], split: str) -> Iterator[Any]:
    """The loader's batches; an error while loading one is the data's, said in one line.

    Takes the loader's iterator, not the loader, so that the iterator is created (and the
    loader's generator drawn from) exactly where the caller creates it.
    """
    index = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise TrainingError(
                f"loading batch {index + 1} of the {split} data raised {type(exc).__name__}: {exc}"
            ) from exc
        index += 1
        yield batch


def _lower(name: Any) -> Any:
    return name.lower() if isinstance(name, str) else name


def _describe_method(method: Any) -> str:
    return method if isinstance(method, str) else type(method).__name__


# --------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Train a multi-loss model impartially (or plainly with ``method="sum"``).

    Args:
        model: the ``torch.nn.Module``.
        losses: ``losses(model, batch) -> {name: scalar tensor}``; default ``model(batch)``.
        method: an aggregation method name (``"pcgrad"``, ``"imtl-g"``, ``"gradnorm+pcgrad"``,
            see ``impartial_train.methods.available()``), an Aggregator, or ``"sum"`` (vanilla).
        regularizers: loss names excluded from surgery (their gradients pass unchanged).
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or a ``torch.optim.Optimizer`` class.
        lr, weight_decay: of the model's parameters. Learnable method parameters (GradNorm's
            weights) get their own parameter group (``method_lr``, default ``lr``, no decay).
        method_args: options of the method (e.g. ``{"alpha": 1.5}``); methods that take a
            ``seed`` get ``seed`` unless given one.
        rescale: rescale each combined gradient to the norm of the plain sum.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        seed: seeds torch, ``random``, numpy and the shuffling of a fresh run.
        batch_size: of the DataLoaders built from datasets (the global batch under data
            parallelism).
        progress: show progress bars (rank 0 only) and a summary table.
        console: a ``rich.console.Console`` for the progress and summary.
        model_file: path of the model file (its sha256 goes to config.json and checkpoints).
        config: extra entries for ``config.json`` (the CLI's options).
        engine: the surgery engine of :class:`~impartial_train.wrap.ImpartialModel`.
        verify: the engines' self-check on the first step of each input structure (see
            :class:`~impartial_train.wrap.ImpartialModel`).
        plots: write ``curves.png`` (matplotlib) at the end of ``fit`` and on Ctrl-C.
    """

    def __init__(
        self,
        model: nn.Module,
        losses: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]] | None = None,
        method: Any = "sum",
        regularizers: Iterable[str] = ("kl",),
        optimizer: str | type = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        method_args: Mapping[str, Any] | None = None,
        rescale: bool = True,
        device: str | torch.device = "cpu",
        seed: int = 0,
        batch_size: int = 32,
        method_lr: float | None = None,
        optimizer_args: Mapping[str, Any] | None = None,
        progress: bool = False,
        summary: bool | None = None,
        console: Any = None,
        model_file: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        engine: str = "auto",
        plots: bool = True,
        verify: bool = True,
    ) -> None:
        from impartial_train import distributed as dist_utils

        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.losses_fn = losses or (lambda m, batch: m(batch))
        self.method = method
        self.regularizers = tuple(regularizers)
        self.rescale = bool(rescale)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.method_lr = float(method_lr) if method_lr is not None else None
        self.optimizer_name = optimizer if isinstance(optimizer, str) else optimizer.__name__
        self.optimizer_args = dict(optimizer_args or {})
        self.method_args = self._method_args(method, dict(method_args or {}))
        self.progress = bool(progress)
        self.summary = self.progress if summary is None else bool(summary)
        self.console = console
        self.model_file = Path(model_file).resolve() if model_file is not None else None
        self.model_sha256 = sha256_file(self.model_file) if self.model_file else None
        self.config = dict(config or {})
        self.plots = bool(plots)
        self.distributed = dist_utils.is_distributed()
        self.rank = dist_utils.rank()
        self.world = dist_utils.world_size()
        self.is_main = self.rank == 0

        self.ddp = None
        imodel_losses = self.losses_fn
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            loss_module = dist_utils.LossModule(self.model, self.losses_fn)
            self.ddp = DistributedDataParallel(
                loss_module, device_ids=device_ids, find_unused_parameters=True
            )
            raw, ddp = self.losses_fn, self.ddp

            def imodel_losses(m, batch):
                if m.training and torch.is_grad_enabled():
                    ddp(batch)
                    return loss_module.take_output()
                return raw(m, batch)

        self.imodel = ImpartialModel(
            self.model,
            None,
            imodel_losses,
            method=method,
            regularizers=self.regularizers,
            rescale=self.rescale,
            # data parallelism extends the hook engine (see impartial_train.distributed)
            engine="hook" if self.distributed else engine,
            method_args=self.method_args,
            verify=verify,
        )
        if self.distributed and not self.imodel.is_vanilla:
            import torch.distributed as dist

            from impartial_train.engine.hooks import HookEngine

            if not isinstance(self.imodel.engine, HookEngine):  # pragma: no cover
                raise TrainingError("data-parallel training needs the hook engine")

            self.imodel.engine = dist_utils.DistributedHookEngine(
                self.rescale, dist.new_group(), self.world, self.device
            )
        self.optimizer = self._make_optimizer(optimizer)
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self._pending_optimizer: dict[str, Any] | None = None
        self._resume_epoch: dict[str, Any] | None = None
        self._stop = StopRequest(self._last_checkpoint, announce=self.progress and self.is_main)
        self._saved: tuple[str, int, int] | None = None  # the newest checkpoint: path, epoch, step
        self._announced = False
        self._writer = None
        self.out: Path | None = None

    # -- construction ---------------------------------------------------------------------------
    def _method_args(self, method: Any, args: dict[str, Any]) -> dict[str, Any]:
        """Give methods that take a ``seed`` the trainer's seed (reproducible, resumable)."""
        if not isinstance(method, str) or method == "sum" or "seed" in args:
            return args
        from impartial_train.methods import build

        try:
            build(method, **args, seed=self.seed)
        except (ValueError, TypeError):
            return args
        return {**args, "seed": self.seed}

    def _make_optimizer(self, optimizer: str | type) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the model has no trainable parameters (requires_grad=True)")
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, **self.optimizer_args}
        if isinstance(optimizer, str):
            key = optimizer.lower()
            classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
            if key not in classes:
                raise TrainingError(
                    f"unknown optimizer {optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
                )
            cls = classes[key]
        else:
            cls = optimizer
        return cls([{"params": params, "name": "model"}], **kwargs)

    def _sync_method_parameters(self) -> None:
        """Put learnable method parameters (created at the first step) in their own group."""
        params = [p for p in self.imodel.method_parameters() if p.requires_grad]
        if not params:
            return
        known = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in known]
        if not new:
            return
        group = next((g for g in self.optimizer.param_groups if g.get("name") == "methods"), None)
        if group is None:
            self.optimizer.add_param_group(
                {
                    "params": new,
                    "lr": self.method_lr if self.method_lr is not None else self.lr,
                    "weight_decay": 0.0,
                    "name": "methods",
                }
            )
        else:
            group["params"].extend(new)

    # -- one step -------------------------------------------------------------------------------
    def compute_gradients(
        self, batch: Any, global_size: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Forward and ONE backward of ``batch`` (this rank's shard under data parallelism): the
        parameters' ``.grad`` then hold the gradients of the whole batch (DDP averages them; the
        surgery sees all ranks). Returns the detached losses and this shard's size.

        ``global_size``: examples of the whole batch over all ranks (all-reduced when None).
        """
        self.imodel.train()
        batch = to_device(batch, self.device)
        n = batch_size_of(batch)
        scale = 1.0
        if self.distributed:
            if global_size is None:
                global_size = int(self._all_reduce([float(n)])[0])
            scale = self.world * n / global_size
            engine = self.imodel.engine
            if hasattr(engine, "loss_scale"):
                engine.loss_scale = scale
        losses = self.imodel(batch)
        total = sum(losses.values())
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise TrainingError(
                "the losses do not depend on any trainable parameter: nothing to train"
            )
        (total * scale if scale != 1.0 else total).backward()
        return {k: v.detach() for k, v in losses.items()}, n

    def train_step(
        self, batch: Any, global_size: int | None = None
    ) -> tuple[dict[str, torch.Tensor], int]:
        """``zero_grad``, :meth:`compute_gradients`, optimizer step."""
        self.optimizer.zero_grad(set_to_none=True)
        losses, n = self.compute_gradients(batch, global_size)
        self._sync_method_parameters()
        if self._pending_optimizer is not None:
            self._load_optimizer(self._pending_optimizer)
        self.optimizer.step()
        return losses, n

    def _load_optimizer(self, state: dict[str, Any]) -> None:
        groups = len(state.get("param_groups", []))
        if groups > len(self.optimizer.param_groups):
            self._pending_optimizer = state  # method parameters appear at the first step
            return
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            raise ResumeError(
                f"the checkpoint's optimizer state does not fit this optimizer ({exc}): resume "
                "with the same --optimizer and method"
            ) from exc
        # the loaded groups carry the first run's hyper-parameters; this run's are the ones asked
        # for (and recorded in config.json), e.g. a lower --lr to fine-tune from a checkpoint
        for group in self.optimizer.param_groups:
            if group.get("name") == "model":
                group["lr"], group["weight_decay"] = self.lr, self.weight_decay
            elif group.get("name") == "methods":
                group["lr"] = self.method_lr if self.method_lr is not None else self.lr
        self._pending_optimizer = None

    def _all_reduce(self, values: Sequence[float]) -> list[float]:
        import torch.distributed as dist

        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    # -- fit ------------------------------------------------------------------------------------
    def fit(
        self,
        train: Any,
        epochs: int = 1,
        val: Any = None,
        evaluate: Callable[[nn.Module, Any], Mapping[str, Any]] | None = None,
        val_every: int = 1,
        out: str | os.PathLike[str] | None = None,
        resume: bool = False,
        lock: bool = True,
    ) -> list[dict[str, Any]]:
        """Train until ``epochs`` epochs are done in total; return the history (metrics rows).

        ``train``/``val``: a Dataset (loaded with ``batch_size``, shuffled with the seed) or a
        DataLoader. ``evaluate(model, loader)`` returns ``{name: float}``; it runs every
        ``val_every`` epochs and after the last, on the val loader (or, without one, on the
        training data in order). ``out``: directory of the outputs. ``resume``: continue from
        ``out/checkpoint.pt`` (same model and method; states, RNGs and data order restored).
        ``lock``: hold the OS lock of ``out`` while training (:mod:`impartial_train.runlock`;
        a run directory held by another live process is a :class:`RunDirectoryBusy` error);
        False only where a parent process holds it for this one.
        """
        if epochs < 0:
            raise TrainingError(f"epochs must be >= 0, got {epochs}")
        if val_every < 1:
            raise TrainingError(f"val_every must be >= 1, got {val_every}")
        self.out = Path(out) if out is not None else None
        held = RunLock(self.out) if lock and self.out is not None and self.is_main else None
        if self.distributed:  # every rank fails alike, instead of waiting for rank 0 forever
            from impartial_train.distributed import agree

            agree(held.acquire if held is not None else None)
        elif held is not None:
            held.acquire()
        try:
            return self._fit(train, epochs, val, evaluate, val_every, resume)
        finally:
            if held is not None:
                held.release()

    def _fit(self, train, epochs, val, evaluate, val_every, resume) -> list[dict[str, Any]]:
        loader = self._as_loader(train, shuffle=True)
        val_loader = self._as_loader(val, shuffle=False, world=1) if val is not None else None
        eval_loader = val_loader
        if evaluate is not None and eval_loader is None:
            eval_loader = self._as_loader(
                train.dataset if isinstance(train, DataLoader) else train, shuffle=False, world=1
            )
        self._train_loader = loader
        if resume:
            if self.out is None:
                raise ResumeError("cannot resume without an output directory (out=...)")
            self._resume(self.out / CHECKPOINT, loader)
        elif self.epoch == 0 and not self.history:
            seed_all(self.seed + self.rank)
            for gen in loader_generators(loader):
                gen.manual_seed(self.seed)
        if self.out is not None and self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config(epochs, val_every, resume, loader)
            if resume:
                self._rewrite_metrics()
            elif not (self.out / METRICS).exists() or not self.history:
                atomic_write(self.out / METRICS, "")
            self._open_tensorboard()
        started = time.time()
        try:
            self._loop(loader, val_loader, eval_loader, evaluate, epochs, val_every)
        except TrainingInterrupted:
            if self.is_main:
                self.write_curves()
                self._close_tensorboard()
            raise
        if self.is_main:
            self._finish(time.time() - started)
        return self.history

    def _loop(self, loader, val_loader, eval_loader, evaluate, epochs: int, val_every: int):
        with self._stop.listen(), self._progress() as progress:
            if self.epoch >= epochs and self.is_main and self.progress:
                self._print(f"already trained {self.epoch} epoch(s) (asked for {epochs})")
            while self.epoch < epochs:
                self._run_epoch(loader, epochs, progress)
                epoch = self.epoch
                due = epoch % val_every == 0 or epoch == epochs
                if due and (val_loader is not None or evaluate is not None):
                    self._validate(val_loader, eval_loader, evaluate, epoch, progress)
                with self._stop.critical():
                    if self.is_main:
                        self._log_epoch(epoch)
                    self._save_checkpoint(step=0)
                signum = self._stop_agreed()
                if signum:
                    raise TrainingInterrupted(
                        self._checkpoint_path_for_message(), self.epoch, 0, None, signum
                    )

    # the epoch ---------------------------------------------------------------------------------
    def _run_epoch(self, loader: Any, epochs: int, progress: Any) -> None:
        epoch = self.epoch + 1
        gens = loader_generators(loader)
        resumed = self._resume_epoch
        self._resume_epoch = None
        if resumed is not None:
            state = EpochState.from_state(resumed["epoch_state"], self.device)
            restore_rng(resumed["epoch_start_rng"], gens)
            skip = int(resumed["step"])
        else:
            state = EpochState()
            skip = 0
        epoch_start_rng = capture_rng(gens)
        try:
            total_steps: int | None = len(loader)
        except TypeError:
            total_steps = None
        iterator = _batches(iter(loader), "training")
        for _ in range(skip):
            try:
                next(iterator)
            except StopIteration:
                raise ResumeError(
                    f"the checkpoint stopped after step {skip} of epoch {epoch}, but the training "
                    f"data now has fewer batches ({total_steps}): resume with the same data and "
                    "batch size"
                ) from None
        if resumed is not None:
            restore_rng(resumed["rng"], gens)
        step = skip
        task = progress.start_epoch(epoch, epochs, total_steps, step)
        sampler = getattr(loader, "batch_sampler", None)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            global_size = None
            if self.distributed:
                global_size = getattr(sampler, "last_global_size", None)
            losses, n = self.train_step(batch, global_size)
            state.add_losses(losses, n)
            if not self.imodel.is_vanilla:
                state.add_stats(self.imodel)
            step += 1
            progress.advance(task, state, step)
            if not self._announced and self.is_main:
                self._announced = True
                progress.announce_surgery(self.imodel)
            signum = self._stop_agreed()
            if signum:
                with self._stop.critical():
                    self._save_checkpoint(
                        step=step,
                        epoch_state=state,
                        epoch_start_rng=epoch_start_rng,
                    )
                progress.stop_epoch(task, state, interrupted=True)
                raise TrainingInterrupted(
                    self._checkpoint_path_for_message(), self.epoch, step, total_steps, signum
                )
        if state.count == 0:
            raise TrainingError("the training data yielded no batch: the dataset is empty")
        sums = state.sums
        count = state.count
        if self.distributed:
            reduced = self._all_reduce([*sums.tolist(), float(count)])
            sums = torch.tensor(reduced[:-1], dtype=torch.float64)
            count = int(reduced[-1])
        means = (sums / count).tolist()
        row: dict[str, Any] = {"epoch": epoch, "split": "train"}
        names = state.names or []
        for name, value in zip(names, means):
            if not math.isfinite(value):
                where = (
                    f"; the checkpoint of epoch {self.epoch} is in {self.out}"
                    if (self.out and self.epoch)
                    else ""
                )
                raise TrainingError(
                    f"loss '{name}' became {value} during epoch {epoch}: training diverged "
                    f"(lower the learning rate or check the model){where}"
                )
            row[name] = value
        row["total"] = float(sum(means))
        row["examples"] = count
        points = state.point_means()
        if points:
            row["branch_points"] = points
        self.history.append(row)
        self.epoch = epoch
        progress.stop_epoch(task, state, row=row)

    def _validate(self, val_loader, eval_loader, evaluate, epoch: int, progress: Any) -> None:
        """Validation losses and evaluate() on rank 0, with its own seeds; every random state is
        restored afterwards so that validation never changes the training run."""
        if not self.is_main:
            return
        gens = loader_generators(self._train_loader)
        saved = capture_rng(gens)
        was_training = self.model.training
        try:
            seed_all(self.seed * 1_000_003 + epoch)
            self.imodel.eval()
            row: dict[str, Any] | None = None
            if val_loader is not None:
                state = EpochState()
                for batch in _batches(iter(val_loader), "validation"):
                    batch = to_device(batch, self.device)
                    losses = run_without_grad(self.losses_fn, self.model, batch)
                    state.add_losses(losses, batch_size_of(batch))
                if state.count:
                    means = (state.sums / state.count).tolist()
                    row = {"epoch": epoch, "split": "val"}
                    row.update(zip(state.names or [], means))
                    row["total"] = float(sum(means))
                    row["examples"] = state.count
            if evaluate is not None:
                metrics = run_without_grad(evaluate, self.model, eval_loader)
                metrics = self._check_metrics(metrics)
                target = row if row is not None else self._row(epoch, "train")
                for key, value in metrics.items():
                    name = key if key not in target else f"eval/{key}"
                    target[name] = value
            if row is not None:
                self.history.append(row)
                progress.print_row(row)
        finally:
            self.model.train(was_training)
            restore_rng(saved, gens)

    def _check_metrics(self, metrics: Any) -> dict[str, Any]:
        if not isinstance(metrics, Mapping):
            raise TrainingError(
                f"evaluate(model, loader) returned {type(metrics).__name__}, not a dict of "
                "metrics: return e.g. {'accuracy': 0.9}"
            )
        out: dict[str, Any] = {}
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if hasattr(value, "item") and not isinstance(value, torch.Tensor):
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TrainingError(
                    f"evaluate(model, loader) returned {value!r} for metric {key!r}: metrics "
                    "must be numbers"
                )
            out[str(key)] = _plain(value)
        return out

    def _row(self, epoch: int, split: str) -> dict[str, Any]:
        for row in reversed(self.history):
            if row["epoch"] == epoch and row["split"] == split:
                return row
        raise KeyError((epoch, split))  # pragma: no cover

    # stopping on a signal (SIGINT, SIGTERM: impartial_train.signals) ---------------------------
    def _stop_agreed(self) -> int:
        """The signal of a stop request of this process, of the parent that spawned it
        (``--devices``), or of any rank; 0 when none."""
        from impartial_train import distributed as dist_utils

        signum = self._stop.signal or dist_utils.stop_requested()
        if not self.distributed:
            return signum
        import torch.distributed as dist

        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        flag = torch.tensor([float(signum)], dtype=torch.float64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step, with a checkpoint (what Ctrl-C and SIGTERM do)."""
        self._stop.request(signum)

    def _last_checkpoint(self) -> tuple[str, int, int] | None:
        return self._saved

    # checkpoints -------------------------------------------------------------------------------
    def _checkpoint_path_for_message(self) -> str:
        return str(self.out / CHECKPOINT) if self.out is not None else "(no output directory)"

    def _save_checkpoint(self, step: int, epoch_state=None, epoch_start_rng=None) -> None:
        gens = loader_generators(self._train_loader)
        rank_state: dict[str, Any] = {"rng": capture_rng(gens)}
        if step:
            rank_state["epoch_state"] = epoch_state.state()
            rank_state["epoch_start_rng"] = epoch_start_rng
        if self.distributed:
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.world
            dist.all_gather_object(ranks, rank_state)
        else:
            ranks = [rank_state]
        if self.out is None or not self.is_main:
            return
        optimizer_state = (
            self._pending_optimizer
            if self._pending_optimizer is not None
            else self.optimizer.state_dict()
        )
        checkpoint = {
            "format": FORMAT,
            "epoch": self.epoch,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": optimizer_state,
            "methods": self.imodel.methods_state_dict(),
            "ranks": ranks,
            "world_size": self.world,
            "history": json.loads(json.dumps(self.history)),
            "method": _describe_method(self.method),
            "method_args": json.loads(json.dumps(self.method_args, default=str)),
            "regularizers": list(self.regularizers),
            "seed": self.seed,
            "optimizer_name": self.optimizer_name,
            "batch_size": self.batch_size,
            "train_examples": dataset_len(self._train_loader),
            "model_signature": model_signature(self.model),
            "model_file": str(self.model_file) if self.model_file else None,
            "model_sha256": self.model_sha256,
            "versions": versions(),
        }
        save_atomic(checkpoint, self.out / CHECKPOINT)
        self._saved = (str(self.out / CHECKPOINT), self.epoch, step)

    def _resume(self, path: Path, loader: Any) -> None:
        if not path.is_file():
            raise ResumeError(
                f"cannot resume: there is no {CHECKPOINT} in {path.parent} (train without "
                "--resume first, or point --out at an earlier run)"
            )
        try:
            ckpt = load_checkpoint(path)
        except Exception as exc:
            raise ResumeError(f"cannot read the checkpoint {path}: {exc}") from exc
        where = str(path)
        if ckpt.get("format") != FORMAT:
            raise ResumeError(
                f"the checkpoint {where} has format {ckpt.get('format')!r}, this version of "
                f"impartial reads format {FORMAT}: resume with the version that wrote it, or "
                "use another --out"
            )
        if ckpt.get("model_signature") != model_signature(self.model):
            saved = ckpt.get("model_file") or "another model"
            raise ResumeError(
                f"the checkpoint {where} is from a different model ({saved}): its parameters do "
                "not match this model's; use another --out, or drop --resume"
            )
        if (
            self.model_sha256
            and ckpt.get("model_sha256")
            and ckpt["model_sha256"] != self.model_sha256
        ):
            saved = ckpt.get("model_file") or "another file"
            raise ResumeError(
                f"the checkpoint {where} is from a different model file ({saved}, sha256 "
                f"{ckpt['model_sha256'][:12]}…, this file: {self.model_sha256[:12]}…): use "
                "another --out, or drop --resume"
            )
        method = _describe_method(self.method)
        if ckpt.get("method") != method:
            raise ResumeError(
                f"the checkpoint {where} was trained with method '{ckpt.get('method')}', not "
                f"'{method}': resume with --method {ckpt.get('method')} or use another --out"
            )
        for what, saved, mine, flag in (
            (
                "optimizer",
                _lower(ckpt.get("optimizer_name")),
                _lower(self.optimizer_name),
                "--optimizer",
            ),
            ("seed", ckpt.get("seed"), self.seed, "--seed"),
            ("regularizers", ckpt.get("regularizers"), list(self.regularizers), "--regularizer"),
        ):
            if saved is not None and saved != mine:
                shown = ",".join(saved) if isinstance(saved, list) else saved
                raise ResumeError(
                    f"the checkpoint {where} was trained with {what} {saved!r}, not {mine!r}: "
                    f"resume with {flag} {shown} or use another --out"
                )
        saved_args = ckpt.get("method_args") or {}
        mine = json.loads(json.dumps(self.method_args, default=str))
        if saved_args != mine:
            raise ResumeError(
                f"the checkpoint {where} was trained with method options {saved_args}, not "
                f"{mine}: resume with the same --method-arg options"
            )
        saved_n, n = ckpt.get("train_examples"), dataset_len(loader)
        if saved_n is not None and n is not None and saved_n != n:
            raise ResumeError(
                f"the checkpoint {where} was trained on {saved_n} examples, the training data now "
                f"has {n}: resume with the same data (same model file settings and environment)"
            )
        if int(ckpt.get("step", 0)) and ckpt.get("batch_size") != self.batch_size:
            raise ResumeError(
                f"the checkpoint {where} stopped inside an epoch with batch size "
                f"{ckpt.get('batch_size')}: resume with --batch-size {ckpt.get('batch_size')}"
            )
        self.model.load_state_dict(ckpt["model"])
        self._saved = (str(path), int(ckpt["epoch"]), int(ckpt.get("step", 0)))
        self.imodel.load_methods_state_dict(ckpt.get("methods", {}))
        self._load_optimizer(ckpt["optimizer"])
        self.epoch = int(ckpt["epoch"])
        self.history = list(ckpt.get("history", []))
        ranks = ckpt.get("ranks") or []
        gens = loader_generators(loader)
        if len(ranks) == self.world:
            mine_state = ranks[self.rank]
        else:
            mine_state = None
            if self.is_main and self.progress:
                self._print(
                    f"the checkpoint was written by {len(ranks)} process(es), this run has "
                    f"{self.world}: random states restarted (the run will not repeat exactly)"
                )
        if int(ckpt.get("step", 0)) and mine_state is not None:
            self._resume_epoch = {
                "step": int(ckpt["step"]),
                "epoch_state": mine_state["epoch_state"],
                "epoch_start_rng": mine_state["epoch_start_rng"],
                "rng": mine_state["rng"],
            }
        elif mine_state is not None:
            restore_rng(mine_state["rng"], gens)
        else:
            seed_all(self.seed + self.rank + 7919 * self.epoch)

    # outputs -----------------------------------------------------------------------------------
    def _write_config(self, epochs: int, val_every: int, resume: bool, loader: Any) -> None:
        path = self.out / CONFIG
        previous: dict[str, Any] = {}
        if resume and path.is_file():
            with contextlib.suppress(OSError, ValueError):
                previous = json.loads(path.read_text())
        config = {
            **{k: v for k, v in previous.items() if k not in ("trainer", "versions")},
            **self.config,
            "trainer": {
                "method": _describe_method(self.method),
                "method_args": self.method_args,
                "regularizers": list(self.regularizers),
                "optimizer": self.optimizer_name,
                "optimizer_args": self.optimizer_args,
                "lr": self.lr,
                "method_lr": self.method_lr,
                "weight_decay": self.weight_decay,
                "rescale": self.rescale,
                "engine": self.imodel.engine_mode,
                "verify": self.imodel.verify,
                "device": str(self.device),
                "seed": self.seed,
                "batch_size": self.batch_size,
                "epochs": epochs,
                "val_every": val_every,
                "world_size": self.world,
                "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                "parameters": sum(p.numel() for p in self.model.parameters()),
            },
            "model_file": (
                {"path": str(self.model_file), "sha256": self.model_sha256}
                if self.model_file
                else None
            ),
            "versions": versions(),
        }
        config.setdefault("created", datetime.now().isoformat(timespec="seconds"))
        if resume:
            resumes = list(previous.get("resumes", []))
            resumes.append(
                {"time": datetime.now().isoformat(timespec="seconds"), "from_epoch": self.epoch}
            )
            config["resumes"] = resumes
        atomic_write(path, json.dumps(config, indent=2, default=str) + "\n")

    def _rewrite_metrics(self) -> None:
        text = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write(self.out / METRICS, text)

    def _log_epoch(self, epoch: int) -> None:
        rows = [r for r in self.history if r["epoch"] == epoch]
        if self.out is not None:
            with open(self.out / METRICS, "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
        if self._writer is not None:
            for row in rows:
                for key, value in row.items():
                    if key in ("epoch", "split", "examples") or not isinstance(value, float):
                        continue
                    self._writer.add_scalar(f"{row['split']}/{key}", value, epoch)
                for where, point in row.get("branch_points", {}).items():
                    for stream, w in zip(point["streams"], point.get("weights", [])):
                        self._writer.add_scalar(f"weights/{where}/{stream}", w, epoch)
            self._writer.flush()

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: optional
            return
        self._writer = SummaryWriter(str(self.out / "tensorboard"))

    def _close_tensorboard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _finish(self, seconds: float) -> None:
        self._close_tensorboard()
        if not self.write_curves():
            self._print("matplotlib is not installed: curves.png not written")
        if self.summary and self.history:
            from impartial_train.plots import summary_tables

            console = self._get_console()
            for table in summary_tables(self.history, seconds, self.out):
                console.print(table)

    def write_curves(self) -> bool:
        """(Re)write ``curves.png`` from the history (e.g. after an interruption); False when
        matplotlib is missing."""
        if self.out is None or not self.history or not self.is_main or not self.plots:
            return True
        from impartial_train.plots import plot_curves

        try:
            plot_curves(self.history, self.out / CURVES)
        except ImportError:
            return False
        return True

    # console -----------------------------------------------------------------------------------
    def _get_console(self):
        if self.console is None:
            from rich.console import Console

            self.console = Console(file=sys.stdout, highlight=False)
        return self.console

    def _print(self, text: str) -> None:
        from rich.text import Text

        self._get_console().print(Text(text), soft_wrap=True)

    def _progress(self):
        from impartial_train.progress import EpochProgress, NoProgress

        if not (self.progress and self.is_main):
            return NoProgress()
        return EpochProgress(self._get_console())

    def _as_loader(self, data: Any, shuffle: bool, world: int | None = None) -> Any:
        if data is None:
            return None
        world = self.world if world is None else world
        if isinstance(data, DataLoader):
            if self.distributed and world > 1:
                return make_loader(
                    data.dataset,
                    data.batch_size or self.batch_size,
                    shuffle=shuffle,
                    seed=self.seed,
                    rank=self.rank,
                    world=self.world,
                    collate_fn=data.collate_fn,
                )
            return data
        if isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
            if world > 1:
                raise TrainingError("data-parallel training needs a map-style Dataset")
            return data  # any iterable of batches
        return make_loader(
            data,
            self.batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=self.rank if world > 1 else 0,
            world=world,
        )
