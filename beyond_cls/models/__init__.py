"""Encoder zoo: the paper's encoders by name, timm architectures, and adapters for official checkpoint layouts."""

from __future__ import annotations

from beyond_cls.models.checkpoint import (
    CHECKPOINT_FORMATS,
    CLASSIFIER_KEYS,
    AdaptedCheckpoint,
    CheckpointError,
    CheckpointFormat,
    adapt_checkpoint,
    checkpoint_model_kwargs,
    detect_checkpoint_formats,
    extract_state_dict,
    prepare_checkpoint,
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
from beyond_cls.models.zoo import ZOO, ZooEntry, find_weights, zoo_entry

__all__ = [
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "ZOO",
    "AdaptedCheckpoint",
    "CheckpointError",
    "CheckpointFormat",
    "EncoderInfo",
    "ZooEntry",
    "adapt_checkpoint",
    "checkpoint_model_kwargs",
    "create_encoder",
    "detect_checkpoint_formats",
    "encoder_info",
    "extract_state_dict",
    "find_weights",
    "load_encoder",
    "load_encoder_checkpoint",
    "prepare_checkpoint",
    "read_checkpoint",
    "register_checkpoint_format",
    "resize_position_tables",
    "resolve_checkpoint_format",
    "zoo_entry",
]
