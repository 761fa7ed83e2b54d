"""Aggregation heads for linear probing on a frozen ViT: [cls], mean, [cls]+mean, AbMILP family, attentive probe, and
pooling with given (non-trainable) selection weights.

Every aggregation takes ``tokens`` [B, N, D] of a timm ViT: by default those of its last block before the final
norm, as the authors probe (``probe --block`` / ``--final-norm`` choose others); tokens ``0..P-1`` are prefix
tokens ([cls] at 0, then registers) and ``P..N-1`` are patches. Each has ``out_dim`` and returns [B, out_dim].
:class:`LinearProbe` puts the MAE linear-probe head (BatchNorm without affine + Linear) on top of one.

Each head module registers its ``--heads`` specs in :mod:`beyond_cls.heads.registry`; every module of this
package is imported here, so a new head is one new module.
"""

from __future__ import annotations

import importlib
import pkgutil

from beyond_cls.heads.abmilp import AbMILP, SelfAttentionAbMILP, sincos_pos_embed_2d
from beyond_cls.heads.attentive import AttentivePool
from beyond_cls.heads.linear_probe import HEAD_INITS, LinearProbe
from beyond_cls.heads.registry import (
    AGGREGATIONS,
    Aggregation,
    build_aggregation,
    heads_help,
    heads_table_markdown,
    parse_heads,
    register,
)
from beyond_cls.heads.selection_pool import SelectionPool
from beyond_cls.heads.tokens import ClsMean, ClsToken, MeanPatch

for _module in pkgutil.iter_modules(__path__):  # heads added as modules register themselves on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AGGREGATIONS",
    "HEAD_INITS",
    "AbMILP",
    "Aggregation",
    "AttentivePool",
    "ClsMean",
    "ClsToken",
    "LinearProbe",
    "MeanPatch",
    "SelectionPool",
    "SelfAttentionAbMILP",
    "build_aggregation",
    "heads_help",
    "heads_table_markdown",
    "parse_heads",
    "register",
    "sincos_pos_embed_2d",
]
