"""Reading encoder checkpoints safely and adapting their layout to timm state dicts.

Files are read with ``torch.load(weights_only=True)`` (or safetensors) and never with
``weights_only=False``: a file that would run code when unpickled is refused. Each official
checkpoint layout is one :class:`CheckpointFormat` entry in :data:`CHECKPOINT_FORMATS`
(see ``encoders.md`` for the layouts of the paper's encoders); the official formats live in
``formats_vit.py``, ``formats_distill.py``, ``formats_beit.py`` and ``formats_dinov2.py``.

Typical use (one read of the file)::

    ckpt = prepare_checkpoint(path, "auto", source=None)      # detect, extract, convert
    model = timm.create_model(name, num_classes=ckpt.num_classes, **ckpt.model_kwargs)
    load_encoder_checkpoint(model, ckpt)                        # strict (beyond_cls.models.loader)
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "AdaptedCheckpoint",
    "CheckpointError",
    "CheckpointFormat",
    "adapt_checkpoint",
    "checkpoint_model_kwargs",
    "detect_checkpoint_formats",
    "extract_state_dict",
    "prepare_checkpoint",
    "read_checkpoint",
    "register_checkpoint_format",
    "resolve_checkpoint_format",
]

#: Top-level entries tried, in order, when no key is given and the file is not a flat state dict.
STATE_DICT_KEYS = ("model", "state_dict", "model_state", "module")

#: Classifier keys, dropped unless ``keep_head=True`` because encoders are built with ``num_classes=0``.
CLASSIFIER_KEYS = ("head.*", "head_dist.*")


class _InertConfigNode:
    """Stands in for ``yacs.config.CfgNode`` (SimMIM pickles its training config as one).

    yacs is never imported: the weights-only unpickler builds an ``OrderedDict`` instead, which keeps
    the config's keys and values and stores the node's private attributes as inert instance data.
    (torch only lets SETITEMS fill exact ``dict``/``OrderedDict``/``Counter`` objects, so a dict
    subclass would be refused.)
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> collections.OrderedDict:
        return collections.OrderedDict()


# Harmless classes that training scripts pickle next to the weights: argparse ``args`` (MAE, DINO,
# iBOT, BEiT-v2) and SimMIM's yacs config, mapped by name onto an inert placeholder. Everything else
# (and everything inside these) is still checked against torch's own allowlist.
_SAFE_GLOBALS: list = [argparse.Namespace, (_InertConfigNode, "yacs.config.CfgNode")]


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message names the file."""

    def __init__(
        self,
        path: str | Path | None,
        problem: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
    ) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        super().__init__(problem if path is None else f"checkpoint {str(path)!r}: {problem}")

    def with_hint(self, hint: str) -> CheckpointError:
        """The same error with one more line of advice (keeps missing/unexpected)."""
        if not hint:
            return self
        return CheckpointError(
            self.path, f"{self.problem}\n  hint: {hint}", missing=self.missing, unexpected=self.unexpected
        )


# --------------------------------------------------------------------------------------------- reading


def _unpickler_reason(message: str) -> str:
    """The one useful sentence of torch's weights-only refusal (which global or opcode it refused)."""
    match = re.search(r"WeightsUnpickler error:\s*(.*)", message, flags=re.DOTALL)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", match.group(1) if match else message) if p.strip()]
    # torch wraps the reason in boilerplate paragraphs (blocked modules come without the prefix above)
    useful = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
    reason = (useful or paragraphs or [""])[0]
    return reason.split(" Please use")[0].strip().rstrip(".") or "unsupported pickle content"


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
        # Legacy (pre-zip) serialization cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file's raw object on the CPU without running code from it.

    ``.safetensors`` files go through safetensors; everything else (``.pth``, ``.pt``, ``.pth.tar``,
    ``.pyth``, ``.bin``) through ``torch.load(weights_only=True)``, memory-mapped when possible.
    Tensors and plain containers come through; ``argparse.Namespace`` is allowed and a pickled
    ``yacs.config.CfgNode`` comes back as an ``OrderedDict``. Any other global is refused.
    Raises :class:`CheckpointError` for a missing, unsafe, corrupt or truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "file not found")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, expected a checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(path, f"not a readable safetensors file ({err})") from err
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            path,
            "refused as unsafe by torch.load(weights_only=True): "
            f"{_unpickler_reason(str(err))}. The file would need to run code (or is corrupt); "
            "it was not loaded. Convert it to a plain state dict or safetensors from a trusted copy.",
        ) from err
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            path, f"could not be read (corrupt or truncated?): {type(err).__name__}: {first_line}"
        ) from err


