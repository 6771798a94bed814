"""Stopping a training run on a signal: SIGINT (Ctrl-C) and SIGTERM alike.

Schedulers and containers (Slurm, docker, Kubernetes, ``torchrun``'s agent) send SIGTERM and
wait a grace period (10-30 s by default) before SIGKILL. The first SIGINT or SIGTERM asks the
run to stop after the current step, save a checkpoint and end with the conventional status
(128 + the signal number: 130 for SIGINT, 143 for SIGTERM). A second signal stops at once,
without saving: the last checkpoint written stays intact and can still be resumed. A second
signal that arrives within :data:`DUPLICATE_WINDOW` seconds of the first is the same request
relayed twice (a terminal's Ctrl-C reaches ``torchrun`` and its workers, which the agent then
signals again; Slurm signals every process of a job step), not a second request.

While an epoch's rows and its checkpoint are being written (:meth:`StopRequest.critical`), an
immediate stop waits until they are complete, so the checkpoint on disk is always the one the
message names.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["DUPLICATE_WINDOW", "STOP_SIGNALS", "StopRequest", "TrainingAborted", "signal_name"]

STOP_SIGNALS = tuple(
    s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s
)
DUPLICATE_WINDOW = 1.0  # seconds


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingAborted(KeyboardInterrupt):
    """Training stopped at once on a second signal, without saving. ``checkpoint``: the last
    checkpoint written (path), ``epoch``/``step`` where it stands, or None when none was."""

    def __init__(
        self,
        signum: int,
        checkpoint: str | None = None,
        epoch: int | None = None,
        step: int | None = None,
    ) -> None:
        self.signal = int(signum)
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.step = step
        super().__init__(self.describe())

    def describe(self) -> str:
        head = f"stopped at once on a second {signal_name(self.signal)}, without saving"
        if self.checkpoint is None:
            return f"{head}; no checkpoint had been written yet"
        if self.epoch is None:
            where = ""
        elif self.step:
            where = f" (epoch {self.epoch + 1}, step {self.step})"
        else:
            where = f" (end of epoch {self.epoch})"
        return f"{head}; the last checkpoint, {self.checkpoint}{where}, can still be resumed"


class StopRequest:
    """The stop requested by signals (or by :meth:`request`) during a training run.

    ``last_checkpoint()`` returns ``(path, epoch, step)`` of the newest checkpoint written, or
    None; ``announce`` prints one line on stderr when the first signal arrives.
    """

    def __init__(
        self,
        last_checkpoint: Callable[[], tuple[str, int, int] | None] = lambda: None,
        announce: bool = False,
    ) -> None:
        self.last_checkpoint = last_checkpoint
        self.announce = announce
        self.signal = 0  # the first stop request's signal (0: none)
        self._first_at = 0.0
        self._critical = 0
        self._pending = 0

    def __bool__(self) -> bool:
        return bool(self.signal)

    def request(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step, with a checkpoint (what the first signal does)."""
        if not self.signal:
            self.signal = int(signum)
            self._first_at = time.monotonic()

    def reset(self) -> None:
        self.signal = 0
        self._pending = 0

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.signal:
            self.request(signum)
            if self.announce:
                # a raw write: a signal handler may run while the main thread is inside a
                # buffered write to stderr, and re-entering that buffer raises
                with contextlib.suppress(OSError):
                    os.write(
                        2,
                        f"\n{signal_name(signum)}: stopping after this step to save a checkpoint "
                        f"(send it again to stop at once, without saving)\n".encode(),
                    )
            return
        if time.monotonic() - self._first_at < DUPLICATE_WINDOW:
            return  # the first request relayed once more
        if self._critical:
            self._pending = signum
            return
        raise self._aborted(signum)

    def _aborted(self, signum: int) -> TrainingAborted:
        last = self.last_checkpoint()
        if last is None:
            return TrainingAborted(signum)
        return TrainingAborted(signum, *last)

    @contextlib.contextmanager
    def listen(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM for the block (main thread only; elsewhere signals are the
        main thread's business), then restore the previous handlers."""
        self.reset()
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section an immediate stop must not cut (writing metrics rows and a checkpoint)."""
        self._critical += 1
        failed = True
        try:
            yield
            failed = False
        finally:
            self._critical -= 1
            if not self._critical and self._pending and not failed:
                signum, self._pending = self._pending, 0
                raise self._aborted(signum)
