"""Score maps for the metric: OpenCV-exact resize, per-image normalization, quantized levels."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DEFAULT_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
INTERPOLATIONS = ("bicubic", "bilinear")


def default_cam_thresholds(step: float = 0.01) -> Tensor:
    """``np.arange(0, 1, step)`` as float64 (0.00, 0.01, ..., 0.99; the official default step is 0.001).

    numpy's values, not ``torch.arange``'s, which differ in the last bit (0.13999999999999999 vs 0.14)."""
    return torch.from_numpy(np.arange(0.0, 1.0, step, dtype=np.float64))


def _taps(out_len: int, in_len: int, interpolation: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Source indices and weights ([K, out_len] each) of ``cv2.resize`` along one axis."""
    scale = 1.0 / (out_len / in_len)  # OpenCV: scale_x = 1 / inv_scale_x, inv_scale_x = dsize / ssize
    d = torch.arange(out_len, dtype=torch.float64, device=device)
    if interpolation == "bicubic":
        # OpenCV rounds the source position to float32 and computes the cubic weights in float32 (A = -0.75)
        fx = ((d + 0.5) * scale - 0.5).to(torch.float32)
        sx = torch.floor(fx)
        x = fx - sx
        a = -0.75
        c0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
        c1 = ((a + 2) * x - (a + 3)) * x * x + 1
        c2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
        c3 = 1 - c0 - c1 - c2
        coef = torch.stack([c0, c1, c2, c3]).to(torch.float64)
        idx = sx.to(torch.int64)[None] + torch.arange(-1, 3, device=device)[:, None]
    elif interpolation == "bilinear":
        fx = (d + 0.5) * scale - 0.5
        sx = torch.floor(fx)
        x = fx - sx
        low, high = sx < 0, sx >= in_len - 1
        x = torch.where(low | high, 0.0, x)
        sx = sx.clamp(0, in_len - 1)
        coef = torch.stack([1 - x, x])
        idx = sx.to(torch.int64)[None] + torch.arange(0, 2, device=device)[:, None]
    else:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")
    return idx.clamp(0, in_len - 1), coef


def resize_maps(maps: Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> Tensor:
    """Resize ``[B, h, w]`` maps to ``size = (H, W)`` in float64 as ``cv2.resize`` does (replicated border).

    ``bicubic`` (``cv2.INTER_CUBIC``, what the official evaluation uses) is bit-identical to OpenCV;
    ``bilinear`` (``cv2.INTER_LINEAR``) agrees to about 1e-16.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be [B, h, w]; got shape {tuple(maps.shape)}")
    out_h, out_w = (int(s) for s in size)
    maps = maps.to(torch.float64)
    in_h, in_w = maps.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):  # cv2.resize copies
        return maps.clone()
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")
    ix, cx = _taps(out_w, in_w, interpolation, maps.device)
    iy, cy = _taps(out_h, in_h, interpolation, maps.device)
    # horizontal pass then vertical, each summed tap by tap in OpenCV's order
    rows = maps[:, :, ix[0]] * cx[0]
    for k in range(1, ix.shape[0]):
        rows = rows + maps[:, :, ix[k]] * cx[k]
    out = rows[:, iy[0], :] * cy[0][:, None]
    for k in range(1, iy.shape[0]):
        out = out + rows[:, iy[k], :] * cy[k][:, None]
    return out


def _normalize(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-map min-max normalization (float64) and which maps were constant or not finite (now all zeros)."""
    flat = maps.flatten(1)
    if flat.shape[1] == 0:
        raise ValueError("maps are empty")
    low, high = flat.amin(1), flat.amax(1)
    flat_zero = ~torch.isfinite(flat).all(1) | (low == high)
    span = torch.where(flat_zero, 1.0, high - low)
    out = (maps - low[:, None, None]) / span[:, None, None]
    return torch.where(flat_zero[:, None, None], 0.0, out), flat_zero


def prepare_maps(maps: Tensor, image_size: tuple[int, int] = (224, 224), interpolation: str = "bicubic") -> Tensor:
    """``[B, h, w]`` maps -> resized to ``image_size = (H, W)`` and min-max normalized to [0, 1] (float64)."""
    return _normalize(resize_maps(maps, image_size, interpolation))[0]


def _level_index(maps: Tensor, cam_thresholds: Tensor, image_size, interpolation) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize maps against the thresholds' distinct levels.

    Returns ``s`` [B, H, W] (pixel is foreground at level ``u`` iff ``s > u``), the sorted distinct levels
    ``int(255 t)`` [U], and each threshold's level index [T].
    """
    resized = resize_maps(maps, image_size, interpolation)
    normalized, constant = _normalize(resized)
    q = (normalized * 255).to(torch.uint8).to(torch.int64)  # astype(np.uint8): truncation
    # int(t * max(q)) with max(q) = 255 (normalized maps reach 1.0); -1 and 255 stand for "all" and "none"
    k = torch.trunc(cam_thresholds.to(torch.float64) * 255).clamp(-1, 255).to(torch.int64)
    levels, inverse = torch.unique(k, sorted=True, return_inverse=True)
    levels, inverse = levels.to(maps.device), inverse.to(maps.device)
    lut = torch.searchsorted(levels, torch.arange(256, device=maps.device))  # number of levels below q
    s = lut[q]
    s[constant] = 0  # max(q) = 0: int(t * 0) = 0 and q > 0 is empty at every threshold
    return s, levels, inverse
