"""Results over seeds: the mean and std of every metric per head, and the best learning rate per aggregation."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["mark_best", "summarize"]


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds of every metric, one row per head (and token block)."""
    by_head: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_head.setdefault(row["head"], []).append(row)
    out = []
    for group in by_head.values():
        first = group[0]
        summary = {k: first[k] for k in ("head", "block", "aggregation", "blr", "lr") if k in first}
        for metric in ("top1", "top1_best", "top5", "mAP", "mAP_best", "entropy"):
            values = [math.nan if r[metric] is None else r[metric] for r in group if metric in r]  # None: JSON's NaN
            if not values:
                continue
            if any(math.isnan(v) for v in values):  # e.g. the entropy of [cls], which has none
                summary[metric] = summary[f"{metric}_std"] = math.nan
                continue
            summary[metric] = statistics.fmean(values)
            summary[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if any("best_epoch" in r for r in group):
            summary["best_epoch"] = [r.get("best_epoch") for r in group]  # per seed
        summary["seeds"] = len(group)
        out.append(summary)
    mark_best(out)
    return out


def mark_best(summary: list[dict[str, Any]]) -> None:
    """``best`` = "*" on the learning rate with the highest mean top-1 (mAP) of each aggregation (per token
    block), else ""."""
    metric = "mAP" if any("mAP" in row for row in summary) else "top1"
    best: dict[tuple, dict[str, Any]] = {}
    for row in summary:
        row["best"] = ""
        value = row.get(metric, math.nan)
        group = (row.get("block"), row["aggregation"])
        held = best.get(group)
        if not math.isnan(value) and (held is None or value > held[metric]):
            best[group] = row
    for row in best.values():
        row["best"] = "*"
