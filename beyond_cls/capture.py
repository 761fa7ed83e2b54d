"""Attention capture shared by the recorders and the probe: the forward swap, and :class:`RowCapture`.

:func:`swap_forward` / :func:`restore_forward` replace an attention module's forward and give it back (the
recorders and :class:`RowCapture` all use them). :class:`RowCapture` captures full attention rows of chosen
queries of one block from the fused pass, nothing else recorded: the light sibling of
:class:`~beyond_cls.analysis.recorder.AttentionRecorder` for jobs that need only the last
block's [cls] and central-patch rows (non-trainable aggregations, guides, localization maps): one attention
module's forward is swapped for one that runs :func:`beyond_cls.ops.attention_with_stats` with ``keep_rows``;
every other block runs its own (SDPA) forward, and no statistics are accumulated.
"""

from __future__ import annotations

import operator
import types
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from beyond_cls import ops
from beyond_cls.models.architectures import attention_adapter

__all__ = ["RowCapture", "attention_modules", "restore_forward", "swap_forward"]

_NO_FORWARD = object()


def swap_forward(module: nn.Module, forward) -> object:
    """Bind ``forward(module, ...)`` as ``module``'s forward; returns the token :func:`restore_forward` takes."""
    saved = module.__dict__.get("forward", _NO_FORWARD)
    module.forward = types.MethodType(forward, module)
    return saved


def restore_forward(module: nn.Module, saved: object) -> None:
    """Undo :func:`swap_forward` (``saved``: its return value): the module's own forward again."""
    if saved is _NO_FORWARD:
        module.__dict__.pop("forward", None)
    else:
        module.forward = saved


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules the recorder supports, in forward order (one per block)."""
    return [(n, m) for n, m in model.named_modules() if attention_adapter(m) is not None]


class RowCapture:
    """``rows``: after each forward, [B, H, R, N] softmax rows of ``queries`` in block ``block`` (negative from the
    last), float32 (float64 from the reference backend on float64 inputs), in the order given.

    Use as a context manager, or call :meth:`install` once to keep the capture for the model's lifetime (a model
    that is only ever used for this, e.g. a probe's frozen encoder). Each forward replaces ``rows``.
    """

    def __init__(self, model: nn.Module, queries: Sequence[int], block: int = -1,
                 num_prefix_tokens: int | None = None) -> None:
        modules = attention_modules(model)
        if not modules:
            raise TypeError(f"{type(model).__name__} has no attention module the recorder supports")
        index = operator.index(block)
        if not -len(modules) <= index < len(modules):
            raise ValueError(f"block {block} is outside [-{len(modules)}, {len(modules)}) for {len(modules)} blocks")
        if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence) or not queries:
            raise TypeError(f"queries must be a non-empty sequence of token indices, got {queries!r}")
        if num_prefix_tokens is None:
            from beyond_cls.models.loader import encoder_info

            num_prefix_tokens = encoder_info(model).num_prefix_tokens
        self.name, self.module = modules[index]
        self.queries = tuple(operator.index(q) for q in queries)
        self.num_prefix_tokens = num_prefix_tokens
        self.rows: Tensor | None = None
        self._saved: object = None

    def install(self) -> RowCapture:
        """Swap the module's forward (idempotent)."""
        if self._saved is None:
            self._saved = swap_forward(self.module, self._forward())
        return self

    def remove(self) -> None:
        """Give the module its own forward back (idempotent)."""
        if self._saved is not None:
            restore_forward(self.module, self._saved)
            self._saved = None

    def __enter__(self) -> RowCapture:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def _forward(self):
        capture = self
        adapter = attention_adapter(self.module)

        def forward(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
            drop = getattr(module, "attn_drop", None)
            if module.training and drop is not None and drop.p > 0:
                raise RuntimeError("RowCapture needs eval mode: attention dropout is active")
            proj = adapter.project(module, x, *args, **kwargs)
            prefix = min(capture.num_prefix_tokens, proj.q.shape[-2] - 1)
            out, _, kept = ops.attention_with_stats(
                proj.q, proj.k, proj.v, prefix, module.scale, proj.bias, capture.queries
            )
            capture.rows = kept.detach()
            return adapter.finish(module, out.to(proj.v.dtype), proj.gate)

        # under torch.compile this one module runs eagerly (a graph break), so ``rows`` is really set
        return torch.compiler.disable(forward)

    def take(self) -> Tensor:
        """The rows of the last forward, and forget them (a RuntimeError when no forward ran)."""
        rows, self.rows = self.rows, None
        if rows is None:
            raise RuntimeError(f"no attention rows captured from {self.name}: run the model first")
        return rows

