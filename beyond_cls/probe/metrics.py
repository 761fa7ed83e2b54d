"""Classification metrics: top-k counts (single-label), mean average precision (multi-label), and the last and
best of a run's evaluations."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["average_precision", "last_and_best", "mean_average_precision", "topk_correct"]


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


def last_and_best(history: list[dict[str, Any]], head: str, metric: str) -> dict[str, Any]:
    """``{metric}_last``, ``{metric}_best`` and ``best_epoch`` (1-based; the earliest on ties) of ``head`` over the
    evaluations in ``history`` (``{"epoch", "results"}`` entries as the trainer records them, the final one last):
    the authors' "Max accuracy" when every epoch was evaluated. NaN never counts as best."""
    evaluated = [(h["epoch"], h["results"][head][metric]) for h in history if metric in h["results"].get(head, {})]
    epoch, best = None, math.nan
    for e, value in evaluated:
        if value is not None and not math.isnan(value) and (epoch is None or value > best):
            epoch, best = e, value
    last = evaluated[-1][1] if evaluated else math.nan
    return {f"{metric}_last": last, f"{metric}_best": best, "best_epoch": epoch}
