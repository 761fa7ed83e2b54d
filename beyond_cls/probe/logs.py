"""Run logs of the main process: JSON lines, TensorBoard scalars, and the results table."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from beyond_cls.fileio import write_atomic
from beyond_cls.units import format_lrs

__all__ = ["MetricLog", "format_image_counts", "format_table", "json_safe", "write_csv", "write_json_atomic"]


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / inf floats replaced by None, so the JSON is standard (no bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    write_atomic(path, json.dumps(json_safe(obj), indent=1, default=str, allow_nan=False).encode())


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Rows with the union of their keys as columns (first-seen order); written atomically."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue().encode())


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


def format_image_counts(per_seed: dict[int, dict[str, int]]) -> str:
    """'images: 500 evaluated, 2 skipped; 9 skipped in training (all epochs)', per seed where seeds differ.

    ``per_seed``: each seed's ``ProbeTrainer.image_counts()`` (eval_images, eval_skipped, train_skipped).
    """
    text = lambda c: (f"{c['eval_images']} evaluated, {c['eval_skipped']} skipped; "
                      f"{c['train_skipped']} skipped in training (all epochs)")
    if len({tuple(sorted(c.items())) for c in per_seed.values()}) <= 1:
        return "images: " + "".join(text(c) for c in list(per_seed.values())[:1])
    return "images: " + " | ".join(f"seed {seed}: {text(c)}" for seed, c in per_seed.items())


class MetricLog:
    """``metrics.jsonl`` (one JSON object per record) plus TensorBoard scalars under ``tb/``.

    Appends, so a resumed run continues the same files. Inert on non-main processes. The TensorBoard
    event file is opened at the first scalar, so re-reading a finished run adds no empty one.
    """

    def __init__(self, out: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self._tb = None
        self._tb_dir = Path(out) / "tb" if enabled and tensorboard else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _writer(self):
        if self._tb is None and self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir))
        return self._tb

    def log(self, record: dict[str, Any], step: int, scalars: dict[str, float] | None = None) -> None:
        """Append ``record`` (plus ``step``) as a JSON line and write ``scalars`` to TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe({"step": step, **record}), default=str, allow_nan=False) + "\n")
        finite = {k: v for k, v in (scalars or {}).items() if v is not None and math.isfinite(v)}
        if finite and self._writer() is not None:
            for name, value in finite.items():
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
