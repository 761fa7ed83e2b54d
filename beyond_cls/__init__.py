"""beyond-cls: information flow in self-supervised ViTs and Selective Aggregation probing."""

from beyond_cls import ops, reference

__version__ = "0.1.0"

__all__ = ["__version__", "ops", "reference"]
