"""Fused softmax pooling (AbMILP and given logits) as custom ops with autograd.

``beyond_cls::abmilp_pool`` and ``beyond_cls::softmax_pool`` (and their backward ops
``*_grad``) run the C++ kernels on CPU tensors (or the Triton ones in their interpreter) and the
Triton kernels on CUDA tensors; each is one graph node under ``torch.compile``. The backend is
chosen once per call by :func:`abmilp_pool` / :func:`softmax_pool`, passed to the forward op and
kept on ``ctx`` for the backward. The tokens' gradient is computed only when the tokens require
one (frozen encoders skip it). A per-branch bias cancels in the softmax over tokens: the Triton
kernels never read it and return its gradient as exactly 0 (the C++ kernels and the reference
return Σ_n dlogits, which is 0 up to rounding).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from beyond_cls import _extension, reference
from beyond_cls.numerics import MAX_BRANCHES, accumulation_dtype
from beyond_cls.ops import _dispatch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # both backends; Triton's float64: exact tests
_dispatch.register("abmilp_pool", _dispatch.Support(
    _DTYPES, _DTYPES, functools.partial(_extension.op_error, "abmilp_forward")
))
_dispatch.register("softmax_pool", _dispatch.Support(
    _DTYPES, _DTYPES, functools.partial(_extension.op_error, "softmax_pool_forward")
))


def _kernels():
    from beyond_cls.kernels import abmilp

    return abmilp


def _impl(backend: str):
    """The kernels of a CPU call, one signature in both: Triton's (interpreted) or the C++ ops."""
    return _kernels() if backend == "triton" else _extension.cpp_ops()


@torch.library.custom_op("beyond_cls::abmilp_pool", mutates_args=(), device_types="cpu")
def abmilp_pool_op(
    tokens: Tensor, weight: Tensor, bias: Tensor, mask: Tensor | None, backend: str
) -> tuple[Tensor, Tensor]:
    """(pooled [B, K, D], scores [B, K, N]) in float32 (float64 for float64 tokens); weight [K, D], bias [K]."""
    return _impl(backend).abmilp_forward(tokens, weight, bias, mask)


@abmilp_pool_op.register_kernel("cuda")
@_dispatch.on_input_device
def _(tokens, weight, bias, mask, backend):
    return _kernels().abmilp_forward(tokens, weight, bias, mask)


