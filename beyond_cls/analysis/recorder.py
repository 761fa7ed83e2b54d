"""AttentionRecorder: measure information flow while a timm ViT runs, at the cost of inference.

Inside ``with AttentionRecorder(model) as rec:`` every supported attention module computes its
output with :func:`beyond_cls.ops.attention_with_stats` (fused: no N×N matrix leaves the kernel)
and adds per-head sums of every registered statistic (:mod:`beyond_cls.statistics`; float32 within a batch,
one compiled reduction per block on CUDA) to float64 running sums [fields, heads] on the model's device.
The model's outputs are those of its own forward; the original forwards return on exit.
With ``keep_rows`` the same fused pass also returns the full attention rows of chosen queries
(e.g. [cls] and the central patch of the last block), kept for the last batch only.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from beyond_cls import ops, statistics
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.capture import attention_modules, restore_forward, swap_forward
from beyond_cls.models.architectures import attention_adapter, supported_attention
from beyond_cls.models.loader import encoder_info
from beyond_cls.reference import AttentionRows, row_planes


def sum_fields(has_cls: bool) -> tuple[tuple[str, ...], int]:
    """The rows of :func:`batch_sums` and how many lead that are sums over patch queries (not only images): the
    registered statistics (:func:`beyond_cls.statistics.statistics`) over patch queries, then those of the
    [cls] row, each group in table order."""
    present = statistics.statistics(has_cls)
    over_patches = tuple(s.name for s in present if s.queries == "patches")
    return over_patches + tuple(s.name for s in present if s.queries == "cls"), len(over_patches)


def batch_sums(rows: AttentionRows | Tensor, num_prefix_tokens: int, has_cls: bool) -> Tensor:
    """Per-head sums of one batch's registered statistics: [F, H] in the rows' dtype (float32 from the fused ops).

    ``rows``: the op's :class:`AttentionRows` or its stacked [S, B, H, N] tensor. Rows follow :func:`sum_fields`:
    each statistic's ``value`` summed over images and patch queries, then over images for those of the [cls] row.
    Nothing is cast to float64: the values lie in [0, 1] or [0, log N] (all of one sign), so float32 sums of a
    batch stay within 1e-6 relative error of float64 ones (B=256, N=197: <= 5e-7 measured); only the [F, H]
    running sums across batches are float64.
    """
    stacked = rows.stacked if isinstance(rows, AttentionRows) else rows
    fields, _ = sum_fields(has_cls)
    has_prefix = num_prefix_tokens > 0
    selected: dict[str, dict[str, Tensor]] = {}
    sums = []
    for name in fields:
        statistic = statistics.find(name)
        if statistic.queries not in selected:  # each query set is sliced and split once
            queries = slice(num_prefix_tokens, None) if statistic.queries == "patches" else slice(0, 1)
            selected[statistic.queries] = row_planes(stacked[..., queries], has_prefix)
        sums.append(statistic.value(selected[statistic.queries]).sum((0, 2)))
    return torch.stack(sums)


def add_batch_sums(total: Tensor, rows: AttentionRows | Tensor, num_prefix_tokens: int, has_cls: bool) -> Tensor:
    """``total`` [F, H] float64 plus :func:`batch_sums` of ``rows``: the float64 running sum across batches."""
    return total + batch_sums(rows, num_prefix_tokens, has_cls)


@functools.cache
def _compiled_add_batch_sums():
    # torch.compile rather than a hand-written kernel: Inductor fuses the reductions and the add (one kernel in its
    # CPU code) where eager runs a launch per statistic, and this one function stays the definition on every device.
    # Every block shares the graph (same shapes; the totals are arguments, not state); another batch size
    # compiles once more with a dynamic batch dimension (a one-image batch gets its own graph).
    return torch.compile(add_batch_sums, fullgraph=True)


def batch_accumulator(device: torch.device) -> Callable[..., Tensor]:
    """:func:`add_batch_sums`, compiled on CUDA (launch-bound there), eager elsewhere."""
    return _compiled_add_batch_sums() if device.type == "cuda" else add_batch_sums


class KeptRows(dict):
    """Block index -> kept attention rows [B, H, R, N]; a negative index counts from the last block."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks

    def __missing__(self, key):
        if isinstance(key, int) and -self.num_blocks <= key < 0 and key + self.num_blocks in self:
            return self[key + self.num_blocks]
        raise KeyError(f"no kept rows recorded for block {key!r} (recorded: {sorted(self)})")


