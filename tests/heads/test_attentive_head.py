"""The attentive probe against materialized attention."""

from __future__ import annotations

import pytest
import torch

from beyond_cls.heads import AttentivePool
from tests.heads.head_checks import F64, D, tokens


@pytest.mark.parametrize("num_heads", [1, 12])
def test_attentive_pool_matches_materialized(num_heads):
    p = 5
    head = AttentivePool(D, num_heads=num_heads, num_prefix_tokens=p).double()
    t = tokens(p + 196, dtype=F64)
    x = t[:, p:]
    hd = D // num_heads
    q = head.query[0] @ head.q.weight.T + head.q.bias  # [1, D]
    kv = x @ head.kv.weight.T + head.kv.bias  # [B, N', 2D]
    k, v = kv[..., :D], kv[..., D:]
    outs, weights = [], []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = torch.einsum("d,bnd->bn", q[0, sl], k[..., sl]) / hd**0.5
        a = logits.softmax(-1)
        weights.append(a)
        outs.append(torch.einsum("bn,bnd->bd", a, v[..., sl]))
    expected = torch.cat(outs, -1) @ head.proj.weight.T + head.proj.bias
    torch.testing.assert_close(head(t), expected, rtol=1e-10, atol=1e-10)
    pooled, attn = head.forward_with_scores(t)
    torch.testing.assert_close(pooled, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn, torch.stack(weights, 1), rtol=1e-10, atol=1e-10)


def test_attentive_pool_query_init():
    head = AttentivePool(768)
    assert head.query.shape == (1, 1, 768)
    assert abs(head.query.std().item() - 0.02) < 0.003
