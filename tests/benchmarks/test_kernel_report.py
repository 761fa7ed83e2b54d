"""The static kernel report's arithmetic (benchmarks/kernel_report.py) and its interpreted byte counts
(benchmarks/kernel_traffic.py) on a tiny pooling module whose traffic is known exactly."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


report = _module("kernel_report")
traffic = _module("kernel_traffic")


def _row(op: str, shape: str, config: str, regs: int, loop: int, per: float, spill: int = 0, smem: int = 1024,
         dtype: str = "bf16", keep: bool = False) -> dict:
    case = report.Case(op, shape, dtype, "", (), keep=keep)
    return dict(kernel=op, shape=shape, config=config, regs=regs, spill_bytes=spill, smem_bytes=smem, loop_sass=loop,
                loop_sass_per_element=per, case=case, cubin_regs=regs, threads=256, elements_per_iteration=8192,
                loops=str(loop))


def test_targets_mark_what_fails():
    rows = [
        _row("attention", "vit_b16 x bf16", "M128 N64 w8 s3", 160, 320, 10.0),
        _row("attention", "vit_b16 x bf16", "M64 N64 w4 s3", 170, 330, 10.3),  # too many registers
        _row("attention", "vit_b16 x bf16 keep2", "M128 N64 w8 s3", 160, 320, 10.0, keep=True),
        _row("attention", "vit_b16 x bf16 keep2", "M64 N64 w4 s3", 170, 334, 10.4, keep=True),  # loop grew > 1 %
        _row("abmilp", "d768 fp32 fwd", "N2", 255, 100, 3.0, spill=24, dtype="fp32"),
        _row("abmilp", "d768 bf16 fwd", "N2", 100, 90, 2.0, smem=300_000),
    ]
    counted = [{"pass": "fwd", "token_reads": 1.0}, {"pass": "bwd", "token_reads": 2.0}]
    marks = {target: (measured, mark) for target, measured, mark in report.targets(rows, counted, 90, 232448)}
    vit = [(m, k) for t, (m, k) in marks.items() if t.startswith("attention ViT-B/16")]
    assert vit == [("10.0 per element, 160 registers", "pass"), ("10.3 per element, 170 registers", "**FAIL**")]
    keep = marks["attention bf16: kept rows add nothing to the loop (loop SASS with keep2 ≤ without + 1 %)"]
    assert keep[1] == "**FAIL**" and keep[0] == "vit_b16 x bf16 keep2 M64 N64 w4 s3: 330 → 334"
    assert marks["no spills: bf16, every kernel, shape and config"] == ("0 of 5 spill", "pass")
    rows[3]["loop_sass"] = 333  # within 1 %: register allocation, not work
    keep = report.targets(rows, counted, 90, 232448)[2]
    assert keep[1:] == ("keep2 − without: +0 to +3 instructions", "pass")
    spills = marks["no spills: AbMILP, every dtype (fp32 tokens included)"]
    assert spills[1] == "**FAIL**" and spills[0].startswith("1 of 2 spill") and "(24 B)" in spills[0]
    assert marks["shared memory ≤ 232448 bytes (sm_90 block limit), bf16"][1] == "**FAIL**"
    assert marks["AbMILP forward reads the tokens once"] == ("1.00–1.00 × the tokens", "pass")
    assert marks["AbMILP backward reads the tokens once"] == ("2.00–2.00 × the tokens", "**FAIL**")


def test_markdown_and_csv(tmp_path):
    rows = [_row("attention", "vit_b16 x bf16", "M128 N64 w8 s3", 160, 320, 10.0)]
    counted = [{"shape": "s", "pass": "fwd", "bytes": 120, "host_bytes": 0, "minimum": 100, "token_reads": 1.0,
                "configs": {"fwd": [2, 256, 1, 1]}}]
    text = report.markdown(rows, counted, 90, {"attention bf16": "divisible by 16: Q; equal to 1: stride_qd"})
    assert text.startswith("# Static kernel report, sm_90") and f"triton {triton.__version__}" in text
    assert "| attention | vit_b16 x bf16 | M128 N64 w8 s3 | 160 | 0 | 1024 | 320 | 10.0 | 320 |" in text
    assert "| s | fwd | fwd (2, 256, 1, 1) | 1.00 × | 0.0 | 0.0 | 0.0 | 1.200 |" in text
    report.write_csv(rows, tmp_path / "r.csv")
    header, line = (tmp_path / "r.csv").read_text().splitlines()
    assert header.startswith("kernel,shape,config,regs,spill_bytes,smem_bytes,loop_sass,loop_sass_per_element")
    assert line.startswith("attention,vit_b16 x bf16,M128 N64 w8 s3,160,0,1024,320,10.0,256,8192")


def test_report_cases_and_elements():
    quick = report.cases(quick=True)
    assert {c.op for c in quick} == {"attention", "abmilp"}
    assert sum(c.op == "attention" for c in quick) == 4  # bf16 / fp32, kept rows off / on
    assert sum(c.op == "abmilp" for c in quick) == len(report.BRANCHES) * 3 * 2  # K x dtypes x passes
    call = types.SimpleNamespace(config=(128, 64, 8, 3), launch_name="attention_stats")
    assert report.elements_per_iteration(quick[0], call, {}) == 128 * 64
    pooling = next(c for c in quick if c.op == "abmilp")
    b, n, d, k, _ = pooling.args
    call = types.SimpleNamespace(config=(2, 256, 1, 1), launch_name="fwd")
    assert report.elements_per_iteration(pooling, call, {(d, "fwd", (2, 256, 1, 1)): 1536}) == 1536
    assert report.elements_per_iteration(pooling, call, {}) is None


def test_carried_to_the_full_shape_per_argument():
    """Tokens follow the shape (read twice); the weight has a fixed size, read once per program plus once per 16
    tokens; the split partial sums follow the shape too (their count is capped at the full batch)."""
    def launch(touched, sizes, programs):
        return {"touched": touched, "sizes": sizes, "programs": programs}

    small = [launch([2 * 100, 4 * (1 + 32 // 16) * 40, 7 * 8], [100, 40, 7 * 8], 4)]  # 4 programs, 32 tokens
    more = [launch([2 * 150, 4 * (1 + 48 // 16) * 40, 7 * 8], [150, 40, 7 * 8], 4)]  # 48 tokens
    full = [launch([0, 0, 0], [100 * 1024, 40, 128 * 8], 1024)]  # 1024 programs, 192 tokens
    carried = traffic.carry(small, more, full, 32, 48, 192)
    assert carried == pytest.approx(2 * 100 * 1024 + 1024 * (1 + 192 // 16) * 40 + 128 * 8)


# ------------------------------------------------------------------------------ a pooling module of known traffic


@triton.jit
def _sum_rows(Z, W, Out, N, D, stride_zb, stride_zn, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Out[b] = W * Σ_n Z[b, n]: one program per row, token tiles of BLOCK_N."""
    b = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    w = tl.load(W + offs_d, mask=d_ok, other=0.0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        z = tl.load(Z + b * stride_zb + offs_n[:, None] * stride_zn + offs_d[None, :],
                    mask=(offs_n[:, None] < N) & d_ok[None, :], other=0.0)
        acc += tl.sum(z, 0)
    tl.store(Out + b * D + offs_d, acc * w, mask=d_ok)


def _tiny_module() -> types.ModuleType:
    """Forward: two passes over the tokens (and a host-made score tensor); backward: one pass and a host sum."""
    mod = types.ModuleType("tiny_pooling")
    mod.CONFIGS = {"sum": [(4, 32, 1, 1), (8, 32, 1, 1)]}
    mod.KERNELS = {"sum": _sum_rows}

    def launch(name, grid, *args, config=None, **meta):
        block_n, block_d, warps, stages = config or mod.CONFIGS[name][0]
        blocks = dict(BLOCK_N=block_n, BLOCK_D=block_d)
        mod.KERNELS[name][grid(blocks)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)

    def run(tokens, weight, out):
        b, n, d = tokens.shape
        mod.launch("sum", lambda cfg: (b,), tokens, weight[0], out, n, d, tokens.stride(0), tokens.stride(1))

    def abmilp_forward(tokens, weight, bias, mask=None):
        pooled = torch.empty(tokens.shape[0], 1, tokens.shape[2])
        run(tokens, weight, pooled)
        run(tokens, weight, pooled)
        return pooled, torch.zeros(tokens.shape[0], 1, tokens.shape[1])

    def abmilp_backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad):
        rows = torch.empty(tokens.shape[0], tokens.shape[2])
        run(tokens, weight, rows)
        return torch.empty(0), rows.sum(0, keepdim=True), torch.zeros(1)

    mod.launch, mod.abmilp_forward, mod.abmilp_backward = launch, abmilp_forward, abmilp_backward
    return mod


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="runs the kernels in Triton's interpreter")
def test_counts_of_a_module_with_known_traffic():
    batch, n, d = 64, 16, 24
    plan = [dict(shape="tiny", batch=batch, n=n, d=d, k=1, dtype="fp32", bytes=True,
                 candidates={"sum": [[4, 32, 1, 1], [8, 32, 1, 1]]})]
    counted = traffic.measure(plan, _tiny_module())
    tokens, row = batch * n * d * 4, d * 4
    per_launch = tokens + batch * row + batch * row  # the tokens, the weight per row, the output row
    fwd, bwd = counted["traffic"]
    assert (fwd["pass"], bwd["pass"]) == ("fwd", "bwd") and fwd["configs"] == {"sum": [4, 32, 1, 1]}
    assert fwd["token_reads"] == 2.0 and bwd["token_reads"] == 1.0
    assert fwd["host_bytes"] == batch * n * 4  # torch.zeros of the scores
    assert fwd["bytes"] == 2 * per_launch + fwd["host_bytes"]
    assert fwd["minimum"] == tokens + batch * row + batch * n * 4
    assert bwd["host_bytes"] == batch * row + row + 4  # the sum over rows (in + out), torch.zeros(1)
    assert bwd["bytes"] == per_launch + bwd["host_bytes"] and bwd["minimum"] == tokens + row + 4
    # one trip of the loop reads BLOCK_N tokens x D features (the padding to BLOCK_D is masked)
    assert sorted((name, tuple(config), value) for _, name, config, value in counted["elements"]) == [
        ("sum", (4, 32, 1, 1), 4 * d), ("sum", (8, 32, 1, 1), 8 * d)]
