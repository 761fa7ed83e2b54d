"""Official checkpoint layouts that load into timm's plain ``VisionTransformer``: MAE, MaskFeat, I-JEPA, MoCo-v3.

Facts per layout: docs/models.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.formats.common import (
    any_prefix,
    entry_keys,
    extract_state_dict,
    flat_keys,
    submodel_state_dict,
    vit_model_kwargs,
)
from beyond_cls.models.formats.registry import CheckpointFormat, register_checkpoint_format

# ----------------------------------------------------------------------------------------------- MAE

_MIM_OTHER_FAMILIES = ("encoder.", "rel_pos_bias.", "lm_head.", "cls_pt_layers.")


def _looks_like_mae(obj: Any) -> bool:
    """``{'model': ViT sd}`` (pretrain: encoder only or with decoder; fine-tune), or a flat dict with MAE's decoder."""
    keys = entry_keys(obj, "model")
    if keys:
        return "pos_embed" in keys and "patch_embed.proj.weight" in keys and not any_prefix(keys, *_MIM_OTHER_FAMILIES)
    keys = flat_keys(obj) or set()
    return "pos_embed" in keys and any_prefix(keys, "decoder_")


register_checkpoint_format(
    CheckpointFormat(
        "mae",
        "facebookresearch/mae: {'model': sd}; pretrain files (encoder only, or with decoder_* and mask_token, "
        "dropped) and fine-tuned files (head.*, fc_norm.* with global pooling: global_pool='avg', fc_norm=True)",
        key="model",
        drop=("decoder*", "mask_token"),
        detect=_looks_like_mae,
        model_kwargs=vit_model_kwargs,
    )
)


# ------------------------------------------------------------------------------------------ MaskFeat


def _looks_like_maskfeat(obj: Any) -> bool:
    keys = entry_keys(obj, "model_state")
    return bool(keys) and any_prefix(keys, "blocks.", "patch_embed.")


register_checkpoint_format(
    CheckpointFormat(
        "maskfeat",
        "facebookresearch/SlowFast MaskFeat: {'model_state': sd}; the HOG head and mask token are dropped and "
        "the head's LayerNorm (pred_head.transforms.0.0) becomes the final norm",
        key="model_state",
        rename=(("pred_head.transforms.0.0.", "norm."),),
        drop=("mask_token", "pred_head.projections.*", "hogs.*"),
        detect=_looks_like_maskfeat,
        model_kwargs=vit_model_kwargs,
    )
)


# -------------------------------------------------------------------------------------------- I-JEPA

_IJEPA_SOURCES = ("target_encoder", "encoder")


def _looks_like_ijepa(obj: Any) -> bool:
    return isinstance(obj, Mapping) and ("target_encoder" in obj or ("encoder" in obj and "predictor" in obj))


def _ijepa_extract(obj: Any, key: str | None, source: str | None, path: str | Path | None) -> dict[str, Tensor]:
    return submodel_state_dict(obj, key, source, path, _IJEPA_SOURCES)


register_checkpoint_format(
    CheckpointFormat(
        "ijepa",
        "facebookresearch/ijepa: {'encoder', 'target_encoder', 'predictor', 'opt', ...} with module. prefixes; "
        "source='target_encoder' (default, the EMA encoder) or 'encoder' (context encoder, timm's tag); "
        "no [cls]: class_token=False, global_pool='avg', fc_norm=False",
        sources=_IJEPA_SOURCES,
        extract=_ijepa_extract,
        detect=_looks_like_ijepa,
        model_kwargs=vit_model_kwargs,
    )
)


# ------------------------------------------------------------------------------------------ MoCo-v3

_MOCO_SOURCES = ("base_encoder", "momentum_encoder")
_MOCO_PARTS = (*_MOCO_SOURCES, "predictor")


def _looks_like_mocov3(obj: Any) -> bool:
    keys = entry_keys(obj, "state_dict")
    return any_prefix(keys, "module.base_encoder.", "base_encoder.")


def _mocov3_extract(obj: Any, key: str | None, source: str | None, path: str | Path | None) -> dict[str, Tensor]:
    sd = extract_state_dict(obj, path, key)  # 'state_dict'; strips DDP's module.
    prefix = f"{source or _MOCO_SOURCES[0]}."
    if not any(k.startswith(prefix) for k in sd):
        raise CheckpointError(path, f"format 'mocov3': no key starts with 'module.{prefix}' or {prefix!r}")
    others = tuple(f"{p}." for p in _MOCO_PARTS if f"{p}." != prefix)
    # The other encoder and the predictor are dropped by name; any other key stays and is reported.
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items() if not k.startswith(others)}


def _mocov3_model_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """timm arguments of a MoCo-v3 encoder: its ViT-S (width 384) has 12 heads, not timm's 6 (moco-v3 ``vits.py``)."""
    kwargs = vit_model_kwargs(sd)
    cls = sd.get("cls_token")
    if isinstance(cls, Tensor) and cls.shape[-1] == 384:
        kwargs["num_heads"] = 12
    return kwargs


register_checkpoint_format(
    CheckpointFormat(
        "mocov3",
        "facebookresearch/moco-v3: {'state_dict': module.base_encoder.*, module.momentum_encoder.*, "
        "module.predictor.*}; source='base_encoder' (default) or 'momentum_encoder'; the projector head.* is dropped; "
        "a ViT-S (width 384) gets num_heads=12 as in moco-v3's vits.py",
        drop=("head.*",),
        sources=_MOCO_SOURCES,
        extract=_mocov3_extract,
        detect=_looks_like_mocov3,
        model_kwargs=_mocov3_model_kwargs,
    )
)
