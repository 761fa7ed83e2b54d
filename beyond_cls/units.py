"""One unit per metric, and one way to print a learning rate.

Accuracies (top-1, top-5, mAP) and MaxBoxAccV2 are percentages in every JSON file and console line; entropies and
KL divergences are in nats; attention masses are fractions of 1. JSON files written by this package carry a
``units`` mapping (:data:`UNITS` restricted to their keys); files without one are read by :func:`as_percent` with
the unit their version used. The attention statistics' units are not listed here: :mod:`beyond_cls.statistics`
registers each one's unit with its statistic (:func:`register_unit`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "LR_TOLERANCE", "UNITS", "as_percent", "format_lr", "format_lrs", "register_unit", "unregister_unit", "units_of",
]

#: metric key -> unit, for the ``units`` block of the JSON files.
UNITS: dict[str, str] = {
    "top1": "%", "top1_best": "%", "top1_std": "%", "top1_best_std": "%", "top5": "%", "top5_std": "%",
    "mAP": "%", "mAP_best": "%", "mAP_std": "%", "mAP_best_std": "%",
    "maxboxacc_v2": "%", "maxboxacc": "%",
    "entropy": "nats", "entropy_std": "nats", "max_entropy": "nats", "kl": "nats",
    "best_threshold": "fraction of the map's maximum",
}
_REGISTERED: set[str] = set()  # keys added by register_unit

#: relative error a printed learning rate may carry: float32 noise (1e-7) is dropped, nothing a schedule sets is.
LR_TOLERANCE = 1e-6


def register_unit(key: str, unit: str) -> None:
    """Add ``key``'s unit to :data:`UNITS` (ValueError if ``key`` already has one)."""
    if key in UNITS:
        raise ValueError(f"metric {key!r} already has a unit ({UNITS[key]!r})")
    UNITS[key] = unit
    _REGISTERED.add(key)


def unregister_unit(key: str) -> None:
    """Remove a unit added by :func:`register_unit` (KeyError for any other key)."""
    if key not in _REGISTERED:
        raise KeyError(f"metric {key!r} has no registered unit")
    _REGISTERED.discard(key)
    del UNITS[key]


def units_of(keys: Iterable[str]) -> dict[str, str]:
    """The :data:`UNITS` entries of ``keys`` (for a JSON file's ``units`` block)."""
    return {k: UNITS[k] for k in keys if k in UNITS}


def as_percent(value: float, units: dict[str, str] | None, key: str, legacy: str) -> float:
    """``value`` of metric ``key`` in %: a file's ``units`` block says its unit; a file without one (written
    before units were recorded) used ``legacy`` ("%" or "fraction")."""
    unit = (units or {}).get(key, legacy)
    if unit == "%":
        return float(value)
    if unit == "fraction":
        return 100.0 * float(value)
    raise ValueError(f"{key}: unknown unit {unit!r} (expected % or fraction)")


def _tidy(text: str) -> str:
    """``1e-05`` -> ``1e-5``, ``2.5e+06`` -> ``2.5e6``."""
    mantissa, e, exponent = text.partition("e")
    if not e:
        return text
    sign = "-" if exponent.startswith("-") else ""
    return f"{mantissa}e{sign}{exponent.lstrip('+-').lstrip('0') or '0'}"


def _digits(value: float) -> int:
    """The fewest significant digits that print ``value`` within :data:`LR_TOLERANCE` (relative)."""
    for d in range(1, 18):
        if math.isclose(float(f"{value:.{d}g}"), value, rel_tol=LR_TOLERANCE, abs_tol=0.0):
            return d
    return 17


def format_lr(value: Any) -> str:
    """A learning rate in the fewest significant digits that keep it within 1e-6 (relative): ``0.001`` for 1e-3
    and for float32's 0.0010000000474, ``0.0015625``, ``1e-5``, ``6.4``. Non-finite values as ``nan``/``inf``."""
    return format_lrs([value])[0]


def format_lrs(values: Sequence[Any]) -> list[str]:
    """:func:`format_lr` of each value, with more digits where two different values would print alike (so every
    distinct learning rate of a bank prints distinctly, and equal ones alike)."""
    floats = [float(v) for v in values]
    digits = [_digits(v) if math.isfinite(v) and v != 0 else 1 for v in floats]
    while True:  # ends: at 17 significant digits different doubles print differently
        texts = [_tidy(f"{v:.{d}g}") if math.isfinite(v) else str(v) for v, d in zip(floats, digits)]
        meant: dict[str, set[str]] = {}
        for v, t in zip(floats, texts):
            meant.setdefault(t, set()).add(repr(v))
        clash = [len(meant[t]) > 1 and d < 17 for t, d in zip(texts, digits)]
        if not any(clash):
            return texts
        digits = [d + c for d, c in zip(digits, clash)]
