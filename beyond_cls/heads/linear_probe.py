"""The MAE linear-probe head on top of an aggregation."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["HEAD_INITS", "LinearProbe"]

#: Initializations of the probe's Linear: ``pytorch`` (nn.Linear's default; the authors' code) or ``mae`` (MAE's
#: ``main_linprobe.py``: trunc-normal(std=0.01) weight, zero bias).
HEAD_INITS = ("pytorch", "mae")


class LinearProbe(nn.Module):
    """aggregation → BatchNorm1d(affine=False, eps=1e-6) → Linear: the MAE linear-probe head.

    ``head`` is ``Sequential(BatchNorm1d, Linear)`` as in the MAE codebase (keys ``head.0.*``,
    ``head.1.*``); ``init`` (:data:`HEAD_INITS`) initializes the Linear from torch's RNG.
    """

    def __init__(self, aggregation: nn.Module, dim: int, num_classes: int, init: str = "pytorch") -> None:
        super().__init__()
        out_dim = getattr(aggregation, "out_dim", None)
        if out_dim != dim:
            raise ValueError(f"aggregation.out_dim ({out_dim}) must equal dim ({dim})")
        if init not in HEAD_INITS:
            raise ValueError(f"init must be one of {HEAD_INITS}, got {init!r}")
        self.aggregation = aggregation
        linear = nn.Linear(dim, num_classes)
        if init == "mae":
            nn.init.trunc_normal_(linear.weight, std=0.01)
            nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.aggregation(tokens))
