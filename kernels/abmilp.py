"""AbMILP / softmax pooling (Triton), forward and backward, K score branches.

Forward, per batch row: ``logits = z·Wᵀ + b`` ([K, N], one pass over the tokens in tiles), then one
program per chunk of D pools ``Σ_n softmax_n(logits) z_n`` (a second pass; the small logits tile
stays in L2). Backward: one pass per token tile computes ``dl = s·(g·z − g·pooled)`` and, only when
the tokens need a gradient, ``dz = sᵀg + dlᵀW``; the weight gradient ``Σ dl·z`` is a split-K
reduction over (batch, token) tiles. Accumulation is float32; float32 operands meeting
low-precision tokens are split into parts (two tensor-core dots for fp16, three for bf16), so
results stay float32-accurate; dots of fp32 operands run in 3xTF32 on a GPU (float32-accurate; IEEE in the
interpreter, and for float64 tokens), see ``beyond_cls.kernels.fp32_dot_precision``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from beyond_cls.kernels import GPU_FP32_DOT, fp32_dot_precision

from beyond_cls.numerics import MAX_BRANCHES, accumulation_dtype
from beyond_cls.ops._dispatch import interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: exact tests
# Launch configs (BLOCK_N, BLOCK_D, num_warps, num_stages) per kernel. On a GPU each kernel is
# autotuned over its list, per (N, D, K_PAD, flags, dtypes); CI compiles every one ahead of time for
# sm_80 and sm_90 (aot_specializations), and each fits their shared memory for bf16 and fp32 tokens
# (3xTF32 dots: pool at (128, 64, 4, 4) and wgrad at (128, 128, 8, 3) did not fit an A100's, so they
# have one stage less); for fp64 tokens (exact tests only) at least one per kernel does. The
# kernels are memory-bound: the configs trade the tile's shape (more tokens or more features per
# load; N = 196 fills 64-token tiles to 77 %, 32-token ones to 88 %) against bytes in flight per SM
# (warps × stages). The first config of each list is the former fixed one.
# No kernel accumulates into its outputs (the weight gradient's split reduction stores one partial
# per split, summed afterwards), so rerunning a launch while tuning is idempotent: no
# reset_to_zero / restore_value is needed.
CONFIGS = {
    "logits": [(64, 128, 4, 3), (32, 256, 4, 3), (128, 64, 8, 4)],
    "pool": [(64, 128, 4, 3), (32, 256, 4, 3), (128, 64, 4, 3)],
    "pool_bwd": [(64, 128, 4, 3), (32, 128, 4, 4), (128, 64, 8, 3)],
    "wgrad": [(64, 128, 4, 3), (32, 256, 4, 3), (128, 128, 8, 2)],
}
# Under TRITON_INTERPRET=1 (CPU tests) one small config runs: autotuning would only time numpy.
INTERPRET_CONFIG = (32, 64, 4, 1)
WGRAD_SPLITS = 128  # programs along (batch, token tiles) for the weight gradient
# the weight gradient's splits are sized for the smallest token tile; with larger tiles some store zeros
_WGRAD_MIN_BLOCK_N = min([cfg[0] for cfg in CONFIGS["wgrad"]] + [INTERPRET_CONFIG[0]])


@triton.jit
def _split_dot(x, t, X_LEFT: tl.constexpr, WIDE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x @ t (X_LEFT) or t @ x, float32 accumulation, where t holds tokens and x is float32.

    Low-precision tokens: x is split into parts in the tokens' dtype whose tensor-core dots sum to
    float32-accurate products (the kernels are memory-bound; the extra dots are free): hi + lo for
    fp16 (11 + 11 significant bits), hi + mid + lo for bf16 (8 + 8 + 8; hi + lo alone leaves 2^-17
    relative errors, which the weight and bias gradients' sums over tokens turn into ~1e-4).
    WIDE (fp32 / fp64 tokens): one dot in x's dtype at ``input_precision`` PRECISION ("tf32x3" for
    fp32 on a GPU, "ieee" in the interpreter and for fp64). UPCAST: the interpreter, which cannot
    multiply bf16 matrices (PRECISION is "ieee" there)."""
    if WIDE or UPCAST:
        if X_LEFT:
            return tl.dot(x, t.to(x.dtype), input_precision=PRECISION)
        else:
            return tl.dot(t.to(x.dtype), x, input_precision=PRECISION)
    else:
        hi = x.to(t.dtype)
        rest = x - hi.to(x.dtype)
        lo = rest.to(t.dtype)
        if X_LEFT:
            acc = tl.dot(hi, t) + tl.dot(lo, t)
        else:
            acc = tl.dot(t, hi) + tl.dot(t, lo)
        if t.dtype == tl.bfloat16:
            lo2 = (rest - lo.to(x.dtype)).to(t.dtype)
            if X_LEFT:
                acc += tl.dot(lo2, t)
            else:
                acc += tl.dot(t, lo2)
        return acc


