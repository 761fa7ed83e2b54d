"""Reading encoder checkpoints safely and adapting their layout to timm state dicts.

Files are read with ``torch.load(weights_only=True)`` (or safetensors) and never with
``weights_only=False``: a file that would run code when unpickled is refused. Each official
checkpoint layout is one :class:`~beyond_cls.models.formats.CheckpointFormat`, registered by its
module in ``beyond_cls/models/formats/`` (docs/models.md lists the layouts of the paper's encoders);
this module holds what every format shares and looks formats up in the registry only.

Typical use (one read of the file)::

    ckpt = prepare_checkpoint(path, "auto", source=None)      # detect, extract, convert
    model = timm.create_model(name, num_classes=ckpt.num_classes, **ckpt.model_kwargs)
    load_encoder_checkpoint(model, ckpt)                        # strict (beyond_cls.models.loader)
"""

from __future__ import annotations

import argparse
import collections
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.formats.common import extract_state_dict
from beyond_cls.models.formats.registry import CheckpointFormat, resolve_checkpoint_format

__all__ = [
    "AdaptedCheckpoint",
    "adapt_checkpoint",
    "checkpoint_model_kwargs",
    "extract_state_dict",
    "prepare_checkpoint",
    "read_checkpoint",
    "wrong_format_hint",
]


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


# ------------------------------------------------------------------------------------------- adapting


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
