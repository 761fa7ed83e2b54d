"""Non-trainable aggregations: patches pooled with weights that arrive with the tokens (paper Tab. 5).

``attn-mean``, ``attn-minent``, ``attn-center`` weight the patches by the token block's own attention,
``guide:MODEL[@CKPT]`` by another encoder's [cls] attention; the weights are defined in :mod:`beyond_cls.selection`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from beyond_cls.heads.checks import check_prefix, check_tokens
from beyond_cls.heads.registry import Aggregation, register
from beyond_cls.numerics import accumulation_dtype
from beyond_cls.selection import ATTENTION_METHODS, parse_method

__all__ = ["SelectionPool"]


class SelectionPool(nn.Module):
    """Patch tokens pooled with given selection weights: ``Σ_i s_i z_i`` (no parameters).

    The weights come from outside the head, e.g. an encoder's [cls] attention (``attn-mean``) or another
    encoder's (``guide:``): ``forward(tokens [B, N, D], selection [B, num_patches])``, computed in float32
    (float64 for float64 tokens) whatever the autocast, like the fused AbMILP pooling.
    """

    def __init__(self, dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        check_prefix(num_prefix_tokens)
        self.dim = self.out_dim = dim
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor, selection: Tensor) -> Tensor:
        check_tokens(tokens, self.dim, self.num_prefix_tokens)
        return self.pool_many(tokens, selection[:, None])[:, 0]

    def pool_many(self, tokens: Tensor, selections: Tensor) -> Tensor:
        """Several selections at once: [B, M, num_patches] -> [B, M, D], one pass over the tokens."""
        patches = tokens[:, self.num_prefix_tokens :]
        b, p = patches.shape[:2]
        if selections.dim() != 3 or selections.shape[0] != b or selections.shape[2] != p:
            raise ValueError(f"selections must be [{b}, M, {p}] for tokens {tuple(tokens.shape)}, "
                             f"got {tuple(selections.shape)}")
        dtype = accumulation_dtype(tokens.dtype)
        with torch.autocast(tokens.device.type, enabled=False):
            return torch.bmm(selections.to(dtype), patches.to(dtype))


def _pool(spec: str, dim: int, num_prefix_tokens: int) -> SelectionPool:
    parse_method(spec)  # a guide names its model
    return SelectionPool(dim, num_prefix_tokens=num_prefix_tokens)


def _guide_case(spec: str) -> str:
    """``guide:`` in lower case; the model name and weights path as given."""
    return "guide:" + spec.partition(":")[2]


def _guide_key(spec: str) -> str:
    """The checkpoint by its file stem: ``guide:dino_vit_base_patch16@/w/dino.pth`` -> ``...@dino``."""
    method = parse_method(spec)
    return f"guide:{method.model}" + (f"@{Path(method.checkpoint).stem}" if method.checkpoint else "")


_ATTENTION = {
    "attn-mean": "the token block's [cls]→patch attention, averaged over heads",
    "attn-minent": "per image, the token block's head whose [cls]→patch attention has the lowest entropy",
    "attn-center": "the token block's central-patch attention to the patches, averaged over heads",
}
for _method in ATTENTION_METHODS:
    register(Aggregation(_method, _method, f"non-trainable: {_ATTENTION[_method]}", _method, _pool,
                         examples=(_method,), trainable=False, needs_cls=_method != "attn-center",
                         entropy="selection", selection="block"))
register(Aggregation(
    "guide", "guide:MODEL[@CKPT]", "non-trainable: another encoder's [cls] attention (its `attn-mean`) on the same "
    "images", r"guide:.*", _pool, examples=("guide:vit_tiny_patch16_224",), trainable=False, entropy="selection",
    selection="image", normalize=_guide_case, key=_guide_key,
))
