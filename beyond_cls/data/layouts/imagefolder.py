"""``imagefolder`` and ``imagenet``: class folders ``root/{train,val}/<class>/<images>``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from beyond_cls.data.folder import DataError, ImageFolderDataset
from beyond_cls.data.labeled import LabeledImages, check_split, find_missing, missing_error
from beyond_cls.data.registry import DatasetLayout, register

__all__ = ["check_missing", "folder_classes", "folder_split", "image_folder"]


def folder_classes(folder: Path) -> list[str]:
    """The sorted names of the class folders in ``folder`` (hidden ones left out)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def check_missing(ds: LabeledImages, layout: str) -> None:
    """A DataError naming the first missing images of ``ds`` and the expected ``layout``, if any is missing."""
    missing = find_missing(ds.paths)
    if missing:
        raise missing_error(ds.paths, missing, layout)


def folder_split(root: Path, folder: str, other: str, transform: Callable | None) -> ImageFolderDataset:
    """ImageFolderDataset of ``root/folder`` whose class folders must match ``root/other`` (if present)."""
    ds = ImageFolderDataset(root, folder, transform)
    if (root / other).is_dir() and (other_classes := folder_classes(root / other)) != ds.classes:
        diff = sorted(set(ds.classes) ^ set(other_classes))
        raise DataError(
            f"class folders of {root / folder} and {root / other} differ ({', '.join(diff[:5])}"
            f"{' ...' if len(diff) > 5 else ''}); both splits need the same classes so labels agree"
        )
    return ds


def image_folder(
    root: str | os.PathLike, split: str = "train", transform: Callable | None = None
) -> ImageFolderDataset:
    """``root/{train,val}/<class>/<images>`` (ImageNet-1k as usually prepared, the synthetic set)."""
    check_split(split)
    return folder_split(Path(root).expanduser(), split, "val" if split == "train" else "train", transform)


_SPLITS = "`train/`, `val/`; both must hold the same class folders"
_CLASSES = "the sorted class folder names"
register(DatasetLayout(
    "imagefolder", "any ImageFolder", "`train/<class>/*`, `val/<class>/*`", _SPLITS, _CLASSES, "top1", image_folder,
))
register(DatasetLayout(
    "imagenet", "ImageNet-1k as usually prepared (an ImageFolder)", "`train/<synset>/*`, `val/<synset>/*`", _SPLITS,
    _CLASSES + " (synsets)", "top1", image_folder,
))
