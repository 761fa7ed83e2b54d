"""``beyond-cls bench analyze``: images/s of the recorder pass vs plain inference, same model and batch."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from beyond_cls.analysis.recorder import AttentionRecorder
from beyond_cls.config import BATCH_SIZE, CHECKPOINT, DEVICE, IMG_SIZE, MODEL, PRECISION, STEPS, WARMUP, Settings
from beyond_cls.models import load_encoder
from beyond_cls.runtime import autocast, autocast_dtype, resolve_device


@dataclass(kw_only=True)
class BenchAnalyzeConfig(Settings):
    """Settings of ``beyond-cls bench analyze`` (random weights and inputs unless a checkpoint is given)."""

    model: str = MODEL("vit_base_patch16_224")
    checkpoint: str | None = CHECKPOINT(shown="random weights")
    img_size: int = IMG_SIZE()
    batch_size: int = BATCH_SIZE()
    steps: int = STEPS()
    warmup: int = WARMUP()
    device: str = DEVICE()
    precision: str = PRECISION()


def _throughput(model: nn.Module, images: torch.Tensor, steps: int, warmup: int, precision: str) -> float:
    sync = torch.cuda.synchronize if images.is_cuda else (lambda: None)
    with torch.inference_mode(), autocast(precision, images.device):
        for _ in range(warmup):
            model.forward_features(images)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model.forward_features(images)
        sync()
    return steps * images.shape[0] / (time.perf_counter() - start)


def bench_analyze(cfg: BenchAnalyzeConfig) -> dict[str, float]:
    """Measure plain ``forward_features`` and the same under :class:`AttentionRecorder`, interleaved."""
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(cfg.precision, device)
    model = load_encoder(cfg.model, cfg.checkpoint, img_size=cfg.img_size).to(device)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)

    plain, recorded = [], []
    for _ in range(2):  # interleave so drift (clocks, other load) hits both alike
        plain.append(_throughput(model, images, cfg.steps, cfg.warmup, cfg.precision))
        with AttentionRecorder(model):
            recorded.append(_throughput(model, images, cfg.steps, cfg.warmup, cfg.precision))
    result = {
        "plain_images_per_s": max(plain),
        "recorder_images_per_s": max(recorded),
    }
    result["ratio"] = result["recorder_images_per_s"] / result["plain_images_per_s"]
    print(
        f"{cfg.model} batch {cfg.batch_size} on {device} ({dtype or torch.float32}): plain "
        f"{result['plain_images_per_s']:.1f} images/s, recorder {result['recorder_images_per_s']:.1f} images/s, "
        f"ratio {result['ratio']:.3f}"
    )
    return result
