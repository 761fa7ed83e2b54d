"""``compare``'s figures, drawn by :mod:`beyond_cls.analysis.plots` as ``analyze``'s are: every panel statistic of
the table in one figure and one figure each, and a blocks × heads heatmap figure per encoder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from beyond_cls import statistics
from beyond_cls.analysis.compare_family import ComparedModel
from beyond_cls.analysis.plots import (
    BLOCK_LABEL,
    Curve,
    flow_figure,
    flow_title,
    heads_figure,
    panel_figure,
    paper_figure,
)
from beyond_cls.analysis.style import model_styles

__all__ = ["COMBINED_FILE", "RELATIVE_LABEL", "draw_figures", "panel_file", "positions", "save_figure", "series"]

COMBINED_FILE = "information_flow.png"
RELATIVE_LABEL = "relative depth: block / (depth - 1), block 0-based"

#: What :func:`series` returns: statistic -> model -> {"x", "y" (mean over heads), "head_min", "head_max"}.
Series = dict[str, dict[str, dict[str, list[float]]]]


def positions(depth: int, x_axis: str) -> np.ndarray:
    """x of each block: its number (``"block"``), or block / (depth - 1) (``"relative"``)."""
    blocks = np.arange(depth, dtype=np.float64)
    if x_axis == "block":
        return blocks
    return blocks / (depth - 1) if depth > 1 else blocks


def series(models: list[ComparedModel], x_axis: str) -> Series:
    """What the line plots draw, for every panel statistic of the table (models lacking it left out)."""
    out: Series = {}
    for stat in statistics.panels():
        out[stat.name] = {}
        for m in models:
            values = m.field(stat.name)
            if values is not None:
                out[stat.name][m.name] = {
                    "x": positions(m.depth, x_axis).tolist(),
                    "y": values.mean(dim=1).tolist(),
                    "head_min": values.min(dim=1).values.tolist(),
                    "head_max": values.max(dim=1).values.tolist(),
                }
    return out


def panel_file(name: str) -> str:
    """File of one statistic's figure: ``fig<N>_<name>.png`` after the paper's figure, else ``<name>.png``."""
    figure = paper_figure(statistics.find(name))
    return f"fig{figure.split()[-1]}_{name}.png" if figure else f"{name}.png"


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG on its own Agg canvas (no pyplot, no global backend), nothing clipped."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


def _title(models: list[ComparedModel]) -> str:
    data = sorted({m.data or "unnamed data" for m in models})
    return flow_title({m.name: m.summary.num_images for m in models}, "; ".join(data))


def draw_figures(models: list[ComparedModel], lines: Series, x_axis: str, out: Path) -> dict:
    """Write the figures into ``out``: ``{"figure": combined, "metrics": {statistic: path}, "heatmaps":
    {model: path}}``. Colour by family and line style by model, as ``analyze``'s figures."""
    styles = model_styles({m.name: (m.model or m.name, m.family) for m in models})
    curves = {
        name: [Curve(f"{m.name} ({m.family})", s["x"], s["y"], s["head_min"], s["head_max"], styles[m.name],
                     m.summary.num_patches, m.summary.num_prefix_tokens)
               for m in models if (s := by_model.get(m.name)) is not None]
        for name, by_model in lines.items()
    }
    xlabel = BLOCK_LABEL if x_axis == "block" else RELATIVE_LABEL
    title = _title(models)
    combined = save_figure(flow_figure(curves, title=title, xlabel=xlabel), out / COMBINED_FILE)
    per_metric = {name: save_figure(panel_figure(name, drawn, title=title, xlabel=xlabel), out / panel_file(name))
                  for name, drawn in curves.items()}
    taken: set[str] = set()
    heatmaps = {}
    for m in models:
        title = (f"{m.name} ({m.family}): per-head statistics on {m.data or 'unnamed data'}, "
                 f"{m.summary.num_images} images,\n{m.summary.num_patches} patches "
                 f"(log |J| = {m.summary.max_entropy:.3f})")
        fig = heads_figure({s.name: m.field(s.name) for s in statistics.panels()}, title=title)
        heatmaps[m.name] = save_figure(fig, out / f"heads_{_slug(m.name, taken)}.png")
    return {"figure": combined, "metrics": per_metric, "heatmaps": heatmaps}
