"""The information-flow figures (the paper's Figs. 3–6 and per-head heatmaps), for one or more encoders.

Panels, titles, y-axis labels with units and uniform-attention references come from the statistics table,
:mod:`beyond_cls.statistics`, read when a figure is drawn (so a statistic registered at run time is drawn too).
Blocks are numbered from 0, as ``--block``, the printed tables and the CSVs number them. ``analyze`` and
``compare`` draw with these functions, in the colours and line styles of :mod:`beyond_cls.analysis.style`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from beyond_cls import statistics
from beyond_cls.analysis.style import (
    BAND_LABEL,
    REFERENCE_COLOR,
    REFERENCE_STYLE,
    infer_family,
    model_styles,
    plain_ticks,
)
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.statistics import Statistic

__all__ = ["BLOCK_LABEL", "HEAD_LABEL", "Curve", "draw_panel", "flow_figure", "flow_title", "heads_figure",
           "information_flow_figure", "legend_entries", "panel_figure", "panel_title", "paper_figure",
           "plot_information_flow", "statistic_values"]

BLOCK_LABEL = "block (0-based)"
HEAD_LABEL = "head (0-based)"
PANEL_WIDTH, PANEL_HEIGHT = 5.5, 3.9  # inches per panel of a grid


def paper_figure(stat: Statistic) -> str:
    """The paper's main-text figure of ``stat`` (``"Fig. 3"`` of ``"Fig. 3 / 10"``), or "" when it has none."""
    found = re.search(r"Fig\.\s*(\d+)", stat.paper)
    return f"Fig. {found.group(1)}" if found else ""


def panel_title(stat: Statistic) -> str:
    """``"<title> (paper Fig. N)"``, or the bare title for a statistic the paper does not draw."""
    figure = paper_figure(stat)
    return f"{stat.title} (paper {figure})" if figure else stat.title


def statistic_values(summary: AttentionSummary, name: str) -> Tensor | None:
    """The [blocks, heads] values of statistic ``name``, or None when the summary lacks it or holds only NaN
    (other tools' way of writing "no [cls] token")."""
    values = summary.fields().get(name)
    if values is None or bool(values.isnan().all()):
        return None
    return values


@dataclass
class Curve:
    """One encoder's line on a panel: mean over heads per block, and the min–max band over heads."""

    label: str
    x: Sequence[float]
    mean: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    style: Mapping
    num_patches: int
    num_prefix_tokens: int

    @classmethod
    def of(cls, label: str, values: Tensor, x: Sequence[float], style: Mapping, summary: AttentionSummary) -> Curve:
        """The curve of ``values`` [blocks, heads] at positions ``x``, with ``summary``'s token counts."""
        return cls(label, list(x), values.mean(dim=1).tolist(), values.min(dim=1).values.tolist(),
                   values.max(dim=1).values.tolist(), style, summary.num_patches, summary.num_prefix_tokens)


def _absent_text(stat: Statistic) -> str:
    return "no [cls] token" if stat.needs_cls else "not recorded"


