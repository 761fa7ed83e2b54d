"""Shared checks for every attention_with_stats implementation against the float64 reference."""

from __future__ import annotations

import math

import torch

from beyond_cls import reference
from beyond_cls.statistics import ROW_STATISTICS
from tests.tolerances import FLOORS, assert_within_torch_error

# dtypes the CPU op takes. Low-precision results are judged against PyTorch's own error: the op's
# max error vs float64 must be at most 2x that of the reference computed in the op's dtype, plus
# 1e-5 relative (float32 statistics; also covers float64 inputs, whose statistics are float32).
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
FLOOR = FLOORS[torch.float32]  # float32's floor for every input dtype: the statistics are float32


def poison_heap(numel: int, device: torch.device | str = "cpu") -> None:
    """Leave NaNs in freed memory on ``device`` so an output element the op forgets to write shows up.

    ``numel``: float32 elements, at least those of all the outputs allocated next. CPU: a freed NaN
    block of ``numel`` float32 on the heap. CUDA: PyTorch's caching allocator hands freed blocks to the
    next allocations, so every free block it caches is filled with NaN and freed again, beside fresh
    NaN segments of both of its pools (at least ``numel`` float32 each)."""
    device = torch.device(device)
    if device.type == "cuda":
        _poison_cuda(numel, device)
    else:
        torch.full((numel,), float("nan")).sum()


_SMALL_REQUEST = 1 << 20  # the caching allocator serves requests up to 1 MiB from 2 MiB "small" segments
_LARGE_SEGMENT = 20 << 20  # and requests of 1-10 MiB from 20 MiB segments


def _poison_cuda(numel: int, device: torch.device) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(index)
    torch.cuda.empty_cache()  # releases the wholly free segments; free parts of used ones stay cached
    held = []

    def nan_block(nbytes: int) -> None:
        held.append(torch.full((max(1, nbytes // 4),), float("nan"), device=device))

    left = None
    while True:  # fill the cached free blocks (beside live tensors) until none is left
        free = [(seg["segment_type"], block["size"]) for seg in torch.cuda.memory_snapshot()
                if seg["device"] == index for block in seg["blocks"] if block["state"] == "inactive"]
        if not free or (left is not None and sum(size for _, size in free) >= left):
            break  # all filled (or the allocator took a request elsewhere: stop rather than grow)
        left = sum(size for _, size in free)
        pool, size = free[0]
        # a request of exactly a free block's size takes it (best fit); small-pool requests stay <= 1 MiB
        nan_block(min(size, _SMALL_REQUEST) if pool == "small" else size)
    # fresh segments, all NaN: two 1 MiB requests fill one small segment, one request a large one
    for _ in range(2 * max(1, -(-4 * numel // (2 * _SMALL_REQUEST)))):
        nan_block(_SMALL_REQUEST)
    nan_block(max(_LARGE_SEGMENT, 4 * numel))
    torch.cuda.synchronize(index)
    held.clear()


# Two launches of the compiled kernel with different autotune keys (e.g. with and without kept rows:
# KEEP_ROWS is in the key) may run different BLOCK_M / BLOCK_N, so keys are summed in another order and
# p is rounded to the inputs' dtype against another running max before p·v. Allowed differences:
# - float32 outputs (fp32 inputs' out; every statistic and kept row): 3xTF32 dots (~1e-6 relative) and
#   another summation order over keys: rtol 1e-5, atol 1e-6.
# - bfloat16 out: rounded to bf16 (one step is 2^-7 relative) after p rounded to bf16 (2^-9 relative
#   per key): rtol = atol = 2^-6.
# - float16 out: likewise with 2^-10 and 2^-11: rtol = atol = 2^-9.
# In the interpreter one config (INTERPRET_CONFIG) runs for every key, so results stay bit-equal there.
ACROSS_CONFIGS = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-6, atol=2**-6),
    torch.float16: dict(rtol=2**-9, atol=2**-9),
}


def assert_same_result(got: torch.Tensor | None, want: torch.Tensor | None, name: str = "") -> None:
    """Two kernel launches that may differ only in launch config: bit-equal on CPU (interpreter, one config),
    within ``ACROSS_CONFIGS`` of the tensors' dtype on a GPU (autotuned, perhaps different configs)."""
    if got is None or want is None:
        assert got is None and want is None, name
        return
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if got.device.type == "cpu":
        assert torch.equal(got, want), name
    else:
        torch.testing.assert_close(got, want, **ACROSS_CONFIGS[got.dtype], msg=lambda m: f"{name}: {m}")


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
        assert_within_torch_error(got, want, baseline, FLOOR, name)

    assert_within("out", out, exact_out, torch_out)
    check_stacked_rows(rows, exact, q.shape[:3])
    for i, row in enumerate(ROW_STATISTICS):  # every plane, a_i0's too without prefix tokens (written either way)
        assert_within(row.name, rows.stacked[i], exact.stacked[i], torch_rows.stacked[i])


def check_stacked_rows(rows, exact, shape) -> None:
    """``rows`` is a float32 view over one stacked [S, B, H, N] tensor in ROW_STATISTICS order, with the same rows
    present as the reference's ``exact`` (cls_attn None without prefix tokens); attributes and mapping are its
    planes."""
    assert isinstance(rows, reference.AttentionRows)
    assert rows.stacked.dtype == torch.float32 and rows.stacked.shape == (len(ROW_STATISTICS), *shape)
    assert list(rows) == list(exact), (list(rows), list(exact))
    for i, row in enumerate(ROW_STATISTICS):
        got = getattr(rows, row.name)
        if getattr(exact, row.name) is None:
            assert got is None and row.name not in rows, row.name
            continue
        assert got.data_ptr() == rows.stacked[i].data_ptr() and got.shape == tuple(shape), row.name
        assert rows[row.name].data_ptr() == got.data_ptr(), row.name


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
    assert_within_torch_error(kept, exact, torch_kept, FLOOR, "kept rows")  # rows of probabilities: |exact| <= 1


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
