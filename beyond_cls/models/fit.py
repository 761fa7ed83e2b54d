"""Why a checkpoint does not fit a model, in a few readable lines.

:func:`check_values` refuses NaN/Inf weights and integer/bool tensors for float parameters;
:func:`check_fit` lists missing, unexpected and mis-shaped keys (the first few of each, with counts)
and, when the file holds another size of ViT, says which one (:func:`describe_weights`) and which
timm or zoo name builds it. Attention heads are not stored in ViT weights (``qkv`` is ``3D x D``
for any head count), so the head count in a hint comes from timm's standard sizes, never the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from beyond_cls.models.architectures.registry import architecture_of
from beyond_cls.models.errors import CheckpointError

__all__ = ["WeightsShape", "check_fit", "check_values", "describe_weights", "first_few"]

#: Keys shown per list in an error; the rest are counted.
SHOWN = 5

# timm's standard ViT sizes: (width, depth) -> (short name, timm size word, heads).
_SIZES = {
    (192, 12): ("Ti", "tiny", 3),
    (384, 12): ("S", "small", 6),
    (768, 12): ("B", "base", 12),
    (1024, 24): ("L", "large", 16),
    (1280, 32): ("H", "huge", 16),
    (1408, 40): ("g", "giant", 16),
}
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_ZOO_SIZE = re.compile(r"_(tiny|small|base|large|huge|giant)_patch(\d+)")


def first_few(items: Sequence[str], sep: str = ", ", shown: int = SHOWN) -> str:
    """The first ``shown`` items joined, then ``... and N more``."""
    text = sep.join(items[:shown])
    return text + (f"{sep}... and {len(items) - shown} more" if len(items) > shown else "")


def _non_finite_note(t: Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if part)


def check_values(sd: Mapping[str, Tensor], model: nn.Module, path: str | Path | None = None) -> None:
    """One :class:`CheckpointError` naming every tensor with NaN/Inf, or integer/bool where the model has float."""
    expected = model.state_dict()
    wrong_dtype = [
        f"{k} ({str(v.dtype).removeprefix('torch.')})"
        for k, v in sd.items()
        if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    non_finite = [
        f"{k} ({_non_finite_note(v)})" for k, v in sd.items() if v.is_floating_point() and not bool(v.isfinite().all())
    ]
    problems = []
    if non_finite:
        problems.append(f"non-finite values in {len(non_finite)} tensor(s): {first_few(non_finite)}")
    if wrong_dtype:
        problems.append(f"integer/bool tensor(s) for float parameters ({len(wrong_dtype)}): {first_few(wrong_dtype)}")
    if problems:
        raise CheckpointError(path, "unusable weights: " + "; ".join(problems) + " (a damaged or non-weight file?)")


@dataclass(frozen=True)
class WeightsShape:
    """The ViT size a state dict holds (heads are not stored in the weights)."""

    width: int
    depth: int
    patch: tuple[int, int]
    grid: tuple[int, int] | None

    @property
    def size(self) -> tuple[str, str, int] | None:
        """(short name, timm size word, timm's heads) of a standard ViT size, else None."""
        return _SIZES.get((self.width, self.depth))

    def __str__(self) -> str:
        p = self.patch[0] if self.patch[0] == self.patch[1] else f"{self.patch[0]}x{self.patch[1]}"
        what = f"a ViT-{self.size[0]}/{p}" if self.size else "a ViT"
        grid = f", grid {self.grid[0]}x{self.grid[1]}" if self.grid else ""
        return f"{what} (width {self.width}, {self.depth} blocks, patch {p}{grid})"


def describe_weights(sd: Mapping[str, Tensor]) -> WeightsShape | None:
    """Width, depth, patch size and position grid of the ViT whose timm-layout weights ``sd`` holds."""
    conv = sd.get("patch_embed.proj.weight", sd.get("patch_embed.weight"))
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.search(k))}
    if not isinstance(conv, Tensor) or conv.ndim != 4 or not blocks:
        return None
    grid = None
    pos = sd.get("pos_embed")
    if isinstance(pos, Tensor) and pos.ndim == 3:
        reg = sd.get("reg_token")
        prefix = int("cls_token" in sd) + (int(reg.shape[1]) if isinstance(reg, Tensor) and reg.ndim == 3 else 0)
        for rows in (pos.shape[1] - prefix, pos.shape[1]):  # registers may have no position rows (DINOv2)
            side = int(rows**0.5 + 0.5) if rows > 0 else 0
            if side and side * side == rows:
                grid = (side, side)
                break
    return WeightsShape(int(conv.shape[0]), max(blocks) + 1, (int(conv.shape[2]), int(conv.shape[3])), grid)


