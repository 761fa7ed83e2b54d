"""AbMILP and SA-AbMILP heads: against the reference op, [cls] content, positional conditioning, MLP scorers,
branches, self-attention, gradients."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from beyond_cls import ops, reference
from beyond_cls.heads import AbMILP, SelfAttentionAbMILP, sincos_pos_embed_2d
from tests.heads.head_checks import F64, LAYOUTS, D, tokens


@pytest.mark.parametrize("n,p", LAYOUTS)
def test_abmilp_linear_matches_reference(n, p, monkeypatch):
    head = AbMILP(D, num_prefix_tokens=p).double()
    calls = []

    def spy(tokens, weight, bias):
        calls.append(weight.shape)
        return reference.abmilp_pool(tokens, weight, bias)

    monkeypatch.setattr(ops, "abmilp_pool", spy)
    t = tokens(n, dtype=F64)
    pooled, scores = head.forward_with_scores(t)
    assert calls == [(1, D)]  # the fused front is used, with weight [K, D]
    lin = head.scorer[0]
    ref_pooled, ref_scores = reference.abmilp_pool(t[:, p:], lin.weight[0], lin.bias[0])
    torch.testing.assert_close(pooled[:, 0], ref_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores[:, 0], ref_scores, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(t), ref_pooled, rtol=1e-12, atol=1e-12)
    AbMILP(D, depth=2, num_prefix_tokens=p).double()(t)
    AbMILP(D, pos_cond=True, num_prefix_tokens=p, grid=14).double()(t)
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


@pytest.mark.parametrize("grid", [5, (3, 4)])
def test_sincos_pos_embed_values(grid):
    """Column channels first (MAE's get_2d_sincos_pos_embed: its meshgrid puts w first), row-major patches;
    ``column_first=False`` is the (row, column) order of beyond-cls 0.1."""
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    dim = 16
    pe = sincos_pos_embed_2d(grid, dim)
    old = sincos_pos_embed_2d(grid, dim, column_first=False)
    assert pe.shape == old.shape == (rows * cols, dim) and pe.dtype == torch.float32
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=F64) / q)
    for r, c in [(0, 0), (1, 3), (2, 2), (rows - 1, cols - 1)]:
        row = torch.cat([torch.sin(r * omega), torch.cos(r * omega)])
        col = torch.cat([torch.sin(c * omega), torch.cos(c * omega)])
        torch.testing.assert_close(pe[r * cols + c].double(), torch.cat([col, row]), rtol=0, atol=1e-6)
        torch.testing.assert_close(old[r * cols + c].double(), torch.cat([row, col]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        sincos_pos_embed_2d(4, 10)


def _plain_and_positional(content: str, p: int, **positional) -> tuple[AbMILP, AbMILP, torch.Tensor]:
    """(the head without -pos, the same head with it (same scorer: one seed), float64 tokens of 14x14 patches)."""
    torch.manual_seed(1)
    plain = AbMILP(D, content=content, num_prefix_tokens=p).double()
    torch.manual_seed(1)
    cond = AbMILP(D, content=content, pos_cond=True, num_prefix_tokens=p, **positional).double()
    return plain, cond, tokens(p + 196, dtype=F64)


@pytest.mark.parametrize("content", ["patch", "patch+cls"])
def test_pos_cond(content):
    """The authors' -pos: a trainable table, sin-cos (column, row) init, zero [cls] row, in the state dict."""
    p = 5
    plain, cond, t = _plain_and_positional(content, p, grid=(14, 14))
    assert set(cond.state_dict()) == set(plain.state_dict()) | {"pos_embed"}
    assert isinstance(cond.pos_embed, nn.Parameter) and cond.pos_embed.requires_grad
    cond.load_state_dict({**plain.state_dict(), "pos_embed": cond.pos_embed.detach()})
    content_tokens = plain.select(t)
    pooled_plain, scores_plain = plain.forward_with_scores(t)
    pooled, scores = cond.forward_with_scores(t)
    assert not torch.allclose(scores, scores_plain)
    torch.testing.assert_close(pooled, torch.einsum("bkn,bnd->bkd", scores, content_tokens))
    pe = sincos_pos_embed_2d(14, D).double()
    if content == "patch+cls":
        pe = torch.cat([torch.zeros(1, D, dtype=F64), pe])
    torch.testing.assert_close(cond.pos_embed.detach(), pe)
    expected = cond.scorer(content_tokens + pe).transpose(1, 2).softmax(-1)
    torch.testing.assert_close(scores, expected)
    cond(t).square().sum().backward()  # trained: every row gets a gradient, the [cls] row too
    assert (cond.pos_embed.grad.abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="14x14 patch grid"):
        cond(tokens(p + 195, dtype=F64))
    with pytest.raises(ValueError, match="grid"):
        AbMILP(D, pos_cond=True)


@pytest.mark.parametrize("content", ["patch", "patch+cls"])
def test_pos_cond_fixed_legacy(content):
    """``fixed_pos``: the embedding of checkpoints of beyond-cls 0.1: a (row, column) buffer, not saved."""
    p = 5
    plain, cond, t = _plain_and_positional(content, p, fixed_pos=True)
    assert set(cond.state_dict()) == set(plain.state_dict())  # same params; the buffer is not saved
    cond.load_state_dict(plain.state_dict())
    content_tokens = plain.select(t)
    pooled_plain, scores_plain = plain.forward_with_scores(t)
    pooled, scores = cond.forward_with_scores(t)
    assert not torch.allclose(scores, scores_plain)
    # the pooled content is the raw tokens; only the scorer's input is shifted
    torch.testing.assert_close(pooled, torch.einsum("bkn,bnd->bkd", scores, content_tokens))
    pe = sincos_pos_embed_2d(14, D, column_first=False).double()
    if content == "patch+cls":
        pe = torch.cat([torch.zeros(1, D, dtype=F64), pe])
    assert "pos_embed" in dict(cond.named_buffers())
    torch.testing.assert_close(cond.pos_embed.double(), pe)
    expected = cond.scorer(content_tokens + pe).transpose(1, 2).softmax(-1)
    torch.testing.assert_close(scores, expected)
    assert "pos_embed" not in cond.state_dict()
    with pytest.raises(ValueError, match="square"):
        AbMILP(D, pos_cond=True, fixed_pos=True)(tokens(1 + 195))


def test_pos_cond_first_use_under_inference_mode():
    head = AbMILP(D, pos_cond=True, fixed_pos=True)
    with torch.inference_mode():
        head(tokens(197))
    head(tokens(197)).sum().backward()
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
    t = tokens(197, dtype=F64)
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
    t = tokens(201, dtype=F64)
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
    assert isinstance(sa_map.attn, timm.layers.Attention) and sa_map.attn.qkv.bias is None  # as the authors'
    assert SelfAttentionAbMILP(D, qkv_bias=True).attn.qkv.bias is not None  # checkpoints of beyond-cls 0.1
    assert isinstance(sa_map.abmilp, AbMILP)
    t = tokens(p + 196, dtype=F64)
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


def test_abmilp_gradcheck():
    head = AbMILP(6, branches=2, num_prefix_tokens=2).double()
    t = torch.randn(2, 2 + 4, 6, dtype=F64, requires_grad=True)
    w = head.scorer[0].weight.detach().clone().requires_grad_(True)
    b = head.scorer[0].bias.detach().clone().requires_grad_(True)

    def f(t, w, b):
        return torch.func.functional_call(head, {"scorer.0.weight": w, "scorer.0.bias": b}, (t,))

    assert torch.autograd.gradcheck(f, (t, w, b))
    mlp = AbMILP(8, depth=2, act="tanh", pos_cond=True, grid=2).double()
    t8 = torch.randn(2, 1 + 4, 8, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(mlp, (t8,), fast_mode=True)
    mlp(t8).pow(2).sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in mlp.scorer[0].parameters())
    assert mlp.scorer[2].weight.grad.abs().sum() > 0
    assert mlp.pos_embed.grad.abs().sum() > 0
