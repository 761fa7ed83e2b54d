"""The recorder's per-block cost: float32 batch sums within tolerance of float64, few host ops, one compiled graph,
and no copy of the attention output on its way to the projection."""

from __future__ import annotations

import collections
import math

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from beyond_cls import _extension, ops
from beyond_cls.analysis import AttentionRecorder
from beyond_cls.analysis import recorder as recorder_module
from beyond_cls.analysis.recorder import add_batch_sums, batch_sums, sum_fields
from beyond_cls.reference import AttentionRows
from beyond_cls.statistics import find

# The fused op is one node in the CPU dispatch counts; the interpreter stands in for the C++ op without the extension.
FUSED_CPU = "cpp" if _extension.available() else "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COPIES = {"aten.clone.default", "aten.copy_.default", "aten._to_copy.default", "aten.contiguous.default"}


class OpLog(TorchDispatchMode):
    """Every ATen/custom op dispatched while active, with its tensor outputs' (dtype, numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.outputs: list[tuple[str, torch.dtype, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.ops[str(func)] += 1
        outs = result if isinstance(result, (tuple, list)) else (result,)
        self.outputs += [(str(func), t.dtype, t.numel()) for t in outs if isinstance(t, torch.Tensor)]
        return result


def random_rows(batch: int, heads: int, n: int, prefix: int, dtype=torch.float32) -> AttentionRows:
    """Statistics with the ranges of real ones: a_ii <= m_i <= 1, a_i0 <= 1 - m_i, 0 <= H_i <= log |J|."""
    mass = torch.rand(batch, heads, n, dtype=torch.float64)
    self_attn = mass * torch.rand_like(mass)
    cls_attn = (1 - mass) * torch.rand_like(mass)
    entropy = math.log(n - prefix) * torch.rand_like(mass)
    planes = {"self_attn": self_attn, "cls_attn": cls_attn, "patch_mass": mass, "patch_entropy": entropy}
    return AttentionRows.from_planes({n: t.to(dtype) for n, t in planes.items()}, has_prefix=prefix > 0)


def tiny_vit(device: str = DEVICE, **kwargs) -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=64, **kwargs)
    return model.eval().to(device)


def float64_means(batches: list[AttentionRows], prefix: int, has_cls: bool) -> dict[str, torch.Tensor]:
    """The recorder's former path: every [B, H, N] statistic cast to float64, per-image means, then sums."""
    sums: dict[str, torch.Tensor] = collections.defaultdict(float)
    images = 0
    for rows in batches:
        r = rows.apply(torch.Tensor.double)
        sums["patch_self"] += (r.self_attn[:, :, prefix:] / r.patch_mass[:, :, prefix:]).mean(-1).sum(0)
        sums["patch_patch_entropy"] += r.patch_entropy[:, :, prefix:].mean(-1).sum(0)
        if has_cls:
            sums["patch_cls"] += r.cls_attn[:, :, prefix:].mean(-1).sum(0)
            sums["cls_self"] += r.self_attn[:, :, 0].sum(0)
            sums["cls_patch_entropy"] += r.patch_entropy[:, :, 0].sum(0)
            sums["cls_patch_mass"] += r.patch_mass[:, :, 0].sum(0)
        images += r.self_attn.shape[0]
    return {k: v / images for k, v in sums.items()}


