"""Plain-PyTorch definitions of every fused op: the ground truth for the kernels.

Readable in a minute and exact in float64. Kernels in ``kernels/`` (Triton) and
``csrc/`` (C++) must agree with these functions; tests and benchmarks import them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from beyond_cls.numerics import MAX_KEPT_ROWS, accumulation_dtype, entropy, max_entropy

__all__ = [
    "AttentionRows",
    "abmilp_pool",
    "attention_logits",
    "attention_with_stats",
    "entropy",
    "keep_row_indices",
    "lars_step",
    "max_entropy",
    "softmax_pool",
]


class AttentionRows(NamedTuple):
    """Per-row attention statistics, each [B, H, N] (see DESIGN.md, "Definitions").

    ``cls_attn`` is ``None`` when the sequence has no prefix token.
    """

    self_attn: Tensor
    cls_attn: Tensor | None
    patch_mass: Tensor
    patch_entropy: Tensor


def attention_logits(
    q: Tensor, k: Tensor, scale: float | None = None, bias: Tensor | None = None
) -> Tensor:
    """Scores ``q·kᵀ·scale + bias`` of shape [B, H, N, N], computed in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits


def keep_row_indices(keep_rows: Sequence[int], n: int) -> tuple[int, ...]:
    """``keep_rows`` as non-negative query indices in [0, n), in the order given.

    Negative indices count from the end (Python style). Raises a ValueError unless there are 1 to
    ``MAX_KEPT_ROWS`` distinct indices in [-n, n), a TypeError unless it is a sequence of integers.
    """
    if isinstance(keep_rows, (str, bytes)) or not isinstance(keep_rows, Sequence):
        raise TypeError(f"keep_rows must be a sequence of query indices, got {type(keep_rows).__name__}")
    try:
        indices = tuple(operator.index(i) for i in keep_rows)
    except TypeError:
        raise TypeError(f"keep_rows must hold integers, got {list(keep_rows)!r}") from None
    if not 1 <= len(indices) <= MAX_KEPT_ROWS:
        raise ValueError(f"keep_rows must hold 1 to {MAX_KEPT_ROWS} query indices, got {len(indices)}")
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"keep_rows {list(indices)}: indices {bad} are outside [-{n}, {n}) for N={n} tokens")
    normalized = tuple(i % n for i in indices)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"keep_rows {list(indices)} name the same query twice (N={n})")
    return normalized


def attention_with_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_prefix_tokens: int = 1,
    scale: float | None = None,
    bias: Tensor | None = None,
    keep_rows: Sequence[int] | None = None,
) -> tuple[Tensor, AttentionRows] | tuple[Tensor, AttentionRows, Tensor]:
    """Softmax attention and the row statistics of every query, materialized.

    q, k, v: [B, H, N, d]; bias broadcastable to [B, H, N, N]. Returns ``out`` [B, H, N, d]
    in v's dtype and :class:`AttentionRows` in float32 (float64 for float64 inputs).
    Tokens ``0..num_prefix_tokens-1`` are prefix tokens; the rest are patches.
    With ``keep_rows`` (R distinct query indices, negative from the end) it also returns
    ``kept`` [B, H, R, N]: the full attention rows a_i of those queries over all keys, in the
    order given, in the statistics' dtype.
    """
    n = q.shape[-2]
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, {n - 1}], got {num_prefix_tokens}")
    kept_index = None if keep_rows is None else keep_row_indices(keep_rows, n)
    dtype = accumulation_dtype(q.dtype, k.dtype, v.dtype)
    logits = attention_logits(q.to(dtype), k.to(dtype), scale, bias)
    attn = logits.softmax(dim=-1)
    out = torch.matmul(attn, v.to(dtype)).to(v.dtype)

    patch_logits = logits[..., num_prefix_tokens:]
    log_p = patch_logits.log_softmax(dim=-1)
    p = log_p.exp()
    # exact Shannon entropy of the renormalised patch attention, 0·log 0 = 0, from the log-probabilities
    patch_entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    rows = AttentionRows(
        self_attn=attn.diagonal(dim1=-2, dim2=-1),
        cls_attn=attn[..., 0] if num_prefix_tokens > 0 else None,
        patch_mass=attn[..., num_prefix_tokens:].sum(-1),
        patch_entropy=patch_entropy,
    )
    if kept_index is None:
        return out, rows
    return out, rows, attn[..., list(kept_index), :]


def softmax_pool(tokens: Tensor, logits: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax-weighted pooling with given logits: ``s = softmax_n(logits)``, ``pooled = Σ_n s_n z_n``.

    tokens [B, N, D]; logits [B, K, N] → (pooled [B, K, D], scores [B, K, N]), or logits [B, N] →
    ([B, D], [B, N]). ``mask`` [B, N] bool (True = keep): masked tokens get zero weight. A row
    with every token masked gives NaN, like softmax over all −inf.
    """
    if logits.dim() == 2:
        pooled, scores = softmax_pool(tokens, logits[:, None], mask)
        return pooled[:, 0], scores[:, 0]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    scores = logits.softmax(dim=-1)
    pooled = torch.einsum("bkn,bnd->bkd", scores.to(tokens.dtype), tokens)
    return pooled, scores


def abmilp_pool(
    tokens: Tensor, weight: Tensor, bias: Tensor | float = 0.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """AbMILP pooling (Eq. 5): ``s = softmax_i(z_i·w + b)``, ``pooled = Σ_i s_i z_i``.

    tokens [B, N, D]; weight [D] → (pooled [B, D], scores [B, N]), or weight [K, D] with
    bias [K] → (pooled [B, K, D], scores [B, K, N]). ``mask`` [B, N] bool (True = keep) gives
    masked tokens zero weight. Differentiable in all inputs.
    """
    if weight.dim() == 1:
        pooled, scores = abmilp_pool(tokens, weight[None], torch.as_tensor(bias).reshape(1), mask)
        return pooled[:, 0], scores[:, 0]
    if weight.dim() != 2 or weight.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"weight must be [D] or [K, D] with D={tokens.shape[-1]}, got {tuple(weight.shape)}")
    bias = torch.as_tensor(bias, dtype=tokens.dtype, device=tokens.device)
    logits = torch.einsum("bnd,kd->bkn", tokens, weight.to(tokens.dtype)) + bias.reshape(-1, 1)
    return softmax_pool(tokens, logits, mask)


@torch.no_grad()
def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> None:
    """One LARS update in place, parameter by parameter (the MAE codebase's semantics).

    For parameters with ndim > 1: ``g += wd·p``, then g is scaled by the trust ratio
    ``tc·‖p‖/‖g‖`` when both norms are positive. 1-D parameters (biases, norms) get
    neither. Then ``mu = momentum·mu + g`` and ``p -= lr·mu``.
    """
    for p, g, mu in zip(params, grads, momentum_buffers):
        d = g.clone()
        if p.ndim > 1:
            d = d.add(p, alpha=weight_decay)
            param_norm = torch.linalg.vector_norm(p)
            update_norm = torch.linalg.vector_norm(d)
            ratio = torch.where(
                (param_norm > 0) & (update_norm > 0),
                trust_coefficient * param_norm / update_norm,
                torch.ones_like(param_norm),
            )
            d = d * ratio
        mu.mul_(momentum).add_(d)
        p.add_(mu, alpha=-lr)
