"""The aggregation registry: every registered head builds, trains and reports entropy as it declares; parsing,
the CLI help and the docs' table (docs/reference.md) come from it, and existing specs keep their modules and keys."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from beyond_cls.config import ConfigError
from beyond_cls.heads import AbMILP, AttentivePool, ClsToken, MeanPatch, SelectionPool, SelfAttentionAbMILP, registry
from beyond_cls.heads.registry import (
    Aggregation,
    build_aggregation,
    find,
    heads_help,
    heads_table_markdown,
    parse_heads,
    register,
)
from beyond_cls.numerics import entropy
from beyond_cls.probe.bank import HeadBank, head_key

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
EXAMPLES = [(a.name, spec) for a in registry.AGGREGATIONS.values() for spec in a.examples]


@pytest.mark.parametrize("name,spec", EXAMPLES)
def test_every_registered_head_builds_and_trains_as_declared(name, spec):
    declared = registry.AGGREGATIONS[name]
    assert [a.name for a in registry.AGGREGATIONS.values() if a.matches(spec)] == [name]  # one family per spec
    assert parse_heads(spec.upper() if declared.normalize is str.lower else spec) == [spec]
    module = build_aggregation(spec, 48, 1, True, grid=(4, 4))
    assert module.out_dim % 48 == 0
    assert any(p.requires_grad for p in module.parameters()) == declared.trainable
    if declared.needs_cls:
        with pytest.raises(ConfigError, match=r"needs a \[cls\] token"):
            build_aggregation(spec, 48, 0, False, grid=(4, 4))
    else:
        build_aggregation(spec, 48, 0, False, grid=(4, 4))


@pytest.mark.parametrize("name,spec", EXAMPLES)
def test_every_registered_head_reports_entropy_as_declared(name, spec):
    declared = registry.AGGREGATIONS[name]
    bank = HeadBank([spec], [0.1], 48, 5, num_prefix_tokens=1, has_class_token=True, grid=(4, 4)).double().eval()
    tokens = torch.randn(3, 1 + 16, 48, dtype=torch.float64)
    sel = torch.rand(3, 1, 16, dtype=torch.float64).softmax(-1) if declared.selection else None
    key = head_key(spec, 0.1)
    logits, entropies = bank.forward_eval(tokens, sel)
    torch.testing.assert_close(logits[key], bank(tokens, sel)[key])
    got = float(entropies[key]) / 3
    if declared.entropy == "none":
        assert math.isnan(got)
    elif declared.entropy == "uniform":
        assert got == pytest.approx(math.log(16))
    elif declared.entropy == "scores":
        with torch.no_grad():
            _, scores = bank.heads[key].aggregation.forward_with_scores(tokens)
        assert got == pytest.approx(float(entropy(scores).mean()), rel=1e-9)
    else:
        assert got == pytest.approx(float(entropy(sel[:, 0]).mean()), rel=1e-12)


class MaxPatch(nn.Module):
    """A head added in a test: the channel-wise maximum of the patches."""

    def __init__(self, dim: int, num_prefix_tokens: int) -> None:
        super().__init__()
        self.out_dim, self.num_prefix_tokens = dim, num_prefix_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        return tokens[:, self.num_prefix_tokens :].amax(1)


@pytest.fixture
def max_head(monkeypatch):
    monkeypatch.setattr(registry, "AGGREGATIONS", dict(registry.AGGREGATIONS))
    return register(Aggregation("max", "max", "channel-wise maximum of the patches", "max",
                                lambda spec, dim, prefix: MaxPatch(dim, prefix), examples=("max",), trainable=False,
                                entropy="none"))


def test_a_head_registered_elsewhere_is_parsed_built_listed_and_tabled(max_head):
    assert parse_heads("cls,MAX") == ["cls", "max"]
    bank = HeadBank(["max", "mean"], [0.1], 8, 3, num_prefix_tokens=1, has_class_token=True).eval()
    assert isinstance(bank.heads["max@blr0p1"].aggregation, MaxPatch)
    _, entropies = bank.forward_eval(torch.randn(2, 5, 8))
    assert math.isnan(float(entropies["max@blr0p1"]))
    assert "max" in heads_help().split(";")[0]
    assert "| `max` | channel-wise maximum of the patches | no | no | – |" in heads_table_markdown()
    with pytest.raises(ValueError, match="twice"):
        register(max_head)


def test_register_checks_the_declaration(monkeypatch):
    monkeypatch.setattr(registry, "AGGREGATIONS", dict(registry.AGGREGATIONS))
    bad = Aggregation("odd", "odd", "", "odd", lambda spec, dim, prefix: MaxPatch(dim, prefix), ("odd",), False,
                      entropy="some")
    with pytest.raises(ValueError, match="entropy"):
        register(bad)


def test_the_docs_have_the_generated_table():
    text = REFERENCE.read_text(encoding="utf-8")
    header = heads_table_markdown().splitlines()[0]
    assert text.count(header) == 1, "docs/reference.md must have one heads table"
    assert heads_table_markdown() in text, "docs/reference.md's heads table is stale: paste heads_table_markdown()"


def test_help_lists_every_syntax():
    text = heads_help()
    assert all(a.syntax in text for a in registry.AGGREGATIONS.values())
    assert "%" not in text  # argparse help strings format with %


# Specs that parsed before the registry: same modules, options, keys (checkpoints of existing runs stay loadable).
SPECS = {
    "cls": (ClsToken, {}),
    "mean": (MeanPatch, {"num_prefix_tokens": 1}),
    "abmilp": (AbMILP, {"content": "patch", "branches": 1, "depth": 1, "act": "relu", "pos_cond": False}),
    "abmilp+cls": (AbMILP, {"content": "patch+cls"}),
    "abmilp-k4-mlp2-gelu-pos": (AbMILP, {"branches": 4, "depth": 2, "act": "gelu", "pos_cond": True}),
    "abmilp+cls-k2-tanh-mlp3": (AbMILP, {"content": "patch+cls", "branches": 2, "depth": 3, "act": "tanh"}),
    "abmilp-k16": (AbMILP, {"branches": 16}),
    "saabmilp": (SelfAttentionAbMILP, {"apply_to": "both"}),
    "saabmilp-h2-map": (SelfAttentionAbMILP, {"apply_to": "map"}),
    "saabmilp+cls-h4-k2": (SelfAttentionAbMILP, {"apply_to": "both"}),
    "ap1": (AttentivePool, {"num_heads": 1}),
    "ap12": (AttentivePool, {"num_heads": 12}),
    "attn-mean": (SelectionPool, {}),
    "attn-minent": (SelectionPool, {}),
    "attn-center": (SelectionPool, {}),
    "guide:Some_Model@weights/DINO.pth": (SelectionPool, {}),
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_existing_specs_build_the_same_modules(spec):
    kind, attrs = SPECS[spec]
    module = build_aggregation(spec, 48, 1, True, grid=(14, 14))
    assert type(module) is kind
    assert {k: getattr(module, k) for k in attrs} == attrs
    assert head_key(spec, 0.1) == ("guide:Some_Model@DINO@blr0p1" if spec.startswith("guide:")
                                   else f"{spec}@blr0p1")


@pytest.mark.parametrize("legacy", [False, True])
def test_existing_state_dict_keys(legacy):
    """State-dict keys; ``legacy`` (checkpoints of beyond-cls 0.1): SA-AbMILP's qkv bias, no ``-pos`` table."""
    params = {
        "abmilp-k2-mlp2": ["scorer.0.weight", "scorer.0.bias", "scorer.2.weight", "scorer.2.bias"],
        "abmilp+cls-pos": ["scorer.0.weight", "scorer.0.bias"] + ([] if legacy else ["pos_embed"]),
        "saabmilp-h2-map": ["attn.qkv.weight", *(["attn.qkv.bias"] if legacy else []), "attn.proj.weight",
                            "attn.proj.bias", "abmilp.scorer.0.weight", "abmilp.scorer.0.bias"],
        "ap1": ["query", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"],
    }
    probe = ["head.0.running_mean", "head.0.running_var", "head.0.num_batches_tracked", "head.1.weight", "head.1.bias"]
    bank = HeadBank(list(params), [0.1], 48, 3, 1, True, grid=(14, 14), legacy=legacy)
    want = [f"heads.{spec}@blr0p1.{name}" for spec, names in params.items()
            for name in [f"aggregation.{n}" for n in names] + probe]
    assert sorted(bank.state_dict()) == sorted(want)


@pytest.mark.parametrize("text,message", [("pool", "unknown head"), ("apx", "unknown head"), ("cls-x", "no options"),
                                          ("abmilp:runs/probe", "not a probe head"), ("guide:", "guide"),
                                          ("saabmilp-h5", "dividing"), ("abmilp-k17", "branches")])
def test_bad_specs_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_heads(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["abmilp-k0", "abmilp-k17", "abmilp+cls-k64", "saabmilp-k32"])
def test_abmilp_branches_outside_1_to_16_refused(spec):
    with pytest.raises(ConfigError, match=r"1\.\.16"):
        parse_heads(f"cls,{spec}")
    assert parse_heads("abmilp-k16") == ["abmilp-k16"]


def test_specs_match_in_any_case_and_keep_a_guides_names():
    assert find(" ATTN-Mean ").name == "attn-mean"
    assert parse_heads("Mean, GUIDE:Some_Model@w/DINO.pth") == ["mean", "guide:Some_Model@w/DINO.pth"]


def test_heads_and_selection_math_sit_below_probe_analysis_and_cli():
    from tests.test_layering import import_graph

    graph = import_graph()
    reached, todo = set(), [m for m in graph if m.startswith("beyond_cls.heads") or m == "beyond_cls.selection"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    above = sorted(m for m in reached if m.startswith(("beyond_cls.probe", "beyond_cls.analysis", "beyond_cls.cli")))
    assert not above, f"beyond_cls.heads / beyond_cls.selection reach {above}"