@pytest.mark.parametrize("prefix,has_cls", [(1, True), (5, True), (4, False), (0, False)])
def test_float32_batch_sums_match_float64_means(prefix, has_cls):
    """Accepted error of the float32 batch sums: relative 1e-6 on every per-head mean (B=256, N=197, 3 batches)."""
    n, heads = 197 + prefix - 1, 12
    batches = [random_rows(b, heads, n, prefix) for b in (256, 256, 77)]
    fields, per_query = sum_fields(has_cls)
    total = torch.zeros(len(fields), heads, dtype=torch.float64)
    for rows in batches:
        partial = batch_sums(rows, prefix, has_cls)
        assert partial.dtype == torch.float32 and partial.shape == (len(fields), heads)
        total = add_batch_sums(total, rows, prefix, has_cls)
    assert total.dtype == torch.float64
    images = sum(r.self_attn.shape[0] for r in batches)
    assert all(find(name).queries == "patches" for name in fields[:per_query])
    assert all(find(name).queries == "cls" for name in fields[per_query:])
    counts = [images * (n - prefix)] * per_query + [images] * (len(fields) - per_query)
    want = float64_means(batches, prefix, has_cls)
    assert set(want) == set(fields)
    for i, name in enumerate(fields):
        got = total[i] / counts[i]
        rel = ((got - want[name]).abs() / want[name].abs()).max().item()
        assert rel <= 1e-6, (name, rel)
        assert rel > 0 or name.startswith("cls_"), name  # the float32 sums over patch queries do round


def test_float64_statistics_are_summed_in_float64():
    rows = random_rows(8, 3, 20, 1, torch.float64)
    assert batch_sums(rows, 1, True).dtype == torch.float64  # the reference backend's float64 rows stay exact
    want = (rows.self_attn[..., 1:] / rows.patch_mass[..., 1:]).sum((0, 2))
    patch_self = sum_fields(True)[0].index("patch_self")
    torch.testing.assert_close(batch_sums(rows, 1, True)[patch_self], want, rtol=1e-14, atol=0)
    assert torch.equal(batch_sums(rows.stacked, 1, True), batch_sums(rows, 1, True))  # the stacked tensor alike


def test_summary_equals_the_float64_path(monkeypatch):
    """End to end: the recorder's means equal the former float64 path's on the same rows (two ragged batches)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", FUSED_CPU)
    model = tiny_vit("cpu", reg_tokens=4)
    captured = []
    op = ops.attention_with_stats

    def spy(*args, **kwargs):
        result = op(*args, **kwargs)
        captured.append(result[1])
        return result

    monkeypatch.setattr(ops, "attention_with_stats", spy)
    images = torch.randn(5, 3, 64, 64)
    with torch.inference_mode(), AttentionRecorder(model) as rec:
        for batch in (images[:3], images[3:]):
            model.forward_features(batch)
    summary, blocks = rec.summary(), len(model.blocks)
    assert len(captured) == 2 * blocks and summary.num_images == 5
    for block in range(blocks):
        want = float64_means(captured[block::blocks], rec.num_prefix_tokens, rec.has_class_token)
        assert set(want) == set(summary.fields())
        for name, value in want.items():
            torch.testing.assert_close(summary.fields()[name][block], value, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4, "class_token": False, "global_pool": "avg"}])
def test_recorder_adds_few_host_ops_per_block(kwargs, monkeypatch):
    """ATen ops the recorder adds per block and batch to the module's own forward (the fused op for SDPA, the
    statistics, the output cast), eager on CPU: the former float64 path added 28 with [cls] and 15 without, this
    one 15 and 9 (the fused op; per query set a slice and a split of the stacked rows; a sum per statistic; one
    division; the stack, the add, the output cast; bounds: one op of slack); no float64 tensor larger than the
    [fields, heads] running sums. On CUDA the statistics are one compiled call instead (tested below)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", FUSED_CPU)
    model = tiny_vit("cpu", **kwargs)
    images = torch.randn(2, 3, 64, 64)
    blocks = len(model.blocks)
    with torch.inference_mode():
        with OpLog() as plain:
            model.forward_features(images)
        with AttentionRecorder(model) as rec:
            model.forward_features(images)  # the first batch also allocates the running sums
            with OpLog() as recorded:
                model.forward_features(images)
    added = recorded.ops.copy()
    added.subtract(plain.ops)
    assert added.pop("aten.scaled_dot_product_attention.default") == -blocks
    assert added.pop("beyond_cls.attention_stats.default") == blocks
    assert min(added.values()) >= 0, added  # nothing else of the module's own forward goes missing
    per_block = sum(added.values()) / blocks
    assert per_block <= (16 if rec.has_class_token else 10), dict(added)
    heads = model.blocks[0].attn.num_heads
    sums_size = len(sum_fields(True)[0]) * heads
    big64 = [(f, n) for f, dtype, n in recorded.outputs if dtype == torch.float64 and n > sums_size]
    assert not big64, big64
    assert rec.summary().num_images == 4


