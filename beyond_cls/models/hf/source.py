"""Where a ``--model hf:PATH`` lives: a ``save_pretrained`` folder or a hub id in the LOCAL hub cache.

Nothing is downloaded: a hub id (``org/name``) is looked up with ``huggingface_hub.snapshot_download(...,
local_files_only=True)`` in the cache folder the environment names ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub). The folder must hold ``config.json`` and the weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin``); ``preprocessor_config.json`` is optional.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from beyond_cls.models.errors import CheckpointError

__all__ = ["HF_PREFIX", "INSTALL_HINT", "HFSource", "hub_cache_dir", "read_hf_source", "require_transformers"]

#: The ``--model`` prefix of Hugging Face models.
HF_PREFIX = "hf:"
INSTALL_HINT = "pip install 'beyond-cls[hf]'"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def require_transformers() -> Any:
    """The ``transformers`` module, or ImportError in one line saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(f"--model hf:PATH needs the optional dependency transformers: {INSTALL_HINT}") from None
    return transformers


def hub_cache_dir() -> Path:
    """The hub cache folder the environment names now (huggingface_hub's rule, read at call time)."""
    value = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if value:
        return Path(value).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _resolve_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise CheckpointError(None, f"hf:{path} is a file; give the folder holding config.json and the weights")
    if not _HUB_ID.match(path):
        raise CheckpointError(None, f"hf:{path}: no such folder (and not a hub id like org/name)")
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(path, cache_dir=str(cache), local_files_only=True))
    except Exception:  # huggingface_hub's not-found errors differ by version; nothing else can happen offline
        raise CheckpointError(
            None,
            f"hf:{path} is not a local folder and not in the local hub cache {cache} (nothing is downloaded: "
            f"fetch it first, e.g. `huggingface-cli download {path}`, or pass the folder)",
        ) from None


def _weights_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(folder, "has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


@dataclass(frozen=True)
class HFSource:
    """A Hugging Face model folder, read: its config (a ``transformers`` config object), weights and normalization."""

    folder: Path
    config: Any
    weights: Path  # the (first) weights file: fingerprints and error messages name it
    state_dict: dict[str, Tensor]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def _normalization(folder: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return None, None
    values = json.loads(file.read_text())
    mean, std = values.get("image_mean"), values.get("image_std")
    if mean is None or std is None:
        return None, None
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(file, f"image_mean {list(mean)} / image_std {list(std)}: expected 3 values each, std > 0")
    return mean, std


def read_hf_source(path: str) -> HFSource:
    """Resolve ``path`` (folder or cached hub id), read its config with ``transformers`` and its weights."""
    from beyond_cls.models.checkpoint import read_checkpoint

    folder = _resolve_folder(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(folder, "has no config.json (expected a folder written by save_pretrained)")
    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(folder / "config.json", f"transformers cannot read it: {first}") from None
    files = _weights_files(folder)
    state_dict: dict[str, Tensor] = {}
    for file in files:
        obj = read_checkpoint(file)
        if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(file, "is not a flat dict of tensors")
        state_dict.update(obj)
    mean, std = _normalization(folder)
    return HFSource(folder, config, files[0], state_dict, mean, std)
