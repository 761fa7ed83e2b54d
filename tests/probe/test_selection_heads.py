"""Non-trainable aggregations as probe heads: the bank, the selection source, cached and uncached runs."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from beyond_cls.analysis.aggregations import AggregationsConfig, aggregations
from beyond_cls.analysis.selection_runner import SelectionRunner
from beyond_cls.capture import RowCapture, restore_forward, swap_forward
from beyond_cls.config import ConfigError
from beyond_cls.data import IMAGENET_MEAN, IMAGENET_STD, make_synthetic_dataset
from beyond_cls.numerics import entropy
from beyond_cls.probe import run
from beyond_cls.probe.bank import HeadBank, head_key, parse_heads
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.selections import SelectionSource
from beyond_cls.probe.state import load_state
from beyond_cls.selection import attention_selection, encoder_norm
from tests.selection_checks import MODELS, direct, last_block_attention, make_model, normalize
from tests.tiny_probe import TINY_SET


def test_parse_heads_keeps_guide_names_and_rejects_what_cannot_be_a_head():
    specs = parse_heads("Mean, ATTN-Mean, guide:Some_Model@weights/DINO.pth, attn-center")
    assert specs == ["mean", "attn-mean", "guide:Some_Model@weights/DINO.pth", "attn-center"]
    assert head_key(specs[2], 0.1) == "guide:Some_Model@DINO@blr0p1"
    assert head_key("attn-minent", 1.0) == "attn-minent@blr1"
    with pytest.raises(ConfigError, match="not a probe head"):
        parse_heads("abmilp:runs/probe")
    bank_args = ([0.1], 8, 3, 0, False)  # dim, classes, prefix tokens, no [cls]
    with pytest.raises(ConfigError, match="no \\[cls\\] token"):
        HeadBank(["attn-mean"], *bank_args)
    HeadBank(["attn-center", "guide:x"], *bank_args)  # need no [cls] of their own


def test_bank_trains_only_the_linear_heads_on_given_selections():
    torch.manual_seed(0)
    specs = ["mean", "attn-mean", "attn-center"]
    bank = HeadBank(specs, [0.1, 1.0], 16, 5, num_prefix_tokens=1, has_class_token=True)
    assert bank.selections == ["attn-mean", "attn-center"]
    tokens = torch.randn(6, 10, 16)
    sel = torch.rand(6, 2, 9).softmax(-1)
    logits = bank(tokens, sel)
    for m, spec in enumerate(bank.selections):
        head = bank.heads[head_key(spec, 1.0)]
        assert not list(head.aggregation.parameters())
        want = head.head(torch.einsum("bp,bpd->bd", sel[:, m], tokens[:, 1:]))
        torch.testing.assert_close(logits[head_key(spec, 1.0)], want)
    with pytest.raises(ValueError, match="need selections"):
        bank(tokens)
    bank.eval()
    _, ent = bank.forward_eval(tokens, sel)
    torch.testing.assert_close(ent["attn-center@blr0p1"], entropy(sel[:, 1].double()).sum())
    assert ent["mean@blr1"].item() == pytest.approx(6 * math.log(9))


@pytest.mark.parametrize("key", list(MODELS))
def test_selection_source_matches_materialized_attention_of_the_token_block(key):
    kwargs, size = MODELS[key]
    model = make_model(kwargs, size)
    images = normalize(torch.rand(2, 3, size, size))
    want = direct(last_block_attention(model, images), model.num_prefix_tokens, tuple(model.patch_embed.grid_size))
    with torch.no_grad():
        plain = model.forward_features(images)
    names = ["attn-mean", "attn-minent", "attn-center"]
    source = SelectionSource(TokenSource(model, final_norm=True), names, IMAGENET_MEAN, IMAGENET_STD)
    tokens, sel = source(images)
    torch.testing.assert_close(tokens, plain, rtol=1e-4, atol=1e-5)  # the captured block still computes its output
    assert sel.dtype == torch.float32 and sel.shape == (2, 3, want["attn-mean"].shape[-1])
    for m, name in enumerate(names):
        torch.testing.assert_close(sel[:, m].double(), want[name], rtol=1e-5, atol=1e-6, msg=name)
    empty_tokens, empty = source(images[:0])
    assert empty_tokens.shape[0] == 0 and empty.shape == (0, 3, sel.shape[-1])


def test_selection_source_reads_a_truncated_encoders_last_block():
    model = make_model({}, 64)
    model.blocks.append(make_model({}, 64).blocks[0])  # 3 blocks; tokens from block 1
    images = normalize(torch.rand(2, 3, 64, 64))
    tokens_only = TokenSource(model, block=1, final_norm=False)
    assert len(model.blocks) == 2
    want = direct(last_block_attention(model, images), 1, (4, 4))["attn-mean"]
    _, sel = SelectionSource(tokens_only, ["attn-mean"], IMAGENET_MEAN, IMAGENET_STD)(images)
    torch.testing.assert_close(sel[:, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_guide_selection_renormalizes_the_images_for_the_guide():
    model = make_model({}, 48)
    pixels = torch.rand(2, 3, 48, 48)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # the probed encoder's normalization, not the guide's
    images = (pixels - 0.5) / 0.25
    source = SelectionSource(TokenSource(model), ["guide:vit_tiny_patch16_224"], mean, std, img_size=48)
    _, sel = source(images)
    guide = source.guides["guide:vit_tiny_patch16_224"]
    guide.capture.remove()  # timm's own unfused attention for the reference
    want = direct(last_block_attention(guide.model, normalize(pixels)), 1, (3, 3))["attn-mean"]
    torch.testing.assert_close(sel[:, 0].double(), want, rtol=1e-4, atol=1e-6)
    runner = SelectionRunner(["guide:vit_tiny_patch16_224"], img_size=48)  # the aggregations job's guide
    torch.testing.assert_close(sel[:, 0].double(), runner(pixels)["guide:vit_tiny_patch16_224"], rtol=1e-4,
                               atol=1e-6)
    with pytest.raises(ConfigError, match="patch grid"):
        SelectionSource(TokenSource(make_model({}, 64)), ["guide:vit_tiny_patch16_224"], mean, std, img_size=48)


def test_row_capture_restores_the_forward_and_checks_its_arguments():
    model = make_model({}, 32)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(images)
        with RowCapture(model, (0, -1)) as capture:
            inside = model.forward_features(images)
            rows = capture.take()
        after = model.forward_features(images)
    assert rows.shape == (1, 3, 2, 5) and "forward" not in model.blocks[-1].attn.__dict__
    torch.testing.assert_close(rows.sum(-1), torch.ones(1, 3, 2))
    torch.testing.assert_close(inside, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="run the model first"):
        capture.take()
    with pytest.raises(ValueError, match="outside"):
        RowCapture(model, (0,), block=2)
    with pytest.raises(TypeError, match="non-empty sequence"):
        RowCapture(model, ())


def test_swap_forward_gives_back_an_instance_forward_too():
    module = torch.nn.Linear(2, 2)
    own = module.forward
    saved = swap_forward(module, lambda self, x: x * 0)
    assert module(torch.ones(1, 2)).abs().sum() == 0
    restore_forward(module, saved)
    assert "forward" not in module.__dict__ and module.forward == own
    module.forward = lambda x: x + 1  # an instance forward (e.g. another tool's patch) is restored, not dropped
    restore_forward(module, swap_forward(module, lambda self, x: x * 0))
    assert torch.equal(module(torch.zeros(1, 2)), torch.ones(1, 2))


def test_one_normalization_rule_and_a_guide_reads_its_attn_mean():
    own = SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert encoder_norm(own) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert encoder_norm(own, [0.1, 0.2, 0.3]) == ((0.1, 0.2, 0.3), (0.25, 0.25, 0.25))
    assert encoder_norm(SimpleNamespace(mean=None, std=None)) == (IMAGENET_MEAN, IMAGENET_STD)
    rows = torch.rand(2, 3, 2, 11, dtype=torch.float64).softmax(-1)
    patches = rows[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(attention_selection("guide", rows, 1), patches / patches.sum(-1, keepdim=True),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown attention method"):
        attention_selection("guide:vit_tiny_patch16_224", rows, 1)


# ---------------------------------------------------------------------------------------------------------------
# End to end

TINY = dict(model="vit_tiny_patch16_224", img_size=32, epochs=2, warmup_epochs=1, batch_size=4, effective_batch=8,
            num_workers=0, progress=False, lrs="0.1", cache_views=2, device="cpu")
HEADS = "mean,attn-mean,attn-minent,attn-center,guide:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("sel") / "set", TINY_SET)


def test_probe_with_non_trainable_heads_cached_equals_uncached(dataset, tmp_path):
    plain = run(dict(TINY, heads=HEADS, data=str(dataset), out=str(tmp_path / "plain")))
    cache = tmp_path / "cache"
    cached = run(dict(TINY, heads=HEADS, data=str(dataset), out=str(tmp_path / "cached"), cache=str(cache),
                      cache_dtype="fp32"))
    for a, b in zip(plain["rows"], cached["rows"]):
        assert a["head"] == b["head"] and a["top1"] == b["top1"]
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-6)
    ent = {r["aggregation"]: r["entropy"] for r in plain["summary"]}
    assert ent["mean"] == pytest.approx(math.log(4)) and all(ent[h] < math.log(4) for h in HEADS.split(",")[1:])
    bank_a = load_state(tmp_path / "plain" / "seed0" / "checkpoint.pt")["bank"]
    bank_b = load_state(tmp_path / "cached" / "seed0" / "checkpoint.pt")["bank"]
    assert set(bank_a) == set(bank_b)
    for k in bank_a:
        torch.testing.assert_close(bank_a[k], bank_b[k], rtol=1e-5, atol=1e-6, msg=k)
    # tokens + 4 selections, each for train (seed 0) and val
    folders = sorted(p for p in cache.iterdir() if p.is_dir())
    assert len(folders) == 10
    kinds = [json.loads((p / "fingerprint.json").read_text()).get("selection") for p in folders]
    assert sorted(kinds, key=str).count(None) == 2
    # a run with one selection head less reuses every shard: nothing new is written
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.bin")}
    run(dict(TINY, heads="mean,attn-center", epochs=1, warmup_epochs=0, data=str(dataset), out=str(tmp_path / "again"),
             cache=str(cache), cache_dtype="fp32"))
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.bin")} == stamps
    # the eval entropies are those the aggregations job measures on the same images and random encoders
    table = aggregations(AggregationsConfig(data=str(dataset), out=str(tmp_path / "agg"), split="val",
                                            heads=HEADS.split(",", 1)[1], model="vit_tiny_patch16_224",
                                            img_size=32, num_workers=0, progress=False, examples=0, device="cpu"))
    for row in table["methods"]:
        assert ent[row["method"]] == pytest.approx(row["entropy"], abs=1e-5), row["method"]


def test_cli_heads_help_lists_the_non_trainable_aggregations(capsys):
    from beyond_cls.cli import main

    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("attn-mean", "attn-minent", "attn-center", "guide:MODEL"))


def test_bench_probe_measures_non_trainable_heads_without_a_baseline(tmp_path, monkeypatch):
    from beyond_cls.probe.bench import BenchProbeConfig, bench_probe

    kw = dict(model="vit_tiny_patch16_224", img_size=32, batch_size=4, steps=1, warmup=0, num_workers=0,
              heads="mean,attn-mean", num_classes=10, device="cpu")
    with pytest.raises(ConfigError, match="--no-baseline"):
        BenchProbeConfig(**kw)
    monkeypatch.setenv("BEYOND_CLS_CACHE", str(tmp_path))
    result = bench_probe(BenchProbeConfig(**kw, baseline=False))
    assert result["heads"] > 0 and result["step"] > 0 and "baseline" not in result
