"""Single-token and uniform aggregations: the [cls] token (``cls``), the mean of the patches (``mean``) and their
concatenation (``cls+mean``, DINO's linear-evaluation input)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from beyond_cls.heads.checks import check_prefix, check_tokens, no_options
from beyond_cls.heads.registry import Aggregation, register

__all__ = ["ClsMean", "ClsToken", "MeanPatch"]


class ClsToken(nn.Module):
    """The [cls] token (token 0) as the global representation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = self.out_dim = dim

    def forward(self, tokens: Tensor) -> Tensor:
        check_tokens(tokens, self.dim, 0)
        return tokens[:, 0]


class MeanPatch(nn.Module):
    """Average of the patch tokens (prefix tokens excluded)."""

    def __init__(self, dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        check_prefix(num_prefix_tokens)
        self.dim = self.out_dim = dim
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        check_tokens(tokens, self.dim, self.num_prefix_tokens)
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)


class ClsMean(nn.Module):
    """[cls] and the mean of the patch tokens, concatenated in that order: DINO/DINOv2's linear input with
    ``avgpool`` (``create_linear_input``; registers, like every prefix token, excluded from the mean).

    ``blocks``: the tokens are the channel-wise concatenation of that many blocks' tokens (``probe
    --n-last-blocks``), the last block's ``dim / blocks`` channels last; the [cls] part keeps every block's, the mean
    is over the last block's channels only, as DINOv2 averages the last block's patch tokens. ``out_dim = dim +
    dim / blocks``.
    """

    def __init__(self, dim: int, num_prefix_tokens: int = 1, blocks: int = 1) -> None:
        super().__init__()
        check_prefix(num_prefix_tokens)
        if not isinstance(blocks, int) or blocks < 1 or dim % blocks:
            raise ValueError(f"blocks must be an int >= 1 dividing dim={dim}, got {blocks!r}")
        self.dim, self.num_prefix_tokens, self.blocks = dim, num_prefix_tokens, blocks
        self.out_dim = dim + dim // blocks

    def forward(self, tokens: Tensor) -> Tensor:
        check_tokens(tokens, self.dim, self.num_prefix_tokens)
        last = tokens[:, self.num_prefix_tokens :, self.dim - self.dim // self.blocks :]
        return torch.cat([tokens[:, 0], last.mean(dim=1)], dim=1)


def _cls(spec: str, dim: int, num_prefix_tokens: int) -> ClsToken:
    no_options(spec)
    return ClsToken(dim)


def _mean(spec: str, dim: int, num_prefix_tokens: int) -> MeanPatch:
    no_options(spec)
    return MeanPatch(dim, num_prefix_tokens=num_prefix_tokens)


def _cls_mean(spec: str, dim: int, num_prefix_tokens: int, blocks: int = 1) -> ClsMean:
    no_options(spec)
    return ClsMean(dim, num_prefix_tokens=num_prefix_tokens, blocks=blocks)


register(Aggregation("cls", "cls", "the [cls] token", r"cls(-.*)?", _cls, examples=("cls",), trainable=False,
                     needs_cls=True, entropy="none"))
register(Aggregation("mean", "mean", "mean of the patch tokens", r"mean(-.*)?", _mean, examples=("mean",),
                     trainable=False, entropy="uniform"))
register(Aggregation("cls+mean", "cls+mean", "[cls] and the patch mean, concatenated (DINO's linear eval with avgpool; "
                     "with `--n-last-blocks N`: each block's [cls], the last block's mean)",
                     r"cls\+mean(-.*)?", _cls_mean, examples=("cls+mean",), trainable=False, needs_cls=True,
                     entropy="uniform", block_options=True))
