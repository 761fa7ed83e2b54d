"""The fused ops' public front: one signature, dispatched by device and availability.

``BEYOND_CLS_BACKEND=reference|triton|cpp`` forces an implementation (read on every call);
unset, CUDA tensors go to Triton and CPU tensors to C++, falling back to the reference when a
backend cannot take the tensors at hand (e.g. float64 on CUDA). Triton runs CPU tensors only
under ``TRITON_INTERPRET=1`` (how the kernels are tested without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from beyond_cls import _extension, reference
from beyond_cls.reference import AttentionRows

BACKENDS = ("reference", "triton", "cpp")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPP_DTYPES = _TRITON_DTYPES + (torch.float64,)

__all__ = ["AttentionRows", "BACKENDS", "abmilp_pool", "attention_with_stats", "backend_for"]


def _forced_backend() -> str | None:
    name = os.environ.get("BEYOND_CLS_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"BEYOND_CLS_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _unavailable(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run ``op`` on ``device``/``dtype`` tensors, else the reason it cannot."""
    if backend == "reference":
        return None
    if op != "attention_with_stats":
        return f"the {backend} backend has no {op} op yet"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got {device.type}"
        if dtype not in _CPP_DTYPES:
            return f"the C++ backend takes {_CPP_DTYPES}, got {dtype}"
        return _extension.load_error()
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device.type}"
    if dtype not in _TRITON_DTYPES:
        return f"the Triton kernel takes float16/bfloat16/float32, got {dtype}"
    return None


def backend_for(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The backend that ``op`` uses for ``dtype`` tensors on ``device`` under the current environment."""
    forced = _forced_backend()
    if forced is not None:
        reason = _unavailable(forced, op, device, dtype)
        if reason is not None:
            raise RuntimeError(f"BEYOND_CLS_BACKEND={forced} cannot run {op}: {reason}")
        return forced
    preferred = ("triton", "reference") if device.type == "cuda" else ("cpp", "reference")
    return next(b for b in preferred if _unavailable(b, op, device, dtype) is None)


def attention_with_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_prefix_tokens: int = 1,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, AttentionRows]:
    """Softmax attention of q, k, v [B, H, N, d] and the row statistics of every query.

    ``out`` matches ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)``;
    the statistics are [B, H, N] float32 (float64 from the reference on float64 inputs).
    """
    backend = backend_for("attention_with_stats", q.device, q.dtype)
    if backend == "reference":
        return reference.attention_with_stats(q, k, v, num_prefix_tokens, scale, bias)
    if backend == "triton":
        from beyond_cls.kernels.attention_stats import attention_with_stats_forward

        out, self_attn, cls_attn, mass, ent = attention_with_stats_forward(q, k, v, num_prefix_tokens, scale, bias)
    else:
        out, self_attn, cls_attn, mass, ent = torch.ops.beyond_cls.attention_with_stats(
            q, k, v, num_prefix_tokens, scale, bias
        )
    return out, AttentionRows(self_attn, cls_attn if num_prefix_tokens > 0 else None, mass, ent)


def abmilp_pool(tokens: Tensor, weight: Tensor, bias: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """AbMILP pooling: ``(pooled, scores)``; see :func:`beyond_cls.reference.abmilp_pool`."""
    backend_for("abmilp_pool", tokens.device, tokens.dtype)  # validates a forced backend
    return reference.abmilp_pool(tokens, weight, bias)
