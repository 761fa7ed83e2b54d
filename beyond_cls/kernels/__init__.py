"""Triton kernels of beyond-cls (installed as ``beyond_cls.kernels``).

One op per module (``attention_stats``: fused attention with row statistics; ``abmilp``: AbMILP and
softmax pooling, forward and backward): its ``@triton.jit`` kernels and host launch functions.
``launch`` runs every kernel (an explicit config, the interpreter's, or an autotuner), each module
passing its kernels' rules as data. ``aot`` compiles them ahead of time for a GPU architecture
without a GPU (CI). Users call them through ``beyond_cls.ops``.
"""

from beyond_cls.triton_mode import interpreting

# ``input_precision`` of the kernels' float32 dots on a GPU: 3xTF32 (a = a_hi + a_lo in TF32, three
# tensor-core products) is float32-accurate (~1e-6 relative), where an IEEE float32 dot runs on the
# FMA units, takes minutes to compile and spills registers at the kernels' tile sizes.
GPU_FP32_DOT = "tf32x3"


def fp32_dot_precision() -> str:
    """``input_precision`` for float32 ``tl.dot`` operands, passed to the kernels as a constexpr:
    ``GPU_FP32_DOT`` when compiled for a GPU, "ieee" under ``TRITON_INTERPRET=1`` (the interpreter
    multiplies in numpy; exact float32 keeps the CPU tests' float32 results exact)."""
    return "ieee" if interpreting() else GPU_FP32_DOT
