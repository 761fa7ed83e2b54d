"""Heads of one spec computed together (beyond_cls.heads.groups): each gets what it gets alone, from one token read."""

from __future__ import annotations

import pytest
import torch

from beyond_cls import ops
from beyond_cls.heads import build_aggregation
from beyond_cls.heads.groups import forward_shared, share_key, stacked_names
from tests.heads.head_checks import LAYOUTS, tokens

# specs pooled by one K·L-branch abmilp_pool (bit for bit per branch) or given no parameters; those whose logits
# pool together through softmax_pool, whose batched GEMM may round differently than one head's
EXACT = ["cls", "mean", "abmilp", "abmilp+cls", "abmilp-k4"]
ROUNDED = ["abmilp-mlp2-gelu", "abmilp-pos", "abmilp+cls-k2-mlp3-tanh-pos"]


def _heads(spec: str, dim: int, prefix: int, count: int = 3, legacy: bool = False) -> list[torch.nn.Module]:
    heads = []
    for seed in range(count):  # other weights per head, as at other lrs after some steps
        torch.manual_seed(seed)
        head = build_aggregation(spec, dim, prefix, True, grid=(14, 14), legacy=legacy)
        if isinstance(getattr(head, "pos_embed", None), torch.nn.Parameter):
            with torch.no_grad():  # trained tables differ per head: each head must read its own
                head.pos_embed.add_(torch.randn_like(head.pos_embed))
        heads.append(head)
    return heads


def _alone(module: torch.nn.Module, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    if hasattr(module, "forward_with_scores"):
        pooled, scores = module.forward_with_scores(t)
        return pooled.flatten(1), scores
    return module(t), None


@pytest.mark.parametrize("spec,legacy", [(s, False) for s in EXACT + ROUNDED] + [("abmilp-pos", True)])
@pytest.mark.parametrize("n,p", LAYOUTS)
@pytest.mark.parametrize("dim", [64, 80])
def test_shared_heads_equal_each_head_alone(spec, legacy, n, p, dim):
    tol = dict(rtol=0, atol=0) if spec in EXACT else dict(rtol=1e-5, atol=1e-6)
    heads = _heads(spec, dim, p, legacy=legacy)
    t = tokens(n, batch=4, dim=dim)
    pieces, scores = forward_shared(heads, t)
    features = torch.cat(pieces, 1)
    assert features.shape == (4, 3, heads[0].out_dim)
    upstream = torch.randn_like(features)
    trained = features.requires_grad  # [cls] and mean have no parameters
    if trained:
        (features * upstream).sum().backward()
    shared_grads = [[q.grad.clone() for q in h.parameters()] for h in heads]
    for h in heads:
        h.zero_grad(set_to_none=True)
    k = 0 if scores is None else scores.shape[1] // 3
    for i, h in enumerate(heads):
        feature, alone_scores = _alone(h, t)
        torch.testing.assert_close(features[:, i], feature, **tol, msg=spec)
        if scores is not None:
            torch.testing.assert_close(scores[:, i * k:(i + 1) * k], alone_scores, **tol)
        if trained:
            (feature * upstream[:, i]).sum().backward()
        for got, q in zip(shared_grads[i], h.parameters(), strict=True):
            torch.testing.assert_close(got, q.grad, **tol, msg=f"{spec} head {i}")
    if spec == "abmilp":  # the heads' own weights were used, not copies: a change shows
        with torch.no_grad():
            heads[1].scorer[0].weight.mul_(3)
        assert not torch.equal(torch.cat(forward_shared(heads, t)[0], 1)[:, 1], features[:, 1])


def test_linear_scorers_share_one_token_read(monkeypatch):
    calls = []
    real = ops.abmilp_pool
    monkeypatch.setattr(ops, "abmilp_pool", lambda t, w, b: calls.append((t.shape, w.shape)) or real(t, w, b))
    heads = _heads("abmilp-k4", 64, 1, count=3)
    t = tokens(197, dim=64)
    stacked = {n: torch.cat([h.get_parameter(n) for h in heads]) for n in stacked_names(heads[0])}
    pieces, scores = forward_shared(heads, t, stacked)
    assert calls == [((3, 196, 64), (12, 64))]  # one call, 3 heads x 4 branches
    assert len(pieces) == 1 and pieces[0].shape == (3, 3, 4 * 64) and scores.shape == (3, 12, 196)


def test_cls_and_mean_are_computed_once():
    heads = _heads("mean", 64, 1)
    pieces, scores = forward_shared(heads, tokens(197, dim=64))
    assert scores is None and len(pieces) == 3 and pieces[0] is pieces[1] is pieces[2]


def test_share_keys_and_stacked_parameters():
    def key(spec: str) -> object:
        return share_key(build_aggregation(spec, 64, 1, True, grid=(14, 14)))

    assert key("abmilp") == key("abmilp") and key("abmilp") != key("abmilp-k2") != key("abmilp+cls-k2")
    assert key("abmilp-pos") != key("abmilp") and key("cls") != key("mean")
    legacy = share_key(build_aggregation("abmilp-pos", 64, 1, True, legacy=True))
    assert legacy != key("abmilp-pos") and legacy is not None
    for unshared in ("ap2", "saabmilp", "attn-mean"):
        assert key(unshared) is None
    assert stacked_names(build_aggregation("abmilp-k3", 64, 1, True)) == ("scorer.0.weight", "scorer.0.bias")
    assert stacked_names(build_aggregation("abmilp-mlp2", 64, 1, True)) == ()
    with pytest.raises(TypeError, match="AttentivePool"):
        forward_shared([build_aggregation("ap2", 64, 1, True)], tokens(197, dim=64))
