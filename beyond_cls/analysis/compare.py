"""Compare saved attention summaries: the paper's Figs. 3–6, per-head heatmaps and appendix Table 3.

``compare`` reads the ``attention_stats.json`` of several ``beyond-cls analyze`` runs and writes, into
one folder, line plots over blocks (one line per encoder, colour by family, line style by model), a blocks × heads
heatmap figure per encoder, CSV tables and a ``report.md`` that embeds them all, and prints Table 3. Blocks and
heads are numbered from 0 everywhere (figures, CSVs), as ``--block`` and the printed tables number them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from beyond_cls.analysis.analyze import CONFIG_FILE, MODELS_FILE, STATS_FILE
from beyond_cls.analysis.plots import (
    BLOCK_LABEL,
    HEAD_LABEL,
    PANELS,
    YLABELS,
    Curve,
    draw_panel,
    flow_title,
    legend_entries,
)
from beyond_cls.analysis.style import FAMILIES, data_label, infer_family, model_styles, plain_ticks, zoo_of
from beyond_cls.analysis.summary import FIELD_NAMES, FIELDS, AttentionSummary
from beyond_cls.models.zoo import ZooEntry
from beyond_cls.runlock import claim_output

__all__ = ["FAMILIES", "compare", "infer_family", "table3_text"]


_KNOWN_FAMILIES = ("MIM", "JEA")
_FAMILY_ORDER = {"MIM": 0, "JEA": 1}

COMBINED_FILE = "information_flow.png"
MODELS_CSV = "summary_by_model.csv"
BLOCKS_CSV = "summary_by_block.csv"
REPORT_FILE = "report.md"

# Readable names of every summary field (Markdown table headers).
_LABELS = {
    "cls_self": "[cls]-[cls] attention",
    "cls_patch_entropy": "[cls]→patch entropy",
    "patch_self": "patch self-attention",
    "patch_patch_entropy": "patch→patch entropy",
    "patch_cls": "patch→[cls] attention",
    "cls_patch_mass": "[cls]→patch mass",
}
_NEEDS_CLS = {name for name, _, needs_cls in FIELDS if needs_cls}


@dataclass
class _Model:
    name: str
    family: str
    source: Path
    summary: AttentionSummary
    paper_entropy: float | None
    model: str = ""  # the encoder's name from the summary or the run's config ("" when neither says)
    data: str | None = None  # the images, from the run's config

    @property
    def depth(self) -> int:
        return self.summary.num_blocks

    def field(self, name: str) -> torch.Tensor | None:
        """The [blocks, heads] statistic, or None when absent (no [cls]) or all NaN."""
        values = getattr(self.summary, name)
        if values is None or bool(torch.isnan(values).all()):
            return None
        return values

    @property
    def has_cls(self) -> bool:
        return self.field("cls_patch_entropy") is not None


def _zoo_entry(name: str) -> ZooEntry | None:
    """The zoo entry of ``name`` (family, the paper's Table 3 value), or None when it is not a zoo name.

    ``analyze`` labels several checkpoints of one model ``name@<checkpoint stem>[-k]``: the name before ``@``."""
    return zoo_of(name)


def _run_config(file: Path) -> dict:
    """The resolved ``analyze_config.json`` beside an ``attention_stats.json`` ({} when absent or unreadable)."""
    config = file.parent / CONFIG_FILE
    if file.name != STATS_FILE or not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load(path: str | os.PathLike) -> tuple[AttentionSummary, Path]:
    """The summary in a run directory or JSON file; ValueError naming the path when it cannot be used."""
    path = Path(path)
    if path.is_dir():
        file = path / STATS_FILE
        if not file.is_file():
            raise ValueError(f"run directory {path} has no {STATS_FILE} (run `beyond-cls analyze --out {path}`)")
    elif path.is_file():
        file = path
    else:
        raise ValueError(f"{path} does not exist (expected a run directory holding {STATS_FILE} or a JSON file)")
    try:
        summary = AttentionSummary.load(file)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        message = str(exc)
        if str(file) not in message:
            message = f"attention summary {file} is unusable: {message}"
        raise ValueError(message) from None
    if summary.patch_self is None or summary.patch_patch_entropy is None:
        raise ValueError(f"attention summary {file} has no patch_self / patch_patch_entropy values")
    shapes = {name: tuple(t.shape) for name, t in summary.fields().items()}
    first = shapes["patch_self"]
    if len(first) != 2 or 0 in first or any(s != first for s in shapes.values()):
        raise ValueError(
            f"attention summary {file}: every field must be one non-empty [blocks, heads] array, got {shapes}"
        )
    if summary.num_patches <= 0:
        raise ValueError(f"attention summary {file}: num_patches must be positive, got {summary.num_patches}")
    return summary, file


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


def _unique_names(names: list[str], files: list[Path]) -> list[str]:
    """Make repeated display names unique by their run folder (then a counter)."""
    counts = {n: names.count(n) for n in names}
    out: list[str] = []
    for name, file in zip(names, files):
        if counts[name] > 1:
            name = f"{name} ({file.parent.name or file.stem})"
        base, i = name, 2
        while name in out:
            name, i = f"{base} #{i}", i + 1
        out.append(name)
    return out


def _expand(inputs: list) -> list:
    """Each multi-model ``analyze`` folder (it holds ``analyze_models.json``) replaced by its per-model subfolders."""
    out = []
    for item in inputs:
        folder = Path(item)
        index = folder / MODELS_FILE
        if not (folder.is_dir() and index.is_file()):
            out.append(item)
            continue
        if (folder / STATS_FILE).is_file():
            raise ValueError(f"{folder} holds both {STATS_FILE} and {MODELS_FILE} (outputs of two analyze runs); "
                             "rerun analyze into a new folder")
        try:
            models = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{index} is unreadable: {exc}") from None
        if not isinstance(models, dict) or not models or not all(isinstance(e, dict) for e in models.values()):
            raise ValueError(f"{index}: expected a non-empty mapping label -> {{model, checkpoint, subfolder}}")
        out += [folder / str(entry.get("subfolder") or label) for label, entry in models.items()]
    return out


def _models(inputs, names, families) -> list[_Model]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    given = list(inputs)
    if not given:
        raise ValueError("compare needs at least one run directory or attention_stats.json file")
    inputs = _expand(given)
    if names is not None and len(names) != len(inputs):
        expanded = "" if len(inputs) == len(given) else " (a multi-model analyze folder counts one per model)"
        raise ValueError(f"names has {len(names)} entries for {len(inputs)} inputs{expanded}")
    loaded = [_load(p) for p in inputs]
    display = [
        (names[i] if names is not None else "") or s.model or (f.parent.name if f.name == STATS_FILE else f.stem)
        for i, (s, f) in enumerate(loaded)
    ]
    display = _unique_names(display, [f for _, f in loaded])
    families = dict(families or {})
    known = set(display) | {s.model for s, _ in loaded}
    unknown = sorted(k for k in families if k not in known)
    if unknown:
        raise ValueError(f"families has unknown model names {unknown}; the models are {display}")
    models = []
    for i, (name, (summary, file)) in enumerate(zip(display, loaded)):
        config = _run_config(file)
        model = summary.model or (config.get("model") if isinstance(config.get("model"), str) else "")
        family = families.get(name, families.get(summary.model))
        if family is None:  # the zoo or the run's metadata, then a name the user gave; never a folder name
            family = infer_family(model) if model else "other"
            if family == "other" and names is not None and names[i]:
                family = infer_family(names[i])
        else:
            family = family.upper() if family.upper() in _KNOWN_FAMILIES else family
        entry = _zoo_entry(model) if model else None
        models.append(_Model(name, family, file, summary, entry.paper_entropy if entry is not None else None,
                             model, data_label(config)))
    return models


def _positions(depth: int, x_axis: str) -> np.ndarray:
    blocks = np.arange(depth, dtype=np.float64)
    if x_axis == "block":
        return blocks
    return blocks / (depth - 1) if depth > 1 else blocks


def _series(models: list[_Model], x_axis: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """What the line plots draw: metric -> model -> {"x", "y" (mean over heads), "head_min", "head_max"}."""
    series: dict[str, dict[str, dict[str, list[float]]]] = {}
    for metric, _, _ in PANELS:
        series[metric] = {}
        for m in models:
            values = m.field(metric)
            if values is None:
                continue
            series[metric][m.name] = {
                "x": _positions(m.depth, x_axis).tolist(),
                "y": values.mean(dim=1).tolist(),
                "head_min": values.min(dim=1).values.tolist(),
                "head_max": values.max(dim=1).values.tolist(),
            }
    return series


def _styles(models: list[_Model]) -> dict[str, dict]:
    """Colour by family, line style by model: the same as ``analyze``'s figures."""
    return model_styles({m.name: (m.model or m.name, m.family) for m in models})


def _title(models: list[_Model]) -> str:
    data = sorted({m.data or "unnamed data" for m in models})
    return flow_title({m.name: m.summary.num_images for m in models}, "; ".join(data))


def _draw(ax, metric: str, title: str, figure: str, models: list[_Model], series, styles, x_axis: str) -> None:
    """One panel of Figs. 3–6: a line per encoder (mean over heads) in its head band; uniform references."""
    curves = [
        Curve(f"{m.name} ({m.family})", s["x"], s["y"], s["head_min"], s["head_max"], styles[m.name],
              m.summary.num_patches, m.summary.num_prefix_tokens)
        for m in models if (s := series[metric].get(m.name)) is not None
    ]
    xlabel = BLOCK_LABEL if x_axis == "block" else "relative depth: block / (depth - 1), block 0-based"
    draw_panel(ax, metric, curves, xlabel=xlabel, title=f"{title} ({figure})")


def _figure(**kwargs) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global backend."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")  # no clipped labels or outside legends
    return path


