"""How the package writes files: atomically, with the mode a plain ``open()`` / ``mkdir()`` would give.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders; renamed into place, a checkpoint or a
summary would be unreadable by the rest of a cluster group. :func:`match_umask` fixes the mode before the rename.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["current_umask", "match_umask", "write_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to a temporary file beside ``path``, flush
    it to disk, give it the umask's mode, and rename it over ``path``: readers see the old file or the whole new
    one, never a torn one. A failure removes the temporary and re-raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        match_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """This process's umask, read without changing it where ``/proc`` tells it (Linux), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """chmod ``path`` to ``0o666 & ~umask`` (``0o777`` for a folder): the mode ``open()`` would have created."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
