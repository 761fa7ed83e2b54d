"""beyond_cls.localization: MaxBoxAccV2 with the official (clovaai/wsolevaluation + OpenCV) conventions."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beyond_cls.data.folder import DataError
from beyond_cls.localization import (
    MaxBoxAccV2Accumulator,
    best_boxes,
    best_ious,
    box_iou,
    default_cam_thresholds,
    draw_overlay,
    label_components,
    load_voc_boxes,
    max_box_acc_v2,
    prepare_maps,
    read_voc_annotation,
    read_voc_boxes,
    resize_maps,
    scale_boxes,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small tensor ops: intra-op threads only add overhead here (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------
# Values produced by OpenCV 4.8 (cv2.resize / cv2.threshold / cv2.findContours(RETR_TREE) / boundingRect) with the
# official evaluation flow, pinned here so the exactness is checked without OpenCV installed.

CV2_RESIZE_IN = [[0.0, 1.0, 4.0], [9.0, 16.0, 2.5], [0.5, 7.0, 3.0]]  # / 7, resized to H=4, W=5, INTER_CUBIC
CV2_RESIZE_OUT = [
    -0.10009321748345558, -0.10376644145539363, -0.01095145089285715, 0.36073442836017683, 0.6441944492232454,
    0.8887087650655303, 1.3154482097743312, 1.65478515625, 0.953409013003693, 0.30859966325806454,
    0.886827789770905, 1.5262387956297192, 2.0578264508928568, 1.0952795119145387, 0.1962855097787854,
    -0.10438059107816246, 0.37669600501664846, 0.90771484375, 0.6841048801870784, 0.3881928221339227,
]  # fmt: skip

# 6x6 maps resized to (H, W) = (20, 24), ground truth below, thresholds 0.00..0.99: best IoU per threshold,
# run-length encoded as (count, value). Maps 0 and 1 have holes whose contours change the result.
PINNED_GT = [[3, 2, 15, 11], [10, 8, 22, 19]]
PINNED = [
    (
        [[0.086, 0.237, 0.801, 0.582, 0.094, 0.433], [0.479, 0.16, 0.735, 0.114, 0.391, 0.517],
         [0.431, 0.587, 0.738, 0.956, 0.284, 0.649], [0.696, 0.293, 0.001, 0.973, 0.298, 0.314],
         [0.892, 0.585, 0.471, 0.773, 0.03, 0.707], [0.374, 0.091, 0.661, 0.931, 0.207, 0.63]],
        [(21, 0.325), (2, 0.34615384615384615), (13, 0.325), (3, 0.34210526315789475), (12, 0.3611111111111111),
         (4, 0.39285714285714285), (4, 0.37037037037037035), (1, 0.34615384615384615), (2, 0.375),
         (7, 0.34782608695652173), (1, 0.3620689655172414), (5, 0.45652173913043476), (1, 0.5153374233128835),
         (3, 0.3006134969325153), (2, 0.2222222222222222), (2, 0.23076923076923078), (4, 0.15384615384615385),
         (5, 0.1282051282051282), (1, 0.09615384615384616), (3, 0.09230769230769231), (1, 0.06923076923076923),
         (3, 0.03076923076923077)],
    ),
    (
        [[0.298, 0.742, 0.722, 0.219, 0.83, 0.658], [0.683, 0.82, 0.429, 0.759, 0.878, 0.102],
         [0.85, 0.394, 0.48, 0.146, 0.698, 0.292], [0.871, 0.275, 0.562, 0.4, 0.613, 0.197],
         [0.18, 0.747, 0.752, 0.567, 0.921, 0.206], [0.851, 0.169, 0.964, 0.624, 0.607, 0.971]],
        [(38, 0.325), (1, 0.34146341463414637), (3, 0.3855421686746988), (1, 0.6062176165803109),
         (3, 0.5707317073170731), (1, 0.5294117647058824), (6, 0.4326923076923077), (2, 0.5571428571428572),
         (1, 0.5098039215686274), (6, 0.4326923076923077), (4, 0.39215686274509803), (4, 0.41450777202072536),
         (2, 0.24305555555555555), (1, 0.1282051282051282), (1, 0.12048192771084337), (1, 0.10256410256410256),
         (2, 0.07692307692307693), (1, 0.075), (1, 0.057692307692307696), (3, 0.05660377358490566),
         (2, 0.057692307692307696), (3, 0.038461538461538464), (3, 0.02564102564102564), (1, 0.02531645569620253),
         (1, 0.01282051282051282), (2, 0.012658227848101266), (5, 0.006369426751592357), (1, 0.0)],
    ),
    (
        [[0.787, 0.79, 0.054, 0.369, 0.085, 0.194], [0.214, 0.859, 0.127, 0.297, 0.493, 0.849],
         [0.965, 0.708, 0.214, 0.545, 0.706, 0.052], [0.68, 0.368, 0.59, 0.67, 0.669, 0.523],
         [0.555, 0.198, 0.495, 0.125, 0.481, 0.536], [0.774, 0.394, 0.02, 0.528, 0.205, 0.741]],
        [(45, 0.325), (5, 0.5735294117647058), (6, 0.611764705882353), (2, 0.42105263157894735),
         (2, 0.37142857142857144), (2, 0.3905579399141631), (2, 0.33620689655172414), (2, 0.30612244897959184),
         (7, 0.2717391304347826), (10, 0.2840909090909091), (1, 0.22988505747126436), (2, 0.10344827586206896),
         (1, 0.056338028169014086), (3, 0.04316546762589928), (5, 0.02158273381294964), (5, 0.0)],
    ),
]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Plain references: flood fill, and the official box extraction written pixel by pixel


def _flood_labels(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Label each component by the raster index of its first pixel (BFS), background -1."""
    h, w = mask.shape
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = np.full((h, w), -1, dtype=np.int64)
    for y in range(h):
        for x in range(w):
            if mask[y, x] and out[y, x] < 0:
                label, queue = y * w + x, deque([(y, x)])
                out[y, x] = label
                while queue:
                    cy, cx = queue.popleft()
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and out[ny, nx] < 0:
                            out[ny, nx] = label
                            queue.append((ny, nx))
    return out


