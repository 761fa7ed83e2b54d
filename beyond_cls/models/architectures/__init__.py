"""Encoder architectures: the registry and one module per family (timm ViT, Beit, Eva, the CAPI port).

Importing this package registers every family below; the registry itself imports none of them. A new
family is one module here that calls :func:`register_architecture`, imported below, plus its test.
"""

from __future__ import annotations

from beyond_cls.models.architectures import beit, capi, eva, vit  # noqa: F401  (they register themselves)
from beyond_cls.models.architectures.attention import AttentionAdapter, Projected, finish
from beyond_cls.models.architectures.registry import (
    ARCHITECTURES,
    Architecture,
    architecture_of,
    attention_adapter,
    builder_for,
    register_architecture,
    supported_attention,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "AttentionAdapter",
    "Projected",
    "architecture_of",
    "attention_adapter",
    "builder_for",
    "finish",
    "register_architecture",
    "supported_attention",
]
