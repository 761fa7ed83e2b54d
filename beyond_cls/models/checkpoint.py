"""Reading encoder checkpoints safely and adapting their layout to timm state dicts.

Files are read with ``torch.load(weights_only=True)`` (or safetensors) and never with
``weights_only=False``: a file that would run code when unpickled is refused. Each official
checkpoint layout is one :class:`CheckpointFormat` entry in :data:`CHECKPOINT_FORMATS`
(see ``encoders.md`` for the layouts of the paper's encoders).
"""

from __future__ import annotations

import argparse
import fnmatch
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMATS",
    "CLASSIFIER_KEYS",
    "CheckpointError",
    "CheckpointFormat",
    "adapt_checkpoint",
    "extract_state_dict",
    "read_checkpoint",
    "register_checkpoint_format",
    "resolve_checkpoint_format",
]

#: Top-level entries tried, in order, when no key is given and the file is not a flat state dict.
STATE_DICT_KEYS = ("model", "state_dict", "model_state", "module")

#: Classifier keys, dropped from every checkpoint because encoders are built with ``num_classes=0``.
CLASSIFIER_KEYS = ("head.*", "head_dist.*")

# Plain containers that training scripts put next to the weights (MAE, DINO and BEiT-v2 save their
# argparse ``args``). Allowlisted for the weights-only unpickler; anything inside them is still
# checked against torch's own allowlist.
_SAFE_GLOBALS = [argparse.Namespace]


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


# --------------------------------------------------------------------------------------------- reading


def _unpickler_reason(message: str) -> str:
    """The one useful sentence of torch's weights-only refusal (which global or opcode it refused)."""
    match = re.search(r"WeightsUnpickler error:\s*(.*)", message, flags=re.DOTALL)
    reason = (match.group(1) if match else message).strip().split("\n\n")[0]
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


@dataclass(frozen=True)
class CheckpointFormat:
    """How one family of checkpoint files maps onto a timm model's state dict.

    Steps, in order: take ``key`` (if present, else the automatic choice), strip ``module.``, keep only
    keys under ``keep_prefix`` (stripped), apply prefix ``rename`` pairs, drop keys matching ``drop``
    (fnmatch patterns) and :data:`CLASSIFIER_KEYS`, then ``convert`` for anything else.
    ``detect(obj)`` lets ``checkpoint_format="auto"`` recognise the raw loaded object; detectors run
    from the highest ``priority`` down, and ``"timm"`` is the fallback.
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

    def apply(self, sd: dict[str, Tensor], path: str | Path | None = None) -> dict[str, Tensor]:
        """Turn an extracted state dict into timm layout (a new dict)."""
        if self.keep_prefix:
            sd = {k[len(self.keep_prefix) :]: v for k, v in sd.items() if k.startswith(self.keep_prefix)}
            if not sd:
                raise CheckpointError(path, f"format {self.name!r}: no key starts with {self.keep_prefix!r}")
        for old, new in self.rename:
            sd = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in sd.items()}
        patterns = self.drop + CLASSIFIER_KEYS
        sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        return self.convert(sd) if self.convert is not None else sd


def _looks_like_mae(obj: Any) -> bool:
    if not isinstance(obj, Mapping):
        return False
    return "model" in obj or any(
        isinstance(k, str) and (k.startswith("decoder") or k == "mask_token") for k in obj
    )


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
register_checkpoint_format(
    CheckpointFormat(
        "mae",
        "facebookresearch/mae: {'model': sd}; the pretraining decoder and mask token are dropped",
        key="model",
        drop=("decoder*", "mask_token"),
        detect=_looks_like_mae,
    )
)


def resolve_checkpoint_format(obj: Any, checkpoint_format: str = "auto") -> CheckpointFormat:
    """The registered format named ``checkpoint_format``, or the detected one for ``"auto"``."""
    if checkpoint_format == "auto":
        candidates = sorted(
            (f for f in CHECKPOINT_FORMATS.values() if f.detect is not None), key=lambda f: -f.priority
        )
        for fmt in candidates:
            if fmt.detect(obj):
                return fmt
        return CHECKPOINT_FORMATS["timm"]
    if checkpoint_format not in CHECKPOINT_FORMATS:
        known = ", ".join(repr(n) for n in ["auto", *CHECKPOINT_FORMATS])
        raise ValueError(f"unknown checkpoint_format {checkpoint_format!r}; known formats: {known}")
    return CHECKPOINT_FORMATS[checkpoint_format]


def adapt_checkpoint(
    obj: Any,
    path: str | Path | None = None,
    checkpoint_format: str | CheckpointFormat = "auto",
    key: str | None = None,
) -> dict[str, Tensor]:
    """Extract and convert a loaded checkpoint to a timm state dict without classifier keys.

    An explicit ``key`` must exist; a format's own ``key`` is used when present and otherwise the
    automatic choice of :func:`extract_state_dict` applies.
    """
    fmt = (
        checkpoint_format
        if isinstance(checkpoint_format, CheckpointFormat)
        else resolve_checkpoint_format(obj, checkpoint_format)
    )
    if key is None and fmt.key is not None and isinstance(obj, Mapping) and fmt.key in obj:
        key = fmt.key
    return fmt.apply(extract_state_dict(obj, path, key), path)
