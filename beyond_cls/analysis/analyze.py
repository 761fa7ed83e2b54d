"""The ``analyze`` job: stream a dataset through an encoder under the AttentionRecorder."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from beyond_cls.analysis.plots import plot_information_flow
from beyond_cls.analysis.recorder import AttentionRecorder
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.config import check_run_settings
from beyond_cls.data import ImageFolderDataset, default_num_workers, eval_transform, make_loader
from beyond_cls.models import load_encoder
from beyond_cls.runtime import autocast, resolve_device

STATS_FILE = "attention_stats.json"
PLOT_FILE = "attention_stats.png"


@dataclass
class AnalyzeConfig:
    """What ``beyond-cls analyze`` runs; every field is also a CLI flag and a YAML key."""

    model: str
    data: str
    out: str
    checkpoint: str | None = None
    checkpoint_format: str = "auto"
    arch: str | None = None
    source: str | None = None
    weights_dir: str | None = None
    split: str = "val"
    img_size: int = 224
    batch_size: int = 64
    max_images: int | None = None
    num_workers: int = field(default_factory=default_num_workers)
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check_run_settings(self)


def analyze(cfg: AnalyzeConfig) -> AttentionSummary:
    """Record the attention statistics of ``cfg.model`` over ``cfg.data``/``cfg.split``.

    Writes ``attention_stats.json`` and ``attention_stats.png`` into ``cfg.out`` and returns the
    summary. Images follow MAE's evaluation transform (resize 256 bicubic, center crop 224).
    """
    device = resolve_device(cfg.device)
    dataset = ImageFolderDataset(cfg.data, cfg.split, transform=eval_transform(cfg.img_size))
    if cfg.max_images is not None and cfg.max_images < len(dataset):
        dataset = Subset(dataset, range(cfg.max_images))
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers)
    model = load_encoder(
        cfg.model, cfg.checkpoint, checkpoint_format=cfg.checkpoint_format, arch=cfg.arch, img_size=cfg.img_size,
        source=cfg.source, weights_dir=cfg.weights_dir,
    ).to(device)

    start = time.perf_counter()
    with AttentionRecorder(model, name=cfg.model) as recorder, torch.inference_mode(), autocast(cfg.precision, device):
        for images, _ in tqdm(loader, desc=f"analyze {cfg.model}", unit="batch", disable=not cfg.progress):
            model.forward_features(images.to(device, non_blocking=True))
    summary = recorder.summary()
    seconds = time.perf_counter() - start

    out = Path(cfg.out)
    summary.save(out / STATS_FILE)
    plot_information_flow({cfg.model: summary}, out / PLOT_FILE)
    resolved = {**asdict(cfg), "encoder": asdict(model.beyond_cls_info)}  # incl. the sub-model (source) loaded
    (out / "analyze_config.json").write_text(json.dumps(resolved, indent=1, default=str))
    print(summary)
    print(f"{summary.num_images} images in {seconds:.1f} s ({summary.num_images / seconds:.1f} images/s) "
          f"on {device}; wrote {out / STATS_FILE} and {out / PLOT_FILE}")
    return summary