def draw_panel(ax, stat: Statistic | str, curves: Sequence[Curve], *, xlabel: str = BLOCK_LABEL,
               title: str | None = None) -> None:
    """One panel: each curve's band and line, then the uniform-attention reference of every distinct token count."""
    stat = statistics.find(stat) if isinstance(stat, str) else stat
    for c in curves:
        ax.fill_between(c.x, c.low, c.high, color=c.style["color"], alpha=0.15, linewidth=0)
        ax.plot(c.x, c.mean, ms=3, label=c.label, **c.style)
    references: dict[float, str] = {}  # one line per distinct value (1/|J| does not depend on the prefix tokens)
    for reference in sorted({stat.uniform_reference(c.num_patches, c.num_prefix_tokens) for c in curves} - {None}):
        references.setdefault(*reference)
    for value, text in references.items():
        ax.axhline(value, color=REFERENCE_COLOR, linestyle=REFERENCE_STYLE, linewidth=1, label=text)
    ax.set_title(panel_title(stat) if title is None else title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(stat.ylabel)
    if xlabel == BLOCK_LABEL:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    plain_ticks(ax)
    if not curves:
        ax.text(0.5, 0.5, _absent_text(stat), ha="center", va="center", transform=ax.transAxes)


def legend_entries(axes) -> dict[str, object]:
    """Legend text -> handle over ``axes`` (first wins), then the band's explanation."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    if handles:
        handles[BAND_LABEL] = Patch(facecolor="0.5", alpha=0.3, linewidth=0)
    return handles


def flow_title(counts: Mapping[str, int], data: str | None) -> str:
    """``"Information flow on <data>: <n> images"`` (one count per model when they differ)."""
    values = set(counts.values())
    images = (f"{next(iter(values))} images" if len(values) == 1
              else ", ".join(f"{name}: {n} images" for name, n in counts.items()))
    return f"Information flow on {data or 'unnamed data'}: {images}"


def flow_figure(curves: Mapping[str, Sequence[Curve]], *, title: str, xlabel: str = BLOCK_LABEL) -> Figure:
    """A grid of panels, two per row: one per statistic named in ``curves`` (in its order), one legend below.

    A panel whose curve list is empty says why (no [cls] token). Constrained layout keeps labels, titles and the
    legend inside the figure and the legend off the data.
    """
    stats = [statistics.find(name) for name in curves]
    cols = 2 if len(stats) > 1 else 1
    rows = max(1, math.ceil(len(stats) / cols))
    fig = Figure(figsize=(PANEL_WIDTH * cols, PANEL_HEIGHT * rows + 1.0), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax, stat in zip(axes, stats):
        draw_panel(ax, stat, curves[stat.name], xlabel=xlabel)
    for ax in axes[len(stats):]:  # an odd number of panels leaves one cell empty
        fig.delaxes(ax)
    handles = legend_entries(fig.axes)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 3),
                   fontsize=8, frameon=False)
    fig.suptitle(title)
    return fig


def panel_figure(stat: Statistic | str, curves: Sequence[Curve], *, title: str, xlabel: str = BLOCK_LABEL) -> Figure:
    """One statistic's panel on its own, the legend beside the axes (it covers no data)."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.1, right=0.97, top=0.88, bottom=0.11)
    draw_panel(ax, stat, curves, xlabel=xlabel)
    handles = legend_entries([ax])
    if handles:
        ax.legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    return fig


def heads_figure(values: Mapping[str, Tensor | None], *, title: str) -> Figure:
    """Blocks × heads heatmaps, one per statistic named in ``values`` (None: absent, the panel says why)."""
    stats = [statistics.find(name) for name in values]
    cols = 2 if len(stats) > 1 else 1
    rows = max(1, math.ceil(len(stats) / cols))
    fig = Figure(figsize=(5.5 * cols, 4.1 * rows + 0.8))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    fig.subplots_adjust(left=0.06, right=0.97, top=1 - 0.9 / (4.1 * rows + 0.8), bottom=0.06, hspace=0.3, wspace=0.4)
    for ax, stat in zip(axes, stats):
        ax.set_title(panel_title(stat), fontsize=10)
        matrix = values[stat.name]
        if matrix is None:
            ax.text(0.5, 0.5, _absent_text(stat), ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        blocks, heads = matrix.shape
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        image = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(-0.5, heads - 0.5, blocks - 0.5, -0.5))
        bar = fig.colorbar(image, ax=ax, label=stat.ylabel)
        plain_ticks(bar.ax)
        ax.set_xlabel(HEAD_LABEL)
        ax.set_ylabel(BLOCK_LABEL)
    for ax in axes[len(stats):]:  # an odd number of panels leaves one cell empty
        fig.delaxes(ax)
    fig.suptitle(title)
    return fig


def information_flow_figure(summaries: AttentionSummary | Mapping[str, AttentionSummary], *,
                            data: str | None = None) -> Figure:
    """The panels of :func:`flow_figure` for ``analyze``: per-block means over heads (lines) with the min–max over
    heads (bands), blocks from 0, every panel statistic of the table.

    Every panel carries its uniform-attention reference; the title names ``data`` (see
    :func:`~beyond_cls.analysis.style.data_label`) and the image count. Encoders without [cls] are left out of
    the [cls] panels.
    """
    if isinstance(summaries, AttentionSummary):
        summaries = {summaries.model or "encoder": summaries}
    families = {label: infer_family(s.model or label) for label, s in summaries.items()}
    styles = model_styles({label: (s.model or label, families[label]) for label, s in summaries.items()})
    curves: dict[str, list[Curve]] = {}
    for stat in statistics.panels():
        curves[stat.name] = []
        for label, summary in summaries.items():
            values = statistic_values(summary, stat.name)
            if values is not None:
                curves[stat.name].append(Curve.of(f"{label} ({families[label]})", values, range(values.shape[0]),
                                                  styles[label], summary))
    return flow_figure(curves, title=flow_title({label: s.num_images for label, s in summaries.items()}, data))


def plot_information_flow(
    summaries: AttentionSummary | Mapping[str, AttentionSummary], path: str | os.PathLike, *,
    data: str | None = None,
) -> Path:
    """Save :func:`information_flow_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    information_flow_figure(summaries, data=data).savefig(path, dpi=120)
    return path
