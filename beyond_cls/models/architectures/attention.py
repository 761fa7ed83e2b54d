"""What the attention recorder needs from an attention module: its q, k, v and its output path.

An :class:`AttentionAdapter` replays a module's own projection (qkv bias, separate q/v biases, q/k
norm, RoPE, grouped kv heads, relative position bias, masks) as a :class:`Projected`, so the fused
op can compute attention and its statistics, and then finishes the output as the module does (scale
norm, gate, projection). Each architecture module registers one adapter per attention class; the
helpers here are what the families share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionAdapter", "Projected", "finish", "fused_qkv", "mask_to_bias", "split_heads"]


def _as_dtype_of(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


@dataclass
class Projected:
    """One attention call, ready for the fused op: q, k, v [B, H, N, d] and an additive bias.

    q and k are cast to v's dtype: under CUDA autocast a q/k norm (LayerNorm runs in float32 there) hands
    float32 q and k next to a bf16 v; the model's own SDPA call casts all three to the autocast dtype, and the
    fused op takes one dtype.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    bias: Tensor | None = None
    gate: Tensor | None = None

    def __post_init__(self) -> None:
        self.q, self.k = _as_dtype_of(self.q, self.v), _as_dtype_of(self.k, self.v)


def mask_to_bias(n: int, like: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """SDPA mask semantics as an additive bias (boolean True = attend; is_causal wins)."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, N, heads*d] -> [B, heads, N, d]."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, t.shape[-1] // heads).transpose(1, 2)  # explicit: empty batches too


def fused_qkv(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v from a fused qkv Linear, with BEiT/EVA-style separate q/k/v biases if present."""
    q_bias = getattr(module, "q_bias", None)
    if q_bias is None:
        qkv = module.qkv(x)
    else:
        bias = torch.cat((q_bias, module.k_bias, module.v_bias))
        if getattr(module, "qkv_bias_separate", False):
            qkv = module.qkv(x) + bias
        else:
            qkv = F.linear(x, weight=module.qkv.weight, bias=bias)
    b, n, _ = x.shape
    heads = module.num_heads
    q, k, v = qkv.reshape(b, n, 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def finish(module: nn.Module, out: Tensor, gate: Tensor | None) -> Tensor:
    """The usual output path after attention: merge heads, scale norm, gate, projection, dropout."""
    b, _, n, _ = out.shape
    x = out.transpose(1, 2).reshape(b, n, out.shape[1] * out.shape[3])
    norm = getattr(module, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    x = module.proj(x)
    drop = getattr(module, "proj_drop", None)
    return x if drop is None else drop(x)


#: ``project(module, x, *forward_args, **forward_kwargs) -> Projected``: the module's forward arguments.
Projector = Callable[..., Projected]
#: ``finish(module, attention_output [B, H, N, d], gate) -> module output [B, N, D]``.
Finisher = Callable[[nn.Module, Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class AttentionAdapter:
    """How the recorder runs one attention class: ``project`` its inputs, then ``finish`` the output."""

    project: Projector
    finish: Finisher = finish