def _plot_lines(models, series, styles, x_axis: str, out: Path) -> tuple[Path, dict[str, Path]]:
    # fixed margins rather than constrained layout: it costs a second draw per figure
    fig = _figure(figsize=(12, 9.4))
    axes = fig.subplots(2, 2)
    for ax, (metric, title, figure) in zip(axes.flat, PANELS):
        _draw(ax, metric, title, figure, models, series, styles, x_axis)
    handles = legend_entries(axes.flat)
    ncol = min(len(handles), 3) or 1
    legend_height = (math.ceil(len(handles) / ncol) * 0.25 + 0.2) / 9.4  # inches -> figure fraction
    fig.subplots_adjust(left=0.06, right=0.98, top=0.93, bottom=0.08 + legend_height, hspace=0.3, wspace=0.18)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(_title(models))
    combined = _save(fig, out / COMBINED_FILE)
    per_metric = {}
    for metric, title, figure in PANELS:
        fig = _figure(figsize=(7, 5))
        ax = fig.subplots()
        fig.subplots_adjust(left=0.1, right=0.97, top=0.88, bottom=0.11)
        _draw(ax, metric, title, figure, models, series, styles, x_axis)
        handles = legend_entries([ax])
        if handles:  # beside the axes: covers no data
            ax.legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                      borderaxespad=0.0)
        fig.suptitle(_title(models), fontsize=10)
        number = figure.split()[-1]
        per_metric[metric] = _save(fig, out / f"fig{number}_{metric}.png")
    return combined, per_metric


