"""Triton kernels of beyond-cls (installed as ``beyond_cls.kernels``).

One op per module (``attention_stats``: fused attention with row statistics; ``abmilp``: AbMILP and
softmax pooling, forward and backward): its ``@triton.jit`` kernels and host launch functions.
``aot`` compiles them ahead of time for a GPU architecture without a GPU (CI). Users call them
through ``beyond_cls.ops``.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether Triton is importable (kernels need it and a CUDA device or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
