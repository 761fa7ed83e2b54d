"""``probe --n-last-blocks N``: DINO's linear-eval features (the last N blocks' tokens, each through the final norm,
concatenated along the channels), in the token source, the head bank, the feature cache and the config."""

from __future__ import annotations

import copy

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.models import load_encoder
from beyond_cls.probe import ProbeConfig, run
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.head_loading import load_probe_head
from tests.probe.test_probe_run import dataset  # noqa: F401 (the dataset fixture)
from tests.tiny_probe import TINY


def _by_hand(model: torch.nn.Module, images: torch.Tensor, last: int, n: int) -> torch.Tensor:
    """timm's forward_features written out: every block's output up to ``last``, the last n through the final norm,
    concatenated along the channels, oldest block first."""
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        outs = []
        for blk in model.blocks[: last + 1]:
            x = blk(x)
            outs.append(x)
        return torch.cat([model.norm(o) for o in outs[-n:]], -1)


def test_token_source_concatenates_the_last_blocks_after_the_final_norm():
    torch.manual_seed(0)
    model = load_encoder("vit_tiny_patch16_224", img_size=32)
    images = torch.randn(3, 3, 32, 32)
    for block, n in ((11, 4), (11, 1), (5, 2)):
        want = _by_hand(model, images, block, n)
        got = TokenSource(copy.deepcopy(model), block, final_norm=True, n_last=n)(images)
        assert got.shape == (3, 5, 192 * n)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        if n > 1:  # the blocks differ: the concatenation is not one block repeated
            assert not torch.allclose(got[..., :192], got[..., -192:])
    with pytest.raises(ConfigError, match="does not combine with --blocks"):
        TokenSource(model, blocks=[3, 5], n_last=2)
    with pytest.raises(ConfigError, match="has only 3 blocks"):
        TokenSource(model, 2, n_last=4)


def test_config_n_last_blocks_crop_pct_and_interpolation():
    base = dict(TINY, data="-", out="o")
    assert ProbeConfig(**base, n_last_blocks=4).final_norm is True  # DINO's tokens: after the final norm
    assert ProbeConfig(**base, n_last_blocks=4, final_norm=False).final_norm is False
    assert ProbeConfig(**base).final_norm is None and ProbeConfig(**base).n_last_blocks is None
    with pytest.raises(ConfigError, match="does not combine with --blocks"):
        ProbeConfig(**base, n_last_blocks=2, blocks="5,11")
    with pytest.raises(ConfigError, match="n_last_blocks must be a positive integer"):
        ProbeConfig(**base, n_last_blocks=0)
    with pytest.raises(ConfigError, match=r"crop_pct must be in \(0, 1\]"):
        ProbeConfig(**base, crop_pct=1.2)
    with pytest.raises(ConfigError, match="interpolation must be one of bicubic, bilinear"):
        ProbeConfig(**base, interpolation="area")
    with pytest.raises(ConfigError, match="GPU decode path resizes bicubic only"):
        ProbeConfig(**base, interpolation="bilinear", decode="gpu")


def test_run_with_the_bank_and_the_cache(dataset, tmp_path):  # noqa: F811
    """A cached --n-last-blocks run trains heads on 2·D-wide features (cls) and 3·D (cls+mean); a one-block run on
    the same cache folder extracts its own shards; abmilp:RUN and a resume with another token source refuse it."""
    common = dict(TINY, data=str(dataset), heads="cls,cls+mean", lrs="1.0", epochs=1, warmup_epochs=0,
                  final_norm=True)
    cache = dict(cache=str(tmp_path / "cache"), cache_dtype="fp32")
    cached = run(dict(common, **cache, out=str(tmp_path / "cached"), n_last_blocks=2))
    shards = sorted((tmp_path / "cache").rglob("*.bin"))
    assert len(shards) == 2  # train, val
    one = run(dict(common, **cache, out=str(tmp_path / "one")))  # one block: its own shards
    assert len(sorted((tmp_path / "cache").rglob("*.bin"))) == 4
    assert cached["token_source"]["n_last_blocks"] == 2 and one["token_source"]["n_last_blocks"] is None
    state = torch.load(tmp_path / "cached" / "seed0" / "checkpoint.pt", weights_only=False)["bank"]
    assert state["heads.cls@blr1.head.1.weight"].shape == (3, 2 * 192)
    assert state["heads.cls+mean@blr1.head.1.weight"].shape == (3, 3 * 192)
    with pytest.raises(ConfigError, match="--n-last-blocks"):
        load_probe_head(tmp_path / "cached")
    with pytest.raises(ConfigError, match="n_last_blocks: None → 2"):  # a resume must keep the token source
        run(dict(common, **cache, out=str(tmp_path / "one"), n_last_blocks=2))


def test_n_last_blocks_and_the_eval_view_are_resume_settings():
    from beyond_cls.probe.trainer import RESUME_KEYS

    assert {"n_last_blocks", "crop_pct", "interpolation"} <= set(RESUME_KEYS)
