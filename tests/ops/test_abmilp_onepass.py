"""The one-pass Triton pooling kernels: split rows and their combine, tile edges, the bias never read, small fp16
magnitudes, warps per branch, determinism. Each case is checked against the float64 reference.

Triton runs in its interpreter on CPU tensors without CUDA (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from beyond_cls import ops, reference
from beyond_cls.ops._dispatch import unavailable
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    unavailable("triton", "abmilp_pool", torch.device(DEVICE), torch.float32) is not None, reason="Triton cannot run"
)
F64 = torch.float64


@pytest.fixture
def kernels(monkeypatch):
    from beyond_cls.kernels import abmilp

    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    return abmilp


def _record(monkeypatch, kernels) -> list:
    """(kernel name, args) of every launch from now on (the launches still run)."""
    calls, launch = [], kernels.launch

    def recording(name, grid, *args, **meta):
        calls.append((name, args))
        launch(name, grid, *args, **meta)

    monkeypatch.setattr(kernels, "launch", recording)
    return calls


def _data(b, n, d, k, dtype=F64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(b, n + 1, d, generator=gen, dtype=F64) * scale)[:, 1:]  # the patch slice: strided rows
    w = torch.randn(k, d, generator=gen, dtype=F64) * d**-0.5 * 3 / scale
    g = torch.randn(b, k, d, generator=gen, dtype=F64)
    gs = torch.randn(b, k, n, generator=gen, dtype=F64)
    return z.to(dtype), w, g, gs


def _pool(z, w, mask, g, gs, bias=None, logits=None, tokens_grad=True):
    """Outputs and input gradients of AbMILP (or softmax pooling with ``logits``) on DEVICE, as float64 on CPU."""
    dtype = F64 if z.dtype == F64 else torch.float32
    zz = z.detach().to(DEVICE).requires_grad_(tokens_grad)
    mm = None if mask is None else mask.to(DEVICE)
    if logits is None:
        p = w.detach().to(DEVICE, dtype).requires_grad_()
        bb = (torch.zeros(w.shape[0], dtype=dtype) if bias is None else bias).detach().to(DEVICE, dtype)
        bb.requires_grad_()
        pooled, scores = ops.abmilp_pool(zz, p, bb, mm)
        leaves = [zz, p, bb]
    else:
        p = logits.detach().to(DEVICE, dtype).requires_grad_()
        pooled, scores = ops.softmax_pool(zz, p, mm)
        leaves = [zz, p]
    loss = (pooled.double() * g.to(DEVICE)).sum()
    if gs is not None:
        loss = loss + (scores.double() * gs.to(DEVICE)).sum()
    loss.backward()
    return [pooled.detach().double().cpu(), scores.detach().double().cpu()] + [
        None if t.grad is None else t.grad.double().cpu() for t in leaves
    ]


def _expected(monkeypatch, z, w, mask, g, gs, logits=None, tokens_grad=True):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    try:
        return _pool(z.double(), w, mask, g, gs, logits=None if logits is None else logits.double(),
                     tokens_grad=tokens_grad)
    finally:
        monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")


def _assert_close(got, want, dtype, names=("pooled", "scores", "grad_tokens", "grad_weight", "grad_bias")):
    """Every output against the reference at the tolerance of ``dtype``, the one the kernels computed in."""
    for name, a, e in zip(names, got, want):
        if e is None or name == "grad_bias":
            continue
        assert a is not None and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, name=name, scaled=True)


@pytest.mark.parametrize("sms", [1, 64])
@pytest.mark.parametrize("given", [False, True])
def test_split_rows_match_whole_rows(kernels, monkeypatch, sms, given):
    """A small batch on a big GPU splits its rows into token chunks whose partial (max, normalizer, pooled) the combine
    kernel merges; a big one pools whole rows. Both equal the reference, with chunks where every token is masked."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: sms)
    z, w, g, gs = _data(4, 101, 80, 3)
    mask = torch.ones(4, 101, dtype=torch.bool)
    mask[1, :40] = False  # the first chunks of row 1 hold no kept token
    logits = torch.randn(4, 101, 3, dtype=F64).transpose(1, 2) * 3 if given else None  # strided logits
    calls = _record(monkeypatch, kernels)
    got = _pool(z, w, mask, g, gs, logits=logits)
    names = [name for name, _ in calls]
    splits, _ = kernels._split(4, 101, torch.device(DEVICE))
    assert (splits > 1) == (sms == 64) and names.count("combine") == (splits > 1) and "fwd" in names
    want = _expected(monkeypatch, z, w, mask, g, gs, logits=logits)
    names = ("pooled", "scores", "grad_tokens", "grad_logits" if given else "grad_weight")
    _assert_close(got, want, F64, names)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 64, 197])
