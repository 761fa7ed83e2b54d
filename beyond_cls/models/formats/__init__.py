"""Checkpoint formats: the registry and one module per family of official layouts.

Importing this package registers every format below (each module calls
:func:`register_checkpoint_format` once per layout); the registry itself imports none of them. A new
layout is one module here, imported below, plus its test.
"""

from __future__ import annotations

from beyond_cls.models.formats import beit, capi, dinov2, distill, vit  # noqa: F401  (they register themselves)
from beyond_cls.models.formats.registry import (
    CHECKPOINT_FORMATS,
    CLASSIFIER_KEYS,
    CheckpointFormat,
    detect_checkpoint_formats,
    register_checkpoint_format,
    resolve_checkpoint_format,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "CheckpointFormat",
    "detect_checkpoint_formats",
    "register_checkpoint_format",
    "resolve_checkpoint_format",
]
