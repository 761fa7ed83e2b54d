"""AbMILP pooling fwd(+bwd): fused vs eager autograd (and torch.compile'd eager on GPU), side by side.

CPU: ViT-B shapes (B=64, N=196, D=768, K=1), the C++ kernels, frozen tokens (no token gradient), the
probe's case. GPU (skipped without CUDA): B=1024, N=196, D=768/1024/1280, K=1 and 8, bf16 tokens,
the Triton kernels, forward alone and forward + backward; ``extra_info`` carries the bytes each pass
must move so the report can state GB/s against the device's bandwidth, measured in the same run by
the ``copy`` case (and on CPU by ``read``: two plain read passes over the tokens, ``tokens.sum()``
twice, the floor of fwd+bwd).
"""

from __future__ import annotations

import pytest
import torch

from beyond_cls import ops, reference

CPU_SHAPES = {"vit_b_k1": (64, 196, 768, 1)}
GPU_SHAPES = {f"d{d}_k{k}": (1024, 196, d, k) for d in (768, 1024, 1280) for k in (1, 8)}


def _inputs(b, n, d, k, dtype, device):
    tokens = torch.randn(b, n, d, device=device).to(dtype)
    weight = (torch.randn(k, d, device=device) * d**-0.5).requires_grad_()
    bias = torch.zeros(k, device=device, requires_grad=True)
    return tokens, weight, bias


def _step(impl: str, backward: bool):
    pool = {
        "fused": lambda t, w, b: ops.abmilp_pool(t, w, b),
        "eager": lambda t, w, b: reference.abmilp_pool(t, w, b),
    }
    if impl == "compiled":
        pool["compiled"] = torch.compile(lambda t, w, b: reference.abmilp_pool(t, w, b))
    fn = pool[impl]

    def step(tokens, weight, bias):
        pooled, _ = fn(tokens, weight, bias)
        if backward:
            pooled.float().sum().backward()

    return step


def _run(benchmark, impl, shape, dtype, device, rounds, backward=True):
    b, n, d, k = shape
    tokens, weight, bias = _inputs(b, n, d, k, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if impl == "copy":
        out = torch.empty_like(tokens)

        def step(*_):
            out.copy_(tokens)
    elif impl == "read":

        def step(*_):
            tokens.sum()
            tokens.sum()
    else:
        step = _step(impl, backward)
    token_bytes = tokens.numel() * tokens.element_size()
    benchmark.extra_info.update(
        shape=list(shape), dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        # fwd+bwd and `read` read the tokens twice, fwd once; a copy reads and writes them once
        bytes=token_bytes if impl not in ("copy", "read") and not backward else 2 * token_bytes,
        **({"pass": "fwd+bwd" if backward else "fwd"} if impl not in ("copy", "read") else {}),
        threads=torch.get_num_threads(),
    )

    def timed():
        step(tokens, weight, bias)
        sync()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["fused", "eager", "read", "copy"])
@pytest.mark.parametrize("name", list(CPU_SHAPES))
def test_abmilp_cpu(benchmark, monkeypatch, name, impl):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "cpp" if impl == "fused" else "reference")
    benchmark.group = f"abmilp-cpu-{name}"
    _run(benchmark, impl, CPU_SHAPES[name], torch.float32, "cpu", rounds=20)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled", "copy"])
@pytest.mark.parametrize("name", list(GPU_SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_abmilp_gpu(benchmark, pass_, name, impl):
    benchmark.group = f"abmilp-gpu-{pass_}-{name}"
    _run(benchmark, impl, GPU_SHAPES[name], torch.bfloat16, "cuda", rounds=50, backward=pass_ == "fwd+bwd")
