"""Reproducible augmentation geometry: crop boxes and flips as a pure function of (seed, view, index).

The train view is torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip`` (MAE linear probing), the eval
view is resize-shorter-side + center crop; both are split into *parameters* (computed from the image size only,
so a loader worker can compute them from the file header) and *application* (PIL here, tensors in
:mod:`beyond_cls.data.gpu_decode`), so every decoding path sees the same geometry.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "apply_eval_params",
    "apply_train_params",
    "crop_params",
    "eval_params",
    "sample_generator",
    "train_params",
]


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


def sample_generator(seed: int, view: int, index: int) -> torch.Generator:
    """CPU generator seeded by a BLAKE2b hash of (seed, view, index): stable across processes, runs and machines."""
    digest = hashlib.blake2b(f"{seed},{view},{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def train_params(seed: int, view: int, index: int, width: int, height: int) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of one train view; the flip (p=0.5) is drawn after the crop, as torchvision does."""
    generator = sample_generator(seed, view, index)
    top, left, h, w = crop_params(generator, width, height)
    flip = bool(torch.rand(1, generator=generator).item() < 0.5)
    return top, left, h, w, flip


def eval_params(width: int, height: int, img_size: int = 224, resize_size: int = 256) -> tuple[int, int, int, int]:
    """(resize_h, resize_w, top, left): the output size of ``Resize(resize_size)``, then ``CenterCrop(img_size)``."""
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
) -> torch.Tensor:
    """Bicubic resize to (resize_h, resize_w), crop img_size² at (top, left), normalize (= ``eval_transform``)."""
    resize_h, resize_w, top, left = params
    image = F.resize(image, [resize_h, resize_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    image = F.crop(image, top, left, img_size, img_size)
    return F.normalize(F.to_tensor(image), mean, std)
