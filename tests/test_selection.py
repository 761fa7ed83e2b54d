"""Selection vectors (beyond_cls.selection) against attention materialized by timm, and AbMILP heads' own scores."""

from __future__ import annotations

import math

import pytest
import torch
from selection_checks import MODELS, direct, last_block_attention, make_model, normalize

from beyond_cls.config import ConfigError
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.models import load_encoder
from beyond_cls.probe.features import TokenSource
from beyond_cls.selection import (
    KL_EPS,
    SelectionRunner,
    center_patch,
    entropy,
    kl,
    load_probe_head,
    parse_method,
    parse_methods,
)


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


def test_center_patch_convention():
    assert center_patch((14, 14)) == 7 * 14 + 7
    assert center_patch((3, 3)) == 4
    assert center_patch((4, 6)) == 2 * 6 + 3


def test_entropy_and_kl_known_values():
    uniform = torch.full((2, 4), 0.25, dtype=torch.float64)
    onehot = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=torch.float64)
    torch.testing.assert_close(entropy(uniform), torch.full((2,), math.log(4), dtype=torch.float64))
    torch.testing.assert_close(entropy(onehot), torch.zeros(2, dtype=torch.float64))  # 0 log 0 = 0
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl(p, q).item() == pytest.approx(want, rel=1e-12)
    assert kl(p, p).item() == 0.0
    # KL(onehot || uniform) = log 4; mean over images
    assert kl(onehot, uniform).item() == pytest.approx(math.log(4), rel=1e-12)
    torch.testing.assert_close(kl(onehot, uniform, reduction="none"), torch.full((2,), math.log(4),
                                                                                  dtype=torch.float64))
    # q = 0 where p > 0: finite, with the documented epsilon; q = 0 where p = 0 contributes nothing
    value = kl(uniform[:1], onehot[:1]).item()
    assert value == pytest.approx(0.25 * math.log(0.25) + 0.75 * math.log(0.25 / KL_EPS), rel=1e-12)
    with pytest.raises(ValueError, match="same shape"):
        kl(p, uniform)


def test_parse_methods():
    assert parse_method("attn-mean").kind == "attn-mean"
    g = parse_method("guide:dino_vit_base_patch16@/w/dino.pth")
    assert (g.kind, g.model, g.checkpoint) == ("guide", "dino_vit_base_patch16", "/w/dino.pth")
    a = parse_method("abmilp:/no/such/run@abmilp@blr0p1")
    assert (a.kind, a.run, a.head) == ("abmilp", "/no/such/run", "abmilp@blr0p1")
    for bad in ("attn-max", "guide:", "abmilp", ""):
        with pytest.raises(ConfigError):
            parse_methods(bad)
    with pytest.raises(ConfigError, match="twice"):
        parse_methods("attn-mean,attn-mean")


def test_methods_needing_cls_reject_models_without_it():
    model = make_model({"class_token": False, "global_pool": "avg"}, 32)
    with pytest.raises(ConfigError, match="no \\[cls\\] token"):
        SelectionRunner("attn-mean", model)
    assert SelectionRunner("attn-center", model)(torch.rand(1, 3, 32, 32))["attn-center"].shape == (1, 4)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    from beyond_cls.probe import run

    root = tmp_path_factory.mktemp("sel")
    data = make_synthetic_dataset(root / "data", SyntheticConfig(num_classes=3, train_per_class=8, val_per_class=4,
                                                                 image_size=64, object_size=(12, 20)))
    out = root / "run"
    run(dict(model="vit_tiny_patch16_224", img_size=32, data=str(data), out=str(out), heads="abmilp,abmilp+cls-k2",
             epochs=2, warmup_epochs=1, batch_size=4, effective_batch=8, num_workers=0, progress=False,
             device="cpu"))
    return out


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
