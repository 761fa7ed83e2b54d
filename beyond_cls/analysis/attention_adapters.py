"""How each timm (and CAPI) attention module computes q, k, v, and how its output is finished.

The recorder swaps an attention module's forward for one that projects exactly as the module
does (qkv bias, separate q/v biases, q/k norm, RoPE, grouped kv heads, BEiT relative position
bias, masks), runs :func:`beyond_cls.ops.attention_with_stats`, and applies the module's own
output path (scale norm, gate, projection). One adapter per attention class, in a registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention, AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from torch import Tensor, nn

from beyond_cls.models.capi import CapiAttention


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


def _as_dtype_of(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


def _mask_to_bias(
    n: int, like: Tensor, attn_mask: Tensor | None, is_causal: bool
) -> Tensor | None:
    """SDPA mask semantics as an additive bias (boolean True = attend; is_causal wins)."""
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))


def _split_heads(t: Tensor, heads: int) -> Tensor:
    b, n, _ = t.shape
    return t.reshape(b, n, heads, t.shape[-1] // heads).transpose(1, 2)  # explicit: empty batches too


def _fused_qkv(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def _project_vit(
    module: Attention, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Projected:
    gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
    q, k, v = _fused_qkv(module, x)
    q, k = _as_dtype_of(module.q_norm(q), v), _as_dtype_of(module.k_norm(k), v)
    return Projected(q, k, v, _mask_to_bias(x.shape[1], q, attn_mask, is_causal), gate)


def _project_rope(
    module: nn.Module,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Projected:
    """timm's AttentionRope and EvaAttention: fused or separate projections, RoPE on patches."""
    gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
    if module.qkv is not None:
        q, k, v = _fused_qkv(module, x)
    else:
        kv_heads = getattr(module, "num_kv_heads", module.num_heads)
        q = _split_heads(module.q_proj(x), module.num_heads)
        k = _split_heads(module.k_proj(x), kv_heads)
        v = _split_heads(module.v_proj(x), kv_heads)
    q, k = module.q_norm(q), module.k_norm(k)
    if rope is not None:
        p = module.num_prefix_tokens
        half = getattr(module, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    groups = getattr(module, "num_kv_groups", 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    q, k = _as_dtype_of(q, v), _as_dtype_of(k, v)  # after RoPE, as timm's forward
    return Projected(q, k, v, _mask_to_bias(x.shape[1], q, attn_mask, is_causal), gate)


def _project_beit(module: BeitAttention, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Projected:
    q, k, v = _fused_qkv(module, x)
    bias = None
    if module.relative_position_bias_table is not None:
        bias = module._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    return Projected(q, k, v, bias)


def _project_capi(module: CapiAttention, x: Tensor, coords: Tensor) -> Projected:
    """CAPI: the module's own projection, so q and k come rotated by its stored-frequency RoPE."""
    q, k, v = module.project(x, coords)
    return Projected(q, k, v)


def finish(module: nn.Module, out: Tensor, gate: Tensor | None) -> Tensor:
    """The module's output path after attention: merge heads, scale norm, gate, projection."""
    b, _, n, _ = out.shape
    x = out.transpose(1, 2).reshape(b, n, out.shape[1] * out.shape[3])
    norm = getattr(module, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    x = module.proj(x)
    drop = getattr(module, "proj_drop", None)  # CAPI's attention has none
    return x if drop is None else drop(x)


Projector = Callable[..., Projected]

# Exact classes only: a subclass may change the forward, so it must be registered on its own.
ADAPTERS: dict[type, Projector] = {
    Attention: _project_vit,
    AttentionRope: _project_rope,
    EvaAttention: _project_rope,
    BeitAttention: _project_beit,
    CapiAttention: _project_capi,
}


def adapter_for(module: nn.Module) -> Projector | None:
    """The projector of ``module``'s exact class, or None when it is not an attention we know."""
    return ADAPTERS.get(type(module))