def _reference_boxes(mask: np.ndarray) -> list[list[int]]:
    """What findContours(RETR_TREE) + boundingRect + the official clipping give: one box per 8-connected
    component and per hole (4-connected background component off the image edge, grown by one pixel)."""
    h, w = mask.shape
    boxes = []
    fg = _flood_labels(mask, 8)
    for label in np.unique(fg[fg >= 0]):
        ys, xs = np.nonzero(fg == label)
        boxes.append([xs.min(), ys.min(), min(xs.max() + 1, w - 1), min(ys.max() + 1, h - 1)])
    bg = _flood_labels(~mask, 4)
    for label in np.unique(bg[bg >= 0]):
        ys, xs = np.nonzero(bg == label)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1:
            continue
        boxes.append([xs.min() - 1, ys.min() - 1, min(xs.max() + 2, w - 1), min(ys.max() + 2, h - 1)])
    return boxes or [[0, 0, 0, 0]]


def _reference_best_ious(normalized: np.ndarray, gt: list[list[int]], thresholds: np.ndarray) -> np.ndarray:
    q = (normalized * 255).astype(np.uint8)
    out = []
    for t in thresholds:
        mask = q > int(t * q.max())
        ious = box_iou(torch.tensor(_reference_boxes(mask))[:, None], torch.tensor(gt)[None])
        out.append(float(ious.max()))
    return np.array(out)


def _box_map(size: tuple[int, int], *boxes: tuple[int, int, int, int], value: float = 1.0) -> torch.Tensor:
    """A [1, H, W] map with ``value`` on the given x0y0x1y1 (inclusive) rectangles, 0 elsewhere."""
    m = torch.zeros(1, *size, dtype=torch.float64)
    for x0, y0, x1, y1 in boxes:
        m[0, y0 : y1 + 1, x0 : x1 + 1] = value
    return m


# --------------------------------------------------------------------------------------------------------------
# Resize and thresholds


