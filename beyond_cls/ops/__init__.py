"""The fused ops' public front: one signature per op, dispatched by device and availability.

One module per op (``attention_stats``, ``abmilp``) holds its ``torch.library`` custom ops, their
fakes, CPU (C++) and CUDA (Triton) kernels and autograd; ``_dispatch`` holds the backend policy
(``BEYOND_CLS_BACKEND=reference|triton|cpp`` forces one).
"""

from beyond_cls.ops._dispatch import BACKENDS, backend_for
from beyond_cls.ops.abmilp import abmilp_pool, softmax_pool
from beyond_cls.ops.attention_stats import attention_with_stats
from beyond_cls.reference import AttentionRows

__all__ = ["AttentionRows", "BACKENDS", "abmilp_pool", "attention_with_stats", "backend_for", "softmax_pool"]
