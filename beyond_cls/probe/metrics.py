"""Classification metrics: top-k counts (single-label) and mean average precision (multi-label)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_precision", "mean_average_precision", "topk_correct"]


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of rows whose target is among the top-k logits, for each k (float64 [len(ks)]).

    k larger than the number of classes counts every row.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = top.eq(target[:, None])
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]).double()


def average_precision(scores: Tensor, positive: Tensor) -> Tensor:
    """AP of one class: mean over positives of the precision at their rank (ties broken by order).

    NaN when the class has no positive.
    """
    order = scores.argsort(descending=True, stable=True)
    hits = positive[order].double()
    if hits.sum() == 0:
        return torch.tensor(float("nan"), dtype=torch.float64)
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    return (precision * hits).sum() / hits.sum()


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """mAP over the classes with at least one positive; ``scores`` and 0/1 ``targets`` are [N, C]."""
    aps = torch.stack([average_precision(scores[:, c], targets[:, c] > 0.5) for c in range(scores.shape[1])])
    valid = ~aps.isnan()
    return float(aps[valid].mean()) if valid.any() else float("nan")
