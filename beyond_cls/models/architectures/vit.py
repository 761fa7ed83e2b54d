"""timm's ``VisionTransformer`` (MAE, DINO, iBOT, MoCo-v3, I-JEPA, DINOv2, MaskFeat): timm builds it by name."""

from __future__ import annotations

from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from beyond_cls.models.architectures.attention import AttentionAdapter, Projected, fused_qkv, mask_to_bias
from beyond_cls.models.architectures.registry import Architecture, register_architecture

__all__ = ["project_vit"]


def project_vit(module: Attention, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Projected:
    """timm ``Attention``: fused qkv (optional q/k norm, gate, mask)."""
    gate = module.gate(x).sigmoid() if getattr(module, "gate", None) is not None else None
    q, k, v = fused_qkv(module, x)
    q, k = module.q_norm(q), module.k_norm(k)
    return Projected(q, k, v, mask_to_bias(x.shape[1], v, attn_mask, is_causal), gate)


register_architecture(
    Architecture(
        "vit",
        models=(VisionTransformer,),
        attention={Attention: AttentionAdapter(project_vit)},
        timm_prefixes=("vit",),
    )
)
