"""beyond-cls: information flow in self-supervised ViTs and Selective Aggregation probing."""

import importlib

from beyond_cls import heads, ops, optim, reference
from beyond_cls.analysis import AttentionRecorder, AttentionSummary
from beyond_cls.analysis.hf_recorder import HFAttentionRecorder  # transformers is imported lazily
from beyond_cls.models import EncoderInfo, encoder_info, load_encoder

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (tool.setuptools.dynamic)

# Every subpackage is reachable as ``bc.<name>``; those not imported above load on first use (``bc.probe``).
SUBPACKAGES = ("analysis", "data", "heads", "kernels", "localization", "models", "ops", "optim", "probe", "reference")

__all__ = [
    "AttentionRecorder",
    "AttentionSummary",
    "EncoderInfo",
    "HFAttentionRecorder",
    "__version__",
    "analysis",
    "data",
    "encoder_info",
    "heads",
    "kernels",
    "load_encoder",
    "localization",
    "models",
    "ops",
    "optim",
    "probe",
    "reference",
]


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *SUBPACKAGES})
