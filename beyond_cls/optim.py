"""LARS (the MAE codebase's variant, one multi-tensor update over all param groups) and the MAE lr schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["LARS", "adjust_learning_rate", "mae_lr", "scaled_lr"]

_HYPER = ("weight_decay", "momentum", "trust_coefficient")
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _lars_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    neg_lrs: list[Tensor],
    one: Tensor,
    *,
    weight_decay: float,
    momentum: float,
    trust_coefficient: float,
) -> None:
    """One LARS update of same-device, same-dtype tensors with ``torch._foreach_*`` ops, no host sync.

    Same math as :func:`beyond_cls.reference.lars_step`; ``neg_lrs``: each param's ``-lr`` as a 0-d tensor on
    its device (the learning rates are data, so a captured or compiled update follows the schedule); ``one``: a 0-d
    1 of the norms' dtype and device (the trust ratio where a norm is 0).
    """
    nd = [i for i, p in enumerate(params) if p.ndim > 1]  # trust ratio and weight decay for these only
    updates = list(grads)
    if nd:
        p_nd, g_nd = [params[i] for i in nd], [grads[i] for i in nd]
        decayed = torch._foreach_add(g_nd, p_nd, alpha=weight_decay) if weight_decay != 0 else g_nd
        param_norms, update_norms = torch.stack(torch._foreach_norm([*p_nd, *decayed])).view(2, -1)
        ratios = torch.where(torch.minimum(param_norms, update_norms) > 0,
                             trust_coefficient * param_norms / update_norms, one).unbind(0)
        for i, u in zip(nd, torch._foreach_mul(decayed, ratios)):  # a new list: the grads are never scaled
            updates[i] = u
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, updates)
    torch._foreach_addcmul_(params, bufs, neg_lrs)  # p += mu·(-lr), rounded as p.add_(mu, alpha=-lr)


class _Bucket:
    """The params of one (device, dtype, hyperparameters) bucket with a grad, their state and group indices."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self.bufs: list[Tensor] = []
        self.groups: list[int] = []


class LARS(torch.optim.Optimizer):
    """LARS as in the MAE codebase: weight decay and trust ratio for ndim > 1 params only.

    For ndim > 1: ``d = g + wd·p``, scaled by ``tc·‖p‖/‖d‖`` when both norms are positive; for
    ndim ≤ 1: ``d = g``. Then ``mu = momentum·mu + d`` and ``p -= lr·mu``. Momentum state key:
    ``"mu"``. Params whose grad is None are skipped.

    One multi-tensor update covers every param group (per device, dtype and weight decay / momentum / trust
    coefficient, normally one): the groups' ``"lr"`` values, which the schedule sets, are copied into one device
    tensor per step (:meth:`stage_lrs`, asynchronously from pinned memory on CUDA), so the update never syncs with
    the host, and a CUDA-graph-captured update reads the current rates. Inside a capture :meth:`step` does not
    stage: call :meth:`stage_lrs` before each replay.
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
        self._neg_lrs: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # -lr per group, on each device
        self._one: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._host: dict[tuple[torch.device, torch.dtype], np.ndarray] = {}  # the CPU ones' arrays
        self._views: dict[tuple, tuple[Tensor, list[Tensor]]] = {}  # per bucket layout: each param's -lr

    def _buckets(self) -> dict[tuple, _Bucket]:
        buckets: dict[tuple, _Bucket] = {}
        for g, group in enumerate(self.param_groups):
            hyper = tuple(float(group[k]) for k in _HYPER)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = buckets.setdefault((p.device, p.dtype, hyper), _Bucket())
                bucket.params.append(p)
                bucket.grads.append(p.grad)
                bucket.bufs.append(state["mu"])
                bucket.groups.append(g)
        return buckets

    @staticmethod
    def _lr_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.no_grad()
    def stage_lrs(self) -> None:
        """Copy every group's ``-lr`` to the devices of its params (no host sync; on the CPU no op at all)."""
        values = [-float(group["lr"]) for group in self.param_groups]
        keys = {(p.device, self._lr_dtype(p.dtype)) for group in self.param_groups for p in group["params"]}
        for device, dtype in keys:
            target = self._neg_lrs.get((device, dtype))
            if target is None or target.numel() != len(values):
                if device.type == "cpu":  # the tensor of a numpy array, written through the array
                    self._host[(device, dtype)] = array = np.empty(len(values), dtype=_NUMPY[dtype])
                    target = torch.from_numpy(array)
                else:
                    target = torch.empty(len(values), dtype=dtype, device=device)
                self._neg_lrs[(device, dtype)] = target
                self._one[(device, dtype)] = torch.ones((), dtype=dtype, device=device)
            if device.type == "cpu":
                self._host[(device, dtype)][:] = values
                continue
            # a fresh pinned block: the caching host allocator keeps it until this copy has been done
            host = torch.empty(len(values), dtype=dtype, pin_memory=True)
            host.numpy()[:] = values
            target.copy_(host, non_blocking=True)

    def _param_lrs(self, key: tuple[torch.device, torch.dtype], groups: list[int]) -> list[Tensor]:
        """Each param's ``-lr``: 0-d views of the staged tensor, made once per layout (no op per step)."""
        neg_lrs = self._neg_lrs[key]
        cached = self._views.get((key, tuple(groups)))
        if cached is None or cached[0] is not neg_lrs:
            rows = neg_lrs.unbind(0)
            cached = self._views[(key, tuple(groups))] = (neg_lrs, [rows[g] for g in groups])
        return cached[1]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every param with a grad; returns the closure's loss when one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if not capturing:
            self.stage_lrs()
        for (device, dtype, hyper), bucket in self._buckets().items():
            key = (device, self._lr_dtype(dtype))
            _lars_multi_tensor(bucket.params, bucket.grads, bucket.bufs, self._param_lrs(key, bucket.groups),
                               self._one[key], **dict(zip(_HYPER, hyper)))
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
