"""``food101``: Food-101 with its official train/test lists."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split, find_root, inside, read_lines, require_dir
from beyond_cls.data.layouts.imagefolder import check_missing
from beyond_cls.data.registry import DatasetLayout, register

__all__ = ["Food101"]


class Food101(LabeledImages):
    """Food-101: ``food-101/meta/{classes.txt, train.json|txt, test.json|txt}`` + ``images/<class>/<id>.jpg``.

    ``root`` is the ``food-101`` folder or its parent.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        layout = "food-101/meta/{classes.txt, train.json, test.json} (or .txt) and food-101/images/<class>/<id>.jpg"
        root = find_root(root, "meta", ["food-101"], layout)
        classes = read_lines(root / "meta" / "classes.txt", layout)
        index = {name: i for i, name in enumerate(classes)}
        stem = root / "meta" / ("train" if split == "train" else "test")
        if stem.with_suffix(".json").is_file():
            with open(stem.with_suffix(".json")) as f:
                entries = [e for names in json.load(f).values() for e in names]
        else:
            entries = read_lines(stem.with_suffix(".txt"), layout)
        image_dir = require_dir(root / "images", layout)
        paths, targets = [], []
        for entry in entries:
            name = entry.split("/", 1)[0]
            if name not in index:
                raise DataError(f"{stem}.json/.txt: entry {entry!r} has class {name!r}, not in meta/classes.txt")
            paths.append(inside(image_dir, f"{entry}.jpg", f"{stem}.json/.txt, entry {entry!r}"))
            targets.append(index[name])
        super().__init__(paths, classes, targets, transform, root, split)
        check_missing(self, layout)

register(DatasetLayout(
    "food101", "Food-101", "`food-101/` (meta/, images/)", "`meta/train.json` / `meta/test.json` (or .txt)",
    "`meta/classes.txt`, in file order", "top1", Food101,
))
