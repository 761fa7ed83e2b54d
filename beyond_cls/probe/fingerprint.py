"""What a feature cache's tokens depend on, for its key: weights files and the contents of dataset splits."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from beyond_cls.probe.distributed import DistEnv, all_gather_objects

__all__ = ["dataset_fingerprint", "fingerprint_file"]

_CHUNK = 4096  # paths per stat task and per hash update


def fingerprint_file(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Identity of a weights file for the fingerprint: absolute path, size and modification time."""
    if path is None:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stats(paths: Sequence[str]) -> bytes:
    """(size, mtime_ns) of each path as int64 pairs; (-1, -1) for a file that cannot be stat'ed."""
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[i] = st.st_size, st.st_mtime_ns
    return out.tobytes()


def _digest(parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part)
    return h.hexdigest()


def _contents(paths: list[str], targets: torch.Tensor, num_classes: int, workers: int) -> dict[str, Any]:
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # stat waits on I/O and releases the GIL
        files = _digest(pool.map(_stats, chunks))
    return {
        "samples": len(paths),
        "classes": num_classes,
        # surrogateescape: file names that are not UTF-8 (e.g. Latin-1) hash as their raw bytes
        "paths": _digest(("\0".join(c) + "\0").encode("utf-8", "surrogateescape") for c in chunks),
        "targets": _digest([f"{targets.dtype}{tuple(targets.shape)}".encode(), targets.cpu().contiguous().numpy()]),
        "files": files,
    }


def dataset_fingerprint(dataset: Any, targets: torch.Tensor, env: DistEnv | None = None) -> dict[str, Any]:
    """Identity of one dataset split's contents: its sample count and classes, and digests of the image paths
    in order, of ``targets`` (so an edited annotation or split file changes it) and of every image's
    (size, mtime_ns), so a replaced, added or removed image does too.

    Cost: one ``stat`` per image, in threads, on the main process only (the others get its result): for the
    1.28 M images of ImageNet's train split a few seconds on a local disk, up to about a minute on a network
    file system — small next to one encoder pass over them, which it guards.
    """
    paths = [str(p) for p in dataset.paths]
    result = None
    if env is None or env.is_main:
        workers = min(32, 4 * (os.cpu_count() or 1))
        result = _contents(paths, targets, int(getattr(dataset, "num_classes", 0)), workers)
        content_files = getattr(dataset, "content_files", None)  # shards: their stats stand for the images'
        if content_files is not None:
            result["content_files"] = _digest([_stats([str(p) for p in content_files])])
    return result if env is None else all_gather_objects(result, env)[0]
