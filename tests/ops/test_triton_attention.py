"""The Triton attention_with_stats kernel against the float64 reference.

Without CUDA these run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1),
with small shapes; with CUDA the same tests run compiled, plus real model shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from beyond_cls import ops
from beyond_cls.kernels.attention_stats import CONFIGS, attention_with_stats_forward, head_dim_split
from beyond_cls.numerics import MAX_KEPT_ROWS
from beyond_cls.reference import AttentionRows
from beyond_cls.statistics import ROW_STATISTICS
from tests.ops.attention_checks import (
    assert_same_result,
    check_against_reference,
    check_kept_rows,
    kept_bias,
    poison_heap,
    qkv_inputs,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def run_kernel(q, k, v, prefix, scale=None, bias=None):
    out, stats = attention_with_stats_forward(q, k, v, prefix, scale, bias)
    return out, AttentionRows(stats, has_prefix=prefix > 0)


def check(q, k, v, prefix, scale=None, bias=None):
    to = dict(device=DEVICE)
    q, k, v = q.to(**to), k.to(**to), v.to(**to)
    bias = None if bias is None else bias.to(**to)
    poison_heap(q.numel() * 2, q.device)
    out, rows = run_kernel(q, k, v, prefix, scale, bias)
    cpu = [t.cpu() for t in (q, k, v)]
    rows = rows.apply(torch.Tensor.cpu)
    check_against_reference(out.cpu(), rows, *cpu, prefix, scale, None if bias is None else bias.cpu())
    return rows


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("n,prefix", [(197, 1), (65, 0), (261, 5), (70, 8)])
def test_triton_matches_reference(dtype, n, prefix):
    for logit_scale in (0.01, 1.0, 25.0):  # near-uniform .. near one-hot rows
        check(*qkv_inputs(1, 2, n, 64, dtype, logit_scale, contiguous=False), prefix)


@pytest.mark.parametrize("d", [8, 32, 48, 64, 80, 96, 112, 128])
def test_triton_head_dims(d):
    """Head dims as two power-of-two chunks: 80 = 64 + 16 (ViT-H) and 96 = 64 + 32 unpadded, 112 = 64 + 64 and 8
    (one chunk of 16) padded with masked loads."""
    check(*qkv_inputs(1, 2, 77, d, torch.bfloat16, 4.0), 1)


def test_head_dim_split():
    assert [head_dim_split(d) for d in (8, 16, 32, 48, 64, 80, 96, 112, 128)] == [
        (16, 0), (16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (64, 32), (64, 64), (128, 0)]


def with_config(monkeypatch, config):
    """Make every launch of the kernel module run at ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    from beyond_cls.kernels import attention_stats

    launch = attention_stats.launch
    monkeypatch.setattr(attention_stats, "launch", lambda grid, *a, **meta: launch(grid, *a, config=config, **meta))


