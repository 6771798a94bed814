"""Data-parallel impartial training: DDP plus a surgery engine that sees the whole batch.

How the pieces combine so that N processes compute exactly the gradients of one process on the
concatenated batch (mean-reduced losses; the engine's own rule for each branch point):

- Rank ``r`` holds ``b_r`` of the ``B`` examples of a global batch and multiplies its total loss by
  ``f_r = N b_r / B`` before ``backward`` (``f_r = 1`` for equal shards). Every rank-local gradient
  is then exactly ``N`` times the share of that rank's examples in the single-process gradient.
- **Activation branch points** (the batch is flattened into the columns of J): the single-process
  J is the concatenation of the shards' ``J_r / N``, so its Gramian is ``sum_r G_r / N^2``: the
  engine all-reduces (sums) each rank's Gramian and divides by ``N^2``. Weights, the rescaling
  factor (``sqrt(sum G) / sqrt(w G w)``) and the logged statistics are those of one process; each
  rank applies them to its own rows, giving ``N`` times its share of the combined gradient.
- **Parameter branch points** (J's columns are a weight's entries, not examples): the
  single-process J is the *mean* of the ranks' ``J_r``; the Gramian of a sum is not the sum of the
  Gramians, so here the rows themselves are all-reduced (S x parameter size) and averaged; every
  rank then computes the single-process combined gradient itself.
- The per-stream loss values the methods see are all-reduced the same way (``sum_r f_r L_r / N``),
  streams present or non-finite on any rank are treated so on all ranks (zero rows where a rank
  has no contribution), so every rank makes the same decisions.
- DDP's reducer then averages the parameter gradients over ranks: ``mean_r`` of ``N`` times each
  share is the single-process gradient; where every rank already holds the same value (parameter
  branch points) the average keeps it.

The surgery's collectives use their own process group, so they never interleave with DDP's bucket
all-reduces. DDP's reducer hooks run after a parameter's ``AccumulateGrad`` node (post hooks); the
surgery's hooks run on the consumers (post hooks) and on the branch node (pre hooks), so a branch
point on a parameter hands its ``AccumulateGrad`` the combined gradient before DDP reads it.
Requirement: every rank must build the same autograd graph structure each step (same losses, same
branch points); losses that exist on some ranks only make the collectives wait forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blockfinder.errors import BlockfinderError
from impartial_train.checkpoint import TrainingInterrupted
from impartial_train.engine.hooks import HookEngine
from impartial_train.signals import TrainingAborted

__all__ = [
    "DistributedError",
    "DistributedHookEngine",
    "LossModule",
    "ShardedBatchSampler",
    "agree",
    "free_port",
    "is_distributed",
    "launch",
    "rank",
    "stop_requested",
    "world_size",
]


class DistributedError(RuntimeError):
    """A worker process of a data-parallel run failed (not a user error)."""


def is_distributed() -> bool:
    """Whether this process is one of several of an initialised ``torch.distributed`` group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree(action: Callable[[], Any] | None) -> None:
    """Run ``action`` on rank 0 (ranks pass None or the same callable) and let every rank of
    the group raise what it raised there: a user error found by rank 0 alone (a busy run
    directory, a bad checkpoint) ends all ranks with its message instead of leaving the others
    waiting for rank 0 in their next collective."""
    import torch.distributed as dist

    message: list[Any] = [None]
    error: BaseException | None = None
    if rank() == 0 and action is not None:
        try:
            action()
        except BlockfinderError as exc:
            error = exc
            message = [str(exc)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise BlockfinderError(message[0])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# data


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Rank ``rank``'s contiguous share of every batch of ``batch_sampler``.

    Every rank iterates the same global batches (the inner sampler uses a generator seeded alike
    on all ranks), so the N shards of a step are exactly one single-process batch. Shares differ
    by at most one example; a global batch with fewer examples than ranks is skipped.
    """

    def __init__(self, batch_sampler: Any, rank: int, world_size: int) -> None:
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size
        #: examples of the global batch whose share was yielded last (all ranks agree on it)
        self.last_global_size: int | None = None

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) < self.world_size:
                continue
            base, extra = divmod(len(batch), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            size = base + (1 if self.rank < extra else 0)
            self.last_global_size = len(batch)
            yield batch[start : start + size]

    def __len__(self) -> int:
        full = len(self.batch_sampler)
        n = len(self.batch_sampler.sampler)
        last = n - (full - 1) * self.batch_sampler.batch_size if full else 0
        return full - (1 if full and last < self.world_size else 0)


# --------------------------------------------------------------------------------------------
# the model and the engine


class LossModule(nn.Module):
    """``forward(batch) = losses_fn(model, batch)``: the unit DDP wraps, so that the losses go
    through ``DistributedDataParallel.forward`` (which prepares its reducer) whatever the losses
    function calls on the model. Use :meth:`take_output` for the losses to differentiate."""

    def __init__(self, model: nn.Module, losses_fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.losses_fn = losses_fn

    def forward(self, batch: Any) -> Any:
        self.last_output = self.losses_fn(self.model, batch)
        return self.last_output

    def take_output(self) -> Any:
        """The losses as the user's function returned them, before DDP's ``_DDPSink``.

        With ``find_unused_parameters`` DDP passes the outputs through one multi-output autograd
        function; the surgery must see each loss's own graph (a node shared by all losses would
        make every loss reach every node), and the reducer needs only its AccumulateGrad hooks and
        the traversal it already made in ``forward``."""
        out, self.last_output = self.last_output, None
        return out


class DistributedHookEngine(HookEngine):
    """The hook engine with the all-reductions that make N ranks combine like one process (see
    the module docstring). ``loss_scale`` is this rank's ``f_r`` for the current step."""

    def __init__(
        self, rescale: bool, group: Any, world: int, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(rescale=rescale, gramian_hook=self._reduce_gramian)
        self.group = group
        self.world = world
        self.device = torch.device(device)
        self.loss_scale = 1.0

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _reduce_gramian(self, gramian: torch.Tensor) -> torch.Tensor:
        reduced = self._all_reduce(gramian.detach().double().clone())
        return (reduced / self.world**2).to(gramian.dtype)

    def _combine(self, run: Any) -> torch.Tensor | None:
        stash = run.stash
        count = len(stash)
        ref = next((g for g in stash if g is not None), None)
        if ref is None:
            return super()._combine(run)
        flags = torch.zeros(3 * count, dtype=torch.float64, device=ref.device)
        for i, g in enumerate(stash):
            if g is not None:
                flags[i] = 1.0
                flags[count + i] = (~torch.isfinite(g)).any().double()
        if run.losses is not None:
            flags[2 * count :] = run.losses.detach().double().reshape(-1) * self.loss_scale
        self._all_reduce(flags)
        present = (flags[:count] > 0).tolist()
        nonfinite = (flags[count : 2 * count] > 0).tolist()
        if run.losses is not None:
            run.losses = (flags[2 * count :] / self.world).to(run.losses.dtype)
        for i in range(count):
            if present[i] and stash[i] is None:
                stash[i] = torch.zeros_like(ref)
            if nonfinite[i]:  # non-finite on some rank: the whole row is, drop it everywhere
                stash[i] = torch.full_like(ref, float("nan"))
        if not run.parameter:  # activation: reduce the Gramian
            return super()._combine(run)
        # parameter branch point: average the rows themselves, then combine locally
        rows = [i for i in range(count) if present[i] and not nonfinite[i]]
        if rows:
            stacked = torch.stack([stash[i].reshape(-1) for i in rows]).double()
            stacked = self._all_reduce(stacked) / self.world
            for k, i in enumerate(rows):
                stash[i] = stacked[k].to(ref.dtype).reshape(ref.shape)
        hook, self.gramian_hook = self.gramian_hook, None
        try:
            return super()._combine(run)
        finally:
            self.gramian_hook = hook


# --------------------------------------------------------------------------------------------
# launching


# the parent's stop request, shared with the processes it spawned (0: none, else the signal)
_STOP: Any = None


def stop_requested() -> int:
    """The signal of a stop request of the process that spawned this one (``launch``), or 0."""
    return int(_STOP.value) if _STOP is not None else 0


def _worker_entry(
    local_rank: int,
    fn: Callable[..., Any],
    world: int,
    backend: str,
    result_dir: str,
    args: Sequence[Any],
    stop: Any = None,
) -> None:
    """Runs in each spawned process: its own process group for signals (the parent passes a
    stop request on through ``stop``), ``init_process_group``, ``fn(rank, world, *args)``, and a
    result file."""
    global _STOP
    import torch.distributed as dist

    _STOP = stop
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # the terminal's Ctrl-C reaches the parent only; it passes it on
    result: dict[str, Any] = {"rank": local_rank, "status": "ok", "time": time.time()}
    path = Path(result_dir) / f"rank{local_rank}.json"
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=local_rank, world_size=world)
        try:
            result["value"] = fn(local_rank, world, *args)
            # no rank tears its gloo pairs down while a peer still uses them (that peer then
            # aborted with "terminate called without an active exception", about 1 run in 4)
            dist.barrier()
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    except TrainingInterrupted as exc:
        result.update(status="interrupted", **exc.to_dict())
    except TrainingAborted as exc:  # a second signal: the parent stops the other ranks
        result.update(status="aborted", signal=exc.signal)
        path.write_text(json.dumps(result, default=str))
        raise
    except BaseException as exc:
        result.update(
            status="error",
            user_error=isinstance(exc, BlockfinderError),
            error_type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
            time=time.time(),
        )
        path.write_text(json.dumps(result, default=str))
        raise
    path.write_text(json.dumps(result, default=str))


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    backend: str | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` spawned processes joined by
    ``torch.distributed`` (gloo on CPU, nccl on GPU; MASTER_ADDR=127.0.0.1 and a free port).

    ``fn`` must be importable (a module-level function) and its arguments picklable. Returns the
    values returned by each rank (JSON-able). The first SIGINT or SIGTERM the parent receives
    asks every rank to stop after its step with a checkpoint (:func:`stop_requested`), and the
    :class:`TrainingInterrupted` they raise is raised here; a second one kills the ranks and
    raises :class:`~impartial_train.signals.TrainingAborted`. A failing rank raises
    :class:`DistributedError` (with the rank's message; the others are stopped).
    """
    import torch.multiprocessing as mp

    from impartial_train.signals import DUPLICATE_WINDOW, STOP_SIGNALS

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    stop = mp.get_context("spawn").Value("i", 0, lock=False)
    with tempfile.TemporaryDirectory(prefix="impartial-ddp-") as result_dir:
        context = mp.start_processes(
            _worker_entry,
            args=(fn, nprocs, backend, result_dir, tuple(args), stop),
            nprocs=nprocs,
            join=False,
            start_method="spawn",
        )
        first_at = 0.0

        def on_signal(signum, frame):
            nonlocal first_at
            if not stop.value:
                stop.value, first_at = int(signum), time.monotonic()
                return
            if time.monotonic() - first_at < DUPLICATE_WINDOW:
                return  # the same request relayed twice
            for proc in context.processes:
                if proc.is_alive() and proc.pid:
                    with contextlib.suppress(OSError):
                        os.kill(proc.pid, signal.SIGKILL)
            for proc in context.processes:
                proc.join(timeout=10)
            raise TrainingAborted(signum)

        previous = {}
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for s in STOP_SIGNALS:
                previous[s] = signal.signal(s, on_signal)
        failure: BaseException | None = None
        try:
            while True:
                try:
                    if context.join(timeout=0.2):
                        break
                except (
                    mp.ProcessRaisedException,
                    mp.ProcessExitedException,
                ) as exc:  # one rank failed: the others are stopped
                    failure = exc
                    break
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        results = _read_results(result_dir, nprocs)
    aborted = [r for r in results if r and r.get("status") == "aborted"]
    if aborted:
        raise TrainingAborted(aborted[0]["signal"])
    if failure is not None:
        raise _failure(results, failure)
    interrupted = [r for r in results if r and r.get("status") == "interrupted"]
    if interrupted:
        raise TrainingInterrupted.from_dict(interrupted[0])
    return [r.get("value") if r else None for r in results]


def _read_results(result_dir: str, nprocs: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for r in range(nprocs):
        path = Path(result_dir) / f"rank{r}.json"
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out


def _failure(results: list[dict[str, Any] | None], exc: BaseException) -> BaseException:
    errors = [r for r in results if r and r.get("status") == "error"]
    errors.sort(key=lambda r: (not r.get("user_error"), r.get("time", 0.0)))
    if not errors:
        return DistributedError(f"a worker process of the data-parallel run failed: {exc}")
    first = errors[0]
    if first.get("user_error"):
        err: BaseException = BlockfinderError(first["message"])
    else:
        err = DistributedError(
            f"rank {first['rank']} failed: {first['error_type']}: {first['message']}"
        )
    remote = first.get("traceback", "")
    err.remote_traceback = remote  # type: ignore[attr-defined]
    if remote:  # shown by --debug as the cause
        err.__cause__ = RemoteError(f"in rank {first['rank']}:\n{remote}")
    return err


class RemoteError(Exception):
    """The traceback of a failed worker process (the cause of the parent's exception)."""
