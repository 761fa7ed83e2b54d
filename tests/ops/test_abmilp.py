"""Fused AbMILP / softmax pooling: every backend against the float64 reference, fwd and bwd.

Triton runs in its interpreter on CPU tensors without CUDA (conftest sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch

from beyond_cls import heads, ops, optim, reference
from beyond_cls.numerics import MAX_BRANCHES
from beyond_cls.ops._dispatch import unavailable
from tests.tolerances import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in ("triton", "cpp") if unavailable(b, "abmilp_pool", torch.device(DEVICE), torch.float32) is None]
# (B, N, D, K, mask): ragged token counts and widths, several branch counts
CASES = [(3, 61, 80, 1, False), (2, 197, 96, 3, True), (2, 33, 1280, 8, False), (1, 257, 48, 16, True)]


def _inputs(b, n, d, k, use_mask, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(k, d, generator=gen, dtype=torch.float64) * d**-0.5 * 3
    bias = torch.randn(k, generator=gen, dtype=torch.float64)
    mask = (torch.rand(b, n, generator=gen) > 0.25) if use_mask else None
    if mask is not None:
        mask[:, 0] = True  # at least one kept token per row
    return z.to(dtype), w, bias, mask


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _run(backend, monkeypatch, z, w, bias, mask, tokens_grad=True, scores_grad=True):
    """Forward + backward with random output grads; returns outputs and grads (CPU, float64)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    z, w, bias, mask = _to(DEVICE, z, w, bias, mask)
    z = z.detach().requires_grad_(tokens_grad)
    w = w.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    pooled, scores = ops.abmilp_pool(z, w, bias, mask)
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(pooled.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    gs = torch.randn(scores.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    loss = (pooled.double() * g).sum() + ((scores.double() * gs).sum() if scores_grad else 0)
    loss.backward()
    grads = [None if t.grad is None else t.grad.double().cpu() for t in (z, w, bias)]
    return pooled.double().cpu(), scores.double().cpu(), grads


def _assert_close_to_reference(backend, monkeypatch, z, w, bias, mask, tokens_grad=True, scores_grad=True):
    """Outputs and gradients against the float64 reference, each at the tolerance of the dtype it is computed in:
    float64 tokens in float64, any other in float32, except the tokens' gradient (returned in the tokens' dtype)."""
    got = _run(backend, monkeypatch, z, w, bias, mask, tokens_grad, scores_grad)
    want = _run("reference", monkeypatch, z.double(), w, bias, mask, tokens_grad, scores_grad)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    for name, a, b in (("pooled", got[0], want[0]), ("scores", got[1], want[1])):
        assert_close(a, b, acc, name=name)
    for name, a, b in zip(("grad_tokens", "grad_weight", "grad_bias"), got[2], want[2]):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, z.dtype if name == "grad_tokens" else acc, name=name, scaled=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_float64_matches_reference_exactly(backend, case, monkeypatch):
    _assert_close_to_reference(backend, monkeypatch, *_inputs(*case, torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_tokens_are_float32_accurate(backend, dtype, monkeypatch):
    """pooled, scores and the weight/bias grads are float32-accurate for any token dtype."""
    for case in CASES[:2]:
        _assert_close_to_reference(backend, monkeypatch, *_inputs(*case, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_tokens_get_no_gradient(backend, monkeypatch):
    z, w, bias, mask = _inputs(2, 50, 64, 2, True, torch.float32)
    _assert_close_to_reference(backend, monkeypatch, z, w, bias, mask, tokens_grad=False)
    _assert_close_to_reference(backend, monkeypatch, z, w, bias, mask, scores_grad=False)
    z, w, bias = _to(DEVICE, z, w.float(), bias.float())
    pooled, scores = torch.ops.beyond_cls.abmilp_pool(z, w, bias, None, backend)
    grad_tokens, grad_w, grad_b = torch.ops.beyond_cls.abmilp_pool_grad(
        torch.ones_like(pooled), None, z, w, scores, pooled, False, backend
    )
    assert grad_tokens.numel() == 0 and grad_w.shape == w.shape and grad_b.shape == bias.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    z, w, bias, mask = _to(DEVICE, *_inputs(2, 9, 7, 2, True, torch.float64))
    inputs = (z.requires_grad_(), w.requires_grad_(), bias.requires_grad_())
    # fast mode (random projections) keeps the interpreted Triton run to a few dozen calls
    fast = backend == "triton" and DEVICE == "cpu"
    assert torch.autograd.gradcheck(lambda z, w, b: ops.abmilp_pool(z, w, b, mask), inputs, fast_mode=fast)
    logits = torch.randn(2, 3, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, lg: ops.softmax_pool(z, lg, mask), (z, logits), fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_pool_matches_reference(backend, monkeypatch):
    z, _, _, mask = _inputs(2, 97, 80, 4, True, torch.float32)
    logits = torch.randn(2, 4, 97) * 3
    results = {}
    for b in (backend, "reference"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", b)
        dtype = torch.float64 if b == "reference" else torch.float32
        zz = z.detach().to(DEVICE, dtype).requires_grad_()
        lg = logits.detach().to(DEVICE, dtype).requires_grad_()
        pooled, scores = ops.softmax_pool(zz, lg, None if mask is None else mask.to(DEVICE))
        (pooled.double().sum() + (scores.double() ** 2).sum()).backward()
        results[b] = [t.double().cpu() for t in (pooled, scores, zz.grad, lg.grad)]
    for name, a, b in zip(("pooled", "scores", "grad_tokens", "grad_logits"), results[backend], results["reference"]):
        assert_close(a, b, torch.float32, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_weight_and_scalar_bias(backend, monkeypatch):
    z, w, _, _ = _inputs(2, 40, 32, 1, False, torch.float32)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    pooled, scores = ops.abmilp_pool(z.to(DEVICE), w[0].float().to(DEVICE), 0.5)
    want_pooled, want_scores = reference.abmilp_pool(z.double(), w[0], 0.5)
    assert pooled.shape == (2, 32) and scores.shape == (2, 40)
    assert_close(pooled, want_pooled, name="pooled")
    assert_close(scores, want_scores, name="scores")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["scalar", "one", "strided"])
def test_bias_of_any_stride(backend, dtype, layout, monkeypatch):
    """K > 1 branches with a bias the kernels must read by its strides: a 0-dim tensor and a [1] tensor
    (ops.abmilp_pool expands both to [K] with stride 0) and a [K] view with stride 3. Every element
    beside the bias's own is NaN, so a kernel that reads the bias as contiguous [K] gets NaN logits.
    (A per-branch bias cancels in the softmax over tokens: outputs and gradients must not depend on it,
    and the bias's gradient, summed over the branches where it was expanded, is zero.)"""
    k = 4
    z, w, _, mask = _inputs(2, 45, 24, k, True, dtype)
    values = torch.tensor([0.7, -1.3, 2.1, 0.4], dtype=torch.float64)
    results = {}
    for b in (backend, "reference"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", b)
        cast = torch.float64 if b == "reference" else dtype
        storage = torch.full((3 * k,), float("nan"), dtype=cast, device=DEVICE)
        if layout == "strided":
            storage[1::3] = values.to(storage)
            bias = storage[1::3]
        else:
            storage[0] = values[0]
            bias = storage[0] if layout == "scalar" else storage[:1]
        bias = bias.detach().requires_grad_()  # a leaf that keeps the view's strides and storage
        assert bias.stride() == {"scalar": (), "one": (1,), "strided": (3,)}[layout]
        zz = z.detach().to(DEVICE, cast).requires_grad_()
        ww = w.detach().to(DEVICE, cast).requires_grad_()
        pooled, scores = ops.abmilp_pool(zz, ww, bias, mask.to(DEVICE))
        gen = torch.Generator().manual_seed(1)
        g = torch.randn(pooled.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        gs = torch.randn(scores.shape, generator=gen, dtype=torch.float64).to(DEVICE)
        ((pooled.double() * g).sum() + (scores.double() * gs).sum()).backward()
        assert bias.grad.shape == bias.shape
        results[b] = [t.double().cpu() for t in (pooled, scores, zz.grad, ww.grad, bias.grad)]
    names = ("pooled", "scores", "grad_tokens", "grad_weight", "grad_bias")
    for name, a, e in zip(names, results[backend], results["reference"]):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, name=name, scaled=True)


def test_mask_excludes_tokens_in_the_reference():
    z, w, bias, _ = _inputs(2, 10, 8, 2, False, torch.float64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :3] = False
    pooled, scores = reference.abmilp_pool(z, w, bias, mask)
    want_pooled, want_scores = reference.abmilp_pool(z[:, 3:], w, bias)
    assert torch.equal(scores[..., :3], torch.zeros(2, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(scores[..., 3:], want_scores)
    torch.testing.assert_close(pooled, want_pooled)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_without_graph_breaks(backend, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    z, w, bias, mask = _to(DEVICE, *_inputs(2, 20, 16, 2, True, torch.float32))
    w, bias = w.float().requires_grad_(), bias.float().requires_grad_()

    def step(z, w, bias, mask):
        pooled, _ = ops.abmilp_pool(z, w, bias, mask)
        return pooled.square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(z, w, bias, mask)
    loss.backward()
    want = step(z, w.detach().clone().requires_grad_(), bias.detach(), mask)
    torch.testing.assert_close(loss, want)
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_probe_trains_identically(backend, monkeypatch):
    """20 LARS steps of an AbMILP linear probe: the fused op and the reference agree."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(8, 5, 17, 32, generator=gen)  # 8 batches of [5, 17, 32] (1 [cls] + 16 patches)
    labels = torch.randint(0, 4, (8, 5), generator=gen)
    params = {}
    for b in (backend, "reference"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", b)
        torch.manual_seed(0)
        probe = heads.LinearProbe(heads.AbMILP(32, branches=2), 64, 4).to(DEVICE)
        opt = optim.LARS(probe.parameters(), lr=0.1)
        for step in range(20):
            loss = torch.nn.functional.cross_entropy(probe(tokens[step % 8].to(DEVICE)), labels[step % 8].to(DEVICE))
            opt.zero_grad()
            loss.backward()
            opt.step()
        params[b] = {k: v.detach().double().cpu() for k, v in probe.state_dict().items()}
    for name, value in params["reference"].items():
        torch.testing.assert_close(params[backend][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_triton_rejects_what_it_cannot_run():
    from beyond_cls.kernels.abmilp import abmilp_forward

    z = torch.randn(2, 10, 8, device=DEVICE)
    with pytest.raises(ValueError, match="branches"):
        k = MAX_BRANCHES + 1
        abmilp_forward(z, torch.randn(k, 8, device=DEVICE), torch.zeros(k, device=DEVICE))
    with pytest.raises(ValueError, match="mask"):
        abmilp_forward(z, torch.randn(1, 8, device=DEVICE), torch.zeros(1, device=DEVICE),
                       torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        abmilp_forward(z[0], torch.randn(1, 8, device=DEVICE), torch.zeros(1, device=DEVICE))


def _row_config_pairs(k_pad: int) -> list[tuple]:
    """(forward config, backward config) pairs covering every config of the row kernels that ``k_pad`` branches
    can take (at most one warp per branch)."""
    from beyond_cls.kernels.abmilp import CONFIGS

    fwd, bwd = ([c for c in CONFIGS[name] if c[2] <= k_pad] for name in ("fwd", "bwd"))
    return [(fwd[i % len(fwd)], bwd[i % len(bwd)]) for i in range(max(len(fwd), len(bwd)))]


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton cannot run here")
@pytest.mark.parametrize("pair", range(len(_row_config_pairs(4))))
def test_every_triton_config_matches_reference(pair, monkeypatch):
    """Each row-kernel config of CONFIGS (the autotuner's candidates; the interpreter otherwise runs INTERPRET_CONFIG
    only) that K = 3 branches can take, with a mask, grad_scores and the tokens' gradient, rows split into chunks
    (the combine kernel at its config)."""
    from beyond_cls.kernels import abmilp

    fwd, bwd = _row_config_pairs(4)[pair]
    launch = abmilp.launch

    def launch_at_config(name, grid, *args, **meta):
        launch(name, grid, *args, config={"fwd": fwd, "bwd": bwd}.get(name, abmilp.CONFIGS[name][0]), **meta)

    monkeypatch.setattr(abmilp, "launch", launch_at_config)
    monkeypatch.setattr(abmilp, "_sm_count", lambda device: 16)
    # D = 600: two column groups of 256-wide chunks, the second ragged; N spans several tiles of every BLOCK_N
    _assert_close_to_reference("triton", monkeypatch, *_inputs(2, 40, 600, 3, True, torch.float32))


@pytest.mark.skipif(DEVICE == "cuda" or "triton" not in BACKENDS,
                    reason="on CUDA the autotuners are meant to run; only the interpreter skips them")
def test_triton_interpreter_does_not_autotune(monkeypatch):
    """Under TRITON_INTERPRET=1 every launch runs INTERPRET_CONFIG: the autotuners are never called."""
    from triton.runtime.autotuner import Autotuner

    def tune(*args, **kwargs):
        raise AssertionError("an autotuner ran in the interpreter")

    monkeypatch.setattr(Autotuner, "run", tune)
    _run("triton", monkeypatch, *_inputs(2, 40, 48, 2, True, torch.float32))


def _opcheck_cases(backend):
    z, w, bias, mask = _to(DEVICE, *_inputs(2, 9, 6, 3, True, torch.float32))
    w, bias = w.float(), bias.float()
    logits = torch.randn(2, 3, 9, device=DEVICE)
    pooled, scores = torch.ops.beyond_cls.abmilp_pool(z, w, bias, mask, backend)
    g, gs = torch.randn_like(pooled), torch.randn_like(scores)
    return [
        ("abmilp_pool", (z, w, bias, mask, backend)),
        ("abmilp_pool", (z, w, bias, None, backend)),
        ("abmilp_pool_grad", (g, gs, z, w, scores, pooled, True, backend)),
        ("abmilp_pool_grad", (g, None, z, w, scores, pooled, False, backend)),
        ("softmax_pool", (z, logits, mask, backend)),
        ("softmax_pool_grad", (g, gs, z, scores, pooled, True, backend)),
        ("softmax_pool_grad", (g, None, z, scores, pooled, False, backend)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(7))
def test_custom_ops_opcheck(backend, case):
    """Schema, fake, autograd registration and AOT dispatch of the custom ops, with either kernel behind them."""
    name, args = _opcheck_cases(backend)[case]
    torch.library.opcheck(getattr(torch.ops.beyond_cls, name).default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_runs_the_forwards_backend(backend, monkeypatch):
    """The backward runs the backend its forward chose (kept on ctx): the environment is not read again, and the
    other backend's kernels are never called."""
    z, w, bias, mask = _to(DEVICE, *_inputs(2, 20, 16, 2, True, torch.float32))
    z, w, bias = z.requires_grad_(), w.float().requires_grad_(), bias.float().requires_grad_()
    logits = torch.randn(2, 3, 20, device=DEVICE, requires_grad=True)
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    pooled, scores = ops.abmilp_pool(z, w, bias, mask)
    pooled2, _ = ops.softmax_pool(z, logits, mask)
    loss = pooled.sum() + scores.square().sum() + pooled2.square().sum()

    def refuse(*args, **kwargs):
        raise AssertionError("the backward ran another backend than its forward")

    monkeypatch.setenv("BEYOND_CLS_BACKEND", "not-a-backend")  # a backward asking the policy again would raise
    if backend == "cpp":
        from beyond_cls.kernels import abmilp

        for name in ("abmilp_backward", "softmax_pool_backward", "_backward"):
            monkeypatch.setattr(abmilp, name, refuse)
    else:
        from beyond_cls import _extension

        monkeypatch.setattr(_extension, "cpp_ops", refuse)
    loss.backward()
    grads = [t.grad for t in (z, w, bias, logits)]
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    leaves = [t.detach().double().requires_grad_() for t in (z, w, bias, logits)]
    want_pooled, want_scores = ops.abmilp_pool(*leaves[:3], mask)
    (want_pooled.sum() + want_scores.square().sum() + ops.softmax_pool(leaves[0], leaves[3], mask)[0].square().sum()
     ).backward()
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=1e-4, atol=1e-5)
