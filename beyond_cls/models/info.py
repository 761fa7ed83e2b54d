"""What the package reads off a built encoder: :class:`EncoderInfo` (token layout, size, how it was loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

__all__ = ["EncoderInfo", "encoder_info"]


@dataclass(frozen=True)
class EncoderInfo:
    """Token layout and size of a ViT encoder: tokens are [cls?, registers..., patches (row-major)]."""

    name: str
    num_prefix_tokens: int
    has_class_token: bool
    num_patches: int
    grid_size: tuple[int, int]
    embed_dim: int
    num_heads: int
    depth: int
    checkpoint: str | None = None
    checkpoint_format: str | None = None
    source: str | None = None  # the sub-model of a training checkpoint that was loaded
    block: int | None = None  # default token source for probing: None = the last block
    final_norm: bool = False  # apply the final norm to probed tokens (the paper does not)
    mean: tuple[float, ...] | None = None  # input normalization (None: ImageNet's)
    std: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()  # what loading dropped or folded (hf: models), recorded with the run

    @property
    def num_reg_tokens(self) -> int:
        """Register tokens among the prefix tokens."""
        return self.num_prefix_tokens - int(self.has_class_token)

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the blocks."""
        return self.num_prefix_tokens + self.num_patches


def encoder_info(
    model: nn.Module, name: str | None = None, checkpoint: str | Path | None = None
) -> EncoderInfo:
    """Read an :class:`EncoderInfo` off a timm VisionTransformer, Beit or Eva model."""
    patch_embed = getattr(model, "patch_embed", None)
    blocks = getattr(model, "blocks", None)
    if patch_embed is None or blocks is None or not hasattr(model, "num_prefix_tokens") or len(blocks) == 0:
        raise TypeError(
            f"{type(model).__name__} is not a ViT-style timm model "
            "(needs patch_embed, blocks and num_prefix_tokens)"
        )
    if name is None:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    has_cls = getattr(model, "has_class_token", None)
    if has_cls is None:  # Beit and Eva keep only the parameter
        has_cls = getattr(model, "cls_token", None) is not None
    grid = tuple(int(g) for g in patch_embed.grid_size)
    return EncoderInfo(
        name=name,
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_class_token=bool(has_cls),
        num_patches=int(patch_embed.num_patches),
        grid_size=(grid[0], grid[1]),
        embed_dim=int(model.embed_dim),
        num_heads=int(blocks[0].attn.num_heads),
        depth=len(blocks),
        checkpoint=None if checkpoint is None else str(checkpoint),
    )
