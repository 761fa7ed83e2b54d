"""Image transforms of the MAE evaluation protocol (validation and linear-probing train)."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from beyond_cls.data.crops import CROPS, MAERandomResizedCrop

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "train_transform", "unnormalized_eval_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    img_size: int = 224,
    crop_pct: float = 224 / 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """MAE validation transform: bicubic resize of the shorter side to img_size/crop_pct, center crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct}: expected a value in (0, 1]")
    return T.Compose(
        [
            T.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def train_transform(
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop: str = "mae",
) -> T.Compose:
    """MAE linear-probing train transform: bicubic random resized crop, drawn as MAE's ``util/crop.py``
    (``crop="mae"``) or torchvision's ``RandomResizedCrop`` (``"torchvision"``), and horizontal flip."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    resized_crop = MAERandomResizedCrop if crop == "mae" else T.RandomResizedCrop
    return T.Compose(
        [
            resized_crop(img_size, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def unnormalized_eval_transform(img_size: int, crop: bool = True) -> T.Compose:
    """MAE's evaluation geometry (bicubic resize to img_size/0.875, center crop) or, with ``crop=False``, a
    bicubic resize to img_size x img_size (the WSOL protocol); pixels in [0, 1], normalized later per encoder."""
    if crop:
        steps = [T.Resize(int(img_size / (224 / 256)), interpolation=InterpolationMode.BICUBIC),
                 T.CenterCrop(img_size)]
    else:
        steps = [T.Resize((img_size, img_size), interpolation=InterpolationMode.BICUBIC)]
    return T.Compose([*steps, T.ToTensor()])
