"""MAE's train crop (``util/crop.py``: one draw of area and log-aspect, sides clamped to the image, uniform
position) against its definition, and against torchvision's ten-try RandomResizedCrop, which it replaced."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from beyond_cls.data.crops import MAERandomResizedCrop, crop_params, mae_crop_params

W, H = 500, 375  # the image: crops that do not fit are clamped to full height far more often than width
DRAWS = 6000  # per sampler; each draw is a few small torch calls (~0.2 ms on a loaded CI core)
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def _boxes(sample, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return np.array([sample(generator, W, H) for _ in range(DRAWS)])  # rows (top, left, h, w)


def _definition(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) of ``count`` boxes simulated from MAE's definition, in numpy: area fraction ~ U(0.08, 1), log aspect
    (w/h) ~ U(log 3/4, log 4/3), sides rounded to the nearest integer, then each side capped by the image's."""
    rng = np.random.default_rng(seed)
    area = W * H * rng.uniform(0.08, 1.0, count)
    aspect = np.exp(rng.uniform(*LOG_RATIO, count))
    w = np.minimum(np.rint(np.sqrt(area * aspect)), W)
    h = np.minimum(np.rint(np.sqrt(area / aspect)), H)
    return h, w


@pytest.fixture(scope="module")
def drawn() -> dict[str, np.ndarray]:
    return {"mae": _boxes(mae_crop_params, 0), "torchvision": _boxes(crop_params, 1)}


def test_mae_crop_follows_its_definition(drawn):
    top, left, h, w = drawn["mae"].T
    assert ((top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W) & (h >= 1) & (w >= 1)).all()
    ref_h, ref_w = _definition(400_000, seed=0)
    area, ref_area = h * w / (W * H), ref_h * ref_w / (W * H)
    # mean area fraction (the issue: 0.518 for MAE's, 0.435 for torchvision's); 5 standard errors
    assert abs(area.mean() - ref_area.mean()) < 5 * area.std() / math.sqrt(DRAWS)
    assert abs(area.mean() - 0.518) < 0.015
    # full-height boxes (the issue: 25.6 % vs 0.6 %); at 500 x 375 no box is clamped to full width
    full, ref_full = (h == H).mean(), (ref_h == H).mean()
    assert abs(full - ref_full) < 5 * math.sqrt(ref_full * (1 - ref_full) / DRAWS)
    assert 0.23 < full < 0.29 and (w == W).sum() == 0
    # the whole laws of the log aspect and of the area: two-sample KS against the simulated definition
    assert stats.ks_2samp(np.log(w / h), np.log(ref_w / ref_h)).pvalue > 1e-3
    assert stats.ks_2samp(area, ref_area).pvalue > 1e-3
    # the position is uniform over the places the box fits: its relative offset has mean 1/2, variance ~1/12
    slack = (H - h >= 50) & (W - w >= 50)
    for offset, room in ((top, H - h), (left, W - w)):
        rel = offset[slack] / room[slack]
        assert abs(rel.mean() - 0.5) < 5 * math.sqrt(1 / 12 / slack.sum())
        assert abs(rel.var() - 1 / 12) < 0.01


def test_torchvision_crop_differs_from_mae(drawn):
    _, _, h, w = drawn["torchvision"].T
    ref_h, ref_w = _definition(400_000, seed=1)
    area = h * w / (W * H)
    assert abs(area.mean() - 0.435) < 0.015  # retries favour smaller boxes
    assert (h == H).mean() < 0.02  # full height only when a drawn box fits exactly
    assert stats.ks_2samp(np.log(w / h), np.log(ref_w / ref_h)).pvalue < 1e-6
    assert stats.ks_2samp(area, ref_h * ref_w / (W * H)).pvalue < 1e-6
    mae_area = drawn["mae"][:, 2] * drawn["mae"][:, 3] / (W * H)
    assert mae_area.mean() - area.mean() > 0.06


@pytest.mark.parametrize("width,height", [(W, H), (H, W), (224, 224), (31, 17), (1000, 10), (2, 300), (1, 1)])
def test_mae_crop_draws_in_maes_order(width, height):
    """Given the same RNG state, the box the definition gives with MAE's draws (float32 uniform area, float32
    uniform log-ratio, then randint top and left, Python's round) — and torch's global RNG through the transform."""
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        got = mae_crop_params(g, width, height)
        d = torch.Generator().manual_seed(seed)
        target = width * height * torch.empty(1).uniform_(0.08, 1.0, generator=d).item()
        lo, hi = torch.log(torch.tensor([3 / 4, 4 / 3]))
        aspect = math.exp(torch.empty(1).uniform_(lo, hi, generator=d).item())
        w = min(max(round(math.sqrt(target * aspect)), 1), width)  # at least 1: MAE's would be 0 on a 1 x 1 image
        h = min(max(round(math.sqrt(target / aspect)), 1), height)
        top = torch.randint(0, height - h + 1, (1,), generator=d).item()
        left = torch.randint(0, width - w + 1, (1,), generator=d).item()
        assert got == (top, left, h, w), (width, height, seed)
        assert torch.rand(1, generator=g).item() == torch.rand(1, generator=d).item()  # same number of draws
        torch.manual_seed(seed)
        assert MAERandomResizedCrop.get_params(torch.empty(1, height, width), [0.08, 1.0], [3 / 4, 4 / 3]) == got
