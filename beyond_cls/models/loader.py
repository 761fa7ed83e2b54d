"""Build a frozen timm ViT encoder and load a checkpoint into it strictly."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

import timm
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import Tensor, nn

from beyond_cls.models.checkpoint import (
    CheckpointError,
    CheckpointFormat,
    adapt_checkpoint,
    read_checkpoint,
    resolve_checkpoint_format,
)

__all__ = [
    "EncoderInfo",
    "create_encoder",
    "encoder_info",
    "load_encoder",
    "load_encoder_checkpoint",
    "resize_position_tables",
]

# Arguments load_encoder sets itself; passing them through **model_kwargs would download or add a head.
_RESERVED_KWARGS = ("pretrained", "checkpoint_path", "num_classes")


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


def create_encoder(name: str, img_size: int | tuple[int, int] | None = None, **model_kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, ...)`` with readable errors."""
    reserved = [k for k in _RESERVED_KWARGS if k in model_kwargs]
    if reserved:
        raise ValueError(
            f"load_encoder sets {reserved} itself (no downloads, no classifier head); "
            "pass weights with checkpoint=<file>"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown timm model {name!r}{hint}. List candidates with timm.list_models('*vit*'), "
            "timm.list_models('beit*') or timm.list_models('eva*')"
        )
    if img_size is not None:
        model_kwargs["img_size"] = img_size
    return timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)


def resize_position_tables(
    sd: dict[str, Tensor], model: nn.Module, path: str | Path | None = None
) -> dict[str, Tensor]:
    """Resample ``pos_embed`` and relative-position bias tables in ``sd`` to ``model``'s patch grid.

    The absolute embedding keeps its prefix rows (none when ``model.no_embed_class``) and is resized
    bicubically with timm's ``resample_abs_pos_embed``; BEiT-style tables use ``resize_rel_pos_bias_table``.
    Entries whose shape differs in any other way are left for the shape check.
    """
    out = dict(sd)
    target = getattr(model, "pos_embed", None)
    pos = out.get("pos_embed")
    if (
        isinstance(target, Tensor)
        and pos is not None
        and pos.shape != target.shape
        and pos.ndim == 3
        and pos.shape[0] == 1
        and pos.shape[-1] == target.shape[-1]
    ):
        num_prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        n_old = pos.shape[1] - num_prefix
        side = math.isqrt(max(n_old, 0))
        if n_old <= 0 or side * side != n_old:
            raise CheckpointError(
                path,
                f"pos_embed {tuple(pos.shape)} minus {num_prefix} prefix rows is not a square grid; "
                f"cannot resample it to the model's {tuple(model.patch_embed.grid_size)} grid",
            )
        out["pos_embed"] = resample_abs_pos_embed(
            pos,
            new_size=list(model.patch_embed.grid_size),
            old_size=[side, side],
            num_prefix_tokens=num_prefix,
        )
    for key, table in sd.items():
        if not key.endswith("relative_position_bias_table"):
            continue
        owner = key.rpartition(".")[0]
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue  # reported as unexpected
        want = getattr(module, "relative_position_bias_table", None)
        window = getattr(module, "window_size", None)
        if not isinstance(want, Tensor) or window is None or table.shape == want.shape:
            continue
        if table.ndim != want.ndim or table.shape[-1] != want.shape[-1]:
            continue  # reported by the shape check
        try:
            out[key] = resize_rel_pos_bias_table(
                table, new_window_size=tuple(window), new_bias_shape=tuple(want.shape)
            )
        except (ValueError, AssertionError) as err:
            raise CheckpointError(
                path, f"cannot resize {key} {tuple(table.shape)} to {tuple(want.shape)}: {err}"
            ) from err
    return out


def _check_fit(sd: dict[str, Tensor], model: nn.Module, name: str, fmt: str, path: str | Path) -> None:
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
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    raise CheckpointError(path, "\n".join(lines), missing=missing, unexpected=unexpected)


def load_encoder_checkpoint(
    model: nn.Module,
    checkpoint: str | Path,
    checkpoint_format: str | CheckpointFormat = "auto",
    key: str | None = None,
    name: str | None = None,
) -> None:
    """Read ``checkpoint``, adapt it to timm layout and load it into ``model`` strictly.

    Non-persistent buffers in the file (e.g. ``relative_position_index``) are ignored since the model
    rebuilds them; every other leftover or missing key, or wrong shape, raises one :class:`CheckpointError`.
    """
    obj = read_checkpoint(checkpoint)
    fmt = (
        checkpoint_format
        if isinstance(checkpoint_format, CheckpointFormat)
        else resolve_checkpoint_format(obj, checkpoint_format)
    )
    sd = adapt_checkpoint(obj, checkpoint, fmt, key=key)
    del obj
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    sd = {k: v for k, v in sd.items() if k not in non_persistent}
    sd = resize_position_tables(sd, model, checkpoint)
    _check_fit(sd, model, name or type(model).__name__, fmt.name, checkpoint)
    model.load_state_dict(sd, strict=True)


def load_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    checkpoint_format: str = "auto",
    img_size: int | tuple[int, int] | None = None,
    *,
    checkpoint_key: str | None = None,
    **model_kwargs,
) -> nn.Module:
    """Build timm model ``name`` without a head, load ``checkpoint`` into it and freeze it.

    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``depth``, ``class_token=False``,
    ``global_pool="avg"``, ``reg_tokens=4``). ``checkpoint_format`` is a key of
    :data:`~beyond_cls.models.checkpoint.CHECKPOINT_FORMATS` or ``"auto"``; ``checkpoint_key`` picks a
    top-level entry such as ``"teacher"``. Position embeddings are resampled to the model's grid.
    Returns the model in eval mode with ``requires_grad=False`` everywhere and its
    :class:`EncoderInfo` as ``model.beyond_cls_info``.
    """
    model = create_encoder(name, img_size=img_size, **model_kwargs)
    info = encoder_info(model, name=name, checkpoint=checkpoint)  # fails early for non-ViT models
    if checkpoint is not None:
        load_encoder_checkpoint(model, checkpoint, checkpoint_format, key=checkpoint_key, name=name)
    model.eval()
    model.requires_grad_(False)
    model.beyond_cls_info = info
    return model
