"""AttentionSummary: the per-block, per-head information-flow statistics of one encoder.

Its fields are the statistics registered in :mod:`beyond_cls.statistics`, read at call time: a statistic
registered there is stored, saved, loaded, printed and checked here without a change to this module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from beyond_cls import statistics
from beyond_cls.fileio import write_atomic
from beyond_cls.numerics import max_entropy
from beyond_cls.units import units_of

FORMAT_VERSION = 1


def __getattr__(name: str):
    # FIELDS / FIELD_NAMES: the registry's (field, column header, needs a [cls] token) rows and names, read when asked
    if name == "FIELDS":
        return tuple((s.name, s.header, s.needs_cls) for s in statistics.statistics())
    if name == "FIELD_NAMES":
        return tuple(s.name for s in statistics.statistics())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_ATTRIBUTES = ("num_images", "num_prefix_tokens", "num_patches", "model", "block_names")


class AttentionSummary:
    """Means over images of the registered statistics (:mod:`beyond_cls.statistics`), each a float64 tensor
    [blocks, heads], by name: ``summary.patch_self``, ``summary.fields()``.

    ``values`` (or keyword arguments) maps statistic names to tensors; a statistic that needs [cls] is None for
    encoders without one (I-JEPA, CAPI), and so is one a file predates. ``num_patches`` is |J|, so
    ``max_entropy`` = log |J| bounds both entropy fields.
    """

    def __init__(
        self,
        values: Mapping[str, Tensor | None] | None = None,
        *,
        num_images: int = 0,
        num_prefix_tokens: int = 1,
        num_patches: int = 0,
        model: str = "",
        block_names: Sequence[str] = (),
        **named: Tensor | None,
    ) -> None:
        given = {**(values or {}), **named}
        known = {s.name for s in statistics.statistics()}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"AttentionSummary: no registered attention statistic {unknown}; known: "
                            f"{', '.join(sorted(known))}")
        shadowed = sorted(n for n in given if n in _ATTRIBUTES or hasattr(AttentionSummary, n))
        if shadowed:
            raise ValueError(f"AttentionSummary: statistics {shadowed} are named like its attributes; rename them")
        self._values = {name: t for name, t in given.items() if t is not None}
        if not self._values:
            raise ValueError("AttentionSummary needs at least one statistic")
        self.num_images = num_images
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = num_patches
        self.model = model
        self.block_names = list(block_names)

    def __getattr__(self, name: str) -> Tensor | None:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            statistics.find(name)
        except KeyError:
            raise AttributeError(f"AttentionSummary has no attribute or statistic {name!r}") from None
        return self._values.get(name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_") or name in _ATTRIBUTES:
            object.__setattr__(self, name, value)
        elif name in {s.name for s in statistics.statistics()}:  # a statistic: replaced (None: absent)
            self._values.pop(name, None)
            if value is not None:
                self._values[name] = value
        else:
            raise AttributeError(f"AttentionSummary has no attribute or statistic {name!r} to set")

    def __repr__(self) -> str:
        return (f"AttentionSummary(model={self.model!r}, {self.num_blocks} blocks x {self.num_heads} heads, "
                f"{self.num_images} images, fields={list(self.fields())})")

    @property
    def _first(self) -> Tensor:
        return next(iter(self._values.values()))

    @property
    def num_blocks(self) -> int:
        return self._first.shape[0]

    @property
    def num_heads(self) -> int:
        return self._first.shape[1]

    @property
    def has_cls(self) -> bool:
        return self._values.get("cls_self") is not None

    @property
    def max_entropy(self) -> float:
        """Entropy of uniform attention over the patches, log |J|."""
        return max_entropy(self.num_patches) if self.num_patches > 0 else float("nan")

    def fields(self) -> dict[str, Tensor]:
        """The statistics present for this encoder, by name, in table order."""
        return {s.name: self._values[s.name] for s in statistics.statistics() if s.name in self._values}

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
        for name, t in self.fields().items():
            bad = ~torch.isfinite(t)
            if allow_absent and statistics.find(name).needs_cls and bool(torch.isnan(t).all()):
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
        """The JSON form: every registered statistic under ``fields`` (null when absent), ``per_block`` means and
        ``units`` from the table."""
        names = [s.name for s in statistics.statistics()]
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
            "fields": {n: (None if n not in self._values else self._values[n].tolist()) for n in names},
            "per_block": {n: t.tolist() for n, t in self.per_block().items()},
            # read by nothing: older files without it load alike
            "units": {**units_of(("max_entropy",)), **{s.name: s.unit for s in statistics.statistics()}},
        }

    @classmethod
    def from_dict(cls, data: dict) -> AttentionSummary:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"attention summary format_version {version!r} is not {FORMAT_VERSION}")
        known = {s.name for s in statistics.statistics()}  # a statistic the file predates stays None
        tensors = {
            n: (None if v is None else torch.tensor(v, dtype=torch.float64))
            for n, v in data["fields"].items()
            if n in known
        }
        return cls(
            tensors,
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
        present = [s for s in statistics.statistics() if s.name in self._values]
        cols = [(s.name, s.header) for s in present]
        by_unit: dict[str, list[str]] = {}
        for s in present:
            by_unit.setdefault(s.unit, []).append(s.header)
        units = "; ".join(f"{', '.join(headers)} in {unit}" for unit, headers in by_unit.items())
        per_block = self.per_block()
        widths = [max(len(h), 8) for _, h in cols]
        head = f"{'block':>5}  " + "  ".join(f"{h:>{w}}" for (_, h), w in zip(cols, widths))
        lines = [
            f"{self.model or 'encoder'}: {self.num_images} images, {self.num_blocks} blocks x "
            f"{self.num_heads} heads, {self.num_patches} patches (max entropy {self.max_entropy:.3f} nats), "
            f"means over heads; {units}",
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