class AttentionRecorder:
    """Context manager that records attention statistics of every block of a timm model.

    Works for every attention class a registered architecture adapts: timm's VisionTransformer (with or
    without [cls], with registers), Beit and Eva, the CAPI port (``beyond_cls.models.architectures``).
    ``num_prefix_tokens``, ``has_class_token`` and ``name`` default to :func:`encoder_info` of the model.

    ``keep_rows``: ``{block_index: query_indices}`` (blocks in :attr:`modules` order, negative from
    the last), or bare query indices for the last block, e.g. ``(0, c)`` for [cls] and the central
    patch c. After each forward, ``kept_rows[block_index]`` holds those queries' full softmax rows over
    all N keys, [B, H, R, N] on the model's device (float32; float64 from the reference backend on a
    float64 model), in the order given, computed in the fused pass (no N×N matrix). Only the last
    batch is kept: each forward replaces it, nothing accumulates; memory B·H·R·N per block.
    """

    def __init__(
        self,
        model: nn.Module,
        num_prefix_tokens: int | None = None,
        has_class_token: bool | None = None,
        name: str = "",
        keep_rows: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
    ) -> None:
        if type(model).__module__.startswith("transformers."):
            raise TypeError(f"{type(model).__name__} is a transformers model: record it with "
                            "beyond_cls.HFAttentionRecorder(model)")
        if num_prefix_tokens is None or has_class_token is None or not name:
            info = encoder_info(model)  # TypeError for non-ViT models: then pass all three explicitly
            num_prefix_tokens = info.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
            has_class_token = info.has_class_token if has_class_token is None else has_class_token
            name = name or info.name
        modules = attention_modules(model)
        if not modules:
            kinds = sorted({type(m).__name__ for m in model.modules() if "attn" in type(m).__name__.lower()})
            raise TypeError(
                f"{type(model).__name__} has no attention module the recorder supports "
                f"(found {kinds or 'none'}); supported: {', '.join(supported_attention())}"
            )
        self._setup(model, modules, num_prefix_tokens, has_class_token, name, keep_rows)

    def _setup(self, model: nn.Module, modules: list[tuple[str, nn.Module]], num_prefix_tokens: int,
               has_class_token: bool, name: str, keep_rows) -> None:
        """The state every recorder shares, for ``modules`` (one attention module per block, in forward order)."""
        if has_class_token and num_prefix_tokens < 1:
            raise ValueError("a model with a [cls] token needs num_prefix_tokens >= 1")
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.has_class_token = has_class_token
        self.name = name
        self.modules: list[tuple[str, nn.Module]] = modules
        self._sums: list[Tensor | None] = [None] * len(self.modules)  # per block [F, H] float64, on device
        self._fields: tuple[tuple[str, ...], int] | None = None  # sum_fields when recording began
        self._images = [0] * len(self.modules)
        self._num_tokens: int | None = None
        self._saved: list[object] = []
        self._keep_rows = self._block_keep_rows(keep_rows)
        self.kept_rows = KeptRows(len(self.modules))

    def _block_keep_rows(self, keep_rows) -> dict[int, tuple[int, ...]]:
        """``keep_rows`` as {non-negative block index: query indices}; indices are checked per call."""
        if keep_rows is None:
            return {}
        blocks = len(self.modules)
        if not isinstance(keep_rows, Mapping):
            keep_rows = {blocks - 1: keep_rows}
        out = {}
        for block, rows in keep_rows.items():
            index = operator.index(block)
            if not -blocks <= index < blocks:
                raise ValueError(f"keep_rows: block {block} is outside [-{blocks}, {blocks}) for {blocks} blocks")
            if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
                raise TypeError(f"keep_rows[{block}] must be a sequence of query indices, got {rows!r}")
            out[index % blocks] = tuple(rows)
        return out

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> AttentionRecorder:
        if self._saved:
            raise RuntimeError("AttentionRecorder is already active")
        for index, (_, module) in enumerate(self.modules):
            self._saved.append(swap_forward(module, self._make_forward(index)))
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        """Give every patched module its own forward back (idempotent)."""
        for (_, module), saved in zip(self.modules, self._saved):
            restore_forward(module, saved)
        self._saved = []

    # -- recording ----------------------------------------------------------------------
    def _make_forward(self, index: int):
        recorder = self
        adapter = attention_adapter(self.modules[index][1])

        def forward(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
            drop = getattr(module, "attn_drop", None)
            if module.training and drop is not None and drop.p > 0:
                raise RuntimeError("AttentionRecorder needs eval mode: attention dropout is active")
            proj = adapter.project(module, x, *args, **kwargs)
            out = recorder._attend(index, proj.q, proj.k, proj.v, module.scale, proj.bias)
            return adapter.finish(module, out.to(proj.v.dtype), proj.gate)

        return forward

    def _attend(self, index: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None,
                bias: Tensor | None) -> Tensor:
        """Block ``index``'s fused attention of q, k, v [B, H, N, d]: records its statistics (and kept rows),
        returns ``out`` [B, H, N, d] (stored [B, N, H, d], as SDPA's)."""
        keep = self._keep_rows.get(index)
        result = ops.attention_with_stats(q, k, v, self.num_prefix_tokens, scale, bias, keep)
        out, rows = result[:2]
        self._accumulate(index, rows)
        if keep is not None:
            self.kept_rows[index] = result[2].detach()
        return out

    @torch.no_grad()
    def _accumulate(self, index: int, rows: AttentionRows) -> None:
        _, batch, heads, n = rows.stacked.shape
        if self._fields is None:
            self._fields = sum_fields(self.has_class_token)
        elif sum_fields(self.has_class_token) != self._fields:
            raise RuntimeError(f"the registered attention statistics changed while recording (from "
                               f"{self._fields[0]} to {sum_fields(self.has_class_token)[0]}): call reset() first")
        fields = self._fields[0]
        if self._num_tokens is None:
            if n <= self.num_prefix_tokens:
                raise ValueError(f"sequence of {n} tokens has no patches after {self.num_prefix_tokens} prefix")
            self._num_tokens = n
        elif n != self._num_tokens:
            raise ValueError(f"sequence length changed from {self._num_tokens} to {n} tokens between batches")
        total = self._sums[index]
        if total is None:
            total = rows.stacked.new_zeros((len(fields), heads), dtype=torch.float64)
        add = batch_accumulator(total.device)
        self._sums[index] = add(total, rows.stacked, self.num_prefix_tokens, self.has_class_token)
        self._images[index] += batch

    def reset(self) -> None:
        """Forget everything recorded so far (kept rows included)."""
        self._sums = [None] * len(self.modules)
        self._images = [0] * len(self.modules)
        self._num_tokens = None
        self._fields = None
        self.kept_rows.clear()

    @property
    def num_images(self) -> int:
        return self._images[0]

    def summary(self) -> AttentionSummary:
        """Means over all recorded images; tensors [blocks, heads] float64 on the CPU."""
        missing = [self.modules[i][0] for i, total in enumerate(self._sums) if total is None]
        if missing:
            raise RuntimeError(f"no images recorded for attention modules {missing}; run the model first")
        if len(set(self._images)) != 1:
            raise RuntimeError(f"blocks saw different numbers of images {sorted(set(self._images))}")
        images = self._images[0]
        patches = self._num_tokens - self.num_prefix_tokens
        fields, per_query = self._fields
        counts = torch.tensor([images * patches] * per_query + [images] * (len(fields) - per_query),
                              dtype=torch.float64)
        means = torch.stack(self._sums).cpu() / counts[:, None]  # [blocks, F, H]
        return AttentionSummary(
            {name: means[:, i].contiguous() for i, name in enumerate(fields)},
            num_images=images,
            num_prefix_tokens=self.num_prefix_tokens,
            num_patches=patches,
            model=self.name,
            block_names=[name for name, _ in self.modules],
        )
