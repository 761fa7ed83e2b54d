"""AbMILP / softmax pooling (Triton), forward and backward, K score branches: one read of the tokens each way.

Forward: each program streams one batch row (or one chunk of its tokens) in tiles of BLOCK_N tokens and runs
an online softmax: per tile the logits ``z·W[k]`` (the per-branch bias cancels in the softmax and is never
read), the running max and normalizer, and ``acc[k] = α·acc[k] + Σ_n p[k,n] z_n``. The program's warps split
the branches (KW = K_PAD / warps each) and each holds its branches' whole row of D columns in registers: no
cross-warp reduction anywhere, one tile load shared by a warp's branches (the other warps' loads of a tile
are served by L1 / L2: it leaves HBM once). The row's D columns are two groups of CHUNK_D-wide chunks, GA and
GB of them (powers of two: 768 = 512 + 256, 1280 = 1024 + 256), so common widths are not padded to a power
of two. A small batch splits the tokens into chunks (flash-decoding style) whose partial (max, normalizer,
acc) a combine kernel merges.
Backward (one persistent program per a fixed set of rows): per tile ``g·z``, ``dl = s·(g·z − g·pooled)
[+ s·(gs − Σ s·gs)]``, the weight gradient ``Σ dl·z`` kept in registers (one partial per program, summed
in a fixed order: deterministic) and, only when asked, ``dz = Σ_k s·g + dl·W``.

All arithmetic is float32 FMAs on exactly converted tokens (float64 for float64 tokens): no tensor-core
splitting, so every token dtype gives float32-accurate results at any magnitude.

Bytes moved per call (B rows, N tokens of s bytes, D features, K branches; float32 outputs) against the minimum:
  forward   B·N·D·s (the tokens, once) + B·K·N·4 (scores) + B·K·D·4 (pooled) = the minimum, plus B·K·N·8 (raw
            logits stored, then read back and normalized in place); a split row adds S·K·(D + 2)·8 (partials)
            and K·N·8 (its raw logits) for S chunks.
  backward  B·N·D·s (the tokens, once) + B·K·D·4 (grad_pooled; none if it is expanded) + B·K·N·4 (scores)
            [+ B·K·N·4 grad_scores] [+ B·N·D·s the tokens' gradient] [+ B·K·N·4 grad_logits] + K·D·4 = the minimum,
            plus B·K·D·4 (pooled, for g·pooled), [B·K·N·4, grad_scores read a second time for Σ s·gs] and
            P·K·D·8 (the weight gradient's partials, one per program; see BWD_WARPS_PER_SM).
B = 1024, N = 196, D = 768, bf16 tokens (308 MB), K = 1: the extras are 1.6 MB (0.5 %) forward and 9.4 MB (3 %)
backward (P = 1024); K = 8: 12.8 MB (4 %) and 50 MB (16 %: pooled, 25 MB, and the partials, P = 512).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from beyond_cls.kernels.launch import KernelLaunch, run
from beyond_cls.numerics import MAX_BRANCHES, accumulation_dtype
from beyond_cls.triton_mode import interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: exact tests
# Launch configs (BLOCK_N, BLOCK_D, num_warps, num_stages) per kernel; on a GPU each kernel is autotuned over
# the configs that suit the call (_fits). Row kernels ("fwd", "bwd"): BLOCK_N tokens per tile; the second entry
# is the chunk width CHUNK_D (one warp's 32 lanes × 16 bytes for 2-byte tokens, register repeats for wider ones;
# the kernels' BLOCK_D constexpr is the row's width in registers, GA + GB chunks); a warp per KW = K_PAD /
# num_warps branches; the tiles are plain loads (Triton pipelines only loads feeding dots), so num_stages is 1.
# "combine" merges the chunks of split rows: BLOCK_D pooled features per program, BLOCK_N scores per step.
# No kernel accumulates into its outputs, so rerunning a launch while tuning is idempotent.
ROW_BLOCK_D = 256
CONFIGS = {
    "fwd": [(bn, ROW_BLOCK_D, w, 1) for w in (1, 2, 4, 8, 16) for bn in (2, 4, 8) if bn * w < 128],
    "combine": [(64, 256, 4, 1)],
    "bwd": [(bn, ROW_BLOCK_D, w, 1) for w in (1, 2, 4, 8, 16) for bn in (1, 2, 4)],
}
# Under TRITON_INTERPRET=1 (CPU tests) one small config runs: autotuning would only time numpy. Its narrow
# chunks give the small test widths several of them (both column groups); row kernels take min(2, K_PAD) warps.
INTERPRET_CONFIG = (4, 64, 2, 1)
# 32-bit registers per thread a row kernel may need by the estimate behind _fits (_row_registers), set so that
# every kept config compiles without spills for sm_80 and sm_90 (ptxas may give it up to maxnreg: _max_registers;
# scaled down for 16 warps, whose threads have 128)
REGISTER_BUDGET = 250
SPLIT_TOKENS = 16  # token chunks of split rows are multiples of this (and of every BLOCK_N)
FILL_PROGRAMS_PER_SM = 4  # rows split until the grid has this many programs per SM
# backward programs: enough for this many warps per SM (a program: a warp per branch, at most 4 assumed), each with
# the same number of (row, chunk) items; more programs hide more latency, fewer write fewer weight-gradient partials
BWD_WARPS_PER_SM = 16
INTERPRET_SMS, NOMINAL_SMS = 1, 132
NORMALIZE_TOKENS = tl.constexpr(128)  # tokens per step of the row-wide loops over scores (not over tokens)


@triton.jit
def _cols(C0: tl.constexpr, G: tl.constexpr, CHUNK_D: tl.constexpr):
    """Feature index [1, G, 1, 1, CHUNK_D] of G chunks of CHUNK_D columns from C0."""
    chunk = tl.arange(0, G)[None, :, None, None, None] * CHUNK_D
    return C0 + chunk + tl.arange(0, CHUNK_D)[None, None, None, None, :]


@triton.jit
def _load_tokens(row, offs_n, n_ok, stride_n, stride_d, D, C0: tl.constexpr, G: tl.constexpr,
                 WARPS: tl.constexpr, CHUNK_D: tl.constexpr, acc_t: tl.constexpr):
    """Tokens [BLOCK_N, G, WARPS, 1, CHUNK_D] (one copy per warp: the product with the branches' rows stays
    in each warp's registers), converted to the accumulation dtype; 0 outside the row."""
    offs_d = _cols(C0, G, CHUNK_D)
    warp = tl.arange(0, WARPS)[None, None, :, None, None]
    ptrs = row + offs_n * stride_n + warp * 0 + offs_d * stride_d
    return tl.load(ptrs, mask=n_ok & (offs_d < D) & (warp >= 0), other=0.0).to(acc_t)


@triton.jit
def _load_rows(ptr, offs_k, k_ok, stride_k, stride_d, D, C0: tl.constexpr, G: tl.constexpr,
               CHUNK_D: tl.constexpr, acc_t: tl.constexpr):
    """Per-branch rows [1, G, WARPS, KW, CHUNK_D] of a [K, D] matrix (any strides); 0 outside."""
    offs_d = _cols(C0, G, CHUNK_D)
    return tl.load(ptr + offs_k * stride_k + offs_d * stride_d, mask=k_ok & (offs_d < D), other=0.0).to(acc_t)


@triton.jit
def _load_row_groups(ptr, offs_k, k_ok, stride_k, stride_d, D, GA: tl.constexpr, GB: tl.constexpr,
                     CHUNK_D: tl.constexpr, acc_t: tl.constexpr):
    """A [K, D] matrix's per-branch rows as the row's two column groups (GA, then GB chunks; the first again for
    GB = 0)."""
    a = _load_rows(ptr, offs_k, k_ok, stride_k, stride_d, D, 0, GA, CHUNK_D, acc_t)
    b = a
    if GB > 0:
        b = _load_rows(ptr, offs_k, k_ok, stride_k, stride_d, D, GA * CHUNK_D, GB, CHUNK_D, acc_t)
    return a, b


@triton.jit
def _zero_row_groups(GA: tl.constexpr, GB: tl.constexpr, WARPS: tl.constexpr, KW: tl.constexpr,
                     CHUNK_D: tl.constexpr, acc_t: tl.constexpr):
    """Zero per-branch rows [1, G, WARPS, KW, CHUNK_D] for both column groups (the first again for GB = 0)."""
    a = tl.zeros([1, GA, WARPS, KW, CHUNK_D], acc_t)
    b = a
    if GB > 0:
        b = tl.zeros([1, GB, WARPS, KW, CHUNK_D], acc_t)
    return a, b


@triton.jit
def _store_rows(ptr, x, offs_k, k_ok, D, C0: tl.constexpr, G: tl.constexpr, CHUNK_D: tl.constexpr):
    """Store per-branch rows [1, G, WARPS, KW, CHUNK_D] into a contiguous [K, D] matrix."""
    offs_d = _cols(C0, G, CHUNK_D)
    tl.store(ptr + offs_k * D + offs_d, x, mask=k_ok & (offs_d < D))


@triton.jit
def _branches(K, K_PAD: tl.constexpr, WARPS: tl.constexpr):
    """Branch index [1, 1, WARPS, KW, 1] (warp w holds branches w·KW .. w·KW + KW − 1) and its validity."""
    KW: tl.constexpr = K_PAD // WARPS
    offs_k = tl.arange(0, WARPS)[None, None, :, None, None] * KW + tl.arange(0, KW)[None, None, None, :, None]
    return offs_k, offs_k < K


@triton.jit
def _keep(Mask, b, offs_n, n_ok, stride_mb, stride_mn, HAS_MASK: tl.constexpr):
    """Tokens that take part: inside the range and, with a mask, kept by it."""
    keep = n_ok
    if HAS_MASK:
        keep = keep & (tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
    return keep


@triton.jit
def _normalize_scores(Raw, stride_rb, stride_rk, stride_rn, Mask, stride_mb, stride_mn, Scores, b, m_safe, inv,
                      offs_k, k_ok, N, K, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """scores[b, k, n] = exp(raw − max) / normalizer over the whole row (masked tokens: 0), BLOCK_N tokens a step
    (spread over the lanes, unlike the tiles of the main loop: each value is computed once)."""
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)[:, None, None, None, None]
        n_ok = offs_n < N
        keep = _keep(Mask, b, offs_n, n_ok, stride_mb, stride_mn, HAS_MASK)
        raw = tl.load(Raw + b * stride_rb + offs_k * stride_rk + offs_n * stride_rn, mask=k_ok & n_ok, other=0.0)
        raw = tl.where(keep, raw.to(m_safe.dtype), float("-inf"))
        tl.store(Scores + b * K * N + offs_k * N + offs_n, tl.exp(raw - m_safe) * inv, mask=k_ok & n_ok)


@triton.jit
def _abmilp_fwd_kernel(
    Z, W, Logits, Mask, Raw, Scores, Pooled, Part, Stats,
    stride_zb, stride_zn, stride_zd, stride_wk, stride_wd, stride_lb, stride_lk, stride_ln, stride_mb, stride_mn,
    N, D, K, CHUNK,
    GIVEN: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, K_PAD: tl.constexpr, WARPS: tl.constexpr,
    GA: tl.constexpr, CHUNK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax pooling of tokens [n_start, n_end) of row b, all branches, one read of the tokens.

    Logits: ``z·W[k]`` (AbMILP) or loaded (GIVEN, softmax pooling). Whole rows (not SPLIT) write pooled and the
    normalized scores (the raw logits go to Raw = Scores first); chunks write the raw logits to Raw and their
    (max, normalizer, unnormalized acc) to Stats / Part for the combine kernel."""
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = Pooled.dtype.element_ty
    KW: tl.constexpr = K_PAD // WARPS
    GB: tl.constexpr = BLOCK_D // CHUNK_D - GA  # the row: GA + GB chunks of CHUNK_D columns
    C1: tl.constexpr = GA * CHUNK_D
    offs_k, k_ok = _branches(K, K_PAD, WARPS)
    row = Z + b * stride_zb
    if not GIVEN:
        wa, wb = _load_row_groups(W, offs_k, k_ok, stride_wk, stride_wd, D, GA, GB, CHUNK_D, acc_t)
    acc_a, acc_b = _zero_row_groups(GA, GB, WARPS, KW, CHUNK_D, acc_t)
    m = tl.full([1, 1, WARPS, KW, 1], float("-inf"), acc_t)
    norm = tl.zeros([1, 1, WARPS, KW, 1], acc_t)
    n_start = split * CHUNK
    n_end = tl.minimum(N, n_start + CHUNK)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)[:, None, None, None, None]
        n_ok = offs_n < n_end
        za = _load_tokens(row, offs_n, n_ok, stride_zn, stride_zd, D, 0, GA, WARPS, CHUNK_D, acc_t)
        if GB > 0:
            zb = _load_tokens(row, offs_n, n_ok, stride_zn, stride_zd, D, C1, GB, WARPS, CHUNK_D, acc_t)
        if GIVEN:
            lg = tl.load(Logits + b * stride_lb + offs_k * stride_lk + offs_n * stride_ln, mask=k_ok & n_ok,
                         other=0.0).to(acc_t)
        else:
            part = tl.sum(za * wa, 1, keep_dims=True)  # chunks first: an FMA chain per column
            if GB > 0:
                part += tl.sum(zb * wb, 1, keep_dims=True)
            lg = tl.sum(part, 4, keep_dims=True)  # [BLOCK_N, 1, WARPS, KW, 1]
            tl.store(Raw + b * K * N + offs_k * N + offs_n, lg, mask=k_ok & n_ok)
        keep = _keep(Mask, b, offs_n, n_ok, stride_mb, stride_mn, HAS_MASK)
        lg = tl.where(keep, lg, float("-inf"))
        m_new = tl.maximum(m, tl.max(lg, 0, keep_dims=True))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no token yet: exp(-inf − 0) = 0, not NaN
        alpha = tl.exp(m - m_safe)
        p = tl.exp(lg - m_safe)
        norm = norm * alpha + tl.sum(p, 0, keep_dims=True)
        acc_a = acc_a * alpha + tl.sum(p * za, 0, keep_dims=True)
        if GB > 0:
            acc_b = acc_b * alpha + tl.sum(p * zb, 0, keep_dims=True)
        m = m_new
    if SPLIT:
        chunk = b * tl.num_programs(0) + split
        _store_rows(Part + chunk * K * D, acc_a, offs_k, k_ok, D, 0, GA, CHUNK_D)
        if GB > 0:
            _store_rows(Part + chunk * K * D, acc_b, offs_k, k_ok, D, C1, GB, CHUNK_D)
        tl.store(Stats + chunk * 2 * K + offs_k, m, mask=k_ok)
        tl.store(Stats + chunk * 2 * K + K + offs_k, norm, mask=k_ok)
    else:
        inv = 1.0 / norm  # a row with every token masked: 1/0, and NaN below, like softmax over all -inf
        _store_rows(Pooled + b * K * D, acc_a * inv, offs_k, k_ok, D, 0, GA, CHUNK_D)
        if GB > 0:
            _store_rows(Pooled + b * K * D, acc_b * inv, offs_k, k_ok, D, C1, GB, CHUNK_D)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tl.debug_barrier()  # the raw logits other threads stored are read back below
        if GIVEN:
            _normalize_scores(Logits, stride_lb, stride_lk, stride_ln, Mask, stride_mb, stride_mn, Scores, b, m_safe,
                              inv, offs_k, k_ok, N, K, HAS_MASK, NORMALIZE_TOKENS)
        else:
            _normalize_scores(Raw, K * N, N, 1, Mask, stride_mb, stride_mn, Scores, b, m_safe, inv, offs_k, k_ok, N, K,
                              HAS_MASK, NORMALIZE_TOKENS)


@triton.jit
def _abmilp_combine_kernel(
    Part, Stats, Raw, Mask, Scores, Pooled,
    stride_rb, stride_rk, stride_rn, stride_mb, stride_mn,
    N, D, K, SPLITS,
    HAS_MASK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the SPLITS chunks of row b: pooled[b, :, chunk] from the chunks' (max, normalizer, acc); the first
    feature chunk's program also writes the row's normalized scores from its raw logits."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = Pooled.dtype.element_ty
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    stats = Stats + b * SPLITS * 2 * K
    big_m = tl.full([K_PAD], float("-inf"), acc_t)
    for s in range(0, SPLITS):
        big_m = tl.maximum(big_m, tl.load(stats + s * 2 * K + offs_k, mask=k_ok, other=float("-inf")))
    m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)
    norm = tl.zeros([K_PAD], acc_t)
    acc = tl.zeros([K_PAD, BLOCK_D], acc_t)
    for s in range(0, SPLITS):
        scale = tl.exp(tl.load(stats + s * 2 * K + offs_k, mask=k_ok, other=float("-inf")) - m_safe)
        norm += scale * tl.load(stats + s * 2 * K + K + offs_k, mask=k_ok, other=0.0)
        part = tl.load(Part + (b * SPLITS + s) * K * D + offs_k[:, None] * D + offs_d[None, :],
                       mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += scale[:, None] * part
    inv = 1.0 / tl.where(k_ok, norm, 1.0)  # padding branches have no chunks
    tl.store(Pooled + b * K * D + offs_k[:, None] * D + offs_d[None, :], acc * inv[:, None],
             mask=k_ok[:, None] & d_ok[None, :])
    if pid_d == 0:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            keep = n_ok
            if HAS_MASK:
                keep = keep & (tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
            raw = tl.load(Raw + b * stride_rb + offs_k[:, None] * stride_rk + offs_n[None, :] * stride_rn,
                          mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(acc_t)
            raw = tl.where(keep[None, :], raw, float("-inf"))
            tl.store(Scores + b * K * N + offs_k[:, None] * N + offs_n[None, :],
                     tl.exp(raw - m_safe[:, None]) * inv[:, None], mask=k_ok[:, None] & n_ok[None, :])


@triton.jit
def _abmilp_bwd_kernel(
    Z, W, G, Pooled, Scores, GS, DLogits, DZ, DW,
    stride_zb, stride_zn, stride_zd, stride_wk, stride_wd, stride_gb, stride_gk, stride_gd,
    stride_sb, stride_sk, stride_sn,
    B, N, D, K, CHUNK, SPLITS,
    HAS_GS: tl.constexpr, HAS_WEIGHT: tl.constexpr, TOKENS_GRAD: tl.constexpr, K_PAD: tl.constexpr,
    WARPS: tl.constexpr, GA: tl.constexpr, CHUNK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward of both poolings over this program's (row, token chunk) items, one read of the tokens.

    dl = s·(g·z − g·pooled) [+ s·(gs − Σ s·gs)]; AbMILP (HAS_WEIGHT) accumulates its weight gradient Σ dl·z
    into this program's partial DW[program], softmax pooling stores dl as the logits' gradient; the tokens'
    gradient Σ_k s·g [+ dl·W] only with TOKENS_GRAD."""
    pid = tl.program_id(0)
    acc_t = DW.dtype.element_ty
    KW: tl.constexpr = K_PAD // WARPS
    GB: tl.constexpr = BLOCK_D // CHUNK_D - GA  # the row: GA + GB chunks of CHUNK_D columns
    C1: tl.constexpr = GA * CHUNK_D
    offs_k, k_ok = _branches(K, K_PAD, WARPS)
    if HAS_WEIGHT and TOKENS_GRAD:
        wa, wb = _load_row_groups(W, offs_k, k_ok, stride_wk, stride_wd, D, GA, GB, CHUNK_D, acc_t)
    dw_a, dw_b = _zero_row_groups(GA, GB, WARPS, KW, CHUNK_D, acc_t)
    for item in range(pid, B * SPLITS, tl.num_programs(0)):
        b = (item // SPLITS).to(tl.int64)
        n_start = (item % SPLITS) * CHUNK
        n_end = tl.minimum(N, n_start + CHUNK)
        row = Z + b * stride_zb
        ga = _load_rows(G + b * stride_gb, offs_k, k_ok, stride_gk, stride_gd, D, 0, GA, CHUNK_D, acc_t)
        gp = tl.sum(ga * _load_rows(Pooled + b * K * D, offs_k, k_ok, D, 1, D, 0, GA, CHUNK_D, acc_t), 1,
                    keep_dims=True)
        if GB > 0:
            gb = _load_rows(G + b * stride_gb, offs_k, k_ok, stride_gk, stride_gd, D, C1, GB, CHUNK_D, acc_t)
            gp += tl.sum(gb * _load_rows(Pooled + b * K * D, offs_k, k_ok, D, 1, D, C1, GB, CHUNK_D, acc_t), 1,
                         keep_dims=True)
        gp = tl.sum(gp, 4, keep_dims=True)  # g·pooled [1, 1, WARPS, KW, 1]
        if HAS_GS:
            gsum = tl.zeros([1, 1, WARPS, KW, 1], acc_t)  # Σ_n s·gs over the whole row
            for n0 in range(0, N, NORMALIZE_TOKENS):
                offs_n = n0 + tl.arange(0, NORMALIZE_TOKENS)[:, None, None, None, None]
                ok = k_ok & (offs_n < N)
                s = tl.load(Scores + b * K * N + offs_k * N + offs_n, mask=ok, other=0.0)
                gs = tl.load(GS + b * stride_sb + offs_k * stride_sk + offs_n * stride_sn, mask=ok, other=0.0)
                gsum += tl.sum(s * gs.to(acc_t), 0, keep_dims=True)
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)[:, None, None, None, None]
            n_ok = offs_n < n_end
            za = _load_tokens(row, offs_n, n_ok, stride_zn, stride_zd, D, 0, GA, WARPS, CHUNK_D, acc_t)
            part = tl.sum(za * ga, 1, keep_dims=True)
            if GB > 0:
                zb = _load_tokens(row, offs_n, n_ok, stride_zn, stride_zd, D, C1, GB, WARPS, CHUNK_D, acc_t)
                part += tl.sum(zb * gb, 1, keep_dims=True)
            gz = tl.sum(part, 4, keep_dims=True)  # [BLOCK_N, 1, WARPS, KW, 1]
            ok = k_ok & n_ok
            s = tl.load(Scores + b * K * N + offs_k * N + offs_n, mask=ok, other=0.0)
            dl = s * (gz - gp)
            if HAS_GS:
                gs = tl.load(GS + b * stride_sb + offs_k * stride_sk + offs_n * stride_sn, mask=ok, other=0.0)
                dl += s * (gs.to(acc_t) - gsum)
            if HAS_WEIGHT:
                dw_a += tl.sum(dl * za, 0, keep_dims=True)
                if GB > 0:
                    dw_b += tl.sum(dl * zb, 0, keep_dims=True)
            else:
                tl.store(DLogits + b * K * N + offs_k * N + offs_n, dl, mask=ok)
            if TOKENS_GRAD:
                dz_rows = DZ + b * N * D + offs_n * D
                dz = s * ga
                if HAS_WEIGHT:
                    dz += dl * wa
                dz = tl.sum(tl.sum(dz, 3, keep_dims=True), 2, keep_dims=True)  # over the branches
                offs_d = _cols(0, GA, CHUNK_D)
                tl.store(dz_rows + offs_d, dz.to(DZ.dtype.element_ty), mask=n_ok & (offs_d < D))
                if GB > 0:
                    dz = s * gb
                    if HAS_WEIGHT:
                        dz += dl * wb
                    dz = tl.sum(tl.sum(dz, 3, keep_dims=True), 2, keep_dims=True)
                    offs_d = _cols(C1, GB, CHUNK_D)
                    tl.store(dz_rows + offs_d, dz.to(DZ.dtype.element_ty), mask=n_ok & (offs_d < D))
    if HAS_WEIGHT:
        _store_rows(DW + pid * K * D, dw_a, offs_k, k_ok, D, 0, GA, CHUNK_D)
        if GB > 0:
            _store_rows(DW + pid * K * D, dw_b, offs_k, k_ok, D, C1, GB, CHUNK_D)


def _k_pad(k: int) -> int:
    return triton.next_power_of_2(k)


def _groups(d: int, chunk_d: int) -> tuple[int, int]:
    """(GA, GB): a row of d features as GA + GB chunks of chunk_d columns, both powers of two (GB may be 0)."""
    chunks = triton.cdiv(d, chunk_d)
    ga = 1 << (chunks.bit_length() - 1)
    return ga, 0 if chunks == ga else triton.next_power_of_2(chunks - ga)


def _row_registers(name: str, config: tuple, d: int, k_pad: int, itemsize: int, meta: dict) -> float:
    """Estimated 32-bit registers per thread of a row kernel at ``config``: its per-thread rows and products, each
    branch's scalars and a base (fitted to ptxas for sm_90 over D = 64 to 1536, K = 1 to 16, both passes)."""
    block_n, chunk_d, warps, _ = config
    cols = sum(_groups(d, chunk_d)) * chunk_d / 32  # features per thread
    words = 2 if itemsize == 8 else 1  # float64 tokens accumulate in float64
    kw = k_pad // warps
    if name == "fwd":
        rows = kw * (1 if meta.get("GIVEN") else 2)  # accumulators (and weight rows)
        tiles = block_n
    else:
        rows = kw * (2 + (1 if meta.get("HAS_WEIGHT") and meta.get("TOKENS_GRAD") else 0))  # g, dW (and W)
        tiles = block_n * (2 if meta.get("TOKENS_GRAD") else 1)  # tokens (and the tokens' gradient)
    products = block_n * kw * cols / 4  # the share of the tile x branch products the compiler keeps live
    return ((rows + tiles) * cols + products) * words + 20 * kw + 40


def _fits(name: str, config: tuple, d: int, k_pad: int, itemsize: int, meta: dict) -> bool:
    """Whether ``config`` suits a call: row kernels take at most K_PAD warps and their arrays fit REGISTER_BUDGET."""
    if name not in ROW_KERNELS:
        return True
    budget = REGISTER_BUDGET * _max_registers(name, config[2]) / 255  # 16 warps: 128 registers a thread at most
    return config[2] <= k_pad and _row_registers(name, config, d, k_pad, itemsize, meta) <= budget


def _candidates(name: str, d: int, k_pad: int, itemsize: int, meta: dict) -> list[tuple]:
    """The configs of CONFIGS[name] that suit a call; when none does, the runnable one with the fewest registers."""
    configs = CONFIGS[name]
    kept = [c for c in configs if _fits(name, c, d, k_pad, itemsize, meta)]
    if kept:
        return kept
    runnable = [c for c in configs if name not in ROW_KERNELS or c[2] <= k_pad]
    return [min(runnable, key=lambda c: _row_registers(name, c, d, k_pad, itemsize, meta))]


# kernel name -> jit kernel; CONFIGS[name] holds its launch configs
KERNELS = {
    "fwd": _abmilp_fwd_kernel,
    "combine": _abmilp_combine_kernel,
    "bwd": _abmilp_bwd_kernel,
}
ROW_KERNELS = ("fwd", "bwd")
# autotune keys; the autotuner adds the tensor arguments' dtypes itself
_AUTOTUNE_KEYS = {
    "fwd": ["N", "D", "K_PAD", "GIVEN", "HAS_MASK", "SPLIT"],
    "combine": ["N", "D", "K_PAD", "HAS_MASK"],
    "bwd": ["N", "D", "K_PAD", "HAS_GS", "HAS_WEIGHT", "TOKENS_GRAD"],
}


def _config_meta(name: str, config: tuple, d: int) -> dict:
    """The constexprs a config sets. Row kernels: BLOCK_N, the chunk width CHUNK_D, WARPS and the row's column
    groups (GA chunks, then BLOCK_D // CHUNK_D − GA): BLOCK_D is the row width in registers, so a tile holds
    BLOCK_N x BLOCK_D token elements."""
    block_n, block_d, warps, _ = config
    if name not in ROW_KERNELS:
        return dict(BLOCK_N=block_n, BLOCK_D=block_d)
    ga, gb = _groups(d, block_d)
    return dict(BLOCK_N=block_n, BLOCK_D=(ga + gb) * block_d, CHUNK_D=block_d, WARPS=warps, GA=ga)


def _max_registers(name: str, warps: int) -> int | None:
    """``maxnreg`` of a row kernel: all a thread may have at ``warps`` warps (without it ptxas for sm_90 spills some
    configs at 64 to 168 registers to keep more blocks resident)."""
    return min(255, 65536 // (32 * warps)) if name in ROW_KERNELS else None


@functools.lru_cache(maxsize=64)
def _kernel(name: str, interpret_config: tuple[int, int, int, int]) -> KernelLaunch:
    """Kernel ``name`` and its launch rules (keyed by the interpreter config: tests change INTERPRET_CONFIG)."""
    if name not in ROW_KERNELS:
        return KernelLaunch(name, KERNELS[name], CONFIGS[name], interpret_config, _AUTOTUNE_KEYS[name],
                            block_names=("BLOCK_N", "BLOCK_D"))
    return KernelLaunch(
        name, KERNELS[name], CONFIGS[name], interpret_config, _AUTOTUNE_KEYS[name],
        blocks=lambda config, call: _config_meta(name, config, call["D"]),
        candidates=lambda call: _candidates(name, call["D"], call["K_PAD"], call["Z"].element_size(), call),
        tuned_by=lambda call: (call["Z"].element_size(), *(call[k] for k in _AUTOTUNE_KEYS[name] if k != "N")),
        max_registers=lambda warps: _max_registers(name, warps),
        warps_limit="K_PAD",
    )


def launch(name: str, grid, *args, config: tuple[int, int, int, int] | None = None, **meta) -> None:
    """Run kernel ``name`` over ``grid(config constexprs)`` (``beyond_cls.kernels.launch.run``): at ``config``
    (BLOCK_N, BLOCK_D — CHUNK_D for row kernels —, num_warps, num_stages) when given; else at INTERPRET_CONFIG in the
    interpreter (row kernels with at most K_PAD warps), autotuned on a GPU over the configs of CONFIGS[name] that
    suit the call (``_fits``). A row kernel cannot take more warps than K_PAD (ValueError)."""
    run(_kernel(name, INTERPRET_CONFIG), grid, args, meta, config)


def check_tokens(tokens: torch.Tensor, k: int, mask: torch.Tensor | None) -> None:
    """Raise a ValueError naming the argument the kernels cannot take."""
    if tokens.dim() != 3:
        raise ValueError(f"abmilp_pool (Triton): tokens must be [B, N, D], got {tuple(tokens.shape)}")
    if tokens.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"abmilp_pool (Triton): tokens must be float16/bfloat16/float32/float64, got {tokens.dtype}")
    if not 1 <= k <= MAX_BRANCHES:
        raise ValueError(f"abmilp_pool (Triton): 1..{MAX_BRANCHES} branches supported, got K={k}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape[:2])):
        raise ValueError(f"abmilp_pool: mask must be bool [B, N] = {list(tokens.shape[:2])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``. CPU tensors: INTERPRET_SMS in the interpreter (test batches of a
    few rows split them), else NOMINAL_SMS (host calls captured to compile for a GPU plan as on an H100)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRET_SMS if interpreting() else NOMINAL_SMS


def _split(b: int, n: int, device: torch.device) -> tuple[int, int]:
    """(chunks per row, tokens per chunk): rows are split into chunks of a multiple of SPLIT_TOKENS tokens until
    the grid has FILL_PROGRAMS_PER_SM programs per SM (or every chunk is one multiple); big batches are not split."""
    programs = FILL_PROGRAMS_PER_SM * _sm_count(device)
    splits = max(1, min(triton.cdiv(programs, b), triton.cdiv(n, SPLIT_TOKENS)))
    if splits == 1:
        return 1, n
    chunk = triton.cdiv(triton.cdiv(n, splits), SPLIT_TOKENS) * SPLIT_TOKENS
    return triton.cdiv(n, chunk), chunk


def _strides(t: torch.Tensor | None, dims: int) -> tuple[int, ...]:
    return t.stride() if t is not None else (0,) * dims


def _forward(tokens: torch.Tensor, weight: torch.Tensor | None, logits: torch.Tensor | None,
             mask: torch.Tensor | None):
    """(pooled [B, K, D], scores [B, K, N]) of AbMILP (weight [K, D]) or softmax pooling (logits [B, K, N])."""
    given = logits is not None
    k = logits.shape[1] if given else weight.shape[0]
    check_tokens(tokens, k, mask)
    b, n, d = tokens.shape
    acc = accumulation_dtype(tokens.dtype)
    pooled = torch.empty((b, k, d), dtype=acc, device=tokens.device)
    scores = torch.empty((b, k, n), dtype=acc, device=tokens.device)
    splits, chunk = _split(b, n, tokens.device)
    raw = scores if splits == 1 or given else torch.empty((b, k, n), dtype=acc, device=tokens.device)
    part = torch.empty((b * splits, k, d), dtype=acc, device=tokens.device) if splits > 1 else pooled
    stats = torch.empty((b * splits, 2, k), dtype=acc, device=tokens.device) if splits > 1 else pooled
    mask_arg = mask if mask is not None else tokens
    flags = dict(HAS_MASK=mask is not None, K_PAD=_k_pad(k))
    launch(
        "fwd", lambda cfg: (splits, b),
        tokens, weight if weight is not None else tokens, logits if given else tokens, mask_arg, raw, scores, pooled,
        part, stats, *tokens.stride(), *_strides(weight, 2), *_strides(logits, 3), *_strides(mask, 2), n, d, k, chunk,
        GIVEN=given, SPLIT=splits > 1, **flags,
    )
    if splits > 1:
        source = logits if given else raw
        launch(
            "combine", lambda cfg: (triton.cdiv(d, cfg["BLOCK_D"]), b),
            part, stats, source, mask_arg, scores, pooled, *source.stride(), *_strides(mask, 2), n, d, k, splits,
            **flags,
        )
    return pooled, scores


def abmilp_forward(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None):
    """(pooled [B, K, D], scores [B, K, N]), both float32, of AbMILP with weight [K, D]. The bias [K] is not read:
    a per-branch constant cancels in the softmax over tokens (outputs and gradients do not depend on it)."""
    del bias
    return _forward(tokens, weight, None, mask)


def softmax_pool_forward(tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None):
    """(pooled [B, K, D], scores [B, K, N]), both float32, of softmax pooling with logits [B, K, N] (any strides)."""
    return _forward(tokens, None, logits, mask)


def _programs(items: int, k_pad: int, device: torch.device) -> int:
    """Persistent backward programs: about BWD_WARPS_PER_SM warps per SM, each program with as many items."""
    per_program = max(1, triton.cdiv(items, BWD_WARPS_PER_SM * _sm_count(device) // min(k_pad, 4)))
    return max(1, triton.cdiv(items, per_program))


def _backward(grad_pooled: torch.Tensor, grad_scores: torch.Tensor | None, tokens: torch.Tensor,
              scores: torch.Tensor, pooled: torch.Tensor, weight: torch.Tensor | None, tokens_grad: bool):
    """(grad_tokens or an empty tensor, grad_weight [K, D] (AbMILP) or grad_logits [B, K, N]), float32."""
    b, n, d = tokens.shape
    k = scores.shape[1]
    acc = accumulation_dtype(tokens.dtype)
    grad_pooled = grad_pooled.to(acc)  # any strides (an expanded gradient stays a view)
    scores, pooled = scores.to(acc).contiguous(), pooled.to(acc).contiguous()
    splits, chunk = _split(b, n, tokens.device)
    programs = _programs(b * splits, _k_pad(k), tokens.device)
    dz = torch.empty((b, n, d) if tokens_grad else (0,), dtype=tokens.dtype, device=tokens.device)
    dlogits = torch.empty((b, k, n), dtype=acc, device=tokens.device) if weight is None else scores
    dw = torch.empty((programs, k, d), dtype=acc, device=tokens.device) if weight is not None else pooled
    launch(
        "bwd", lambda cfg: (programs,),
        tokens, weight if weight is not None else tokens, grad_pooled, pooled, scores,
        grad_scores if grad_scores is not None else scores, dlogits, dz, dw,
        *tokens.stride(), *_strides(weight, 2), *grad_pooled.stride(), *_strides(grad_scores, 3), b, n, d, k, chunk,
        splits, HAS_GS=grad_scores is not None, HAS_WEIGHT=weight is not None, TOKENS_GRAD=tokens_grad,
        K_PAD=_k_pad(k),
    )
    return dz, (dw.sum(0) if weight is not None else dlogits)  # the partials summed in a fixed order


def softmax_pool_backward(
    grad_pooled: torch.Tensor,
    grad_scores: torch.Tensor | None,
    tokens: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor,
    tokens_grad: bool,
):
    """(grad_tokens or an empty tensor, grad_logits [B, K, N] float32) of :func:`softmax_pool_forward`."""
    return _backward(grad_pooled, grad_scores, tokens, scores, pooled, None, tokens_grad)


def abmilp_backward(
    grad_pooled: torch.Tensor,
    grad_scores: torch.Tensor | None,
    tokens: torch.Tensor,
    weight: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor,
    tokens_grad: bool,
):
    """(grad_tokens or an empty tensor, grad_weight [K, D], grad_bias [K]) in the inputs' dtypes. The bias's
    gradient is exactly 0: the outputs do not depend on it (its reference, Σ_n dlogits, is 0 up to rounding)."""
    dz, grad_weight = _backward(grad_pooled, grad_scores, tokens, scores, pooled, weight, tokens_grad)
    return dz, grad_weight.to(weight.dtype), torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
