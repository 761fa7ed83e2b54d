"""timm's ``Eva`` (EVA-02) and other users of ``AttentionRope``: RoPE on the patch tokens; timm builds them."""

from __future__ import annotations

import torch
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import AttentionRope
from timm.models.eva import Eva, EvaAttention
from torch import Tensor, nn

from beyond_cls.models.architectures.attention import (
    AttentionAdapter,
    Projected,
    fused_qkv,
    mask_to_bias,
    split_heads,
)
from beyond_cls.models.architectures.registry import Architecture, register_architecture

__all__ = ["project_rope"]


def project_rope(
    module: nn.Module,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Projected:
    """timm's ``AttentionRope`` and ``EvaAttention``: fused or separate projections, RoPE on patches."""
    gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
    if module.qkv is not None:
        q, k, v = fused_qkv(module, x)
    else:
        kv_heads = getattr(module, "num_kv_heads", module.num_heads)
        q = split_heads(module.q_proj(x), module.num_heads)
        k = split_heads(module.k_proj(x), kv_heads)
        v = split_heads(module.v_proj(x), kv_heads)
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
    return Projected(q, k, v, mask_to_bias(x.shape[1], v, attn_mask, is_causal), gate)


register_architecture(
    Architecture(
        "eva",
        models=(Eva,),
        attention={EvaAttention: AttentionAdapter(project_rope), AttentionRope: AttentionAdapter(project_rope)},
        timm_prefixes=("eva02", "eva"),
    )
)
