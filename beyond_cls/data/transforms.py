"""Image transforms of the MAE evaluation protocol (validation and linear-probing train)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from beyond_cls.data.crops import CROPS, MAERandomResizedCrop

__all__ = [
    "EVAL_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "eval_resize_size", "eval_transform",
    "interpolation_mode", "train_transform", "unnormalized_eval_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: timm's default eval crop fraction (MAE's too): 224 crop from a 256 resize.
EVAL_CROP_PCT = 0.875
#: Eval resize interpolations (timm's --interpolation names).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's mode of an :data:`INTERPOLATIONS` name."""
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {name!r}")
    return InterpolationMode(name)


def eval_resize_size(img_size: int, crop_pct: float = EVAL_CROP_PCT) -> int:
    """The eval resize of the shorter side, ``floor(img_size / crop_pct)`` as timm computes it (224, 0.875 → 256)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct={crop_pct}: expected a value in (0, 1]")
    return math.floor(img_size / crop_pct)


def eval_transform(
    img_size: int = 224,
    crop_pct: float = EVAL_CROP_PCT,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> T.Compose:
    """MAE / timm validation transform: resize of the shorter side to ``floor(img_size / crop_pct)`` with
    ``interpolation`` (:data:`INTERPOLATIONS`), center crop img_size."""
    return T.Compose(
        [
            T.Resize(eval_resize_size(img_size, crop_pct), interpolation=interpolation_mode(interpolation)),
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


def unnormalized_eval_transform(img_size: int, crop: bool = True, crop_pct: float = EVAL_CROP_PCT,
                                interpolation: str = "bicubic") -> T.Compose:
    """MAE's evaluation geometry (resize to img_size / crop_pct, center crop; bicubic by default) or, with
    ``crop=False``, a resize to img_size x img_size (the WSOL protocol); pixels in [0, 1], normalized later per
    encoder."""
    mode = interpolation_mode(interpolation)
    if crop:
        steps = [T.Resize(eval_resize_size(img_size, crop_pct), interpolation=mode), T.CenterCrop(img_size)]
    else:
        steps = [T.Resize((img_size, img_size), interpolation=mode)]
    return T.Compose([*steps, T.ToTensor()])
