"""``beyond-cls probe-report``: accuracy over blocks per aggregation from a layer-wise run (``probe --blocks``),
beside the [cls]→patch attention entropy per block of an ``analyze`` run of the same encoder."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from beyond_cls.config import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["block_curves", "blocks_figure", "encoder_identity", "probe_report"]


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


#: EncoderInfo fields that identify an encoder across runs (the checkpoint by file name).
IDENTITY = ("name", "checkpoint", "checkpoint_format", "source", "depth", "embed_dim", "num_heads")


def _stats_file(folder: Path) -> Path:
    return folder / "attention_stats.json" if folder.is_dir() else folder


def _entropy_per_block(folder: Path) -> list[float]:
    """Mean over heads of the [cls]→patch entropy per block, from an analyze folder (or its JSON file)."""
    from beyond_cls.analysis.summary import AttentionSummary

    file = _stats_file(folder)
    if not file.is_file():
        raise ConfigError(f"--analyze {folder}: no attention_stats.json (run `beyond-cls analyze --out {folder}`)")
    values = AttentionSummary.load(file).cls_patch_entropy
    if values is None:
        raise ConfigError(f"--analyze {folder}: the encoder has no [cls] token, so no [cls]→patch entropy")
    return values.double().mean(1).tolist()


def encoder_identity(info: Any) -> dict[str, Any] | None:
    """The identifying fields of a recorded ``EncoderInfo`` dict (checkpoint by file name), or None."""
    if not isinstance(info, dict) or not info.get("name"):
        return None
    identity = {key: info.get(key) for key in IDENTITY}
    if identity["checkpoint"]:
        identity["checkpoint"] = Path(str(identity["checkpoint"])).name
    return identity


def _check_same_encoder(run: Path, probe_encoder: Any, analyze: Path) -> None:
    """ConfigError when the analyze run recorded another encoder than the probe run (both must record one)."""
    config = _stats_file(analyze).parent / "analyze_config.json"
    try:
        recorded = json.loads(config.read_text()).get("encoder") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    mine, theirs = encoder_identity(probe_encoder), encoder_identity(recorded)
    if mine is None or theirs is None or mine == theirs:
        return
    differ = ", ".join(f"{k} {theirs[k]!r} vs {mine[k]!r}" for k in IDENTITY if theirs[k] != mine[k])
    raise ConfigError(f"--analyze {analyze} is another encoder than the probe run {run} ({differ}): "
                      "analyze the encoder the probe run used")


def _offsets(count: int, step: float) -> list[float]:
    """x offsets that spread ``count`` series around each x, so their error bars do not overlap."""
    width = 0.08 * step
    return [(i - (count - 1) / 2) * width for i in range(count)]


def blocks_figure(metric: str, curves: dict[str, list[tuple[int, float, float]]],
                  entropy: list[float] | None = None) -> Figure:
    """Accuracy per block of each aggregation (± std over seeds), beside the [cls]→patch entropy per block.

    Several blocks: one line per aggregation, the series spread a little along x so the error bars stay apart.
    One block: a bar per aggregation. The legend sits below the panels, off the data.
    """
    from matplotlib.figure import Figure

    from beyond_cls.analysis.plots import BLOCK_LABEL, panel_title
    from beyond_cls.analysis.style import plain_ticks
    from beyond_cls.statistics import find

    blocks = sorted({b for points in curves.values() for b, _, _ in points})
    panels = 1 if entropy is None else 2
    fig = Figure(figsize=(5.5 * panels, 4.4), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    ylabel = f"{metric} (%), best lr"
    if len(blocks) == 1:
        names = list(curves)
        values = [curves[a][0][1] for a in names]
        stds = [curves[a][0][2] for a in names]
        ax.bar(range(len(names)), values, yerr=stds, capsize=4, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set(xlabel="aggregation", ylabel=ylabel, title=f"probe accuracy at block {blocks[0]} (0-based)")
    else:
        step = min((b - a for a, b in zip(blocks, blocks[1:])), default=1)
        for (aggregation, points), dx in zip(curves.items(), _offsets(len(curves), step)):
            xs, values, stds = zip(*points)
            ax.errorbar([x + dx for x in xs], values, yerr=stds, marker="o", capsize=3, label=aggregation)
        ax.set(xlabel=BLOCK_LABEL, ylabel=ylabel, title="probe accuracy per block")
        ax.set_xticks(blocks)
        fig.legend(loc="outside lower center", ncol=min(len(curves), 4), fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    plain_ticks(ax)
    if entropy is not None:
        right = axes[1]
        right.plot(range(len(entropy)), entropy, marker="o", ms=3, color="black")
        for b in blocks:
            right.axvline(b, color="0.6", linestyle=":", linewidth=1)
        stat = find("cls_patch_entropy")  # the table's title and axis label, as analyze's panel
        right.set(xlabel=BLOCK_LABEL, ylabel=stat.ylabel, title=f"{panel_title(stat)}\n(dotted: probed blocks)")
        right.grid(alpha=0.3)
        plain_ticks(right)
    return fig


def probe_report(run: str | Path, out: str | Path, analyze: str | Path | None = None) -> dict[str, Path]:
    """Write ``blocks.png`` (accuracy vs block per aggregation; the entropy panel with ``analyze``, which must have
    recorded the probe run's encoder) and ``blocks.csv`` into ``out``; return their paths."""
    file = Path(run) / "results.json"
    if not file.is_file():
        raise ConfigError(f"{run}: no results.json (a finished `beyond-cls probe` output folder is expected)")
    try:
        results = json.loads(file.read_text())
        metric, curves = block_curves(results)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{file} is not a probe results file: {exc}") from None
    if not curves:
        raise ConfigError(f"{file} holds no {metric} results to plot")
    if analyze is not None:
        _check_same_encoder(Path(run), results.get("encoder"), Path(analyze))
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
    blocks_figure(metric, curves, entropy).savefig(out / "blocks.png", dpi=110)
    return {"figure": out / "blocks.png", "csv": out / "blocks.csv"}
