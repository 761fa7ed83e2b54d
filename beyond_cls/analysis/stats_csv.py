"""CSV rows of the attention statistics, one code for ``analyze`` and ``compare``: every registered statistic of
:mod:`beyond_cls.statistics` (read at call time), columns and ``metric`` values named by ``Statistic.name``."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from beyond_cls import statistics
from beyond_cls.analysis.plots import statistic_values
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.fileio import write_atomic

__all__ = ["BLOCK_COLUMNS", "block_rows", "overall_means", "units_rows", "write_csv"]

#: Columns of the per-block CSVs (long format: one row per model, statistic and block; 0-based blocks).
BLOCK_COLUMNS = ("model", "family", "block", "depth", "position", "metric", "value", "head_min", "head_max", "unit")


def block_rows(model: str, family: str, summary: AttentionSummary) -> list[dict]:
    """Per block and statistic present: mean, min and max over heads, at position block / (depth - 1)."""
    depth = summary.num_blocks
    rows = []
    for stat in statistics.statistics():
        values = statistic_values(summary, stat.name)
        if values is None:
            continue
        for b in range(depth):
            rows.append(dict(zip(BLOCK_COLUMNS, (
                model, family, b, depth, b / (depth - 1) if depth > 1 else 0.0, stat.name, float(values[b].mean()),
                float(values[b].min()), float(values[b].max()), stat.unit))))
    return rows


def overall_means(summary: AttentionSummary) -> dict[str, float | None]:
    """Every registered statistic averaged over blocks and heads, by name; None where the summary lacks it."""
    means = {}
    for stat in statistics.statistics():
        values = statistic_values(summary, stat.name)
        means[stat.name] = None if values is None else float(values.mean())
    return means


def units_rows(extra: dict[str, str] | None = None) -> list[dict]:
    """``{"column", "unit"}`` rows: ``extra``'s columns, then every registered statistic's."""
    units = {**(extra or {}), **{s.name: s.unit for s in statistics.statistics()}}
    return [{"column": column, "unit": unit} for column, unit in units.items()]


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` (the first row's keys are the columns; None as an empty cell) atomically at ``path``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_atomic(Path(path), buf.getvalue().encode())
