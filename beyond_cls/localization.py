"""MaxBoxAccV2 (Choe et al., CVPR 2020) for attention / score maps: vectorized, and exact to the official code.

Used for Appendix C.3 of the paper (Tab. 7/8, Fig. 8): boxes from [cls] attention and Selective Aggregation
scores against ImageNet-val ground truth. Every convention below was read off clovaai/wsolevaluation
(``inference.py``: ``CAMComputer.compute_and_evaluate_cams``, ``normalize_scoremap``; ``evaluation.py``:
``compute_bboxes_from_scoremaps``, ``calculate_multiple_iou``, ``resize_bbox``, ``BoxEvaluator``) and checked
against OpenCV on random maps:

* resize: ``cv2.resize(cam, (W, H), interpolation=cv2.INTER_CUBIC)`` -- *bicubic*, not bilinear (half-pixel
  centres, i.e. ``align_corners=False``, a = -0.75, replicated border). :func:`resize_maps` reproduces OpenCV's
  float32 tap positions and coefficients, so the float64 result is bit-identical to OpenCV's.
* normalize after resizing: ``(x - min) / (max - min)``; a constant map (or one with a NaN) becomes all zeros.
* threshold: the map is quantized ``q = uint8(255 * s)`` (truncation) and a pixel is foreground when
  ``q > int(t * max(q))`` (``cv2.THRESH_BINARY`` is strict). So even ``t = 0`` drops pixels with ``s < 1/255``, a
  constant map never has a foreground, and thresholds only matter through ``int(255 t)``.
* boxes: ``cv2.findContours(RETR_TREE)`` with ``multi_contour_eval=True`` (v2) keeps *every* contour: the outer
  border of each 8-connected foreground component *and* the border of each hole (a 4-connected background
  component that does not reach the image edge; OpenCV >= 3.2 pads the image, so pixels on the edge count). A
  contour's ``boundingRect`` covers the foreground pixels it runs through: a component's pixels, or a hole grown
  by one pixel. Its box is then ``[x, y, x + w, y + h]`` with ``x + w`` / ``y + h`` clipped to ``W - 1`` /
  ``H - 1``, i.e. one pixel past the last foreground pixel on the right and bottom. No contour: ``[0, 0, 0, 0]``.
* IoU: pixel-inclusive ends (areas ``(x1 - x0 + 1) * (y1 - y0 + 1)``), for predictions and ground truth alike.
* ground truth: the XML corners as written (ImageNet: ``val_00000001`` -> 111, 108, 441, 193, as in the
  official metadata), resized to 224 x 224 as ``int(x * 224 / width)`` (no crop).
* an image counts at IoU threshold d when the best IoU over all (estimated, ground-truth) box pairs is >= d;
  MaxBoxAcc(d) is the best fraction over CAM thresholds, MaxBoxAccV2 the mean over d = 0.3, 0.5, 0.7.

Connected components are not found pixel by pixel: each map's rows are cut into runs for all thresholds at
once (a run starts or ends where the quantized map crosses a level), runs of neighbouring rows that touch are
joined by a batched union-find (min-root hooking + pointer jumping), and boxes are segment min/max over runs.
Everything is torch ops over the whole batch and all thresholds, on the maps' device. On one CPU core a smooth
14 x 14 attention map at 224 x 224 with 100 thresholds takes about 45 ms (noise maps with thousands of runs per
level take 10x more); ``chunk_size`` bounds the memory.

Sizes: ``image_size`` is ``(H, W)`` like the maps; :func:`scale_boxes` and the XML sizes are ``(width, height)``
like the boxes' ``x, y``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from beyond_cls.data.folder import DataError

__all__ = [
    "DEFAULT_IOU_THRESHOLDS",
    "MaxBoxAccV2Accumulator",
    "VocAnnotation",
    "best_boxes",
    "best_ious",
    "box_iou",
    "default_cam_thresholds",
    "draw_overlay",
    "label_components",
    "load_voc_boxes",
    "max_box_acc_v2",
    "prepare_maps",
    "read_voc_annotation",
    "read_voc_boxes",
    "resize_maps",
    "scale_boxes",
]

DEFAULT_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
INTERPOLATIONS = ("bicubic", "bilinear")


def default_cam_thresholds(step: float = 0.01) -> Tensor:
    """``np.arange(0, 1, step)`` as float64 (0.00, 0.01, ..., 0.99; the official default step is 0.001).

    numpy's values, not ``torch.arange``'s, which differ in the last bit (0.13999999999999999 vs 0.14)."""
    return torch.from_numpy(np.arange(0.0, 1.0, step, dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------------
# Score maps: OpenCV-exact resize, normalization, quantization


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


# ----------------------------------------------------------------------------------------------------------------
# Runs, union-find, components


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values[index]`` along dim 0 (``index_select``: several times faster than advanced indexing on CPU)."""
    return values.index_select(0, index)


