"""``load_encoder("hf:PATH")``: a Hugging Face ViT rebuilt as our timm encoder, its weights loaded strictly."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor, nn

from beyond_cls.models.arch import check_block, check_img_size
from beyond_cls.models.fit import check_fit, check_values
from beyond_cls.models.hf.families import HFFamily, bicubic_resampler, hf_family, resize_rel_pos_table
from beyond_cls.models.hf.mapping import map_hf_state_dict
from beyond_cls.models.hf.source import HF_PREFIX, read_hf_source
from beyond_cls.models.info import encoder_info
from beyond_cls.models.positions import resize_position_tables

__all__ = ["load_hf_encoder"]


def _resize_rel_tables(sd: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Relative position tables resized to the model's window the way ``transformers`` does at run time."""
    window = tuple(int(g) for g in model.patch_embed.grid_size)
    return {k: _resized(v, window) if k.endswith("relative_position_bias_table") else v for k, v in sd.items()}


def _resized(table: Tensor, window: tuple[int, ...]) -> Tensor:
    if table.ndim != 2 or table.shape[0] <= 3:
        return table  # left for the strict shape check
    try:
        return resize_rel_pos_table(table, (window[0], window[1]))
    except ValueError:
        return table


def _build(family: HFFamily, config: Any, img_size: int | tuple[int, int], spec: str) -> nn.Module:
    try:
        model = family.build(config, img_size)
    except (AssertionError, TypeError) as exc:  # timm asserts e.g. dim % num_heads == 0
        raise ValueError(f"cannot build {spec} ({family.name}): {exc}") from None
    check_img_size(model, spec)
    return model


def load_hf_encoder(
    spec: str,
    *,
    img_size: int | tuple[int, int] | None = 224,
    block: int | None = None,
    final_norm: bool | None = None,
) -> nn.Module:
    """Our encoder for ``spec`` = ``hf:PATH`` (a ``save_pretrained`` folder or a hub id in the local cache).

    The config's ``model_type`` picks the family; sizes, layer-norm eps, q/k/v biases, layer scale, registers /
    distillation token, position tables (resized to ``img_size`` as the family interpolates, None: the config's
    size) and relative position bias come from the folder. Unknown, missing or mis-shaped weights raise one
    :class:`CheckpointError`. ``beyond_cls_info`` carries ``preprocessor_config.json``'s ``image_mean/std`` and
    notes on what was dropped. Eval mode, ``requires_grad=False``.
    """
    path = spec[len(HF_PREFIX):]
    if not path:
        raise ValueError("--model hf:PATH needs a folder or a hub id (org/name) after 'hf:'")
    src = read_hf_source(path)
    family = hf_family(getattr(src.config, "model_type", None), spec)
    size = img_size if img_size is not None else src.config.image_size
    model = _build(family, src.config, size, spec)
    info = encoder_info(model, name=spec, checkpoint=src.weights)
    check_block(block, info.depth, spec)
    sd, notes = map_hf_state_dict(src.state_dict, family)
    if family.layout == "beit" and src.config.use_mean_pooling and not any(k.startswith("fc_norm.") for k in sd):
        model.fc_norm = nn.Identity()  # a base model saved without its pooler: no mean-pooling LayerNorm
        notes.append("no pooler.layernorm in the file: mean pooling has no LayerNorm")
    sd = _resize_rel_tables(sd, model)
    check_values(sd, model, src.weights)
    sd = resize_position_tables(sd, model, src.weights, resample_pos_embed=bicubic_resampler(family.antialias))
    fmt = f"hf:{family.model_type}"
    check_fit(sd, model, spec, fmt, src.weights)
    model.load_state_dict(sd, strict=True)
    if src.mean is not None:
        notes.append("image_mean/image_std from preprocessor_config.json")
    model.eval()
    model.requires_grad_(False)
    model.beyond_cls_info = replace(
        info, checkpoint_format=fmt, block=block, final_norm=bool(final_norm), mean=src.mean, std=src.std,
        notes=tuple(notes),
    )
    return model

