"""Compare saved attention summaries: the paper's Figs. 3–6, per-head heatmaps and appendix Table 3.

``compare`` reads the ``attention_stats.json`` of several ``beyond-cls analyze`` runs and writes, into one folder,
line plots over blocks of every panel statistic of :mod:`beyond_cls.statistics` (one line per encoder, colour by
family, line style by model), a blocks × heads heatmap figure per encoder, CSV tables and a ``report.md`` that
embeds them all, and prints Table 3. Blocks and heads are numbered from 0 everywhere (figures, CSVs), as
``--block`` and the printed tables number them. Each step is a module: inputs (:mod:`.compare_inputs`), families
(:mod:`.compare_family`), figures (:mod:`.compare_figures`), rows (:mod:`.compare_rows`), the report
(:mod:`.compare_report`) and the console (:mod:`.compare_console`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from beyond_cls.analysis.compare_console import table3_text
from beyond_cls.analysis.compare_family import ComparedModel, compared_models
from beyond_cls.analysis.compare_figures import COMBINED_FILE, draw_figures, series
from beyond_cls.analysis.compare_report import REPORT_FILE, write_report
from beyond_cls.analysis.compare_rows import MODEL_UNITS, blocks_table, model_row
from beyond_cls.analysis.stats_csv import units_rows, write_csv
from beyond_cls.analysis.style import FAMILIES, infer_family
from beyond_cls.runlock import claim_output

__all__ = ["BLOCKS_CSV", "COMBINED_FILE", "FAMILIES", "MODELS_CSV", "REPORT_FILE", "UNITS_CSV", "compare",
           "compared_models", "infer_family", "table3_text"]

MODELS_CSV = "summary_by_model.csv"
BLOCKS_CSV = "summary_by_block.csv"
UNITS_CSV = "summary_units.csv"


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
    models = compared_models(inputs, names, families)
    with claim_output(out, "compare") as folder:
        return _compare(models, folder)


def _problems(models: list[ComparedModel]) -> list[str]:
    """What makes the comparison shaky: different patch counts, empty summaries."""
    problems = []
    patches = {m.name: m.summary.num_patches for m in models}
    if len(set(patches.values())) > 1:
        problems.append(
            "patch counts differ (" + ", ".join(f"{n}: {p}" for n, p in patches.items()) + "): entropies are "
            "bounded by different log |J|, compare H / log |J|"
        )
    return problems + [f"{m.name}: the summary covers 0 images" for m in models if m.summary.num_images == 0]


def _compare(models: list[ComparedModel], out: Path) -> dict:
    """:func:`compare` into ``out``, which this process holds."""
    for stale in out.glob("heads_*.png"):  # an earlier comparison's models
        stale.unlink()
    x_axis = "block" if len({m.depth for m in models}) == 1 else "relative"
    lines = series(models, x_axis)
    files = draw_figures(models, lines, x_axis, out)
    rows = [model_row(m) for m in models]
    block_rows = blocks_table(models)
    files["models_csv"] = write_csv(out / MODELS_CSV, rows)
    files["blocks_csv"] = write_csv(out / BLOCKS_CSV, block_rows)
    files["units_csv"] = write_csv(out / UNITS_CSV, units_rows(MODEL_UNITS))
    problems = _problems(models)
    for problem in problems:
        warnings.warn(problem, stacklevel=3)
    notes = list(problems)
    if x_axis == "relative":
        depths = ", ".join(f"{m.name}: {m.depth}" for m in models)
        notes.append(f"depths differ ({depths}): blocks are plotted at block / (depth - 1)")
    files["report"] = write_report(models, rows, files, notes, x_axis, out)
    print(table3_text(rows))
    return {"rows": rows, "per_block": block_rows, "series": lines, "x_axis": x_axis, "warnings": problems,
            "files": files}
