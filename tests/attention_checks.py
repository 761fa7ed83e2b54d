"""Shared checks for every attention_with_stats implementation against the float64 reference."""

from __future__ import annotations

import math

import torch

from beyond_cls import reference

# dtypes the CPU op takes. Low-precision results are judged against PyTorch's own error: the op's
# max error vs float64 must be at most 2x that of the reference computed in the op's dtype, plus
# 1e-5 relative (float32 statistics; also covers float64 inputs, whose statistics are float32).
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
FLOOR = 1e-5  # the float32 bound on statistics (relative)


def poison_heap(numel: int) -> None:
    """Leave NaNs in freed memory so an output element the op forgets to write shows up."""
    torch.full((numel,), float("nan")).sum()


def qkv_inputs(b, h, n, d, dtype, logit_scale=1.0, contiguous=True):
    if contiguous:
        q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    else:  # the layout timm's qkv reshape/permute produces
        qkv = torch.randn(b, n, 3, h, d, dtype=torch.float64).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    q = q * math.sqrt(logit_scale)
    k = k * math.sqrt(logit_scale)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check_against_reference(out, rows, q, k, v, prefix, scale, bias):
    exact_out, exact = reference.attention_with_stats(
        q.double(), k.double(), v.double(), prefix, scale, None if bias is None else bias.double()
    )
    # PyTorch's own computation in the kernel's dtype: eager attention in q's dtype for the output,
    # float32 statistics from the rounded inputs (the reference upcasts low-precision inputs)
    _, torch_rows = reference.attention_with_stats(q, k, v, prefix, scale, bias)
    torch_out = torch.matmul(reference.attention_logits(q, k, scale, bias).softmax(-1), v)
    assert out.dtype == v.dtype and out.shape == v.shape

    def assert_within(name, got, want, baseline):
        err = (got.double() - want).abs().max().item()
        allowed = 2 * (baseline.double() - want).abs().max().item() + FLOOR * max(1.0, want.abs().max().item())
        assert err <= allowed, f"{name}: max error {err:.3g} > allowed {allowed:.3g}"

    assert_within("out", out, exact_out, torch_out)
    for name in reference.AttentionRows._fields:
        got, want = getattr(rows, name), getattr(exact, name)
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert_within(name, got, want, getattr(torch_rows, name))


def check_kept_rows(kept, q, k, v, prefix, scale, bias, keep_rows):
    """Kept rows [B, H, R, N] against rows of the float64 softmax (and the float64 reference op)."""
    idx = [i % q.shape[-2] for i in keep_rows]
    bias64 = None if bias is None else bias.double()
    exact = reference.attention_logits(q.double(), k.double(), scale, bias64).softmax(-1)[..., idx, :]
    *_, exact_kept = reference.attention_with_stats(q.double(), k.double(), v.double(), prefix, scale, bias64,
                                                    keep_rows)
    assert torch.equal(exact_kept, exact)
    # PyTorch's own float32 computation (the op's accumulation dtype) from the same rounded inputs
    bias32 = None if bias is None else bias.float()
    torch_kept = reference.attention_logits(q.float(), k.float(), scale, bias32).softmax(-1)[..., idx, :]
    assert kept.dtype == torch.float32 and kept.shape == (*q.shape[:2], len(idx), q.shape[-2])
    assert not kept.isnan().any(), "kept rows left unwritten (NaN)"
    err = (kept.double() - exact).abs().max().item()
    allowed = 2 * (torch_kept.double() - exact).abs().max().item() + FLOOR
    assert err <= allowed, f"kept rows: max error {err:.3g} > allowed {allowed:.3g}"


def kept_bias(kind, b, h, n, prefix):
    """Biases for the keep_rows tests: none, BEiT relative position [H, N, N], per image [B, 1, N, N],
    masked keys, a [cls] logit 200 above the patches, and the last two together."""
    if kind is None:
        return None
    if kind == "beit":
        return torch.randn(h, n, n) * 2
    if kind == "per_image":
        return torch.randn(b, 1, n, n) * 2
    bias = torch.zeros(n, n)
    if "masked" in kind:
        bias[:, prefix + 10 : prefix + 40] = float("-inf")
    if "cls200" in kind:
        bias[:, 0] = 200.0
    return bias
