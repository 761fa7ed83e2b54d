"""Pooling with given selection weights: the non-trainable heads' aggregation."""

from __future__ import annotations

import pytest
import torch

from beyond_cls.heads import SelectionPool


def test_selection_pool_is_the_weighted_patch_sum():
    tokens = torch.randn(3, 1 + 4 + 13, 24, dtype=torch.float64)  # [cls] + 4 registers, 13 patches
    sel = torch.rand(3, 2, 13, dtype=torch.float64).softmax(-1)
    pool = SelectionPool(24, num_prefix_tokens=5)
    want = torch.einsum("bmp,bpd->bmd", sel, tokens[:, 5:])
    torch.testing.assert_close(pool.pool_many(tokens, sel), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pool(tokens, sel[:, 1]), want[:, 1], rtol=1e-12, atol=1e-12)
    # float32 whatever the autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pool.pool_many(tokens.float(), sel.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"selections must be \[3, M, 13\]"):
        pool.pool_many(tokens, sel[..., :12])
