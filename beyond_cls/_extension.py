"""Loads the compiled C++ extension ``beyond_cls._C``, which registers ``torch.ops.beyond_cls.*``."""

from __future__ import annotations

import functools
import importlib

import torch


@torch.compiler.assume_constant_result  # a fact of the installation: constant under torch.compile
def load_error() -> str | None:
    """None when ``torch.ops.beyond_cls`` is registered, else why the extension failed to load."""
    return _load()


@torch.compiler.assume_constant_result
def has_op(name: str) -> bool:
    """Whether the built extension registers ``torch.ops.beyond_cls.<name>``."""
    return _load() is None and hasattr(torch.ops.beyond_cls, name)


@torch.compiler.assume_constant_result
def op_error(name: str) -> str | None:
    """None when ``torch.ops.beyond_cls.<name>`` can be called, else why not."""
    if load_error() is not None:
        return load_error()
    return None if has_op(name) else f"the C++ extension was built without {name} (rebuild it)"


def available() -> bool:
    """Whether the C++ ops can be called."""
    return load_error() is None


def cpp_ops() -> torch._ops._OpNamespace:
    """``torch.ops.beyond_cls`` with the extension loaded, or a RuntimeError saying why it cannot be."""
    error = load_error()
    if error is not None:
        raise RuntimeError(f"the beyond_cls C++ extension is not available: {error}")
    return torch.ops.beyond_cls


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    try:
        importlib.import_module("beyond_cls._C")
    except ImportError as exc:
        return f"{exc} (reinstall with `pip install --no-build-isolation -e .`)"
    return None
