"""AttentionRecorder: measure information flow while a timm ViT runs, at the cost of inference.

Inside ``with AttentionRecorder(model) as rec:`` every supported attention module computes its
output with :func:`beyond_cls.ops.attention_with_stats` (fused: no N×N matrix leaves the kernel)
and adds per-head sums of the row statistics to float64 accumulators on the model's device.
The model's outputs are those of its own forward; the original forwards return on exit.
With ``keep_rows`` the same fused pass also returns the full attention rows of chosen queries
(e.g. [cls] and the central patch of the last block), kept for the last batch only.
"""

from __future__ import annotations

import operator
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beyond_cls import ops
from beyond_cls.analysis.row_capture import attention_modules
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.models.architectures import attention_adapter, supported_attention
from beyond_cls.models.loader import encoder_info
from beyond_cls.reference import AttentionRows

_NO_FORWARD = object()


@dataclass
class _BlockSums:
    """Per-head running sums over images of one block's statistics (float64, on device)."""

    sums: dict[str, Tensor]
    images: int = 0


def row_sums(rows: AttentionRows, num_prefix_tokens: int, has_cls: bool) -> dict[str, Tensor]:
    """Sums over the batch of each DESIGN.md statistic, per head: name -> [H] float64."""
    p = num_prefix_tokens
    rows = AttentionRows(*(None if t is None else t.double() for t in rows))
    patch_self = rows.self_attn[:, :, p:] / rows.patch_mass[:, :, p:]
    out = {
        "patch_self": patch_self.mean(-1).sum(0),
        "patch_patch_entropy": rows.patch_entropy[:, :, p:].mean(-1).sum(0),
    }
    if has_cls:
        out["cls_self"] = rows.self_attn[:, :, 0].sum(0)
        out["cls_patch_entropy"] = rows.patch_entropy[:, :, 0].sum(0)
        out["cls_patch_mass"] = rows.patch_mass[:, :, 0].sum(0)
        out["patch_cls"] = rows.cls_attn[:, :, p:].mean(-1).sum(0)
    return out


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
        if num_prefix_tokens is None or has_class_token is None or not name:
            info = encoder_info(model)  # TypeError for non-ViT models: then pass all three explicitly
            num_prefix_tokens = info.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
            has_class_token = info.has_class_token if has_class_token is None else has_class_token
            name = name or info.name
        if has_class_token and num_prefix_tokens < 1:
            raise ValueError("a model with a [cls] token needs num_prefix_tokens >= 1")
        self.model = model
        self.num_prefix_tokens = num_prefix_tokens
        self.has_class_token = has_class_token
        self.name = name
        self.modules: list[tuple[str, nn.Module]] = attention_modules(model)
        if not self.modules:
            kinds = sorted({type(m).__name__ for m in model.modules() if "attn" in type(m).__name__.lower()})
            raise TypeError(
                f"{type(model).__name__} has no attention module the recorder supports "
                f"(found {kinds or 'none'}); supported: {', '.join(supported_attention())}"
            )
        self._blocks: list[_BlockSums | None] = [None] * len(self.modules)
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
            self._saved.append(module.__dict__.get("forward", _NO_FORWARD))
            module.forward = types.MethodType(self._make_forward(index), module)
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def restore(self) -> None:
        """Give every patched module its own forward back (idempotent)."""
        for (_, module), saved in zip(self.modules, self._saved):
            if saved is _NO_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
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
            keep = recorder._keep_rows.get(index)
            result = ops.attention_with_stats(
                proj.q, proj.k, proj.v, recorder.num_prefix_tokens, module.scale, proj.bias, keep
            )
            out, rows = result[:2]
            recorder._accumulate(index, rows)
            if keep is not None:
                recorder.kept_rows[index] = result[2].detach()
            return adapter.finish(module, out.to(proj.v.dtype), proj.gate)

        return forward

    @torch.no_grad()
    def _accumulate(self, index: int, rows: AttentionRows) -> None:
        n = rows.self_attn.shape[-1]
        if self._num_tokens is None:
            if n <= self.num_prefix_tokens:
                raise ValueError(f"sequence of {n} tokens has no patches after {self.num_prefix_tokens} prefix")
            self._num_tokens = n
        elif n != self._num_tokens:
            raise ValueError(f"sequence length changed from {self._num_tokens} to {n} tokens between batches")
        sums = row_sums(rows, self.num_prefix_tokens, self.has_class_token)
        block = self._blocks[index]
        if block is None:
            self._blocks[index] = _BlockSums(sums, rows.self_attn.shape[0])
            return
        for key, value in sums.items():
            block.sums[key] += value
        block.images += rows.self_attn.shape[0]

    def reset(self) -> None:
        """Forget everything recorded so far (kept rows included)."""
        self._blocks = [None] * len(self.modules)
        self._num_tokens = None
        self.kept_rows.clear()

    @property
    def num_images(self) -> int:
        return self._blocks[0].images if self._blocks[0] is not None else 0

    def summary(self) -> AttentionSummary:
        """Means over all recorded images; tensors [blocks, heads] float64 on the CPU."""
        if any(b is None for b in self._blocks):
            missing = [self.modules[i][0] for i, b in enumerate(self._blocks) if b is None]
            raise RuntimeError(f"no images recorded for attention modules {missing}; run the model first")
        counts = {b.images for b in self._blocks}
        if len(counts) != 1:
            raise RuntimeError(f"blocks saw different numbers of images {sorted(counts)}")
        images = counts.pop()
        means = {
            key: torch.stack([b.sums[key] for b in self._blocks]).cpu() / images
            for key in self._blocks[0].sums
        }
        return AttentionSummary(
            **means,
            num_images=images,
            num_prefix_tokens=self.num_prefix_tokens,
            num_patches=self._num_tokens - self.num_prefix_tokens,
            model=self.name,
            block_names=[name for name, _ in self.modules],
        )