def test_one_token_tile_and_many(kernels, monkeypatch, n):
    """Rows shorter than a tile, exactly one tile (INTERPRET_CONFIG: 4 tokens), one token more, many tiles."""
    assert kernels.INTERPRET_CONFIG[0] == 4 or DEVICE == "cuda"
    z, w, g, gs = _data(3, n, 48, 2, seed=n)
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(n)) > 0.3
    mask[:, 0] = True
    _assert_close(_pool(z, w, mask, g, gs), _expected(monkeypatch, z, w, mask, g, gs), F64)


@pytest.mark.parametrize("warps", [1, 4, 16])
def test_branches_per_warp(kernels, monkeypatch, warps):
    """K = 16 branches held by 1, 4 or 16 warps (16, 4, 1 branches each); D = 200: two column groups, a ragged one."""
    monkeypatch.setattr(kernels, "INTERPRET_CONFIG", (4, 64, warps, 1))
    z, w, g, gs = _data(2, 37, 200, 16)
    _assert_close(_pool(z, w, None, g, gs), _expected(monkeypatch, z, w, None, g, gs), F64)


def test_row_kernels_refuse_more_warps_than_branches(kernels):
    z, w, _, _ = _data(1, 8, 16, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="warps"):
        kernels.launch("fwd", lambda cfg: (1, 1), z, *([None] * 8), *range(10), 8, 16, 2, 8, config=(4, 64, 4, 1),
                       GIVEN=False, HAS_MASK=False, SPLIT=False, K_PAD=2)


def test_bias_is_never_read(kernels, monkeypatch):
    """A per-branch bias cancels in the softmax over tokens: no kernel gets it, the outputs are bit-identical for any
    bias, and its gradient is exactly zero (the reference's, Σ_n dlogits, is zero up to rounding)."""
    z, w, g, gs = _data(2, 45, 64, 4, dtype=torch.float32)
    bias = torch.tensor([0.0, 300.0, -7.5, 1e4], device=DEVICE, requires_grad=True)
    calls = _record(monkeypatch, kernels)
    zz, ww = z.to(DEVICE).requires_grad_(), w.float().to(DEVICE).requires_grad_()
    pooled, scores = ops.abmilp_pool(zz, ww, bias)
    ((pooled.double() * g.to(DEVICE)).sum() + (scores.double() * gs.to(DEVICE)).sum()).backward()
    tensors = [t for _, args in calls for t in args if isinstance(t, torch.Tensor)]
    assert {name for name, _ in calls} >= {"fwd", "bwd"}
    assert all(t.untyped_storage().data_ptr() != bias.untyped_storage().data_ptr() for t in tensors)
    assert torch.equal(bias.grad, torch.zeros(4, device=DEVICE))
    shifted = [t.double().cpu() for t in (pooled, scores, zz.grad, ww.grad)]
    plain = _pool(z, w, None, g, gs, bias=torch.zeros(4))
    for name, a, b in zip(("pooled", "scores", "grad_tokens", "grad_weight"), shifted, plain):
        assert torch.equal(a, b), name
    want = _expected(monkeypatch, z, w, None, g, gs)
    _assert_close(shifted, want, torch.float32)
    assert want[4].abs().max() < 1e-9  # the reference agrees: zero up to rounding


