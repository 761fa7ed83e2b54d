"""attention_with_stats vs eager attention + stats vs SDPA (no stats), side by side in one run.

CPU: ViT-S/16 shapes, the C++ op. GPU (skipped without CUDA): ViT-B/L/H and DINOv2-reg shapes in
bf16, the Triton kernel. ``fused+keep2`` also returns two full attention rows (``keep_rows``: [cls] and
the central query), what the non-trainable aggregations and localization read. Run with ``make bench``
(CPU) or ``benchmarks/device.sh`` (GPU); each case records its shape, FLOPs (4·B·H·N²·d: q·kᵀ and
p·v) and device in ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from beyond_cls import _extension, reference
from beyond_cls.kernels.attention_stats import flops

CPU_SHAPES = {"vit_s16": (8, 6, 197, 64, 1)}
GPU_SHAPES = {
    "vit_b16": (256, 12, 197, 64, 1),
    "vit_l16": (256, 16, 197, 64, 1),
    "vit_h14": (256, 16, 257, 80, 1),
    "dinov2_b14_reg4": (256, 12, 261, 64, 5),
}


def _qkv(b, h, n, d, dtype, device):
    """q, k, v as timm's qkv reshape/permute leaves them (strided views of one tensor)."""
    qkv = torch.randn(b, n, 3, h, d, dtype=dtype, device=device).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _implementations(device: str):
    def eager(q, k, v, prefix):  # the authors' way: materialize attention, reduce afterwards
        return reference.attention_with_stats(q, k, v, prefix)

    def sdpa(q, k, v, prefix):
        if device != "cuda":
            return F.scaled_dot_product_attention(q, k, v)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the fastest SDPA there is, no statistics
            return F.scaled_dot_product_attention(q, k, v)

    if device == "cpu":
        _extension.load_error()

        def fused(q, k, v, prefix, keep=None):
            return torch.ops.beyond_cls.attention_with_stats(q, k, v, prefix, None, None, keep)
    else:
        from beyond_cls.kernels.attention_stats import attention_with_stats_forward

        def fused(q, k, v, prefix, keep=None):
            return attention_with_stats_forward(q, k, v, prefix, None, None, keep)

    def fused_keep(q, k, v, prefix):
        return fused(q, k, v, prefix, [0, q.shape[-2] // 2])

    return {"fused": fused, "fused+keep2": fused_keep, "eager+stats": eager, "sdpa": sdpa}


def _run(benchmark, impl, shape, dtype, device, rounds):
    b, h, n, d, prefix = shape
    q, k, v = _qkv(b, h, n, d, dtype, device)
    fn = _implementations(device)[impl]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        fn(q, k, v, prefix)
        sync()

    benchmark.extra_info.update(
        shape=list(shape), dtype=str(dtype).removeprefix("torch."), flops=flops(b, h, n, d),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        threads=torch.get_num_threads(),
    )
    with torch.inference_mode():
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=3, iterations=1)


IMPLS = ["fused", "fused+keep2", "eager+stats", "sdpa"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CPU_SHAPES))
def test_attention_cpu(benchmark, name, impl):
    if impl.startswith("fused") and not _extension.available():
        pytest.fail(f"C++ extension not built: {_extension.load_error()}")
    benchmark.group = f"attention-cpu-{name}"
    _run(benchmark, impl, CPU_SHAPES[name], torch.float32, "cpu", rounds=30)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(GPU_SHAPES))
def test_attention_gpu(benchmark, name, impl):
    benchmark.group = f"attention-gpu-{name}"
    _run(benchmark, impl, GPU_SHAPES[name], torch.bfloat16, "cuda", rounds=50)
