"""Train crop samplers of a random resized crop: (top, left, h, w) of the box, drawn from a torch.Generator.

``mae`` (:func:`mae_crop_params`): MAE's ``util/crop.py`` (one draw), what MAE and the authors train with;
``torchvision`` (:func:`crop_params`): torchvision's ``RandomResizedCrop`` (ten tries, centre fallback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

__all__ = ["CROPS", "MAERandomResizedCrop", "crop_params", "mae_crop_params"]

#: Train crop samplers: ``mae`` (MAE's one-draw variant, the default) and ``torchvision`` (ten tries).
CROPS = ("mae", "torchvision")


def crop_params(
    generator: torch.Generator,
    width: int,
    height: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` drawing from ``generator``: (top, left, h, w) of the crop box.

    Same RNG calls in the same order as torchvision (float32 ``uniform_`` twice per try, then two ``randint``),
    so a generator in the state of the global RNG gives torchvision's crop exactly.
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)  # fallback: central crop
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def mae_crop_params(
    generator: torch.Generator | None,
    width: int,
    height: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """MAE's crop sampling (``util/crop.py``, after BYOL's TF code): (top, left, h, w) of the crop box.

    One draw: area fraction uniform in ``scale``, log aspect ratio uniform in log ``ratio``; w and h are the
    rounded sides of that box, then clamped to the image (so a box that does not fit becomes full width or full
    height, never a retry or a centre crop), then the position is uniform over the places the box fits. Draws
    from ``generator`` (None: torch's global RNG) in MAE's order, float32 ``uniform_`` twice then two ``randint``.
    Sides are at least 1 pixel (MAE's code would give 0 only on images of a few pixels).
    """
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
    aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
    w = min(max(int(round(math.sqrt(target_area * aspect_ratio))), 1), width)
    h = min(max(int(round(math.sqrt(target_area / aspect_ratio))), 1), height)
    top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
    left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
    return top, left, h, w


class MAERandomResizedCrop(T.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` with MAE's sampling (:func:`mae_crop_params`, global RNG)."""

    @staticmethod
    def get_params(img: Any, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
        width, height = F.get_image_size(img)
        return mae_crop_params(None, width, height, scale, ratio)
