"""The fused ops' public front: one signature, dispatched by device and availability.

``BEYOND_CLS_BACKEND=reference|triton|cpp`` forces an implementation (read on every call);
unset, CUDA tensors go to Triton and CPU tensors to C++, falling back to the reference when a
backend cannot take the tensors at hand (e.g. float64 on CUDA). Triton runs CPU tensors only
under ``TRITON_INTERPRET=1`` (how the kernels are tested without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from beyond_cls import _extension, reference
from beyond_cls.reference import AttentionRows

BACKENDS = ("reference", "triton", "cpp")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPP_DTYPES = _TRITON_DTYPES + (torch.float64,)

__all__ = ["AttentionRows", "BACKENDS", "abmilp_pool", "attention_with_stats", "backend_for", "softmax_pool"]
_POOLING_OPS = ("abmilp_pool", "softmax_pool")
_CPP_OPS = {"attention_with_stats": "attention_with_stats", "abmilp_pool": "abmilp_forward",
            "softmax_pool": "softmax_pool_forward"}
# A fact of the installation, looked up once: importlib.util.find_spec cannot be traced by
# torch.compile (torch 2.11 graph-breaks on it), and _unavailable runs inside compiled regions.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


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
    if op not in _CPP_OPS:
        return f"the {backend} backend has no {op} op"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors, got {device.type}"
        if dtype not in _CPP_DTYPES:
            return f"the C++ backend takes {_CPP_DTYPES}, got {dtype}"
        if _extension.load_error() is not None:
            return _extension.load_error()
        if not _extension.has_op(_CPP_OPS[op]):
            return f"the C++ extension was built without {_CPP_OPS[op]} (rebuild it)"
        return None
    if not _TRITON_INSTALLED:
        return "triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device.type}"
    dtypes = _CPP_DTYPES if op in _POOLING_OPS else _TRITON_DTYPES  # pooling also runs float64 (exact tests)
    if dtype not in dtypes:
        return f"the Triton kernel takes {', '.join(str(t).removeprefix('torch.') for t in dtypes)}, got {dtype}"
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
    keep_rows: Sequence[int] | None = None,
) -> tuple[Tensor, AttentionRows] | tuple[Tensor, AttentionRows, Tensor]:
    """Softmax attention of q, k, v [B, H, N, d] and the row statistics of every query.

    ``out`` matches ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)``;
    the statistics are [B, H, N] float32 (float64 from the reference on float64 inputs).
    ``keep_rows``: up to 8 distinct query indices (negative from the end, e.g. ``(0, -1)``); then the
    result is ``(out, rows, kept)`` with ``kept`` [B, H, R, N] the full softmax rows a_i of those
    queries over all keys (bias and masks included), in the order given, from the same fused pass.
    """
    backend = backend_for("attention_with_stats", q.device, q.dtype)
    if backend == "reference":
        return reference.attention_with_stats(q, k, v, num_prefix_tokens, scale, bias, keep_rows)
    kept_index = None if keep_rows is None else list(reference.keep_row_indices(keep_rows, q.shape[-2]))
    if backend == "triton":
        from beyond_cls.kernels.attention_stats import attention_with_stats_forward

        out, self_attn, cls_attn, mass, ent, *kept = attention_with_stats_forward(
            q, k, v, num_prefix_tokens, scale, bias, kept_index
        )
    else:
        out, self_attn, cls_attn, mass, ent, *kept = torch.ops.beyond_cls.attention_with_stats(
            q, k, v, num_prefix_tokens, scale, bias, kept_index
        )
    rows = AttentionRows(self_attn, cls_attn if num_prefix_tokens > 0 else None, mass, ent)
    return (out, rows) if keep_rows is None else (out, rows, kept[0])


def _pooling_backend(op: str, tokens: Tensor, k: int) -> str:
    backend = backend_for(op, tokens.device, tokens.dtype)
    if backend == "triton" and k > 16 and _forced_backend() is None:
        return "reference"  # the Triton kernels hold up to 16 branches in registers
    return backend


def abmilp_pool(
    tokens: Tensor, weight: Tensor, bias: Tensor | float = 0.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """AbMILP pooling ``(pooled, scores)``: see :func:`beyond_cls.reference.abmilp_pool`.

    tokens [B, N, D]; weight [D] or [K, D]; bias scalar or [K]; mask [B, N] bool (True = keep).
    Fused backends return pooled and scores in float32 (float64 for float64 tokens) and compute the
    tokens' gradient only when the tokens require one.
    """
    squeeze = weight.dim() == 1
    weight2d = weight[None] if squeeze else weight
    backend = _pooling_backend("abmilp_pool", tokens, weight2d.shape[0])
    if backend == "reference":
        return reference.abmilp_pool(tokens, weight, bias, mask)
    if weight2d.dim() != 2 or weight2d.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"weight must be [D] or [K, D] with D={tokens.shape[-1]}, got {tuple(weight.shape)}")
    k = weight2d.shape[0]
    if isinstance(bias, Tensor) and bias.shape == (k,) and bias.dtype == weight.dtype and bias.device == tokens.device:
        bias1d = bias  # as given: no view / expand nodes in the autograd graph
    else:
        bias1d = torch.as_tensor(bias, device=tokens.device, dtype=weight.dtype).reshape(-1).expand(k)
    from beyond_cls import pooling  # noqa: F401  (registers the custom ops)

    pooled, scores = torch.ops.beyond_cls.abmilp_pool(tokens, weight2d, bias1d, mask)
    return (pooled[:, 0], scores[:, 0]) if squeeze else (pooled, scores)


def softmax_pool(tokens: Tensor, logits: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax pooling with given logits [B, K, N] or [B, N]: see :func:`beyond_cls.reference.softmax_pool`."""
    squeeze = logits.dim() == 2
    logits3d = logits[:, None] if squeeze else logits
    backend = _pooling_backend("softmax_pool", tokens, logits3d.shape[1])
    if backend == "reference":
        return reference.softmax_pool(tokens, logits, mask)
    from beyond_cls import pooling  # noqa: F401  (registers the custom ops)

    pooled, scores = torch.ops.beyond_cls.softmax_pool(tokens, logits3d, mask)
    return (pooled[:, 0], scores[:, 0]) if squeeze else (pooled, scores)
