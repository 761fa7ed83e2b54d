"""Aggregation heads: shapes, AbMILP against the reference op, variants, attentive probe, linear probe."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from beyond_cls import heads, reference
from beyond_cls.heads import (
    AbMILP,
    AttentivePool,
    ClsToken,
    LinearProbe,
    MeanPatch,
    SelfAttentionAbMILP,
    sincos_pos_embed_2d,
)

D = 48  # not a multiple of 64 on purpose
F64 = torch.float64
LAYOUTS = [(197, 1), (201, 5)]  # (N, P): [cls] + 196 patches; [cls] + 4 registers + 196 patches

HEADS = {
    "cls": lambda p: ClsToken(D),
    "mean": lambda p: MeanPatch(D, num_prefix_tokens=p),
    "abmilp": lambda p: AbMILP(D, num_prefix_tokens=p),
    "abmilp_d2_tanh": lambda p: AbMILP(D, depth=2, act="tanh", num_prefix_tokens=p),
    "abmilp_d3_gelu": lambda p: AbMILP(D, depth=3, act="gelu", num_prefix_tokens=p),
    "abmilp_d4_relu": lambda p: AbMILP(D, depth=4, act="relu", num_prefix_tokens=p),
    "abmilp_k3": lambda p: AbMILP(D, branches=3, num_prefix_tokens=p),
    "abmilp_cls": lambda p: AbMILP(D, content="patch+cls", num_prefix_tokens=p),
    "abmilp_pos": lambda p: AbMILP(D, pos_cond=True, num_prefix_tokens=p),
    "abmilp_pos_cls_k2": lambda p: AbMILP(
        D, pos_cond=True, content="patch+cls", branches=2, num_prefix_tokens=p
    ),
    "sa_map": lambda p: SelfAttentionAbMILP(D, apply_to="map", num_prefix_tokens=p),
    "sa_both_h4": lambda p: SelfAttentionAbMILP(D, num_heads=4, apply_to="both", num_prefix_tokens=p),
    "attn_h1": lambda p: AttentivePool(D, num_heads=1, num_prefix_tokens=p),
    "attn_h12": lambda p: AttentivePool(D, num_heads=12, num_prefix_tokens=p),
}
EXPECTED_OUT = {"abmilp_k3": 3 * D, "abmilp_pos_cls_k2": 2 * D}


def _tokens(n: int, batch: int = 3, dim: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, n, dim, dtype=dtype)


@pytest.mark.parametrize("n,p", LAYOUTS)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_shapes(name, n, p):
    head = HEADS[name](p)
    out_dim = EXPECTED_OUT.get(name, D)
    assert head.out_dim == out_dim
    out = head(_tokens(n))
    assert out.shape == (3, out_dim)
    assert torch.isfinite(out).all()
    if hasattr(head, "forward_with_scores"):
        pooled, scores = head.forward_with_scores(_tokens(n))
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


def test_linear_probe_shape():
    probe = LinearProbe(AbMILP(D, num_prefix_tokens=5), D, num_classes=10)
    assert probe(_tokens(201, batch=4)).shape == (4, 10)


def test_cls_and_mean():
    t = _tokens(201)
    assert torch.equal(ClsToken(D)(t), t[:, 0])
    torch.testing.assert_close(MeanPatch(D, num_prefix_tokens=5)(t), t[:, 5:].mean(1))


@pytest.mark.parametrize("n,p", LAYOUTS)
def test_abmilp_linear_matches_reference(n, p, monkeypatch):
    head = AbMILP(D, num_prefix_tokens=p).double()
    calls = []

    def spy(tokens, weight, bias):
        calls.append(weight.shape)
        return reference.abmilp_pool(tokens, weight, bias)

    monkeypatch.setattr(heads.ops, "abmilp_pool", spy)
    t = _tokens(n, dtype=F64)
    pooled, scores = head.forward_with_scores(t)
    assert calls == [(1, D)]  # the fused front is used, with weight [K, D]
    lin = head.scorer[0]
    ref_pooled, ref_scores = reference.abmilp_pool(t[:, p:], lin.weight[0], lin.bias[0])
    torch.testing.assert_close(pooled[:, 0], ref_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores[:, 0], ref_scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(t), ref_pooled, rtol=1e-12, atol=1e-12)
    AbMILP(D, depth=2, num_prefix_tokens=p).double()(t)
    AbMILP(D, pos_cond=True, num_prefix_tokens=p).double()(t)
    # head(t) called the op once more; the MLP and positional variants do not
    assert len(calls) == 2


def test_patch_cls_content():
    p, n_patch = 5, 16
    t = torch.zeros(2, p + n_patch, D, dtype=F64)
    t[:, 0] = 1.0  # [cls]
    t[:, 1:p] = 100.0  # registers: would dominate the pooled value if included
    t[:, p:, 0] = 2.0
    head = AbMILP(D, content="patch+cls", num_prefix_tokens=p).double()
    with torch.no_grad():
        head.scorer[0].weight.zero_()
        head.scorer[0].bias.zero_()
    pooled, scores = head.forward_with_scores(t)
    assert scores.shape == (2, 1, 1 + n_patch)
    torch.testing.assert_close(scores, torch.full_like(scores, 1 / (1 + n_patch)))
    expected = torch.full((D,), 1.0 / (1 + n_patch), dtype=F64)
    expected[0] = (1.0 + 2.0 * n_patch) / (1 + n_patch)
    torch.testing.assert_close(pooled[:, 0], expected.expand(2, D))
    # a scorer that favours channel 1 picks the [cls] token (patches have 0 there, registers are ignored)
    with torch.no_grad():
        head.scorer[0].weight[0, 1] = 50.0
    pooled, scores = head.forward_with_scores(t)
    assert (scores[:, 0, 0] > 0.999).all()
    torch.testing.assert_close(pooled[:, 0, 1], torch.ones(2, dtype=F64), atol=1e-3, rtol=0)
    # patch-only content never sees [cls]: channel 1 is zero everywhere it pools
    patch_only = AbMILP(D, num_prefix_tokens=p).double()
    assert (patch_only(t)[:, 1] == 0).all()


def test_sincos_pos_embed_values():
    g, dim = 5, 16
    pe = sincos_pos_embed_2d(g, dim)
    assert pe.shape == (g * g, dim) and pe.dtype == torch.float32
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=F64) / q)
    for r, c in [(0, 0), (1, 3), (4, 2)]:
        row = torch.cat([torch.sin(r * omega), torch.cos(r * omega)])
        col = torch.cat([torch.sin(c * omega), torch.cos(c * omega)])
        torch.testing.assert_close(pe[r * g + c].double(), torch.cat([row, col]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        sincos_pos_embed_2d(4, 10)


@pytest.mark.parametrize("content", ["patch", "patch+cls"])
def test_pos_cond(content):
    p = 5
    torch.manual_seed(1)
    plain = AbMILP(D, content=content, num_prefix_tokens=p).double()
    torch.manual_seed(1)
    cond = AbMILP(D, content=content, pos_cond=True, num_prefix_tokens=p).double()
    assert set(cond.state_dict()) == set(plain.state_dict())  # same params; the buffer is not saved
    cond.load_state_dict(plain.state_dict())
    t = _tokens(p + 196, dtype=F64)
    content_tokens = plain.select(t)
    pooled_plain, scores_plain = plain.forward_with_scores(t)
    pooled, scores = cond.forward_with_scores(t)
    assert not torch.allclose(scores, scores_plain)
    # the pooled content is the raw tokens; only the scorer's input is shifted
    torch.testing.assert_close(pooled, torch.einsum("bkn,bnd->bkd", scores, content_tokens))
    pe = sincos_pos_embed_2d(14, D).double()
    if content == "patch+cls":
        pe = torch.cat([torch.zeros(1, D, dtype=F64), pe])
    assert "pos_embed" in dict(cond.named_buffers())
    torch.testing.assert_close(cond.pos_embed.double(), pe)
    expected = cond.scorer(content_tokens + pe).transpose(1, 2).softmax(-1)
    torch.testing.assert_close(scores, expected)
    assert "pos_embed" not in cond.state_dict()
    with pytest.raises(ValueError, match="square"):
        AbMILP(D, pos_cond=True)(_tokens(1 + 195))


def test_pos_cond_first_use_under_inference_mode():
    head = AbMILP(D, pos_cond=True)
    with torch.inference_mode():
        head(_tokens(197))
    head(_tokens(197)).sum().backward()
    assert head.scorer[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "depth,act,types",
    [
        (1, "relu", [nn.Linear]),
        (2, "tanh", [nn.Linear, nn.Tanh, nn.Linear]),
        (3, "gelu", [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]),
        (4, "relu", [nn.Linear, nn.ReLU] * 3 + [nn.Linear]),
    ],
)
def test_depth_act_layer_stack(depth, act, types):
    head = AbMILP(D, depth=depth, act=act, branches=2).double()
    assert [type(m) for m in head.scorer] == types
    linears = [m for m in head.scorer if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(D, D)] * (depth - 1) + [(D, 2)]
    t = _tokens(197, dtype=F64)
    pooled, scores = head.forward_with_scores(t)
    expected = head.scorer(t[:, 1:]).transpose(1, 2).softmax(-1)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(pooled, torch.einsum("bkn,bnd->bkd", expected, t[:, 1:]))


def test_abmilp_deterministic_init():
    torch.manual_seed(7)
    a = AbMILP(D, depth=3)
    torch.manual_seed(7)
    b = AbMILP(D, depth=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("depth", [1, 2])
def test_branches_are_independent(depth):
    head = AbMILP(D, depth=depth, branches=3, num_prefix_tokens=5).double()
    t = _tokens(201, dtype=F64)
    pooled, scores = head.forward_with_scores(t)
    out = head(t)
    for k in range(3):
        single = AbMILP(D, depth=depth, branches=1, num_prefix_tokens=5).double()
        state = head.state_dict()
        last = f"scorer.{2 * (depth - 1)}"
        state[f"{last}.weight"] = state[f"{last}.weight"][k : k + 1]
        state[f"{last}.bias"] = state[f"{last}.bias"][k : k + 1]
        single.load_state_dict(state)
        p_k, s_k = single.forward_with_scores(t)
        torch.testing.assert_close(pooled[:, k], p_k[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scores[:, k], s_k[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out[:, k * D : (k + 1) * D], p_k[:, 0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scores[:, 0], scores[:, 1])


def test_self_attention_abmilp_map_vs_both():
    p = 5
    sa_map = SelfAttentionAbMILP(D, num_heads=4, apply_to="map", num_prefix_tokens=p).double()
    sa_both = SelfAttentionAbMILP(D, num_heads=4, apply_to="both", num_prefix_tokens=p).double()
    sa_both.load_state_dict(sa_map.state_dict())
    assert isinstance(sa_map.attn, timm.layers.Attention) and sa_map.attn.qkv.bias is not None
    assert isinstance(sa_map.abmilp, AbMILP)
    t = _tokens(p + 196, dtype=F64)
    patches = t[:, p:]
    mixed = sa_map.attn(patches)
    lin = sa_map.abmilp.scorer[0]
    scores = (mixed @ lin.weight.T + lin.bias).transpose(1, 2).softmax(-1)
    pooled_map, scores_map = sa_map.forward_with_scores(t)
    pooled_both, scores_both = sa_both.forward_with_scores(t)
    torch.testing.assert_close(scores_map, scores)
    torch.testing.assert_close(scores_both, scores)
    torch.testing.assert_close(pooled_map, torch.einsum("bkn,bnd->bkd", scores, patches))
    torch.testing.assert_close(pooled_both, torch.einsum("bkn,bnd->bkd", scores, mixed))
    assert not torch.allclose(pooled_map, pooled_both)
    # the self-attention layer trains with the scorer
    sa_map(t).sum().backward()
    assert sa_map.attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("num_heads", [1, 12])
def test_attentive_pool_matches_materialized(num_heads):
    p = 5
    head = AttentivePool(D, num_heads=num_heads, num_prefix_tokens=p).double()
    t = _tokens(p + 196, dtype=F64)
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


def test_linear_probe_head_and_one_sgd_step():
    encoder = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=D,
        depth=1,
        num_heads=4,
        num_classes=0,
        reg_tokens=4,
        no_embed_class=True,
    )
    encoder.requires_grad_(False)
    probe = LinearProbe(AbMILP(D, num_prefix_tokens=encoder.num_prefix_tokens), D, num_classes=100)
    bn, linear = probe.head
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.weight is None and bn.eps == 1e-6
    assert list(bn.parameters()) == []
    assert abs(linear.weight.std().item() - 0.01) < 0.001
    assert torch.equal(linear.bias, torch.zeros(100))
    assert {n for n, _ in probe.named_parameters()} == {
        "aggregation.scorer.0.weight",
        "aggregation.scorer.0.bias",
        "head.1.weight",
        "head.1.bias",
    }
    before_enc = {n: x.clone() for n, x in encoder.state_dict().items()}
    before = {n: x.detach().clone() for n, x in probe.named_parameters()}
    running_mean = bn.running_mean.clone()
    opt = torch.optim.SGD(probe.parameters(), lr=1.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    loss = F.cross_entropy(probe(encoder.forward_features(images)), labels)
    loss.backward()
    opt.step()
    assert all(x.grad is None for x in encoder.parameters())
    assert all(torch.equal(x, before_enc[n]) for n, x in encoder.state_dict().items())
    for name in ("aggregation.scorer.0.weight", "head.1.weight", "head.1.bias"):
        assert not torch.equal(dict(probe.named_parameters())[name], before[name]), name
    assert not torch.equal(bn.running_mean, running_mean)


def test_abmilp_gradcheck():
    head = AbMILP(6, branches=2, num_prefix_tokens=2).double()
    t = torch.randn(2, 2 + 4, 6, dtype=F64, requires_grad=True)
    w = head.scorer[0].weight.detach().clone().requires_grad_(True)
    b = head.scorer[0].bias.detach().clone().requires_grad_(True)

    def f(t, w, b):
        return torch.func.functional_call(head, {"scorer.0.weight": w, "scorer.0.bias": b}, (t,))

    assert torch.autograd.gradcheck(f, (t, w, b))
    mlp = AbMILP(8, depth=2, act="tanh", pos_cond=True).double()
    t8 = torch.randn(2, 1 + 4, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(mlp, (t8,), fast_mode=True)
    mlp(t8).pow(2).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in mlp.scorer[0].parameters())
    assert mlp.scorer[2].weight.grad.abs().sum() > 0


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
        (lambda: AbMILP(6, pos_cond=True), "pos_cond"),
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
