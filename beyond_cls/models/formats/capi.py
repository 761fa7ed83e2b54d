"""The official CAPI layout (``capi_vitl14_*.pth``, facebookresearch/capi): the encoder of
:class:`~beyond_cls.models.architectures.capi.CapiVisionTransformer` under ``backbone.``, next to the
pretraining predictor and clustering head. Facts: docs/models.md.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.formats.registry import CheckpointFormat, register_checkpoint_format

__all__ = ["CAPI_CHECKPOINT_FORMAT", "adapt_capi_state_dict", "looks_like_capi_checkpoint"]

_BACKBONE_PREFIX = "backbone."
# Keys of the official backbone that belong to the pretraining predictor, not the encoder.
_PREDICTOR_KEYS = ("decoder.*", "mask_token", "dec_norm.*")
# Name pieces that FSDP, activation checkpointing and torch.compile insert into module paths.
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def adapt_capi_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The encoder's state dict out of an official CAPI file (``capi_vitl14_*.pth``).

    Keeps the ``backbone.`` keys, stripped (a dict already without that prefix is taken as the
    backbone), removes FSDP / activation-checkpointing / compile infixes, and drops the predictor
    (``decoder.*``, ``mask_token``, ``dec_norm``) and the clustering ``head.*``. What remains is meant to
    load into :class:`~beyond_cls.models.architectures.capi.CapiVisionTransformer` with ``strict=True``.
    """
    if any(k.startswith(_BACKBONE_PREFIX) for k in sd):
        out = {k[len(_BACKBONE_PREFIX) :]: v for k, v in sd.items() if k.startswith(_BACKBONE_PREFIX)}
    else:
        out = dict(sd)
    for infix in _WRAPPER_INFIXES:
        out = {k.replace(infix, ""): v for k, v in out.items()}
    drop = (*_PREDICTOR_KEYS, "head.*")
    out = {k: v for k, v in out.items() if not any(fnmatch.fnmatchcase(k, p) for p in drop)}
    if not any(k.startswith("encoder.blocks.") for k in out):
        shown = ", ".join(repr(k) for k in list(sd)[:8]) or "(none)"
        raise CheckpointError(
            None,
            f"not a CAPI checkpoint: no 'backbone.encoder.blocks.*' (or 'encoder.blocks.*') keys; first keys: {shown}",
        )
    return out


def looks_like_capi_checkpoint(obj: Any) -> bool:
    """True for a loaded object laid out like an official CAPI file (flat, ``backbone.encoder.blocks``)."""
    return isinstance(obj, Mapping) and any(
        isinstance(k, str) and k.startswith("backbone.encoder.blocks.") for k in obj
    )


#: The ``capi`` layout.
CAPI_CHECKPOINT_FORMAT = register_checkpoint_format(
    CheckpointFormat(
        "capi",
        "facebookresearch/capi: flat dict; 'backbone.' keys stripped, decoder, mask_token and head dropped",
        convert=adapt_capi_state_dict,
        detect=looks_like_capi_checkpoint,
        priority=10,
    )
)
