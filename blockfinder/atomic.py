"""Writing a file atomically: a temporary file in the same directory, then one rename."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(
    path: str | os.PathLike[str], data: bytes | str | Callable[[BinaryIO], object]
) -> None:
    """Write ``path`` so that a reader, or a crash, never sees it half-written.

    ``data``: bytes, text (written as UTF-8), or a function that writes to the open binary file
    (``torch.save``, ``fig.savefig``). The temporary file is flushed to disk and given the
    permissions a newly created file would get (the umask) before it replaces ``path``; on any
    error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
