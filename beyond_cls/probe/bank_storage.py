"""Where a head bank keeps its tensors: views of a few flat tensors, so that heads run stacked.

Every parameter of the bank is a view of one flat tensor and its ``.grad`` a view of one flat gradient. The
parameters that run stacked (each linear group's Linear weights and biases, each spec group's linear AbMILP
scorers) lie consecutively there, and a leaf tensor over their slice is what the batched forward uses: autograd
accumulates one gradient per stack, in place, into the flat gradient, where each head's optimizer param group
finds it as its own ``.grad``. One op then zeroes, all-reduces or checks every gradient. Each linear group's
BatchNorm statistics are views of one tensor each, which one batch norm updates. The heads stay ordinary modules:
state-dict keys, per-head optimizer groups and ``load_state_dict`` (in place) are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beyond_cls.heads.groups import stacked_names

__all__ = ["BankStorage", "LinearLayout"]


@dataclass
class LinearLayout:
    """The stacked BatchNorm + Linear tensors of one linear group of H heads with d features and C classes."""

    weight_t: Tensor  # leaf [H, d, C]: each head's Linear weight, transposed
    bias: Tensor  # leaf [H, 1, C]
    running_mean: Tensor  # [H·d]
    running_var: Tensor  # [H·d]
    num_batches_tracked: Tensor  # [H] int64


class BankStorage:
    """The flat layout of one :class:`~beyond_cls.probe.bank.HeadBank` (see the module docstring)."""

    def __init__(self, bank: nn.Module) -> None:  # a HeadBank (not imported: it imports this module)
        order: list[nn.Parameter] = []
        stacks: list[tuple[int, str, list[nn.Parameter]]] = []
        for i, group in enumerate(bank.spec_groups):
            for name in stacked_names(group.modules[0]) if group.kind == "shared" else ():
                params = [m.get_parameter(name) for m in group.modules]
                stacks.append((i, name, params))
                order += params
        for group in bank.linear_groups:
            order += [p.head[1].weight for p in group.probes] + [p.head[1].bias for p in group.probes]
        placed = {id(p) for p in order}
        order += [p for p in bank.parameters() if id(p) not in placed]
        kinds = {(p.dtype, p.device) for p in order}
        if len(kinds) != 1:
            raise ValueError(f"a head bank's parameters must share one dtype and device, got {sorted(map(str, kinds))}")
        with torch.no_grad():
            self.params = torch.cat([p.detach().reshape(-1) for p in order])
            self.grads = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad.detach()).reshape(-1)
                                    for p in order])
        offsets, at = {}, 0
        self._links: list[tuple[nn.Parameter, Tensor]] = []
        for p in order:
            offsets[id(p)], n = at, p.numel()
            p.data = self.params[at:at + n].view(p.shape)
            p.grad = grad = self.grads[at:at + n].view(p.shape)
            self._links.append((p, grad))
            at += n
        self._ptrs: list[tuple[nn.Module | Tensor, str | None, int]] = [(p, None, p.data_ptr()) for p in order]

        def span(params: list[nn.Parameter]) -> slice:
            start = offsets[id(params[0])]
            return slice(start, start + sum(p.numel() for p in params))

        self._leaf_grads: list[tuple[Tensor, Tensor]] = []
        self._stacked: dict[int, dict[str, Tensor]] = {}
        for i, name, params in stacks:  # concatenated along dim 0
            s = span(params)
            leaf = self._leaf(self.params[s], self.grads[s], (-1, *params[0].shape[1:]))
            self._stacked.setdefault(i, {})[name] = leaf
        self.linear: list[LinearLayout] = []
        for group in bank.linear_groups:
            weights = [p.head[1].weight for p in group.probes]
            h, (c, d) = len(weights), weights[0].shape
            w, b = span(weights), span([p.head[1].bias for p in group.probes])
            norms = [p.head[0] for p in group.probes]
            with torch.no_grad():
                stats = [torch.cat([getattr(m, k) for m in norms]) for k in ("running_mean", "running_var")]
                count = torch.stack([m.num_batches_tracked for m in norms])
            for k, m in enumerate(norms):
                m.running_mean, m.running_var = stats[0][k * d:(k + 1) * d], stats[1][k * d:(k + 1) * d]
                m.num_batches_tracked = count[k]
                self._ptrs += [(m, name, getattr(m, name).data_ptr())
                               for name in ("running_mean", "running_var", "num_batches_tracked")]
            self.linear.append(LinearLayout(
                self._leaf(self.params[w], self.grads[w], (h, c, d), transpose=True),
                self._leaf(self.params[b], self.grads[b], (h, 1, c)),
                stats[0], stats[1], count,
            ))
        self._inverse: dict[tuple[int, ...], Tensor] = {}

    def _leaf(self, values: Tensor, grads: Tensor, shape: tuple[int, ...], transpose: bool = False) -> Tensor:
        """A leaf over ``values`` (viewed as ``shape``, optionally with its last two dims swapped) whose gradient
        accumulates into ``grads``."""
        leaf, grad = values.view(shape), grads.view(shape)
        if transpose:
            leaf, grad = leaf.transpose(-2, -1), grad.transpose(-2, -1)
        leaf.requires_grad_()
        leaf.grad = grad
        self._leaf_grads.append((leaf, grad))
        return leaf

    def stacked(self, group: int) -> dict[str, Tensor] | None:
        """The stacked-parameter leaves of spec group ``group`` (None: it has none)."""
        return self._stacked.get(group)

    def linked(self) -> bool:
        """Whether every parameter and BatchNorm statistic is still its view here (``.to()`` on a part of the bank,
        ``load_state_dict(assign=True)``... replace them)."""
        return all((owner if name is None else getattr(owner, name)).data_ptr() == ptr
                   for owner, name, ptr in self._ptrs)

    def linked_grads(self) -> bool:
        """Whether every gradient is still its view of the flat gradient."""
        return all(p.grad is grad for p, grad in self._links) and all(
            leaf.grad is grad for leaf, grad in self._leaf_grads)

    def relink_grads(self) -> None:
        """Make every ``.grad`` its view of the flat gradient again; one set to None (``optimizer.zero_grad()``)
        becomes zero there, one replaced is copied there."""
        with torch.no_grad():
            for p, grad in self._links:
                if p.grad is not grad:
                    if p.grad is None:
                        grad.zero_()
                    else:
                        grad.copy_(p.grad)
                    p.grad = grad

    def zero_grad(self) -> None:
        """Zero every gradient of the bank (one op)."""
        with torch.no_grad():
            self.grads.zero_()
        for p, grad in self._links:
            if p.grad is not grad:
                p.grad = grad

    def inverse(self, order: list[int]) -> Tensor:
        """The index (on the bank's device) that puts values listed in ``order`` back in entry order."""
        key = tuple(order)
        if key not in self._inverse:
            host = torch.empty(len(order), dtype=torch.int64)
            host.numpy()[list(order)] = range(len(order))
            self._inverse[key] = host.to(self.params.device)
        return self._inverse[key]