def _plot_heads(model: _Model, path: Path) -> Path:
    """Blocks × heads heatmaps of the four panel statistics for one encoder."""
    fig = _figure(figsize=(11, 9))
    axes = fig.subplots(2, 2)
    fig.subplots_adjust(left=0.06, right=0.97, top=0.9, bottom=0.06, hspace=0.3, wspace=0.4)
    for ax, (metric, title, figure) in zip(axes.flat, PANELS):
        values = model.field(metric)
        ax.set_title(f"{title} ({figure})", fontsize=10)
        if values is None:
            ax.text(0.5, 0.5, "no [cls] token", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        blocks, heads = values.shape
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(-0.5, heads - 0.5, blocks - 0.5, -0.5))
        bar = fig.colorbar(image, ax=ax, label=YLABELS[metric])
        plain_ticks(bar.ax)
        ax.set_xlabel(HEAD_LABEL)
        ax.set_ylabel(BLOCK_LABEL)
    fig.suptitle(f"{model.name} ({model.family}): per-head statistics on {model.data or 'unnamed data'}, "
                 f"{model.summary.num_images} images,\n{model.summary.num_patches} patches "
                 f"(log |J| = {model.summary.max_entropy:.3f})")
    return _save(fig, path)


def _model_row(m: _Model) -> dict:
    """One encoder's overall numbers; aggregation entropy follows appendix Table 3."""
    s = m.summary
    overall = {name: (None if m.field(name) is None else float(m.field(name).mean())) for name in FIELD_NAMES}
    uniform = not m.has_cls
    entropy = s.max_entropy if uniform else overall["cls_patch_entropy"]
    return {
        "model": m.name,
        "family": m.family,
        "source": str(m.source),
        "has_cls": m.has_cls,
        "num_images": s.num_images,
        "num_blocks": s.num_blocks,
        "num_heads": s.num_heads,
        "num_patches": s.num_patches,
        "max_entropy": s.max_entropy,
        "aggregation": "uniform (no [cls])" if uniform else "[cls]",
        "aggregation_entropy": entropy,
        "aggregation_entropy_normalized": entropy / s.max_entropy,
        "paper_entropy": m.paper_entropy,
        **overall,
    }


