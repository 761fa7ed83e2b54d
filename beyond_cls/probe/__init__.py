"""Linear probing of a frozen encoder with a bank of aggregation heads (the MAE protocol, distributed)."""

from __future__ import annotations

from beyond_cls.probe.bank import HeadBank, HeadEntry, build_aggregation, head_key, parse_heads
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.run import run, summarize
from beyond_cls.probe.trainer import NonFiniteLoss, Preempted, ProbeTrainer

__all__ = [
    "HeadBank",
    "HeadEntry",
    "NonFiniteLoss",
    "Preempted",
    "ProbeConfig",
    "ProbeTrainer",
    "build_aggregation",
    "head_key",
    "parse_heads",
    "run",
    "summarize",
]
