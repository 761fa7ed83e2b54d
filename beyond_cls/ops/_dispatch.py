"""Backend policy of the fused ops: which implementation runs an op on given tensors.

``BEYOND_CLS_BACKEND=reference|triton|cpp`` forces an implementation (read on every call);
unset, CUDA tensors go to Triton and CPU tensors to C++, falling back to the reference when a
backend cannot take the tensors at hand (e.g. float64 on CUDA). Triton runs CPU tensors only
under ``TRITON_INTERPRET=1`` (how the kernels are tested without a GPU; read by
:mod:`beyond_cls.triton_mode`). Each op module registers what its fused backends take (:func:`register`);
this module imports nothing else of the package but that leaf.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from beyond_cls.triton_mode import interpreting

BACKENDS = ("reference", "triton", "cpp")
# A fact of the installation, looked up once: importlib.util.find_spec cannot be traced by
# torch.compile (it graph-breaks on it), and unavailable() runs inside compiled regions.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Support:
    """What the fused backends of one op take.

    ``cpp_error`` returns None when the op's C++ kernel can be called, else why not (it must be
    constant under torch.compile: ``torch.compiler.assume_constant_result``).
    """

    triton_dtypes: tuple[torch.dtype, ...]
    cpp_dtypes: tuple[torch.dtype, ...]
    cpp_error: Callable[[], str | None]


# Kept across importlib.reload of this module: the op modules that filled it are not run again, and an empty
# table would silently send every op to the reference.
_SUPPORT: dict[str, Support] = globals().get("_SUPPORT", {})


def register(op: str, support: Support) -> None:
    """Declare what the fused backends of ``op`` take (called once by the op's module)."""
    _SUPPORT[op] = support


def forced_backend() -> str | None:
    """The backend ``BEYOND_CLS_BACKEND`` forces, or None."""
    name = os.environ.get("BEYOND_CLS_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"BEYOND_CLS_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(t).removeprefix("torch.") for t in dtypes)


def unavailable(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``/``dtype`` tensors, else the reason it cannot."""
    if backend == "reference":
        return None
    support = _SUPPORT.get(op)
    if support is None:
        return f"the {backend} backend has no {op} op"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got {device.type}"
        if dtype not in support.cpp_dtypes:
            return f"the C++ backend takes {_names(support.cpp_dtypes)}, got {dtype}"
        return support.cpp_error()
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device.type}"
    if dtype not in support.triton_dtypes:
        return f"the Triton kernel takes {_names(support.triton_dtypes)}, got {dtype}"
    return None


def backend_for(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that ``op`` uses for ``dtype`` tensors on ``device`` under the current environment."""
    forced = forced_backend()
    if forced is not None:
        reason = unavailable(forced, op, device, dtype)
        if reason is not None:
            raise RuntimeError(f"BEYOND_CLS_BACKEND={forced} cannot run {op}: {reason}")
        return forced
    preferred = ("triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    return next(b for b in preferred if unavailable(b, op, device, dtype) is None)


def on_input_device(kernel: Callable) -> Callable:
    """A custom op's CUDA kernel, run with the device of its first tensor argument current: Triton launches on
    the current device, so tensors on ``cuda:1`` (``--device cuda:1``) would otherwise reach a kernel on cuda:0."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with torch.cuda.device(device):
            return kernel(*args, **kwargs)

    return run