def _block_rows(models: list[_Model]) -> list[dict]:
    rows = []
    for m in models:
        positions = _positions(m.depth, "relative")
        for metric in FIELD_NAMES:
            values = m.field(metric)
            if values is None:
                continue
            for b in range(m.depth):
                rows.append({
                    "model": m.name, "family": m.family, "block": b, "depth": m.depth,
                    "position": float(positions[b]), "metric": metric, "value": float(values[b].mean()),
                    "head_min": float(values[b].min()), "head_max": float(values[b].max()),
                })
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def table3_text(rows: list[dict]) -> str:
    """Appendix Table 3 for the console: aggregation entropy per encoder, MIM first (rows as ``compare`` returns)."""
    from beyond_cls.tables import format_table

    table = [{"family": r["family"], "model": r["model"],
              "entropy (nats)": _fmt(r["aggregation_entropy"]) + ("" if r["has_cls"] else " ‡"),
              "H / log P": _fmt(r["aggregation_entropy_normalized"]), "log P": _fmt(r["max_entropy"]),
              "paper": _fmt(r["paper_entropy"], 2)}
             for r in sorted(rows, key=lambda r: _FAMILY_ORDER.get(r["family"], 2))]
    lines = ["Table 3: aggregation entropy = [cls]→patch attention entropy, mean over blocks and heads "
             "(P = number of patches)", format_table(table, list(table[0]))]
    if any(not r["has_cls"] for r in rows):
        lines.append("‡ no [cls] token: aggregation is uniform over the patches, entropy log P.")
    return "\n".join(lines)