@torch.library.custom_op("beyond_cls::abmilp_pool_grad", mutates_args=(), device_types="cpu")
def abmilp_pool_grad(
    grad_pooled: Tensor, grad_scores: Tensor | None, tokens: Tensor, weight: Tensor, scores: Tensor,
    pooled: Tensor, tokens_grad: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_tokens or an empty tensor, grad_weight, grad_bias)."""
    return _impl(backend).abmilp_backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad)


@abmilp_pool_grad.register_kernel("cuda")
@_dispatch.on_input_device
def _(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad, backend):
    return _kernels().abmilp_backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad)


@torch.library.custom_op("beyond_cls::softmax_pool", mutates_args=(), device_types="cpu")
def softmax_pool_op(tokens: Tensor, logits: Tensor, mask: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    """(pooled [B, K, D], scores [B, K, N]) in float32 (float64 for float64 tokens); logits [B, K, N]."""
    return _impl(backend).softmax_pool_forward(tokens, logits, mask)


@softmax_pool_op.register_kernel("cuda")
@_dispatch.on_input_device
def _(tokens, logits, mask, backend):
    return _kernels().softmax_pool_forward(tokens, logits, mask)


@torch.library.custom_op("beyond_cls::softmax_pool_grad", mutates_args=(), device_types="cpu")
def softmax_pool_grad(
    grad_pooled: Tensor, grad_scores: Tensor | None, tokens: Tensor, scores: Tensor, pooled: Tensor,
    tokens_grad: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """(grad_tokens or an empty tensor, grad_logits)."""
    return _impl(backend).softmax_pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad)


@softmax_pool_grad.register_kernel("cuda")
@_dispatch.on_input_device
def _(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad, backend):
    return _kernels().softmax_pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad)


def _pooled_scores(tokens: Tensor, k: int) -> tuple[Tensor, Tensor]:
    b, n, d = tokens.shape
    acc = accumulation_dtype(tokens.dtype)
    return tokens.new_empty((b, k, d), dtype=acc), tokens.new_empty((b, k, n), dtype=acc)


def _grad_tokens(tokens: Tensor, tokens_grad: bool) -> Tensor:
    return tokens.new_empty(tokens.shape) if tokens_grad else tokens.new_empty((0,))


@abmilp_pool_op.register_fake
def _(tokens, weight, bias, mask, backend):
    return _pooled_scores(tokens, weight.shape[0])


@abmilp_pool_grad.register_fake
def _(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad, backend):
    return _grad_tokens(tokens, tokens_grad), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@softmax_pool_op.register_fake
def _(tokens, logits, mask, backend):
    return _pooled_scores(tokens, logits.shape[1])


@softmax_pool_grad.register_fake
def _(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad, backend):
    return _grad_tokens(tokens, tokens_grad), scores.new_empty(scores.shape)


def _setup_abmilp(ctx, inputs, output):
    tokens, weight, bias, _, ctx.backend = inputs
    pooled, scores = output
    ctx.save_for_backward(tokens, weight, scores, pooled)
    ctx.bias_dtype = bias.dtype
    ctx.set_materialize_grads(False)  # an unused scores output costs nothing in the backward


def _no_gradient(pooled: Tensor) -> Tensor:
    """The gradient of an unused pooled output: a zero read in place (stride 0), not a [B, K, D] tensor."""
    return pooled.new_zeros(()).expand(pooled.shape)


def _backward_abmilp(ctx, grad_pooled, grad_scores):
    tokens, weight, scores, pooled = ctx.saved_tensors
    grad_pooled = _no_gradient(pooled) if grad_pooled is None else grad_pooled
    tokens_grad = ctx.needs_input_grad[0]
    grad_tokens, grad_weight, grad_bias = abmilp_pool_grad(
        grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad, ctx.backend
    )
    return (grad_tokens if tokens_grad else None), grad_weight, grad_bias.to(ctx.bias_dtype), None, None


def _setup_softmax(ctx, inputs, output):
    tokens, logits, _, ctx.backend = inputs
    pooled, scores = output
    ctx.save_for_backward(tokens, scores, pooled)
    ctx.logits_dtype = logits.dtype
    ctx.set_materialize_grads(False)


def _backward_softmax(ctx, grad_pooled, grad_scores):
    tokens, scores, pooled = ctx.saved_tensors
    grad_pooled = _no_gradient(pooled) if grad_pooled is None else grad_pooled
    tokens_grad = ctx.needs_input_grad[0]
    grad_tokens, grad_logits = softmax_pool_grad(
        grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad, ctx.backend
    )
    return (grad_tokens if tokens_grad else None), grad_logits.to(ctx.logits_dtype), None, None


abmilp_pool_op.register_autograd(_backward_abmilp, setup_context=_setup_abmilp)
softmax_pool_op.register_autograd(_backward_softmax, setup_context=_setup_softmax)


def _backend(op: str, tokens: Tensor, k: int) -> str:
    backend = _dispatch.backend_for(op, tokens.device, tokens.dtype)
    if backend == "triton" and k > MAX_BRANCHES and _dispatch.forced_backend() is None:
        return "reference"  # the Triton kernels hold up to MAX_BRANCHES branches in registers
    return backend


def abmilp_pool(
    tokens: Tensor, weight: Tensor, bias: Tensor | float = 0.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """AbMILP pooling ``(pooled, scores)``: see :func:`beyond_cls.reference.abmilp_pool`.

    tokens [B, N, D]; weight [D] or [K, D]; bias scalar or [K]; mask [B, N] bool (True = keep).
    Fused backends return pooled and scores in float32 (float64 for float64 tokens) and compute the
    tokens' gradient only when the tokens require one.
    """
    squeeze = weight.dim() == 1
    weight2d = weight[None] if squeeze else weight
    backend = _backend("abmilp_pool", tokens, weight2d.shape[0])
    if backend == "reference":
        return reference.abmilp_pool(tokens, weight, bias, mask)
    if weight2d.dim() != 2 or weight2d.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"weight must be [D] or [K, D] with D={tokens.shape[-1]}, got {tuple(weight.shape)}")
    k = weight2d.shape[0]
    if isinstance(bias, Tensor) and bias.shape == (k,) and bias.dtype == weight.dtype and bias.device == tokens.device:
        bias1d = bias  # as given: no view / expand nodes in the autograd graph
    else:
        bias1d = torch.as_tensor(bias, device=tokens.device, dtype=weight.dtype).reshape(-1).expand(k)
    pooled, scores = abmilp_pool_op(tokens, weight2d, bias1d, mask, backend)
    return (pooled[:, 0], scores[:, 0]) if squeeze else (pooled, scores)


def softmax_pool(tokens: Tensor, logits: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax pooling with given logits [B, K, N] or [B, N]: see :func:`beyond_cls.reference.softmax_pool`."""
    squeeze = logits.dim() == 2
    logits3d = logits[:, None] if squeeze else logits
    backend = _backend("softmax_pool", tokens, logits3d.shape[1])
    if backend == "reference":
        return reference.softmax_pool(tokens, logits, mask)
    pooled, scores = softmax_pool_op(tokens, logits3d, mask, backend)
    return (pooled[:, 0], scores[:, 0]) if squeeze else (pooled, scores)
