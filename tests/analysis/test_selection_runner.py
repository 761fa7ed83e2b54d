"""SelectionRunner: selection vectors against attention materialized by timm, and AbMILP heads' own scores."""

from __future__ import annotations

import json
import re

import pytest
import torch

from beyond_cls.analysis.selection_runner import SelectionRunner
from beyond_cls.cli import main
from beyond_cls.config import ConfigError
from beyond_cls.models import load_encoder
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.head_loading import load_probe_head
from beyond_cls.selection import parse_method
from tests.selection_checks import MODELS, direct, last_block_attention, make_model, normalize
from tests.tiny_probe import trained_probe


@pytest.mark.parametrize("key", list(MODELS))
def test_attention_methods_match_materialized_attention(key):
    kwargs, size = MODELS[key]
    model = make_model(kwargs, size)
    images = torch.rand(3, 3, size, size)
    runner = SelectionRunner("attn-mean,attn-minent,attn-center", model)
    got = runner(images)
    grid = model.patch_embed.grid_size
    assert runner.grid_size == tuple(grid) and runner.num_patches == grid[0] * grid[1]
    want = direct(last_block_attention(model, normalize(images)), model.num_prefix_tokens, grid)
    for name, value in want.items():
        assert got[name].shape == (3, grid[0] * grid[1])
        torch.testing.assert_close(got[name].sum(-1), torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the methods are not all the same vector
    assert not torch.allclose(got["attn-mean"], got["attn-center"], atol=1e-3)


def test_guide_is_attn_mean_of_the_other_encoder():
    images = torch.rand(2, 3, 48, 48)
    runner = SelectionRunner(["attn-mean", "guide:vit_tiny_patch16_224"], make_model({}, 48), img_size=48)
    got = runner(images)
    guide = runner.encoder_for("guide:vit_tiny_patch16_224")
    assert len(runner.encoders) == 2 and guide is not runner.encoder_for("attn-mean")
    want = direct(last_block_attention(guide, normalize(images)), 1, (3, 3))["attn-mean"]
    torch.testing.assert_close(got["guide:vit_tiny_patch16_224"], want, rtol=1e-5, atol=1e-6)


def test_methods_needing_cls_reject_models_without_it():
    model = make_model({"class_token": False, "global_pool": "avg"}, 32)
    with pytest.raises(ConfigError, match="no \\[cls\\] token"):
        SelectionRunner("attn-mean", model)
    assert SelectionRunner("attn-center", model)(torch.rand(1, 3, 32, 32))["attn-center"].shape == (1, 4)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    return trained_probe(tmp_path_factory.mktemp("sel"), "abmilp,abmilp+cls-k2")[1]


@pytest.mark.parametrize("head", ["abmilp", "abmilp+cls-k2"])
def test_abmilp_method_equals_the_heads_own_scores(probe_run, head):
    name = f"abmilp:{probe_run}@{head}"
    images = torch.rand(3, 3, 32, 32)
    runner = SelectionRunner([name], img_size=32)
    got = runner(images)[name]
    trained = load_probe_head(probe_run, head)
    torch.manual_seed(0)  # the probe's random encoder (first seed 0)
    source = TokenSource(load_encoder("vit_tiny_patch16_224", img_size=32), None, False)
    with torch.no_grad():
        _, scores = trained.aggregation.forward_with_scores(source(normalize(images)))
    scores = scores.double().mean(1)
    if trained.with_cls:
        assert scores.shape[-1] == 5
        scores = scores[:, 1:] / scores[:, 1:].sum(-1, keepdim=True)
    torch.testing.assert_close(got, scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, dtype=torch.float64))
    assert trained.key.startswith(head + "@")


def test_abmilp_method_errors(probe_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SelectionRunner([f"abmilp:{tmp_path / 'missing'}"], img_size=32)
    with pytest.raises(ConfigError, match="no AbMILP head 'mean'"):
        SelectionRunner([f"abmilp:{probe_run}@mean"], img_size=32)
    with pytest.raises(ConfigError, match="img_size"):
        SelectionRunner([f"abmilp:{probe_run}"], img_size=64)


# ------------------------------------------------------------------------------------------------------------------
# abmilp:RUN picks its head explicitly; unsafe run configs are one-line errors

SIZE = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "4"]


@pytest.fixture(scope="module")
def two_head_run(tmp_path_factory):
    """A probe run with two AbMILP heads (two learning rates) and a [cls] head, plus a boxes folder."""
    return trained_probe(tmp_path_factory.mktemp("heads"), "cls,abmilp", classes=2, train=4, val=3, boxes=True,
                         lrs="0.1,0.2", epochs=1, warmup_epochs=0, effective_batch=4)


def test_head_key_after_hash():
    m = parse_method("abmilp:/no/such/run#abmilp+cls@blr0p1")
    assert (m.run, m.head) == ("/no/such/run", "abmilp+cls@blr0p1")


def test_ambiguous_head_is_an_error_listing_the_keys(two_head_run):
    _, run, _ = two_head_run
    with pytest.raises(ConfigError, match="2 AbMILP heads") as info:
        load_probe_head(run)
    message = str(info.value)
    assert "\n" not in message and "abmilp@blr0p1, abmilp@blr0p2" in message and "#KEY" in message
    with pytest.raises(ConfigError, match="matches 2 AbMILP heads"):  # a spec naming several heads
        load_probe_head(run, "abmilp")
    head = load_probe_head(run, "abmilp@blr0p2")
    assert (head.key, head.seed) == ("abmilp@blr0p2", 0)


def test_aggregations_and_localize_record_the_head(two_head_run, tmp_path, capsys):
    data, run, xml = two_head_run
    base = ["--model", "vit_tiny_patch16_224", "--data", str(data), *SIZE]
    method = f"abmilp:{run}#abmilp@blr0p2"
    assert main(["aggregations", *base, "--methods", f"attn-mean,{method}", "--out", str(tmp_path / "a"),
                 "--max-images", "2", "--examples", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{method}: head abmilp@blr0p2 (seed 0)" in printed
    results = json.loads((tmp_path / "a" / "aggregations.json").read_text())
    assert results["heads"][method]["head"] == "abmilp@blr0p2" and results["heads"][method]["spec"] == "abmilp"
    assert main(["localize", *base, "--boxes", str(xml), "--map", "cls-attn", "--map", method,
                 "--out", str(tmp_path / "l"), "--max-images", "2", "--overlays", "1"]) == 0
    assert "head abmilp@blr0p2" in capsys.readouterr().out
    results = json.loads((tmp_path / "l" / "localization.json").read_text())
    assert list(results["heads"]) == [method] and results["heads"][method]["head"] == "abmilp@blr0p2"
    # without #KEY: one line naming the keys, exit 2
    assert main(["aggregations", *base, "--methods", f"abmilp:{run}", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "abmilp@blr0p1, abmilp@blr0p2" in err, err


def test_run_config_with_python_tags_is_one_line(tmp_path, capsys):
    run = tmp_path / "evil"
    run.mkdir()
    (run / "config.yaml").write_text("model: vit_tiny_patch16_224\nx: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=re.escape(str(run / "config.yaml"))):
        SelectionRunner([f"abmilp:{run}"], img_size=32)
    with pytest.raises(ConfigError, match="not plain YAML"):
        load_probe_head(run)
    argv = ["aggregations", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--methods", f"abmilp:{run}", *SIZE]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.yaml" in err and "python/object" in err, err
