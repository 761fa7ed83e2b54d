"""Single-token and uniform aggregations: the [cls] token (``cls``) and the mean of the patches (``mean``)."""

from __future__ import annotations

from torch import Tensor, nn

from beyond_cls.heads.checks import check_prefix, check_tokens, no_options
from beyond_cls.heads.registry import Aggregation, register

__all__ = ["ClsToken", "MeanPatch"]


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


def _cls(spec: str, dim: int, num_prefix_tokens: int) -> ClsToken:
    no_options(spec)
    return ClsToken(dim)


def _mean(spec: str, dim: int, num_prefix_tokens: int) -> MeanPatch:
    no_options(spec)
    return MeanPatch(dim, num_prefix_tokens=num_prefix_tokens)


register(Aggregation("cls", "cls", "the [cls] token", r"cls(-.*)?", _cls, examples=("cls",), trainable=False,
                     needs_cls=True, entropy="none"))
register(Aggregation("mean", "mean", "mean of the patch tokens", r"mean(-.*)?", _mean, examples=("mean",),
                     trainable=False, entropy="uniform"))
