"""One training run per output directory: an OS file lock on ``<out>/.impartial-run.lock``.

Two runs writing into one directory would interleave their metrics rows and leave a
configuration of one and a checkpoint of the other. The lock is an advisory lock of the
operating system (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on an open file, so the
kernel drops it when its process ends in any way, ``kill -9`` included: a stale lock file never
blocks a later run. The file holds the holder's pid, host, start time and command line, so the
refusal can name who holds the directory.

Locks are re-entrant within a process (the CLI locks a run directory, then the ``Trainer`` it
drives locks it again), and released when the last holder releases it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from impartial_train.errors import TrainingError

__all__ = ["LOCK_NAME", "RunDirectoryBusy", "RunLock", "run_lock"]

LOCK_NAME = ".impartial-run.lock"


class RunDirectoryBusy(TrainingError):
    """Another live process holds the run directory (``holder``: what its lock file says)."""

    def __init__(self, directory: Path, holder: dict[str, Any]) -> None:
        self.directory = directory
        self.holder = holder
        pid = holder.get("pid")
        who = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
        host = holder.get("host")
        if host and host != socket.gethostname():
            who += f" on {host}"
        since = holder.get("started")
        if since:
            who += f", since {since}"
        super().__init__(
            f"{directory} is in use by another training run ({who}): wait for it to finish or "
            "stop it, or choose another --out"
        )


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        import msvcrt

        with contextlib.suppress(OSError):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """The lock of one run directory; :meth:`acquire` raises :class:`RunDirectoryBusy` when a
    live process holds it. Creates the directory when needed and, when it created it and
    nothing but the lock file is in it on release, removes it again (a run refused for another
    reason leaves no empty directory behind)."""

    # locks this process holds, by resolved directory: (owner, how many times acquired)
    _held: ClassVar[dict[str, tuple[RunLock, int]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def key(self) -> str:
        return str(self.directory.resolve())

    def acquire(self) -> RunLock:
        with RunLock._guard:
            key = self.key
            held = RunLock._held.get(key)
            if held is not None:
                RunLock._held[key] = (held[0], held[1] + 1)
                return held[0]
            self._open_locked()
            RunLock._held[key] = (self, 1)
            return self

    def _open_locked(self) -> None:
        missing = []
        parent = self.directory
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created = missing  # innermost first
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                os.close(fd)
                holder = _read_holder(self.path)
                self._remove_created()
                raise RunDirectoryBusy(self.directory, holder)
            # the previous holder may have removed the file between our open and our lock:
            # then we locked a file nobody else will ever open; take the one on disk
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            _unlock(fd)
            os.close(fd)
        else:  # pragma: no cover - ten races in a row
            raise TrainingError(f"could not lock {self.path}: it keeps being replaced")
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": sys.argv,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        with RunLock._guard:
            key = self.key
            held = RunLock._held.get(key)
            if held is None:
                return
            owner, count = held
            if count > 1:
                RunLock._held[key] = (owner, count - 1)
                return
            del RunLock._held[key]
            owner._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if self._created and self._only_lock_left():
                self.path.unlink(missing_ok=True)  # while still locked: see _open_locked
            _unlock(fd)
        finally:
            os.close(fd)
        self._remove_created()

    def _only_lock_left(self) -> bool:
        try:
            return [p.name for p in self.directory.iterdir()] == [LOCK_NAME]
        except OSError:
            return False

    def _remove_created(self) -> None:
        for directory in self._created:
            try:
                directory.rmdir()  # only when empty
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str] | None, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``directory`` for the block (nothing when None or not ``enabled``)."""
    if directory is None or not enabled:
        yield
        return
    lock = RunLock(directory)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
