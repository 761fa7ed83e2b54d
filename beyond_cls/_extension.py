"""Loads the compiled C++ extension (``beyond_cls._C``) and registers its fake kernels."""

from __future__ import annotations

import functools
import importlib

import torch


@functools.lru_cache(maxsize=1)
def load_error() -> str | None:
    """None when ``torch.ops.beyond_cls`` is registered, else why the extension failed to load."""
    try:
        importlib.import_module("beyond_cls._C")
    except ImportError as exc:
        return f"{exc} (reinstall with `pip install --no-build-isolation -e .`)"
    _register_fakes()
    return None


def available() -> bool:
    """Whether the C++ ops can be called."""
    return load_error() is None


def _register_fakes() -> None:
    @torch.library.register_fake("beyond_cls::attention_with_stats")
    def _attention_with_stats_fake(q, k, v, num_prefix_tokens=1, scale=None, bias=None):
        b, h, n, _ = q.shape
        stat = q.new_empty((b, h, n), dtype=torch.float32)
        return torch.empty_like(v), stat, stat.clone(), stat.clone(), stat.clone()