def _report(models, rows, files, notes, x_axis, out: Path) -> Path:
    by_name = {r["model"]: r for r in rows}
    lines = ["# Information flow: model comparison", ""]
    lines += _table(
        ["model", "family", "images", "blocks", "heads", "patches |J|", "log |J|", "source"],
        [[m.name, m.family, str(m.summary.num_images), str(m.depth), str(m.summary.num_heads),
          str(m.summary.num_patches), _fmt(m.summary.max_entropy), os.path.relpath(m.source, out)] for m in models],
    )
    table3 = sorted(rows, key=lambda r: _FAMILY_ORDER.get(r["family"], 2))
    lines += ["", "## Table 3: aggregation entropy", "",
              "[cls]→patch attention entropy averaged over blocks and heads (appendix Table 3); "
              "H / log |J| makes encoders with different patch counts comparable.", ""]
    lines += _table(
        ["family", "model", "aggr. entropy (nats)", "H / log |J|", "log |J| (nats)", "paper (nats)"],
        [[r["family"], r["model"], _fmt(r["aggregation_entropy"]) + ("" if r["has_cls"] else " ‡"),
          _fmt(r["aggregation_entropy_normalized"]), _fmt(r["max_entropy"]), _fmt(r["paper_entropy"], 2)]
         for r in table3],
    )
    if any(not r["has_cls"] for r in rows):
        lines += ["", "‡ no [cls] token: aggregation is uniform over the patches, entropy log |J|."]
    lines += ["", "## Overall means (over blocks and heads)", ""]
    lines += _table(["model", "family"] + [_LABELS[n] for n in FIELD_NAMES],
                    [[r["model"], r["family"]] + [_fmt(r[n], 4) for n in FIELD_NAMES] for r in rows])
    lines += ["", f"Numbers: [{MODELS_CSV}]({MODELS_CSV}) (per model), [{BLOCKS_CSV}]({BLOCKS_CSV}) "
              "(per model, block and metric; mean, min and max over heads).", ""]
    axis = ("block index, 0-based" if x_axis == "block"
            else "relative depth block / (depth - 1) (blocks 0-based), since the encoders' depths differ")
    lines += ["## Figures 3–6", "",
              f"Mean over heads per block (line) and min–max over heads (band); x axis: {axis}. Colour by family "
              "(MIM blue, JEA orange, other purple), line style and marker by model; dashed gray: uniform "
              "attention (1/N, 1/|J| or log |J|). Encoders without [cls] are absent from the [cls] panels.", "",
              f"![Figs. 3–6]({files['figure'].name})", ""]
    for metric, title, figure in PANELS:
        lines += [f"### {figure}: {title}", "", f"![{figure}]({files['metrics'][metric].name})", ""]
    lines += ["## Per-head heatmaps (blocks × heads)", ""]
    for m in models:
        row = by_name[m.name]
        lines += [f"### {m.name} ({row['family']})", "", f"![{m.name}]({files['heatmaps'][m.name].name})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path


def compare(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    names: Sequence[str] | None = None,
    families: Mapping[str, str] | None = None,
) -> dict:
    """Compare encoders from their saved attention summaries; write figures, CSVs and ``report.md`` to ``out``.

    ``inputs`` are ``analyze`` run directories (a multi-model one stands for its per-model subfolders) or
    ``attention_stats.json`` files; ``names`` replace the summaries' model names; ``families`` maps a name to
    "MIM"/"JEA" (else the zoo's family of the model the summary or its run config names).
    Returns ``rows`` (per model), ``per_block`` (long format), ``series`` (the plotted lines),
    ``x_axis`` ("block" or "relative"), ``warnings`` and ``files`` (the written paths).
    """
    models = _models(inputs, names, families)
    with claim_output(out, "compare") as folder:
        return _compare(models, folder)


def _compare(models: list[_Model], out: Path) -> dict:
    """:func:`compare` into ``out``, which this process holds."""
    for stale in out.glob("heads_*.png"):  # an earlier comparison's models
        stale.unlink()
    x_axis = "block" if len({m.depth for m in models}) == 1 else "relative"
    series = _series(models, x_axis)
    styles = _styles(models)
    combined, per_metric = _plot_lines(models, series, styles, x_axis, out)
    taken: set[str] = set()
    heatmaps = {m.name: _plot_heads(m, out / f"heads_{_slug(m.name, taken)}.png") for m in models}

    rows = [_model_row(m) for m in models]
    block_rows = _block_rows(models)
    files = {
        "figure": combined,
        "metrics": per_metric,
        "heatmaps": heatmaps,
        "models_csv": _write_csv(out / MODELS_CSV, rows),
        "blocks_csv": _write_csv(out / BLOCKS_CSV, block_rows),
    }

    problems = []
    patches = {m.name: m.summary.num_patches for m in models}
    if len(set(patches.values())) > 1:
        problems.append(
            "patch counts differ (" + ", ".join(f"{n}: {p}" for n, p in patches.items()) + "): entropies are "
            "bounded by different log |J|, compare H / log |J|"
        )
    problems += [f"{m.name}: the summary covers 0 images" for m in models if m.summary.num_images == 0]
    for problem in problems:
        warnings.warn(problem, stacklevel=2)
    notes = list(problems)
    if x_axis == "relative":
        depths = ", ".join(f"{m.name}: {m.depth}" for m in models)
        notes.append(f"depths differ ({depths}): blocks are plotted at block / (depth - 1)")
    files["report"] = _report(models, rows, files, notes, x_axis, out)
    print(table3_text(rows))
    return {"rows": rows, "per_block": block_rows, "series": series, "x_axis": x_axis, "warnings": problems,
            "files": files}
