"""C++ CPU ops abmilp_{forward,backward} and softmax_pool_{forward,backward} against eager autograd.

Every output is compared with eager PyTorch autograd of the same math in float64. Low-precision
results must be within 2x PyTorch's own error in that dtype (the eager math run in the dtype) plus a
small floor (tests/tolerances.py).
"""

from __future__ import annotations

import pytest
import torch

from beyond_cls import _extension
from tests.tolerances import FLOORS, assert_close, assert_within_torch_error

pytestmark = pytest.mark.skipif(not _extension.available(), reason=f"C++ extension: {_extension.load_error()}")

# (dtype, floor): allowed error = 2 x eager error in dtype + floor x max(1, |reference|)
TOLERANCES = [(dtype, FLOORS[dtype]) for dtype in (torch.float64, torch.float32, torch.bfloat16)]
SHAPES = [(196, 768, 1), (197, 80, 3), (257, 1280, 8), (61, 33, 16)]  # (N, D, K)


def ops():
    return torch.ops.beyond_cls


def poison_heap(numel: int) -> None:
    """Leave NaNs in freed memory so an output element the op forgets to write shows up."""
    torch.full((numel,), float("nan")).sum()


def sliced_tokens(b, n, d, dtype):
    """tokens[:, 1:] of a [B, N+1, D] tensor: the patch tokens after [cls], not contiguous."""
    return torch.randn(b, n + 1, d, dtype=torch.float64)[:, 1:].to(dtype)


def eager(tokens, grad_pooled, grad_scores, mask, tokens_grad, weight=None, bias=None, logits=None):
    """Eager autograd of the op's math in the inputs' dtype: (pooled, scores, grads...)."""
    z = tokens.detach().clone().requires_grad_(tokens_grad)
    if logits is None:
        w = weight.detach().clone().requires_grad_()
        b = bias.detach().clone().requires_grad_()
        leaves = [w, b]
        lg = torch.einsum("bnd,kd->bkn", z, w) + b[:, None]
    else:
        lg = logits.detach().clone().requires_grad_()
        leaves = [lg]
    if mask is not None:
        lg = lg.masked_fill(~mask[:, None, :], float("-inf"))
    s = lg.softmax(-1)
    pooled = torch.einsum("bkn,bnd->bkd", s, z)
    loss = (pooled * grad_pooled).sum()
    if grad_scores is not None:
        loss = loss + (s * grad_scores).sum()
    loss.backward()
    grads = [z.grad if tokens_grad else None] + [t.grad for t in leaves]
    return [pooled.detach(), s.detach()] + grads


def case_inputs(b, n, d, k, dtype, masked, with_grad_scores):
    tokens = sliced_tokens(b, n, d, dtype)
    mask = None
    if masked:
        mask = torch.rand(b, n) > 0.3
        mask[:, 0] = True  # no fully masked branch here (see test_fully_masked_rows)
    grad_pooled = torch.randn(b, k, d, dtype=torch.float64).to(dtype)
    grad_scores = torch.randn(b, k, n, dtype=torch.float64).to(dtype) if with_grad_scores else None
    return tokens, mask, grad_pooled, grad_scores


def check(names, got, exact, torch_dtype, floor):
    for name, g, e, t in zip(names, got, exact, torch_dtype):
        if e is None:
            assert g.numel() == 0, f"{name}: expected an empty tensor, got {tuple(g.shape)}"
            continue
        assert_within_torch_error(g, e, t, floor, name)


@pytest.mark.parametrize("dtype,floor", TOLERANCES)
@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_grad_scores", [False, True])
def test_abmilp_matches_autograd(dtype, floor, n, d, k, masked, with_grad_scores):
    tokens, mask, grad_pooled, grad_scores = case_inputs(2, n, d, k, dtype, masked, with_grad_scores)
    weight = (torch.randn(k, d, dtype=torch.float64) / d**0.5 * 3).to(dtype)
    bias = torch.randn(k, dtype=torch.float64).to(dtype)
    double = [None if t is None else t.double() for t in (tokens, grad_pooled, grad_scores, weight, bias)]
    for tokens_grad in (True, False):
        exact = eager(*double[:3], mask, tokens_grad, weight=double[3], bias=double[4])
        in_dtype = eager(tokens, grad_pooled, grad_scores, mask, tokens_grad, weight=weight, bias=bias)
        poison_heap(4 * 2 * n * d)
        pooled, scores = ops().abmilp_forward(tokens, weight, bias, mask)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert pooled.dtype == acc and scores.dtype == acc  # float32-accurate outputs for any token dtype
        poison_heap(4 * 2 * n * d)
        grads = ops().abmilp_backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad)
        assert grads[0].dtype == dtype and grads[1].dtype == weight.dtype and grads[2].dtype == weight.dtype
        names = ["pooled", "scores", "grad_tokens", "grad_weight", "grad_bias"]
        check(names, (pooled, scores) + tuple(grads), exact, in_dtype, floor)


