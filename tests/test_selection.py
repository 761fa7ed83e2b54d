"""Selection math (beyond_cls.selection): method names, the central patch, entropy and KL, selection vectors."""

from __future__ import annotations

import math

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.numerics import entropy
from beyond_cls.selection import (
    KL_EPS,
    attention_selection,
    center_patch,
    kl,
    parse_method,
    parse_methods,
    scores_selection,
)


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


def test_attention_and_scores_selections_are_renormalized_patch_weights():
    rows = torch.rand(2, 3, 2, 1 + 4).softmax(-1)  # [B, H, R, N]: rows of [cls] and the centre, 1 prefix token
    cls_rows, centre_rows = rows[:, :, 0, 1:].double(), rows[:, :, 1, 1:].double()
    mean = cls_rows.mean(1)
    torch.testing.assert_close(attention_selection("attn-mean", rows, 1), mean / mean.sum(-1, keepdim=True))
    centre = centre_rows.mean(1)
    torch.testing.assert_close(attention_selection("attn-center", rows, 1), centre / centre.sum(-1, keepdim=True))
    per_head = cls_rows / cls_rows.sum(-1, keepdim=True)
    minent = attention_selection("attn-minent", rows, 1)
    torch.testing.assert_close(entropy(minent), entropy(per_head).min(1).values)
    with pytest.raises(ValueError, match="unknown attention method"):
        attention_selection("attn-max", rows, 1)
    scores = torch.rand(2, 3, 5).softmax(-1)  # [B, K, 1 + 4]: [cls] first
    patches = scores.double().mean(1)[:, 1:]
    torch.testing.assert_close(scores_selection(scores, with_cls=True), patches / patches.sum(-1, keepdim=True))
    torch.testing.assert_close(scores_selection(scores, with_cls=False), scores.double().mean(1))
