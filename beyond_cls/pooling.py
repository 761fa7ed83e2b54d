"""Fused softmax pooling (AbMILP and given-logits) as torch.library custom ops with autograd.

``beyond_cls::abmilp_pool`` and ``beyond_cls::softmax_pool`` are single graph nodes for
``torch.compile``; their forward and backward run the Triton kernels (CUDA, or CPU tensors under
``TRITON_INTERPRET=1``) or the C++ kernels (CPU), chosen like every op by :mod:`beyond_cls.ops`.
The tokens' gradient is computed only when the tokens require one (frozen encoders skip it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from beyond_cls import _extension


def _backend(tokens: Tensor) -> str:
    from beyond_cls.ops import backend_for

    return backend_for("abmilp_pool", tokens.device, tokens.dtype)


def _triton():
    from beyond_cls.kernels import abmilp

    return abmilp


@torch.library.custom_op("beyond_cls::abmilp_pool", mutates_args=())
def abmilp_pool_op(tokens: Tensor, weight: Tensor, bias: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(pooled [B, K, D], scores [B, K, N]) in float32 (float64 for float64 tokens)."""
    if _backend(tokens) == "triton":
        return _triton().abmilp_forward(tokens, weight, bias, mask)
    _extension.load_error()
    return torch.ops.beyond_cls.abmilp_forward(tokens, weight, bias, mask)


@torch.library.custom_op("beyond_cls::abmilp_pool_grad", mutates_args=())
def abmilp_pool_backward_op(
    grad_pooled: Tensor, grad_scores: Tensor | None, tokens: Tensor, weight: Tensor, scores: Tensor,
    pooled: Tensor, tokens_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_tokens or an empty tensor, grad_weight, grad_bias)."""
    if _backend(tokens) == "triton":
        return _triton().abmilp_backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad)
    return torch.ops.beyond_cls.abmilp_backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad)


@torch.library.custom_op("beyond_cls::softmax_pool", mutates_args=())
def softmax_pool_op(tokens: Tensor, logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(pooled [B, K, D], scores [B, K, N]) in float32 (float64 for float64 tokens)."""
    if _backend(tokens) == "triton":
        return _triton().softmax_pool_forward(tokens, logits, mask)
    _extension.load_error()
    return torch.ops.beyond_cls.softmax_pool_forward(tokens, logits, mask)


@torch.library.custom_op("beyond_cls::softmax_pool_grad", mutates_args=())
def softmax_pool_backward_op(
    grad_pooled: Tensor, grad_scores: Tensor | None, tokens: Tensor, scores: Tensor, pooled: Tensor,
    tokens_grad: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_tokens or an empty tensor, grad_logits)."""
    if _backend(tokens) == "triton":
        return _triton().pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, None, tokens_grad)
    return torch.ops.beyond_cls.softmax_pool_backward(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad)


def _scores_dtype(tokens: Tensor) -> torch.dtype:
    return torch.float64 if tokens.dtype == torch.float64 else torch.float32


@abmilp_pool_op.register_fake
def _(tokens, weight, bias, mask):
    b, n, d = tokens.shape
    k = weight.shape[0]
    dtype = _scores_dtype(tokens)
    return tokens.new_empty((b, k, d), dtype=dtype), tokens.new_empty((b, k, n), dtype=dtype)


@abmilp_pool_backward_op.register_fake
def _(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad):
    grad_tokens = tokens.new_empty(tokens.shape) if tokens_grad else tokens.new_empty((0,))
    return grad_tokens, weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))


@softmax_pool_op.register_fake
def _(tokens, logits, mask):
    b, n, d = tokens.shape
    k = logits.shape[1]
    dtype = _scores_dtype(tokens)
    return tokens.new_empty((b, k, d), dtype=dtype), tokens.new_empty((b, k, n), dtype=dtype)


@softmax_pool_backward_op.register_fake
def _(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad):
    grad_tokens = tokens.new_empty(tokens.shape) if tokens_grad else tokens.new_empty((0,))
    return grad_tokens, scores.new_empty(scores.shape)


def _setup_abmilp(ctx, inputs, output):
    tokens, weight, bias, mask = inputs
    pooled, scores = output
    ctx.save_for_backward(tokens, weight, scores, pooled)
    ctx.bias_dtype = bias.dtype
    ctx.set_materialize_grads(False)  # an unused scores output costs nothing in the backward


def _backward_abmilp(ctx, grad_pooled, grad_scores):
    tokens, weight, scores, pooled = ctx.saved_tensors
    grad_pooled = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled
    tokens_grad = ctx.needs_input_grad[0]
    # C++: its own op directly (one traced node too, fake in _extension), without the custom op's layers
    op = torch.ops.beyond_cls.abmilp_backward if _backend(tokens) == "cpp" else abmilp_pool_backward_op
    grad_tokens, grad_weight, grad_bias = op(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad)
    return (grad_tokens if tokens_grad else None), grad_weight, grad_bias.to(ctx.bias_dtype), None


def _setup_softmax(ctx, inputs, output):
    tokens, logits, mask = inputs
    pooled, scores = output
    ctx.save_for_backward(tokens, scores, pooled)
    ctx.logits_dtype = logits.dtype
    ctx.set_materialize_grads(False)


def _backward_softmax(ctx, grad_pooled, grad_scores):
    tokens, scores, pooled = ctx.saved_tensors
    grad_pooled = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled
    tokens_grad = ctx.needs_input_grad[0]
    op = torch.ops.beyond_cls.softmax_pool_backward if _backend(tokens) == "cpp" else softmax_pool_backward_op
    grad_tokens, grad_logits = op(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad)
    return (grad_tokens if tokens_grad else None), grad_logits.to(ctx.logits_dtype), None


torch.library.register_autograd("beyond_cls::abmilp_pool", _backward_abmilp, setup_context=_setup_abmilp)
torch.library.register_autograd("beyond_cls::softmax_pool", _backward_softmax, setup_context=_setup_softmax)