# ------------------------------------------------------------------------------------ state-dict picking


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _describe_keys(obj: Mapping) -> str:
    keys = [repr(k) for k in list(obj)[:20]]
    more = f", ... ({len(obj)} in all)" if len(obj) > 20 else ""
    return ", ".join(keys) + more if keys else "(none)"


def _strip_common_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def extract_state_dict(obj: Any, path: str | Path | None = None, key: str | None = None) -> dict[str, Tensor]:
    """Pick the tensor dict out of a loaded checkpoint and strip a DDP ``module.`` prefix.

    With ``key`` (e.g. ``"model"``, ``"teacher"``, ``"target_encoder"``) that entry is used; otherwise
    a flat dict of tensors is used as is, else the first of ``model``, ``state_dict``, ``model_state``,
    ``module`` that holds a dict of tensors. ``path`` only names the file in errors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                path, f"has no top-level key {key!r}; available keys: {_describe_keys(obj)}"
            )
        sd = obj[key]
        if not _is_tensor_dict(sd):
            raise CheckpointError(path, f"entry {key!r} is not a dict of tensors ({type(sd).__name__})")
    elif _is_tensor_dict(obj):
        sd = obj
    else:
        found = [k for k in STATE_DICT_KEYS if k in obj and _is_tensor_dict(obj[k])]
        if not found:
            raise CheckpointError(
                path,
                "no state dict found: it is not a flat dict of tensors and none of "
                f"{list(STATE_DICT_KEYS)} holds one; available keys: {_describe_keys(obj)}. "
                "Pass the key that holds the weights.",
            )
        sd = obj[found[0]]
    return _strip_common_prefix(dict(sd), "module.")


# ------------------------------------------------------------------------------------- layout adapters


def _no_model_kwargs(sd: dict[str, Tensor]) -> dict[str, Any]:
    return {}


#: ``extract(obj, key, source, path) -> state dict`` (see :attr:`CheckpointFormat.extract`).
Extractor = Callable[[Any, "str | None", "str | None", "str | Path | None"], dict[str, Tensor]]
#: ``resample(pos_embed, new_grid, old_grid, num_prefix_rows) -> pos_embed``.
PosEmbedResampler = Callable[[Tensor, tuple[int, int], tuple[int, int], int], Tensor]


@dataclass(frozen=True)
class CheckpointFormat:
    """How one family of checkpoint files maps onto a timm model's state dict.

    Steps, in order: pick the weights (``extract(obj, key, source, path)`` when set, else ``key`` if
    the file has it, else the automatic choice of :func:`extract_state_dict`; ``module.`` is stripped),
    keep only keys under ``keep_prefix`` (stripped), apply prefix ``rename`` pairs in order, drop keys
    matching ``drop`` (fnmatch patterns) and, unless ``keep_head``, :data:`CLASSIFIER_KEYS`, then
    ``convert`` for anything else. Every key left must then match the model exactly (the loader is
    strict).

    Hooks for the model side:

    - ``sources``: names of the sub-models a full training checkpoint holds (e.g. I-JEPA's
      ``("target_encoder", "encoder")``); the first is the default, ``source=`` picks another.
    - ``model_kwargs(sd) -> dict``: the ``timm.create_model`` arguments the converted state dict
      needs (e.g. ``global_pool='avg', fc_norm=True`` for an MAE model fine-tuned with global pooling,
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
        """Turn an extracted state dict into timm layout (a new dict)."""
        if self.keep_prefix:
            sd = {k[len(self.keep_prefix) :]: v for k, v in sd.items() if k.startswith(self.keep_prefix)}
            if not sd:
                raise CheckpointError(path, f"format {self.name!r}: no key starts with {self.keep_prefix!r}")
        for old, new in self.rename:
            sd = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}
        patterns = self.drop + (() if keep_head else CLASSIFIER_KEYS)
        sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        return self.convert(sd) if self.convert is not None else sd


#: Registered layouts by name; add an encoder family with :func:`register_checkpoint_format`.
CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(fmt: CheckpointFormat, *, overwrite: bool = False) -> CheckpointFormat:
    """Add ``fmt`` to :data:`CHECKPOINT_FORMATS` (``"auto"`` is reserved)."""
    if fmt.name == "auto":
        raise ValueError("'auto' is reserved for format detection")
    if fmt.name in CHECKPOINT_FORMATS and not overwrite:
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


def _as_format(obj: Any, checkpoint_format: str | CheckpointFormat, path: str | Path | None) -> CheckpointFormat:
    if isinstance(checkpoint_format, CheckpointFormat):
        return checkpoint_format
    return resolve_checkpoint_format(obj, checkpoint_format, path)


