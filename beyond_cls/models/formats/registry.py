"""The checkpoint-format registry: :class:`CheckpointFormat`, :data:`CHECKPOINT_FORMATS`, lookup and detection.

It imports no format: each format module in this package registers itself with
:func:`register_checkpoint_format` when ``beyond_cls.models.formats`` imports it. Only the fallback
``"timm"`` (a timm state dict, used as is) is defined here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from beyond_cls.models.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "CheckpointFormat",
    "Extractor",
    "PosEmbedResampler",
    "detect_checkpoint_formats",
    "register_checkpoint_format",
    "resolve_checkpoint_format",
]

#: Classifier keys, dropped unless ``keep_head=True`` because encoders are built with ``num_classes=0``.
CLASSIFIER_KEYS = ("head.*", "head_dist.*")

#: ``extract(obj, key, source, path) -> state dict`` (see :attr:`CheckpointFormat.extract`).
Extractor = Callable[[Any, "str | None", "str | None", "str | Path | None"], dict[str, Tensor]]
#: ``resample(pos_embed, new_grid, old_grid, num_prefix_rows) -> pos_embed``.
PosEmbedResampler = Callable[[Tensor, tuple[int, int], tuple[int, int], int], Tensor]


def _no_model_kwargs(sd: dict[str, Tensor]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class CheckpointFormat:
    """How one family of checkpoint files maps onto a model's state dict.

    Steps, in order: pick the weights (``extract(obj, key, source, path)`` when set, else ``key`` if
    the file has it, else the automatic choice of :func:`~beyond_cls.models.formats.common.extract_state_dict`;
    ``module.`` is stripped), keep only keys under ``keep_prefix`` (stripped), apply prefix ``rename``
    pairs in order, drop keys matching ``drop`` (fnmatch patterns) and, unless ``keep_head``,
    :data:`CLASSIFIER_KEYS`, then ``convert`` for anything else. Every key left must then match the
    model exactly (the loader is strict).

    Hooks for the model side:

    - ``sources``: names of the sub-models a full training checkpoint holds (e.g. I-JEPA's
      ``("target_encoder", "encoder")``); the first is the default, ``source=`` picks another.
    - ``model_kwargs(sd) -> dict``: the model-building arguments the converted state dict needs
      (e.g. ``global_pool='avg', fc_norm=True`` for an MAE model fine-tuned with global pooling,
      ``class_token=False`` for I-JEPA); ``{}`` when the architecture's defaults fit.
    - ``resample_pos_embed(pos, new_grid, old_grid, num_prefix_rows)``: how the source model
      interpolates its absolute position embedding at another resolution (DINOv2 differs from timm);
      ``None`` uses timm's bicubic, antialiased, size-based resampling.

    ``detect(obj)`` lets ``checkpoint_format="auto"`` recognise the raw loaded object; a detector
    should only claim layouts it is sure of. Among the detectors that match, the highest ``priority``
    wins; equal priorities are ambiguous and raise. ``"timm"`` is the fallback when none matches.
    """

    name: str
    description: str
    key: str | None = None
    keep_prefix: str | None = None
    rename: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None
    detect: Callable[[Any], bool] | None = None
    priority: int = 0
    sources: tuple[str, ...] = ()
    extract: Extractor | None = None
    model_kwargs: Callable[[dict[str, Tensor]], dict[str, Any]] = field(default=_no_model_kwargs)
    resample_pos_embed: PosEmbedResampler | None = None

    def apply(
        self, sd: dict[str, Tensor], path: str | Path | None = None, *, keep_head: bool = False
    ) -> dict[str, Tensor]:
        """Turn an extracted state dict into the model's layout (a new dict)."""
        if self.keep_prefix:
            sd = {k[len(self.keep_prefix) :]: v for k, v in sd.items() if k.startswith(self.keep_prefix)}
            if not sd:
                raise CheckpointError(path, f"format {self.name!r}: no key starts with {self.keep_prefix!r}")
        for old, new in self.rename:
            sd = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}
        patterns = self.drop + (() if keep_head else CLASSIFIER_KEYS)
        sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        return self.convert(sd) if self.convert is not None else sd


#: Registered layouts by name; add an encoder family with :func:`register_checkpoint_format`. Kept across
#: importlib.reload of this module: the format modules that filled it do not run again.
CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = globals().get("CHECKPOINT_FORMATS", {})


def _identity(fmt: CheckpointFormat) -> tuple:
    """What stays the same when a format's module is reloaded: name, description, hooks (by module and name)."""
    hooks = (fmt.detect, fmt.convert, fmt.extract, fmt.model_kwargs, fmt.resample_pos_embed)
    return fmt.name, fmt.description, [(getattr(h, "__module__", ""), getattr(h, "__qualname__", "")) for h in hooks]


def register_checkpoint_format(fmt: CheckpointFormat, *, overwrite: bool = False) -> CheckpointFormat:
    """Add ``fmt`` to :data:`CHECKPOINT_FORMATS` (``"auto"`` is reserved). The same format registered again (its
    module reloaded: same name, description and hooks) replaces itself; any other needs ``overwrite``."""
    if fmt.name == "auto":
        raise ValueError("'auto' is reserved for format detection")
    old = CHECKPOINT_FORMATS.get(fmt.name)
    if old is not None and not overwrite and _identity(old) != _identity(fmt):
        raise ValueError(f"checkpoint format {fmt.name!r} is already registered")
    CHECKPOINT_FORMATS[fmt.name] = fmt
    return fmt


register_checkpoint_format(
    CheckpointFormat("timm", "a timm state dict, flat or under 'model'/'state_dict'; used as is")
)


def detect_checkpoint_formats(obj: Any) -> list[CheckpointFormat]:
    """Every registered format whose detector claims ``obj``, highest priority first."""
    found = []
    for fmt in CHECKPOINT_FORMATS.values():
        if fmt.detect is None:
            continue
        try:
            if fmt.detect(obj):
                found.append(fmt)
        except Exception:  # a detector must not make loading fail; it just does not match
            continue
    return sorted(found, key=lambda f: -f.priority)


def resolve_checkpoint_format(
    obj: Any, checkpoint_format: str = "auto", path: str | Path | None = None
) -> CheckpointFormat:
    """The registered format named ``checkpoint_format``, or the detected one for ``"auto"``.

    Detection must be unambiguous: when several formats of the same (top) priority claim the file, a
    :class:`CheckpointError` lists them and asks for an explicit format.
    """
    if checkpoint_format == "auto":
        found = detect_checkpoint_formats(obj)
        if not found:
            return CHECKPOINT_FORMATS["timm"]
        top = [f for f in found if f.priority == found[0].priority]
        if len(top) > 1:
            names = ", ".join(repr(f.name) for f in top)
            raise CheckpointError(
                path,
                f"checkpoint layout is ambiguous: it matches formats {names}. Pass one of them with "
                "checkpoint_format=... (--checkpoint-format on the command line).",
            )
        return top[0]
    if checkpoint_format not in CHECKPOINT_FORMATS:
        known = ", ".join(repr(n) for n in ["auto", *CHECKPOINT_FORMATS])
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; known formats: {known}")
    return CHECKPOINT_FORMATS[checkpoint_format]
