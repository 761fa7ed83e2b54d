"""Encoder zoo: the paper's encoders by name, their architectures, and adapters for official checkpoint layouts.

``formats/`` holds the checkpoint-format registry and one module per family of layouts;
``architectures/`` the architecture registry and one module per family of encoders. Importing this
package registers both.
"""

from __future__ import annotations

from beyond_cls.models.architectures import ARCHITECTURES, Architecture, register_architecture
from beyond_cls.models.checkpoint import (
    AdaptedCheckpoint,
    adapt_checkpoint,
    checkpoint_model_kwargs,
    prepare_checkpoint,
    read_checkpoint,
)
from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.formats import (
    CHECKPOINT_FORMATS,
    CLASSIFIER_KEYS,
    CheckpointFormat,
    detect_checkpoint_formats,
    register_checkpoint_format,
    resolve_checkpoint_format,
)
from beyond_cls.models.formats.common import extract_state_dict
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
    "ARCHITECTURES",
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "ZOO",
    "AdaptedCheckpoint",
    "Architecture",
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
    "register_architecture",
    "register_checkpoint_format",
    "resize_position_tables",
    "resolve_checkpoint_format",
    "zoo_entry",
]
