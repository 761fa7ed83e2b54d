"""Build a frozen timm ViT encoder and load a checkpoint into it strictly."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import timm
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from torch import Tensor, nn

from beyond_cls.models.arch import check_block, check_img_size, parse_arch
from beyond_cls.models.architectures.registry import ARCHITECTURES, architecture_of, builder_for
from beyond_cls.models.checkpoint import AdaptedCheckpoint, prepare_checkpoint, wrong_format_hint
from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.fit import check_fit, check_values, size_hint
from beyond_cls.models.formats.registry import CheckpointFormat, PosEmbedResampler
from beyond_cls.models.zoo import find_weights, zoo_entry

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
    checkpoint_format: str | None = None
    source: str | None = None  # the sub-model of a training checkpoint that was loaded
    block: int | None = None  # default token source for probing: None = the last block
    final_norm: bool = False  # apply the final norm to probed tokens (the paper does not)
    mean: tuple[float, ...] | None = None  # input normalization (None: ImageNet's)
    std: tuple[float, ...] | None = None

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
    """The encoder architecture ``name`` without weights or classifier, with readable errors.

    A name a registered architecture builds itself (e.g. ``capi``) goes to its builder; any other to
    ``timm.create_model(name, pretrained=False, num_classes=0, ...)``.
    """
    _check_reserved(model_kwargs)
    return _create(name, img_size, 0, model_kwargs)


def _check_reserved(model_kwargs: dict) -> None:
    reserved = [k for k in _RESERVED_KWARGS if k in model_kwargs]
    if reserved:
        raise ValueError(
            f"load_encoder sets {reserved} itself (no downloads, no classifier head); "
            "pass weights with checkpoint=<file>"
        )


def _create(name: str, img_size: int | tuple[int, int] | None, num_classes: int, kwargs: dict) -> nn.Module:
    builder = builder_for(name)
    if builder is not None:
        return builder(img_size=img_size, num_classes=num_classes, **kwargs)
    if not timm.is_model(name):
        own = [n for a in ARCHITECTURES.values() for n in a.builders]
        close = difflib.get_close_matches(name, [*own, *timm.list_models()], n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown timm model {name!r}{hint}. List candidates with timm.list_models('*vit*'), "
            "timm.list_models('beit*') or timm.list_models('eva*')"
        )
    if img_size is not None:
        kwargs = {**kwargs, "img_size": img_size}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


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


def _fit_hints(ckpt: AdaptedCheckpoint, model: nn.Module, name: str) -> tuple[str, ...]:
    hints = [wrong_format_hint(ckpt.format, ckpt.detected),
             size_hint(ckpt.state_dict, model, name, ckpt.format.name, ckpt.model_kwargs)]
    if ckpt.model_kwargs:
        args = ", ".join(f"{k}={v!r}" for k, v in ckpt.model_kwargs.items())
        hints.append(f"this checkpoint needs a model created with {args}")
    head = getattr(model, "head", None)
    if not ckpt.keep_head and isinstance(head, nn.Linear):
        hints.append("the model has a classifier head: pass keep_head=True to load the checkpoint's head.* "
                     "(or build the model with num_classes=0)")
    return tuple(hints)


def load_encoder_checkpoint(
    model: nn.Module,
    checkpoint: str | Path | AdaptedCheckpoint,
    checkpoint_format: str | CheckpointFormat = "auto",
    key: str | None = None,
    name: str | None = None,
    *,
    source: str | None = None,
    keep_head: bool = False,
) -> CheckpointFormat:
    """Read ``checkpoint``, adapt it to timm layout and load it into ``model`` strictly.

    ``checkpoint`` is a file, or an :class:`AdaptedCheckpoint` from
    :func:`~beyond_cls.models.checkpoint.prepare_checkpoint` (then the format arguments were given
    there). ``source`` picks a sub-model of a training checkpoint (I-JEPA ``"target_encoder"``/
    ``"encoder"``, DINO/iBOT ``"teacher"``/``"student"``, MoCo-v3 ``"base_encoder"``/
    ``"momentum_encoder"``); ``keep_head=True`` also loads a fine-tuned classifier ``head.*`` (build the
    model with ``num_classes``). Position tables are resampled to the model's grid (with the format's
    own interpolation where it has one), and the model's architecture may adapt the weights last (a
    shared BEiT bias table is copied into per-block tables if the model has those). Non-persistent
    buffers in the file (e.g. ``relative_position_index``) are ignored since the model rebuilds them;
    every other leftover or missing key, wrong shape, NaN/Inf value or integer tensor for a float
    parameter raises one :class:`CheckpointError`. Returns the format used.
    """
    if isinstance(checkpoint, AdaptedCheckpoint):
        ckpt = checkpoint
        same_format = checkpoint_format in ("auto", ckpt.format, ckpt.format.name)
        if not same_format or key is not None or source is not None or keep_head:
            raise ValueError("pass checkpoint_format/key/source/keep_head to prepare_checkpoint, not here")
    else:
        ckpt = prepare_checkpoint(checkpoint, checkpoint_format, key=key, source=source, keep_head=keep_head)
    fmt, path = ckpt.format, ckpt.path
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    sd = {k: v for k, v in ckpt.state_dict.items() if k not in non_persistent}
    arch = architecture_of(model)
    if arch is not None and arch.prepare_state_dict is not None:
        sd = arch.prepare_state_dict(sd, model)
    check_values(sd, model, path)
    sd = resize_position_tables(sd, model, path, resample_pos_embed=fmt.resample_pos_embed)
    name = name or type(model).__name__
    check_fit(sd, model, name, fmt.name, path, _fit_hints(ckpt, model, name))
    model.load_state_dict(sd, strict=True)
    return fmt


def _build(arch: str, img_size: int | tuple[int, int] | None, num_classes: int, kwargs: dict) -> nn.Module:
    """The model, with a readable error for heads that do not divide the width or a bad input size."""
    _check_reserved(kwargs)
    try:
        model = _create(arch, img_size, num_classes, kwargs)
    except AssertionError as exc:  # timm asserts e.g. dim % num_heads == 0
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k == "num_heads")
        raise ValueError(f"cannot build {arch}" + (f" with {given}" if given else "") + f": {exc}") from None
    check_img_size(model, arch)
    return model


def load_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    checkpoint_format: str = "auto",
    arch: str | None = None,
    img_size: int | tuple[int, int] | None = 224,
    block: int | None = None,
    final_norm: bool | None = None,
    source: str | None = None,
    weights_dir: str | Path | None = None,
    keep_head: bool = False,
    checkpoint_key: str | None = None,
    **model_kwargs,
) -> nn.Module:
    """Build encoder ``name`` (a zoo name or any timm ViT/Beit/Eva name), load ``checkpoint``, freeze it.

    A zoo name (``beyond_cls.models.ZOO``) brings its architecture, checkpoint format, sub-model
    (``source``), normalization and token source; ``checkpoint=None`` then means its official file under
    ``weights_dir`` / ``$BEYOND_CLS_WEIGHTS`` (an error names the file and where to get it; nothing is
    downloaded). ``arch`` overrides the architecture (e.g. a DINO ViT-S/16: ``load_encoder("dino_vit_base_patch16",
    path, arch="vit_small_patch16_224")``); ``NAME:heads=N`` states a head count the weights cannot tell
    (MoCo-v3's ViT-S: ``vit_small_patch16_224:heads=12``). ``checkpoint_format`` is ``"auto"`` (detected from
    the keys) or a registered format; ``source`` picks a sub-model of a training checkpoint (I-JEPA ``target_encoder`` /
    ``encoder``, DINO/iBOT ``teacher`` / ``student``); ``keep_head`` keeps a fine-tuned classifier.
    ``model_kwargs`` go to ``timm.create_model`` after what the file needs (e.g. ``fc_norm`` of a
    fine-tuned MAE). ``block`` / ``final_norm`` set the default token source recorded in the returned
    model's :class:`EncoderInfo` (``model.beyond_cls_info``): the zoo's, else the last block without the
    final norm (the paper's features). The model is in eval mode with ``requires_grad=False``.
    """
    entry = zoo_entry(name)
    kwargs: dict = {}
    if entry is not None:
        kwargs.update(entry.kwargs())
        if checkpoint_format == "auto":
            checkpoint_format = entry.checkpoint_format
        source = source if source is not None else entry.source
        if checkpoint is None:
            try:
                checkpoint = find_weights(entry, weights_dir)
            except FileNotFoundError as exc:
                raise CheckpointError(None, str(exc)) from None
    ckpt = None
    if checkpoint is not None:
        ckpt = prepare_checkpoint(checkpoint, checkpoint_format, key=checkpoint_key, source=source,
                                  keep_head=keep_head)
        kwargs.update(ckpt.model_kwargs)
    architecture, arch_kwargs = parse_arch(arch or (entry.arch if entry is not None else name))
    kwargs.update(arch_kwargs)  # what the user states about the architecture wins over what the file implies
    kwargs.update(model_kwargs)
    model = _build(architecture, img_size, ckpt.num_classes if ckpt is not None else 0, kwargs)
    info = encoder_info(model, name=name, checkpoint=checkpoint)  # fails early for non-ViT models
    check_block(block, info.depth, name)
    if ckpt is not None:
        load_encoder_checkpoint(model, ckpt, name=name)
    model.eval()
    model.requires_grad_(False)
    model.beyond_cls_info = replace(
        info,
        block=block if block is not None else (entry.block if entry is not None else None),
        final_norm=final_norm if final_norm is not None else (entry.final_norm if entry is not None else False),
        source=source if ckpt is not None else None,
        checkpoint_format=ckpt.format.name if ckpt is not None else None,
        mean=tuple(entry.mean) if entry is not None else None,
        std=tuple(entry.std) if entry is not None else None,
    )
    return model
