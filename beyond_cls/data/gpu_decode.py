"""Batched decode + view transform on a device (nvJPEG on CUDA, libjpeg-turbo on CPU).

The tensor twin of :func:`beyond_cls.data.augment.apply_train_params` / ``apply_eval_params``: same geometry,
separable bicubic antialiased resize in float32 rounded to uint8 levels after each pass (as PIL's), then flip
and normalize. EXIF orientation is not applied, as in the PIL path.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from beyond_cls.data.pixels import to_rgb
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["decode_batch", "pil_rgb_tensor", "transform_batch"]

_DECODE_ERRORS = (RuntimeError, ValueError)
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


_DECODE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream (one per device) that is current while nvJPEG's outputs are allocated."""
    if device not in _DECODE_STREAMS:
        _DECODE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _DECODE_STREAMS[device]


def _decode_jpeg(data: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    with warnings.catch_warnings():  # deprecated in torchvision 0.29 in favour of torchcodec; still the nvJPEG path
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        if device.type != "cuda":
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return _decode_jpeg_cuda(data, device)


def _decode_jpeg_cuda(data: Tensor | list[Tensor], device: torch.device) -> Tensor | list[Tensor]:
    """nvJPEG decode that cannot overwrite memory the caller's queued kernels still read.

    torchvision's CUDA ``decode_jpeg`` allocates its outputs on the *current* stream, then writes them from a
    private stream that does not wait for the current one (pytorch/vision#9606). On the caller's stream the
    caching allocator hands out blocks freed there whose readers are still queued, so the decoder can
    overwrite them. Here the
    outputs are allocated while a side stream that only ever holds decoder outputs is current, and each is
    marked as used by the caller's stream: the allocator returns its block to the side pool only once the
    caller's kernels queued before the free have finished (an event checked on the host, so no stream order is
    relied on). No host sync: the caller's stream just waits for the side stream, which torchvision already
    orders after the decoder's work.
    """
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    caller = torch.cuda.current_stream(device)
    side = _decode_stream(device)
    with torch.cuda.stream(side):
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    caller.wait_stream(side)
    for image in out if isinstance(out, list) else [out]:
        image.record_stream(caller)
    return out


def pil_rgb_tensor(image: Image.Image) -> Tensor:
    """PIL image → uint8 [3, H, W] (:func:`to_rgb`-converted; a channels-last view, no copy beyond that)."""
    return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1)


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
    for image, (a, b, c, d, flip) in zip(images, params.tolist()):  # params is a CPU tensor: no device sync
        if train:  # a, b, c, d = top, left, h, w
            view = _resize(image[:, a : a + c, b : b + d], (img_size, img_size))
            views.append(view.flip(-1) if flip else view)  # the flip is known here: no mask to send to the device
        else:  # a, b, c, d = resize_h, resize_w, top, left
            views.append(_resize(image, (a, b))[:, c : c + img_size, d : d + img_size])
    x = torch.stack(views).clamp_(0, 255).round_()
    scale, shift = _normalization(device, tuple(map(float, mean)), tuple(map(float, std)))
    x = (x * scale - shift).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@functools.lru_cache(maxsize=32)
def _normalization(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(1 / (255 std), mean / std) as [3, 1, 1] float32 on ``device``, sent there once per (device, mean, std).

    Computed on the CPU in float32: IEEE division and multiplication round the same on every device.
    """
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = 1.0 / (255.0 * std_t)
    shift = torch.tensor(mean, dtype=torch.float32) / std_t
    return scale[:, None, None].to(device), shift[:, None, None].to(device)
