"""Loads the compiled C++ extension (``beyond_cls._C``) and registers its fake kernels."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch


@torch.compiler.assume_constant_result  # a fact of the installation: constant under torch.compile
def load_error() -> str | None:
    """None when ``torch.ops.beyond_cls`` is registered, else why the extension failed to load."""
    return _load()


@torch.compiler.assume_constant_result
def has_op(name: str) -> bool:
    """Whether the built extension registers ``torch.ops.beyond_cls.<name>``."""
    return _load() is None and hasattr(torch.ops.beyond_cls, name)


@functools.lru_cache(maxsize=1)
def _load() -> str | None:
    try:
        importlib.import_module("beyond_cls._C")
    except ImportError as exc:
        return f"{exc} (reinstall with `pip install --no-build-isolation -e .`)"
    _register_fakes()
    _register_triton_cuda()
    return None


def available() -> bool:
    """Whether the C++ ops can be called."""
    return load_error() is None


def _register_fakes() -> None:
    @torch.library.register_fake("beyond_cls::attention_with_stats")
    def _attention_with_stats_fake(q, k, v, num_prefix_tokens=1, scale=None, bias=None, keep_rows=None):
        b, h, n, _ = q.shape
        stat = q.new_empty((b, h, n), dtype=torch.float32)
        kept = q.new_empty((b, h, 0 if keep_rows is None else len(keep_rows), n), dtype=torch.float32)
        out = v.new_empty(v.shape)  # contiguous, like the kernel's output (empty_like would keep v's strides)
        return out, stat, stat.clone(), stat.clone(), stat.clone(), kept

    # The pooling ops: the backward ops are called straight from the autograd formulas in pooling.py.
    def _pooled_scores(tokens, k):
        b, n, d = tokens.shape
        acc = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        return tokens.new_empty((b, k, d), dtype=acc), tokens.new_empty((b, k, n), dtype=acc)

    def _grad_tokens(tokens, tokens_grad):
        return tokens.new_empty(tokens.shape) if tokens_grad else tokens.new_empty((0,))

    @torch.library.register_fake("beyond_cls::abmilp_forward")
    def _abmilp_forward_fake(tokens, weight, bias, mask=None):
        return _pooled_scores(tokens, weight.shape[0])

    @torch.library.register_fake("beyond_cls::abmilp_backward")
    def _abmilp_backward_fake(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad):
        return _grad_tokens(tokens, tokens_grad), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))

    @torch.library.register_fake("beyond_cls::softmax_pool_forward")
    def _softmax_pool_forward_fake(tokens, logits, mask=None):
        return _pooled_scores(tokens, logits.shape[1])

    @torch.library.register_fake("beyond_cls::softmax_pool_backward")
    def _softmax_pool_backward_fake(grad_pooled, grad_scores, tokens, scores, pooled, tokens_grad):
        return _grad_tokens(tokens, tokens_grad), scores.new_empty(scores.shape)


def _register_triton_cuda() -> None:
    """CUDA tensors given to ``torch.ops.beyond_cls.attention_with_stats`` run the Triton kernel."""
    if importlib.util.find_spec("triton") is None:
        return

    def _attention_with_stats_cuda(q, k, v, num_prefix_tokens=1, scale=None, bias=None, keep_rows=None):
        from beyond_cls.kernels.attention_stats import attention_with_stats_forward

        if keep_rows is not None and len(keep_rows) > 0:
            return attention_with_stats_forward(q, k, v, num_prefix_tokens, scale, bias, keep_rows)
        results = attention_with_stats_forward(q, k, v, num_prefix_tokens, scale, bias)
        b, h, n, _ = q.shape
        return (*results, q.new_empty((b, h, 0, n), dtype=torch.float32))

    torch.library.register_kernel("beyond_cls::attention_with_stats", "cuda", _attention_with_stats_cuda)
