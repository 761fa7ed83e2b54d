"""``compare``'s ``report.md``: the encoders, Table 3, every registered statistic's overall mean, and the figures."""

from __future__ import annotations

import os
from pathlib import Path

from beyond_cls import statistics
from beyond_cls.analysis.compare_console import fmt
from beyond_cls.analysis.compare_family import ComparedModel
from beyond_cls.analysis.compare_rows import table3_rows
from beyond_cls.analysis.plots import panel_title

__all__ = ["REPORT_FILE", "write_report"]

REPORT_FILE = "report.md"


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def _figures(files: dict, x_axis: str) -> list[str]:
    axis = ("block index, 0-based" if x_axis == "block"
            else "relative depth block / (depth - 1) (blocks 0-based), since the encoders' depths differ")
    panels = statistics.panels()
    uniform = ", ".join(dict.fromkeys(s.uniform_text for s in panels))
    lines = ["## Information flow per block", "",
             f"Mean over heads per block (line) and min–max over heads (band); x axis: {axis}. Colour by family "
             "(MIM blue, JEA orange, other purple), line style and marker by model; dashed gray: uniform "
             f"attention ({uniform}). Encoders without [cls] are absent from the [cls] panels.", "",
             f"![information flow]({files['figure'].name})", ""]
    for stat in panels:
        lines += [f"### {panel_title(stat)}", "", f"![{stat.name}]({files['metrics'][stat.name].name})", ""]
    return lines


def write_report(models: list[ComparedModel], rows: list[dict], files: dict, notes: list[str], x_axis: str,
                 out: Path) -> Path:
    """Write ``out/report.md``, linking the figures and CSVs of ``files`` by their names."""
    lines = ["# Information flow: model comparison", ""]
    lines += _table(
        ["model", "family", "images", "blocks", "heads", "patches |J|", "log |J|", "source"],
        [[m.name, m.family, str(m.summary.num_images), str(m.depth), str(m.summary.num_heads),
          str(m.summary.num_patches), fmt(m.summary.max_entropy), os.path.relpath(m.source, out)] for m in models],
    )
    lines += ["", "## Table 3: aggregation entropy", "",
              "[cls]→patch attention entropy averaged over blocks and heads (appendix Table 3); "
              "H / log |J| makes encoders with different patch counts comparable.", ""]
    lines += _table(
        ["family", "model", "aggr. entropy (nats)", "H / log |J|", "log |J| (nats)", "paper (nats)"],
        [[r["family"], r["model"], fmt(r["aggregation_entropy"]) + ("" if r["has_cls"] else " ‡"),
          fmt(r["aggregation_entropy_normalized"]), fmt(r["max_entropy"]), fmt(r["paper_entropy"], 2)]
         for r in table3_rows(rows)],
    )
    if any(not r["has_cls"] for r in rows):
        lines += ["", "‡ no [cls] token: aggregation is uniform over the patches, entropy log |J|."]
    stats = statistics.statistics()
    lines += ["", "## Overall means (over blocks and heads)", ""]
    lines += _table(["model", "family"] + [f"{s.title} ({s.unit})" for s in stats],
                    [[r["model"], r["family"]] + [fmt(r.get(s.name), 4) for s in stats] for r in rows])
    models_csv, blocks_csv, units_csv = (files[k].name for k in ("models_csv", "blocks_csv", "units_csv"))
    lines += ["", f"Numbers: [{models_csv}]({models_csv}) (per model), [{blocks_csv}]({blocks_csv}) "
              f"(per model, block and metric; mean, min and max over heads), units of the columns in "
              f"[{units_csv}]({units_csv}).", ""]
    lines += _figures(files, x_axis)
    lines += ["## Per-head heatmaps (blocks × heads)", ""]
    for m in models:
        lines += [f"### {m.name} ({m.family})", "", f"![{m.name}]({files['heatmaps'][m.name].name})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