def test_resize_is_opencv_bicubic_bit_for_bit():
    a = torch.tensor(CV2_RESIZE_IN, dtype=torch.float64) / 7.0
    out = resize_maps(a[None], (4, 5), "bicubic")[0]
    assert out.flatten().tolist() == CV2_RESIZE_OUT
    # same kernel and half-pixel centres as torch's bicubic (align_corners=False); OpenCV's float32 taps differ
    ref = F.interpolate(a[None, None], size=(4, 5), mode="bicubic", align_corners=False)[0, 0]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(14, 14), (16, 16), (7, 9)])
def test_resize_matches_torch_half_pixel(mode, size):
    a = torch.rand(2, *size, dtype=torch.float64)
    ours = resize_maps(a, (224, 224), mode)
    ref = F.interpolate(a[:, None], size=(224, 224), mode=mode, align_corners=False)[:, 0]
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    assert torch.equal(resize_maps(a, size, mode), a)  # same size: a copy, like cv2.resize


def test_default_thresholds_are_numpy_arange():
    assert default_cam_thresholds().tolist() == np.arange(0, 1, 0.01).tolist()
    assert default_cam_thresholds(0.001).tolist() == np.arange(0, 1, 0.001).tolist()


def test_prepare_maps_normalizes_and_zeroes_constant_and_nan_maps():
    maps = torch.stack([torch.full((4, 4), 3.0), torch.rand(4, 4) * 5 + 2, torch.rand(4, 4)])
    maps[2, 1, 1] = float("nan")
    out = prepare_maps(maps, (8, 8))
    assert out.dtype == torch.float64 and out.shape == (3, 8, 8)
    assert (out[0] == 0).all() and (out[2] == 0).all()
    assert out[1].min() == 0 and out[1].max() == 1


# --------------------------------------------------------------------------------------------------------------
# Connected components


@pytest.mark.parametrize("connectivity", [8, 4])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
def test_label_components_matches_flood_fill(connectivity, density):
    g = torch.Generator().manual_seed(int(density * 10) + connectivity)
    masks = torch.rand(4, 13, 17, generator=g) < density
    labels = label_components(masks, connectivity)
    for mask, label in zip(masks, labels):
        assert torch.equal(label, torch.from_numpy(_flood_labels(mask.numpy(), connectivity)))


def test_label_components_diagonal_only_touching():
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal staircase
    mask[4, 5] = mask[5, 4] = True  # anti-diagonal pair touching at a corner only
    mask[0, 5] = True  # isolated
    eight, four = label_components(mask, 8), label_components(mask, 4)
    assert len(eight[mask].unique()) == 3 and len(four[mask].unique()) == 6
    assert eight[2, 2] == 0 and eight[5, 4] == 4 * 6 + 5
    assert torch.equal(eight, torch.from_numpy(_flood_labels(mask.numpy(), 8)))
    assert torch.equal(four, torch.from_numpy(_flood_labels(mask.numpy(), 4)))


def test_label_components_long_serpentine_is_one_component():
    mask = torch.zeros(41, 40, dtype=torch.bool)
    mask[::2] = True
    for row in range(1, 41, 2):
        mask[row, 39 if row % 4 == 1 else 0] = True
    labels = label_components(mask[None], 4)[0]
    assert labels[mask].unique().tolist() == [0]


# --------------------------------------------------------------------------------------------------------------
# The metric on maps with known answers


def test_single_exact_box():
    maps = _box_map((224, 224), (30, 50, 119, 99))
    # the official box runs one pixel past the last foreground pixel on the right and bottom
    assert best_boxes(maps, 0.5).tolist() == [[30, 50, 120, 100]]
    result = max_box_acc_v2(maps, [torch.tensor([[30, 50, 120, 100]])])
    assert result["maxboxacc_v2"] == 100.0 and result["num_images"] == 1  # in %
    assert result["maxboxacc"] == {0.3: 100.0, 0.5: 100.0, 0.7: 100.0}
    assert result["best_threshold"] == {0.3: 0.0, 0.5: 0.0, 0.7: 0.0}
    # the pixel extent itself: IoU (90 * 50) / (91 * 51)
    ious = best_ious(maps, [torch.tensor([30, 50, 119, 99])])
    assert torch.allclose(ious, torch.tensor(4500 / 4641, dtype=torch.float64))