def test_fp16_small_magnitudes_keep_float32_accuracy(monkeypatch):
    """Tokens ~1e-3 in fp16 with gradients ~1e-6: pooled, scores and the weight gradient stay float32-accurate
    relative to their own size (products of exactly converted tokens accumulate in float32; no fp16 parts that
    would go subnormal)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    z, w, g, gs = _data(2, 61, 96, 3, dtype=torch.float16, scale=1e-3)
    g, gs = g * 1e-6, gs * 1e-6
    got = _pool(z, w, None, g, gs, tokens_grad=False)
    want = _expected(monkeypatch, z, w, None, g, gs, tokens_grad=False)
    for name, a, e in zip(("pooled", "scores", "grad_tokens", "grad_weight"), got, want):
        if e is None:
            continue
        err = ((a - e).abs().max() / e.abs().max()).item()
        assert err < 2e-6, (name, err)


def test_strided_tokens_and_an_expanded_gradient(kernels, monkeypatch):
    """The patch slice of an encoder output and the stride-0 gradient of ``pooled.sum()`` are read in place."""
    z, w, _, _ = _data(3, 50, 72, 2)
    results = []
    for backend in ("triton", "reference"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
        zz, ww = z.detach().to(DEVICE).requires_grad_(), w.detach().to(DEVICE).requires_grad_()
        pooled, _ = ops.abmilp_pool(zz, ww, 0.0)
        pooled.sum().backward()
        results.append([pooled.detach().cpu(), zz.grad.cpu(), ww.grad.cpu()])
    for name, a, e in zip(("pooled", "grad_tokens", "grad_weight"), *results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_every_output_element_is_written(kernels, monkeypatch):
    """Outputs allocated over NaN-filled memory (freed just before): every element is overwritten."""
    z, w, g, gs = _data(3, 33, 80, 3, dtype=torch.float32)
    mask = torch.ones(3, 33, dtype=torch.bool)
    mask[2, ::2] = False
    for sms in (1, 64):
        monkeypatch.setattr(kernels, "_sm_count", lambda device, sms=sms: sms)
        torch.full((1 << 20,), float("nan"), device=DEVICE).sum()
        got = _pool(z, w, mask, g, gs)
        _assert_close(got, _expected(monkeypatch, z, w, mask, g, gs), torch.float32)


def test_fully_masked_row_is_nan_like_the_reference(kernels, monkeypatch):
    z, w, g, _ = _data(2, 20, 32, 2)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False
    for sms in (1, 64):
        monkeypatch.setattr(kernels, "_sm_count", lambda device, sms=sms: sms)
        pooled, scores = ops.abmilp_pool(z.to(DEVICE), w.to(DEVICE), 0.0, mask.to(DEVICE))
        want_pooled, want_scores = reference.abmilp_pool(z, w, 0.0, mask)
        assert torch.isnan(pooled[1].cpu()).all() and torch.isnan(scores[1].cpu()).all()
        assert torch.isnan(want_pooled[1]).all() and torch.isnan(want_scores[1]).all()
        torch.testing.assert_close(pooled[0].cpu(), want_pooled[0], rtol=1e-10, atol=1e-10)


def test_weight_gradient_is_deterministic(kernels, monkeypatch):
    """The weight gradient's per-program partials are summed in a fixed order: repeated backwards are bit-equal."""
    monkeypatch.setattr(kernels, "_sm_count", lambda device: 2)
    z, w, g, gs = _data(9, 20, 64, 2, dtype=torch.float32)
    first, second = _pool(z, w, None, g, gs), _pool(z, w, None, g, gs)
    assert torch.equal(first[3], second[3]) and torch.equal(first[2], second[2])
