"""The official DINOv2 layout (``dinov2_vit*14[_reg4]_pretrain.pth``) and DINOv2's position interpolation.

The files are flat state dicts with DINOv2's own names, which are timm's except: ``mask_token``
(dropped), ``register_tokens`` (timm ``reg_token``), SwiGLU ``mlp.w12/w3`` (ViT-g; timm
``mlp.fc1/fc2``) and, for training checkpoints saved with ``block_chunks``, ``blocks.<chunk>.<i>.``
(timm ``blocks.<i>.``). With registers, DINOv2 adds ``pos_embed[:, 0]`` to the [cls] token only and
gives registers no position, so the cls row is folded into ``cls_token`` and timm's
``no_embed_class=True`` layout (position rows for patches only) reproduces it exactly.

Position embeddings are stored for a 37x37 grid (518 px). At another grid DINOv2 interpolates at
run time, and the hub models do it in two different ways (``dinov2/hub/backbones.py``):

- without registers: ``interpolate_offset=0.1``, ``interpolate_antialias=False`` — bicubic with
  ``scale_factor = (new + 0.1) / old`` per axis, not a target size;
- with registers: ``interpolate_offset=0``, ``interpolate_antialias=True`` — bicubic to the target
  size with antialiasing (what timm also does).

:func:`dinov2_resample_pos_embed` does the same once at load time for the model's grid, so a timm
model at 224 px gives the original model's outputs at 224 px (timm's own resampling would not for
the plain models). A timm model built with ``dynamic_img_size=True`` resamples at run time with
timm's method instead, so only its load-time grid is exact.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from beyond_cls.models.formats.common import flat_keys, vit_model_kwargs
from beyond_cls.models.formats.registry import CheckpointFormat, register_checkpoint_format

__all__ = ["dinov2_resample_pos_embed"]

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")


def dinov2_resample_pos_embed(
    pos_embed: Tensor, new_size: tuple[int, int], old_size: tuple[int, int], num_prefix_tokens: int
) -> Tensor:
    """Resample ``pos_embed`` (1, prefix + H*W, D) from ``old_size`` to ``new_size`` as DINOv2's hub models do.

    A cls row in the table (``num_prefix_tokens`` = 1: the models without registers) selects the
    scale-factor interpolation with offset 0.1 and no antialiasing; no prefix rows (registers, cls row
    folded into the token) select size-based interpolation with antialiasing. Prefix rows are kept.
    Computed in float32 and returned in the input dtype, like DINOv2.
    """
    offset, antialias = (0.1, False) if num_prefix_tokens > 0 else (0.0, True)
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((new_size[0] + offset) / old_size[0], (new_size[1] + offset) / old_size[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=tuple(new_size), mode="bicubic", antialias=antialias)
    if tuple(grid.shape[-2:]) != tuple(new_size):
        raise ValueError(f"DINOv2 interpolation gave a {tuple(grid.shape[-2:])} grid, expected {tuple(new_size)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((prefix.float(), grid), dim=1).to(pos_embed.dtype)


def _convert_dinov2(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        k = _CHUNKED_BLOCK.sub(r"blocks.\1.", k)
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos = out.get("pos_embed")
        if pos is not None and "cls_token" in out:
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
    return out


def _looks_like_dinov2(obj: Any) -> bool:
    keys = flat_keys(obj) or set()
    return {"mask_token", "cls_token", "pos_embed"} <= keys and not any(k.startswith("decoder") for k in keys)


register_checkpoint_format(
    CheckpointFormat(
        "dinov2",
        "facebookresearch/dinov2 hub files (flat, ± register_tokens): mask token dropped, registers folded into "
        "timm's reg_token/no_embed_class layout, position embedding resampled the way DINOv2 interpolates",
        drop=("mask_token",),
        convert=_convert_dinov2,
        detect=_looks_like_dinov2,
        model_kwargs=vit_model_kwargs,
        resample_pos_embed=dinov2_resample_pos_embed,
    )
)
