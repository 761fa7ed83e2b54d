"""beyond-cls: information flow in self-supervised ViTs and Selective Aggregation probing."""

from beyond_cls import heads, ops, optim, reference
from beyond_cls.analysis import AttentionRecorder, AttentionSummary
from beyond_cls.models import EncoderInfo, encoder_info, load_encoder

__version__ = "0.1.0"

__all__ = [
    "AttentionRecorder",
    "AttentionSummary",
    "EncoderInfo",
    "__version__",
    "encoder_info",
    "heads",
    "load_encoder",
    "ops",
    "optim",
    "reference",
]