def _expand(lo: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """For ranges ``[lo_i, lo_i + count_i)``: (which range, value) of every element, ranges in order."""
    total = int(count.sum())
    which = torch.repeat_interleave(count, output_size=total)
    first = torch.cumsum(count, 0) - count
    value = torch.repeat_interleave(lo - first, count, output_size=total)
    return which, value + torch.arange(total, device=lo.device)


@dataclass
class _Runs:
    """Horizontal runs of one kind (foreground or background), sorted by (group, row, column)."""

    key_start: Tensor  # ((group * H + y) * stride + start + 2), sorted
    key_end: Tensor
    group: Tensor  # n * U + u
    y: Tensor
    start: Tensor  # first pixel, inclusive
    end: Tensor  # last pixel, inclusive


def _runs(s: Tensor, num_levels: int, background: bool) -> _Runs:
    """Runs of ``s > u`` (foreground) or ``s <= u`` (background) for every map and level index ``u``.

    Between neighbours ``a = s[x - 1]`` and ``b = s[x]`` of a row padded with 0 (never foreground), a foreground
    run starts at ``x`` for the levels ``a <= u < b`` and ends at ``x - 1`` for ``b <= u < a``. Background is the
    same with the roles of rising and falling edges swapped, padded with ``num_levels`` (never background).
    """
    n, h, w = s.shape
    stride, plane = w + 4, h * (w + 4)
    pad = num_levels if background else 0
    padded = torch.nn.functional.pad(s, (1, 1), value=pad)
    a = padded[..., :-1].reshape(-1)  # [n, h, w + 1] flattened; pair i sits between pixels i - 1 and i
    step = (padded[..., 1:] - padded[..., :-1]).reshape(-1)

    def events(rising: bool, shift: int) -> Tensor:
        flat = ((step > 0) if rising else (step < 0)).nonzero(as_tuple=True)[0]
        lo, count = _take(a, flat), _take(step, flat).abs()
        if not rising:
            lo = lo - count
        row, x = flat // (w + 1), flat % (w + 1)  # row = map * h + y
        # key = ((map * U + u) * h + y) * stride + x + shift + 2 for u in [lo, lo + count)
        base = ((row // h) * num_levels * h + row % h) * stride + x + shift + 2 + lo * plane
        total = int(count.sum())
        first = torch.cumsum(count, 0) - count
        keys = torch.repeat_interleave(base - first * plane, count, output_size=total)
        return torch.sort(keys + torch.arange(total, device=s.device) * plane).values

    key_start = events(not background, 0)
    key_end = events(background, -1)
    row = key_start // stride
    return _Runs(key_start, key_end, row // h, row % h, key_start % stride - 2, key_end % stride - 2)


def _edges(runs: _Runs, h: int, w: int, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Pairs of runs on neighbouring rows of the same map and level that touch (8- or 4-connectivity)."""
    stride, d = w + 4, int(diagonal)
    above = (runs.key_start // stride - 1) * stride + 2
    lo = torch.searchsorted(runs.key_end, above + runs.start - d, side="left")  # end >= start - d
    hi = torch.searchsorted(runs.key_start, above + runs.end + d, side="right")  # start <= end + d
    count = torch.where(runs.y > 0, (hi - lo).clamp(min=0), 0)
    which, other = _expand(lo, count)
    return which, other


def _union_find(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """Root (smallest member) of every node's component: min-root hooking + pointer jumping until stable."""
    parent = torch.arange(n, device=src.device)
    ps, pd = src, dst  # every node is its own root at first
    while ps.numel():
        parent.scatter_reduce_(0, torch.maximum(ps, pd), torch.minimum(ps, pd), "amin")
        # pointer jumping on the nodes not yet pointing at a root (a set that shrinks geometrically)
        active = (_take(parent, parent) != parent).nonzero(as_tuple=True)[0]
        while active.numel():
            up = _take(parent, _take(parent, active))
            parent.index_copy_(0, active, up)
            active = active.masked_select(_take(parent, up) != up)
        ps, pd = _take(parent, src), _take(parent, dst)
        open_ = ps != pd
        src, dst = src.masked_select(open_), dst.masked_select(open_)  # joined edges stay joined
        ps, pd = ps.masked_select(open_), pd.masked_select(open_)
    return parent


@dataclass
class _Candidates:
    """Estimated boxes of all maps and levels: one per foreground component and one per hole."""

    group: Tensor  # [M] n * U + u
    boxes: Tensor  # [M, 4] int64, official convention (right/bottom one past the last pixel, clipped)
    area: Tensor  # [M] pixels of the component (holes: 0)


def _segment(values: Tensor, index: Tensor, n: int, reduce: str) -> Tensor:
    init = torch.iinfo(torch.int64).max if reduce == "amin" else torch.iinfo(torch.int64).min
    out = torch.full((n,), init, dtype=torch.int64, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce)


def _candidates(s: Tensor, num_levels: int, holes: bool = True) -> _Candidates:
    """Boxes of every contour ``cv2.findContours(RETR_TREE)`` would return, for every map and level."""
    _, h, w = s.shape
    device = s.device
    fg = _runs(s, num_levels, background=False)
    src, dst = _edges(fg, h, w, diagonal=True)  # foreground is 8-connected
    num_fg = fg.start.numel()
    parts = [(fg.group, fg.y, fg.start, fg.end)]
    outside = [torch.zeros(num_fg, dtype=torch.bool, device=device)]
    if holes:
        bg = _runs(s, num_levels, background=True)
        a, b = _edges(bg, h, w, diagonal=False)  # background is 4-connected
        # Only runs away from the image edge can be part of a hole, so only they join the union-find; an inner
        # run next to one that reaches the edge is outside too, and so is its whole component.
        edge = (bg.start == 0) | (bg.end == w - 1) | (bg.y == 0) | (bg.y == h - 1)
        inner = (~edge).nonzero(as_tuple=True)[0]
        index = torch.full_like(bg.start, -1)
        index.index_copy_(0, inner, torch.arange(inner.numel(), device=device) + num_fg)
        edge_a, edge_b = _take(edge, a), _take(edge, b)
        both = ~edge_a & ~edge_b
        src = torch.cat([src, _take(index, a.masked_select(both))])
        dst = torch.cat([dst, _take(index, b.masked_select(both))])
        near_edge = torch.zeros_like(edge)
        near_edge.index_fill_(0, torch.where(edge_a, b, a).masked_select(edge_a ^ edge_b), True)
        parts.append(tuple(_take(v, inner) for v in (bg.group, bg.y, bg.start, bg.end)))
        outside.append(_take(near_edge, inner))
    group, y, start, end = (torch.cat(columns) for columns in zip(*parts))
    n = start.numel()
    root = _union_find(n, src, dst)
    x0, x1 = _segment(start, root, n, "amin"), _segment(end, root, n, "amax")
    y1 = _segment(y, root, n, "amax")
    area = torch.zeros(n, dtype=torch.int64, device=device).scatter_add_(0, root, end - start + 1)
    outside = _segment(torch.cat(outside).to(torch.int64), root, n, "amax") > 0
    keep = (root == torch.arange(n, device=device)) & ~outside
    # a root is its component's first run, so its row is the top row
    r = keep.nonzero(as_tuple=True)[0]
    hole = r >= num_fg
    grow = hole.to(torch.int64)  # a hole's contour runs through the foreground pixels around it
    boxes = torch.stack(
        [
            _take(x0, r) - grow,
            _take(y, r) - grow,
            torch.clamp(_take(x1, r) + 1 + grow, max=w - 1),
            torch.clamp(_take(y1, r) + 1 + grow, max=h - 1),
        ],
        1,
    )
    return _Candidates(_take(group, r), boxes, torch.where(hole, 0, _take(area, r)))


def label_components(masks: Tensor, connectivity: int = 8) -> Tensor:
    """Connected components of boolean ``[..., H, W]`` masks: each pixel gets the raster index ``y * W + x`` of
    its component's first pixel, background -1. Same runs + union-find as the box extraction."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}; expected 4 or 8")
    if masks.dim() < 2:
        raise ValueError(f"masks must be [..., H, W]; got shape {tuple(masks.shape)}")
    shape = masks.shape
    h, w = shape[-2:]
    s = masks.reshape(-1, h, w).to(torch.int64)
    runs = _runs(s, 1, background=False)
    src, dst = _edges(runs, h, w, diagonal=connectivity == 8)
    n = runs.start.numel()
    root = _union_find(n, src, dst)
    label = _take(runs.y, root) * w + _take(runs.start, root)
    which, x = _expand(runs.start, runs.end - runs.start + 1)
    out = torch.full((s.numel(),), -1, dtype=torch.int64, device=masks.device)
    out.index_copy_(0, (_take(runs.group, which) * h + _take(runs.y, which)) * w + x, _take(label, which))
    return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# IoU and the metric


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``[..., 4]`` x0y0x1y1 boxes with inclusive pixel ends (official ``calculate_multiple_iou``);
    broadcasts; degenerate pairs get 0."""
    a, b = a.to(torch.int64), b.to(torch.int64)
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp(min=0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    union = area_a + area_b - inter
    iou = inter.to(torch.float64) / union.clamp(min=1).to(torch.float64)
    return torch.where(union > 0, iou, 0.0)


def _gt_tensor(boxes: Sequence[Tensor], batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Ground truth padded to [B, G, 4] int64 and its validity [B, G]; checks the x0y0x1y1 convention."""
    if len(boxes) != batch:
        raise ValueError(f"got {len(boxes)} ground-truth box sets for {batch} maps")
    sets = []
    for i, box in enumerate(boxes):
        box = torch.as_tensor(box)
        if box.dim() == 1 and box.numel() == 4:
            box = box[None]
        if box.dim() != 2 or box.shape[1] != 4 or box.shape[0] == 0:
            raise ValueError(f"ground-truth boxes of image {i}: expected [n >= 1, 4], got shape {tuple(box.shape)}")
        box = torch.trunc(box.to(torch.float64)).to(torch.int64)  # int() like the official resize_bbox
        if (box < 0).any() or (box[:, 2] < box[:, 0]).any() or (box[:, 3] < box[:, 1]).any():
            raise ValueError(f"ground-truth boxes of image {i} are not non-negative x0y0x1y1: {box.tolist()}")
        sets.append(box)
    most = max((len(b) for b in sets), default=1)
    gt = torch.zeros(batch, most, 4, dtype=torch.int64)
    valid = torch.zeros(batch, most, dtype=torch.bool)
    for i, box in enumerate(sets):
        gt[i, : len(box)] = box
        valid[i, : len(box)] = True
    return gt.to(device), valid.to(device)


def _thresholds(cam_thresholds: Tensor | Sequence[float] | None) -> Tensor:
    t = default_cam_thresholds() if cam_thresholds is None else torch.as_tensor(cam_thresholds, dtype=torch.float64)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"cam_thresholds must be a non-empty 1-D sequence; got shape {tuple(t.shape)}")
    return t.cpu()


def _check_maps(maps: Tensor) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a [B, h, w] tensor; got {shape}")
    return maps


def best_ious(
    maps: Tensor,
    boxes: Sequence[Tensor],
    cam_thresholds: Tensor | Sequence[float] | None = None,
    image_size: tuple[int, int] = (224, 224),
    interpolation: str = "bicubic",
    chunk_size: int = 8,
) -> Tensor:
    """``[B, T]`` float64: per image and CAM threshold, the best IoU between any estimated box (all contours)
    and any ground-truth box. ``boxes[i]`` is ``[n_i, 4]`` x0y0x1y1 in ``image_size = (H, W)`` pixels."""
    maps, thresholds = _check_maps(maps), _thresholds(cam_thresholds)
    batch = maps.shape[0]
    gt, valid = _gt_tensor(boxes, batch, maps.device)
    out = torch.empty(batch, thresholds.numel(), dtype=torch.float64, device=maps.device)
    no_box = torch.zeros(4, dtype=torch.int64, device=maps.device)  # findContours found nothing: [0, 0, 0, 0]
    fallback = torch.where(valid, box_iou(no_box, gt), -1.0).amax(1)
    for lo in range(0, batch, max(1, chunk_size)):
        hi = min(batch, lo + max(1, chunk_size))
        s, levels, inverse = _level_index(maps[lo:hi], thresholds, image_size, interpolation)
        u = levels.numel()
        cand = _candidates(s, u)
        image = cand.group // u + lo
        iou = torch.where(_take(valid, image), box_iou(cand.boxes[:, None], _take(gt, image)), -1.0).amax(1)
        best = torch.full(((hi - lo) * u,), -1.0, dtype=torch.float64, device=maps.device)
        best.scatter_reduce_(0, cand.group, iou, "amax")
        best = best.view(hi - lo, u)
        best = torch.where(best < 0, fallback[lo:hi, None], best)
        out[lo:hi] = best[:, inverse]
    return out


class MaxBoxAccV2Accumulator:
    """Dataset-scale MaxBoxAccV2: ``update`` with batches (maps + ground truth), ``compute`` at the end.

    Keeps only hit counts per (IoU threshold, CAM threshold), like the official ``BoxEvaluator``.
    """

    def __init__(
        self,
        iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
        cam_thresholds: Tensor | Sequence[float] | None = None,
        image_size: tuple[int, int] = (224, 224),
        interpolation: str = "bicubic",
        chunk_size: int = 8,
    ):
        if not iou_thresholds:
            raise ValueError("iou_thresholds is empty")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")
        self.iou_thresholds = tuple(float(d) for d in iou_thresholds)
        self.cam_thresholds = _thresholds(cam_thresholds)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.interpolation = interpolation
        self.chunk_size = chunk_size
        self.hits = torch.zeros(len(self.iou_thresholds), self.cam_thresholds.numel(), dtype=torch.int64)
        self.num_images = 0

    def update(self, maps: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """Add a batch; returns its per-image best IoUs ``[B, T]`` (see :func:`best_ious`)."""
        ious = best_ious(maps, boxes, self.cam_thresholds, self.image_size, self.interpolation, self.chunk_size)
        delta = torch.tensor(self.iou_thresholds, dtype=torch.float64, device=ious.device)
        self.hits += (ious[:, None, :] >= delta[None, :, None]).sum(0).cpu()
        self.num_images += ious.shape[0]
        return ious

    def merge(self, other: MaxBoxAccV2Accumulator) -> MaxBoxAccV2Accumulator:
        """Add another accumulator's counts (e.g. from another process) with the same settings."""
        if (other.iou_thresholds, other.image_size) != (self.iou_thresholds, self.image_size) or not torch.equal(
            other.cam_thresholds, self.cam_thresholds
        ):
            raise ValueError("cannot merge accumulators with different thresholds or image sizes")
        self.hits += other.hits
        self.num_images += other.num_images
        return self

    def compute(self) -> dict:
        """``{"maxboxacc_v2", "maxboxacc": {d: acc}, "best_threshold": {d: t}, "num_images"}``; accuracies are
        fractions in [0, 1]; the best threshold is the lowest CAM threshold reaching the maximum."""
        if self.num_images == 0:
            raise ValueError("no images were accumulated")
        acc = self.hits.to(torch.float64) / self.num_images
        best = acc.amax(1)
        first = (acc == best[:, None]).to(torch.int64).argmax(1)  # first maximum, like np.argmax
        best_t = self.cam_thresholds[first]
        per = {d: float(b) for d, b in zip(self.iou_thresholds, best)}
        return {
            "maxboxacc_v2": float(best.mean()),
            "maxboxacc": per,
            "best_threshold": {d: float(t) for d, t in zip(self.iou_thresholds, best_t)},
            "num_images": self.num_images,
        }


def max_box_acc_v2(
    maps: Tensor,
    boxes: Sequence[Tensor],
    iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
    cam_thresholds: Tensor | None = None,
    image_size: tuple[int, int] = (224, 224),
    interpolation: str = "bicubic",
) -> dict:
    """MaxBoxAccV2 of ``[B, h, w]`` maps against per-image ground-truth boxes (x0y0x1y1 in ``image_size``
    pixels, ``image_size = (H, W)``). See the module docstring for the exact conventions."""
    acc = MaxBoxAccV2Accumulator(iou_thresholds, cam_thresholds, image_size, interpolation)
    acc.update(maps, boxes)
    return acc.compute()


def best_boxes(
    maps: Tensor,
    threshold: float,
    boxes: Sequence[Tensor] | None = None,
    image_size: tuple[int, int] = (224, 224),
    interpolation: str = "bicubic",
) -> Tensor:
    """``[B, 4]`` int64: each image's estimated box at one CAM threshold (e.g. ``result["best_threshold"][0.5]``).

    With ground truth, the box MaxBoxAccV2 credits (highest IoU with any ground-truth box); without, the box of
    the largest foreground component. ``[0, 0, 0, 0]`` when the map has no foreground at that threshold.
    """
    maps, thresholds = _check_maps(maps), _thresholds([threshold])
    batch = maps.shape[0]
    s, levels, _ = _level_index(maps, thresholds, image_size, interpolation)
    cand = _candidates(s, levels.numel(), holes=boxes is not None)
    if boxes is not None:
        gt, valid = _gt_tensor(boxes, batch, maps.device)
        ious = box_iou(cand.boxes[:, None], _take(gt, cand.group))
        score = torch.where(_take(valid, cand.group), ious, -1.0).amax(1)
    else:
        score = cand.area.to(torch.float64)
    out = torch.zeros(batch, 4, dtype=torch.int64, device=maps.device)
    best = torch.full((batch,), -2.0, dtype=torch.float64, device=maps.device).scatter_reduce_(
        0, cand.group, score, "amax"
    )
    # first candidate reaching the image's best score
    hit = (score == best[cand.group]).nonzero(as_tuple=True)[0]
    first = torch.full((batch,), cand.group.numel(), dtype=torch.int64, device=maps.device)
    first.scatter_reduce_(0, cand.group[hit], hit, "amin")
    has = first < cand.group.numel()
    out[has] = cand.boxes[first[has]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Ground truth: ImageNet's Pascal-VOC-style XML


@dataclass(frozen=True)
class VocAnnotation:
    """One XML file: boxes ``[n, 4]`` int64 x0y0x1y1 as written, the image ``size = (width, height)``, and the
    objects' names (ImageNet: wnids)."""

    boxes: Tensor
    size: tuple[int, int]
    names: tuple[str, ...]


def _int(node: ET.Element, tag: str, path: Path, where: str) -> int:
    text = node.findtext(tag)
    if text is None:
        raise DataError(f"{path}: {where} has no <{tag}>")
    try:
        value = float(text.strip())
    except ValueError:
        raise DataError(f"{path}: {where}/<{tag}> is {text!r}, expected a number") from None
    if not value.is_integer():
        raise DataError(f"{path}: {where}/<{tag}> is {text!r}, expected whole pixels")
    return int(value)


def read_voc_annotation(xml_path: str | os.PathLike) -> VocAnnotation:
    """Parse an ImageNet / Pascal-VOC XML annotation; any problem becomes a DataError naming the file."""
    path = Path(xml_path)
    if not path.is_file():
        raise DataError(f"annotation {path} does not exist")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: cannot parse XML ({exc})") from exc
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: no <size> element (expected <size><width>..</width><height>..</height>)")
    width, height = _int(size, "width", path, "<size>"), _int(size, "height", path, "<size>")
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size {width}x{height} is not positive")
    boxes, names = [], []
    for i, obj in enumerate(root.findall("object")):
        where = f"<object> #{i}"
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{path}: {where} has no <bndbox>")
        box = [_int(bnd, tag, path, f"{where}/<bndbox>") for tag in ("xmin", "ymin", "xmax", "ymax")]
        if box[0] < 0 or box[1] < 0 or box[2] < box[0] or box[3] < box[1]:
            raise DataError(f"{path}: {where} box {box} is not non-negative xmin <= xmax, ymin <= ymax")
        boxes.append(box)
        names.append((obj.findtext("name") or "").strip())
    tensor = torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)
    return VocAnnotation(tensor, (width, height), tuple(names))


def read_voc_boxes(xml_path: str | os.PathLike) -> Tensor:
    """``[n, 4]`` int64 x0y0x1y1 boxes of one XML annotation, in the original image's pixels."""
    return read_voc_annotation(xml_path).boxes


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int] = (224, 224)) -> Tensor:
    """Boxes of an image of ``from_size = (width, height)`` resized (no crop) to ``to_size = (width, height)``:
    ``int(x * new_w / w)`` per corner, as the official ``resize_bbox``; int64."""
    (w, h), (new_w, new_h) = from_size, to_size
    if min(w, h, new_w, new_h) <= 0:
        raise ValueError(f"sizes must be positive; got from_size={from_size}, to_size={to_size}")
    boxes = torch.as_tensor(boxes).to(torch.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must be [..., 4]; got shape {tuple(boxes.shape)}")
    factor = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float64, device=boxes.device)
    size = torch.tensor([w, h, w, h], dtype=torch.float64, device=boxes.device)
    return torch.trunc(boxes * factor / size).to(torch.int64)


def load_voc_boxes(
    xml_dir: str | os.PathLike,
    images: Iterable[str | os.PathLike],
    to_size: tuple[int, int] | None = (224, 224),
) -> list[Tensor]:
    """Ground truth for images matched by stem: ``<xml_dir>/<stem>.xml`` (ImageNet val:
    ``ILSVRC2012_val_00000001.JPEG`` -> ``ILSVRC2012_val_00000001.xml``), scaled to ``to_size = (width, height)``
    (None: original pixels). A missing or unreadable annotation is a DataError naming the file and the image."""
    root = Path(xml_dir)
    if not root.is_dir():
        raise DataError(f"annotation folder {root} does not exist")
    out = []
    for image in images:
        stem = Path(image).stem
        xml = root / f"{stem}.xml"
        if not xml.is_file():
            raise DataError(f"no annotation {xml} for image {image}")
        ann = read_voc_annotation(xml)
        if len(ann.boxes) == 0:
            raise DataError(f"{xml}: no <object> boxes for image {image}")
        out.append(ann.boxes if to_size is None else scale_boxes(ann.boxes, ann.size, to_size))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Overlays (Fig. 8)


def _jet(values: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] float RGB in [0, 1] (the classic jet ramp)."""
    v = 4.0 * values[..., None]
    centres = np.array([3.0, 2.0, 1.0])
    return np.clip(1.5 - np.abs(v - centres), 0.0, 1.0)


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
    jet overlay of opacity ``alpha``, ground-truth boxes in blue and each named prediction in its colour
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
        mixed = (1 - alpha) * base + alpha * _jet(values)
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
