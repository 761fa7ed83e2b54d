"""Feature-cache file primitives: CRC-32 checksums, atomic small files, and shard writes that fail with one line
on a full disk (preallocated with ``posix_fallocate`` and written with checked ``pwrite``, never through a
writable memory map, where a full disk is a SIGBUS)."""

from __future__ import annotations

import ctypes
import errno
import io
import os
import shutil
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from beyond_cls.config import ConfigError
from beyond_cls.fileio import write_atomic

__all__ = ["CacheError", "allocate", "crc", "load_npy", "npy_bytes", "pwrite_all", "row_crcs", "save_atomic"]

_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_FALLOCATE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class CacheError(ConfigError):
    """A feature-cache file is damaged, truncated or cannot be written; the message names the file."""


def crc(data: bytes | memoryview | np.ndarray) -> int:
    """CRC-32 of a bytes-like object (a C-contiguous array counts)."""
    return zlib.crc32(data)


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """CRC-32 of every row of a C-contiguous array ``[k, ...]``: uint32 ``[k]``."""
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(rows))


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _no_space(path: Path, needed: int) -> CacheError:
    try:
        free = f", {_size(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = ""
    return CacheError(f"no disk space for feature cache file {path}: it needs {_size(needed)}{free}; "
                      "free some or point --cache at a larger disk")


def allocate(path: Path, nbytes: int) -> None:
    """Create (or truncate) ``path`` at ``nbytes`` with its blocks reserved, so a full disk fails here.

    Without fallocate (macOS, file systems that refuse it) the file is sparse and the checked writes
    of :func:`pwrite_all` report a full disk instead. Raises :class:`CacheError` naming the path and the size.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if not _reserve(fd, nbytes):
            os.ftruncate(fd, nbytes)
    except OSError as exc:
        path.unlink(missing_ok=True)  # give back what a failed allocation took
        if exc.errno in _FULL:
            raise _no_space(path, nbytes) from None
        raise
    finally:
        os.close(fd)


def _linux_fallocate() -> Callable[[int, int, int], None] | None:
    """The fallocate(2) system call (mode 0), where libc has it.

    glibc's ``posix_fallocate`` emulates a file system that lacks fallocate (NFSv3, older Lustre) by writing
    one byte per 4 KiB block: millions of writes, hours over NFS, for a shard of an ImageNet view, while
    the other processes wait. The call itself answers EOPNOTSUPP there, and the file is left sparse.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.fallocate
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]

    def fallocate(fd: int, offset: int, length: int) -> None:
        if call(fd, 0, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return fallocate


_FALLOCATE = _linux_fallocate() if sys.platform.startswith("linux") else None


def _reserve(fd: int, nbytes: int) -> bool:
    """Reserve the file's ``nbytes``; False where the platform or the file system cannot."""
    fallocate = _FALLOCATE or getattr(os, "posix_fallocate", None)
    if fallocate is None or nbytes == 0:
        return False
    try:
        fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in _NO_FALLOCATE:
            return False
        raise
    return True


def pwrite_all(fd: int, data: np.ndarray, offset: int, path: Path, needed: int) -> None:
    """Write a C-contiguous array at ``offset``; a full disk raises :class:`CacheError` (``needed``: the file size)."""
    view = memoryview(data).cast("B")
    while len(view):
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            if exc.errno in _FULL:
                raise _no_space(path, needed) from None
            raise
        if written == 0:  # no progress: treat as full rather than loop
            raise _no_space(path, needed)
        view, offset = view[written:], offset + written


def save_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file, then rename it to ``path``: readers see all of it or none of it."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        if exc.errno in _FULL:
            raise _no_space(path, len(data)) from None
        raise


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` in the ``.npy`` format."""
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def read_checked(path: Path, expected_crc: int) -> bytes:
    """The bytes of ``path``, which must have CRC-32 ``expected_crc``; one-line CacheError naming it otherwise."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CacheError(f"feature cache file {path} is missing") from None
    if crc(raw) != expected_crc:
        raise CacheError(f"feature cache file {path} fails its checksum (damaged or truncated)")
    return raw


def load_npy(path: Path, expected_crc: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Read an ``.npy`` file whose bytes must have CRC-32 ``expected_crc`` and hold ``dtype`` of ``shape``."""
    array = np.load(io.BytesIO(read_checked(path, expected_crc)), allow_pickle=False)
    if array.shape != shape or array.dtype != dtype:
        raise CacheError(f"feature cache file {path} holds {array.dtype} {array.shape}, expected "
                         f"{np.dtype(dtype)} {shape}")
    return array
