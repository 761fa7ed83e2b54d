"""The four information-flow panels of the paper (Figs. 3–6), for one or more encoders.

Blocks are numbered from 0, as ``--block``, the printed tables and the CSVs number them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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


def information_flow_figure(summaries: AttentionSummary | Mapping[str, AttentionSummary]) -> Figure:
    """A 2×2 figure: per-block means over heads (lines) with the head range (bands), blocks from 0.

    Entropy panels carry the uniform-attention bound log |J| as a dashed line. Encoders without [cls] are left
    out of the [cls] panels. One legend below the panels, so it covers no data.
    """
    if isinstance(summaries, AttentionSummary):
        summaries = {summaries.model or "encoder": summaries}
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    colors = {label: f"C{i % 10}" for i, label in enumerate(summaries)}  # one colour per encoder in every panel
    handles: dict[str, object] = {}
    for ax, (name, title, figure) in zip(axes.flat, PANELS):
        bounds = set()
        for label, summary in summaries.items():
            values = getattr(summary, name)
            if values is None:
                continue
            blocks = range(values.shape[0])
            ax.plot(blocks, values.mean(dim=1).numpy(), marker="o", ms=3, color=colors[label], label=label)
            ax.fill_between(
                blocks, values.min(dim=1).values.numpy(), values.max(dim=1).values.numpy(),
                color=colors[label], alpha=0.15, linewidth=0,
            )
            if name.endswith("entropy"):
                bounds.add(summary.max_entropy)
        for bound in sorted(bounds):
            ax.axhline(bound, color="gray", linestyle="--", linewidth=1, label=f"uniform: log|J| = {bound:.2f}")
        ax.set_title(f"{title} ({figure})")
        ax.set_xlabel(BLOCK_LABEL)
        ax.set_ylabel(YLABELS[name])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.has_data():
            for handle, text in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(text, handle)
        else:
            ax.text(0.5, 0.5, "no [cls] token", ha="center", va="center", transform=ax.transAxes)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 3),
                   fontsize=8, frameon=False)
    return fig


def plot_information_flow(
    summaries: AttentionSummary | Mapping[str, AttentionSummary], path: str | os.PathLike
) -> Path:
    """Save :func:`information_flow_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    information_flow_figure(summaries).savefig(path, dpi=120)
    return path