@triton.jit
def _abmilp_logits_kernel(
    Z, W, Bias, Logits,
    stride_zb, stride_zn, stride_zd, stride_wk, stride_wd, stride_bk,
    N, D, K,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """logits[b, k, n] = z[b, n]·W[k] + bias[k] for one tile of tokens (all K branches)."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K_PAD)
    n_ok = offs_n < N
    k_ok = offs_k < K
    acc_t = Logits.dtype.element_ty  # float32 (float64 for float64 tokens)
    acc = tl.zeros([BLOCK_N, K_PAD], acc_t)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        z = tl.load(Z + b * stride_zb + offs_n[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        w_t = tl.load(W + offs_k[None, :] * stride_wk + offs_d[:, None] * stride_wd,
                      mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        acc += _split_dot(w_t.to(acc_t), z, False, WIDE, UPCAST, PRECISION)
    acc += tl.load(Bias + offs_k * stride_bk, mask=k_ok, other=0.0).to(acc_t)[None, :]  # [K] any stride, 0 too
    tl.store(Logits + b * K * N + offs_k[None, :] * N + offs_n[:, None], acc, mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _softmax_stats(Logits, Mask, b, N, stride_mb, stride_mn, offs_k, k_ok,
                   HAS_MASK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row max and normalizer of softmax over the N tokens, per branch ([K_PAD] each)."""
    m = tl.full([K_PAD], float("-inf"), Logits.dtype.element_ty)
    z = tl.zeros([K_PAD], Logits.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        keep = n_ok
        if HAS_MASK:
            keep = keep & (tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
        lg = tl.load(Logits + offs_k[:, None] * N + offs_n[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=float("-inf"))
        lg = tl.where(keep[None, :], lg, float("-inf"))
        m_new = tl.maximum(m, tl.max(lg, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - m_safe) + tl.sum(tl.exp(lg - m_safe[:, None]), 1)
        m = m_new
    return m, z


@triton.jit
def _softmax_pool_fwd_kernel(
    Z, Logits, Mask, Pooled, Scores,
    stride_zb, stride_zn, stride_zd, stride_mb, stride_mn,
    N, D, K,
    HAS_MASK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """pooled[b, :, chunk] = Σ_n softmax(logits[b])[:, n] z[b, n, chunk]; chunk 0 also writes scores."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    row_logits = Logits + b * K * N
    m, norm = _softmax_stats(row_logits, Mask, b, N, stride_mb, stride_mn, offs_k, k_ok, HAS_MASK, K_PAD, BLOCK_N)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    inv_norm = tl.where(k_ok, 1.0 / norm, 0.0)  # padding branches stay 0, not 0·inf
    acc = tl.zeros([K_PAD, BLOCK_D], Scores.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        keep = n_ok
        if HAS_MASK:
            keep = keep & (tl.load(Mask + b * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0)
        lg = tl.load(row_logits + offs_k[:, None] * N + offs_n[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=float("-inf"))
        lg = tl.where(keep[None, :], lg, float("-inf"))
        s = tl.exp(lg - m_safe[:, None]) * inv_norm[:, None]
        if pid_d == 0:
            tl.store(Scores + b * K * N + offs_k[:, None] * N + offs_n[None, :], s,
                     mask=k_ok[:, None] & n_ok[None, :])
        z = tl.load(Z + b * stride_zb + offs_n[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _split_dot(s, z, True, WIDE, UPCAST, PRECISION)
    tl.store(Pooled + b * K * D + offs_k[:, None] * D + offs_d[None, :], acc.to(Pooled.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])


@triton.jit
def _softmax_pool_bwd_kernel(
    Z, G, Scores, GP, GS, GSum, W, DLogits, DZ,
    stride_zb, stride_zn, stride_zd, stride_wk, stride_wd,
    N, D, K,
    HAS_GS: tl.constexpr, HAS_WEIGHT: tl.constexpr, TOKENS_GRAD: tl.constexpr,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dl = s·(g·z − g·pooled) [+ s·(gs − Σ s·gs)] for one token tile; dz = sᵀg [+ dlᵀW] if needed."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, K_PAD)
    n_ok = offs_n < N
    k_ok = offs_k < K
    g_row = G + b * K * D
    gz = tl.zeros([BLOCK_N, K_PAD], Scores.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        z = tl.load(Z + b * stride_zb + offs_n[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        g_t = tl.load(g_row + offs_k[None, :] * D + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        gz += _split_dot(g_t, z, False, WIDE, UPCAST, PRECISION)
    tile = b * K * N + offs_k[None, :] * N + offs_n[:, None]  # [BLOCK_N, K_PAD] view of [B, K, N]
    tile_ok = n_ok[:, None] & k_ok[None, :]
    s = tl.load(Scores + tile, mask=tile_ok, other=0.0)
    gp = tl.load(GP + b * K + offs_k, mask=k_ok, other=0.0)
    dl = s * (gz - gp[None, :])
    if HAS_GS:
        gs = tl.load(GS + tile, mask=tile_ok, other=0.0)
        gsum = tl.load(GSum + b * K + offs_k, mask=k_ok, other=0.0)
        dl += s * (gs - gsum[None, :])
    tl.store(DLogits + tile, dl, mask=tile_ok)
    if TOKENS_GRAD:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            g = tl.load(g_row + offs_k[:, None] * D + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            dz = tl.dot(s, g, input_precision=PRECISION)
            if HAS_WEIGHT:
                w = tl.load(W + offs_k[:, None] * stride_wk + offs_d[None, :] * stride_wd,
                            mask=k_ok[:, None] & d_ok[None, :], other=0.0)
                dz += tl.dot(dl, w.to(dl.dtype), input_precision=PRECISION)
            tl.store(DZ + b * N * D + offs_n[:, None] * D + offs_d[None, :], dz.to(DZ.dtype.element_ty),
                     mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    Z, DLogits, Partial,
    stride_zb, stride_zn, stride_zd,
    B, N, D, K, SPLITS,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """partial[split, k, chunk] = Σ over this split's (b, token tile) pairs of dlᵀ·z (0 if it has none)."""
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    offs_k = tl.arange(0, K_PAD)
    k_ok = offs_k < K
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([K_PAD, BLOCK_D], Partial.dtype.element_ty)
    tiles_per_row = tl.cdiv(N, BLOCK_N)
    for t in range(split, B * tiles_per_row, SPLITS):
        b = (t // tiles_per_row).to(tl.int64)
        offs_n = (t % tiles_per_row) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dl = tl.load(DLogits + b * K * N + offs_k[:, None] * N + offs_n[None, :],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        z = tl.load(Z + b * stride_zb + offs_n[:, None] * stride_zn + offs_d[None, :] * stride_zd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _split_dot(dl, z, True, WIDE, UPCAST, PRECISION)
    tl.store(Partial + split * K * D + offs_k[:, None] * D + offs_d[None, :], acc, mask=k_ok[:, None] & d_ok[None, :])


def _k_pad(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _dot_flags(dtype: torch.dtype) -> dict:
    """WIDE: fp32/fp64 tokens (one dot in the accumulation dtype); UPCAST: bf16 in the interpreter;
    PRECISION: ``input_precision`` of dots on fp32 operands (fp64 ones are always IEEE)."""
    precision = "ieee" if dtype == torch.float64 else fp32_dot_precision()
    return dict(WIDE=dtype in (torch.float32, torch.float64), UPCAST=interpreting() and dtype == torch.bfloat16,
                PRECISION=precision)


# kernel name -> jit kernel; CONFIGS[name] holds its launch configs
KERNELS = {
    "logits": _abmilp_logits_kernel,
    "pool": _softmax_pool_fwd_kernel,
    "pool_bwd": _softmax_pool_bwd_kernel,
    "wgrad": _weight_grad_kernel,
}
# autotune keys; the autotuner adds the tensor arguments' dtypes itself
_FLAGS = ["WIDE", "UPCAST", "PRECISION"]
_AUTOTUNE_KEYS = {
    "logits": ["N", "D", "K_PAD", *_FLAGS],
    "pool": ["N", "D", "K_PAD", "HAS_MASK", *_FLAGS],
    "pool_bwd": ["N", "D", "K_PAD", "HAS_GS", "HAS_WEIGHT", "TOKENS_GRAD", *_FLAGS],
    "wgrad": ["N", "D", "K_PAD", *_FLAGS],
}
_AUTOTUNED = {
    name: triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_D": d}, num_warps=w, num_stages=st)
                 for n, d, w, st in CONFIGS[name]],
        key=_AUTOTUNE_KEYS[name],
    )(kernel)
    for name, kernel in KERNELS.items()
}


def launch(name: str, grid, *args, config: tuple[int, int, int, int] | None = None, **meta) -> None:
    """Run kernel ``name`` over ``grid(blocks)`` at ``config`` (BLOCK_N, BLOCK_D, num_warps, num_stages) when
    given; else at INTERPRET_CONFIG in the interpreter (where tuning would run every config and time numpy),
    autotuned over CONFIGS[name] on a GPU."""
    if config is None and interpreting():
        config = INTERPRET_CONFIG
    if config is None:
        _AUTOTUNED[name][grid](*args, **meta)
        return
    block_n, block_d, warps, stages = config
    blocks = dict(BLOCK_N=block_n, BLOCK_D=block_d)
    KERNELS[name][grid(blocks)](*args, **meta, **blocks, num_warps=warps, num_stages=stages)


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


def _pool(tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None):
    b, n, d = tokens.shape
    k = logits.shape[1]
    acc = accumulation_dtype(tokens.dtype)
    # float32 like the scores: exact for the probe's head and for g·pooled in the backward
    pooled = torch.empty((b, k, d), dtype=acc, device=tokens.device)
    scores = torch.empty((b, k, n), dtype=acc, device=tokens.device)
    if mask is not None and tokens.dtype == torch.float64:
        # an 8-bit mask feeding the float64 scores makes Triton (3.6 to 3.8) pick a dot-operand layout
        # its float64 MMA cannot lower ("fp64 don't support largeK MMA"); an int32 mask does not
        mask = mask.to(torch.int32)
    mask_arg = mask if mask is not None else tokens
    mask_strides = mask.stride() if mask is not None else (0, 0)
    launch(
        "pool", lambda cfg: (triton.cdiv(d, cfg["BLOCK_D"]), b),
        tokens, logits, mask_arg, pooled, scores, *tokens.stride(), *mask_strides, n, d, k,
        HAS_MASK=mask is not None, K_PAD=_k_pad(k), **_dot_flags(tokens.dtype),
    )
    return pooled, scores


def abmilp_forward(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None):
    """(pooled [B, K, D], scores [B, K, N]), both float32, of AbMILP with weight [K, D], bias [K]."""
    check_tokens(tokens, weight.shape[0], mask)
    b, n, d = tokens.shape
    k = weight.shape[0]
    logits = torch.empty((b, k, n), dtype=accumulation_dtype(tokens.dtype), device=tokens.device)
    launch(
        "logits", lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]), b),
        tokens, weight, bias, logits, *tokens.stride(), *weight.stride(), bias.stride(0), n, d, k,
        K_PAD=_k_pad(k), **_dot_flags(tokens.dtype),
    )
    return _pool(tokens, logits, mask)


def softmax_pool_forward(tokens: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None = None):
    """(pooled [B, K, D], scores [B, K, N]), both float32, of softmax pooling with logits [B, K, N]."""
    check_tokens(tokens, logits.shape[1], mask)
    return _pool(tokens, logits.to(accumulation_dtype(tokens.dtype)).contiguous(), mask)


def pool_backward(
    grad_pooled: torch.Tensor,
    grad_scores: torch.Tensor | None,
    tokens: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor,
    weight: torch.Tensor | None,
    tokens_grad: bool,
):
    """(grad_tokens or an empty tensor, grad_logits [B, K, N] float32) of either pooling.

    With ``weight`` the tokens' gradient includes the scorer path ``dlᵀW`` (AbMILP).
    """
    b, n, d = tokens.shape
    k = scores.shape[1]
    acc = accumulation_dtype(tokens.dtype)
    g = grad_pooled.to(acc).contiguous()
    gp = (g * pooled.to(acc)).sum(-1).contiguous()
    has_gs = grad_scores is not None
    gs = grad_scores.to(acc).contiguous() if has_gs else g
    gsum = (scores * gs).sum(-1).contiguous() if has_gs else gp
    dlogits = torch.empty((b, k, n), dtype=acc, device=tokens.device)
    dz = torch.empty((b, n, d) if tokens_grad else (0,), dtype=tokens.dtype, device=tokens.device)
    w = weight if weight is not None else g
    launch(
        "pool_bwd", lambda cfg: (triton.cdiv(n, cfg["BLOCK_N"]), b),
        tokens, g, scores, gp, gs, gsum, w, dlogits, dz,
        *tokens.stride(), *(w.stride() if weight is not None else (0, 0)), n, d, k,
        HAS_GS=has_gs, HAS_WEIGHT=weight is not None, TOKENS_GRAD=tokens_grad,
        K_PAD=_k_pad(k), **_dot_flags(tokens.dtype),
    )
    return dz, dlogits


def weight_grad(tokens: torch.Tensor, dlogits: torch.Tensor) -> torch.Tensor:
    """Σ_{b,n} dlogits[b, k, n] tokens[b, n, :] as [K, D] float32 (split over token tiles, then summed)."""
    b, n, d = tokens.shape
    k = dlogits.shape[1]
    splits = max(1, min(WGRAD_SPLITS, b * triton.cdiv(n, _WGRAD_MIN_BLOCK_N)))  # the same for every config
    partial = torch.empty((splits, k, d), dtype=dlogits.dtype, device=tokens.device)
    launch(
        "wgrad", lambda cfg: (triton.cdiv(d, cfg["BLOCK_D"]), splits),
        tokens, dlogits, partial, *tokens.stride(), b, n, d, k, splits,
        K_PAD=_k_pad(k), **_dot_flags(tokens.dtype),
    )
    return partial.sum(0)


def softmax_pool_backward(
    grad_pooled: torch.Tensor,
    grad_scores: torch.Tensor | None,
    tokens: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor,
    tokens_grad: bool,
):
    """(grad_tokens or an empty tensor, grad_logits [B, K, N]) of :func:`softmax_pool_forward`."""
    return pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, None, tokens_grad)


def abmilp_backward(
    grad_pooled: torch.Tensor,
    grad_scores: torch.Tensor | None,
    tokens: torch.Tensor,
    weight: torch.Tensor,
    scores: torch.Tensor,
    pooled: torch.Tensor,
    tokens_grad: bool,
):
    """(grad_tokens or an empty tensor, grad_weight [K, D], grad_bias [K]) in the inputs' dtypes."""
    dz, dlogits = pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, weight, tokens_grad)
    grad_weight = weight_grad(tokens, dlogits).to(weight.dtype)
    return dz, grad_weight, dlogits.sum((0, 2))


def aot_specializations():
    """Every kernel at every config of CONFIGS, for bf16 (split dots), fp32 (3xTF32 dots) and fp64 (IEEE dots:
    the exact tests on a GPU) tokens, K ≤ 16, with the argument types and constexprs a GPU launch passes."""
    from beyond_cls.kernels.aot import Specialization, pointer

    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        tok, acc = pointer(dtype), "*fp64" if dtype == torch.float64 else "*fp32"
        # _dot_flags outside the interpreter (fp32_dot_precision() gives GPU_FP32_DOT there)
        precision = "ieee" if dtype == torch.float64 else GPU_FP32_DOT
        flags = dict(WIDE=dtype != torch.bfloat16, UPCAST=False, PRECISION=precision, K_PAD=16)
        name = str(dtype).removeprefix("torch.")
        mask = "*i32" if dtype == torch.float64 else "*i1"  # see _pool
        pointers = {
            "logits": {"Z": tok, "W": acc, "Bias": acc, "Logits": acc},
            "pool": {"Z": tok, "Logits": acc, "Mask": mask, "Pooled": acc, "Scores": acc},
            "pool_bwd": {"Z": tok, "G": acc, "Scores": acc, "GP": acc, "GS": acc, "GSum": acc, "W": acc,
                         "DLogits": acc, "DZ": tok},
            "wgrad": {"Z": tok, "DLogits": acc, "Partial": acc},
        }
        # the widest variant of each kernel: mask, grad_scores, scorer weight and tokens' gradient on
        variants = {"pool": dict(HAS_MASK=True), "pool_bwd": dict(HAS_GS=True, HAS_WEIGHT=True, TOKENS_GRAD=True)}
        for kernel_name, kernel in KERNELS.items():
            for block_n, block_d, warps, stages in CONFIGS[kernel_name]:
                yield kernel, Specialization(
                    pointers[kernel_name] | _ints(kernel),
                    dict(flags, **variants.get(kernel_name, {}), BLOCK_N=block_n, BLOCK_D=block_d), warps, stages,
                    f"{kernel_name}-{name}-N{block_n}-D{block_d}-w{warps}-s{stages}")


def _ints(kernel) -> dict[str, str]:
    """i32 for every scalar argument of ``kernel``: strides and sizes."""
    sizes = ("N", "D", "K", "B", "SPLITS")
    return {a: "i32" for a in kernel.arg_names if a.startswith("stride_") or a in sizes}
