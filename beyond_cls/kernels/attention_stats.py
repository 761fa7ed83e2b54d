"""Fused softmax attention with per-row statistics (Triton, forward only).

One program per (block of BLOCK_M queries, batch·head). Scores are kept in base 2. The patch keys
J = P..N−1 stream through an online softmax whose running max m is the patch max, so that its
normalizer is the patch normalizer and the entropy sum costs one multiply-add per key (x = t − m):

    Zp = Σ_J 2^x          Tp = Σ_J 2^x·x          acc = Σ_J 2^x·v

all rescaled by α = 2^(m_old − m_new) when m moves (Tp' = α·(Tp + (m_old − m_new)·Zp)). The last
1..BLOCK_N patch keys come first, as one masked block (its loads issued with the queries'); then full
blocks of BLOCK_N keys, without masks, in the pipelined loop. After it one small dot takes the P ≤ 16
prefix keys against the row's max M = max(m, prefix logits):

    l = Σ_prefix 2^(t−M) + Zp·2^(m−M)           out = (Σ_prefix 2^(t−M)·v + acc·2^(m−M)) / l
    patch_mass = Zp·2^(m−M) / l                 patch_entropy = ln2·(log2 Zp − Tp/Zp)   (exact; 0·log 0 = 0)
    cls_attn = 2^(t_i0 − M) / l                 self_attn = 2^(t_ii − M) / l

The patch statistics are relative to the patch max: exact even when prefix keys take nearly all of the
attention. t_i0 comes from the prefix dot; t_ii is picked from one or two dots of the loop's shape
over the keys of the program's own rows, so it is bit-equal to the value inside l (a row-wise q_i·k_i,
rounded differently, is off by float32 accumulation error, which shows in full when a_ii ≈ 1).

Precision: without a bias, the row max is taken over the raw products q·k and scaled once by
c = scale·log2 e, and x = q·k·c − m is one fused multiply-add, so nothing is rounded at the logits'
magnitude but m, which is the same for every key of a row and cancels in every ratio: logits of 1e4
lose nothing (numpy has no FMA: the interpreter emulates it in float64). With a bias, s = q·k·scale + bias
is rounded once (one FMA), as any float32 evaluation of it is, and the max is subtracted before the
base-2 scaling (x = (s − m)·log2 e).

The head dim is two power-of-two chunks D1 + D2 (80 = 64 + 16: two dots, nothing padded to 128).

Kept rows (``keep_rows``, constexpr ``KEEP_ROWS``): after the loop, a program whose block of queries
holds kept rows computes their logits again in one more pass over the keys (a 16-row dot per key
block) and stores 2^(t − M) / l into [B, H, R, N]. The loop is the same with or without them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from beyond_cls.kernels import fp32_dot_precision
from beyond_cls.kernels.launch import KernelLaunch, run
from beyond_cls.numerics import MAX_KEPT_ROWS
from beyond_cls.triton_mode import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LOG2E = tl.constexpr(LOG2E)  # jit code reads globals only as constexpr
_LN2 = tl.constexpr(LN2)
_NO_MAX = tl.constexpr(-1.0e38)  # initial running max: finite, so rescaling an empty state gives 0, not NaN
MAX_PREFIX_TOKENS = 16  # prefix keys are one 16-key block
_PREFIX_BLOCK = tl.constexpr(16)
_KEPT_BLOCK = tl.constexpr(16)  # kept rows are one 16-row dot (tl.dot needs M >= 16); MAX_KEPT_ROWS <= 16
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128

# (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_M <= 2·BLOCK_N. At the runtime specializations of bf16 ViT
# shapes (d = 64 and 80, bias and kept rows included) none spills on sm_80 or sm_90 and each fits sm_80's shared
# memory (166912 B per block); 4 warps at <= 168 registers keep 3 programs per sm_90 SM. 32-key blocks are out:
# their loop costs 14.8 SASS per score element on sm_90 (its fixed per-block work spread over half the keys),
# above the 11 the static report requires (benchmarks/results/static_sm90.md).
CONFIGS = [
    (64, 64, 4, 3),
    (128, 64, 8, 3),
]
# Under TRITON_INTERPRET=1 (CPU tests) one config runs; autotuning would only time numpy.
INTERPRET_CONFIG = (64, 32, 4, 1)


def head_dim_split(d: int) -> tuple[int, int]:
    """(D1, D2): the head dim as two power-of-two chunks for tl.dot (each >= 16, D2 = 0 for none), e.g.
    80 -> (64, 16), 96 -> (64, 32), 64 -> (64, 0); d < 16 and d = 112 are padded (masked loads)."""
    d1 = max(16, 1 << (d.bit_length() - 1))
    rest = d - d1
    return d1, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


@triton.jit
def _dot(a, b, acc, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in float32. FP32_DOT: "" for 16-bit inputs (one tensor-core dot), else the
    ``input_precision`` of float32 inputs: "tf32x3" on a GPU (float32-accurate, not TF32), "ieee" in the
    interpreter (``beyond_cls.kernels.fp32_dot_precision``). UPCAST multiplies in float32 after an exact
    upcast: the interpreter cannot multiply bfloat16 matrices (bf16 products are exact in float32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_DOT != "":
        return tl.dot(a, b, acc, input_precision=FP32_DOT)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _fma(a, b, c, INTERPRET: tl.constexpr):
    """a·b + c rounded once: a fused multiply-add on a GPU, float64 arithmetic in the interpreter (numpy
    has no FMA; a float32 product is exact in float64)."""
    if INTERPRET:
        return (a.to(tl.float64) * b + c).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _tile(base, offs_r, offs_c, stride_r, stride_c, r_ok, c_ok, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """base[offs_r, offs_c] (strided), zero where a mask is off; no mask code for MASK_R/MASK_C False."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_R and MASK_C:
        return tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    elif MASK_R:
        return tl.load(ptrs, mask=r_ok[:, None], other=0.0)
    elif MASK_C:
        return tl.load(ptrs, mask=c_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _key_tiles(k_base, start_n, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_kn, stride_kd,
               D2: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr):
    """Keys start_n + offs_j, transposed: [D1, BLOCK_N] and [D2, BLOCK_N] (the first again without D2).
    Addresses are the block's base plus loop-invariant offsets."""
    base = k_base + start_n * stride_kn
    col_ok = start_n + offs_j < N
    k1 = _tile(base, offs_d1, offs_j, stride_kd, stride_kn, offs_d1 < HEAD_DIM, col_ok, MASK_D, MASK_N)
    k2 = k1
    if D2 > 0:
        k2 = _tile(base, offs_d2, offs_j, stride_kd, stride_kn, offs_d2 < HEAD_DIM, col_ok, MASK_D, MASK_N)
    return k1, k2


@triton.jit
def _row_tiles(base, start, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_n, stride_d,
               D2: tl.constexpr, MASK_D: tl.constexpr, MASK_N: tl.constexpr):
    """Rows start + offs_j (values, or queries): [rows, D1] and [rows, D2] (the first again without D2)."""
    base = base + start * stride_n
    row_ok = start + offs_j < N
    t1 = _tile(base, offs_j, offs_d1, stride_n, stride_d, row_ok, offs_d1 < HEAD_DIM, MASK_N, MASK_D)
    t2 = t1
    if D2 > 0:
        t2 = _tile(base, offs_j, offs_d2, stride_n, stride_d, row_ok, offs_d2 < HEAD_DIM, MASK_N, MASK_D)
    return t1, t2


@triton.jit
def _bias_tile(bias_base, rows, start_n, offs_j, N, stride_bm, stride_bn, HAS_BIAS: tl.constexpr,
               MASK_N: tl.constexpr):
    """The bias of rows × keys start_n + offs_j (float32), or 0.0 without a bias."""
    if HAS_BIAS:
        col_ok = start_n + offs_j < N
        bias = _tile(bias_base + start_n * stride_bn, rows, offs_j, stride_bm, stride_bn, col_ok, col_ok,
                     False, MASK_N)
        return bias.to(tl.float32)
    else:
        return 0.0


@triton.jit
def _scores(q1, q2, k1, k2, D2: tl.constexpr, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """q·kᵀ [rows, keys] in float32, over the head dim's one or two chunks."""
    qk = _dot(q1, k1, None, FP32_DOT, UPCAST)
    if D2 > 0:
        qk = _dot(q2, k2, qk, FP32_DOT, UPCAST)
    return qk


@triton.jit
def _logits(qk, bias, col_ok, qk_scale, HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """(t, row max of t) over the keys col_ok. With a bias, t = q·k·scale + bias in natural units, rounded once
    (one FMA) at its own magnitude as any float32 evaluation is, −inf where masked; without one, t = q·k and the
    max is max(q·k)·c (c = scale·log2 e ≥ 0) in base 2: _shift forms q·k·c − m in one FMA. The running max m is
    in these units."""
    if HAS_BIAS:
        t = _fma(qk, qk_scale, bias, INTERPRET)
        if MASK_N:
            t = tl.where(col_ok[None, :], t, float("-inf"))
        return t, tl.max(t, 1)
    else:
        if MASK_N:
            return qk, tl.max(tl.where(col_ok[None, :], qk, float("-inf")), 1) * (qk_scale * _LOG2E)
        return qk, tl.max(qk, 1) * (qk_scale * _LOG2E)


@triton.jit
def _shift(t, qk_scale, m, col_ok, HAS_BIAS: tl.constexpr, MASK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """x = (t − m)·log2 e per row, t from _logits, −inf where masked: the max subtracted before scaling (exact for
    close logits of any magnitude) with a bias, else one FMA q·k·c − m (masked after it: −inf·0 is NaN)."""
    if HAS_BIAS:
        return (t - m[:, None]) * _LOG2E
    else:
        x = _fma(t, qk_scale * _LOG2E, -m[:, None], INTERPRET)
        if MASK_N:
            x = tl.where(col_ok[None, :], x, float("-inf"))
        return x


@triton.jit
def _base2(d, HAS_BIAS: tl.constexpr):
    """A difference of running maxima in base-2 units (they are natural units with a bias)."""
    if HAS_BIAS:
        return d * _LOG2E
    else:
        return d


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """Columns [0, WIDTH/2) and [WIDTH/2, WIDTH) of x [BLOCK_M, WIDTH]."""
    return tl.split(tl.permute(tl.reshape(x, [BLOCK_M, 2, WIDTH // 2]), 0, 2, 1))


@triton.jit
def _sum_products(e, x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """Σ_j e·x per row. tl.sum would multiply pairwise and add the products in a tree (1.44 instructions per
    element); here the block is cut into 8 column slices, which each thread of the MMA layouts holds whole
    (columns 8 apart), chained by FMAs: one instruction per element."""
    if BLOCK_N >= 64:
        e0, e1 = _halves(e, BLOCK_M, BLOCK_N)
        x0, x1 = _halves(x, BLOCK_M, BLOCK_N)
        e00, e01 = _halves(e0, BLOCK_M, BLOCK_N // 2)
        x00, x01 = _halves(x0, BLOCK_M, BLOCK_N // 2)
        e10, e11 = _halves(e1, BLOCK_M, BLOCK_N // 2)
        x10, x11 = _halves(x1, BLOCK_M, BLOCK_N // 2)
        a, b = _halves(e00, BLOCK_M, BLOCK_N // 4)
        xa, xb = _halves(x00, BLOCK_M, BLOCK_N // 4)
        acc = _fma(a, xa, b * xb, INTERPRET)
        a, b = _halves(e01, BLOCK_M, BLOCK_N // 4)
        xa, xb = _halves(x01, BLOCK_M, BLOCK_N // 4)
        acc = _fma(b, xb, _fma(a, xa, acc, INTERPRET), INTERPRET)
        a, b = _halves(e10, BLOCK_M, BLOCK_N // 4)
        xa, xb = _halves(x10, BLOCK_M, BLOCK_N // 4)
        acc = _fma(b, xb, _fma(a, xa, acc, INTERPRET), INTERPRET)
        a, b = _halves(e11, BLOCK_M, BLOCK_N // 4)
        xa, xb = _halves(x11, BLOCK_M, BLOCK_N // 4)
        acc = _fma(b, xb, _fma(a, xa, acc, INTERPRET), INTERPRET)
        return tl.sum(acc, 1)
    else:
        return tl.sum(e * x, 1)


@triton.jit
def _fold_patches(
    qk, bias, v1, v2, col_ok, qk_scale, m_i, l_i, tp_i, acc1, acc2,
    HAS_BIAS: tl.constexpr, D2: tl.constexpr, MASK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Fold one block of patch keys (scores qk, values v) into the running (m, Zp = l, Tp, acc)."""
    t, t_max = _logits(qk, bias, col_ok, qk_scale, HAS_BIAS, MASK_N, INTERPRET)
    m_new = tl.maximum(m_i, t_max)
    x = _shift(t, qk_scale, m_new, col_ok, HAS_BIAS, MASK_N, INTERPRET)
    e = tl.exp2(x)
    if MASK_N or HAS_BIAS:
        x = tl.maximum(x, _NO_MAX)  # masked keys: e·x would be 0·(−inf)
    dm = _base2(m_i - m_new, HAS_BIAS)
    alpha = tl.exp2(dm)
    tp_i = alpha * (tp_i + dm * l_i) + _sum_products(e, x, BLOCK_M, BLOCK_N, INTERPRET)
    l_i = l_i * alpha + tl.sum(e, 1)
    p = e
    if not UPCAST:
        p = e.to(v1.dtype)
    acc1 = _dot(p, v1, acc1 * alpha[:, None], FP32_DOT, UPCAST)
    if D2 > 0:
        acc2 = _dot(p, v2, acc2 * alpha[:, None], FP32_DOT, UPCAST)
    return m_new, l_i, tp_i, acc1, acc2


@triton.jit
def _pick_diagonal(qk, offs_m, start_n, offs_j):
    """qk[i, i − start_n] for the rows i whose own key is in this block (0 for the others)."""
    return tl.sum(tl.where(offs_m[:, None] == (start_n + offs_j)[None, :], qk, 0.0), 1)


@triton.jit
def _row_dot(q_base, k_base, q_rows, k_rows, stride_qn, stride_qd, stride_kn, stride_kd, HEAD_DIM,
             D: tl.constexpr, MASK_D: tl.constexpr):
    """Σ_d q[q_rows, d]·k[k_rows, d] over the head dim in float32, 16 dims at a time."""
    total = tl.zeros(q_rows.shape, tl.float32)
    for d0 in range(0, D, 16):
        offs_d = d0 + tl.arange(0, 16)
        d_ok = offs_d < HEAD_DIM
        qr = _tile(q_base, q_rows, offs_d, stride_qn, stride_qd, d_ok, d_ok, False, MASK_D)
        kr = _tile(k_base, k_rows, offs_d, stride_kn, stride_kd, d_ok, d_ok, False, MASK_D)
        total += tl.sum(qr.to(tl.float32) * kr.to(tl.float32), 1)
    return total


@triton.jit
def _store_kept_rows(
    q_base, k_base, bias_base, KeepRows, kept_base, M, inv_l, offs_m, first_row, offs_d1, offs_d2,
    N, HEAD_DIM, NUM_KEPT, qk_scale, stride_qn, stride_qd, stride_kn, stride_kd, stride_bm, stride_bn,
    HAS_BIAS: tl.constexpr, D2: tl.constexpr, MASK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr, UPCAST: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Kept rows of this program's query block: their logits again (all keys), stored as 2^(t − M) / l."""
    slots = tl.arange(0, _KEPT_BLOCK)
    kept_rows = tl.load(KeepRows + slots, mask=slots < NUM_KEPT, other=-1)
    mine = (kept_rows >= first_row) & (kept_rows < first_row + BLOCK_M)
    if tl.max(mine.to(tl.int32), 0) > 0:
        rows = tl.where(mine, kept_rows, 0)
        pick = rows[:, None] == offs_m[None, :]  # [KEPT, BLOCK_M]: each kept row's place in the block
        m_k = tl.where(mine, tl.sum(tl.where(pick, M[None, :], 0.0), 1), float("inf"))  # others: p = 0
        inv_l_k = tl.sum(tl.where(pick, inv_l[None, :], 0.0), 1)
        q1, q2 = _row_tiles(q_base, 0, rows, offs_d1, offs_d2, N, HEAD_DIM, stride_qn, stride_qd, D2, MASK_D,
                            False)
        offs_j = tl.arange(0, BLOCK_N)
        for start_n in range(0, N, BLOCK_N):
            col_ok = start_n + offs_j < N
            k1, k2 = _key_tiles(k_base, start_n, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_kn, stride_kd,
                                D2, MASK_D, True)
            bias = _bias_tile(bias_base, rows, start_n, offs_j, N, stride_bm, stride_bn, HAS_BIAS, True)
            t, _ = _logits(_scores(q1, q2, k1, k2, D2, FP32_DOT, UPCAST), bias, col_ok, qk_scale, HAS_BIAS, True,
                           INTERPRET)
            p = tl.exp2(_shift(t, qk_scale, m_k, col_ok, HAS_BIAS, True, INTERPRET)) * inv_l_k[:, None]
            tl.store(kept_base + slots[:, None] * N + (start_n + offs_j)[None, :], p,
                     mask=mine[:, None] & col_ok[None, :])


@triton.jit
def attention_stats_fwd_kernel(
    Q, K, V, Bias, Out, SelfAttn, ClsAttn, PatchMass, PatchEntropy, KeepRows, Kept,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, HEAD_DIM, NUM_KEPT, qk_scale,
    NUM_PREFIX: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr, INTERPRET: tl.constexpr,
    KEEP_ROWS: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, MASK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """qk_scale: the logits' scale (> 0). Out may be any strided [B, H, N, d] view (the host passes [B, N, H, d])."""
    tl.static_assert(BLOCK_M <= 2 * BLOCK_N, "the diagonal logits are picked from at most two key blocks")
    UPCAST: tl.constexpr = INTERPRET and Q.dtype.element_ty == tl.bfloat16
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    first_row = pid_m * BLOCK_M
    offs_m = first_row + tl.arange(0, BLOCK_M)
    rows = tl.minimum(offs_m, N - 1)  # loads of rows past N repeat row N-1: no masks; never stored
    offs_j = tl.arange(0, BLOCK_N)
    offs_d1 = tl.arange(0, D1)
    offs_d2 = offs_d1  # the second head-dim chunk, if any
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    bias_base = Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh

    # Loads first, so that their latencies overlap the queries': the last block of patch keys (1..BLOCK_N keys,
    # masked) and the key blocks holding this program's diagonal. (Tiles held across the loop would spill at
    # d = 80 on sm_80: the prefix keys, the bias, the diagonal's bias are loaded where they are used.)
    q1, q2 = _row_tiles(q_base, 0, rows, offs_d1, offs_d2, N, HEAD_DIM, stride_qn, stride_qd, D2, MASK_D, False)
    last = N - 1 - (N - 1 - NUM_PREFIX) % BLOCK_N
    k1, k2 = _key_tiles(k_base, last, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_kn, stride_kd, D2, MASK_D,
                        True)
    v1, v2 = _row_tiles(v_base, last, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_vn, stride_vd, D2, MASK_D,
                        True)
    first_key = tl.maximum(first_row, NUM_PREFIX)  # the patch keys of the diagonal: [first_key, first_row + BLOCK_M)
    dk1, dk2 = _key_tiles(k_base, first_key, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_kn, stride_kd, D2,
                          MASK_D, True)
    ek1, ek2 = dk1, dk2
    if BLOCK_M > BLOCK_N:
        ek1, ek2 = _key_tiles(k_base, first_key + BLOCK_N, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_kn,
                              stride_kd, D2, MASK_D, True)

    # each patch row's own logit, picked from a dot of the same shape as the loop's: bit-equal to the value in l
    # (a separately rounded row-wise q_i·k_i differs by float32 accumulation error, which shows in full when
    # a_ii ≈ 1)
    qk_ii = _pick_diagonal(_scores(q1, q2, dk1, dk2, D2, FP32_DOT, UPCAST), offs_m, first_key, offs_j)
    if BLOCK_M > BLOCK_N:
        qk_ii += _pick_diagonal(_scores(q1, q2, ek1, ek2, D2, FP32_DOT, UPCAST), offs_m, first_key + BLOCK_N, offs_j)

    # the last block of patch keys starts the running state (m: patch max, base 2; l = Zp; Tp; acc)
    acc1 = tl.zeros([BLOCK_M, D1], tl.float32)
    acc2 = tl.zeros([BLOCK_M, 16], tl.float32)  # unused (carried unchanged) without a second chunk
    if D2 > 0:
        acc2 = tl.zeros([BLOCK_M, D2], tl.float32)
    bias = _bias_tile(bias_base, rows, last, offs_j, N, stride_bm, stride_bn, HAS_BIAS, True)
    m_i, l_i, tp_i, acc1, acc2 = _fold_patches(
        _scores(q1, q2, k1, k2, D2, FP32_DOT, UPCAST), bias, v1, v2, last + offs_j < N, qk_scale,
        tl.full([BLOCK_M], _NO_MAX, tl.float32), tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M], tl.float32),
        acc1, acc2, HAS_BIAS, D2, True, BLOCK_M, BLOCK_N, FP32_DOT, UPCAST, INTERPRET)

    # full blocks of patch keys, without masks, pipelined
    for start_n in range(NUM_PREFIX, last, BLOCK_N):
        k1, k2 = _key_tiles(k_base, start_n, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_kn, stride_kd, D2,
                            MASK_D, False)
        v1, v2 = _row_tiles(v_base, start_n, offs_j, offs_d1, offs_d2, N, HEAD_DIM, stride_vn, stride_vd, D2,
                            MASK_D, False)
        bias = _bias_tile(bias_base, rows, start_n, offs_j, N, stride_bm, stride_bn, HAS_BIAS, False)
        m_i, l_i, tp_i, acc1, acc2 = _fold_patches(
            _scores(q1, q2, k1, k2, D2, FP32_DOT, UPCAST), bias, v1, v2, offs_j, qk_scale, m_i, l_i, tp_i,
            acc1, acc2, HAS_BIAS, D2, False, BLOCK_M, BLOCK_N, FP32_DOT, UPCAST, INTERPRET)

    t_ii = qk_ii
    if HAS_BIAS:
        t_ii = _fma(qk_ii, qk_scale, tl.load(bias_base + rows * (stride_bm + stride_bn)).to(tl.float32), INTERPRET)

    # prefix keys, against the row max M
    if NUM_PREFIX > 0:
        offs_p = tl.arange(0, _PREFIX_BLOCK)
        pk1, pk2 = _key_tiles(k_base, 0, offs_p, offs_d1, offs_d2, NUM_PREFIX, HEAD_DIM, stride_kn, stride_kd, D2,
                              MASK_D, True)
        pv1, pv2 = _row_tiles(v_base, 0, offs_p, offs_d1, offs_d2, NUM_PREFIX, HEAD_DIM, stride_vn, stride_vd, D2,
                              MASK_D, True)
        p_bias = _bias_tile(bias_base, rows, 0, offs_p, NUM_PREFIX, stride_bm, stride_bn, HAS_BIAS, True)
        t, t_max = _logits(_scores(q1, q2, pk1, pk2, D2, FP32_DOT, UPCAST), p_bias, offs_p < NUM_PREFIX, qk_scale,
                           HAS_BIAS, True, INTERPRET)
        M = tl.maximum(m_i, t_max)
        x = _shift(t, qk_scale, M, offs_p < NUM_PREFIX, HAS_BIAS, True, INTERPRET)
        e = tl.exp2(x)
        x_i0 = tl.sum(tl.where(offs_p[None, :] == 0, x, 0.0), 1)
        x_ii_prefix = tl.sum(tl.where(offs_p[None, :] == offs_m[:, None], x, 0.0), 1)  # rows i < P
        to_row_max = tl.exp2(_base2(m_i - M, HAS_BIAS))
        l_all = l_i * to_row_max + tl.sum(e, 1)
        p = e
        if not UPCAST:
            p = e.to(pv1.dtype)
        acc1 = _dot(p, pv1, acc1 * to_row_max[:, None], FP32_DOT, UPCAST)
        if D2 > 0:
            acc2 = _dot(p, pv2, acc2 * to_row_max[:, None], FP32_DOT, UPCAST)
    else:  # no prefix: a_i0 is the first patch key's (the front reports no cls_attn then)
        M = m_i
        to_row_max = tl.full([BLOCK_M], 1.0, tl.float32)
        l_all = l_i
        qk_i0 = _row_dot(q_base, k_base, rows, tl.zeros([BLOCK_M], tl.int32), stride_qn, stride_qd, stride_kn,
                         stride_kd, HEAD_DIM, D1 + D2, MASK_D)
        t_i0 = qk_i0
        if HAS_BIAS:
            t_i0 = _fma(qk_i0, qk_scale, tl.load(bias_base + rows * stride_bm).to(tl.float32), INTERPRET)
        x_i0 = tl.reshape(_shift(t_i0[:, None], qk_scale, M, None, HAS_BIAS, False, INTERPRET), [BLOCK_M])
    x_ii = tl.reshape(_shift(t_ii[:, None], qk_scale, M, None, HAS_BIAS, False, INTERPRET), [BLOCK_M])
    row_ok = offs_m < N
    x_ii = tl.where(row_ok, x_ii, 0.0)  # rows past N (not stored) picked no key
    if NUM_PREFIX > 0:
        x_ii = tl.where(offs_m < NUM_PREFIX, x_ii_prefix, x_ii)

    inv_l = 1.0 / l_all
    o_base = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d1[None, :] * stride_od
    tl.store(o_ptrs, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d1 < HEAD_DIM)[None, :])
    if D2 > 0:
        o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d2[None, :] * stride_od
        tl.store(o_ptrs, (acc2 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d2 < HEAD_DIM)[None, :])

    stat = pid_bh.to(tl.int64) * N + offs_m
    tl.store(SelfAttn + stat, tl.exp2(x_ii) * inv_l, mask=row_ok)
    tl.store(ClsAttn + stat, tl.exp2(x_i0) * inv_l, mask=row_ok)
    tl.store(PatchMass + stat, l_i * to_row_max * inv_l, mask=row_ok)
    entropy = tl.where(l_i > 0, (tl.log2(l_i) - tp_i / l_i) * _LN2, 0.0)
    tl.store(PatchEntropy + stat, entropy, mask=row_ok)

    if KEEP_ROWS:
        kept_base = Kept + pid_bh.to(tl.int64) * NUM_KEPT * N  # [R, N] slice of this batch·head
        _store_kept_rows(
            q_base, k_base, bias_base, KeepRows, kept_base, M, inv_l, offs_m, first_row, offs_d1, offs_d2,
            N, HEAD_DIM, NUM_KEPT, qk_scale, stride_qn, stride_qd, stride_kn, stride_kd, stride_bm, stride_bn,
            HAS_BIAS, D2, MASK_D, BLOCK_M, BLOCK_N, FP32_DOT, UPCAST, INTERPRET)


# the kernel and its launch rules; the autotuner's key (it adds the tensor arguments' dtypes itself)
_KERNEL = KernelLaunch("attention_stats", attention_stats_fwd_kernel, CONFIGS, INTERPRET_CONFIG,
                       ("N", "HEAD_DIM", "NUM_PREFIX", "HAS_BIAS", "FP32_DOT", "INTERPRET", "KEEP_ROWS"))


def launch(grid, *args, config: tuple[int, int, int, int] | None = None, **meta) -> None:
    """Run the kernel over ``grid(blocks)`` (``beyond_cls.kernels.launch.run``) at ``config`` (BLOCK_M, BLOCK_N,
    num_warps, num_stages) when given; else at INTERPRET_CONFIG in the interpreter, autotuned over CONFIGS on a GPU."""
    run(_KERNEL, grid, args, meta, config)


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
    """Launch the kernel: (out [B, H, N, d] in v's dtype, stats [S, B, H, N] float32).

    ``stats`` stacks the row statistics in :data:`beyond_cls.statistics.ROW_STATISTICS` order (the kernel writes
    each plane through its own pointer). q, k, v may be strided views (e.g. timm's qkv reshape/permute): no copies
    are made (but of q for a negative ``scale``). ``out`` is the [B, H, N, d] view of a [B, N, H, d] tensor.
    ``bias`` must broadcast to [B, H, N, N]; broadcast dimensions are read with stride 0. With ``keep_rows`` (1 to
    ``MAX_KEPT_ROWS`` distinct query indices, negative from the end) a third tensor follows: the kept rows' softmax
    probabilities [B, H, R, N] float32, computed in the same launch.
    """
    check_inputs(q, k, v, num_prefix_tokens)
    batch, heads, n, d = q.shape
    kept_rows = None
    if keep_rows is not None:
        from beyond_cls.reference import keep_row_indices

        kept_rows = keep_row_indices(keep_rows, n)
    scale = d**-0.5 if scale is None else float(scale)
    if scale < 0:  # the kernel takes the row max of q·k before scaling: q·k·scale = (−q)·k·|scale|
        q, scale = -q, -scale
    # stored [B, N, H, d], SDPA's layout (the op's contract, beyond_cls.ops.attention_stats): merging heads is a view
    out = v.new_empty((batch, n, heads, d)).transpose(1, 2)
    from beyond_cls.statistics import ROW_STATISTICS

    stats = torch.empty((len(ROW_STATISTICS), batch, heads, n), dtype=torch.float32, device=q.device)
    planes = dict(zip((row.name for row in ROW_STATISTICS), stats.unbind(0)))
    # the kernel's output pointers, in its argument order (SelfAttn, ClsAttn, PatchMass, PatchEntropy)
    kernel_planes = [planes[name] for name in ("self_attn", "cls_attn", "patch_mass", "patch_entropy")]
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
        q, k, v, bias if bias is not None else q, out, *kernel_planes, table, kept if num_kept else q,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        heads, n, d, num_kept, scale,
    )
    d1, d2 = head_dim_split(d)
    meta = dict(
        NUM_PREFIX=num_prefix_tokens,
        HAS_BIAS=bias is not None,
        FP32_DOT=fp32_dot_precision() if q.dtype == torch.float32 else "",
        INTERPRET=interpreting(),
        KEEP_ROWS=kept_rows is not None,
        D1=d1,
        D2=d2,
        MASK_D=d1 + d2 != d,
    )
    launch(lambda cfg: (triton.cdiv(n, cfg["BLOCK_M"]), batch * heads), *args, **meta)
    return (out, stats) if kept_rows is None else (out, stats, kept)


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
    "head_dim_split",
    "launch",
]
