"""``beyond-cls demo``: the embedded synthetic set, analyzed and probed with a small ViT in a few minutes."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from beyond_cls.analysis.analyze import AnalyzeConfig, analyze
from beyond_cls.config import MODEL, OUT, EncoderSettings, NormalizedSettings, RunSettings
from beyond_cls.data import make_synthetic_dataset
from beyond_cls.probe import ProbeConfig, run

DEMO_MODEL = "vit_tiny_patch16_224"
# The demo's probe: the Table 1 heads on cached tokens of 2 augmented views, a few short epochs.
DEMO_PROBE = dict(heads="cls,mean,abmilp", epochs=12, warmup_epochs=2, batch_size=32, effective_batch=32,
                  cache_views=2, optimizer="sgd", blr=0.5)
# The demo's settings that its probe takes as well (besides the encoder's).
PROBE_KEYS = ("num_workers", "device", "precision", "progress", "mean", "std")


@dataclass(kw_only=True)
class DemoConfig(EncoderSettings, RunSettings, NormalizedSettings):
    """What ``beyond-cls demo`` runs: the encoder (random weights unless a checkpoint) and how to run it."""

    model: str = MODEL(DEMO_MODEL)
    out: str = OUT(os.path.join("runs", "demo"))


def demo(cfg: DemoConfig) -> dict[str, Any]:
    """Write the synthetic set into the cache, analyze ``cfg.model`` on it into ``cfg.out``, then probe it with
    [cls], mean and AbMILP heads into ``cfg.out``/probe; returns the probe's results."""
    root = make_synthetic_dataset()
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    analyze(AnalyzeConfig(data=str(root), **values))
    probe = {k: values[k] for k in (*(f.name for f in fields(EncoderSettings)), *PROBE_KEYS)}
    out = Path(cfg.out)
    return run(ProbeConfig(data=str(root), out=str(out / "probe"), cache=str(out / "cache"), **DEMO_PROBE, **probe))
