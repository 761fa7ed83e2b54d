"""What ``compare`` prints: appendix Table 3 (aggregation entropy per encoder, MIM first)."""

from __future__ import annotations

import math

from beyond_cls.analysis.compare_rows import table3_rows
from beyond_cls.tables import format_table

__all__ = ["fmt", "table3_text"]


def fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; — when absent or NaN."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table3_text(rows: list[dict]) -> str:
    """Appendix Table 3 for the console: aggregation entropy per encoder, MIM first (rows as ``compare`` returns)."""
    table = [{"family": r["family"], "model": r["model"],
              "entropy (nats)": fmt(r["aggregation_entropy"]) + ("" if r["has_cls"] else " ‡"),
              "H / log P": fmt(r["aggregation_entropy_normalized"]), "log P": fmt(r["max_entropy"]),
              "paper": fmt(r["paper_entropy"], 2)}
             for r in table3_rows(rows)]
    lines = ["Table 3: aggregation entropy = [cls]→patch attention entropy, mean over blocks and heads "
             "(P = number of patches)", format_table(table, list(table[0]))]
    if any(not r["has_cls"] for r in rows):
        lines.append("‡ no [cls] token: aggregation is uniform over the patches, entropy log P.")
    return "\n".join(lines)
