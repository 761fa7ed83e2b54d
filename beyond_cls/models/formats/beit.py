"""Official layouts that load into timm's ``Beit``: SimMIM ViT-B and BEiT-v2 pretrained encoders.

Both use q/v biases, layer scale ``gamma_1/2``, no absolute position embedding and ONE relative
position bias table shared by all blocks (``rel_pos_bias.relative_position_bias_table``). The table
is kept under its own name and the model is built with ``use_shared_rel_pos_bias=True`` (what
``model_kwargs`` returns): timm then computes the bias once and adds it in every block exactly as the
original models do, and the checkpoint needs no rewriting. Loading into a Beit with per-block tables
(the arch default ``use_rel_pos_bias=True``) also works: the ``beit`` architecture copies the shared
table into every block, as BEiT's fine-tuning script does; the outputs are the same. Facts: docs/models.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from beyond_cls.models.architectures.beit import SHARED_TABLE
from beyond_cls.models.formats.common import entry_keys, flat_keys
from beyond_cls.models.formats.registry import CheckpointFormat, register_checkpoint_format

__all__ = ["beit_model_kwargs"]


def beit_model_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """timm ``Beit`` arguments implied by a state dict in timm layout.

    Position information (absolute ``pos_embed``, a shared table, per-block tables), layer scale
    (``init_values``, any value: the checkpoint overwrites it) and pooling (``global_pool='token'``
    when the final ``norm.*`` is present, since timm's ``'avg'`` would expect ``fc_norm.*``).
    """
    per_block = any(k.startswith("blocks.") and k.endswith(".attn.relative_position_bias_table") for k in sd)
    return {
        "use_abs_pos_emb": "pos_embed" in sd,
        "use_shared_rel_pos_bias": SHARED_TABLE in sd,
        "use_rel_pos_bias": per_block,
        "init_values": 0.1 if any(k.endswith(".gamma_1") for k in sd) else None,
        "global_pool": "token" if "norm.weight" in sd else "avg",
    }


def _looks_like_simmim(obj: Any) -> bool:
    keys = entry_keys(obj, "model")
    return "encoder.patch_embed.proj.weight" in keys and any(k.startswith("encoder.blocks.") for k in keys)


def _looks_like_beit_pretrain(obj: Any) -> bool:
    keys = entry_keys(obj, "model", "module") or flat_keys(obj) or set()
    pretrain_head = "lm_head.weight" in keys or any(k.startswith("cls_pt_layers.") for k in keys)
    return pretrain_head and any(k.endswith(".attn.q_bias") for k in keys)


register_checkpoint_format(
    CheckpointFormat(
        "simmim",
        "microsoft/SimMIM ViT: {'model': {encoder.*, decoder.0.*}, 'config': yacs CfgNode, ...}; encoder. stripped, "
        "mask token, decoder and relative_position_index dropped; timm Beit with a shared rel-pos bias",
        key="model",
        rename=(("encoder.", ""),),
        drop=("mask_token", "decoder.*", "*relative_position_index"),
        detect=_looks_like_simmim,
        model_kwargs=beit_model_kwargs,
    )
)

register_checkpoint_format(
    CheckpointFormat(
        "beitv2",
        "microsoft/unilm beit2 pretraining: {'model' (or 'module'): sd, 'args', ...}; mask token, lm_head, the "
        "cls_pt_* patch-aggregation head and relative_position_index dropped; timm Beit with a shared rel-pos bias",
        key="model",
        drop=("mask_token", "lm_head.*", "cls_pt_*", "*relative_position_index"),
        detect=_looks_like_beit_pretrain,
        model_kwargs=beit_model_kwargs,
    )
)
