"""Run logs of the main process: JSON lines, TensorBoard scalars, CSV and JSON results (the results table:
:func:`beyond_cls.tables.format_table`)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from beyond_cls.fileio import write_atomic

__all__ = ["MetricLog", "format_image_counts", "json_safe", "write_csv", "write_json_atomic"]


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
