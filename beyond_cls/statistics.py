"""The attention statistics, each described once: what the kernels write per query, and what is reported.

Two tables drive every consumer:

* :data:`ROW_STATISTICS`: the per-query values the fused kernels compute in one pass ([B, H, N] each, stacked
  in this order in the op's output). A new in-kernel statistic touches the kernels, :mod:`beyond_cls.reference`
  and this table.
* the registry of :class:`Statistic`: the per-block, per-head means over images that ``analyze`` reports. Each is
  a mean over a set of queries (the [cls] row or the patch rows) of a value computed from the row statistics, so
  a statistic derived from existing rows is one :func:`register` call: the recorders sum it, the summary JSON, the
  printed table, the CSVs, every figure and the docs' table (:func:`statistics_table_markdown`) read it from here.

Notation (tokens 0..P-1 are prefix tokens, [cls] first; J the patch tokens, |J| their number, N = P + |J|):
aᵢⱼ is the softmax attention of query i to key j, mᵢ = Σⱼ∈J aᵢⱼ the attention mass query i gives the
patches, Hᵢ the entropy (nats) of query i's attention renormalized over the patches, aᵢⱼ / mᵢ for j in J
(0·log 0 = 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from beyond_cls import units
from beyond_cls.numerics import max_entropy

__all__ = [
    "QUERIES",
    "ROW_STATISTICS",
    "UNIT_AXES",
    "RowStatistic",
    "Statistic",
    "find",
    "panels",
    "present_rows",
    "register",
    "row_index",
    "statistics",
    "statistics_table_markdown",
    "unregister",
]


@dataclass(frozen=True)
class RowStatistic:
    """One value per query row that the fused kernels write: ``name`` (the op's field), ``symbol`` and
    ``definition`` in the notation above; ``needs_prefix``: absent (None) without prefix tokens."""

    name: str
    symbol: str
    definition: str
    needs_prefix: bool = False


#: The kernels' per-query outputs, in the order of the op's stacked statistics tensor [S, B, H, N].
ROW_STATISTICS: tuple[RowStatistic, ...] = (
    RowStatistic("self_attn", "aᵢᵢ", "attention of query i to itself"),
    RowStatistic("cls_attn", "aᵢ₀", "attention of query i to token 0 ([cls])", needs_prefix=True),
    RowStatistic("patch_mass", "mᵢ", "attention mass of query i on the patches, Σⱼ∈J aᵢⱼ"),
    RowStatistic("patch_entropy", "Hᵢ", "entropy of query i's attention renormalized over the patches (nats)"),
)


def row_index(name: str) -> int:
    """Position of row statistic ``name`` in :data:`ROW_STATISTICS` (KeyError naming the known ones)."""
    for index, row in enumerate(ROW_STATISTICS):
        if row.name == name:
            return index
    raise KeyError(f"no row statistic {name!r}; known: {', '.join(r.name for r in ROW_STATISTICS)}")


def present_rows(has_prefix: bool) -> tuple[RowStatistic, ...]:
    """The row statistics that exist for a sequence with (or without) prefix tokens, in stacked order."""
    return tuple(row for row in ROW_STATISTICS if has_prefix or not row.needs_prefix)


#: Which query rows a statistic averages: the [cls] row (token 0) or every patch row.
QUERIES = ("cls", "patches")
#: y-axis wording of each unit.
UNIT_AXES = {"fraction of 1": "fraction, 0–1", "nats": "nats"}


@dataclass(frozen=True)
class Statistic:
    """One reported statistic: the per-block, per-head mean over images (and over ``queries``) of ``value``.

    ``name``: its key in the summary JSON, CSVs and Python (``summary.<name>``). ``header``: a short column
    header. ``title``: the figure panel's title. ``definition``: the formula, in the module's notation.
    ``paper``: the figure/table of the paper that reports it ("" if none). ``axis``: the quantity on a figure's
    y-axis (the unit is appended). ``unit``: a key of :data:`UNIT_AXES`. ``queries``: ``"cls"`` (row 0 only) or
    ``"patches"`` (the mean over the patch rows). ``value(rows)``: the per-query value [B, H, Q] from the row
    statistics of those queries (``rows[name]`` [B, H, Q] for each :data:`ROW_STATISTICS` name present).
    ``needs_cls``: absent for encoders without a [cls] token. ``uniform(num_patches, num_prefix_tokens)``: its
    value under uniform attention over all N tokens, with ``uniform_text`` its formula (e.g. ``"1/N"``).
    ``panel``: drawn as one of the information-flow panels (``analyze`` and ``compare`` figures).
    """

    name: str
    header: str
    title: str
    definition: str
    paper: str
    axis: str
    unit: str
    queries: str
    value: Callable[[Mapping[str, Tensor]], Tensor]
    needs_cls: bool
    uniform: Callable[[int, int], float]
    uniform_text: str
    panel: bool = False

    def __post_init__(self) -> None:
        if self.queries not in QUERIES:
            raise ValueError(f"statistic {self.name!r}: queries must be one of {QUERIES}, got {self.queries!r}")
        if self.unit not in UNIT_AXES:
            raise ValueError(f"statistic {self.name!r}: unit must be one of {list(UNIT_AXES)}, got {self.unit!r}")
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"statistic name {self.name!r} must be a Python identifier (summary.<name>)")
        if self.queries == "cls" and not self.needs_cls:
            raise ValueError(f"statistic {self.name!r} reads the [cls] row, so it needs a [cls] token")

    @property
    def ylabel(self) -> str:
        """The figure's y-axis label, with the unit."""
        return f"{self.axis} ({UNIT_AXES[self.unit]})"

    def uniform_reference(self, num_patches: int, num_prefix_tokens: int) -> tuple[float, str] | None:
        """(value, legend text) of uniform attention for this many patches and prefix tokens, or None."""
        if num_patches <= 0:
            return None
        value = float(self.uniform(num_patches, num_prefix_tokens))
        tokens = f"N = {num_patches + num_prefix_tokens}, |J| = {num_patches}"
        digits = ".2f" if self.unit == "nats" else ".4f"
        return value, f"uniform: {self.uniform_text} = {value:{digits}} ({tokens})"


_REGISTRY: dict[str, Statistic] = {}


def register(statistic: Statistic) -> Statistic:
    """Add ``statistic`` to the registry, after those registered before it (ValueError on a taken name);
    its unit joins :data:`beyond_cls.units.UNITS`."""
    if statistic.name in _REGISTRY:
        raise ValueError(f"attention statistic {statistic.name!r} is already registered")
    units.register_unit(statistic.name, statistic.unit)
    _REGISTRY[statistic.name] = statistic
    return statistic


def unregister(name: str) -> None:
    """Remove statistic ``name`` (KeyError naming the known ones when absent)."""
    if name not in _REGISTRY:
        raise KeyError(f"no attention statistic {name!r}; known: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]
    units.unregister_unit(name)


def statistics(has_cls: bool = True) -> tuple[Statistic, ...]:
    """The registered statistics in table order; without a [cls] token only those that do not need it."""
    return tuple(s for s in _REGISTRY.values() if has_cls or not s.needs_cls)


def panels(has_cls: bool = True) -> tuple[Statistic, ...]:
    """The statistics drawn as information-flow panels, in table order."""
    return tuple(s for s in statistics(has_cls) if s.panel)


def find(name: str) -> Statistic:
    """The registered statistic ``name`` (KeyError naming the known ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no attention statistic {name!r}; known: {', '.join(_REGISTRY)}") from None


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: ``|`` escaped, line breaks folded."""
    return " ".join(text.split()).replace("|", "\\|")


def statistics_table_markdown() -> str:
    """The Markdown table of the registered statistics (the docs' table is this, checked by a test)."""
    lines = [
        "| statistic | definition | averaged over | unit | uniform attention | needs [cls] | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in statistics():
        over = "images" if s.queries == "cls" else "images and patch queries i ∈ J"
        cells = (f"`{s.name}`", s.definition, over, s.unit, s.uniform_text, "yes" if s.needs_cls else "no",
                 s.paper or "–")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cls_tokens(num_patches: int, num_prefix_tokens: int) -> int:
    return num_patches + num_prefix_tokens


register(Statistic(
    name="cls_self", header="cls-self", title="[cls]-[cls] attention", definition="a₀₀",
    paper="Fig. 3 / 10", axis="attention weight a₀₀", unit="fraction of 1", queries="cls",
    value=lambda rows: rows["self_attn"], needs_cls=True,
    uniform=lambda patches, prefix: 1.0 / _cls_tokens(patches, prefix), uniform_text="1/N", panel=True,
))
register(Statistic(
    name="cls_patch_entropy", header="cls-patch H", title="[cls]-patch entropy", definition="H₀",
    paper="Fig. 4 / 11, Table 3", axis="entropy", unit="nats", queries="cls",
    value=lambda rows: rows["patch_entropy"], needs_cls=True,
    uniform=lambda patches, prefix: max_entropy(patches), uniform_text="log |J|", panel=True,
))
register(Statistic(
    name="patch_self", header="patch-self", title="patch self-attention (of patch mass)",
    definition="aᵢᵢ / mᵢ", paper="Fig. 5 / 12", axis="share of patch attention", unit="fraction of 1",
    queries="patches", value=lambda rows: rows["self_attn"] / rows["patch_mass"], needs_cls=False,
    uniform=lambda patches, prefix: 1.0 / patches, uniform_text="1/|J|", panel=True,
))
register(Statistic(
    name="patch_patch_entropy", header="patch-patch H", title="patch-patch entropy", definition="Hᵢ",
    paper="Fig. 6 / 13", axis="entropy", unit="nats", queries="patches",
    value=lambda rows: rows["patch_entropy"], needs_cls=False,
    uniform=lambda patches, prefix: max_entropy(patches), uniform_text="log |J|", panel=True,
))
register(Statistic(
    name="patch_cls", header="patch-cls", title="patch-[cls] attention", definition="aᵢ₀",
    paper="", axis="attention weight aᵢ₀", unit="fraction of 1", queries="patches",
    value=lambda rows: rows["cls_attn"], needs_cls=True,
    uniform=lambda patches, prefix: 1.0 / _cls_tokens(patches, prefix), uniform_text="1/N",
))
register(Statistic(
    name="cls_patch_mass", header="cls-patch mass", title="[cls]-patch attention mass", definition="m₀",
    paper="", axis="attention mass on the patches", unit="fraction of 1", queries="cls",
    value=lambda rows: rows["patch_mass"], needs_cls=True,
    uniform=lambda patches, prefix: patches / _cls_tokens(patches, prefix), uniform_text="|J|/N",
))
