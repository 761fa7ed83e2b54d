"""Fused softmax attention with per-row statistics: the ``beyond_cls::attention_stats`` custom op.

Its CPU kernel runs the C++ op ``beyond_cls::attention_with_stats`` (or the Triton kernel in its
interpreter), its CUDA kernel the Triton one; the backend is chosen once per call by
:func:`attention_with_stats` and passed in. Under ``torch.compile`` the op is one graph node.
Forward only (analysis is inference): a backward through it raises.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from beyond_cls import _extension, reference
from beyond_cls.ops import _dispatch
from beyond_cls.reference import AttentionRows
from beyond_cls.statistics import ROW_STATISTICS

_dispatch.register("attention_with_stats", _dispatch.Support(
    triton_dtypes=(torch.float16, torch.bfloat16, torch.float32),
    cpp_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    cpp_error=functools.partial(_extension.op_error, "attention_with_stats"),
))


def _output_like(v: Tensor) -> Tensor:
    """Every backend's ``out``: [B, H, N, d] stored [B, N, H, d], as SDPA's, so merging the heads
    (``out.transpose(1, 2).reshape(B, N, H·d)``) is a view."""
    b, h, n, d = v.shape
    return v.new_empty((b, n, h, d)).transpose(1, 2)


def _triton(q: Tensor, k: Tensor, v: Tensor, num_prefix_tokens: int, scale: float | None, bias: Tensor | None,
            keep_rows: list[int] | None) -> tuple[Tensor, ...]:
    from beyond_cls.kernels.attention_stats import attention_with_stats_forward

    if keep_rows:
        return attention_with_stats_forward(q, k, v, num_prefix_tokens, scale, bias, keep_rows)
    b, h, n, _ = q.shape
    no_rows = q.new_empty((b, h, 0, n), dtype=torch.float32)
    return *attention_with_stats_forward(q, k, v, num_prefix_tokens, scale, bias), no_rows


@torch.library.custom_op("beyond_cls::attention_stats", mutates_args=(), device_types="cpu")
def attention_stats(
    q: Tensor, k: Tensor, v: Tensor, num_prefix_tokens: int, scale: float | None, bias: Tensor | None,
    keep_rows: list[int] | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, stats [S, B, H, N] in ROW_STATISTICS order, kept [B, H, R, N]) of CPU tensors: the C++ kernel, or
    Triton's interpreter for ``backend="triton"``. ``keep_rows``: non-negative, distinct (or None: R = 0)."""
    if backend == "triton":
        return _triton(q, k, v, num_prefix_tokens, scale, bias, keep_rows)
    return _extension.cpp_ops().attention_with_stats(q, k, v, num_prefix_tokens, scale, bias, keep_rows)


@attention_stats.register_kernel("cuda")
@_dispatch.on_input_device
def _(q, k, v, num_prefix_tokens, scale, bias, keep_rows, backend):
    return _triton(q, k, v, num_prefix_tokens, scale, bias, keep_rows)


@attention_stats.register_fake
def _(q, k, v, num_prefix_tokens, scale, bias, keep_rows, backend):
    b, h, n, _ = q.shape
    stats = q.new_empty((len(ROW_STATISTICS), b, h, n), dtype=torch.float32)
    kept = q.new_empty((b, h, len(keep_rows) if keep_rows else 0, n), dtype=torch.float32)
    return _output_like(v), stats, kept


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

    ``out`` matches ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)``, in its layout
    too (stored [B, N, H, d]: ``out.transpose(1, 2).reshape(B, N, H·d)`` is a view, for every backend);
    ``rows`` (:class:`AttentionRows`) views one stacked [S, B, H, N] float32 tensor (float64 from the reference on
    float64 inputs) in :data:`beyond_cls.statistics.ROW_STATISTICS` order: ``rows.self_attn`` etc. are [B, H, N].
    ``keep_rows``: up to 8 distinct query indices (negative from the end, e.g. ``(0, -1)``); then the
    result is ``(out, rows, kept)`` with ``kept`` [B, H, R, N] the full softmax rows a_i of those
    queries over all keys (bias and masks included), in the order given, from the same fused pass.
    """
    backend = _dispatch.backend_for("attention_with_stats", q.device, q.dtype)
    if backend == "reference":
        out, *rest = reference.attention_with_stats(q, k, v, num_prefix_tokens, scale, bias, keep_rows)
        return (_output_like(out).copy_(out), *rest)
    kept_index = None if keep_rows is None else list(reference.keep_row_indices(keep_rows, q.shape[-2]))
    out, stats, kept = attention_stats(q, k, v, num_prefix_tokens, scale, bias, kept_index, backend)
    rows = AttentionRows(stats, has_prefix=num_prefix_tokens > 0)
    return (out, rows) if keep_rows is None else (out, rows, kept)
