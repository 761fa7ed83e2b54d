"""``cls+mean``: DINO/DINOv2's linear-eval input ([cls], then the mean of the patch tokens, registers excluded), alone
and in the head bank, on one block's tokens or on the last n blocks' tokens concatenated along the channels."""

from __future__ import annotations

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.heads import ClsMean, build_aggregation, parse_heads
from beyond_cls.probe.bank import HeadBank, head_key
from tests.heads.head_checks import F64, tokens


@pytest.mark.parametrize("n, p, dim", [(197, 1, 64), (261, 5, 80), (257, 1, 80)])
def test_cls_mean_is_cls_then_patch_mean(n, p, dim):
    t = tokens(n, dim=dim, dtype=F64)
    want = torch.cat([t[:, 0], t[:, p:].mean(1)], 1)  # by hand: [cls] first, prefix tokens (registers) left out
    module = build_aggregation("cls+mean", dim, p, True)
    assert isinstance(module, ClsMean) and module.out_dim == 2 * dim
    torch.testing.assert_close(module(t), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("blocks", [2, 4])
def test_cls_mean_over_concatenated_blocks_averages_the_last_blocks_patches(blocks):
    """DINOv2's ``create_linear_input(n, use_avgpool=True)``: every block's [cls] (oldest first), then the mean of
    the last block's patch tokens."""
    d, p = 64, 5
    per_block = [tokens(261, dim=d, dtype=F64) for _ in range(blocks)]
    t = torch.cat(per_block, -1)
    want = torch.cat([*(x[:, 0] for x in per_block), per_block[-1][:, p:].mean(1)], 1)
    module = build_aggregation("cls+mean", d * blocks, p, True, blocks=blocks)
    assert module.out_dim == d * blocks + d
    torch.testing.assert_close(module(t), want, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="blocks must be an int"):
        build_aggregation("cls+mean", 66, p, True, blocks=4)


def test_cls_mean_spec_errors():
    assert parse_heads("CLS+MEAN, cls") == ["cls+mean", "cls"]
    with pytest.raises(ConfigError, match=r"needs a \[cls\] token"):
        build_aggregation("cls+mean", 64, 0, False)
    with pytest.raises(ConfigError, match="takes no options"):
        parse_heads("cls+mean-k2")


@pytest.mark.parametrize("blocks", [1, 3])
def test_bank_cls_mean_heads_share_one_read_and_match_the_hand_made_features(blocks):
    """In the bank, cls+mean heads at several lrs compute their features once (one shared group) and each head's
    logits are its BatchNorm + Linear on the concatenation computed by hand."""
    d, p = 48, 1
    bank = HeadBank(["cls", "cls+mean", "mean"], [0.1, 1.0], d * blocks, 7, p, True, seed=3,
                    n_last_blocks=blocks).double().eval()
    kinds = {g.entries[0].spec: (g.kind, len(g.entries)) for g in bank.spec_groups}
    assert kinds["cls+mean"] == ("shared", 2)
    t = tokens(197, dim=d * blocks, dtype=F64)
    hand = torch.cat([t[:, 0], t[:, p:, -d:].mean(1)], 1)
    logits = bank(t)
    for lr in (0.1, 1.0):
        probe = bank.heads[head_key("cls+mean", lr)]
        assert probe.head[1].in_features == d * blocks + d
        torch.testing.assert_close(logits[head_key("cls+mean", lr)], probe.head(hand), rtol=0, atol=1e-12)
    alone = HeadBank(["cls+mean"], [1.0], d * blocks, 7, p, True, seed=3, n_last_blocks=blocks).double().eval()
    torch.testing.assert_close(alone(t)[head_key("cls+mean", 1.0)], logits[head_key("cls+mean", 1.0)], rtol=0,
                               atol=0)  # same seed and spec: the same head, in a bank of others or alone
