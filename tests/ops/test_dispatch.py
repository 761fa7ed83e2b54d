"""beyond_cls.ops' layout and backend policy: one custom op per fused kernel, each with one fake, chosen once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from beyond_cls import _extension, ops
from beyond_cls.ops import _dispatch
from tests.tolerances import assert_close

ROOT = Path(__file__).resolve().parents[2]
CUSTOM_OPS = ("attention_stats", "abmilp_pool", "abmilp_pool_grad", "softmax_pool", "softmax_pool_grad")
CPP_OPS = ("attention_with_stats", "abmilp_forward", "abmilp_backward", "softmax_pool_forward",
           "softmax_pool_backward")


def _sources() -> dict[Path, str]:
    files = list((ROOT / "beyond_cls").rglob("*.py"))
    return {path: path.read_text(encoding="utf-8") for path in files}


def test_every_custom_op_has_one_fake_and_the_cpp_ops_none():
    """Each custom op gets its fake once, in its own module; the C++ ops run only inside the custom ops' kernels
    and have no fake (no registration is dead)."""
    defined, fakes = [], []
    for path, text in _sources().items():
        defined += [(name, path.parent.name) for name in re.findall(r'custom_op\(\s*"beyond_cls::(\w+)"', text)]
        fakes += [path.parent.name] * text.count("register_fake")
    assert sorted(defined) == sorted((name, "ops") for name in CUSTOM_OPS)
    assert fakes == ["ops"] * len(CUSTOM_OPS)
    for name in CUSTOM_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"beyond_cls::{name}", "Meta"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"beyond_cls::{name}", "CUDA"), name
    if _extension.available():
        for name in CPP_OPS:
            assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"beyond_cls::{name}", "Meta"), name


def _package_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return [m for m in modules if m.startswith("beyond_cls")]


def test_dispatch_imports_only_the_interpreter_switch():
    assert _package_imports(ROOT / "beyond_cls" / "ops" / "_dispatch.py") == ["beyond_cls.triton_mode"]
    assert _package_imports(ROOT / "beyond_cls" / "triton_mode.py") == []


def test_only_the_interpreter_switch_reads_triton_interpret():
    readers = [p for p, text in _sources().items() if re.search(r"environ.*TRITON_INTERPRET", text)]
    assert readers == [ROOT / "beyond_cls" / "triton_mode.py"]


@pytest.mark.parametrize(
    "op,device,dtype,want",
    [
        ("attention_with_stats", "cuda", torch.bfloat16, "triton"),
        ("attention_with_stats", "cuda", torch.float64, "reference"),  # Triton's attention has no float64
        ("abmilp_pool", "cuda", torch.float64, "triton"),  # the pooling kernels do (exact tests)
        ("no_such_op", "cuda", torch.float32, "reference"),
    ],
)
def test_cuda_policy(op, device, dtype, want, monkeypatch):
    monkeypatch.delenv("BEYOND_CLS_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", True)
    assert ops.backend_for(op, torch.device(device), dtype) == want


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="BEYOND_CLS_BACKEND=cpp cannot run attention_with_stats: .*CPU"):
        ops.backend_for("attention_with_stats", torch.device("cuda"))
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "triton")
    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ops.backend_for("abmilp_pool", torch.device("cuda"))


def test_cpp_backend_needs_the_extension(monkeypatch):
    """Without the C++ extension CPU tensors fall back to the reference (and forcing cpp says why)."""
    monkeypatch.delenv("BEYOND_CLS_BACKEND", raising=False)
    support = _dispatch._SUPPORT["attention_with_stats"]
    monkeypatch.setitem(_dispatch._SUPPORT, "attention_with_stats",
                        _dispatch.Support(support.triton_dtypes, support.cpp_dtypes, lambda: "no _C here"))
    assert ops.backend_for("attention_with_stats", torch.device("cpu")) == "reference"
    q = torch.randn(1, 2, 9, 8)
    out, rows = ops.attention_with_stats(q, q, q, 1)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="no _C here"):
        ops.attention_with_stats(q, q, q, 1)


def test_reloading_the_policy_keeps_what_the_op_modules_registered(monkeypatch):
    """importlib.reload(_dispatch) runs no op module again: the backends each op registered must stay (an emptied
    table would send every op to the reference, silently)."""
    import importlib

    monkeypatch.delenv("BEYOND_CLS_BACKEND", raising=False)
    ops_ = ("attention_with_stats", "abmilp_pool", "softmax_pool")
    cases = [(op, torch.device(d), dt) for op in ops_ for d in ("cpu", "cuda") for dt in (torch.float32, torch.float64)]
    saved = dict(_dispatch._SUPPORT)
    before = [_dispatch.backend_for(*case) for case in cases]
    try:
        importlib.reload(_dispatch)
        assert sorted(_dispatch._SUPPORT) == sorted(saved)
        assert [_dispatch.backend_for(*case) for case in cases] == before
    finally:
        _dispatch._SUPPORT.update(saved)


def test_cuda_kernels_run_on_their_inputs_device(monkeypatch):
    """Each custom op's CUDA kernel makes its first tensor's device current (Triton launches on the current one)."""
    entered = []

    class Recorder:
        def __init__(self, device):
            entered.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    kernel = _dispatch.on_input_device(lambda scale, tokens, mask=None: (scale, tokens.shape, entered[-1]))
    tokens = torch.empty(2, 3, device="meta")
    assert kernel(0.5, tokens) == (0.5, (2, 3), tokens.device)
    assert kernel(0.5, tokens=tokens) == (0.5, (2, 3), tokens.device)
    sources = {path.name: text for path, text in _sources().items() if path.parent.name == "ops"}
    for name in ("attention_stats.py", "abmilp.py"):  # every CUDA registration carries the guard
        text = sources[name]
        assert text.count('.register_kernel("cuda")\n@_dispatch.on_input_device\n') == text.count(
            '.register_kernel("cuda")') > 0, name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ops_on_a_device_that_is_not_the_current_one():
    from beyond_cls import reference

    torch.cuda.set_device(0)
    q, k, v = (torch.randn(2, 3, 197, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    out, rows = ops.attention_with_stats(q, k, v)
    want, want_rows = reference.attention_with_stats(q.double(), k.double(), v.double())
    assert_close(out, want, name="out")  # bfloat16
    torch.testing.assert_close(rows.patch_entropy.double(), want_rows.patch_entropy, atol=2e-3, rtol=2e-3)
    tokens = torch.randn(4, 197, 96, device="cuda:1", requires_grad=True)
    weight = torch.randn(96, device="cuda:1", requires_grad=True)
    pooled, _ = ops.abmilp_pool(tokens, weight, 0.0)
    pooled.sum().backward()
    ref_tokens, ref_weight = tokens.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_pooled, _ = reference.abmilp_pool(ref_tokens, ref_weight, 0.0)
    ref_pooled.sum().backward()
    torch.testing.assert_close(pooled.double(), ref_pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens.grad.double(), ref_tokens.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(weight.grad.double(), ref_weight.grad, atol=1e-3, rtol=1e-3)
