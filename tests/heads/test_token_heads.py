"""The [cls] and mean heads."""

from __future__ import annotations

import torch

from beyond_cls.heads import ClsToken, MeanPatch
from tests.heads.head_checks import D, tokens


def test_cls_and_mean():
    t = tokens(201)
    assert torch.equal(ClsToken(D)(t), t[:, 0])
    torch.testing.assert_close(MeanPatch(D, num_prefix_tokens=5)(t), t[:, 5:].mean(1))
