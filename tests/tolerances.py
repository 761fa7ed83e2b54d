"""How close an op's result must be to its float64 reference (beyond_cls.reference), one table per rule.

``REFERENCE``: the op's output, of ``dtype``, against the float64 reference computed from the same rounded inputs.
float64 runs the same math in float64; float32 is a float32 accumulation (what the pooling ops return for any
token dtype); bfloat16 and float16 add one rounding to the dtype on top (the tokens' gradient, attention's output).

``FLOORS``: the rule of the ops that are judged against PyTorch's own error (attention, the C++ pooling): the op's
max error may be twice that of PyTorch computing the same in the op's dtype, plus ``floor`` x max(1, max|want|).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Tolerance(NamedTuple):
    atol: float
    rtol: float


REFERENCE = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-10),
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2),
    torch.float16: Tolerance(atol=2e-2, rtol=2e-2),
}

FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tolerance(dtype: torch.dtype) -> Tolerance:
    """``REFERENCE[dtype]``, with one clear error for a dtype the table does not hold."""
    if dtype not in REFERENCE:
        raise KeyError(f"no reference tolerance for {_dtype_name(dtype)}: tests/tolerances.py has "
                       f"{', '.join(_dtype_name(d) for d in REFERENCE)}")
    return REFERENCE[dtype]


def _worst(got: torch.Tensor, want: torch.Tensor, excess: torch.Tensor) -> str:
    i = int(excess.flatten().argmax())
    where = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else ()
    return f"worst at {where}: got {got.flatten()[i].item():.8g}, want {want.flatten()[i].item():.8g}"


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None, *, name: str = "",
                 scaled: bool = False) -> None:
    """``|got - want| <= atol + rtol |want|`` elementwise with ``REFERENCE[dtype]`` (``dtype``: the one the op
    computed in, ``got``'s own by default). ``scaled``: atol times max(1, max|want|), for outputs whose size
    (a gradient's) is not of order one. NaN anywhere fails; equal infinities pass. The failure names the dtype,
    how many elements are off and the worst one."""
    dtype = got.dtype if dtype is None else dtype
    atol, rtol = tolerance(dtype)
    label = f"{name} ({_dtype_name(dtype)})" if name else _dtype_name(dtype)
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if scaled and w.numel():
        atol *= max(1.0, w.abs().max().item())
    excess = (g - w).abs() - (atol + rtol * w.abs())
    excess = torch.where(g == w, -1.0, excess.nan_to_num(nan=float("inf")))
    off = int((excess > 0).sum())
    assert off == 0, (f"{label}: {off} of {w.numel()} elements beyond atol {atol:.3g} + rtol {rtol:.3g}; "
                      f"{_worst(g, w, excess)}")


def assert_within_torch_error(got: torch.Tensor, want: torch.Tensor, baseline: torch.Tensor, floor: float,
                              name: str = "") -> None:
    """``got``'s max error vs the float64 ``want`` is at most twice that of ``baseline`` (PyTorch's own computation
    in the op's dtype) plus ``floor`` x max(1, max|want|). The failure names the dtype and the worst element."""
    label = f"{name} ({_dtype_name(got.dtype)})"
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{label}: non-finite values"
    if not want.numel():
        return
    error = (got.double() - want).abs()
    err = error.max().item()
    allowed = 2 * (baseline.double() - want).abs().max().item() + floor * max(1.0, want.abs().max().item())
    assert err <= allowed, f"{label}: max error {err:.3g} > allowed {allowed:.3g}; {_worst(got, want, error)}"