def test_all_components_count_the_smaller_matching_one():
    size = (96, 96)
    maps = _box_map(size, (0, 0, 59, 59), (75, 70, 84, 79))
    gt = [torch.tensor([[75, 70, 85, 80]])]
    assert max_box_acc_v2(maps, gt, image_size=size)["maxboxacc_v2"] == 100.0
    assert best_boxes(maps, 0.5, gt, image_size=size).tolist() == [[75, 70, 85, 80]]
    # without ground truth: the largest component
    assert best_boxes(maps, 0.5, image_size=size).tolist() == [[0, 0, 60, 60]]


def test_no_overlap_scores_zero():
    maps = _box_map((64, 64), (0, 0, 20, 20))
    result = max_box_acc_v2(maps, [torch.tensor([[40, 40, 60, 60]])], image_size=(64, 64))
    assert result["maxboxacc_v2"] == 0.0 and result["maxboxacc"][0.5] == 0.0
    assert result["best_threshold"][0.5] == 0.0  # ties: the lowest threshold


def test_hole_contours_are_boxes_too():
    maps = _box_map((64, 64), (10, 10, 29, 29))
    maps[0, 14:26, 14:26] = 0  # hole: pixels 14..25
    hole_box = torch.tensor([[13, 13, 27, 27]])  # grown by one pixel, right/bottom one more
    assert best_boxes(maps, 0.5, [hole_box], image_size=(64, 64)).tolist() == hole_box.tolist()
    result = max_box_acc_v2(maps, [hole_box], image_size=(64, 64))
    assert result["maxboxacc"][0.7] == 100.0  # the outer box alone has IoU 225 / 441


def test_threshold_is_strict_on_the_quantized_map():
    # values 0.5 (q = 127) and 1.0 (q = 255) in separate blobs; 0.003 < 1/255 quantizes to 0
    maps = _box_map((40, 40), (2, 2, 9, 9), value=0.5) + _box_map((40, 40), (25, 25, 34, 34))
    maps[0, 30:40, 0:10] = 0.003
    thresholds = torch.tensor([0.0, 0.49, 127 / 255, 0.5, 0.99])  # int(255 t) = 0, 124, 126/127, 127, 252
    gt_a = [torch.tensor([[2, 2, 10, 10]])]
    ious = best_ious(maps, gt_a, thresholds, image_size=(40, 40))[0]
    k = torch.trunc(thresholds.double() * 255)
    expected = torch.where(k < 127, 1.0, 0.0).to(torch.float64)  # q = 127 is foreground only while 127 > k
    assert torch.equal(ious, expected)
    # the 0.003 blob is never foreground, not even at t = 0
    ious = best_ious(maps, [torch.tensor([[0, 30, 10, 39]])], [0.0], image_size=(40, 40))
    assert ious.item() < 0.01


def test_constant_maps_have_no_foreground():
    maps = torch.stack([torch.full((7, 7), 0.7), torch.full((7, 7), float("nan")), torch.zeros(7, 7)])
    gt = [torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 1, 1]]), torch.tensor([[5, 5, 20, 20]])]
    ious = best_ious(maps, gt, image_size=(28, 28))
    # no contour: the official box [0, 0, 0, 0], a single pixel
    assert (ious[0] == 1).all() and (ious[1] == 0.25).all() and (ious[2] == 0).all()
    assert best_boxes(maps, 0.0, image_size=(28, 28)).tolist() == [[0, 0, 0, 0]] * 3


def test_low_resolution_map_is_upsampled():
    low = torch.zeros(1, 14, 14)
    low[0, 3, 5] = 1.0  # the 16-pixel patch x 80..95, y 48..63
    gt = [torch.tensor([[80, 48, 96, 64]])]
    result = max_box_acc_v2(low, gt)
    assert result["maxboxacc"][0.5] == 100.0
    box = best_boxes(low, result["best_threshold"][0.7], gt)[0]
    assert box_iou(box, gt[0][0]) >= 0.7
    assert max_box_acc_v2(low, gt, interpolation="bilinear")["maxboxacc"][0.5] == 100.0