# N − P patch keys: fewer than one block (masked block only), exactly one or two blocks (the masked block full,
# then none or one loop iteration), and one key more (a masked block of one key after the loop's)
TAIL_CASES = [(block_n, patches) for block_n in sorted({c[1] for c in CONFIGS})
              for patches in (block_n // 2 + 3, block_n, 2 * block_n, 2 * block_n + 1)]


@pytest.mark.parametrize("block_n,patches", TAIL_CASES)
def test_triton_last_block_masking(block_n, patches, monkeypatch):
    """Only the last block of patch keys is masked: N − P a multiple of BLOCK_N or not, shorter than a block."""
    with_config(monkeypatch, next(c for c in CONFIGS if c[1] == block_n))
    prefix = 1
    n = prefix + patches
    check(*qkv_inputs(1, 2, n, 64, torch.float32, 4.0, contiguous=False), prefix)
    bias = kept_bias("cls200_masked", 1, 2, n, prefix)  # -inf keys fall in the masked block and in full ones
    check(*qkv_inputs(1, 2, n, 64, torch.float32, 4.0), prefix, None, bias)


@pytest.mark.parametrize("prefix", [0, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_prefix_extremes(prefix, dtype):
    """No prefix token (no cls) and a full prefix block of 16 (registers), with masked keys and a prefix logit 200
    above the patches (the patch statistics stay exact while the prefix takes all of the attention)."""
    n = 100
    check(*qkv_inputs(1, 2, n, 64, dtype, 4.0, contiguous=False), prefix)
    bias = torch.zeros(n, n)
    bias[:, prefix + 10 : prefix + 40] = float("-inf")
    if prefix:
        bias[:, prefix - 1] = 200.0
    rows = check(*qkv_inputs(1, 2, n, 64, dtype, 4.0, contiguous=False), prefix, None, bias)
    if prefix:
        assert (rows.patch_mass < 1e-30).all() and torch.isfinite(rows.patch_entropy).all()


def integer_qkv(n, logit, sign=1.0):
    """fp32 q, k, v [1, 2, n, 64] with integer q, k: q·k = ±A² + Σ (small integers) is exact in float32, and with
    scale 1/16 the logits are ≈ ±``logit`` plus a few units, exactly representable like their float32 softmax
    inputs: PyTorch's float32 error is only its exp's, and any rounding at the logits' magnitude shows."""
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-3, 4, (1, 2, n, 64), generator=g).float()
    k = torch.randint(-3, 4, (1, 2, n, 64), generator=g).float()
    q[..., 0] = k[..., 0] = round((logit * 16) ** 0.5)
    k[..., 0] *= sign
    return q, k, torch.randn(1, 2, n, 64, generator=g)


@pytest.mark.parametrize("logit,sign", [(1e3, 1.0), (1e4, 1.0), (1e4, -1.0)])
def test_triton_large_logits(logit, sign):
    """Logits of magnitude 1e3..1e4 that differ by a few units keep float32 accuracy. Base-2 logits rounded at
    their magnitude before the max is subtracted would be off by up to 1e-3 (up to 1e-4 in the probabilities)."""
    scale = 1 / 16
    n = 97
    q, k, v = integer_qkv(n, logit, sign)
    logits = q.double() @ k.double().transpose(-1, -2) * scale
    assert logits.abs().min() > 0.9 * logit and torch.equal(logits.float().double(), logits)  # exact in float32
    assert (logits.amax(-1) - logits.amin(-1)).min() > 5  # rows are neither uniform nor one-hot
    rows = check(q, k, v, 1, scale)
    exact = logits.softmax(-1)
    naive = logits.float() * math.log2(math.e)  # base-2 logits rounded at their magnitude, then the max subtracted
    naive = torch.exp2(naive - naive.amax(-1, keepdim=True))
    assert ((naive / naive.sum(-1, keepdim=True)).double() - exact).abs().max() > 1e-5  # sharp enough to tell
    assert (rows.self_attn.cpu().double() - exact.diagonal(dim1=-2, dim2=-1)).abs().max() < 2e-6
    assert (rows.cls_attn.cpu().double() - exact[..., 0]).abs().max() < 2e-6
    bias = (torch.randint(-32, 33, (n, n)) / 16).float()  # |bias| <= 2, exact; logits stay exact in float32
    check(q, k, v, 1, scale, bias)


@pytest.mark.parametrize("bias_shape", [(1, 2, 97, 97), (97, 97), (2, 1, 97, 97), (97,)])
def test_triton_bias_and_scale(bias_shape):
    check(*qkv_inputs(2, 2, 97, 64, torch.float32), 1, 0.3, torch.randn(bias_shape) * 3)


def test_triton_negative_and_zero_scale():
    """The kernel takes row maxima of q·k before scaling: a negative scale runs on −q, a zero one is uniform."""
    q, k, v = qkv_inputs(1, 2, 70, 64, torch.float32, 4.0, contiguous=False)
    check(q, k, v, 1, -0.2)
    rows = check(q, k, v, 1, 0.0)
    torch.testing.assert_close(rows.self_attn, torch.full_like(rows.self_attn, 1 / 70))


def test_triton_masked_keys_and_dominant_prefix():
    n = 97
    bias = torch.zeros(n, n)
    bias[:, 10:40] = float("-inf")
    bias[:, 0] = 200.0  # patch mass ~ e^-200: exact only with a patch-relative normalizer
    rows = check(*qkv_inputs(1, 2, n, 64, torch.float32), 1, None, bias)
    assert torch.isfinite(rows.patch_entropy).all() and (rows.patch_entropy > 3.0).all()  # ~log(66) - 1
    assert (rows.patch_mass < 1e-30).all()  # e^-200 underflows float32: the entropy above did not


# one dtype per case (the interpreter is slow): bf16, the production dtype, on the shapes models use
@pytest.mark.parametrize(
    "dtype,n,prefix,bias_kind,keep",
    [
        (torch.bfloat16, 197, 1, "beit", (0, 106)),  # [cls] and the central patch, BEiT relative bias [H, N, N]
        (torch.float32, 257, 0, "per_image", (-1,)),
        (torch.bfloat16, 261, 5, "cls200_masked", (0, 4, -3)),  # registers, masked keys, [cls] 200 above patches
        (torch.float32, 97, 1, None, (0, 1, 31, 32, 63, 64, -2, -1)),  # eight rows, on block edges, two in a block
    ],
)
def test_triton_keep_rows(dtype, n, prefix, bias_kind, keep):
    """Kept rows are rows of the float64 softmax, and keeping them changes no other output."""
    q, k, v = (t.to(DEVICE) for t in qkv_inputs(2, 2, n, 64, dtype, 4.0, contiguous=False))
    bias = kept_bias(bias_kind, 2, 2, n, prefix)
    bias = None if bias is None else bias.to(DEVICE)
    plain = attention_with_stats_forward(q, k, v, prefix, None, bias)
    poison_heap(2 * 2 * len(keep) * n, q.device)
    results = attention_with_stats_forward(q, k, v, prefix, None, bias, keep)
    assert len(results) == 3 and len(plain) == 2
    # bit-equal in the interpreter; on a GPU KEEP_ROWS is in the autotune key: maybe another config
    assert_same_result(results[0], plain[0], "out")
    for i, row in enumerate(ROW_STATISTICS):
        assert_same_result(results[1][i], plain[1][i], row.name)
    cpu = [t.cpu() for t in (q, k, v)]
    check_kept_rows(results[2].cpu(), *cpu, prefix, None, None if bias is None else bias.cpu(), keep)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_triton_config_matches_reference(config, monkeypatch):
    """Each tiling in CONFIGS (the autotuner's candidates; the interpreter otherwise runs INTERPRET_CONFIG only),
    with registers, a bias, and kept rows on both sides of a query-block edge."""
    from beyond_cls.kernels import attention_stats

    with_config(monkeypatch, config)
    n, prefix, keep = 150, 5, (0, 63, 64, 129, -1)  # N spans several 32- and 64-token tiles, not one 256
    q, k, v = (t.to(DEVICE) for t in qkv_inputs(1, 2, n, 64, torch.float32, 4.0, contiguous=False))
    bias = kept_bias("cls200_masked", 1, 2, n, prefix).to(DEVICE)
    rows = check(q, k, v, prefix, None, bias)
    kept = attention_stats.attention_with_stats_forward(q, k, v, prefix, None, bias, keep)
    for i, row in enumerate(ROW_STATISTICS):
        assert_same_result(kept[1][i].cpu(), rows.stacked[i], row.name)
    check_kept_rows(kept[2].cpu(), q.cpu(), k.cpu(), v.cpu(), prefix, None, bias.cpu(), keep)


def test_triton_keep_rows_limits():
    from beyond_cls.kernels import attention_stats

    assert MAX_KEPT_ROWS == 8
    # the kernel module still names its limit (defined once, in numerics) and every name of its __all__
    assert attention_stats.MAX_KEPT_ROWS == MAX_KEPT_ROWS
    assert all(hasattr(attention_stats, name) for name in attention_stats.__all__)
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    for keep, match in (((0, -20), "twice"), ((20,), "outside"), (tuple(range(9)), "1 to 8")):
        with pytest.raises(ValueError, match=match):
            attention_with_stats_forward(q, q, q, 1, None, None, keep)


def test_triton_rejects_what_it_cannot_run():
    q = torch.randn(1, 2, 20, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        attention_with_stats_forward(q.double(), q.double(), q.double(), 1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        attention_with_stats_forward(q, q, q, 17)
    big = torch.randn(1, 1, 8, 256, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        attention_with_stats_forward(big, big, big, 1)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention_with_stats_forward(q, q, q, 1, None, torch.randn(3, 20, 20, device=DEVICE))


def test_ops_dispatches_to_triton(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    q, k, v = (t.to(DEVICE) for t in qkv_inputs(1, 2, 40, 32, torch.float32))
    assert ops.backend_for("attention_with_stats", q.device, q.dtype) == "triton"
    out, rows = ops.attention_with_stats(q, k, v, 1)
    direct = run_kernel(q, k, v, 1)
    # the same launch (same autotune key, so the same config): bit-equal on a GPU too
    assert torch.equal(out, direct[0]) and torch.equal(rows.patch_entropy, direct[1].patch_entropy)
    out, rows, kept = ops.attention_with_stats(q, k, v, 1, keep_rows=(0, -1))
    assert_same_result(out, direct[0], "out with kept rows")  # KEEP_ROWS is in the key: maybe another config
    assert torch.equal(kept, attention_with_stats_forward(q, k, v, 1, None, None, (0, 39))[2])
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32, got torch.float64"):
        ops.attention_with_stats(q.double(), k.double(), v.double(), 1)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [(8, 12, 197, 64), (8, 16, 197, 64), (4, 16, 257, 80), (4, 12, 261, 64), (2, 6, 1025, 64)]
)
def test_triton_real_shapes_on_gpu(shape):
    b, h, n, d = shape
    check(*qkv_inputs(b, h, n, d, torch.bfloat16, 4.0, contiguous=False), 5 if n == 261 else 1)


@pytest.mark.gpu
def test_poison_heap_reaches_the_next_cuda_outputs():
    """After poison_heap on a CUDA device, fresh allocations there read NaN: small ones (the statistics), ones of
    1-10 MiB and larger, also while live tensors hold parts of the allocator's cached segments."""
    live = [torch.randn(n, device="cuda") for n in (1000, 300_000, 2_000_000)]
    for _ in range(3):  # freed blocks of assorted sizes, as earlier tests leave them
        [torch.randn(n, device="cuda") for n in (5000, 200_000, 700_000, 4_000_000)]
    sizes = (8 * 12 * 197, 4 * 16 * 257, 100_000, 600_000, 3_000_000, 8_000_000)
    poison_heap(sum(sizes), "cuda")  # numel: all the outputs that follow
    fresh = [torch.empty(n, device="cuda") for n in sizes]
    for n, t in zip(sizes, fresh):
        assert t.isnan().all(), f"{n} float32: {t.isnan().float().mean().item():.0%} NaN"
    assert all(t.isfinite().all() for t in live)
