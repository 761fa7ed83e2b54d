"""``cub``: CUB-200-2011 with its official train/test split."""

from __future__ import annotations

import os
from collections.abc import Callable

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split, find_root, inside, read_lines, require_dir
from beyond_cls.data.layouts.imagefolder import check_missing
from beyond_cls.data.registry import DatasetLayout, register

__all__ = ["CUB200"]


class CUB200(LabeledImages):
    """CUB-200-2011: ``CUB_200_2011/{images,image_class_labels,train_test_split,classes}.txt`` + ``images/``.

    ``root`` is the ``CUB_200_2011`` folder or its parent; classes are the names of classes.txt
    (``001.Black_footed_Albatross``), images in images.txt order.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        layout = "CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}"
        root = find_root(root, "images.txt", ["CUB_200_2011"], layout)
        tables = {}
        for name in ("images", "image_class_labels", "train_test_split", "classes"):
            path = root / f"{name}.txt"
            rows = [line.split(maxsplit=1) for line in read_lines(path, layout)]
            if any(len(r) != 2 for r in rows):
                raise DataError(f"{path}: expected lines '<id> <value>'")
            tables[name] = dict(rows)
        classes = [tables["classes"][k] for k in sorted(tables["classes"], key=int)]
        image_dir = require_dir(root / "images", layout)
        paths, targets = [], []
        for image_id, rel in tables["images"].items():
            for name in ("image_class_labels", "train_test_split"):
                if image_id not in tables[name]:
                    raise DataError(f"{root / name}.txt has no line for image id {image_id} ({rel})")
            if (tables["train_test_split"][image_id] == "1") != (split == "train"):
                continue
            label = int(tables["image_class_labels"][image_id]) - 1
            if not 0 <= label < len(classes):
                raise DataError(f"{root}/image_class_labels.txt: image {image_id} has class {label + 1}, "
                                f"expected 1..{len(classes)}")
            paths.append(inside(image_dir, rel, f"{root / 'images.txt'}, image id {image_id}"))
            targets.append(label)
        super().__init__(paths, classes, targets, transform, root, split)
        check_missing(self, layout)

register(DatasetLayout(
    "cub", "CUB-200-2011 birds", "`CUB_200_2011/` (images.txt, train_test_split.txt, …)",
    "`train_test_split.txt`: 1 / 0", "`classes.txt`, in id order", "top1", CUB200,
))
