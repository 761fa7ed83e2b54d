"""File modes of what the package writes: what a plain ``open()`` / ``mkdir()`` would give under the umask.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders; renamed into place, a checkpoint or a
summary would be unreadable by the rest of a cluster group. :func:`match_umask` fixes the mode before the rename.
"""

from __future__ import annotations

import os

__all__ = ["current_umask", "match_umask"]


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
