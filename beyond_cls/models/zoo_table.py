"""``beyond-cls zoo``: the zoo as a table (architecture, size, official file, presence), and a load check."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from beyond_cls.models.loader import create_encoder, load_encoder
from beyond_cls.models.zoo import ZOO, ZooEntry, find_weights
from beyond_cls.models.zoo import weights_dir as resolve_weights_dir

__all__ = ["build_zoo_architecture", "zoo_rows"]


def build_zoo_architecture(entry: ZooEntry, img_size: int = 224, device: str | torch.device = "meta") -> nn.Module:
    """The encoder of ``entry`` with random (or, on ``meta``, no) weights, no head."""
    with torch.device(device):
        return create_encoder(entry.arch, img_size=img_size, **entry.kwargs())


def zoo_rows(weights_dir: str | os.PathLike | None = None, check: bool = False) -> list[dict[str, Any]]:
    """One row per zoo encoder; ``check`` loads every present file strictly: ``check`` is OK or ``failed``,
    with the error in ``error``. FileNotFoundError when the weights folder named does not exist."""
    resolve_weights_dir(weights_dir)  # a mistyped folder is an error, not fourteen absent files
    rows = []
    for entry in ZOO.values():
        model = build_zoo_architecture(entry)
        row: dict[str, Any] = {
            "name": entry.name, "family": entry.family, "architecture": entry.arch,
            "params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "file": entry.file, "get it from": entry.url or entry.where,
        }
        try:
            path = find_weights(entry, weights_dir)
            row["present"] = "yes"
        except FileNotFoundError:
            path, row["present"] = None, "no"
        if check and path is not None:
            try:
                load_encoder(entry.name, checkpoint=path)
                row["check"] = "OK"
            except (ValueError, OSError, RuntimeError) as exc:
                row["check"], row["error"] = "failed", str(exc)
        rows.append(row)
    return rows
