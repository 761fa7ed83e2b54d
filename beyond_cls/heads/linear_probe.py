"""The MAE linear-probe head on top of an aggregation."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LinearProbe"]


class LinearProbe(nn.Module):
    """aggregation → BatchNorm1d(affine=False, eps=1e-6) → Linear: the MAE linear-probe head.

    ``head`` is ``Sequential(BatchNorm1d, Linear)`` as in the MAE codebase (keys ``head.0.*``,
    ``head.1.*``); the Linear is trunc-normal(std=0.01) with zero bias.
    """

    def __init__(self, aggregation: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        out_dim = getattr(aggregation, "out_dim", None)
        if out_dim != dim:
            raise ValueError(f"aggregation.out_dim ({out_dim}) must equal dim ({dim})")
        self.aggregation = aggregation
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.aggregation(tokens))
