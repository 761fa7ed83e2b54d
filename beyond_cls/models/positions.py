"""Position tables of a checkpoint resized to a model's patch grid (absolute embeddings, relative bias tables)."""

from __future__ import annotations

import math
from pathlib import Path

from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import Tensor, nn

from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.formats.registry import PosEmbedResampler

__all__ = ["resize_position_tables"]


def resize_position_tables(
    sd: dict[str, Tensor],
    model: nn.Module,
    path: str | Path | None = None,
    *,
    resample_pos_embed: PosEmbedResampler | None = None,
) -> dict[str, Tensor]:
    """Resample ``pos_embed`` and relative-position bias tables in ``sd`` to ``model``'s patch grid.

    The absolute embedding keeps its prefix rows (none when ``model.no_embed_class``) and is resized
    with ``resample_pos_embed(pos, new_grid, old_grid, num_prefix_rows)`` when given (a format's own
    interpolation, e.g. DINOv2's), else bicubically with timm's ``resample_abs_pos_embed``; BEiT-style
    tables use ``resize_rel_pos_bias_table``. Entries whose shape differs in any other way are left for
    the shape check.
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
        new_grid = (int(model.patch_embed.grid_size[0]), int(model.patch_embed.grid_size[1]))
        if resample_pos_embed is not None:
            out["pos_embed"] = resample_pos_embed(pos, new_grid, (side, side), num_prefix)
        else:
            out["pos_embed"] = resample_abs_pos_embed(
                pos, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=num_prefix
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
