"""Triton kernels of beyond-cls (installed as ``beyond_cls.kernels``).

One op per module: its ``@triton.jit`` kernels, host launch functions and autograd Function.
The fused attention-with-statistics and AbMILP kernels land here (see the issues that add them);
until then ``beyond_cls.ops`` serves CUDA tensors with the reference implementation.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether Triton is importable (kernels need it and a CUDA device or TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None
