"""AttentionSummary: the per-block, per-head information-flow statistics of one encoder."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from beyond_cls.fileio import write_atomic
from beyond_cls.numerics import max_entropy
from beyond_cls.units import units_of

# (field, column header, needs a [cls] token); order of the table and the JSON file.
FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("cls_self", "cls-self", True),
    ("cls_patch_entropy", "cls-patch H", True),
    ("patch_self", "patch-self", False),
    ("patch_patch_entropy", "patch-patch H", False),
    ("patch_cls", "patch-cls", True),
    ("cls_patch_mass", "cls-patch mass", True),
)
FIELD_NAMES = tuple(name for name, _, _ in FIELDS)
FORMAT_VERSION = 1


@dataclass
class AttentionSummary:
    """Means over images of the DESIGN.md statistics, each a float64 tensor [blocks, heads].

    ``cls_*`` and ``patch_cls`` are None for encoders without a [cls] token (I-JEPA, CAPI).
    ``num_patches`` is |J|, so ``max_entropy`` = log |J| bounds both entropy fields.
    """

    patch_self: Tensor
    patch_patch_entropy: Tensor
    cls_self: Tensor | None = None
    cls_patch_entropy: Tensor | None = None
    patch_cls: Tensor | None = None
    cls_patch_mass: Tensor | None = None
    num_images: int = 0
    num_prefix_tokens: int = 1
    num_patches: int = 0
    model: str = ""
    block_names: list[str] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return self.patch_self.shape[0]

    @property
    def num_heads(self) -> int:
        return self.patch_self.shape[1]

    @property
    def has_cls(self) -> bool:
        return self.cls_self is not None

    @property
    def max_entropy(self) -> float:
        """Entropy of uniform attention over the patches, log |J|."""
        return max_entropy(self.num_patches) if self.num_patches > 0 else float("nan")

    def fields(self) -> dict[str, Tensor]:
        """The statistics present for this encoder, by name, in table order."""
        return {n: getattr(self, n) for n in FIELD_NAMES if getattr(self, n) is not None}

    def per_block(self) -> dict[str, Tensor]:
        """Each statistic averaged over heads: [blocks] tensors (the paper's Figs. 3–6)."""
        return {n: t.mean(dim=1) for n, t in self.fields().items()}

    def overall(self) -> dict[str, float]:
        """Each statistic averaged over blocks and heads (e.g. Table 3's mean entropy)."""
        return {n: float(t.mean()) for n, t in self.fields().items()}

    def non_finite(self, allow_absent: bool = False) -> str:
        """Where the statistics hold NaN/Inf (field, block, head and count), or "".

        ``allow_absent``: a [cls] field that is NaN everywhere means "no [cls]" (a convention of files from
        other tools; this package writes null) and is not reported.
        """
        needs_cls = {name for name, _, cls in FIELDS if cls}
        for name, t in self.fields().items():
            bad = ~torch.isfinite(t)
            if allow_absent and name in needs_cls and bool(torch.isnan(t).all()):
                continue
            if bool(bad.any()):
                block, head = (int(i) for i in bad.nonzero()[0])
                where = f" ({self.block_names[block]})" if block < len(self.block_names) else ""
                return (f"{name} at block {block}{where}, head {head} is {float(t[block, head])}; "
                        f"{int(bad.sum())} non-finite value(s) in {name}")
        return ""

    def check_finite(self, what: str, allow_absent: bool = False) -> None:
        """ValueError naming the first non-finite statistic (field, block, head) of ``what``."""
        problem = self.non_finite(allow_absent)
        if problem:
            raise ValueError(f"{what}: non-finite attention statistics: {problem}")

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "num_images": self.num_images,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_patches": self.num_patches,
            "num_blocks": self.num_blocks,
            "num_heads": self.num_heads,
            "block_names": list(self.block_names),
            "max_entropy": self.max_entropy,
            "fields": {n: (None if t is None else t.tolist()) for n in FIELD_NAMES for t in [getattr(self, n)]},
            "per_block": {n: t.tolist() for n, t in self.per_block().items()},
            "units": units_of(("max_entropy", *FIELD_NAMES)),  # read by nothing: older files without it load alike
        }

    @classmethod
    def from_dict(cls, data: dict) -> AttentionSummary:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"attention summary format_version {version!r} is not {FORMAT_VERSION}")
        tensors = {
            n: (None if v is None else torch.tensor(v, dtype=torch.float64))
            for n, v in data["fields"].items()
            if n in FIELD_NAMES
        }
        return cls(
            **tensors,
            num_images=int(data["num_images"]),
            num_prefix_tokens=int(data["num_prefix_tokens"]),
            num_patches=int(data["num_patches"]),
            model=data.get("model", ""),
            block_names=list(data.get("block_names", [])),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (temp file + rename), so a killed run never leaves half a file.

        A summary with NaN/Inf values is refused (ValueError naming field, block and head): nothing is written.
        """
        path = Path(path)
        self.check_finite(f"attention summary of {self.model or 'the encoder'} not saved to {path}")
        return write_atomic(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionSummary:
        """Read a saved summary; ValueError naming the file when it is malformed or holds NaN/Inf."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"attention summary {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"attention summary {path} is not valid JSON: {exc}") from None
        try:
            summary = cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"attention summary {path} is malformed: {exc}") from None
        summary.check_finite(f"attention summary {path}", allow_absent=True)  # e.g. from a version without the guard
        return summary

    def __str__(self) -> str:
        cols = [(n, h) for n, h, _ in FIELDS if getattr(self, n) is not None]
        per_block = self.per_block()
        widths = [max(len(h), 8) for _, h in cols]
        head = f"{'block':>5}  " + "  ".join(f"{h:>{w}}" for (_, h), w in zip(cols, widths))
        lines = [
            f"{self.model or 'encoder'}: {self.num_images} images, {self.num_blocks} blocks x "
            f"{self.num_heads} heads, {self.num_patches} patches (max entropy {self.max_entropy:.3f} nats), "
            "means over heads; entropies (H) in nats, the others attention fractions of 1",
            head,
            "-" * len(head),
        ]
        for b in range(self.num_blocks):
            vals = "  ".join(f"{per_block[n][b].item():>{w}.4f}" for (n, _), w in zip(cols, widths))
            lines.append(f"{b:>5}  {vals}")
        overall = self.overall()
        lines.append("-" * len(head))
        lines.append(f"{'mean':>5}  " + "  ".join(f"{overall[n]:>{w}.4f}" for (n, _), w in zip(cols, widths)))
        return "\n".join(lines)
