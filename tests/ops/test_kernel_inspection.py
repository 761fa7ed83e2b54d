"""The static inspection of compiled kernels (``beyond_cls.kernels.aot``): JIT-faithful specialization, the SASS
loops and the main loop, ptxas resources; on a tiny kernel compiled for sm_90, and on hand-written SASS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from beyond_cls.kernels import aot


def _two_loops(X, W, Y, N, BLOCK: tl.constexpr):
    """Loop 1 multiplies [BLOCK, BLOCK] tiles of X by W on the tensor cores; loop 2 only sums X's first column."""
    offs = tl.arange(0, BLOCK)
    w = tl.load(W + offs[:, None] * BLOCK + offs[None, :])
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        rows = start + offs
        x = tl.load(X + rows[:, None] * BLOCK + offs[None, :], mask=rows[:, None] < N, other=0.0)
        acc = tl.dot(x, w, acc)
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        rows = start + offs
        total += tl.load(X + rows * BLOCK, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(Y + offs[:, None] * BLOCK + offs[None, :], acc + total[:, None])


# constructed directly: the tests run with TRITON_INTERPRET=1, under which @triton.jit would make an interpreted one
TWO_LOOPS = JITFunction(_two_loops)


def _call(x: torch.Tensor, n: int) -> aot.JitCall:
    w = torch.empty(16, 16, dtype=torch.float16)
    y = torch.empty(16, 16, dtype=torch.float32)
    return aot.JitCall(TWO_LOOPS, (x, w, y, n), {"BLOCK": 16, "num_warps": 4, "num_stages": 2}, (1,), ())


def test_specialization_is_the_jits():
    """Aligned pointers and integers divisible by 16 are marked, integers equal to 1 become constexprs, a pointer
    2 bytes past an aligned one is not marked; equal specializations share one key, others do not."""
    base = torch.empty(1 + 4096, dtype=torch.float16)
    aligned, shifted = base[8:], base[1:]  # 16 bytes / 2 bytes past the allocation
    text = aot.describe(_call(aligned, 96))
    assert text.startswith("divisible by 16: X, W, Y, N;") and text.endswith("equal to 1: -")
    text = aot.describe(_call(shifted, 1))
    assert text == "divisible by 16: W, Y; equal to 1: N"
    assert "N" not in aot.describe(_call(aligned, 100))
    key = aot.specialization_key(_call(aligned, 96), 90)
    assert key == aot.specialization_key(_call(aligned, 32), 90)
    assert key != aot.specialization_key(_call(aligned, 100), 90)
    assert key != aot.specialization_key(_call(shifted, 96), 90)
    assert key != aot.specialization_key(_call(aligned, 96), 80)
    jobs, index = aot.unique_jobs([_call(aligned, 96), _call(aligned, 32), _call(aligned, 100)], (90,))
    assert len(jobs) == 2 and index == [0, 0, 1]


def _inspect_tiny() -> dict:
    """Compile the tiny kernel for sm_90 and read it (in a process without TRITON_INTERPRET: see the fixture)."""
    compiled = aot.compile_call(_call(torch.empty(4096, dtype=torch.float16), 100), 90)
    text = aot.sass(compiled)
    loops = aot.sass_loops(text)
    main = aot.main_loop(loops)
    body = [i for addr, i in aot.parse_sass(text) if main.start <= addr <= main.end and not i.startswith("NOP")]
    return dict(arch_line="sm_90" in text, loops=[vars(loop) for loop in loops], main=vars(main), body=body,
                usage=vars(aot.resource_usage(compiled, 90)), cubin=aot.cubin_usage(compiled),
                shared=compiled.metadata.shared)


@pytest.fixture(scope="module")
def tiny() -> dict:
    # Triton generates code differently when TRITON_INTERPRET=1 was set at import (as in this session): a fresh
    # interpreter compiles
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def test_tiny_kernel_loops(tiny):
    """Both loops of the tiny kernel are found; the main loop is the one with the tensor-core instructions, and its
    size is the number of instructions between the backward branch's target and the branch."""
    assert tiny["arch_line"]
    loops = [aot.Loop(**loop) for loop in tiny["loops"]]
    assert len(loops) >= 2 and not any(a.contains(b) for a in loops for b in loops)
    main = aot.Loop(**tiny["main"])
    assert main in loops and main.mma > 0 and main.load_bytes > 0
    assert any(loop.mma == 0 for loop in loops)
    body = tiny["body"]
    assert main.instructions == len(body) and body[-1].split()[0].startswith("BRA")
    assert any(i.split()[0].startswith(("HMMA", "HGMMA")) for i in body)


def test_tiny_kernel_resources(tiny):
    usage = aot.Usage(**tiny["usage"])
    assert usage.threads == 128 and usage.spill_bytes == 0 and usage.stack == 0
    assert 0 < usage.regs <= 255 and tiny["cubin"] == {"regs": usage.regs, "stack": 0, "local": 0}
    assert usage.shared == tiny["shared"]


SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.64 R2, desc[UR4][R2.64] ;       /* 0x000e700000000800 */
        /*0020*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/              @P0 BRA 0x20 ;
        /*0050*/                   NOP ;
        /*0060*/                   FADD R1, R1, R2 ;
        /*0070*/              @!P1 BRA 0x10 ;
        /*0080*/                   LDG.E R5, desc[UR4][R2.64] ;
        /*0090*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*00a0*/                   BRA.U !UP0, 0x80 ;
        /*00b0*/                   EXIT ;
        /*00c0*/                   BRA 0xc0 ;
"""


def test_loops_of_handwritten_sass():
    """Nested loops, predicated and uniform branches, NOPs left out, the trailing self-branch is no loop; the main
    loop is an innermost tensor-core loop, the one loading more bytes per thread."""
    loops = aot.sass_loops(SASS)
    assert [(loop.start, loop.end, loop.instructions, loop.mma, loop.load_bytes) for loop in loops] == [
        (0x10, 0x70, 6, 1, 24), (0x20, 0x40, 3, 1, 16), (0x80, 0xA0, 3, 1, 4)]
    assert loops[0].contains(loops[1]) and not loops[1].contains(loops[0])
    assert aot.main_loop(loops) == loops[1]  # innermost with MMA, 16 bytes loaded vs 4
    assert aot.main_loop([loops[0], loops[2]]) == loops[0]
    assert aot.main_loop([]) is None


if __name__ == "__main__":
    print(json.dumps(_inspect_tiny()))
