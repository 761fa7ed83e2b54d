"""One look for every figure: family -> colour, model -> line style, names shortened, plain tick labels.

``analyze``, ``compare`` and ``probe-report`` draw with these, so a model keeps its colour and line style
from one figure to the next. The family comes from the zoo (or a name the paper's methods start with),
never from a folder name.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from beyond_cls.models.zoo import ZOO, ZooEntry, zoo_entry

__all__ = ["BAND_LABEL", "FAMILIES", "FAMILY_COLORS", "data_label", "infer_family", "model_styles", "plain_ticks",
           "short_name"]

#: Colour of each family; any other family is drawn in ``OTHER_COLOR``.
FAMILY_COLORS = {"MIM": "#1f77b4", "JEA": "#d95f02"}
OTHER_COLOR = "#6a3d9a"
#: (line style, marker) per model within a family, in zoo order.
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P"),
               ((0, (3, 1, 1, 1, 1, 1)), "X"), ((0, (8, 2)), "*"))
#: What the shaded band around each line is.
BAND_LABEL = "band: min–max over heads (line: mean)"
REFERENCE_COLOR = "0.3"
REFERENCE_STYLE = (0, (2, 2))


def _method_prefix(method: str) -> str:
    """``"BEiT-v2"`` -> ``"beit"``: lower-case letters and digits, without a version suffix."""
    return re.sub(r"v\d+$", "", re.sub(r"[^a-z0-9]", "", method.lower()))


#: Method-name prefixes of the paper's encoders by family, from the zoo (``mae``, ``beit``, ``moco``, ...).
FAMILIES: Mapping[str, tuple[str, ...]] = {
    family: tuple(dict.fromkeys(_method_prefix(e.method) for e in ZOO.values() if e.family == family))
    for family in dict.fromkeys(e.family for e in ZOO.values())
}


def zoo_of(name: str) -> ZooEntry | None:
    """The zoo entry of a model name; ``analyze`` labels repeated models ``name@<checkpoint stem>``."""
    return zoo_entry(name) or zoo_entry(name.split("@", 1)[0])


def infer_family(name: str) -> str:
    """The family, MIM or JEA, of the paper's method named in ``name`` (zoo, timm or display name), else other."""
    entry = zoo_of(name)
    if entry is not None:
        return entry.family
    for token in re.split(r"[\s_./:,@]+", name.lower()):
        token = re.sub(r"[^a-z0-9]", "", token)  # I-JEPA -> ijepa, MoCo-v3 -> mocov3
        for family, methods in FAMILIES.items():
            if token.startswith(methods):
                return family
    return "other"


def _preferred(model: str, family: str) -> int:
    """A model's own line style: its place among its family in the zoo, else a stable hash of its name."""
    entry = zoo_of(model)
    if entry is not None:
        members = [e.name for e in ZOO.values() if e.family == family]
        if entry.name in members:
            return members.index(entry.name)
    return zlib.crc32(model.split("@", 1)[0].encode())


def model_styles(models: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """label -> ``{"color", "linestyle", "marker"}`` for ``{label: (model name, family)}``.

    The colour is the family's; the line style and marker are the model's own (zoo order), moved on to the next
    free one only when two models of one family in the same figure would look alike.
    """
    taken: dict[str, set[int]] = {}
    out = {}
    for label, (model, family) in models.items():
        used = taken.setdefault(family, set())
        index = _preferred(model or label, family) % len(LINE_STYLES)
        for step in range(len(LINE_STYLES)):
            if (index + step) % len(LINE_STYLES) not in used or len(used) >= len(LINE_STYLES):
                index = (index + step) % len(LINE_STYLES)
                break
        used.add(index)
        linestyle, marker = LINE_STYLES[index]
        out[label] = {"color": FAMILY_COLORS.get(family, OTHER_COLOR), "linestyle": linestyle, "marker": marker}
    return out


def plain_ticks(ax) -> None:
    """Tick labels as plain numbers: no ``+2.77`` offset and no ``1e-3`` multiplier above the axis."""
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if hasattr(formatter, "set_useOffset"):
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def short_name(name: str, width: int = 28) -> str:
    """``name`` in at most ``width`` characters: the method type before ``:`` and the right end (the head) kept,
    an ellipsis in the middle (``abmilp:…/run#abmilp@blr0p1``)."""
    if len(name) <= width:
        return name
    kind, sep, rest = name.partition(":")
    head = kind + sep if sep and len(kind) + 1 <= width // 2 else ""
    keep = max(1, width - len(head) - 1)
    return f"{head}…{(rest if head else name)[-keep:]}"


def data_label(config: Mapping[str, Any] | None) -> str | None:
    """``"<data folder name> (<dataset>), split <split>"`` from a run's resolved config, or None."""
    if not isinstance(config, Mapping) or not isinstance(config.get("data"), str) or not config["data"]:
        return None
    name = Path(config["data"].rstrip("/\\")).name or config["data"]
    dataset = config.get("dataset")
    kind = f" ({dataset})" if isinstance(dataset, str) and dataset and dataset.lower() != "imagefolder" else ""
    split = config.get("split")
    return f"{name}{kind}, split {split}" if isinstance(split, str) and split else f"{name}{kind}"
