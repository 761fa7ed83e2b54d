"""The reference ops against naive, fully materialized formulas in float64."""

from __future__ import annotations

import math

import pytest
import torch

from beyond_cls import reference
from beyond_cls.statistics import ROW_STATISTICS


def naive_rows(q, k, v, prefix, scale, bias):
    """Attention matrix by exp/sum, statistics straight from their definitions."""
    s = q @ k.transpose(-2, -1) * scale
    if bias is not None:
        s = s + bias
    e = torch.exp(s - s.amax(-1, keepdim=True))
    a = e / e.sum(-1, keepdim=True)
    n = a.shape[-1]
    mass = a[..., prefix:].sum(-1)
    a_norm = a[..., prefix:] / mass[..., None]
    entropy = -torch.special.xlogy(a_norm, a_norm).sum(-1)
    idx = torch.arange(n)
    return a @ v, a[..., idx, idx], a[..., 0], mass, entropy


def random_qkv(b, h, n, d, logit_scale):
    q = torch.randn(b, h, n, d, dtype=torch.float64) * math.sqrt(logit_scale)
    k = torch.randn(b, h, n, d, dtype=torch.float64) * math.sqrt(logit_scale)
    v = torch.randn(b, h, n, d, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("n", [197, 257, 261])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("logit_scale", [0.01, 1.0, 30.0])  # near-uniform .. near one-hot rows
def test_attention_with_stats_matches_naive(n, prefix, logit_scale):
    q, k, v = random_qkv(2, 3, n, 32, logit_scale)
    bias = torch.randn(1, 3, n, n, dtype=torch.float64)
    out, rows = reference.attention_with_stats(q, k, v, prefix, None, bias)
    want_out, want_self, want_cls, want_mass, want_ent = naive_rows(q, k, v, prefix, 32**-0.5, bias)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows.self_attn, want_self, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rows.patch_mass, want_mass, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rows.patch_entropy, want_ent, rtol=1e-9, atol=1e-10)
    if prefix == 0:
        assert rows.cls_attn is None
        torch.testing.assert_close(rows.patch_mass, torch.ones_like(rows.patch_mass))
    else:
        torch.testing.assert_close(rows.cls_attn, want_cls, rtol=1e-10, atol=1e-13)
    assert rows.stacked.dtype == torch.float64 and rows.stacked.shape == (len(ROW_STATISTICS), 2, 3, n)
    # the stacked planes in ROW_STATISTICS order (a_i0's plane is there without prefix tokens too)
    naive = {"self_attn": want_self, "cls_attn": want_cls, "patch_mass": want_mass, "patch_entropy": want_ent}
    for i, row in enumerate(ROW_STATISTICS):
        torch.testing.assert_close(rows.stacked[i], naive[row.name], rtol=1e-9, atol=1e-10, msg=row.name)
    assert list(rows) == [r.name for r in ROW_STATISTICS if prefix or not r.needs_prefix]
    assert (rows.patch_entropy <= math.log(n - prefix) + 1e-9).all()
    assert (rows.patch_entropy >= -1e-12).all()


def test_entropy_is_exact_at_extremes():
    n, prefix = 197, 1
    q = torch.zeros(1, 1, n, 8, dtype=torch.float64)
    k = torch.zeros_like(q)
    v = torch.randn_like(q)
    _, rows = reference.attention_with_stats(q, k, v, prefix)
    uniform = torch.full((1, 1, n), math.log(n - prefix), dtype=torch.float64)
    torch.testing.assert_close(rows.patch_entropy, uniform, rtol=0, atol=1e-12)
    # every row attends to key 3 only: entropy exactly 0, no epsilon artefacts
    bias = torch.full((n, n), float("-inf"), dtype=torch.float64)
    bias[:, 3] = 0.0
    _, rows = reference.attention_with_stats(q, k, v, prefix, bias=bias)
    assert torch.equal(rows.patch_entropy, torch.zeros(1, 1, n, dtype=torch.float64))
    assert torch.equal(rows.patch_mass, torch.ones(1, 1, n, dtype=torch.float64))


def test_tiny_patch_mass_keeps_entropy_exact():
    """[cls] takes ~all attention; the patch distribution must still be resolved exactly."""
    n = 5
    logits = torch.tensor([800.0, 0.0, math.log(2.0), 0.0, 0.0], dtype=torch.float64)
    bias = logits.expand(n, n).clone()
    q = torch.zeros(1, 1, n, 4, dtype=torch.float64)
    _, rows = reference.attention_with_stats(q, q, q, 1, bias=bias)
    p = torch.tensor([1.0, 2.0, 1.0, 1.0], dtype=torch.float64) / 5
    torch.testing.assert_close(rows.patch_entropy[0, 0, 0], -(p * p.log()).sum())


def test_float32_inputs_give_float32_stats_and_out_dtype():
    q, k, v = (t.float() for t in random_qkv(1, 2, 197, 16, 1.0))
    out, rows = reference.attention_with_stats(q.bfloat16(), k.bfloat16(), v.bfloat16(), 1)
    assert out.dtype == torch.bfloat16
    assert rows.stacked.dtype == torch.float32 and all(rows[name].dtype == torch.float32 for name in rows)


def test_bad_prefix_is_rejected():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        reference.attention_with_stats(q, q, q, 4)


def test_abmilp_pool_matches_definition():
    tokens = torch.randn(3, 196, 48, dtype=torch.float64)
    w, b = torch.randn(48, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    pooled, scores = reference.abmilp_pool(tokens, w, b)
    logits = tokens @ w + b
    s = torch.exp(logits - logits.max(1, keepdim=True).values)
    s = s / s.sum(1, keepdim=True)
    torch.testing.assert_close(scores, s)
    torch.testing.assert_close(pooled, (s[..., None] * tokens).sum(1))
    assert pooled.shape == (3, 48) and scores.shape == (3, 196)


def test_abmilp_pool_branches_are_independent_heads():
    tokens = torch.randn(2, 50, 16, dtype=torch.float64)
    w, b = torch.randn(3, 16, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    pooled, scores = reference.abmilp_pool(tokens, w, b)
    assert pooled.shape == (2, 3, 16) and scores.shape == (2, 3, 50)
    for i in range(3):
        p_i, s_i = reference.abmilp_pool(tokens, w[i], b[i])
        torch.testing.assert_close(pooled[:, i], p_i)
        torch.testing.assert_close(scores[:, i], s_i)


def test_abmilp_pool_gradcheck():
    tokens = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: reference.abmilp_pool(t, w, b), (tokens, w, b))


def test_abmilp_pool_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight"):
        reference.abmilp_pool(torch.randn(2, 7, 5), torch.randn(6), 0.0)


def test_entropy_helpers():
    assert reference.max_entropy(196) == pytest.approx(5.278, abs=1e-3)
    p = torch.tensor([0.5, 0.5, 0.0])
    assert reference.entropy(p).item() == pytest.approx(math.log(2))
