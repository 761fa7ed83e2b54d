"""Fused softmax attention with per-row statistics (Triton, forward only).

One program per (block of queries, batch·head). Keys stream in blocks with an online softmax,
flash-attention style; alongside the output the kernel keeps, per query row, the running max and
normalizer over all keys and, over patch keys only, their own running max ``mp``, normalizer
``Zp = Σ 2^t`` and ``Tp = Σ 2^t·t`` with ``t = (s − mp)·log2 e``, rescaled whenever ``mp`` moves,
so that

    patch_entropy = ln2 · (log2 Zp − Tp / Zp)        (exact; 0·log 0 = 0)
    patch_mass    = Zp · e^(mp − m) / l

Every key costs one exp2: patch keys are exponentiated against ``mp`` and rescaled to the global
max by one per-row factor. Logits stay in natural units and the max is subtracted before the
base-2 scaling, so large logits lose no precision. The diagonal and key-0 logits are picked out
of the score blocks as they stream past.

Kept rows (``keep_rows``, constexpr ``KEEP_ROWS``): a program whose block of queries holds a kept
row picks that row's raw logits out of each score block as the keys stream and stores them into
the output [B, H, R, N]; once the row's max m and normalizer l are final it sweeps its R×N slice
again, turning each logit s into e^(s − m) / l. K and V are read once; the default specialization
(``KEEP_ROWS=False``) compiles to the same instructions as a kernel without kept rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from beyond_cls.kernels import GPU_FP32_DOT, fp32_dot_precision

from beyond_cls.numerics import MAX_KEPT_ROWS
from beyond_cls.ops._dispatch import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # jit code reads globals only as constexpr
_LN2 = tl.constexpr(LN2)
MAX_PREFIX_TOKENS = 16  # prefix keys must fit the first key block (BLOCK_N >= 32)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

# (BLOCK_M, BLOCK_N, num_warps, num_stages): small so CI can compile every one ahead of time.
CONFIGS = [
    (128, 64, 8, 3),
    (128, 32, 4, 3),
    (64, 64, 4, 3),
    (64, 32, 4, 2),
]
# Under TRITON_INTERPRET=1 (CPU tests) one config runs; autotuning would only time numpy.
INTERPRET_CONFIG = (64, 32, 4, 1)


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """a @ b with float32 accumulation. FP32_DOT: "" for 16-bit inputs (one tensor-core dot), else
    the ``input_precision`` of float32 inputs: "tf32x3" on a GPU (float32-accurate, not TF32), "ieee"
    in the interpreter (``beyond_cls.kernels.fp32_dot_precision``).

    UPCAST_DOT multiplies in float32 after an exact upcast (bf16 products are exact in fp32): the
    Triton interpreter cannot multiply bfloat16 matrices (and truncates when it rounds to bf16), so
    CPU tests of bf16 inputs use it; there p also stays float32 for p·v.
    """
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif FP32_DOT != "":
        return tl.dot(a, b, input_precision=FP32_DOT)
    else:
        return tl.dot(a, b)


@triton.jit
def _score_block(
    q, k_base, v_base, bias_base, start_n, offs_m, offs_d, row_ok, d_ok, N, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
    HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Logits [BLOCK_M, BLOCK_N] of one key block (-inf past N) and its values [BLOCK_N, D_PAD]."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    s = _dot(q, k, FP32_DOT, UPCAST_DOT) * qk_scale
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        s += bias.to(tl.float32)
    s = tl.where(col_ok[None, :], s, float("-inf"))
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    return s, v, offs_n, col_ok


@triton.jit
def _online_update(
    s, col_ok, offs_n, v, m_i, l_i, acc, mp_i, zp_i, tp_i,
    NUM_PREFIX: tl.constexpr, MIXED: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Fold one key block (base-2 logits ``s``, -inf where invalid) into the running row state."""
    if MIXED:  # the block holds prefix keys as well as patches
        is_patch = (offs_n >= NUM_PREFIX) & col_ok
        sp = tl.where(is_patch[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
    else:
        is_patch = col_ok
        sp = s
        m_new = tl.maximum(m_i, tl.max(s, 1))
    mp_new = tl.maximum(mp_i, tl.max(sp, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    mp_safe = tl.where(mp_new == float("-inf"), 0.0, mp_new)

    # one exp2 per key: patches against the patch max, prefix keys against the global max
    if MIXED:
        ref = tl.where(is_patch[None, :], mp_safe[:, None], m_safe[:, None])
    else:
        ref = mp_safe[:, None]
    shift = (s - ref) * _LOG2E  # subtract first: exact for large logits, then base 2
    u = tl.exp2(shift)
    patch_to_global = tl.where(mp_new == float("-inf"), 0.0, tl.exp2((mp_safe - m_safe) * _LOG2E))
    if MIXED:
        p = tl.where(is_patch[None, :], u * patch_to_global[:, None], u)
        e = tl.where(is_patch[None, :], u, 0.0)
    else:
        p = u * patch_to_global[:, None]
        e = u
    et = e * tl.where(sp > float("-inf"), shift, 0.0)

    alpha = tl.exp2((m_i - m_safe) * _LOG2E)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST_DOT:
        acc = acc * alpha[:, None] + _dot(p, v, FP32_DOT, UPCAST_DOT)
    else:
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT, UPCAST_DOT)

    beta = tl.exp2((mp_i - mp_safe) * _LOG2E)
    moved = tl.where(zp_i > 0, (mp_i - mp_safe) * _LOG2E, 0.0) * zp_i  # Tp' = β (Tp + (mp − mp') Zp)
    tp_i = beta * (tp_i + moved) + tl.sum(et, 1)
    zp_i = zp_i * beta + tl.sum(e, 1)
    return m_new, l_i, acc, mp_new, zp_i, tp_i


@triton.jit
def _owns_kept_row(KeepRows, first_row, NUM_KEPT, BLOCK_M: tl.constexpr):
    """Whether any kept query row falls in this program's block of rows."""
    owns = False
    for r in range(NUM_KEPT):
        row = tl.load(KeepRows + r)
        owns = owns | ((row >= first_row) & (row < first_row + BLOCK_M))
    return owns


@triton.jit
def _store_kept_logits(s, offs_m, offs_n, col_ok, first_row, owns_kept, KeepRows, kept_base, N, NUM_KEPT,
                       BLOCK_M: tl.constexpr):
    """Store the raw logits of this program's kept rows from one score block (row r of kept_base: slot r)."""
    if owns_kept:
        for r in range(NUM_KEPT):
            row = tl.load(KeepRows + r)
            if (row >= first_row) & (row < first_row + BLOCK_M):
                logits = tl.sum(tl.where(offs_m[:, None] == row, s, 0.0), 0)
                tl.store(kept_base + r * N + offs_n, logits, mask=col_ok)


@triton.jit
def _normalize_kept_rows(m_i, l_i, offs_m, first_row, owns_kept, KeepRows, kept_base, N, NUM_KEPT,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Turn this program's kept rows' logits s into probabilities e^(s − m) / l, in place."""
    tl.debug_barrier()  # the logits were stored by other threads of this program
    if owns_kept:
        for r in range(NUM_KEPT):
            row = tl.load(KeepRows + r)
            if (row >= first_row) & (row < first_row + BLOCK_M):
                mine = offs_m == row
                m_row = tl.sum(tl.where(mine, m_i, 0.0), 0)
                inv_l = 1.0 / tl.sum(tl.where(mine, l_i, 0.0), 0)
                for start_n in range(0, N, BLOCK_N):
                    offs_n = start_n + tl.arange(0, BLOCK_N)
                    ptrs = kept_base + r * N + offs_n
                    logits = tl.load(ptrs, mask=offs_n < N, other=float("-inf"))
                    tl.store(ptrs, tl.exp2((logits - m_row) * _LOG2E) * inv_l, mask=offs_n < N)


@triton.jit
def attention_stats_fwd_kernel(
    Q, K, V, Bias, Out, SelfAttn, ClsAttn, PatchMass, PatchEntropy, KeepRows, Kept,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, HEAD_DIM, NUM_KEPT, qk_scale,
    NUM_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    KEEP_ROWS: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh

    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mp_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zp_i = tl.zeros([BLOCK_M], tl.float32)
    tp_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    diag_s = tl.zeros([BLOCK_M], tl.float32)  # raw logits of the diagonal key and of key 0
    first_row = pid_m * BLOCK_M
    kept_base = Kept + pid_bh.to(tl.int64) * NUM_KEPT * N  # [R, N] slice of this batch·head
    owns_kept = False
    if KEEP_ROWS:
        owns_kept = _owns_kept_row(KeepRows, first_row, NUM_KEPT, BLOCK_M)

    # first key block, peeled: it holds every prefix key (NUM_PREFIX < BLOCK_N) and key 0
    s, v, offs_n, col_ok = _score_block(
        q, k_base, v_base, bias_base, 0, offs_m, offs_d, row_ok, d_ok, N, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
        HAS_BIAS, FP32_DOT, UPCAST_DOT, BLOCK_N)
    cls_s = tl.sum(tl.where(offs_n[None, :] == 0, s, 0.0), 1)
    if first_row < BLOCK_N:
        diag_s += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], s, 0.0), 1)
    if KEEP_ROWS:
        _store_kept_logits(s, offs_m, offs_n, col_ok, first_row, owns_kept, KeepRows, kept_base, N, NUM_KEPT, BLOCK_M)
    m_i, l_i, acc, mp_i, zp_i, tp_i = _online_update(
        s, col_ok, offs_n, v, m_i, l_i, acc, mp_i, zp_i, tp_i, NUM_PREFIX, NUM_PREFIX > 0, FP32_DOT, UPCAST_DOT)

    for start_n in range(BLOCK_N, N, BLOCK_N):
        s, v, offs_n, col_ok = _score_block(
            q, k_base, v_base, bias_base, start_n, offs_m, offs_d, row_ok, d_ok, N, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bm, stride_bn,
            HAS_BIAS, FP32_DOT, UPCAST_DOT, BLOCK_N)
        if (start_n < first_row + BLOCK_M) & (start_n + BLOCK_N > first_row):  # block crosses the diagonal
            diag_s += tl.sum(tl.where(offs_m[:, None] == offs_n[None, :], s, 0.0), 1)
        if KEEP_ROWS:
            _store_kept_logits(s, offs_m, offs_n, col_ok, first_row, owns_kept, KeepRows, kept_base, N, NUM_KEPT,
                               BLOCK_M)
        m_i, l_i, acc, mp_i, zp_i, tp_i = _online_update(
            s, col_ok, offs_n, v, m_i, l_i, acc, mp_i, zp_i, tp_i, NUM_PREFIX, False, FP32_DOT, UPCAST_DOT)
    if KEEP_ROWS:
        _normalize_kept_rows(m_i, l_i, offs_m, first_row, owns_kept, KeepRows, kept_base, N, NUM_KEPT, BLOCK_M,
                             BLOCK_N)

    inv_l = 1.0 / l_i
    out = acc * inv_l[:, None]
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    stat = pid_bh.to(tl.int64) * N + offs_m
    tl.store(SelfAttn + stat, tl.exp2((diag_s - m_i) * _LOG2E) * inv_l, mask=row_ok)
    tl.store(ClsAttn + stat, tl.exp2((cls_s - m_i) * _LOG2E) * inv_l, mask=row_ok)
    tl.store(PatchMass + stat, zp_i * tl.exp2((mp_i - m_i) * _LOG2E) * inv_l, mask=row_ok)
    tl.store(PatchEntropy + stat, (tl.log2(zp_i) - tp_i / zp_i) * _LN2, mask=row_ok)


_attention_stats_fwd_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in CONFIGS],
    key=["N", "HEAD_DIM", "NUM_PREFIX", "HAS_BIAS", "FP32_DOT", "UPCAST_DOT", "KEEP_ROWS"],
)(attention_stats_fwd_kernel)


def launch(grid, *args, config: tuple[int, int, int, int] | None = None, **meta) -> None:
    """Run the kernel over ``grid(blocks)`` at ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages) when given;
    else at INTERPRET_CONFIG in the interpreter, autotuned over CONFIGS on a GPU."""
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is None:
        _attention_stats_fwd_autotuned[grid](*args, **meta)
        return
    block_m, block_n, warps, stages = config
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    attention_stats_fwd_kernel[grid(blocks)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prefix_tokens: int) -> None:
    """Raise a ValueError naming the argument the Triton kernel cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention_with_stats (Triton): {name} must be [B, H, N, d], got {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"attention_with_stats (Triton): {name} must be float16/bfloat16/float32, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"attention_with_stats: q, k, v must share one shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention_with_stats: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    n, d = q.shape[-2], q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"attention_with_stats (Triton): head dim {d} > {MAX_HEAD_DIM}")
    if not 0 <= num_prefix_tokens < n or num_prefix_tokens > MAX_PREFIX_TOKENS:
        raise ValueError(
            f"attention_with_stats (Triton): num_prefix_tokens must be in [0, min(N-1, {MAX_PREFIX_TOKENS})], "
            f"got {num_prefix_tokens} for N={n}"
        )


@functools.lru_cache(maxsize=64)
def _kept_row_table(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The kept query rows as the kernel reads them, int32 [R] on ``device`` (cached: no copy per call)."""
    return torch.tensor(rows, dtype=torch.int32).to(device)


def attention_with_stats_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_prefix_tokens: int = 1,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
    keep_rows: Sequence[int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the kernel: (out [B, H, N, d] in v's dtype, self_attn, cls_attn, patch_mass, patch_entropy).

    q, k, v may be strided views (e.g. timm's qkv reshape/permute): no copies are made. ``bias``
    must broadcast to [B, H, N, N]; broadcast dimensions are read with stride 0. With ``keep_rows``
    (1 to ``MAX_KEPT_ROWS`` distinct query indices, negative from the end) a sixth tensor follows: the kept rows'
    softmax probabilities [B, H, R, N] float32, computed in the same launch.
    """
    check_inputs(q, k, v, num_prefix_tokens)
    batch, heads, n, d = q.shape
    kept_rows = None
    if keep_rows is not None:
        from beyond_cls.reference import keep_row_indices

        kept_rows = keep_row_indices(keep_rows, n)
    scale = d**-0.5 if scale is None else float(scale)
    out = torch.empty((batch, heads, n, d), dtype=v.dtype, device=v.device)
    stats = [torch.empty((batch, heads, n), dtype=torch.float32, device=q.device) for _ in range(4)]
    num_kept = 0 if kept_rows is None else len(kept_rows)
    kept = torch.empty((batch, heads, num_kept, n), dtype=torch.float32, device=q.device)
    table = q if kept_rows is None else _kept_row_table(kept_rows, q.device)
    if bias is not None:
        try:
            bias = bias.expand(batch, heads, n, n)
        except RuntimeError:
            raise ValueError(f"attention_with_stats: bias of shape {tuple(bias.shape)} does not broadcast "
                             f"to [B, H, N, N] = {[batch, heads, n, n]}") from None
        bias_strides = bias.stride()
    else:
        bias_strides = (0, 0, 0, 0)
    args = (
        q, k, v, bias if bias is not None else q, out, *stats, table, kept if num_kept else q,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        heads, n, d, num_kept, scale,
    )
    meta = dict(
        NUM_PREFIX=num_prefix_tokens,
        HAS_BIAS=bias is not None,
        FP32_DOT=fp32_dot_precision() if q.dtype == torch.float32 else "",
        UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16,
        KEEP_ROWS=kept_rows is not None,
        D_PAD=max(16, triton.next_power_of_2(d)),
    )
    launch(lambda cfg: (triton.cdiv(n, cfg["BLOCK_M"]), batch * heads), *args, **meta)
    return (out, *stats) if kept_rows is None else (out, *stats, kept)


def flops(batch: int, heads: int, n: int, d: int) -> int:
    """Matmul FLOPs of one forward (q·kᵀ and p·v), the convention of attention benchmarks."""
    return 4 * batch * heads * n * n * d


__all__ = [
    "CONFIGS",
    "LN2",
    "LOG2E",
    "MAX_HEAD_DIM",
    "MAX_KEPT_ROWS",
    "SUPPORTED_DTYPES",
    "attention_stats_fwd_kernel",
    "attention_with_stats_forward",
    "check_inputs",
    "flops",
    "launch",
]


def aot_specializations():
    """Every autotune config for bf16 (head dim 80, padded to 128, with bias) and fp32 (64) inputs,
    and the bf16 one again with kept rows (``KEEP_ROWS``)."""
    from beyond_cls.kernels.aot import Specialization, pointer

    strides = [a for a in attention_stats_fwd_kernel.arg_names if a.startswith("stride_")]
    variants = ((torch.bfloat16, 80, True, False), (torch.float32, 64, False, False), (torch.bfloat16, 80, True, True))
    for block_m, block_n, warps, stages in CONFIGS:
        for dtype, head_dim, has_bias, keep_rows in variants:
            signature = {name: pointer(dtype) for name in ("Q", "K", "V", "Out")}
            signature |= {name: "*fp32" for name in ("Bias", "SelfAttn", "ClsAttn", "PatchMass", "PatchEntropy")}
            signature |= {"KeepRows": "*i32", "Kept": "*fp32"}
            signature |= {name: "i32" for name in (*strides, "H", "N", "HEAD_DIM", "NUM_KEPT")} | {"qk_scale": "fp32"}
            constexprs = dict(
                NUM_PREFIX=1, HAS_BIAS=has_bias, FP32_DOT=GPU_FP32_DOT if dtype == torch.float32 else "",
                UPCAST_DOT=False, KEEP_ROWS=keep_rows, D_PAD=triton.next_power_of_2(head_dim),
                BLOCK_M=block_m, BLOCK_N=block_n,
            )
            keep = "-keep" if keep_rows else ""
            label = f"{str(dtype).removeprefix('torch.')}-d{head_dim}{keep}-M{block_m}-N{block_n}-w{warps}-s{stages}"
            yield Specialization(signature, constexprs, warps, stages, label)
