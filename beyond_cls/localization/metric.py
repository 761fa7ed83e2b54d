"""IoU, the per-threshold best IoU of every image, and MaxBoxAccV2 (one-shot and streaming)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from beyond_cls.localization.components import _candidates, _take
from beyond_cls.localization.maps import DEFAULT_IOU_THRESHOLDS, INTERPOLATIONS, _level_index, default_cam_thresholds


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
        in % (0-100, as the official evaluator and every accuracy of this package report them); the best threshold
        is the lowest CAM threshold reaching the maximum."""
        if self.num_images == 0:
            raise ValueError("no images were accumulated")
        acc = 100 * self.hits.to(torch.float64) / self.num_images
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