@pytest.mark.parametrize("index", range(len(PINNED)))
def test_matches_opencv_pinned(index):
    values, rle = PINNED[index]
    ious = best_ious(torch.tensor([values], dtype=torch.float64), [torch.tensor(PINNED_GT)], image_size=(20, 24))
    expected = [v for count, v in rle for _ in range(count)]
    assert ious[0].tolist() == expected


def test_matches_pixel_reference_on_random_maps():
    g = torch.Generator().manual_seed(5)
    h, w = 12, 15
    maps = torch.rand(6, h, w, generator=g, dtype=torch.float64) ** 2
    maps[3] = (maps[3] > 0.4).double()  # binary map: many holes and diagonal contacts
    gts = [[[1, 2, 9, 8]], [[0, 0, 14, 11], [5, 5, 7, 9]], [[3, 3, 4, 4]]]
    gts += [[[2, 1, 12, 10]], [[6, 0, 14, 5]], [[0, 6, 8, 11]]]
    thresholds = default_cam_thresholds(0.05)
    ours = best_ious(maps, [torch.tensor(b) for b in gts], thresholds, image_size=(h, w))
    normalized = prepare_maps(maps, (h, w)).numpy()
    for i in range(len(maps)):
        ref = _reference_best_ious(normalized[i], gts[i], thresholds.numpy())
        assert ours[i].tolist() == ref.tolist(), i


def test_batched_and_chunked_equal_one_by_one():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(5, 7, 7, generator=g)
    gts = [torch.tensor([[i, 2 * i, 40 + i, 50]]) for i in range(5)]
    together = best_ious(maps, gts, image_size=(56, 64), chunk_size=2)
    alone = torch.cat([best_ious(maps[i : i + 1], gts[i : i + 1], image_size=(56, 64)) for i in range(5)])
    assert torch.equal(together, alone)


def test_accumulator_equals_one_shot():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(10, 7, 7, generator=g) ** 3
    gts = [torch.tensor([[3 * i, 2 * i, 25 + 2 * i, 40]]) for i in range(10)]
    size = (48, 56)
    one_shot = max_box_acc_v2(maps, gts, image_size=size)
    acc = MaxBoxAccV2Accumulator(image_size=size)
    for lo, hi in [(0, 3), (3, 6), (6, 10)]:
        assert acc.update(maps[lo:hi], gts[lo:hi]).shape == (hi - lo, 100)
    assert acc.compute() == one_shot and one_shot["num_images"] == 10
    a, b = MaxBoxAccV2Accumulator(image_size=size), MaxBoxAccV2Accumulator(image_size=size)
    a.update(maps[:4], gts[:4])
    b.update(maps[4:], gts[4:])
    assert a.merge(b).compute() == one_shot
    assert 0 < one_shot["maxboxacc_v2"] < 100
    assert one_shot["maxboxacc_v2"] == pytest.approx(sum(one_shot["maxboxacc"].values()) / 3)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="image 1"):
        best_ious(torch.rand(2, 4, 4), [torch.tensor([[0, 0, 1, 1]]), torch.zeros(0, 4)])
    with pytest.raises(ValueError, match="x0y0x1y1"):
        best_ious(torch.rand(1, 4, 4), [torch.tensor([[5, 0, 1, 1]])])
    with pytest.raises(ValueError, match="2 ground-truth"):
        best_ious(torch.rand(1, 4, 4), [torch.tensor([[0, 0, 1, 1]])] * 2)
    with pytest.raises(ValueError, match="no images"):
        MaxBoxAccV2Accumulator().compute()


# --------------------------------------------------------------------------------------------------------------
# Ground truth


