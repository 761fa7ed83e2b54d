"""LARS (the MAE codebase's variant, multi-tensor) and the MAE learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LARS", "adjust_learning_rate", "mae_lr", "scaled_lr"]


def _lars_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    trust_coefficient: float,
) -> None:
    """One LARS update of same-device, same-dtype tensors with ``torch._foreach_*`` ops, no host sync.

    Same math as :func:`beyond_cls.reference.lars_step`; ``params`` must all have ndim > 1 or
    all ndim ≤ 1.
    """
    if not params:
        return
    if params[0].ndim > 1:
        decayed = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay != 0 else grads
        param_norms = torch.stack(torch._foreach_norm(params))
        update_norms = torch.stack(torch._foreach_norm(decayed))
        ratios = torch.where(
            (param_norms > 0) & (update_norms > 0),
            trust_coefficient * param_norms / update_norms,
            torch.ones_like(param_norms),
        ).unbind(0)
        if decayed is grads:  # never scale the grads in place
            updates = torch._foreach_mul(grads, ratios)
        else:
            torch._foreach_mul_(decayed, ratios)
            updates = decayed
    else:
        updates = grads
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, updates)
    torch._foreach_add_(params, bufs, alpha=-lr)


class LARS(torch.optim.Optimizer):
    """LARS as in the MAE codebase: weight decay and trust ratio for ndim > 1 params only.

    For ndim > 1: ``d = g + wd·p``, scaled by ``tc·‖p‖/‖d‖`` when both norms are positive; for
    ndim ≤ 1: ``d = g``. Then ``mu = momentum·mu + d`` and ``p -= lr·mu``. Momentum state key:
    ``"mu"``. Params whose grad is None are skipped. Runs multi-tensor, without host syncs.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        for name, value in (
            ("lr", lr),
            ("weight_decay", weight_decay),
            ("momentum", momentum),
            ("trust_coefficient", trust_coefficient),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every param with a grad; returns the closure's loss when one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # bucket by (ndim > 1, device, dtype): each bucket is one set of multi-tensor kernels
            buckets: dict[tuple[bool, torch.device, torch.dtype], tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps, gs, mus = buckets.setdefault((p.ndim > 1, p.device, p.dtype), ([], [], []))
                ps.append(p)
                gs.append(p.grad)
                mus.append(state["mu"])
            for ps, gs, mus in buckets.values():
                _lars_multi_tensor(
                    ps,
                    gs,
                    mus,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    momentum=group["momentum"],
                    trust_coefficient=group["trust_coefficient"],
                )
        return loss


def mae_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """MAE schedule at a (fractional) epoch: linear warm-up to ``lr``, then half-cosine to ``min_lr``.

    Per-iteration use: ``epoch = it / iters_per_epoch + epoch_index``. Past ``epochs`` it stays
    at ``min_lr``.
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if epochs <= warmup_epochs:
        raise ValueError(f"epochs ({epochs}) must be greater than warmup_epochs ({warmup_epochs})")
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = min((epoch - warmup_epochs) / (epochs - warmup_epochs), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer,
    epoch: float,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    epochs: float,
) -> float:
    """Set every param group's lr to ``mae_lr(...)`` times its optional ``"lr_scale"``; return the value."""
    value = mae_lr(epoch, lr, min_lr, warmup_epochs, epochs)
    for group in optimizer.param_groups:
        group["lr"] = value * group.get("lr_scale", 1.0)
    return value


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The MAE linear scaling rule: ``lr = base_lr · batch_size / 256``."""
    return base_lr * batch_size / 256
