"""The head bank: spec parsing and building, keys, per-head initialization, forward and eval entropy."""

from __future__ import annotations

import math

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.heads import AbMILP, AttentivePool, ClsToken, MeanPatch, SelfAttentionAbMILP
from beyond_cls.probe import HeadBank, build_aggregation, head_key, parse_heads


def test_head_specs_build_the_right_modules():
    kinds = {
        "cls": ClsToken, "mean": MeanPatch, "abmilp": AbMILP, "abmilp+cls": AbMILP, "ap12": AttentivePool,
        "saabmilp-h2-map": SelfAttentionAbMILP,
    }
    for spec, kind in kinds.items():
        assert isinstance(build_aggregation(spec, 48, 1, True), kind), spec
    agg = build_aggregation("abmilp-k4-mlp2-gelu-pos", 48, 1, True, grid=(14, 14))
    assert (agg.branches, agg.depth, agg.act, agg.pos_cond, agg.out_dim) == (4, 2, "gelu", True, 192)
    assert build_aggregation("abmilp+cls", 48, 1, True).content == "patch+cls"
    assert build_aggregation("ap12", 48, 1, True).num_heads == 12
    sa = build_aggregation("saabmilp-h2-map", 48, 1, True)
    assert sa.apply_to == "map" and sa.attn.num_heads == 2


@pytest.mark.parametrize("text,message", [("cls,pool", "unknown head"), ("abmilp-k4-foo", "foo"),
                                          ("mean,mean", "twice"), ("", "expected"), ("ap", "ap<heads>"),
                                          ("ap5", "dividing")])
def test_bad_head_specs(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_heads(text)


def test_cls_heads_need_a_cls_token():
    with pytest.raises(ConfigError, match="no"):
        build_aggregation("abmilp+cls", 48, 0, False)
    assert isinstance(build_aggregation("abmilp", 48, 0, False), AbMILP)


def test_bank_keys_init_and_forward():
    bank = HeadBank(["cls", "abmilp"], [0.05, 0.1], dim=32, num_classes=5, num_prefix_tokens=1,
                    has_class_token=True, seed=7)
    assert list(bank.heads) == ["cls@blr0p05", "cls@blr0p1", "abmilp@blr0p05", "abmilp@blr0p1"]
    assert head_key("abmilp+cls", 0.1) == "abmilp+cls@blr0p1"
    # a head's init depends on the seed and its spec only: same in a bank and alone
    alone = HeadBank(["abmilp"], [0.1], 32, 5, 1, True, seed=7)
    torch.testing.assert_close(alone.heads["abmilp@blr0p1"].state_dict(), bank.heads["abmilp@blr0p1"].state_dict())
    other = HeadBank(["abmilp"], [0.1], 32, 5, 1, True, seed=8)
    w = lambda b: b.heads["abmilp@blr0p1"].aggregation.scorer[0].weight
    assert not torch.equal(w(alone), w(other))
    tokens = torch.randn(6, 17, 32)
    logits = bank(tokens)
    assert set(logits) == set(bank.heads) and all(v.shape == (6, 5) for v in logits.values())
    groups = bank.param_groups(lr_scale=4.0)
    assert [g["base_lr"] for g in groups] == [0.2, 0.4, 0.2, 0.4] and [g["key"] for g in groups] == list(bank.heads)


def test_bank_eval_entropy():
    bank = HeadBank(["cls", "mean", "abmilp"], [0.1], 32, 5, 1, True).eval()
    tokens = torch.randn(3, 17, 32, dtype=torch.float64)
    bank = bank.double()
    logits, entropy = bank.forward_eval(tokens)
    torch.testing.assert_close(logits["abmilp@blr0p1"], bank.heads["abmilp@blr0p1"](tokens))
    assert math.isnan(float(entropy["cls@blr0p1"]))
    assert math.isclose(float(entropy["mean@blr0p1"]) / 3, math.log(16))
    _, scores = bank.heads["abmilp@blr0p1"].aggregation.forward_with_scores(tokens)
    expected = -(scores * scores.log()).sum(-1).mean().detach()
    assert math.isclose(float(entropy["abmilp@blr0p1"]) / 3, float(expected), rel_tol=1e-9)
    assert 0 < float(expected) < math.log(16)
