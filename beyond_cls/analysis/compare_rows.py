"""``compare``'s numbers per encoder: appendix Table 3's aggregation entropy and every registered statistic's
mean over blocks and heads (the rows ``compare`` returns and writes to ``summary_by_model.csv``)."""

from __future__ import annotations

from beyond_cls.analysis.compare_family import ComparedModel, family_order
from beyond_cls.analysis.stats_csv import block_rows, overall_means

__all__ = ["MODEL_UNITS", "blocks_table", "model_row", "table3_rows"]

#: Units of the per-model columns that are not statistics (those take theirs from the statistics table).
MODEL_UNITS = {"max_entropy": "nats", "aggregation_entropy": "nats", "aggregation_entropy_normalized": "fraction of 1",
               "paper_entropy": "nats"}


def model_row(m: ComparedModel) -> dict:
    """One encoder's overall numbers; aggregation entropy follows appendix Table 3 (log |J| without [cls])."""
    s = m.summary
    overall = overall_means(s)
    uniform = not m.has_cls
    entropy = s.max_entropy if uniform else overall["cls_patch_entropy"]
    return {
        "model": m.name,
        "family": m.family,
        "source": str(m.source),
        "has_cls": m.has_cls,
        "num_images": s.num_images,
        "num_blocks": s.num_blocks,
        "num_heads": s.num_heads,
        "num_patches": s.num_patches,
        "max_entropy": s.max_entropy,
        "aggregation": "uniform (no [cls])" if uniform else "[cls]",
        "aggregation_entropy": entropy,
        "aggregation_entropy_normalized": entropy / s.max_entropy,
        "paper_entropy": m.paper_entropy,
        **overall,
    }


def blocks_table(models: list[ComparedModel]) -> list[dict]:
    """The long per-block rows of every encoder (``summary_by_block.csv``)."""
    return [row for m in models for row in block_rows(m.name, m.family, m.summary)]


def table3_rows(rows: list[dict]) -> list[dict]:
    """``rows`` in Table 3's order: MIM, then JEA, then other families (stable within a family)."""
    return sorted(rows, key=lambda r: family_order(r["family"]))
