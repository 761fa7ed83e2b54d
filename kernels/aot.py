"""Ahead-of-time compilation of Triton kernels for a GPU architecture, without a GPU.

CI uses it to prove that every autotune config of every kernel compiles to a cubin for sm_80 and
sm_90 (``triton.compile`` with a ``GPUTarget``): a kernel that only runs in the interpreter fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)
SHARED_MEMORY_BYTES = {80: 166912, 90: 232448}  # per block, opt-in maximum (A100, H100)
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.bool: "i1"}


def pointer(dtype: torch.dtype) -> str:
    """Triton signature type of a pointer to ``dtype`` elements, e.g. ``*bf16``."""
    return "*" + _TRITON_TYPES[dtype]


@dataclass(frozen=True)
class Specialization:
    """One compile of a kernel: argument types, constexpr values and launch options."""

    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4
    num_stages: int = 3
    label: str = field(default="", compare=False)


def compile_for(kernel: triton.JITFunction, spec: Specialization, arch: int):
    """Compile ``kernel`` for CUDA compute capability ``arch`` (e.g. 90); returns the compiled kernel."""
    signature = dict(spec.signature)
    signature.update({name: "constexpr" for name in spec.constexprs})
    missing = [name for name in kernel.arg_names if name not in signature]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or value for arguments {missing}")
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(spec.constexprs))
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
