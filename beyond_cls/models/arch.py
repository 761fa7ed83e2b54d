"""Architecture strings (``NAME[:heads=N]``) and the checks a built encoder must pass (input size, block).

Weights do not say how many attention heads a ViT has, and some encoders differ from timm's default
for their size: MoCo-v3's ViT-S has 12 heads where timm's ``vit_small_*`` has 6. ``--arch
vit_small_patch16_224:heads=12`` states it (``parse_arch``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["ARCH_OPTIONS", "check_block", "check_img_size", "parse_arch"]

#: ``NAME:option=value`` options of an architecture string -> timm ``create_model`` argument.
ARCH_OPTIONS = {"heads": "num_heads"}


def parse_arch(text: str) -> tuple[str, dict[str, Any]]:
    """``"vit_small_patch16_224:heads=12"`` -> ``("vit_small_patch16_224", {"num_heads": 12})``."""
    name, sep, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    if not sep:
        return name, kwargs
    usage = f"architecture {text!r}: expected NAME:heads=N (e.g. vit_small_patch16_224:heads=12)"
    if not name or not rest:
        raise ValueError(usage)
    for item in rest.split(","):
        key, eq, value = item.strip().partition("=")
        if key not in ARCH_OPTIONS or not eq:
            raise ValueError(f"{usage}; unknown option {item.strip()!r}")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"architecture {text!r}: {key} must be a positive integer, got {value!r}")
        kwargs[ARCH_OPTIONS[key]] = int(value)
    return name, kwargs


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def check_img_size(model: nn.Module, arch: str) -> None:
    """ValueError unless the input size is at least one patch and a whole number of patches per side."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or getattr(embed, "img_size", None) is None or getattr(embed, "patch_size", None) is None:
        return
    size, patch = _pair(embed.img_size), _pair(embed.patch_size)
    shown = f"{size[0]}" if size[0] == size[1] else f"{size[0]}x{size[1]}"
    for s, p in zip(size, patch):
        if s < p:
            raise ValueError(f"img_size {shown} is smaller than one {p}-pixel patch of {arch}; use at least {p}")
        if s % p:
            low, high = s // p * p, (s // p + 1) * p
            raise ValueError(f"img_size {shown} is not a multiple of {arch}'s patch size {p}: use {low} or {high}")


def check_block(block: int | None, depth: int, name: str) -> None:
    """ValueError unless ``block`` is None, -1 (the last) or an index 0..depth-1 of ``name``'s blocks."""
    if block is None or block == -1 or (isinstance(block, int) and 0 <= block < depth):
        return
    raise ValueError(f"block {block} does not exist: {name} has blocks 0..{depth - 1} (-1 = the last)")
