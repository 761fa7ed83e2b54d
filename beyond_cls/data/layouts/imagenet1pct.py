"""``imagenet1pct``: ImageNet training images named by a list file (SimCLR's ``1percent.txt``), all of val."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from beyond_cls.data.folder import DataError, ImageFolderDataset
from beyond_cls.data.labeled import LabeledImages, check_split, missing_error, read_lines, require_dir
from beyond_cls.data.layouts.imagefolder import folder_classes
from beyond_cls.data.registry import DatasetLayout, register

__all__ = ["ImageNetSubset", "imagenet_1pct"]


class ImageNetSubset(LabeledImages):
    """ImageNet training images named by a list file (lines like ``n01440764_10026.JPEG``, synset = prefix).

    Labels index the sorted synset folders of ``root/train``, as in the full ImageNet.
    """

    def __init__(self, root: str | os.PathLike, subset_file: str | os.PathLike, transform: Callable | None = None):
        root = Path(root).expanduser()
        layout = f"{root}/train/<synset>/<synset>_<n>.JPEG and a list file of such names"
        train = require_dir(root / "train", layout)
        classes = folder_classes(train)
        index = {name: i for i, name in enumerate(classes)}
        paths, targets = [], []
        for line in read_lines(Path(subset_file), layout):
            name = line.replace("\\", "/").rsplit("/", 1)[-1]
            synset = name.split("_", 1)[0]
            if synset not in index:
                raise DataError(f"{subset_file}: {line!r} names synset {synset!r}, which has no folder in {train}")
            paths.append(str(train / synset / name))
            targets.append(index[synset])
        if not paths:
            raise DataError(f"{subset_file} lists no images; expected {layout}")
        missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]  # ~13k stats; listing would read 1.28 M
        if missing:
            raise missing_error(paths, missing, layout)
        super().__init__(paths, classes, targets, transform, root, "train")


def imagenet_1pct(
    root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
    subset_file: str | os.PathLike | None = None,
) -> LabeledImages | ImageFolderDataset:
    """train: the ImageNet-1% list (SimCLR's ``1percent.txt``, default ``root/1percent.txt``); val: all of root/val."""
    check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected {root}/{{train,val}}/<synset>/<images>")
    subset_file = root / "1percent.txt" if subset_file is None else Path(subset_file).expanduser()
    if split == "val":
        ds = ImageFolderDataset(root, "val", transform)
        if folder_classes(require_dir(root / "train", "root/{train,val}/<synset>/<images>")) != ds.classes:
            raise DataError(f"class folders of {root / 'val'} and {root / 'train'} differ; labels would not agree")
        return ds
    if not subset_file.is_file():
        raise DataError(f"subset list {subset_file} not found; pass subset_file=<path to 1percent.txt>")
    return ImageNetSubset(root, subset_file, transform)

register(DatasetLayout(
    "imagenet1pct", "the ImageNet-1% labels (semi-supervised protocol)",
    "ImageNet folders + `1percent.txt` (or `--subset-file`)", "the images `1percent.txt` names / all of `val/`",
    "the sorted synset folders of `train/`", "top1", imagenet_1pct,
))
