"""The four information-flow panels of the paper (Figs. 3–6), for one or more encoders.

Blocks are numbered from 0, as ``--block``, the printed tables and the CSVs number them. ``analyze`` and
``compare`` draw their panels with :func:`draw_panel`, in the colours and line styles of
:mod:`beyond_cls.analysis.style`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from beyond_cls.analysis.style import (
    BAND_LABEL,
    REFERENCE_COLOR,
    REFERENCE_STYLE,
    infer_family,
    model_styles,
    plain_ticks,
    uniform_reference,
)
from beyond_cls.analysis.summary import AttentionSummary

# (field, title, figure of the paper)
PANELS = (
    ("cls_self", "[cls]-[cls] attention", "Fig. 3"),
    ("cls_patch_entropy", "[cls]-patch entropy", "Fig. 4"),
    ("patch_self", "patch self-attention (of patch mass)", "Fig. 5"),
    ("patch_patch_entropy", "patch-patch entropy", "Fig. 6"),
)
# y-axis label (with its unit) of each panel
YLABELS = {
    "cls_self": "attention weight a₀₀ (fraction, 0–1)",
    "cls_patch_entropy": "entropy (nats)",
    "patch_self": "share of patch attention (0–1)",
    "patch_patch_entropy": "entropy (nats)",
}
BLOCK_LABEL = "block (0-based)"
HEAD_LABEL = "head (0-based)"


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


def draw_panel(ax, metric: str, curves: Sequence[Curve], *, xlabel: str = BLOCK_LABEL, title: str = "") -> None:
    """One panel: each curve's band and line, then the uniform-attention reference of every distinct token count."""
    for c in curves:
        ax.fill_between(c.x, c.low, c.high, color=c.style["color"], alpha=0.15, linewidth=0)
        ax.plot(c.x, c.mean, ms=3, label=c.label, **c.style)
    references = {uniform_reference(metric, c.num_patches, c.num_prefix_tokens) for c in curves} - {None}
    for value, text in sorted(references):
        ax.axhline(value, color=REFERENCE_COLOR, linestyle=REFERENCE_STYLE, linewidth=1, label=text)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(YLABELS[metric])
    if xlabel == BLOCK_LABEL:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    plain_ticks(ax)
    if not curves:
        ax.text(0.5, 0.5, "no [cls] token", ha="center", va="center", transform=ax.transAxes)


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


def information_flow_figure(summaries: AttentionSummary | Mapping[str, AttentionSummary], *,
                            data: str | None = None) -> Figure:
    """A 2×2 figure: per-block means over heads (lines) with the min–max over heads (bands), blocks from 0.

    Every panel carries its uniform-attention reference; the title names ``data`` (see
    :func:`~beyond_cls.analysis.style.data_label`) and the image count. Encoders without [cls] are left out of
    the [cls] panels. One legend below the panels, so it covers no data.
    """
    if isinstance(summaries, AttentionSummary):
        summaries = {summaries.model or "encoder": summaries}
    families = {label: infer_family(s.model or label) for label, s in summaries.items()}
    styles = model_styles({label: (s.model or label, families[label]) for label, s in summaries.items()})
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, (name, title, figure) in zip(axes.flat, PANELS):
        curves = []
        for label, summary in summaries.items():
            values = getattr(summary, name)
            if values is None:
                continue
            curves.append(Curve(
                f"{label} ({families[label]})", list(range(values.shape[0])), values.mean(dim=1).tolist(),
                values.min(dim=1).values.tolist(), values.max(dim=1).values.tolist(), styles[label],
                summary.num_patches, summary.num_prefix_tokens,
            ))
        draw_panel(ax, name, curves, title=f"{title} ({figure})")
    handles = legend_entries(axes.flat)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 3),
                   fontsize=8, frameon=False)
    fig.suptitle(flow_title({label: s.num_images for label, s in summaries.items()}, data))
    return fig


def plot_information_flow(
    summaries: AttentionSummary | Mapping[str, AttentionSummary], path: str | os.PathLike, *,
    data: str | None = None,
) -> Path:
    """Save :func:`information_flow_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    information_flow_figure(summaries, data=data).savefig(path, dpi=120)
    return path
