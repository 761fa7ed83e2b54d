"""Multi-label adapters (COCO, NUS-WIDE): targets are float32 0/1 vectors over the categories / concepts."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import (
    LabeledImages,
    check_split,
    find_missing,
    find_root,
    inside,
    missing_error,
    read_lines,
    require_dir,
    require_file,
)

__all__ = ["COCOMultiLabel", "NUSWIDE"]


def _keep(paths: list[str], targets: torch.Tensor, keep: list[int]) -> tuple[list[str], torch.Tensor]:
    return [paths[i] for i in keep], targets[torch.as_tensor(keep, dtype=torch.long)]


class COCOMultiLabel(LabeledImages):
    """COCO instances as 80-way multi-label classification (``year`` 2014 by default, 2017 also works).

    Layout: ``root/annotations/instances_{train,val}<year>.json`` and ``root/{train,val}<year>/<file_name>``
    (or ``root/images/{train,val}<year>/``); ``root`` may also be the parent of a ``coco`` folder. A target is
    the set of category ids of the image's annotations (crowd ones included) mapped to 0..79 in sorted id
    order; classes are the category names. Images without annotations keep an all-zero target unless
    ``drop_unlabeled=True``. Images are ordered by image id.
    """

    multilabel = True

    def __init__(
        self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
        year: str | int = "2014", drop_unlabeled: bool = False,
    ):
        check_split(split)
        name = f"{'train' if split == 'train' else 'val'}{year}"
        layout = f"coco/annotations/instances_{name}.json and coco/{name}/<file_name>"
        root = find_root(root, "annotations", ["coco", f"coco{year}"], layout)
        ann_file = require_file(root / "annotations" / f"instances_{name}.json", layout)
        with open(ann_file) as f:
            data = json.load(f)
        missing_keys = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing_keys:
            raise DataError(f"{ann_file} has no {', '.join(missing_keys)}; expected a COCO instances file")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        column = {c["id"]: i for i, c in enumerate(categories)}
        images = sorted(data["images"], key=lambda im: im["id"])
        row = {im["id"]: i for i, im in enumerate(images)}
        rows, cols = [], []
        for ann in data["annotations"]:
            if ann["image_id"] not in row or ann["category_id"] not in column:
                raise DataError(f"{ann_file}: annotation {ann.get('id')} refers to unknown image "
                                f"{ann['image_id']} or category {ann['category_id']}")
            rows.append(row[ann["image_id"]])
            cols.append(column[ann["category_id"]])
        targets = torch.zeros(len(images), len(categories), dtype=torch.bool)
        targets[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = True
        image_dir = root / name if (root / name).is_dir() else require_dir(root / "images" / name, layout)
        paths = [inside(image_dir, im.get("file_name"), f"{ann_file}, image id {im.get('id')}") for im in images]
        if drop_unlabeled:
            paths, targets = _keep(paths, targets, targets.any(1).nonzero().flatten().tolist())
        missing = find_missing(paths)
        if missing:
            raise missing_error(paths, missing, layout)
        super().__init__(paths, [c["name"] for c in categories], targets, transform, root, split)


def _nus_relpath(entry: str) -> str:
    # official lists use Windows separators: 'actor\\0001_2124494179.jpg' (Imagelist.txt: 'C:\\ImageData\\Flickr\\...')
    rel = entry.strip().replace("\\", "/")
    return rel.split("Flickr/", 1)[1] if "Flickr/" in rel else rel.lstrip("/")


class NUSWIDE(LabeledImages):
    """NUS-WIDE, 81 concepts, official train / test split.

    Layout: ``ConceptsList/Concepts81.txt`` (or ``Concepts81.txt``), ``ImageList/{Train,Test}Imagelist.txt``,
    ``Groundtruth/TrainTestLabels/Labels_<concept>_{Train,Test}.txt`` (one 0/1 per image-list line) and images
    under ``image_dir`` (default ``root/Flickr/<folder>/<file>``). ``root`` may be the parent of ``NUS-WIDE``.
    Many listed images were deleted from Flickr: ``missing="skip"`` leaves them out (default ``"error"``);
    ``drop_unlabeled=True`` leaves out images with no concept.
    """

    multilabel = True

    def __init__(
        self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
        image_dir: str | os.PathLike = "Flickr", missing: str = "error", drop_unlabeled: bool = False,
    ):
        check_split(split)
        if missing not in ("error", "skip"):
            raise DataError(f"missing={missing!r}; expected 'error' or 'skip'")
        which = "Train" if split == "train" else "Test"
        layout = (f"NUS-WIDE/{{ConceptsList/Concepts81.txt, ImageList/{which}Imagelist.txt, "
                  f"Groundtruth/TrainTestLabels/Labels_<concept>_{which}.txt, Flickr/<folder>/<image>.jpg}}")
        root = find_root(root, "ImageList", ["NUS-WIDE", "nus-wide", "nuswide", "NUS_WIDE"], layout)
        concepts_file = root / "ConceptsList" / "Concepts81.txt"
        concepts = read_lines(concepts_file if concepts_file.is_file() else root / "Concepts81.txt", layout)
        list_file = root / "ImageList" / f"{which}Imagelist.txt"
        entries = read_lines(list_file, layout)
        targets = torch.zeros(len(entries), len(concepts), dtype=torch.bool)
        for j, concept in enumerate(concepts):
            label_file = root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{which}.txt"
            values = require_file(label_file, layout).read_bytes().split()
            if len(values) != len(entries):
                raise DataError(f"{label_file} has {len(values)} labels but {which}Imagelist.txt lists "
                                f"{len(entries)} images; expected one 0/1 per image")
            if bad := set(values) - {b"0", b"1"}:
                raise DataError(f"{label_file}: values {sorted(bad)[:3]} are not 0/1")
            targets[:, j] = torch.from_numpy(np.array(values) == b"1")
        images = Path(root / image_dir).expanduser()  # an absolute image_dir replaces root
        require_dir(images, layout)
        paths = [inside(images, _nus_relpath(e), f"{list_file}, entry {k + 1}") for k, e in enumerate(entries)]
        gone = find_missing(paths)
        if gone and missing == "error":
            raise missing_error(paths, gone, layout, hint='; pass missing="skip" to leave out images deleted from '
                                "Flickr (common for NUS-WIDE)")
        keep = set(range(len(paths))) - set(gone)
        if drop_unlabeled:
            keep &= set(targets.any(1).nonzero().flatten().tolist())
        if len(keep) < len(paths):
            paths, targets = _keep(paths, targets, sorted(keep))
        super().__init__(paths, concepts, targets, transform, root, split)
