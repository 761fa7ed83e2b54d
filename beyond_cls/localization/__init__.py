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

Modules: ``maps`` (resize, normalize, levels), ``components`` (runs and union-find), ``metric``
(IoU, MaxBoxAccV2, accumulator), ``voc`` (ground truth), ``overlay`` (Fig. 8).

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

from beyond_cls.localization.components import label_components
from beyond_cls.localization.maps import DEFAULT_IOU_THRESHOLDS, default_cam_thresholds, prepare_maps, resize_maps
from beyond_cls.localization.metric import MaxBoxAccV2Accumulator, best_boxes, best_ious, box_iou, max_box_acc_v2
from beyond_cls.localization.overlay import draw_overlay, overlay_figure
from beyond_cls.localization.voc import VocAnnotation, load_voc_boxes, read_voc_annotation, read_voc_boxes, scale_boxes

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
    "overlay_figure",
    "prepare_maps",
    "read_voc_annotation",
    "read_voc_boxes",
    "resize_maps",
    "scale_boxes",
]
