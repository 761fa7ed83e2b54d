"""The tests' tolerance helpers (tests/tolerances.py) pass and fail where they say, and name what failed."""

from __future__ import annotations

import pytest
import torch

from tests.tolerances import REFERENCE, assert_close, assert_within_torch_error, tolerance

F64 = torch.float64


def test_assert_close_bounds_and_names_the_worst_element():
    want = torch.zeros(3, 4, dtype=F64)
    got = want.clone()
    got[0, 1], got[1, 2] = 0.9 * REFERENCE[torch.bfloat16].atol, 0.5  # one element within atol, one far beyond
    assert_close(got[0], want[0], torch.bfloat16)
    with pytest.raises(AssertionError, match=r"^pooled \(bfloat16\): 1 of 12 elements .*worst at \(1, 2\): got 0\.5,"):
        assert_close(got, want, torch.bfloat16, name="pooled")
    big = torch.full((4,), 1e3, dtype=F64)
    assert_close(big + 1.5, big, torch.bfloat16)  # within rtol: 2e-2 x 1e3
    with pytest.raises(AssertionError, match="float32"):
        assert_close(big + 1.5, big, torch.float32)  # beyond 2e-5 + 2e-5 x 1e3


def test_assert_close_scaled_nan_infinities_and_unknown_dtypes():
    want = torch.tensor([100.0, -3.0], dtype=F64)
    got = want + torch.tensor([0.0, 1e-8], dtype=F64)
    with pytest.raises(AssertionError, match=r"^float64: 1 of 2 elements .*worst at \(1,\)"):
        assert_close(got, want)  # the tolerance of got's own dtype: 1e-10
    assert_close(got, want, scaled=True)  # atol 1e-10 x max|want| = 1e-8
    inf = torch.tensor([float("inf"), 1.0], dtype=F64)
    assert_close(inf, inf.clone())
    nan = torch.tensor([float("nan"), 1.0], dtype=F64)
    with pytest.raises(AssertionError, match="1 of 2"):
        assert_close(nan, nan.clone())
    with pytest.raises(AssertionError, match="shape"):
        assert_close(want[:1], want)
    with pytest.raises(KeyError, match="no reference tolerance for int64"):
        tolerance(torch.int64)


def test_within_torch_error_allows_twice_pytorchs_error_plus_the_floor():
    want = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    baseline = (want + torch.tensor([0.0, 1e-3, 0.0], dtype=F64)).float()  # PyTorch's own max error: 1e-3
    floor = 1e-5 * 2.0  # x max(1, max|want|)
    near = want + torch.tensor([0.0, 0.0, 2e-3 + 0.9 * floor], dtype=F64)
    assert_within_torch_error(near.float(), want, baseline, 1e-5)
    far = want + torch.tensor([0.0, 0.0, 2e-3 + 6 * floor], dtype=F64)
    with pytest.raises(AssertionError, match=r"^out \(float32\): max error .*worst at \(2,\)"):
        assert_within_torch_error(far.float(), want, baseline, 1e-5, "out")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_torch_error(torch.tensor([1.0, float("nan"), 0.5]), want, baseline, 1e-5)
