"""AttentionRecorder: measure information flow while a timm ViT runs, at the cost of inference.

Inside ``with AttentionRecorder(model) as rec:`` every supported attention module computes its
output with :func:`beyond_cls.ops.attention_with_stats` (fused: no N×N matrix leaves the kernel)
and adds per-head sums of the row statistics to float64 accumulators on the model's device.
The model's outputs are those of its own forward; the original forwards return on exit.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beyond_cls import ops
from beyond_cls.analysis.attention_adapters import adapter_for, finish
from beyond_cls.analysis.summary import AttentionSummary
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


class AttentionRecorder:
    """Context manager that records attention statistics of every block of a timm model.

    Works for timm's VisionTransformer (with or without [cls], with registers), Beit and Eva.
    ``num_prefix_tokens``, ``has_class_token`` and ``name`` default to :func:`encoder_info` of the model.
    """

    def __init__(
        self,
        model: nn.Module,
        num_prefix_tokens: int | None = None,
        has_class_token: bool | None = None,
        name: str = "",
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
        self.modules: list[tuple[str, nn.Module]] = [
            (n, m) for n, m in model.named_modules() if adapter_for(m) is not None
        ]
        if not self.modules:
            kinds = sorted({type(m).__name__ for m in model.modules() if "attn" in type(m).__name__.lower()})
            raise TypeError(
                f"{type(model).__name__} has no attention module the recorder supports "
                f"(found {kinds or 'none'}); supported: timm Attention, AttentionRope, EvaAttention, "
                "Beit Attention"
            )
        self._blocks: list[_BlockSums | None] = [None] * len(self.modules)
        self._num_tokens: int | None = None
        self._saved: list[object] = []

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
        project = adapter_for(self.modules[index][1])

        def forward(module: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
            drop = getattr(module, "attn_drop", None)
            if module.training and drop is not None and drop.p > 0:
                raise RuntimeError("AttentionRecorder needs eval mode: attention dropout is active")
            proj = project(module, x, *args, **kwargs)
            out, rows = ops.attention_with_stats(
                proj.q, proj.k, proj.v, recorder.num_prefix_tokens, module.scale, proj.bias
            )
            recorder._accumulate(index, rows)
            return finish(module, out.to(proj.v.dtype), proj.gate)

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
        """Forget everything recorded so far."""
        self._blocks = [None] * len(self.modules)
        self._num_tokens = None

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
