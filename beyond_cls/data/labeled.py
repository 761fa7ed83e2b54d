"""The ``LabeledImages`` interface every dataset adapter implements, and file helpers shared by the adapters."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from beyond_cls.data.folder import DataError, load_rgb

__all__ = [
    "SPLITS",
    "LabeledImages",
    "check_split",
    "find_missing",
    "find_root",
    "inside",
    "missing_error",
    "read_lines",
    "require_dir",
    "require_file",
]

SPLITS = ("train", "val")  # "val" is each set's official test / validation split


class LabeledImages(Dataset):
    """Image files with single-label (int) or multi-label (float32 0/1 vector) targets.

    ``targets`` is a ``list[int]`` for single-label sets and a bool tensor ``[len, num_classes]`` for
    multi-label ones; ``target(i)`` returns an ``int`` or a float32 tensor ``[num_classes]``.
    """

    multilabel: bool = False

    def __init__(
        self,
        paths: list[str],
        classes: list[str],
        targets: list[int] | torch.Tensor,
        transform: Callable | None = None,
        root: str | os.PathLike | None = None,
        split: str | None = None,
    ):
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        if self.multilabel and tuple(targets.shape) != (len(paths), len(classes)):
            expected = (len(paths), len(classes))
            raise ValueError(f"multi-label targets of shape {tuple(targets.shape)}, expected {expected}")
        self.paths = paths
        self.classes = classes
        self.targets = targets
        self.transform = transform
        self.root = None if root is None else Path(root)
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def target(self, index: int) -> int | torch.Tensor:
        if self.multilabel:
            return self.targets[index].float()
        return int(self.targets[index])

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])

    def __getitem__(self, index: int) -> tuple[Any, int | torch.Tensor]:
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.target(index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"classes={self.num_classes}, images={len(self)})"
        )


def find_root(root: str | os.PathLike, marker: str, subfolders: Sequence[str], layout: str) -> Path:
    """``root`` if ``root/marker`` exists, else the first ``root/<subfolder>`` holding it; DataError otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected {layout}")
    for candidate in (root, *(root / s for s in subfolders)):
        if (candidate / marker).exists():
            return candidate
    where = " or ".join(str(p / marker) for p in (root, *(root / s for s in subfolders)))
    raise DataError(f"{where} not found; expected {layout}")


def require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path} not found; expected {layout}")
    return path


def require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise DataError(f"folder {path} not found; expected {layout}")
    return path


def read_lines(path: Path, layout: str) -> list[str]:
    """Non-empty, stripped lines of a text file (``#`` comments dropped); DataError naming it if missing."""
    require_file(path, layout)
    with open(path, encoding="utf-8", errors="replace") as f:
        return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]


_DRIVE = re.compile(r"^[A-Za-z]:")


def inside(folder: Path, entry: str, where: str) -> str:
    """``folder / entry`` as a string; a DataError naming ``where`` (file and entry) if ``entry`` is absolute or
    climbs out of ``folder`` with ``..`` (``\\`` counts as a separator). Symlinks are followed as the user
    placed them (an image folder linked to other storage is common), so only the text of ``entry`` is checked.
    """
    if not isinstance(entry, str):
        raise DataError(f"{where}: image path {entry!r} is not a string")
    rel = entry.replace("\\", "/")
    if rel.startswith("/") or _DRIVE.match(rel) or (".." in rel.split("/") and _climbs(rel)):
        raise DataError(f"{where}: image path {entry!r} leaves the dataset folder {folder}; annotation paths "
                        "must be relative and stay inside it")
    return str(folder / entry)


def _climbs(rel: str) -> bool:
    return os.path.normpath(rel).split(os.sep, 1)[0] == ".."


def find_missing(paths: Iterable[str]) -> list[int]:
    """Indices of ``paths`` that do not exist, found by listing each parent folder once (no per-file stat)."""
    listing: dict[str, set[str]] = {}
    missing = []
    for i, path in enumerate(paths):
        folder, name = os.path.split(path)
        names = listing.get(folder)
        if names is None:
            try:
                names = listing[folder] = set(os.listdir(folder))
            except OSError:
                names = listing[folder] = set()
        if name not in names:
            missing.append(i)
    return missing


def missing_error(paths: Sequence[str], missing: Sequence[int], layout: str, hint: str = "") -> DataError:
    """A DataError naming the first missing image and how many are missing."""
    first = paths[missing[0]]
    return DataError(
        f"{len(missing)} of {len(paths)} listed images are missing, first {first}; expected {layout}{hint}"
    )


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} (val = the official test split)")
    return split