VOC_XML = """<annotation>
    <folder>val</folder>
    <filename>ILSVRC2012_val_00000002</filename>
    <size><width>500</width><height>375</height><depth>3</depth></size>
    <object><name>n01751748</name><bndbox><xmin>111</xmin><ymin>108</ymin><xmax>441</xmax><ymax>193</ymax></bndbox>
    </object>
    <object><name>n01751748</name><bndbox><xmin>2</xmin><ymin>69</ymin><xmax>437</xmax><ymax>207</ymax></bndbox>
    </object>
</annotation>
"""


def test_read_voc_and_scale(tmp_path):
    path = tmp_path / "ILSVRC2012_val_00000002.xml"
    path.write_text(VOC_XML)
    ann = read_voc_annotation(path)
    assert ann.size == (500, 375) and ann.names == ("n01751748", "n01751748")
    assert ann.boxes.tolist() == [[111, 108, 441, 193], [2, 69, 437, 207]]
    assert torch.equal(read_voc_boxes(path), ann.boxes)
    # int(x * 224 / 500), int(y * 224 / 375)
    assert scale_boxes(ann.boxes, ann.size, (224, 224)).tolist() == [[49, 64, 197, 115], [0, 41, 195, 123]]
    assert scale_boxes(torch.tensor([[0, 0, 499, 374]]), (500, 375), (250, 750)).tolist() == [[0, 0, 249, 748]]


def test_load_voc_boxes_by_stem_and_errors(tmp_path):
    (tmp_path / "ILSVRC2012_val_00000002.xml").write_text(VOC_XML)
    (tmp_path / "broken.xml").write_text("<annotation><size><width>5")
    (tmp_path / "nosize.xml").write_text("<annotation><object/></annotation>")
    boxes = load_voc_boxes(tmp_path, ["imgs/ILSVRC2012_val_00000002.JPEG"])
    assert boxes[0].tolist() == [[49, 64, 197, 115], [0, 41, 195, 123]]
    raw = load_voc_boxes(tmp_path, ["ILSVRC2012_val_00000002.JPEG"], to_size=None)
    assert raw[0][0].tolist() == [111, 108, 441, 193]
    with pytest.raises(DataError, match="ILSVRC2012_val_00000003.xml.*ILSVRC2012_val_00000003.JPEG"):
        load_voc_boxes(tmp_path, ["ILSVRC2012_val_00000003.JPEG"])
    with pytest.raises(DataError, match="broken.xml: cannot parse"):
        load_voc_boxes(tmp_path, ["broken.png"])
    with pytest.raises(DataError, match="nosize.xml: no <size>"):
        read_voc_boxes(tmp_path / "nosize.xml")
    with pytest.raises(DataError, match="does not exist"):
        load_voc_boxes(tmp_path / "missing", ["a.jpg"])


# --------------------------------------------------------------------------------------------------------------
# Overlays


@pytest.mark.parametrize("as_tensor", [False, True])
def test_draw_overlay(as_tensor):
    w, h = 96, 64
    image = Image.new("RGB", (w, h), (128, 128, 128))
    if as_tensor:
        image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0
    out = draw_overlay(
        image, heat, torch.tensor([[10, 8, 50, 40]]),
        {"[cls]": (torch.tensor([5, 5, 30, 30]), (255, 0, 0)), "SA": ([40, 20, 90, 60], (0, 255, 0))},
        width=1,
    )  # fmt: skip
    assert isinstance(out, Image.Image) and out.size == (w, h) and out.mode == "RGB"
    assert out.getpixel((10, 20)) == (0, 0, 255)
    assert out.getpixel((5, 15)) == (255, 0, 0)
    assert out.getpixel((90, 45)) == (0, 255, 0)
    assert out.getpixel((70, 2)) != (128, 128, 128)  # the heat overlay tints the image
    # boxes given in 224 x 224 evaluation pixels are scaled to the image
    scaled = draw_overlay(Image.new("RGB", (w, h)), None, torch.tensor([[0, 0, 112, 112]]), boxes_size=(224, 224))
    assert scaled.getpixel((48, 10)) == (0, 0, 255) and scaled.getpixel((60, 10)) == (0, 0, 0)