@pytest.mark.parametrize("dtype,floor", TOLERANCES)
@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_grad_scores", [False, True])
def test_softmax_pool_matches_autograd(dtype, floor, n, d, k, masked, with_grad_scores):
    tokens, mask, grad_pooled, grad_scores = case_inputs(2, n, d, k, dtype, masked, with_grad_scores)
    logits = (torch.randn(2, k, n, dtype=torch.float64) * 4).to(dtype)
    double = [None if t is None else t.double() for t in (tokens, grad_pooled, grad_scores, logits)]
    for tokens_grad in (True, False):
        exact = eager(*double[:3], mask, tokens_grad, logits=double[3])
        in_dtype = eager(tokens, grad_pooled, grad_scores, mask, tokens_grad, logits=logits)
        poison_heap(4 * 2 * n * d)
        pooled, scores = ops().softmax_pool_forward(tokens, logits, mask)
        poison_heap(4 * 2 * n * d)
        grads = ops().softmax_pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert pooled.dtype == acc and scores.dtype == acc and grads[0].dtype == dtype and grads[1].dtype == acc
        names = ["pooled", "scores", "grad_tokens", "grad_logits"]
        check(names, (pooled, scores) + tuple(grads), exact, in_dtype, floor)


def test_strided_and_half_tokens():
    """tokens with a non-unit feature stride, and float16 tokens with float32 weights."""
    b, n, d, k = 3, 45, 24, 2
    base = torch.randn(b, d, n, dtype=torch.float64)
    for tokens in (base.transpose(1, 2), base.transpose(1, 2).half()):
        weight, bias = torch.randn(k, d), torch.randn(k)
        grad_pooled = torch.randn(b, k, d).to(tokens.dtype)
        exact = eager(
            tokens.double(), grad_pooled.double(), None, None, True, weight=weight.double(), bias=bias.double()
        )
        pooled, scores = ops().abmilp_forward(tokens, weight, bias)
        grads = ops().abmilp_backward(grad_pooled, None, tokens, weight, scores, pooled, True)
        assert grads[1].dtype == torch.float32 and grads[0].dtype == tokens.dtype
        for got, want in zip((pooled, scores) + tuple(grads), exact):
            # float64 tokens compute in float64; grad_weight / grad_bias come back in weight's float32
            tol = 1e-3 if tokens.dtype == torch.half else 1e-10 if got.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_large_logits_are_stable():
    tokens = sliced_tokens(2, 197, 40, torch.float32)
    logits = torch.randn(2, 4, 197) * 500
    pooled, scores = ops().softmax_pool_forward(tokens, logits)
    torch.testing.assert_close(scores, logits.softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, torch.einsum("bkn,bnd->bkd", logits.softmax(-1), tokens), rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_nan():
    """A row with every token masked is NaN, like softmax over all -inf; other rows are unaffected."""
    tokens = sliced_tokens(3, 20, 8, torch.float32)
    weight, bias = torch.randn(2, 8), torch.randn(2)
    mask = torch.rand(3, 20) > 0.5
    mask[:, 0] = True
    mask[1] = False
    pooled, scores = ops().abmilp_forward(tokens, weight, bias, mask)
    assert scores[1].isnan().all() and pooled[1].isnan().all()
    want_pooled, want_scores = eager(tokens, torch.zeros(3, 2, 8), None, mask, False, weight=weight, bias=bias)[:2]
    torch.testing.assert_close(pooled[[0, 2]], want_pooled[[0, 2]])
    torch.testing.assert_close(scores[[0, 2]], want_scores[[0, 2]])
    assert (scores[[0, 2]].masked_select(~mask[[0, 2], None, :]) == 0).all()
    grads = ops().abmilp_backward(torch.randn(3, 2, 8), None, tokens, weight, scores, pooled, True)
    assert grads[0][1].isnan().all() and torch.isfinite(grads[0][[0, 2]]).all()


def test_tokens_grad_false_skips_grad_tokens():
    tokens = sliced_tokens(2, 30, 16, torch.float32)
    weight, bias = torch.randn(3, 16), torch.randn(3)
    pooled, scores = ops().abmilp_forward(tokens, weight, bias)
    g = torch.randn_like(pooled)
    with_tokens = ops().abmilp_backward(g, None, tokens, weight, scores, pooled, True)
    without = ops().abmilp_backward(g, None, tokens, weight, scores, pooled, False)
    assert without[0].numel() == 0 and without[0].dtype == tokens.dtype
    torch.testing.assert_close(without[1], with_tokens[1], rtol=0, atol=0)
    torch.testing.assert_close(without[2], with_tokens[2], rtol=0, atol=0)
    gt, gl = ops().softmax_pool_backward(g, None, tokens, scores, pooled, False)
    assert gt.numel() == 0 and gl.shape == scores.shape


def test_autograd_fallback_runs_forward_and_rejects_backward():
    tokens = torch.randn(2, 10, 8, requires_grad=True)
    weight, bias = torch.randn(1, 8, requires_grad=True), torch.zeros(1, requires_grad=True)
    pooled, scores = ops().abmilp_forward(tokens, weight, bias)
    with pytest.raises(RuntimeError):
        pooled.sum().backward()
    pooled, _ = ops().softmax_pool_forward(tokens, torch.randn(2, 1, 10, requires_grad=True))
    with pytest.raises(RuntimeError):
        pooled.sum().backward()


def _opcheck_cases():
    tokens = torch.randn(2, 9, 6)[:, 1:]
    weight, bias, mask = torch.randn(3, 6), torch.randn(3), torch.rand(2, 8) > 0.2
    mask[:, 0] = True
    pooled, scores = torch.ops.beyond_cls.abmilp_forward(tokens, weight, bias, mask)
    g, gs = torch.randn_like(pooled), torch.randn_like(scores)
    logits = torch.randn(2, 3, 8)
    return [
        ("abmilp_forward", (tokens, weight, bias, mask)),
        ("abmilp_forward", (tokens, weight, bias)),
        ("abmilp_backward", (g, gs, tokens, weight, scores, pooled, True)),
        ("abmilp_backward", (g, None, tokens, weight, scores, pooled, False)),
        ("softmax_pool_forward", (tokens, logits, mask)),
        ("softmax_pool_backward", (g, gs, tokens, scores, pooled, True)),
        ("softmax_pool_backward", (g, None, tokens, scores, pooled, False)),
    ]


# The C++ ops run only inside the custom ops of beyond_cls.ops.abmilp, which trace with their own fakes
# (tests/ops/test_abmilp.py checks those): these have none.
@pytest.mark.parametrize("case", range(7))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    op = getattr(torch.ops.beyond_cls, name).default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


def _bad(name, **changes):
    tokens = torch.randn(2, 8, 6)
    args = {
        "abmilp_forward": dict(tokens=tokens, weight=torch.randn(3, 6), bias=torch.randn(3), mask=None),
        "softmax_pool_forward": dict(tokens=tokens, logits=torch.randn(2, 3, 8), mask=None),
        "abmilp_backward": dict(
            grad_pooled=torch.randn(2, 3, 6), grad_scores=None, tokens=tokens, weight=torch.randn(3, 6),
            scores=torch.rand(2, 3, 8), pooled=torch.randn(2, 3, 6), tokens_grad=True,
        ),
        "softmax_pool_backward": dict(
            grad_pooled=torch.randn(2, 3, 6), grad_scores=None, tokens=tokens, scores=torch.rand(2, 3, 8),
            pooled=torch.randn(2, 3, 6), tokens_grad=True,
        ),
    }[name]
    args.update(changes)
    return name, args


@pytest.mark.parametrize(
    "name,changes,match",
    [
        ("abmilp_forward", dict(tokens=torch.randn(8, 6)), r"tokens must be \[B, N, D\]"),
        ("abmilp_forward", dict(tokens=torch.ones(2, 8, 6, dtype=torch.int32)), "tokens must be float32"),
        ("abmilp_forward", dict(weight=torch.randn(3, 5)), "weight .* must match tokens' D"),
        ("abmilp_forward", dict(weight=torch.randn(6)), r"weight must be \[K, D\]"),
        ("abmilp_forward", dict(bias=torch.randn(2)), "bias must be"),
        ("abmilp_forward", dict(mask=torch.ones(2, 7, dtype=torch.bool)), r"mask must be \[B, N\]"),
        ("abmilp_forward", dict(mask=torch.ones(2, 8)), "mask must be bool"),
        ("abmilp_forward", dict(weight=torch.ones(3, 6, dtype=torch.int64)), "weight must be floating"),
        ("softmax_pool_forward", dict(logits=torch.randn(2, 3, 7)), "logits must be"),
        ("softmax_pool_forward", dict(logits=torch.randn(3, 8)), "logits must be"),
        ("softmax_pool_forward", dict(mask=torch.ones(8, dtype=torch.bool)), "mask must be"),
        ("abmilp_backward", dict(grad_pooled=torch.randn(2, 3, 5)), "grad_pooled must be"),
        ("abmilp_backward", dict(grad_scores=torch.randn(2, 3, 9)), "grad_scores must be"),
        ("abmilp_backward", dict(scores=torch.rand(2, 2, 8)), "scores must be"),
        ("abmilp_backward", dict(pooled=torch.randn(2, 3)), "pooled must be"),
        ("abmilp_backward", dict(weight=torch.randn(3, 7)), "weight .* must match tokens' D"),
        ("softmax_pool_backward", dict(scores=torch.rand(2, 3)), "scores must be"),
        ("softmax_pool_backward", dict(grad_pooled=torch.randn(2, 4, 6)), "grad_pooled must be"),
        ("softmax_pool_backward", dict(tokens=torch.randn(2, 8, 6).bool()), "tokens must be float32"),
    ],
)
def test_bad_arguments_are_named(name, changes, match):
    name, args = _bad(name, **changes)
    with pytest.raises(RuntimeError, match=match):
        getattr(ops(), name)(**args)


# The AbMILP forward sums e^(l - ref) · z over blocks of 8 tokens and moves `ref` (rescaling what it
# has summed) only when a block's maximum exceeds it by more than 8 (csrc/abmilp_cpu.cpp,
# kLazyRescale). These logit sequences move the maximum by more and by less than that, once or often.
GROWING_LOGITS = {
    "ramp": lambda n: torch.arange(n, dtype=torch.float64) * 0.35,  # +2.8 a block: ref moves every ~3 blocks
    "steps": lambda n: (torch.arange(n) // 20).double() * 9.0,  # +9 every 20 tokens: every step rescales
    "below_threshold": lambda n: (torch.arange(n) // 40).double() * 7.5,  # +7.5: summed unrescaled up to e^30
    "falling": lambda n: -torch.arange(n, dtype=torch.float64) * 0.5,  # the first block holds the maximum
    "late_spike": lambda n: torch.where(torch.arange(n) == n - 3, 60.0, 0.0).double(),
}


@pytest.mark.parametrize("dtype,floor", TOLERANCES[:2])
@pytest.mark.parametrize("pattern", list(GROWING_LOGITS))
@pytest.mark.parametrize("masked", [False, True])
def test_abmilp_forward_lazy_rescale(dtype, floor, pattern, masked):
    """Logits whose running maximum grows by more or less than the lazy-rescale threshold. "falling" also has
    feature 0 falling to -98, so pooled[:, 1, 0] is about -67: an error common to all dl_j of the backward (from
    c = Σ s·t or from float32 scores not summing to 1) would reach grad_weight times that (csrc/abmilp_cpu.cpp)."""
    b, n, d, k = 2, 197, 40, 2
    tokens = torch.randn(b, n, d, dtype=torch.float64)
    tokens[:, :, 0] = GROWING_LOGITS[pattern](n) + 0.1 * torch.randn(b, n, dtype=torch.float64)
    weight = torch.zeros(k, d, dtype=torch.float64)
    weight[0, 0] = 1.0  # branch 0: the logits above; branch 1: a small random scorer
    weight[1] = torch.randn(d, dtype=torch.float64) * 0.1
    bias = torch.tensor([0.5, -1.0], dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(b, n) > 0.4
        mask[:, -3] = True  # keep the spike
    grad_pooled = torch.randn(b, k, d, dtype=torch.float64)
    exact = eager(tokens, grad_pooled, None, mask, True, weight=weight, bias=bias)
    t, g, w, bi = (x.to(dtype) for x in (tokens, grad_pooled, weight, bias))
    in_dtype = eager(t, g, None, mask, True, weight=w, bias=bi)
    pooled, scores = ops().abmilp_forward(t, w, bi, mask)
    grads = ops().abmilp_backward(g, None, t, w, scores, pooled, True)
    names = ["pooled", "scores", "grad_tokens", "grad_weight", "grad_bias"]
    check(names, (pooled, scores) + tuple(grads), exact, in_dtype, floor)


@pytest.mark.parametrize("with_grad_scores", [False, True])
def test_abmilp_grad_weight_ignores_feature_means(with_grad_scores):
    """Adding a constant to a feature of every token changes no gradient (Σ_j dl_j = 0); in float32 the
    backward's error must not grow with that constant: an error common to all dl_j (in c = Σ s·t, or from
    scores that sum to 1 only within rounding) would reach grad_weight times pooled (here ~100). The bound is
    the float32 reference tolerance, not PyTorch's error: PyTorch's float32 autograd misses it by far here."""
    b, n, d, k = 2, 261, 80, 3
    tokens = torch.randn(b, n, d, dtype=torch.float64)
    tokens[:, :, :4] += 100.0
    weight = torch.randn(k, d, dtype=torch.float64) / d**0.5
    bias = torch.randn(k, dtype=torch.float64)
    mask = torch.rand(b, n) > 0.3
    mask[:, 0] = True
    grad_pooled = torch.randn(b, k, d, dtype=torch.float64)
    grad_scores = torch.randn(b, k, n, dtype=torch.float64) if with_grad_scores else None
    t, w, bi, g, gs = (None if x is None else x.float() for x in (tokens, weight, bias, grad_pooled, grad_scores))
    exact = eager(*(None if x is None else x.double() for x in (t, g, gs)), mask, True, weight=w.double(),
                  bias=bi.double())
    pooled, scores = ops().abmilp_forward(t, w, bi, mask)
    grads = ops().abmilp_backward(g, gs, t, w, scores, pooled, True)
    for name, got, want in zip(["grad_tokens", "grad_weight", "grad_bias"], grads, exact[2:]):
        assert_close(got, want, torch.float32, name=name, scaled=True)


def test_abmilp_backward_takes_strided_grad_pooled():
    """Expanded (the gradient of pooled.sum()), transposed or sliced grad_pooled and pooled give the
    contiguous result: the backward reads them row by row instead of copying them first."""
    tokens = sliced_tokens(3, 50, 24, torch.float32)
    weight, bias = torch.randn(2, 24), torch.randn(2)
    pooled, scores = ops().abmilp_forward(tokens, weight, bias)
    pooled_t = pooled.transpose(1, 2).contiguous().transpose(1, 2)
    strided = (
        torch.ones(1, 1, 1).expand(3, 2, 24),
        torch.randn(3, 24, 2).transpose(1, 2),
        torch.randn(3, 4, 24)[:, 1:3],
        torch.randn(3, 2, 48)[..., ::2],
    )
    for g in strided:
        want = ops().abmilp_backward(g.contiguous(), None, tokens, weight, scores, pooled, True)
        got = ops().abmilp_backward(g, None, tokens, weight, scores, pooled_t, True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_abmilp_results_do_not_depend_on_threads():
    """Rows are handed to threads dynamically; each row's result (and the in-order sums) are the same.
    (Enough work for 3 threads: calls below 32768 elements a thread stay on the calling thread.)"""
    tokens = sliced_tokens(9, 101, 96, torch.float32)
    weight, bias = torch.randn(3, 96), torch.randn(3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            pooled, scores = ops().abmilp_forward(tokens, weight, bias)
            grads = ops().abmilp_backward(torch.ones_like(pooled), None, tokens, weight, scores, pooled, True)
            results.append((pooled, scores) + tuple(grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