def _model_shape(model: nn.Module) -> tuple[int, int, tuple[int, int]] | None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    blocks = getattr(model, "blocks", None)
    if patch is None or blocks is None or not hasattr(model, "embed_dim"):
        return None
    patch = (patch, patch) if isinstance(patch, int) else tuple(int(p) for p in patch)
    return int(model.embed_dim), len(blocks), patch


def _timm_name(shape: WeightsShape, sd: Mapping[str, Tensor], model: nn.Module) -> str | None:
    """A timm architecture of the file's size and token layout, if timm has one."""
    if shape.size is None or shape.patch[0] != shape.patch[1]:
        return None
    word, p = shape.size[1], shape.patch[0]
    arch = architecture_of(model)
    prefixes = arch.timm_prefixes if arch is not None else ("vit",)  # an unregistered class (timm ViT subclasses)
    suffixes = []
    reg = sd.get("reg_token")
    if isinstance(reg, Tensor) and reg.ndim == 3:
        suffixes.append(f"_reg{reg.shape[1]}_dinov2")
    if any(k.endswith(".ls1.gamma") for k in sd):
        suffixes.append("_dinov2")
    if "cls_token" not in sd:
        suffixes.append("_gap_224")
    if shape.grid:
        suffixes.append(f"_{shape.grid[0] * p}")
    suffixes.append("_224")
    for prefix in prefixes:
        for suffix in suffixes:
            if timm.is_model(name := f"{prefix}_{word}_patch{p}{suffix}"):
                return name
    return None


def _zoo_names(shape: WeightsShape, fmt: str) -> list[str]:
    from beyond_cls.models.zoo import ZOO

    if shape.size is None:
        return []
    want = (shape.size[1], str(shape.patch[0]))
    return [e.name for e in ZOO.values() if e.checkpoint_format == fmt and (m := _ZOO_SIZE.search(e.name))
            and m.groups() == want]


def size_hint(sd: Mapping[str, Tensor], model: nn.Module, name: str, fmt: str, model_kwargs: Mapping[str, Any]) -> str:
    """What the file holds and what builds it, when its ViT size differs from ``model``'s (else "")."""
    from beyond_cls.models.zoo import zoo_entry

    shape, have = describe_weights(sd), _model_shape(model)
    if shape is None or have is None or (shape.width, shape.depth, shape.patch) == have:
        return ""
    arch = _timm_name(shape, sd, model)
    tries = [f"{'--arch' if zoo_entry(name) else '--model'} {arch}"] if arch else []
    tries += [f"the zoo name {z}" for z in _zoo_names(shape, fmt) if z != name]
    heads = model_kwargs.get("num_heads") or (shape.size[2] if shape.size else None)
    usual = f" ({heads} for this size)" if heads else ""
    return (f"the file holds {shape}" + (f": try {' or '.join(tries)}" if tries else "")
            + f"; attention heads are not stored in the weights{usual}: state others with --arch NAME:heads=N")


def check_fit(
    sd: Mapping[str, Tensor], model: nn.Module, name: str, fmt: str, path: str | Path | None,
    hints: Sequence[str] = (),
) -> None:
    """Raise one :class:`CheckpointError` when ``sd`` does not fill ``model`` exactly (keys and shapes)."""
    expected = model.state_dict()
    missing = tuple(k for k in expected if k not in sd)
    unexpected = tuple(k for k in sd if k not in expected)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"does not fit timm model {name!r} (checkpoint_format {fmt!r}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {first_few(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {first_few(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {first_few(mismatched, '; ', 3)}")
    lines.extend(f"  hint: {h}" for h in hints if h)
    raise CheckpointError(path, "\n".join(lines), missing=missing, unexpected=unexpected)
