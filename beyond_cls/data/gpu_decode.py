"""Batched decode + view transform on a device (nvJPEG on CUDA, libjpeg-turbo on CPU).

The tensor twin of :func:`beyond_cls.data.augment.apply_train_params` / ``apply_eval_params``: same geometry,
separable bicubic antialiased resize in float32 rounded to uint8 levels after each pass (as PIL's), then flip
and normalize. EXIF orientation is not applied, as in the PIL path.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["decode_batch", "pil_rgb_tensor", "transform_batch"]

_DECODE_ERRORS = (RuntimeError, ValueError)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _decode_jpeg(data: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    with warnings.catch_warnings():  # deprecated in torchvision 0.29 in favour of torchcodec; still the nvJPEG path
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def pil_rgb_tensor(image: Image.Image) -> Tensor:
    """PIL image → uint8 [3, H, W] (RGB-converted; a channels-last view, no copy beyond the conversion)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _pil_decode(data: Tensor) -> Tensor:
    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return pil_rgb_tensor(image)


def decode_batch(
    encoded: Sequence[Tensor], paths: Sequence[str], device: torch.device | str
) -> tuple[list[Tensor | None], list[str | None]]:
    """Decode each entry to uint8 [3, H, W] on ``device``; returns (images, errors), None where undecodable.

    An entry is 1-D uint8 file bytes, or an already decoded uint8 [3, H, W] image (moved to ``device``). File
    bytes go through one batched ``decode_jpeg``; if that fails, each is retried alone on ``device``, then with
    PIL on the CPU (PNG or CMYK files named .jpg, JPEGs nvJPEG rejects), and only then reported as an error.
    """
    device = torch.device(device)
    images: list[Tensor | None] = [None] * len(encoded)
    errors: list[str | None] = [None] * len(encoded)
    jpeg = [i for i, t in enumerate(encoded) if t.dim() == 1]
    for i, t in enumerate(encoded):
        if t.dim() != 1:
            images[i] = t.to(device, non_blocking=True)
    try:
        for i, image in zip(jpeg, _decode_jpeg([encoded[i] for i in jpeg], device) if jpeg else []):
            images[i] = image
        return images, errors
    except _DECODE_ERRORS:
        pass  # no partial results: retry one by one
    for i in jpeg:
        try:
            images[i] = _decode_jpeg(encoded[i], device)
            continue
        except _DECODE_ERRORS as exc:
            first = exc
        try:
            images[i] = _pil_decode(encoded[i]).to(device)
        except _PIL_ERRORS as exc:
            errors[i] = f"cannot decode image {paths[i]}: {exc} (decode_jpeg: {str(first).splitlines()[-1]})"
    return images, errors


def _resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    # PIL's order: horizontal pass, rounded and clipped to uint8 levels, then vertical pass; a one-dimension
    # antialiased bicubic interpolate leaves the other dimension exact, and this matches PIL far more closely
    # (clipped overshoot at sharp edges) than one 2-D pass.
    x = image[None].float()
    if x.shape[-1] != size[1]:
        x = nnf.interpolate(x, size=(x.shape[-2], size[1]), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0, 255).round_()
    if x.shape[-2] != size[0]:
        x = nnf.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x[0]


def transform_batch(
    images: Sequence[Tensor],
    params: Tensor,
    *,
    train: bool,
    img_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Tensor:
    """uint8 [3, H, W] images (one device) → normalized [B, 3, img_size, img_size] views.

    ``params`` is [B, 5] int: train (top, left, h, w, flip) crops then resizes; eval (resize_h, resize_w, top,
    left, 0) resizes then crops, as in :mod:`beyond_cls.data.augment`.
    """
    if len(images) != len(params):
        raise ValueError(f"transform_batch: {len(images)} images but {len(params)} parameter rows")
    if not images:
        return torch.empty(0, 3, img_size, img_size, dtype=dtype)
    device = images[0].device
    views = []
    for image, (a, b, c, d, _) in zip(images, params.tolist()):
        if train:  # a, b, c, d = top, left, h, w
            views.append(_resize(image[:, a : a + c, b : b + d], (img_size, img_size)))
        else:  # a, b, c, d = resize_h, resize_w, top, left
            views.append(_resize(image, (a, b))[:, c : c + img_size, d : d + img_size])
    x = torch.stack(views).clamp_(0, 255).round_()
    if train:
        flip = params[:, 4].to(device=device, dtype=torch.bool)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    scale = 1.0 / (255.0 * torch.tensor(std, device=device))
    shift = torch.tensor(mean, device=device) / torch.tensor(std, device=device)
    x = (x * scale[:, None, None] - shift[:, None, None]).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
