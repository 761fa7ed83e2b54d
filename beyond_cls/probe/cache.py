"""Feature cache: the frozen encoder's tokens of V augmented train views and the eval view, on disk.

For small datasets (CUB, ImageNet-1 %, Pets…) the encoder pass dominates a probe run. The cache runs
it once per view, writes ``[num_samples, N, D]`` tokens (bf16 by default) as one memory-mapped
shard per (split, view), and the head bank then trains from the shards for all epochs: epoch ``e``
reads view ``e mod V``, exactly the view an uncached run with ``--cache-views V`` computes. The
selection weights of non-trainable heads (``attn-mean``, ``guide:``…) are cached the same way, one
float32 shard ``[num_samples, num_patches]`` per head, filled in the same encoder pass.

A cache directory is keyed by a fingerprint of everything the tokens depend on (encoder, weights
file, random-init seed, token source, dataset contents, view spec, precision, cache dtype and
:data:`CACHE_FORMAT`); a shard is valid once its ``.done`` marker exists, so an interrupted extraction
restarts that shard and nothing else.

Integrity. Each shard ``{split}_v{view}`` is ``.bin`` (rows), ``.valid.npy``, ``.crc.npy`` (CRC-32 of every
row, computed from the rows in memory as they are written), ``.json`` (shape, dtype, CRC-32 of both ``.npy``
files) and ``.done`` (CRC-32 of the ``.json``); the small files are written atomically. Opening a shard checks
that chain and the ``.bin`` size, on every open in every process (it reads ~5 bytes per sample); a shard that
fails is named in a warning and extracted again (:meth:`FeatureCache.complete`) or refused with one line
(:meth:`FeatureCache.read`). Rows are verified lazily: a process checks each row's CRC the first time it reads
that row of that shard version, so verification costs one CRC-32 pass (~2-3 GB/s per core) over the rows a
process reads, spread over the first epoch, and nothing after; a mismatch removes the ``.done`` marker and
raises one line naming the file, so a rerun re-extracts that shard. Shards are written with checked
``pwrite`` into a file preallocated with ``posix_fallocate``, so a full disk is one line, not a SIGBUS.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from beyond_cls.config import ConfigError
from beyond_cls.probe.distributed import DistEnv, all_gather_objects
from beyond_cls.probe.fingerprint import fingerprint_file
from beyond_cls.probe.shardio import (
    CacheError,
    allocate,
    crc,
    load_npy,
    npy_bytes,
    pwrite_all,
    read_checked,
    row_crcs,
    save_atomic,
)

__all__ = ["CACHE_DTYPES", "CACHE_FORMAT", "CacheError", "FeatureCache", "ShardWriter", "fingerprint_file"]

CACHE_DTYPES = {"bf16": (torch.bfloat16, np.uint16), "fp32": (torch.float32, np.float32)}
CACHE_FORMAT = 2  # bump when the files or the views change meaning: old caches are then not found
_SEEN: dict[tuple, np.ndarray] = {}  # rows whose CRC this process has checked, per shard version


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class _Shard(NamedTuple):
    data: np.memmap
    valid: np.ndarray
    crcs: np.ndarray
    seen: np.ndarray


class FeatureCache:
    """Shards under ``root/<fingerprint hash>/``: ``{split}_v{view}.bin`` + ``.valid.npy`` + ``.crc.npy`` +
    ``.json`` + ``.done`` (see the module docstring for what is verified when)."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict[str, Any], dtype: str = "bf16") -> None:
        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}; got {dtype!r}")
        self.fingerprint = {**fingerprint, "dtype": dtype, "format": CACHE_FORMAT}
        text = json.dumps(self.fingerprint, sort_keys=True, default=str)
        self.dir = Path(root).expanduser() / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.torch_dtype, self.np_dtype = CACHE_DTYPES[dtype]
        self._shards: dict[str, _Shard] = {}
        self._reported: set[str] = set()  # damaged shards already warned about

    def _name(self, split: str, view: int) -> str:
        return f"{split}_v{view}"

    def complete(self, split: str, view: int) -> bool:
        """Whether the shard is done and intact; a damaged one is named in a warning and counts as incomplete."""
        name = self._name(split, view)
        if name in self._shards:
            return True
        try:
            shard = self._load(name)
        except CacheError as exc:
            if str(exc) not in self._reported:
                self._reported.add(str(exc))
                warnings.warn(f"{exc}; extracting the shard again", UserWarning, stacklevel=2)
            return False
        if shard is None:
            return False
        self._shards[name] = shard
        return True

    def writer(self, split: str, view: int, num_samples: int, row_shape: tuple[int, ...], env: DistEnv) -> ShardWriter:
        """Open one shard for writing (collective): each process writes its own rows into the shared file, then
        :meth:`ShardWriter.close`; indices never written (bad images skipped) stay invalid. Several caches can
        be filled from one encoder pass."""
        self._shards.pop(self._name(split, view), None)
        return ShardWriter(self, self._name(split, view), (num_samples, *row_shape), env)

    def _load(self, name: str) -> _Shard | None:
        """The shard's files checked up to the rows (None: no ``.done`` marker); CacheError naming a bad file."""
        done, meta_path, path = (self.dir / f"{name}{ext}" for ext in (".done", ".json", ".bin"))
        try:
            stamp = int(done.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            raise CacheError(f"feature cache marker {done} is damaged") from None
        raw = read_checked(meta_path, stamp)
        try:
            meta = json.loads(raw)
            shape = tuple(int(n) for n in meta["shape"])
            valid_crc, rows_crc = int(meta["valid_crc"]), int(meta["rows_crc"])
        except (ValueError, KeyError, TypeError):
            raise CacheError(f"feature cache file {meta_path} is not the metadata this version writes") from None
        if meta.get("dtype") != self.np_dtype.__name__:
            raise CacheError(f"feature cache file {meta_path} describes {meta.get('dtype')} rows, expected "
                             f"{self.np_dtype.__name__}")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise CacheError(f"feature cache shard {path} is missing") from None
        expected = math.prod(shape) * np.dtype(self.np_dtype).itemsize
        if st.st_size != expected:
            raise CacheError(f"feature cache shard {path} holds {st.st_size} bytes, expected {expected} (truncated?)")
        valid = load_npy(self.dir / f"{name}.valid.npy", valid_crc, shape[:1], np.bool_)
        crcs = load_npy(self.dir / f"{name}.crc.npy", rows_crc, shape[:1], np.uint32)
        seen = _SEEN.setdefault((str(path.resolve()), stamp, st.st_ino, st.st_mtime_ns), np.zeros(shape[0], bool))
        data = np.memmap(path, dtype=self.np_dtype, mode="r", shape=shape)
        return _Shard(data, valid, crcs, seen)

    def _open(self, split: str, view: int) -> _Shard:
        name = self._name(split, view)
        if name not in self._shards:
            shard = self._load(name)
            if shard is None:
                raise CacheError(f"feature cache shard {self.dir / name} is incomplete; rerun to extract it")
            self._shards[name] = shard
        return self._shards[name]

    def read(self, split: str, view: int, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(kept indices, rows [k, *row_shape] in the cache dtype) for ``indices``; invalid rows dropped.

        Rows this process has not read before are checked against their CRC-32 first."""
        shard = self._open(split, view)
        idx = np.asarray(indices, dtype=np.int64)
        idx = idx[shard.valid[idx]]
        rows = np.ascontiguousarray(shard.data[idx])
        fresh = np.flatnonzero(~shard.seen[idx])
        if len(fresh):
            bad = fresh[row_crcs(rows[fresh]) != shard.crcs[idx[fresh]]]
            if len(bad):
                self._reject(self._name(split, view), int(idx[bad[0]]))
            shard.seen[idx[fresh]] = True
        out = torch.from_numpy(rows)
        if self.torch_dtype == torch.bfloat16:
            out = out.view(torch.bfloat16)
        return torch.from_numpy(idx), out

    def _reject(self, name: str, row: int) -> None:
        """A row failed its checksum: unmark the shard so the next run extracts it again, and stop this one."""
        (self.dir / f"{name}.done").unlink(missing_ok=True)
        self._shards.pop(name, None)
        raise CacheError(f"feature cache shard {self.dir / name}.bin: row {row} fails its checksum (the file is "
                         "damaged); the shard is marked incomplete, rerun to extract it again")

    def num_valid(self, split: str, view: int) -> int:
        return int(self._open(split, view).valid.sum())


class ShardWriter:
    """One shard being written: :meth:`write` this process's rows, then :meth:`close` (collective)."""

    def __init__(self, cache: FeatureCache, name: str, shape: tuple[int, ...], env: DistEnv) -> None:
        self.cache, self.name, self.shape, self.env = cache, name, shape, env
        self.path = cache.dir / f"{name}.bin"
        self._row_bytes = math.prod(shape[1:]) * np.dtype(cache.np_dtype).itemsize
        self._nbytes = shape[0] * self._row_bytes
        error: Exception | None = None
        if env.is_main:
            try:
                cache.dir.mkdir(parents=True, exist_ok=True)
                (cache.dir / "fingerprint.json").write_text(json.dumps(cache.fingerprint, indent=1, default=str))
                (cache.dir / f"{name}.done").unlink(missing_ok=True)  # a shard being replaced is never "done"
                allocate(self.path, self._nbytes)
            except (OSError, CacheError) as exc:
                error = exc
        message = all_gather_objects(None if error is None else str(error), env)[0]  # also the barrier
        if error is not None:
            raise error
        if message is not None:
            raise CacheError(message)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._crcs = np.full(shape[0], -1, dtype=np.int64)  # -1: not written by this process

    def write(self, indices: Tensor, rows: Tensor) -> None:
        """Rows [b, *row_shape] of samples ``indices``."""
        rows = rows.detach().to("cpu", self.cache.torch_dtype).contiguous()
        if self.cache.torch_dtype == torch.bfloat16:
            rows = rows.view(torch.int16)
        data = rows.numpy().view(self.cache.np_dtype)
        idx = indices.cpu().numpy().astype(np.int64)
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            pwrite_all(self._fd, data, int(idx[0]) * self._row_bytes, self.path, self._nbytes)  # one run
        else:
            for i, row in zip(idx.tolist(), data):
                pwrite_all(self._fd, row, i * self._row_bytes, self.path, self._nbytes)
        self._crcs[idx] = row_crcs(data)

    def close(self) -> None:
        """Merge every process's valid rows and checksums and mark the shard done (collective)."""
        cache, env, name = self.cache, self.env, self.name
        os.close(self._fd)
        part = lambda r: cache.dir / f"{name}.crc.r{r}.npy"  # noqa: E731
        save_atomic(part(env.rank), npy_bytes(self._crcs))
        _barrier(env)
        if env.is_main:
            merged = np.full(self.shape[0], -1, dtype=np.int64)
            for r in range(env.world_size):
                np.maximum(merged, np.load(part(r)), out=merged)  # disjoint rows (or equal, if written twice)
                part(r).unlink()
            valid = merged >= 0
            valid_bytes, crc_bytes = npy_bytes(valid), npy_bytes(np.where(valid, merged, 0).astype(np.uint32))
            save_atomic(cache.dir / f"{name}.valid.npy", valid_bytes)
            save_atomic(cache.dir / f"{name}.crc.npy", crc_bytes)
            meta = {"shape": list(self.shape), "dtype": cache.np_dtype.__name__,
                    "valid_crc": crc(valid_bytes), "rows_crc": crc(crc_bytes)}
            text = json.dumps(meta).encode()
            save_atomic(cache.dir / f"{name}.json", text)
            save_atomic(cache.dir / f"{name}.done", str(crc(text)).encode())
        _barrier(env)
