"""Official checkpoint layouts that load into timm's plain ``VisionTransformer``: MAE, MaskFeat, I-JEPA, MoCo-v3.

Also the helpers the other ViT layouts share (DINO and iBOT in ``formats_distill.py``, DINOv2 in
``formats_dinov2.py``): reading a file's keys for detection, picking a sub-model of a training
checkpoint, and the timm arguments a converted state dict implies. Facts per layout: ``encoders.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from beyond_cls.models.checkpoint import (
    CheckpointError,
    CheckpointFormat,
    extract_state_dict,
    register_checkpoint_format,
)

__all__ = ["entry_keys", "flat_keys", "submodel_state_dict", "vit_model_kwargs"]


# ------------------------------------------------------------------------------------------- helpers


def flat_keys(obj: Any) -> set[str] | None:
    """The keys of ``obj`` when it is a flat dict of tensors (a bare state dict), else ``None``."""
    if not isinstance(obj, Mapping) or not obj:
        return None
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return None
    return set(obj)


def entry_keys(obj: Any, *names: str) -> set[str]:
    """String keys of the first of ``obj[name]`` that is a dict (empty when there is none)."""
    if not isinstance(obj, Mapping):
        return set()
    for name in names:
        entry = obj.get(name)
        if isinstance(entry, Mapping):
            return {k for k in entry if isinstance(k, str)}
    return set()


def _any_prefix(keys: Iterable[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def submodel_state_dict(
    obj: Any, key: str | None, source: str | None, path: str | Path | None, sources: tuple[str, ...]
) -> dict[str, Tensor]:
    """Weights of one sub-model of a training checkpoint whose top-level keys are ``sources``.

    A full checkpoint (holding any of ``sources``) gives ``obj[source or sources[0]]``; a file that
    holds one model (flat, or under ``model``/``state_dict``...) is used as is, where ``source`` makes
    no sense. An explicit ``key`` names the entry directly.
    """
    if key is not None:
        if source is not None and source != key:
            raise ValueError(f"pass either key={key!r} or source={source!r}, not both")
        return extract_state_dict(obj, path, key)
    if isinstance(obj, Mapping) and any(s in obj for s in sources):
        return extract_state_dict(obj, path, source or sources[0])
    if source is not None:
        raise CheckpointError(
            path, f"holds a single model, so source={source!r} does not apply (it picks one of {list(sources)} "
            "in a full training checkpoint)"
        )
    return extract_state_dict(obj, path)


def vit_model_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments implied by a state dict in timm layout.

    Token layout (``class_token``, ``reg_tokens``, ``no_embed_class`` when registers have no position
    rows, as in DINOv2), layer scale (``init_values``, any value: the checkpoint overwrites it) and
    pooling: [cls] models with ``norm.*`` use ``global_pool='token'``; no-[cls] models
    ``global_pool='avg', fc_norm=False`` (I-JEPA); checkpoints with ``fc_norm.*`` instead of ``norm.*``
    (MAE fine-tuned with global pooling) ``global_pool='avg', fc_norm=True``.
    """
    has_cls = "cls_token" in sd
    reg = sd.get("reg_token")
    num_reg = int(reg.shape[1]) if isinstance(reg, Tensor) and reg.ndim == 3 else 0
    kwargs: dict[str, Any] = {
        "class_token": has_cls,
        "reg_tokens": num_reg,
        "no_embed_class": num_reg > 0,
        "init_values": 1e-5 if any(k.endswith(".ls1.gamma") for k in sd) else None,
    }
    if "fc_norm.weight" in sd and "norm.weight" not in sd:
        kwargs |= {"global_pool": "avg", "fc_norm": True}
    elif has_cls:
        kwargs |= {"global_pool": "token", "fc_norm": False}
    else:
        kwargs |= {"global_pool": "avg", "fc_norm": False}
    return kwargs


# ----------------------------------------------------------------------------------------------- MAE

_MIM_OTHER_FAMILIES = ("encoder.", "rel_pos_bias.", "lm_head.", "cls_pt_layers.")


def _looks_like_mae(obj: Any) -> bool:
    """``{'model': ViT sd}`` (pretrain: encoder only or with decoder; fine-tune), or a flat dict with MAE's decoder."""
    keys = entry_keys(obj, "model")
    if keys:
        return "pos_embed" in keys and "patch_embed.proj.weight" in keys and not _any_prefix(keys, *_MIM_OTHER_FAMILIES)
    keys = flat_keys(obj) or set()
    return "pos_embed" in keys and _any_prefix(keys, "decoder_")


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
    return bool(keys) and _any_prefix(keys, "blocks.", "patch_embed.")


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
    return _any_prefix(keys, "module.base_encoder.", "base_encoder.")


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
