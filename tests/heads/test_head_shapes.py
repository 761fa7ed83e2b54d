"""Every head class: output and score shapes over token layouts, and its argument checks."""

from __future__ import annotations

import pytest
import torch

from beyond_cls.heads import AbMILP, AttentivePool, ClsToken, LinearProbe, MeanPatch, SelfAttentionAbMILP
from tests.heads.head_checks import LAYOUTS, D, tokens

HEADS = {
    "cls": lambda p: ClsToken(D),
    "mean": lambda p: MeanPatch(D, num_prefix_tokens=p),
    "abmilp": lambda p: AbMILP(D, num_prefix_tokens=p),
    "abmilp_d2_tanh": lambda p: AbMILP(D, depth=2, act="tanh", num_prefix_tokens=p),
    "abmilp_d3_gelu": lambda p: AbMILP(D, depth=3, act="gelu", num_prefix_tokens=p),
    "abmilp_d4_relu": lambda p: AbMILP(D, depth=4, act="relu", num_prefix_tokens=p),
    "abmilp_k3": lambda p: AbMILP(D, branches=3, num_prefix_tokens=p),
    "abmilp_cls": lambda p: AbMILP(D, content="patch+cls", num_prefix_tokens=p),
    "abmilp_pos": lambda p: AbMILP(D, pos_cond=True, num_prefix_tokens=p, grid=14),
    "abmilp_pos_fixed": lambda p: AbMILP(D, pos_cond=True, num_prefix_tokens=p, fixed_pos=True),
    "abmilp_pos_cls_k2": lambda p: AbMILP(
        D, pos_cond=True, content="patch+cls", branches=2, num_prefix_tokens=p, grid=(14, 14)
    ),
    "sa_map": lambda p: SelfAttentionAbMILP(D, apply_to="map", num_prefix_tokens=p),
    "sa_both_h4": lambda p: SelfAttentionAbMILP(D, num_heads=4, apply_to="both", num_prefix_tokens=p),
    "attn_h1": lambda p: AttentivePool(D, num_heads=1, num_prefix_tokens=p),
    "attn_h12": lambda p: AttentivePool(D, num_heads=12, num_prefix_tokens=p),
}
EXPECTED_OUT = {"abmilp_k3": 3 * D, "abmilp_pos_cls_k2": 2 * D}


@pytest.mark.parametrize("n,p", LAYOUTS)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_shapes(name, n, p):
    head = HEADS[name](p)
    out_dim = EXPECTED_OUT.get(name, D)
    assert head.out_dim == out_dim
    out = head(tokens(n))
    assert out.shape == (3, out_dim)
    assert torch.isfinite(out).all()
    if hasattr(head, "forward_with_scores"):
        pooled, scores = head.forward_with_scores(tokens(n))
        n_pooled = n - p + (name.startswith("abmilp_") and "cls" in name)
        if isinstance(head, AttentivePool):
            assert pooled.shape == (3, D)
            assert scores.shape == (3, head.num_heads, n_pooled)
        else:
            k = out_dim // D
            assert pooled.shape == (3, k, D)
            assert scores.shape == (3, k, n_pooled)
        assert (scores >= 0).all()
        torch.testing.assert_close(scores.sum(-1), torch.ones(scores.shape[:-1]))


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: AbMILP(D, act="swish"), "act"),
        (lambda: AbMILP(D, content="cls"), "content"),
        (lambda: AbMILP(D, depth=0), "depth"),
        (lambda: AbMILP(D, depth=5), "depth"),
        (lambda: AbMILP(D, branches=0), "branches"),
        (lambda: AbMILP(D, num_prefix_tokens=-1), "num_prefix_tokens"),
        (lambda: AbMILP(D, content="patch+cls", num_prefix_tokens=0), "content"),
        (lambda: AbMILP(6, pos_cond=True, grid=2), "pos_cond"),
        (lambda: AbMILP(D, pos_cond=True), "patch grid"),
        (lambda: AbMILP(D, pos_cond=True, grid=(0, 3)), "grid"),
        (lambda: MeanPatch(D, num_prefix_tokens=-2), "num_prefix_tokens"),
        (lambda: SelfAttentionAbMILP(D, apply_to="tokens"), "apply_to"),
        (lambda: SelfAttentionAbMILP(D, num_heads=5), "num_heads"),
        (lambda: SelfAttentionAbMILP(D, act="swish"), "act"),
        (lambda: AttentivePool(D, num_heads=5), "num_heads"),
        (lambda: LinearProbe(AbMILP(D, branches=2), D, 10), "out_dim"),
        (lambda: AbMILP(D)(torch.randn(2, 197, D + 1)), "tokens"),
        (lambda: MeanPatch(D, num_prefix_tokens=5)(torch.randn(2, 5, D)), "num_prefix_tokens"),
    ],
)
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()