def test_compiled_reduction_is_one_graph_for_every_block(monkeypatch):
    """On CUDA the reduction is torch.compile'd: one graph serves all blocks; a new batch size compiles once more."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(add_batch_sums, backend=counting_backend, fullgraph=True)
    monkeypatch.setattr(recorder_module, "batch_accumulator", lambda device: compiled)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    model = tiny_vit(reg_tokens=4)
    images = torch.randn(8, 3, 64, 64, device=DEVICE)
    try:
        summaries = []
        for accumulator in (compiled, add_batch_sums):
            monkeypatch.setattr(recorder_module, "batch_accumulator", lambda device, fn=accumulator: fn)
            with torch.inference_mode(), AttentionRecorder(model) as rec:
                for batch in (images[:3], images[3:6], images[6:]):  # 3, 3, then 2 images
                    model.forward_features(batch)
            summaries.append(rec.summary())
    finally:
        torch._dynamo.reset()
    assert len(model.blocks) == 2 and len(graphs) == 2, len(graphs)
    for name, value in summaries[1].fields().items():
        assert torch.equal(summaries[0].fields()[name], value), name


@pytest.mark.gpu
def test_compiled_reduction_on_cuda_matches_eager(monkeypatch):
    """The default CUDA path (Inductor) compiles one graph for both blocks and agrees with the eager sums."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    model = tiny_vit(reg_tokens=4)
    images = torch.randn(8, 3, 64, 64, device="cuda")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    summaries = []
    for accumulator in (recorder_module.batch_accumulator(torch.device("cuda")), add_batch_sums):
        monkeypatch.setattr(recorder_module, "batch_accumulator", lambda device, fn=accumulator: fn)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16), AttentionRecorder(model) as rec:
            for batch in (images[:4], images[4:]):
                model.forward_features(batch)
        summaries.append(rec.summary())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for name, value in summaries[1].fields().items():
        torch.testing.assert_close(summaries[0].fields()[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_attention_output_reaches_the_projection_without_a_copy(monkeypatch):
    """The fused op writes its output as [B, N, H, d] storage behind a [B, H, N, d] view: merging heads for the
    projection is then a view, and the recorder must not copy it (no ``.to``, ``contiguous`` or reshape copy)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    monkeypatch.setattr(recorder_module, "batch_accumulator", lambda device: add_batch_sums)  # eager under OpLog
    model = tiny_vit()
    outs, proj_inputs = [], []
    op = ops.attention_with_stats

    def spy(*args, **kwargs):
        result = op(*args, **kwargs)
        outs.append(result[0])
        return result

    monkeypatch.setattr(ops, "attention_with_stats", spy)
    hooks = [b.attn.proj.register_forward_pre_hook(lambda _m, args: proj_inputs.append(args[0]))
             for b in model.blocks]
    images = torch.randn(1, 3, 64, 64, device=DEVICE)
    try:
        with torch.inference_mode(), AttentionRecorder(model), OpLog() as log:
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    assert len(outs) == len(proj_inputs) == len(model.blocks)
    for out, x in zip(outs, proj_inputs):
        assert out.transpose(1, 2).is_contiguous(), f"the fused op returned {tuple(out.stride())} strides"
        assert x.data_ptr() == out.data_ptr() and x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    copies = {f: c for f, c in log.ops.items() if f in COPIES}
    assert not copies, copies
