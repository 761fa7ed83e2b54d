"""``pets``: Oxford-IIIT Pet with its official trainval/test lists."""

from __future__ import annotations

import os
from collections.abc import Callable

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split, find_root, inside, read_lines, require_dir
from beyond_cls.data.layouts.imagefolder import check_missing
from beyond_cls.data.registry import DatasetLayout, register

__all__ = ["OxfordPets"]


class OxfordPets(LabeledImages):
    """Oxford-IIIT Pet: ``oxford-iiit-pet/images/*.jpg`` + ``annotations/{trainval,test}.txt``.

    Annotation lines are ``<name> <class id 1..37> <species> <breed id>``; class names are the image-name
    prefixes (``Abyssinian``, ``american_bulldog``) in class-id order. ``root`` is ``oxford-iiit-pet`` or its parent.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        layout = "oxford-iiit-pet/{images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt}"
        root = find_root(root, "annotations", ["oxford-iiit-pet"], layout)
        files = {"train": root / "annotations" / "trainval.txt", "val": root / "annotations" / "test.txt"}
        names: dict[int, str] = {}
        rows = []
        for which, path in files.items():
            if which != split and not path.is_file():
                continue
            for line in read_lines(path, layout):
                parts = line.split()
                if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) < 1:
                    raise DataError(f"{path}: bad line {line!r}; expected '<name> <class id> <species> <breed id>'")
                label, prefix = int(parts[1]), parts[0].rsplit("_", 1)[0]
                if names.setdefault(label, prefix) != prefix:
                    raise DataError(f"{path}: class id {label} names both {names[label]!r} and {prefix!r}")
                if which == split:
                    rows.append((inside(root / "images", f"{parts[0]}.jpg", f"{path}, line {line!r}"), label - 1))
        if not names:
            raise DataError(f"{files[split]} lists no images; expected {layout}")
        if len(names) != max(names):
            raise DataError(f"{root / 'annotations'}: class ids {sorted(set(range(1, max(names) + 1)) - set(names))} "
                            "have no images, so their names are unknown")
        classes = [names[k] for k in range(1, len(names) + 1)]
        require_dir(root / "images", layout)
        super().__init__([path for path, _ in rows], classes, [label for _, label in rows], transform, root, split)
        check_missing(self, layout)

register(DatasetLayout(
    "pets", "Oxford-IIIT Pet (37 breeds)", "`oxford-iiit-pet/` (images/, annotations/)",
    "`annotations/trainval.txt` / `annotations/test.txt`", "image-name prefixes, in class-id order", "top1",
    OxfordPets,
))
