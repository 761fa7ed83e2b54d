"""Triton kernels of beyond-cls (installed as ``beyond_cls.kernels``).

One op per module (``attention_stats``: fused attention with row statistics; ``abmilp``: AbMILP and
softmax pooling, forward and backward): its ``@triton.jit`` kernels and host launch functions.
``aot`` compiles them ahead of time for a GPU architecture without a GPU (CI). Users call them
through ``beyond_cls.ops``.
"""
