"""ops.attention_with_stats: every backend against the float64 reference, and the dispatch rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from beyond_cls import _extension, ops, reference

needs_cpp = pytest.mark.skipif(not _extension.available(), reason=f"C++ extension: {_extension.load_error()}")

# dtypes the CPU op takes. Low-precision results are judged against PyTorch's own error: the op's
# max error vs float64 must be at most 2x that of the reference computed in the op's dtype (plus a
# floor at float32 resolution, which also covers float64 inputs whose statistics are float32).
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
FLOOR = 2e-6


def _poison_heap(numel: int) -> None:
    """Leave NaNs in freed memory so an output element the op forgets to write shows up."""
    torch.full((numel,), float("nan")).sum()


def _inputs(b, h, n, d, dtype, logit_scale=1.0, contiguous=True):
    if contiguous:
        q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    else:  # the layout timm's qkv reshape/permute produces
        qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    q = q * math.sqrt(logit_scale)
    k = k * math.sqrt(logit_scale)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(out, rows, q, k, v, prefix, scale, bias):
    exact_out, exact = reference.attention_with_stats(
        q.double(), k.double(), v.double(), prefix, scale, None if bias is None else bias.double()
    )
    torch_out, torch_rows = reference.attention_with_stats(q, k, v, prefix, scale, bias)
    assert out.dtype == v.dtype and out.shape == v.shape

    def assert_within(name, got, want, baseline):
        err = (got.double() - want).abs().max().item()
        allowed = 2 * (baseline.double() - want).abs().max().item() + FLOOR * max(1.0, want.abs().max().item())
        assert err <= allowed, f"{name}: max error {err:.3g} > allowed {allowed:.3g}"

    assert_within("out", out, exact_out, torch_out)
    for name in reference.AttentionRows._fields:
        got, want = getattr(rows, name), getattr(exact, name)
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert_within(name, got, want, getattr(torch_rows, name))


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,prefix", [(197, 1), (257, 0), (261, 5), (65, 8)])
@pytest.mark.parametrize("d", [64, 80])
def test_cpp_matches_reference(dtype, n, prefix, d, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    for logit_scale in (0.01, 1.0, 25.0):
        q, k, v = _inputs(2, 3, n, d, dtype, logit_scale, contiguous=False)
        _poison_heap(2 * 3 * n * d * 2)
        out, rows = ops.attention_with_stats(q, k, v, prefix)
        _check(out, rows, q, k, v, prefix, None, None)


@needs_cpp
@pytest.mark.parametrize(
    "bias_shape", [(1, 4, 197, 197), (197, 197), (2, 1, 197, 197), (4, 1, 197), (197,)]
)
def test_cpp_bias_broadcasts(bias_shape, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    q, k, v = _inputs(2, 4, 197, 32, torch.float32)
    bias = torch.randn(bias_shape) * 3
    out, rows = ops.attention_with_stats(q, k, v, 1, 0.3, bias)
    _check(out, rows, q, k, v, 1, 0.3, bias)


@needs_cpp
def test_cpp_masked_keys_and_dominant_prefix(monkeypatch):
    """-inf bias entries (0·log 0) and rows whose [cls] logit dwarfs all patch logits."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    n = 197
    q, k, v = _inputs(1, 2, n, 64, torch.float32)
    bias = torch.zeros(n, n)
    bias[:, 10:40] = float("-inf")
    bias[:, 0] = 200.0  # patch mass ~ e^-200: only a patch-relative softmax keeps the entropy exact
    out, rows = ops.attention_with_stats(q, k, v, 1, None, bias)
    _check(out, rows, q, k, v, 1, None, bias)
    assert (rows.patch_mass < 1e-80).all() or (rows.patch_mass == 0).all()
    assert torch.isfinite(rows.patch_entropy).all()
    assert (rows.patch_entropy > 4.0).all()  # ~ log(166) for near-uniform patch logits


@needs_cpp
def test_cpp_output_matches_sdpa(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    q, k, v = _inputs(2, 6, 197, 64, torch.float32)
    out, _ = ops.attention_with_stats(q, k, v, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@needs_cpp
def test_cpp_op_is_registered_and_traceable():
    q, k, v = _inputs(1, 2, 17, 8, torch.float32)
    bias = torch.randn(17, 17)
    torch.library.opcheck(torch.ops.beyond_cls.attention_with_stats.default, (q, k, v, 1, None, bias))
    fake = torch.ops.beyond_cls.attention_with_stats(q.to("meta"), k.to("meta"), v.to("meta"), 1)
    assert fake[0].shape == q.shape and fake[1].shape == (1, 2, 17) and fake[1].dtype == torch.float32


@needs_cpp
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 8, 4), 1), "one shape"),
        ((torch.randn(2, 8, 4),) * 3 + (1,), r"\[B, H, N, d\]"),
        ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4).double(), torch.randn(1, 2, 8, 4), 1), "dtype"),
        ((torch.randn(1, 2, 8, 4),) * 3 + (8,), "num_prefix_tokens"),
        ((torch.ones(1, 2, 8, 4, dtype=torch.int32),) * 3 + (1,), "float32/float64"),
    ],
)
def test_cpp_rejects_bad_inputs_by_name(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.beyond_cls.attention_with_stats(*args)


@needs_cpp
def test_cpp_rejects_non_broadcastable_bias():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        torch.ops.beyond_cls.attention_with_stats(q, q, q, 1, None, torch.randn(3, 8, 8))


def test_backend_env_switch(monkeypatch):
    q, k, v = _inputs(1, 2, 20, 8, torch.float64)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    assert ops.backend_for("attention_with_stats", q.device) == "reference"
    out, rows = ops.attention_with_stats(q, k, v, 1)
    assert rows.patch_entropy.dtype == torch.float64  # the reference keeps float64
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="BEYOND_CLS_BACKEND=triton"):
        ops.attention_with_stats(q, k, v, 1)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "fast")
    with pytest.raises(ValueError, match="BEYOND_CLS_BACKEND"):
        ops.attention_with_stats(q, k, v, 1)


def test_default_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("BEYOND_CLS_BACKEND", raising=False)
    want = "cpp" if _extension.available() else "reference"
    assert ops.backend_for("attention_with_stats", torch.device("cpu")) == want
    assert ops.backend_for("abmilp_pool", torch.device("cpu")) == "reference"


def test_abmilp_pool_front_matches_reference():
    tokens, w = torch.randn(2, 30, 12), torch.randn(12)
    got = ops.abmilp_pool(tokens, w, 0.5)
    want = reference.abmilp_pool(tokens, w, 0.5)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_cuda_tensors_get_a_working_backend():
    q, k, v = (t.cuda() for t in _inputs(2, 12, 197, 64, torch.bfloat16))
    out, rows = ops.attention_with_stats(q, k, v, 1)
    _check(out.cpu(), rows._replace(**{f: getattr(rows, f).cpu() for f in rows._fields}), q.cpu(), k.cpu(),
           v.cpu(), 1, None, None)
