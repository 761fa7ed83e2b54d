"""One step of a head bank: a micro-batch's forward, per-head losses and backward; the optimizer update.

:meth:`BankStep.micro` adds a micro-batch's gradients (of the per-head mean losses / ``accum_iter``) to the bank's
flat gradient and returns the per-head losses; :meth:`BankStep.update` all-reduces the gradient over processes,
applies the optimizer and zeroes the gradient. Both run eagerly, or on CUDA (``graphs``) as replays of two
captured CUDA graphs: the micro-batch graph reads the micro-batch from static buffers and accumulates into the
gradient in place; the update graph runs LARS, which reads its learning rates from a device tensor staged before
each replay (:meth:`~beyond_cls.optim.LARS.stage_lrs`), so the schedule changes nothing captured. A micro-batch of
another shape (fewer images after skipped ones) runs eagerly on the same tensors. The micro-batch graph is captured
after ``warmup`` eager micro-batches of its shape (Triton autotuning), the update graph after one eager update
(optimizer state); where capture is impossible
(fp16 loss scaling reads its overflow check on the host, an optimizer other than LARS bakes its lr into a graph, a
capture fails) the step says why in one line and stays eager. On the CPU ``graphs="emulate"`` runs the captured
functions on the static buffers instead, so tests cover that path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from beyond_cls.optim import LARS
from beyond_cls.probe.bank import HeadBank

__all__ = ["BankStep"]

GRAPH_MODES = ("auto", "on", "off", "emulate")


class _Graph:
    """``fn`` captured as a CUDA graph (its output static), or with ``emulate`` kept and called on each replay.
    ``inputs``: the static buffers ``fn`` reads, refilled before each replay."""

    def __init__(self, fn: Callable[[], Any], emulate: bool, inputs: tuple = ()) -> None:
        self.fn, self.inputs, self.graph, self.out = fn, inputs, None, None
        if not emulate:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # loader threads may use CUDA
                self.out = fn()

    def replay(self, *values: Tensor | None) -> Any:
        for buffer, value in zip(self.inputs, values, strict=True):
            if buffer is not None:
                buffer.copy_(value)
        if self.graph is None:
            self.out = self.fn()
        else:
            self.graph.replay()
        return self.out


class BankStep:
    """Micro-batches and updates of one :class:`HeadBank` with its optimizer (see the module docstring).

    ``amp_dtype``: the autocast dtype of the heads (None: none). ``scaler``: the fp16 gradient scaler (its scale
    multiplies the backward; its step replaces the optimizer's). ``distributed``: average the gradient over the
    default process group before each update. ``graphs``: ``auto`` (CUDA graphs on CUDA), ``on``, ``off`` or
    ``emulate``. ``say``: where the one line about graphs goes when they are off or fail (None: nowhere).
    """

    def __init__(
        self,
        bank: HeadBank,
        optimizer: torch.optim.Optimizer,
        *,
        accum_iter: int = 1,
        amp_dtype: torch.dtype | None = None,
        multilabel: bool = False,
        scaler: torch.amp.GradScaler | None = None,
        distributed: bool = False,
        graphs: str = "auto",
        warmup: int = 2,
        say: Callable[[str], Any] | None = None,
    ) -> None:
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {', '.join(GRAPH_MODES)}, got {graphs!r}")
        self.bank, self.optimizer, self.multilabel, self.distributed = bank, optimizer, multilabel, distributed
        self.device = bank.storage.params.device
        self.amp_dtype = amp_dtype
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(self.device.type, enabled=False)
        self.warmup = warmup
        self.accum_iter = accum_iter
        self._grads: dict[tuple[int, ...], Tensor] = {}  # d(step loss) / d(sample loss), per loss shape
        self._say = say
        self._micro: _Graph | None = None
        self._micro_key: tuple | None = None
        self._seen: dict[tuple, int] = {}  # eager micro-batches per input layout
        self._update: _Graph | None = None
        self._update_state: list = []
        self._eager_updates = 0
        self.emulate = graphs == "emulate"
        why = None
        if graphs == "off":
            why = "asked"
        elif self.device.type != "cuda" and not self.emulate:
            why = "they need a CUDA device"
        elif self.scaler.is_enabled():
            why = "fp16 loss scaling checks for overflow on the host at every update"
        self.graphs = why is None
        self.graphs_update = self.graphs and isinstance(optimizer, LARS)  # other optimizers bake their lr in
        self.status = f"off ({why})" if why else "emulated" if self.emulate else "on after the warm-up"
        if self.graphs and not self.graphs_update:
            self.status += f", {type(optimizer).__name__} updates eager (a Python-number lr)"
        if say is not None and graphs != "off" and (graphs == "on" or self.device.type == "cuda"):
            if why is not None:
                say(f"head bank CUDA graphs off: {why}; the heads run eagerly")
            elif not self.graphs_update:
                say(f"head bank CUDA graphs: {type(optimizer).__name__} updates run eagerly (a Python-number lr)")

    # ------------------------------------------------------------------------------------------ eager pieces
    def _grad(self, shape: torch.Size) -> Tensor:
        """The gradient of the step's loss (the heads' mean losses summed, over ``accum_iter``) with respect to the
        per-sample losses [H, n]: (1/accum_iter)/n in float32, as the mean's backward rounds it."""
        grad = self._grads.get(tuple(shape))
        if grad is None:
            one = torch.ones((), device=self.device) / self.accum_iter
            grad = self._grads[tuple(shape)] = (one / shape[1]).expand(shape)
        return grad

    def _losses(self, tokens: Tensor, selections: Tensor | None, targets: Tensor, weight: float = 1.0) -> Tensor:
        """Backpropagate one micro-batch; its per-head losses [H], detached."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None, cache_enabled=False):
            samples = self.bank.sample_losses(tokens, selections, targets, self.multilabel)
        grad = self._grad(samples.shape)
        torch.autograd.backward(samples, self.scaler.scale(grad if weight == 1.0 else grad * weight))
        return samples.detach().mean(1)

    def _small(self, tokens: Tensor, selections: Tensor | None, targets: Tensor) -> Tensor:
        """A micro-batch of fewer than two images (bad images skipped) cannot give BatchNorm batch statistics:
        it runs with the running statistics; an empty one contributes zero loss through a dummy row."""
        weight = 1.0
        if tokens.shape[0] == 0:
            tokens, weight = tokens.new_zeros(1, *tokens.shape[1:]), 0.0
            targets = targets.new_zeros(1, *targets.shape[1:])
            selections = None if selections is None else selections.new_zeros(1, *selections.shape[1:])
        norms = [m for m in self.bank.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.eval()
        try:
            losses = self._losses(tokens, selections, targets, weight)
        finally:
            for m in norms:
                m.train()
        return losses * weight

    # ------------------------------------------------------------------------------------------ graphs
    def _off(self, why: str) -> None:
        self.graphs = self.graphs_update = False
        self._micro = self._update = None
        self.status = f"off ({why})"
        if self._say is not None:
            self._say(f"head bank CUDA graphs off: {why}; the heads run eagerly")

    def _capture(self, fn: Callable[[], Any], what: str, inputs: tuple = ()) -> _Graph | None:
        try:
            graph = _Graph(fn, self.emulate, inputs)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the step runs eagerly and says why
            first = (str(exc).strip().splitlines() or [""])[0]
            self._off(f"capturing the {what} failed ({type(exc).__name__}: {first})")
            return None
        if not self.bank.storage.linked_grads():
            self._off(f"the {what} graph replaced a gradient instead of accumulating into it")
            return None
        self.status = "emulated" if self.emulate else "on"
        return graph

    def _micro_graph(self, tokens: Tensor, selections: Tensor | None, targets: Tensor) -> _Graph | None:
        """The micro-batch graph of this input layout: captured after the warm-up; None: run eagerly."""
        if not self.graphs or not self.bank.training:
            return None
        key = (self.bank.storage, *((t.shape, t.dtype) for t in (tokens, targets)),
               None if selections is None else (selections.shape, selections.dtype))
        if self._micro is not None and self._micro_key[0] is key[0]:
            return self._micro if self._micro_key == key else None  # one layout captured: others run eagerly
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen <= self.warmup:
            return None
        static = (tokens.clone(), None if selections is None else selections.clone(), targets.clone())
        self._micro = self._capture(lambda: self._losses(*static), "micro-batch", static)
        self._micro_key = key
        return self._micro

    def micro(self, tokens: Tensor, selections: Tensor | None, targets: Tensor) -> Tensor:
        """Add the gradients of one micro-batch; return its per-head losses [H] (detached; with graphs the graph's
        output, valid until the next call)."""
        if tokens.shape[0] < 2:
            return self._small(tokens, selections, targets)
        graph = self._micro_graph(tokens, selections, targets)
        if graph is None:
            return self._losses(tokens, selections, targets)
        return graph.replay(tokens, selections, targets)

    def _state(self) -> list:
        """What the update graph holds on to: the bank's layout and the optimizer's momentum buffers."""
        state = self.optimizer.state
        return [self.bank.storage, *(state[p].get("mu") for g in self.optimizer.param_groups for p in g["params"])]

    def update(self) -> None:
        """All-reduce the gradient (several processes), apply the optimizer, zero the gradient."""
        if self.distributed:
            grads = self.bank.storage.grads
            dist.all_reduce(grads)
            grads.div_(dist.get_world_size())
        if self.graphs_update and self._eager_updates > 0:
            state = self._state()
            if self._update is None or len(state) != len(self._update_state) or any(
                    a is not b for a, b in zip(state, self._update_state)):
                self._update, self._update_state = self._capture(self._apply, "update"), state
            if self._update is not None:
                assert isinstance(self.optimizer, LARS)
                self.optimizer.stage_lrs()
                self._update.replay()
                return
        self._apply()
        self._eager_updates += 1

    def _apply(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.bank.zero_grad()