def adapt_checkpoint(
    obj: Any,
    path: str | Path | None = None,
    checkpoint_format: str | CheckpointFormat = "auto",
    key: str | None = None,
    *,
    source: str | None = None,
    keep_head: bool = False,
) -> dict[str, Tensor]:
    """Extract and convert a loaded checkpoint to a timm state dict (without classifier keys).

    An explicit ``key`` must exist; a format's own ``key`` is used when present and otherwise the
    automatic choice of :func:`extract_state_dict` applies. ``source`` picks a sub-model of a full
    training checkpoint (one of the format's ``sources``, e.g. ``"encoder"`` for I-JEPA, ``"student"``
    for DINO/iBOT, ``"momentum_encoder"`` for MoCo-v3). ``keep_head=True`` keeps ``head.*`` classifier
    weights (fine-tuned models); pretraining heads (DINO, iBOT, MoCo-v3 projectors) are always dropped.
    """
    fmt = _as_format(obj, checkpoint_format, path)
    if source is not None and source not in fmt.sources:
        choices = f"one of {list(fmt.sources)}" if fmt.sources else "not supported by this format"
        raise ValueError(f"checkpoint_format {fmt.name!r}: unknown source {source!r} ({choices})")
    if fmt.extract is not None:
        sd = fmt.extract(obj, key, source, path)
    else:
        if key is None and fmt.key is not None and isinstance(obj, Mapping) and fmt.key in obj:
            key = fmt.key
        sd = extract_state_dict(obj, path, key)
    return fmt.apply(sd, path, keep_head=keep_head)


def checkpoint_model_kwargs(
    obj: Any,
    checkpoint_format: str | CheckpointFormat = "auto",
    *,
    key: str | None = None,
    source: str | None = None,
    path: str | Path | None = None,
) -> dict[str, Any]:
    """The ``timm.create_model`` arguments a loaded checkpoint needs (its format's ``model_kwargs``)."""
    fmt = _as_format(obj, checkpoint_format, path)
    return dict(fmt.model_kwargs(adapt_checkpoint(obj, path, fmt, key, source=source)))


@dataclass(frozen=True)
class AdaptedCheckpoint:
    """A checkpoint read once and converted to timm layout, ready for model creation and loading.

    ``model_kwargs`` are the ``timm.create_model`` arguments the weights need (see
    :attr:`CheckpointFormat.model_kwargs`); ``num_classes`` is the classifier size when ``keep_head``
    kept one, else 0. ``detected`` is the format auto-detection picks for the file (for hints).
    """

    path: str
    format: CheckpointFormat
    state_dict: dict[str, Tensor]
    model_kwargs: dict[str, Any]
    num_classes: int = 0
    keep_head: bool = False
    detected: str | None = None


def _detected_name(obj: Any) -> str | None:
    try:
        return resolve_checkpoint_format(obj, "auto").name
    except CheckpointError:
        return None


def wrong_format_hint(fmt: CheckpointFormat, detected: str | None) -> str:
    """Advice when the requested format differs from what the file looks like (else "")."""
    if detected is None or detected in (fmt.name, "timm"):
        return ""
    return f"the file looks like checkpoint_format {detected!r}, not {fmt.name!r} (--checkpoint-format {detected})"


def prepare_checkpoint(
    path: str | Path,
    checkpoint_format: str | CheckpointFormat = "auto",
    *,
    key: str | None = None,
    source: str | None = None,
    keep_head: bool = False,
) -> AdaptedCheckpoint:
    """Read ``path`` safely, pick its format, extract and convert its weights, derive model kwargs."""
    obj = read_checkpoint(path)
    fmt = _as_format(obj, checkpoint_format, path)
    detected = fmt.name if checkpoint_format == "auto" else _detected_name(obj)
    hint = wrong_format_hint(fmt, detected)
    if hint:  # the explicit choice wins, but a layout that only loads by accident should not go unnoticed
        warnings.warn(f"checkpoint {str(path)!r}: {hint}", UserWarning, stacklevel=2)
    try:
        sd = adapt_checkpoint(obj, path, fmt, key, source=source, keep_head=keep_head)
    except CheckpointError as err:
        raise err.with_hint(hint) from None
    head = sd.get("head.weight") if keep_head else None
    num_classes = int(head.shape[0]) if isinstance(head, Tensor) and head.ndim == 2 else 0
    return AdaptedCheckpoint(
        path=str(path),
        format=fmt,
        state_dict=sd,
        model_kwargs=dict(fmt.model_kwargs(sd)),
        num_classes=num_classes,
        keep_head=keep_head,
        detected=detected,
    )


# The official layouts register themselves on import (they need the names above).
from beyond_cls.models import formats_beit, formats_dinov2, formats_distill, formats_vit  # noqa: E402, F401, I001
from beyond_cls.models.capi import CAPI_CHECKPOINT_FORMAT  # noqa: E402

register_checkpoint_format(CAPI_CHECKPOINT_FORMAT)
