"""Markdown tables for the console and reports (probe results, comparisons, lists); a leaf both
``probe`` and ``analysis`` use."""

from __future__ import annotations

import math
from typing import Any

from beyond_cls.units import format_lrs

__all__ = ["format_table"]


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # per seed, e.g. best_epoch
        return "/".join(_cell(v) for v in value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    return str(value)


_RATES = ("blr", "lr")  # learning rates: beyond_cls.units.format_lrs (0.03125, not 0.03; distinct ones apart)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``rows`` restricted to ``columns`` (missing cells and NaN shown as –, lists as a/b;
    learning rates as :func:`~beyond_cls.units.format_lrs` prints them)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    for i, column in enumerate(columns):
        values = [row.get(column) for row in rows]
        if column in _RATES and values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            for cell, text in zip(cells, format_lrs(values)):
                cell[i] = text
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda items: "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])
