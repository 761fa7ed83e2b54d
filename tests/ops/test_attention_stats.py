"""ops.attention_with_stats: every backend against the float64 reference, its custom op, the dispatch rules."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from beyond_cls import _extension, ops, reference
from beyond_cls.models.architectures.attention import finish
from beyond_cls.numerics import MAX_KEPT_ROWS
from beyond_cls.ops._dispatch import unavailable
from beyond_cls.statistics import ROW_STATISTICS
from tests.ops.attention_checks import (
    DTYPES,
    check_against_reference,
    check_kept_rows,
    kept_bias,
    poison_heap,
    qkv_inputs,
)

needs_cpp = pytest.mark.skipif(not _extension.available(), reason=f"C++ extension: {_extension.load_error()}")
# the fused backends that run CPU tensors here (Triton: in its interpreter, set by conftest without CUDA)
CUSTOM_OP_BACKENDS = [b for b in ("cpp", "triton")
                      if unavailable(b, "attention_with_stats", torch.device("cpu"), torch.float32) is None]

@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,prefix", [(197, 1), (257, 0), (261, 5), (65, 8)])
@pytest.mark.parametrize("d", [64, 80])
def test_cpp_matches_reference(dtype, n, prefix, d, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    for logit_scale in (0.01, 1.0, 25.0):
        q, k, v = qkv_inputs(2, 3, n, d, dtype, logit_scale, contiguous=False)
        poison_heap(2 * 3 * n * d * 2)
        out, rows = ops.attention_with_stats(q, k, v, prefix)
        check_against_reference(out, rows, q, k, v, prefix, None, None)


@needs_cpp
@pytest.mark.parametrize(
    "bias_shape", [(1, 4, 197, 197), (197, 197), (2, 1, 197, 197), (4, 1, 197), (197,)]
)
def test_cpp_bias_broadcasts(bias_shape, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    q, k, v = qkv_inputs(2, 4, 197, 32, torch.float32)
    bias = torch.randn(bias_shape) * 3
    out, rows = ops.attention_with_stats(q, k, v, 1, 0.3, bias)
    check_against_reference(out, rows, q, k, v, 1, 0.3, bias)


@needs_cpp
def test_cpp_masked_keys_and_dominant_prefix(monkeypatch):
    """-inf bias entries (0·log 0) and rows whose [cls] logit dwarfs all patch logits."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    n = 197
    q, k, v = qkv_inputs(1, 2, n, 64, torch.float32)
    bias = torch.zeros(n, n)
    bias[:, 10:40] = float("-inf")
    bias[:, 0] = 200.0  # patch mass ~ e^-200: only a patch-relative softmax keeps the entropy exact
    out, rows = ops.attention_with_stats(q, k, v, 1, None, bias)
    check_against_reference(out, rows, q, k, v, 1, None, bias)
    assert (rows.patch_mass < 1e-30).all()  # e^-200 underflows float32: the entropy below did not
    assert torch.isfinite(rows.patch_entropy).all()
    assert (rows.patch_entropy > 4.0).all()  # ~ log(166) for near-uniform patch logits


