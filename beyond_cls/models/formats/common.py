"""What the official layouts share: picking the weights out of a loaded file, reading its keys for
detection, choosing a sub-model of a training checkpoint, and the timm ViT arguments a state dict implies.

Not a format: it registers nothing, and every format module may import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from beyond_cls.models.errors import CheckpointError

__all__ = [
    "STATE_DICT_KEYS",
    "any_prefix",
    "entry_keys",
    "extract_state_dict",
    "flat_keys",
    "submodel_state_dict",
    "vit_model_kwargs",
]

#: Top-level entries tried, in order, when no key is given and the file is not a flat state dict.
STATE_DICT_KEYS = ("model", "state_dict", "model_state", "module")


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _describe_keys(obj: Mapping) -> str:
    keys = [repr(k) for k in list(obj)[:20]]
    more = f", ... ({len(obj)} in all)" if len(obj) > 20 else ""
    return ", ".join(keys) + more if keys else "(none)"


def _strip_common_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def extract_state_dict(obj: Any, path: str | Path | None = None, key: str | None = None) -> dict[str, Tensor]:
    """Pick the tensor dict out of a loaded checkpoint and strip a DDP ``module.`` prefix.

    With ``key`` (e.g. ``"model"``, ``"teacher"``, ``"target_encoder"``) that entry is used; otherwise
    a flat dict of tensors is used as is, else the first of ``model``, ``state_dict``, ``model_state``,
    ``module`` that holds a dict of tensors. ``path`` only names the file in errors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                path, f"has no top-level key {key!r}; available keys: {_describe_keys(obj)}"
            )
        sd = obj[key]
        if not _is_tensor_dict(sd):
            raise CheckpointError(path, f"entry {key!r} is not a dict of tensors ({type(sd).__name__})")
    elif _is_tensor_dict(obj):
        sd = obj
    else:
        found = [k for k in STATE_DICT_KEYS if k in obj and _is_tensor_dict(obj[k])]
        if not found:
            raise CheckpointError(
                path,
                "no state dict found: it is not a flat dict of tensors and none of "
                f"{list(STATE_DICT_KEYS)} holds one; available keys: {_describe_keys(obj)}. "
                "Pass the key that holds the weights.",
            )
        sd = obj[found[0]]
    return _strip_common_prefix(dict(sd), "module.")


def flat_keys(obj: Any) -> set[str] | None:
    """The keys of ``obj`` when it is a flat dict of tensors (a bare state dict), else ``None``."""
    return set(obj) if _is_tensor_dict(obj) else None


def entry_keys(obj: Any, *names: str) -> set[str]:
    """String keys of the first of ``obj[name]`` that is a dict (empty when there is none)."""
    if not isinstance(obj, Mapping):
        return set()
    for name in names:
        entry = obj.get(name)
        if isinstance(entry, Mapping):
            return {k for k in entry if isinstance(k, str)}
    return set()


def any_prefix(keys: Iterable[str], *prefixes: str) -> bool:
    """Whether any key starts with one of ``prefixes``."""
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


