"""The ``transformers`` ViT families we rebuild as timm encoders: one :class:`HFFamily` per ``model_type``.

Each family builds a timm ``VisionTransformer`` (ViT, DeiT, ViT-MAE, I-JEPA, DINOv2 ± registers) or ``Beit``
(BEiT, Data2Vec-vision) from the config's sizes, and names how the family resizes its position tables to another
image size (read off ``transformers``' ``interpolate_pos_encoding`` and relative-position-bias code). The weight
mapping itself is in :mod:`beyond_cls.models.hf.mapping`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import QuickGELU, SwiGLUPacked
from timm.models.beit import Beit
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["HF_FAMILIES", "HFFamily", "bicubic_resampler", "hf_family", "resize_rel_pos_table"]

_ACTIVATIONS: dict[str, Callable[[], nn.Module] | type[nn.Module]] = {
    "gelu": nn.GELU,
    "gelu_new": partial(nn.GELU, approximate="tanh"),
    "gelu_pytorch_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def bicubic_resampler(antialias: bool) -> Callable[[Tensor, tuple[int, int], tuple[int, int], int], Tensor]:
    """``transformers``' ``interpolate_pos_encoding``: prefix rows kept, the grid resized bicubically to the new
    size (``align_corners=False``), in float32; ``antialias`` only for DINOv2 with registers."""

    def resample(pos: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix: int) -> Tensor:
        prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
        dim = grid.shape[-1]
        grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
        return torch.cat((prefix, grid), dim=1)

    return resample


def resize_rel_pos_table(table: Tensor, new_window: tuple[int, int]) -> Tensor:
    """BEiT/Data2Vec's relative position bias table at another window, as ``transformers`` resizes it at run time.

    The (2H-1)(2W-1) distance rows are resized bilinearly (``align_corners=False``); the 3 [cls] rows are kept.
    """
    rows = table.shape[0] - 3
    side = int(round(rows**0.5))
    if side * side != rows:
        raise ValueError(f"relative position table of {table.shape[0]} rows is not (2W-1)^2 + 3")
    new_h, new_w = 2 * new_window[0] - 1, 2 * new_window[1] - 1
    if (new_h, new_w) == (side, side):
        return table
    sub = table[:rows].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    sub = F.interpolate(sub.float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
    sub = sub.permute(0, 2, 3, 1).reshape(new_h * new_w, -1).to(table.dtype)
    return torch.cat((sub, table[rows:]), dim=0)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _activation(config: Any, family: str) -> Callable[[], nn.Module] | type[nn.Module]:
    act = getattr(config, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(f"{family}: hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def _ratio(hidden: int, dim: int) -> float:
    """An ``mlp_ratio`` timm turns into exactly ``hidden`` units (``int(dim * ratio)``)."""
    return (hidden + 0.5) / dim


@dataclass(frozen=True)
class HFFamily:
    """One ``transformers`` model type: its display name, base-model prefix, layout and our encoder for it.

    ``layout`` is ``"vit"`` (q/k/v with biases as the config says, layer norms ``layernorm_before/after``),
    ``"dinov2"`` (``norm1/2``, ``mlp.fc1/2`` or SwiGLU ``weights_in/out``, layer scale) or ``"beit"`` (no key
    bias, ``lambda_1/2`` layer scale, relative position bias). ``antialias``: its position interpolation.
    """

    model_type: str
    name: str
    prefix: str
    layout: str
    class_token: bool = True
    extra_tokens: str | None = None  # "distillation_token" (DeiT) or "register_tokens" (DINOv2 with registers)
    antialias: bool = False

    def build(self, config: Any, img_size: int) -> nn.Module:
        """Our encoder for ``config`` at ``img_size``, random weights, no head."""
        if getattr(config, "num_channels", 3) != 3:
            raise ValueError(f"{self.name}: num_channels {config.num_channels}; only RGB (3) encoders are supported")
        patch = _pair(config.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"{self.name}: non-square patches {patch} are not supported")
        dim, eps = int(config.hidden_size), float(config.layer_norm_eps)
        common = dict(img_size=img_size, patch_size=patch[0], num_classes=0, embed_dim=dim,
                      depth=int(config.num_hidden_layers), num_heads=int(config.num_attention_heads),
                      norm_layer=partial(nn.LayerNorm, eps=eps))
        if self.layout == "beit":
            return self._build_beit(config, common)
        kwargs: dict[str, Any] = dict(qkv_bias=bool(getattr(config, "qkv_bias", True)), class_token=self.class_token,
                                      global_pool="token" if self.class_token else "avg", fc_norm=False)
        if self.layout == "dinov2":
            kwargs["init_values"] = 1.0  # layer scale (the weights overwrite it)
            hidden = int(dim * config.mlp_ratio)
            if getattr(config, "use_swiglu_ffn", False):
                hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # transformers' Dinov2SwiGLUFFN
                kwargs |= dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=_ratio(2 * hidden, dim))
            else:
                kwargs |= dict(act_layer=_activation(config, self.name), mlp_ratio=_ratio(hidden, dim))
        else:
            kwargs |= dict(act_layer=_activation(config, self.name), mlp_ratio=_ratio(config.intermediate_size, dim))
        if self.extra_tokens == "distillation_token":
            kwargs["reg_tokens"] = 1  # [cls, dist] both with position rows: timm's reg_tokens with embed_class
        elif self.extra_tokens == "register_tokens":
            kwargs |= dict(reg_tokens=int(config.num_register_tokens), no_embed_class=True)
        return VisionTransformer(**common, **kwargs)

    def _build_beit(self, config: Any, common: dict[str, Any]) -> nn.Module:
        if getattr(config, "hidden_act", "gelu") != "gelu":
            raise ValueError(f"{self.name}: hidden_act {config.hidden_act!r} is not supported (timm's Beit: gelu)")
        scale = float(config.layer_scale_init_value)
        mean_pool = bool(config.use_mean_pooling)
        return Beit(**common, qkv_bias=True, mlp_ratio=_ratio(config.intermediate_size, config.hidden_size),
                    init_values=scale if scale > 0 else None, global_pool="avg" if mean_pool else "token",
                    use_fc_norm=mean_pool, use_abs_pos_emb=bool(config.use_absolute_position_embeddings),
                    use_rel_pos_bias=bool(config.use_relative_position_bias),
                    use_shared_rel_pos_bias=bool(config.use_shared_relative_position_bias))


_FAMILIES = [
    HFFamily("vit", "ViT", "vit", "vit"),
    HFFamily("deit", "DeiT", "deit", "vit", extra_tokens="distillation_token"),
    HFFamily("vit_mae", "ViT-MAE", "vit", "vit"),
    HFFamily("ijepa", "I-JEPA", "ijepa", "vit", class_token=False),
    HFFamily("dinov2", "DINOv2", "dinov2", "dinov2"),
    HFFamily("dinov2_with_registers", "DINOv2 with registers", "dinov2_with_registers", "dinov2",
             extra_tokens="register_tokens", antialias=True),
    HFFamily("beit", "BEiT", "beit", "beit"),
    HFFamily("data2vec-vision", "Data2Vec-vision", "data2vec_vision", "beit"),
]

#: Supported families by ``model_type`` (config.json).
HF_FAMILIES: dict[str, HFFamily] = {f.model_type: f for f in _FAMILIES}


def hf_family(model_type: str, where: str) -> HFFamily:
    """The family of ``model_type``, or ValueError naming the supported ones."""
    family = HF_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported; supported: {', '.join(HF_FAMILIES)}")
    return family
