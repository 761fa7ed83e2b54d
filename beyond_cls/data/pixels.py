"""PIL image → 8-bit RGB, including high-bit-depth modes that ``Image.convert("RGB")`` clips to white."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_rgb"]

_UINT16_MAX = 65535


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit, 32-bit integer and float grey modes are rescaled, not clipped.

    ``I;16*`` (16-bit PNG/TIFF) and ``I`` holding 0..65535 keep the top 8 bits (as PIL decodes 16-bit RGB
    PNGs). ``F`` in [0, 1] is scaled by 255, in [0, 255] rounded. Anything else (negative or wider values)
    is stretched min..max to 0..255; NaN and inf count as 0.
    """
    if image.mode not in ("F", "I") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode != "F" and lo >= 0 and hi <= _UINT16_MAX:
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    elif image.mode == "F" and lo >= 0 and hi <= 255:
        scale = 255.0 if hi <= 1 else 1.0
        grey = np.rint(values * scale).astype(np.uint8)
    else:
        span = hi - lo if hi > lo else 1.0
        grey = np.rint((values.astype(np.float64) - lo) * (255.0 / span)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
