"""Reproducible augmentation geometry: crop boxes and flips as a pure function of (seed, view, index).

The train view is a random resized crop + ``RandomHorizontalFlip`` (MAE linear probing), the crop drawn as MAE's
``util/crop.py`` does (``crop="mae"``, the default: what MAE and the authors train with) or as torchvision's
``RandomResizedCrop`` (``crop="torchvision"``); the eval view is resize-shorter-side + center crop. Both are split
into *parameters* (computed from the image size only, so a loader worker can compute them from the file header)
and *application* (PIL here, tensors in :mod:`beyond_cls.data.gpu_decode`), so every decoding path sees the same
geometry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from beyond_cls.data.crops import CROPS, MAERandomResizedCrop, crop_params, mae_crop_params
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, interpolation_mode

__all__ = [
    "CROPS",
    "MAERandomResizedCrop",
    "apply_eval_params",
    "apply_train_params",
    "crop_params",
    "eval_params",
    "mae_crop_params",
    "sample_generator",
    "train_params",
]


def sample_generator(seed: int, view: int, index: int) -> torch.Generator:
    """CPU generator seeded by a BLAKE2b hash of (seed, view, index): stable across processes, runs and machines."""
    digest = hashlib.blake2b(f"{seed},{view},{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def train_params(
    seed: int, view: int, index: int, width: int, height: int, crop: str = "mae"
) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of one train view, the crop drawn as ``crop`` (:data:`CROPS`) says; the flip (p=0.5)
    is drawn after the crop, as torchvision does."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    generator = sample_generator(seed, view, index)
    sample = mae_crop_params if crop == "mae" else crop_params
    top, left, h, w = sample(generator, width, height)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return top, left, h, w, flip


def eval_params(width: int, height: int, img_size: int = 224, resize_size: int = 256) -> tuple[int, int, int, int]:
    """(resize_h, resize_w, top, left): the output size of ``Resize(resize_size)``, then ``CenterCrop(img_size)``
    (``resize_size``: :func:`~beyond_cls.data.transforms.eval_resize_size` of img_size and crop_pct)."""
    if resize_size < img_size:
        raise ValueError(f"eval_params: resize_size={resize_size} is smaller than img_size={img_size}")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize_size * long / short)
    resize_w, resize_h = (resize_size, new_long) if width <= height else (new_long, resize_size)
    top = int(round((resize_h - img_size) / 2.0))
    left = int(round((resize_w - img_size) / 2.0))
    return resize_h, resize_w, top, left


def apply_train_params(
    image: Image.Image,
    params: Sequence[int | bool],
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Crop box, bicubic antialiased resize to img_size², flip, normalize: float tensor [3, img_size, img_size]."""
    top, left, h, w, flip = params
    image = F.resized_crop(
        image, top, left, h, w, [img_size, img_size], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    if flip:
        image = F.hflip(image)
    return F.normalize(F.to_tensor(image), mean, std)


def apply_eval_params(
    image: Image.Image,
    params: Sequence[int],
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize to (resize_h, resize_w) with ``interpolation`` (bicubic: MAE's and timm's), crop img_size² at (top,
    left), normalize (= ``eval_transform``)."""
    resize_h, resize_w, top, left = params
    image = F.resize(image, [resize_h, resize_w], interpolation=interpolation_mode(interpolation), antialias=True)
    image = F.crop(image, top, left, img_size, img_size)
    return F.normalize(F.to_tensor(image), mean, std)
