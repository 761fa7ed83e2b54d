"""Encoder zoo: timm ViT architectures plus adapters from official checkpoint layouts."""

from __future__ import annotations

from beyond_cls.models.checkpoint import (
    CHECKPOINT_FORMATS,
    CLASSIFIER_KEYS,
    CheckpointError,
    CheckpointFormat,
    adapt_checkpoint,
    extract_state_dict,
    read_checkpoint,
    register_checkpoint_format,
    resolve_checkpoint_format,
)
from beyond_cls.models.loader import (
    EncoderInfo,
    create_encoder,
    encoder_info,
    load_encoder,
    load_encoder_checkpoint,
    resize_position_tables,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "CheckpointError",
    "CheckpointFormat",
    "EncoderInfo",
    "adapt_checkpoint",
    "create_encoder",
    "encoder_info",
    "extract_state_dict",
    "load_encoder",
    "load_encoder_checkpoint",
    "read_checkpoint",
    "register_checkpoint_format",
    "resize_position_tables",
    "resolve_checkpoint_format",
]
