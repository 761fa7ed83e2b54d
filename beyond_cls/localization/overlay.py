"""Overlays of maps and boxes on images (paper Fig. 8)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from beyond_cls.localization.maps import prepare_maps
from beyond_cls.localization.voc import scale_boxes

#: The overlays' colormap: perceptually uniform (light = high), readable in grey scale.
MAP_CMAP = "viridis"
MAP_LABEL = "map value (min–max normalized)"


def _colorize(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] float RGB in [0, 1] through :data:`MAP_CMAP`."""
    from matplotlib import colormaps

    return colormaps[MAP_CMAP](values)[..., :3]


def _to_pil(image: Image.Image | Tensor) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() not in (2, 3):
        raise TypeError("image must be a PIL image or a uint8 tensor [3, H, W], [H, W, 3] or [H, W]")
    array = image.detach().cpu()
    if array.dim() == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.permute(1, 2, 0)
    array = array.numpy()
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def draw_overlay(
    image: Image.Image | Tensor,
    heatmap: Tensor | None,
    gt_boxes: Tensor | None,
    pred_boxes: Mapping[str, tuple[Tensor | Sequence[int], str | tuple[int, int, int]]] | None = None,
    *,
    boxes_size: tuple[int, int] | None = None,
    alpha: float = 0.5,
    gt_color: str | tuple[int, int, int] = (0, 0, 255),
    width: int = 2,
) -> Image.Image:
    """The image with ``heatmap`` (any resolution; resized bicubically and min-max normalized) blended in as a
    :data:`MAP_CMAP` overlay of opacity ``alpha``, ground-truth boxes in blue and each named prediction in its colour
    (Fig. 8: red for [cls], green for Selective Aggregation). Boxes are x0y0x1y1 with inclusive ends, in
    ``boxes_size = (width, height)`` pixels (None: the image's own), e.g. (224, 224) for evaluation boxes."""
    img = _to_pil(image)
    w, h = img.size
    if heatmap is not None:
        heat = torch.as_tensor(heatmap).detach().cpu()
        if heat.dim() == 3 and heat.shape[0] == 1:
            heat = heat[0]
        if heat.dim() != 2:
            raise ValueError(f"heatmap must be [h, w]; got shape {tuple(heat.shape)}")
        values = prepare_maps(heat[None], (h, w))[0].numpy()
        base = np.asarray(img, dtype=np.float64) / 255.0
        mixed = (1 - alpha) * base + alpha * _colorize(values)
        img = Image.fromarray(np.round(mixed * 255).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)

    def boxes_px(boxes) -> list[list[int]]:
        b = torch.as_tensor(boxes).reshape(-1, 4)
        if boxes_size is not None and tuple(boxes_size) != (w, h):
            b = scale_boxes(b, boxes_size, (w, h))
        return b.to(torch.int64).tolist()

    entries = [] if gt_boxes is None else [(gt_boxes, gt_color)]
    entries += list((pred_boxes or {}).values())
    for boxes, color in entries:
        for x0, y0, x1, y1 in boxes_px(boxes):
            draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=color, width=width)
    return img


def _rgb(color: str | tuple[int, int, int]) -> tuple[float, float, float]:
    """A PIL colour (name or 0-255 RGB) as matplotlib's 0-1 RGB."""
    rgb = ImageColor.getrgb(color) if isinstance(color, str) else color
    return tuple(c / 255.0 for c in rgb[:3])


def overlay_figure(
    image: Image.Image | Tensor,
    heatmap: Tensor | None,
    gt_boxes: Tensor | None,
    pred_boxes: Mapping[str, tuple[Tensor | Sequence[int], str | tuple[int, int, int]]] | None = None,
    *,
    title: str,
    boxes_size: tuple[int, int] | None = None,
    gt_color: str | tuple[int, int, int] = (0, 0, 255),
    gt_label: str = "ground truth",
) -> Figure:
    """:func:`draw_overlay`'s picture on a figure with ``title``, a colour bar of the map (when ``heatmap``) and,
    below the image (covering none of it), a legend naming each box colour: ``gt_label`` and the keys of
    ``pred_boxes``."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    picture = draw_overlay(image, heatmap, gt_boxes, pred_boxes, boxes_size=boxes_size, gt_color=gt_color)
    entries = ([] if gt_boxes is None else [(gt_label, gt_color)])
    entries += [(name, color) for name, (_, color) in (pred_boxes or {}).items()]
    longest = max((len(label) for label, _ in entries), default=0)  # legend text at 7 pt: about 0.055 in a letter
    width = max(3.6 + 0.7 * (heatmap is not None), 0.055 * longest + 0.9)
    fig = Figure(figsize=(width, 3.1 + 0.2 * len(entries)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(picture)
    ax.set_axis_off()
    if heatmap is not None:
        bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), MAP_CMAP), ax=ax, fraction=0.06, pad=0.03)
        bar.set_label(MAP_LABEL, fontsize=7)
        bar.ax.tick_params(labelsize=6)
    ax.set_title(title, fontsize=8, wrap=True)
    if entries:
        handles = [Patch(facecolor="none", edgecolor=_rgb(color), linewidth=2, label=label) for label, color in entries]
        fig.legend(handles=handles, loc="outside lower center", fontsize=7, frameon=False)
    return fig
