"""Feature cache: the frozen encoder's tokens of V augmented train views and the eval view, on disk.

For small datasets (CUB, ImageNet-1 %, Pets…) the encoder pass dominates a probe run. The cache runs
it once per view, writes ``[num_samples, N, D]`` tokens (bf16 by default) as one memory-mapped
shard per (split, view), and the head bank then trains from the shards for all epochs: epoch ``e``
reads view ``e mod V``, exactly the view an uncached run with ``--cache-views V`` computes. The
selection weights of non-trainable heads (``attn-mean``, ``guide:``…) are cached the same way, one
float32 shard ``[num_samples, num_patches]`` per head, filled in the same encoder pass.

A cache directory is keyed by a fingerprint of everything the tokens depend on (encoder, weights
file, token source, dataset, transform, seed, precision); a shard is valid once its ``.done`` marker
exists, so an interrupted extraction restarts that shard and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from beyond_cls.config import ConfigError
from beyond_cls.probe.distributed import DistEnv

__all__ = ["CACHE_DTYPES", "FeatureCache", "ShardWriter", "fingerprint_file"]

CACHE_DTYPES = {"bf16": (torch.bfloat16, np.uint16), "fp32": (torch.float32, np.float32)}


def fingerprint_file(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Identity of a weights file for the fingerprint: absolute path, size and modification time."""
    if path is None:
        return None
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class FeatureCache:
    """Shards under ``root/<fingerprint hash>/``: ``{split}_v{view}.bin`` + ``.valid.npy`` + ``.done``."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict[str, Any], dtype: str = "bf16") -> None:
        if dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}; got {dtype!r}")
        self.fingerprint = {**fingerprint, "dtype": dtype}
        text = json.dumps(self.fingerprint, sort_keys=True, default=str)
        self.dir = Path(root).expanduser() / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.torch_dtype, self.np_dtype = CACHE_DTYPES[dtype]
        self._maps: dict[str, np.memmap] = {}
        self._valid: dict[str, np.ndarray] = {}

    def _name(self, split: str, view: int) -> str:
        return f"{split}_v{view}"

    def complete(self, split: str, view: int) -> bool:
        return (self.dir / f"{self._name(split, view)}.done").exists()

    def writer(self, split: str, view: int, num_samples: int, row_shape: tuple[int, ...], env: DistEnv) -> ShardWriter:
        """Open one shard for writing (collective): each process writes its own rows into the shared file, then
        :meth:`ShardWriter.close`; indices never written (bad images skipped) stay invalid. Several caches can
        be filled from one encoder pass."""
        return ShardWriter(self, self._name(split, view), (num_samples, *row_shape), env)

    def _open(self, split: str, view: int) -> tuple[np.memmap, np.ndarray]:
        name = self._name(split, view)
        if name not in self._maps:
            if not self.complete(split, view):
                raise ConfigError(f"feature cache shard {self.dir / name} is incomplete; rerun to extract it")
            meta = json.loads((self.dir / f"{name}.json").read_text())
            self._maps[name] = np.memmap(
                self.dir / f"{name}.bin", dtype=self.np_dtype, mode="r", shape=tuple(meta["shape"])
            )
            self._valid[name] = np.load(self.dir / f"{name}.valid.npy")
        return self._maps[name], self._valid[name]

    def read(self, split: str, view: int, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(kept indices, rows [k, *row_shape] in the cache dtype) for ``indices``; invalid rows dropped."""
        data, valid = self._open(split, view)
        idx = np.asarray(indices, dtype=np.int64)
        idx = idx[valid[idx]]
        rows = torch.from_numpy(np.ascontiguousarray(data[idx]))
        if self.torch_dtype == torch.bfloat16:
            rows = rows.view(torch.bfloat16)
        return torch.from_numpy(idx), rows

    def num_valid(self, split: str, view: int) -> int:
        return int(self._open(split, view)[1].sum())


class ShardWriter:
    """One shard being written: :meth:`write` this process's rows, then :meth:`close` (collective)."""

    def __init__(self, cache: FeatureCache, name: str, shape: tuple[int, ...], env: DistEnv) -> None:
        self.cache, self.name, self.shape, self.env = cache, name, shape, env
        path = cache.dir / f"{name}.bin"
        if env.is_main:
            cache.dir.mkdir(parents=True, exist_ok=True)
            (cache.dir / "fingerprint.json").write_text(json.dumps(cache.fingerprint, indent=1, default=str))
            np.memmap(path, dtype=cache.np_dtype, mode="w+", shape=shape).flush()
        _barrier(env)
        self._out = np.memmap(path, dtype=cache.np_dtype, mode="r+", shape=shape)
        self._valid = np.zeros(shape[0], dtype=bool)

    def write(self, indices: Tensor, rows: Tensor) -> None:
        """Rows [b, *row_shape] of samples ``indices``."""
        rows = rows.detach().to("cpu", self.cache.torch_dtype).contiguous()
        if self.cache.torch_dtype == torch.bfloat16:
            rows = rows.view(torch.int16)
        idx = indices.cpu().numpy()
        self._out[idx] = rows.numpy().view(self.cache.np_dtype)
        self._valid[idx] = True

    def close(self) -> None:
        """Flush, merge every process's valid rows and mark the shard done (collective)."""
        cache, env, name = self.cache, self.env, self.name
        self._out.flush()
        del self._out
        np.save(cache.dir / f"{name}.valid.r{env.rank}.npy", self._valid)
        _barrier(env)
        if env.is_main:
            merged = np.zeros(self.shape[0], dtype=bool)
            for r in range(env.world_size):
                part = cache.dir / f"{name}.valid.r{r}.npy"
                merged |= np.load(part)
                part.unlink()
            np.save(cache.dir / f"{name}.valid.npy", merged)
            meta = {"shape": list(self.shape), "dtype": str(cache.np_dtype.__name__)}
            (cache.dir / f"{name}.json").write_text(json.dumps(meta))
            (cache.dir / f"{name}.done").touch()
        _barrier(env)