@needs_cpp
def test_cpp_output_matches_sdpa(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    q, k, v = qkv_inputs(2, 6, 197, 64, torch.float32)
    out, _ = ops.attention_with_stats(q, k, v, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


OP = torch.ops.beyond_cls.attention_stats  # the custom op of beyond_cls.ops.attention_stats


@pytest.mark.parametrize("backend", CUSTOM_OP_BACKENDS)
def test_custom_op_is_registered_and_traceable(backend):
    q, k, v = qkv_inputs(1, 2, 17, 8, torch.float32)
    bias = torch.randn(17, 17)
    torch.library.opcheck(OP.default, (q, k, v, 1, None, bias, None, backend))
    # q, k, v as timm makes them: strided views of one fused qkv (the fake's out has the kernels' layout regardless)
    strided = torch.randn(2, 17, 3 * 2 * 8).reshape(2, 17, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    torch.library.opcheck(OP.default, (*strided, 1, None, None, [0], backend))
    fake = OP(q.to("meta"), k.to("meta"), v.to("meta"), 1, None, None, None, backend)
    assert fake[0].shape == q.shape and fake[1].shape == (len(ROW_STATISTICS), 1, 2, 17)
    assert fake[1].dtype == torch.float32
    assert fake[0].stride() == OP(q, k, v, 1, None, None, None, backend)[0].stride() == (17 * 2 * 8, 8, 2 * 8, 1)
    assert fake[2].shape == (1, 2, 0, 17)
    # CUDA tensors reach the Triton kernel through the same operator
    assert torch._C._dispatch_has_kernel_for_dispatch_key("beyond_cls::attention_stats", "CUDA")


@pytest.mark.parametrize("backend", CUSTOM_OP_BACKENDS)
def test_public_function_is_one_graph_node(backend, monkeypatch):
    """Under torch.compile attention_with_stats traces (fullgraph) to one call of the custom op, for the C++
    and the Triton kernel alike (the graph is the same on CUDA: only the op's kernel differs)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    q, k, v = qkv_inputs(1, 2, 40, 16, torch.float32)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(q, k, v):
        out, rows, kept = ops.attention_with_stats(q, k, v, 1, None, None, keep_rows=(0, -1))
        return out, rows.patch_entropy, kept

    torch._dynamo.reset()
    got = torch.compile(f, backend=capture, fullgraph=True)(q, k, v)
    (graph,) = graphs
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert calls.count(OP.default) == 1, calls
    assert all(target is OP.default or "getitem" in str(target) for target in calls), calls
    for g, w in zip(got, f(q, k, v)):
        assert torch.equal(g, w)


LAYOUT_BACKENDS = ["reference", *[pytest.param(b, marks=needs_cpp) if b == "cpp" else b for b in CUSTOM_OP_BACKENDS]]


@pytest.mark.parametrize("backend", LAYOUT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_is_stored_as_sdpa_s(backend, dtype, monkeypatch):
    """Every backend's out [B, H, N, d] is stored [B, N, H, d], as SDPA's: the attention module's ``finish`` merges
    the heads without a copy, kept rows or not, and under torch.compile the op's fake has the real strides."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    b, h, n, d = 2, 3, 17, 8
    q, k, v = qkv_inputs(b, h, n, d, dtype, contiguous=False)
    identity = types.SimpleNamespace(proj=lambda x: x)  # no norm, gate or dropout: finish returns the merged heads
    for keep_rows in (None, (0, -1)):
        out = ops.attention_with_stats(q, k, v, 1, keep_rows=keep_rows)[0]
        assert out.dtype == dtype and out.shape == (b, h, n, d) and out.stride() == (n * h * d, d, h * d, 1)
        merged = finish(identity, out, None)
        assert merged.shape == (b, n, h * d) and merged.data_ptr() == out.data_ptr()
        assert merged.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()  # a view, not a copy
    if backend != "reference":
        fake = OP(q.to("meta"), k.to("meta"), v.to("meta"), 1, None, None, [0], backend)[0]
        assert fake.stride() == out.stride() and fake.dtype == out.dtype
        torch._dynamo.reset()
        compiled = torch.compile(lambda *t: ops.attention_with_stats(*t, 1)[0], backend="aot_eager", fullgraph=True)
        assert compiled(q, k, v).stride() == out.stride()


@needs_cpp
def test_max_kept_rows_agrees_with_the_cpp_op():
    """Python's MAX_KEPT_ROWS is the C++ kMaxKeptRows: the C++ op keeps that many rows and refuses one more."""
    q = torch.randn(1, 2, MAX_KEPT_ROWS + 4, 8)
    op = torch.ops.beyond_cls.attention_with_stats
    assert op(q, q, q, 1, None, None, list(range(MAX_KEPT_ROWS)))[2].shape[2] == MAX_KEPT_ROWS
    with pytest.raises(RuntimeError, match=f"at most {MAX_KEPT_ROWS} "):
        op(q, q, q, 1, None, None, list(range(MAX_KEPT_ROWS + 1)))


@pytest.mark.parametrize("backend", CUSTOM_OP_BACKENDS)
def test_backward_through_the_op_raises(backend, monkeypatch):
    """Analysis is inference: the forward runs on tensors that require grad, a backward raises."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    q, k, v = (t.requires_grad_() for t in qkv_inputs(1, 2, 20, 8, torch.float32))
    out, _ = ops.attention_with_stats(q, k, v, 1)
    with pytest.raises(RuntimeError, match="no autograd"):
        out.sum().backward()


@needs_cpp
@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 8, 4), 1), "one shape"),
        ((torch.randn(2, 8, 4),) * 3 + (1,), r"\[B, H, N, d\]"),
        ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4).double(), torch.randn(1, 2, 8, 4), 1), "dtype"),
        ((torch.randn(1, 2, 8, 4),) * 3 + (8,), "num_prefix_tokens"),
        ((torch.ones(1, 2, 8, 4, dtype=torch.int32),) * 3 + (1,), "float32/float64"),
    ],
)
def test_cpp_rejects_bad_inputs_by_name(args, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.beyond_cls.attention_with_stats(*args)


@needs_cpp
def test_cpp_rejects_non_broadcastable_bias():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        torch.ops.beyond_cls.attention_with_stats(q, q, q, 1, None, torch.randn(3, 8, 8))


# (N, prefix, bias, keep_rows): ViT-B/16 (central patch 1 + 7·14 + 7 = 106), 256 patches without
# prefix, 4 registers + [cls]; BEiT relative bias [H, N, N], per-image bias, masked keys, [cls] +200
KEPT_CASES = [
    (197, 1, None, (0,)),
    (197, 1, "beit", (0, 106)),
    (257, 0, "per_image", (128, -1)),
    (261, 5, "masked", (0, 4, -3)),
    (197, 1, "cls200", (106, 0, -1)),
    (261, 5, "cls200_masked", (-261, 5, 260)),
]
KEPT_BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("backend", KEPT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,prefix,bias_kind,keep", KEPT_CASES)
def test_keep_rows_are_rows_of_the_softmax(backend, dtype, n, prefix, bias_kind, keep, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    q, k, v = qkv_inputs(2, 3, n, 64, dtype, 4.0, contiguous=False)
    bias = kept_bias(bias_kind, 2, 3, n, prefix)
    plain_out, plain_rows = ops.attention_with_stats(q, k, v, prefix, None, bias)
    poison_heap(2 * 3 * len(keep) * n)
    out, rows, kept = ops.attention_with_stats(q, k, v, prefix, None, bias, keep_rows=keep)
    # the kept rows change nothing else
    assert torch.equal(out, plain_out)
    assert list(rows) == list(plain_rows) and torch.equal(rows.stacked, plain_rows.stacked)
    if backend == "reference" and dtype == torch.float64:
        assert kept.dtype == torch.float64  # the ground truth stays float64
        kept = kept.float()
    check_kept_rows(kept, q, k, v, prefix, None, bias, keep)
    # and agree with the statistics of the same rows
    for r, i in enumerate(keep):
        torch.testing.assert_close(kept[:, :, r, i], rows.self_attn[:, :, i].float(), rtol=1e-5, atol=1e-7)
        if prefix:
            torch.testing.assert_close(kept[:, :, r, 0], rows.cls_attn[:, :, i].float(), rtol=1e-5, atol=1e-7)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_rows_agree_across_backends(dtype, monkeypatch):
    """C++, Triton (interpreted here) and the reference give the same kept rows, up to eight of them."""
    n, keep = 197, (0, 1, 63, 64, 106, 130, -2, -1)
    q, k, v = qkv_inputs(1, 2, n, 64, dtype, 4.0, contiguous=False)
    bias = kept_bias("beit", 1, 2, n, 1)
    kept = {}
    for backend in ("reference", "cpp", "triton"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
        # Triton takes CPU tensors only in the interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        args = [t.to(device) for t in (q, k, v, bias)]
        kept[backend] = ops.attention_with_stats(*args[:3], 1, None, args[3], keep_rows=keep)[2].cpu()
    for backend in ("cpp", "triton"):
        torch.testing.assert_close(kept[backend], kept["reference"], rtol=1e-5, atol=1e-6, msg=backend)


@pytest.mark.parametrize("backend", KEPT_BACKENDS)
@pytest.mark.parametrize(
    "keep,error,match",
    [
        ((0, -10), ValueError, "name the same query twice"),
        ((10,), ValueError, r"outside \[-10, 10\)"),
        ((-11,), ValueError, "outside"),
        (tuple(range(9)), ValueError, "1 to 8"),
        ((), ValueError, "1 to 8"),
        (0, TypeError, "sequence of query indices"),
        ((0.5,), TypeError, "integers"),
    ],
)
def test_keep_rows_rejects_bad_indices(backend, keep, error, match, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(error, match=match):
        ops.attention_with_stats(q, q, q, 1, keep_rows=keep)


@needs_cpp
def test_keep_rows_op_checks_and_traces():
    q, k, v = qkv_inputs(1, 2, 17, 8, torch.float32)
    bias = torch.randn(17, 17)
    torch.library.opcheck(OP.default, (q, k, v, 1, None, bias, [0, 5, 16], "cpp"))
    assert OP(q, k, v, 1, None, None, None, "cpp")[2].shape == (1, 2, 0, 17)  # no keep_rows: empty [B, H, 0, N]
    fake = OP(q.to("meta"), k.to("meta"), v.to("meta"), 1, None, None, [0, 5, 16], "cpp")
    assert fake[2].shape == (1, 2, 3, 17) and fake[2].dtype == torch.float32
    assert fake[1].shape == (len(ROW_STATISTICS), 1, 2, 17) and fake[1].dtype == torch.float32  # stacked rows
    cpp_op = torch.ops.beyond_cls.attention_with_stats  # validates keep_rows itself
    assert cpp_op(q, k, v, 1)[2].shape == (1, 2, 0, 17)
    assert cpp_op(q, k, v, 1)[1].shape == (len(ROW_STATISTICS), 1, 2, 17)
    for keep, match in (([0, -17], "twice"), ([17], "outside"), (list(range(9)), "at most 8")):
        with pytest.raises(RuntimeError, match=match):
            cpp_op(q, k, v, 1, None, None, keep)


@needs_cpp
def test_keep_rows_compile_fullgraph(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    q, k, v = qkv_inputs(2, 3, 197, 64, torch.float32)
    bias = torch.randn(3, 197, 197)

    def f(q, k, v, bias):
        out, rows, kept = ops.attention_with_stats(q, k, v, 1, None, bias, keep_rows=(0, 106))
        return out, rows.patch_entropy, kept

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, bias)
    for g, w in zip(got, f(q, k, v, bias)):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w)
    assert got[2].shape == (2, 3, 2, 197)


def test_backend_env_switch(monkeypatch):
    q, k, v = qkv_inputs(1, 2, 20, 8, torch.float64)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    assert ops.backend_for("attention_with_stats", q.device) == "reference"
    out, rows = ops.attention_with_stats(q, k, v, 1)
    assert rows.patch_entropy.dtype == torch.float64  # the reference keeps float64
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="BEYOND_CLS_BACKEND=triton"):
        ops.attention_with_stats(q, k, v, 1)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "fast")
    with pytest.raises(ValueError, match="BEYOND_CLS_BACKEND"):
        ops.attention_with_stats(q, k, v, 1)


def test_default_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("BEYOND_CLS_BACKEND", raising=False)
    want = "cpp" if _extension.available() else "reference"
    assert ops.backend_for("attention_with_stats", torch.device("cpu")) == want
    assert ops.backend_for("abmilp_pool", torch.device("cpu")) == want


def test_abmilp_pool_front_matches_reference():
    tokens, w = torch.randn(2, 30, 12), torch.randn(12)
    got = ops.abmilp_pool(tokens, w, 0.5)
    want = reference.abmilp_pool(tokens, w, 0.5)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
def test_cuda_tensors_get_a_working_backend():
    q, k, v = qkv_inputs(2, 12, 197, 64, torch.bfloat16)
    assert ops.backend_for("attention_with_stats", torch.device("cuda"), torch.bfloat16) == "triton"
    q_cuda, k_cuda, v_cuda = q.cuda(), k.cuda(), v.cuda()
    poison_heap(q.numel() * 2, q_cuda.device)
    out, rows = ops.attention_with_stats(q_cuda, k_cuda, v_cuda, 1)
    rows = rows.apply(torch.Tensor.cpu)
    check_against_reference(out.cpu(), rows, q, k, v, 1, None, None)
