"""``beyond-cls probe-report``: accuracy over blocks per aggregation from a layer-wise run (``probe --blocks``),
beside the [cls]→patch attention entropy per block of an ``analyze`` run of the same encoder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from beyond_cls.config import ConfigError

__all__ = ["block_curves", "probe_report"]


def block_curves(results: dict[str, Any]) -> tuple[str, dict[str, list[tuple[int, float, float]]]]:
    """(metric, per aggregation [(block, mean, std) at its best lr of that block], blocks ascending)."""
    summary = results.get("summary") or []
    metric = "mAP" if any("mAP" in row for row in summary) else "top1"
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in summary:
        block = row.get("block", results.get("token_source", {}).get("block"))
        if block is None or not isinstance(row.get(metric), (int, float)) or math.isnan(row[metric]):
            continue
        held = best.get((row["aggregation"], block))
        if held is None or row[metric] > held[metric]:
            best[(row["aggregation"], block)] = row
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for (aggregation, block), row in sorted(best.items(), key=lambda item: item[0][1]):
        curves.setdefault(aggregation, []).append((block, row[metric], row.get(f"{metric}_std", 0.0)))
    return metric, curves


def _entropy_per_block(folder: Path) -> list[float]:
    """Mean over heads of the [cls]→patch entropy per block, from an analyze folder (or its JSON file)."""
    from beyond_cls.analysis.summary import AttentionSummary

    file = folder / "attention_stats.json" if folder.is_dir() else folder
    if not file.is_file():
        raise ConfigError(f"--analyze {folder}: no attention_stats.json (run `beyond-cls analyze --out {folder}`)")
    values = AttentionSummary.load(file).cls_patch_entropy
    if values is None:
        raise ConfigError(f"--analyze {folder}: the encoder has no [cls] token, so no [cls]→patch entropy")
    return values.double().mean(1).tolist()


def probe_report(run: str | Path, out: str | Path, analyze: str | Path | None = None) -> dict[str, Path]:
    """Write ``blocks.png`` (accuracy vs block per aggregation; the entropy panel with ``analyze``) and
    ``blocks.csv`` into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    file = Path(run) / "results.json"
    if not file.is_file():
        raise ConfigError(f"{run}: no results.json (a finished `beyond-cls probe` output folder is expected)")
    try:
        metric, curves = block_curves(json.loads(file.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{file} is not a probe results file: {exc}") from None
    if not curves:
        raise ConfigError(f"{file} holds no {metric} results to plot")
    entropy = None if analyze is None else _entropy_per_block(Path(analyze))
    deepest = max(b for points in curves.values() for b, _, _ in points)
    if entropy is not None and deepest >= len(entropy):
        raise ConfigError(f"--analyze {analyze} has {len(entropy)} blocks; the probe run reads block {deepest}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"aggregation": a, "block": b, metric: v, f"{metric}_std": s,
             "cls_patch_entropy": None if entropy is None else entropy[b]}
            for a, points in curves.items() for b, v, s in points]
    with open(out / "blocks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    panels = 1 if entropy is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for aggregation, points in curves.items():
        blocks, values, stds = zip(*points)
        ax.errorbar(blocks, values, yerr=stds, marker="o", capsize=3, label=aggregation)
    ax.set(xlabel="block (0-based)", ylabel=f"{metric} (%), best lr", title="probe accuracy per block")
    ax.legend()
    if entropy is not None:
        axes[0][1].plot(range(len(entropy)), entropy, marker="o", color="black")
        axes[0][1].set(xlabel="block (0-based)", ylabel="nats", title="[cls]→patch attention entropy")
    try:
        fig.savefig(out / "blocks.png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return {"figure": out / "blocks.png", "csv": out / "blocks.csv"}
