"""The four information-flow panels of the paper (Figs. 3–6), for one or more encoders."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from beyond_cls.analysis.summary import AttentionSummary  # noqa: E402

# (field, title, figure of the paper)
PANELS = (
    ("cls_self", "[cls]-[cls] attention", "Fig. 3"),
    ("cls_patch_entropy", "[cls]-patch entropy", "Fig. 4"),
    ("patch_self", "patch self-attention (of patch mass)", "Fig. 5"),
    ("patch_patch_entropy", "patch-patch entropy", "Fig. 6"),
)


def plot_information_flow(
    summaries: AttentionSummary | Mapping[str, AttentionSummary], path: str | os.PathLike
) -> Path:
    """Save a 2×2 PNG: per-block means over heads (lines) with the head range (bands).

    Entropy panels carry the uniform-attention bound log |J| as a dashed line. Encoders without
    [cls] are left out of the [cls] panels.
    """
    if isinstance(summaries, AttentionSummary):
        summaries = {summaries.model or "encoder": summaries}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (name, title, figure) in zip(axes.flat, PANELS):
        bounds = set()
        for label, summary in summaries.items():
            values = getattr(summary, name)
            if values is None:
                continue
            blocks = range(1, values.shape[0] + 1)
            (line,) = ax.plot(blocks, values.mean(dim=1).numpy(), marker="o", ms=3, label=label)
            ax.fill_between(
                blocks, values.min(dim=1).values.numpy(), values.max(dim=1).values.numpy(),
                color=line.get_color(), alpha=0.15, linewidth=0,
            )
            if name.endswith("entropy"):
                bounds.add(summary.max_entropy)
        for bound in sorted(bounds):
            ax.axhline(bound, color="gray", linestyle="--", linewidth=1)
            ax.annotate(f"log|J| = {bound:.2f}", (1, bound), textcoords="offset points", xytext=(2, -10),
                        fontsize=8, color="gray")
        ax.set_title(f"{title} ({figure})")
        ax.set_xlabel("block")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no [cls] token", ha="center", va="center", transform=ax.transAxes)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
