"""Heads of one spec at several learning rates computed together, from one read of the tokens.

A probe bank trains every head spec at each of its learning rates; those heads differ only in their weights.
[cls], mean pooling and their concatenation are computed once for all of them; the linear AbMILP scorers of L heads
(K branches each) run as one L·K-branch :func:`beyond_cls.ops.abmilp_pool` call; MLP and positional scorers (each
head with its own trainable positional embedding) compute their logits head by head and pool together through one
:func:`beyond_cls.ops.softmax_pool`. Branches are independent, so each head gets what it gets alone (bit for bit
with the C++ AbMILP kernel; the batched GEMM of ``softmax_pool`` may round differently). Other aggregations
(attentive probing, SA-AbMILP) run head by head.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn

from beyond_cls import ops
from beyond_cls.heads.abmilp import AbMILP
from beyond_cls.heads.checks import check_tokens
from beyond_cls.heads.tokens import ClsMean, ClsToken, MeanPatch

__all__ = ["forward_shared", "share_key", "stacked_names"]


def share_key(module: nn.Module) -> Hashable | None:
    """Aggregations with the same key compute together in :func:`forward_shared`; None: head by head."""
    if type(module) is ClsToken:
        return ("cls", module.dim)
    if type(module) is MeanPatch:
        return ("mean", module.dim, module.num_prefix_tokens)
    if type(module) is ClsMean:
        return ("cls+mean", module.dim, module.num_prefix_tokens, module.blocks)
    if type(module) is AbMILP:
        return ("abmilp", module.dim, module.depth, module.act, module.branches, module.content, module.pos_cond,
                module.fixed_pos, module.grid, module.num_prefix_tokens)
    return None


def stacked_names(module: nn.Module) -> tuple[str, ...]:
    """Parameters that :func:`forward_shared` takes concatenated along dim 0 over the L heads, in head order
    (the linear AbMILP scorer: weight [L·K, D] and bias [L·K]); the others it reads from each module."""
    if type(module) is AbMILP and module.depth == 1 and not module.pos_cond:
        return ("scorer.0.weight", "scorer.0.bias")
    return ()


def _patches(tokens: Tensor, num_prefix_tokens: int, views: dict | None) -> Tensor:
    """``tokens[:, num_prefix_tokens:]``, made once per ``views`` dict (one op fewer per reuse)."""
    if views is None:
        return tokens[:, num_prefix_tokens:]
    key = ("patches", num_prefix_tokens)
    if key not in views:
        views[key] = tokens[:, num_prefix_tokens:]
    return views[key]


def forward_shared(
    modules: Sequence[nn.Module], tokens: Tensor, stacked: dict[str, Tensor] | None = None, views: dict | None = None
) -> tuple[list[Tensor], Tensor | None]:
    """Features of L aggregations with one :func:`share_key`, and their scores.

    Returns (pieces whose concatenation along dim 1 is the features [B, L, out_dim], scores [B, L·K, N'] of
    AbMILP or None). ``stacked``: the :func:`stacked_names` parameters concatenated over the heads (default:
    concatenated here, one op each). ``views``: a dict shared by the calls on the same ``tokens``, where views of
    them (the patches) are kept for the next call.
    """
    first = modules[0]
    if type(first) is ClsToken:
        check_tokens(tokens, first.dim, 0)
        return [tokens[:, :1]] * len(modules), None
    if type(first) is MeanPatch:
        check_tokens(tokens, first.dim, first.num_prefix_tokens)
        return [_patches(tokens, first.num_prefix_tokens, views).mean(1, keepdim=True)] * len(modules), None
    if type(first) is ClsMean:
        return [first(tokens)[:, None]] * len(modules), None
    if type(first) is not AbMILP:
        raise TypeError(f"{type(first).__name__} does not compute several heads at once")
    if first.content == "patch":
        check_tokens(tokens, first.dim, first.num_prefix_tokens)
        content = _patches(tokens, first.num_prefix_tokens, views)
    else:
        content = first.select(tokens)
    names = stacked_names(first)
    if names:
        if stacked is None:
            stacked = {n: torch.cat([m.get_parameter(n) for m in modules]) for n in names}
        pooled, scores = ops.abmilp_pool(content, stacked[names[0]], stacked[names[1]])
    else:
        if first.pos_cond and first.grid is not None:  # each head's own trainable table
            logits = [m.scorer(content + m._positions(content.shape[1], content.device).to(content.dtype))
                      .transpose(1, 2) for m in modules]
        else:
            x = content
            if first.pos_cond:  # fixed (legacy): one table for all
                x = x + first._positions(x.shape[1], x.device).to(x.dtype)
            logits = [m.scorer(x).transpose(1, 2) for m in modules]  # each [B, K, N']
        pooled, scores = ops.softmax_pool(content, logits[0] if len(logits) == 1 else torch.cat(logits, 1))
    if first.branches > 1:
        pooled = pooled.view(pooled.shape[0], len(modules), first.out_dim)  # per head: its K branches, flattened
    return [pooled], scores
