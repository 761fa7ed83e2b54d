"""Stanford Cars from the official devkit: ``cars_meta.mat``, ``cars_{train,test}_annos*.mat`` (read with scipy)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split, find_missing, inside, missing_error, require_dir

__all__ = ["DEVKIT_LAYOUT", "StanfordCarsDevkit", "find_devkit"]

DEVKIT_LAYOUT = (
    "the official devkit <root>/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
    "cars_test_annos_withlabels.mat, cars_train/, cars_test/} (root may also be the parent of stanford_cars/; "
    "the .mat files may sit in <root>, devkit/ or car_devkit/devkit/)"
)
_MAT_DIRS = ("", "devkit", "car_devkit/devkit")
_ANNOTATIONS = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}


def _find(base: Path, name: str) -> Path | None:
    return next((base / d / name for d in _MAT_DIRS if (base / d / name).is_file()), None)


def find_devkit(root: Path, split: str | None = None) -> Path | None:
    """The folder (``root`` or ``root/stanford_cars``) whose devkit holds ``cars_meta.mat`` (and, given a
    ``split``, that split's annotations), else None."""
    names = ["cars_meta.mat"] + ([] if split is None else [_ANNOTATIONS["train" if split == "train" else "test"]])
    return next((base for base in (root, root / "stanford_cars") if all(_find(base, n) for n in names)), None)


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy's reader fails on a damaged file with many types (IndexError, MatReadError...)
        raise DataError(f"cannot read MATLAB file {path}: {exc}") from exc


def _field(mat: dict[str, Any], key: str, path: Path) -> np.ndarray:
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "nothing"
        raise DataError(f"{path} has no variable {key!r} (found {found}); expected {DEVKIT_LAYOUT}")
    return np.atleast_1d(mat[key])


class StanfordCarsDevkit(LabeledImages):
    """Stanford Cars as released: class names from ``cars_meta.mat``, ``annotations`` struct arrays (fields
    ``bbox_x1 … bbox_y2, class, fname``; class 1..196) and images in ``cars_train/`` / ``cars_test/`` (also
    nested one level, as in the Kaggle copy). ``root`` is the folder :func:`find_devkit` returns.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        root = Path(root).expanduser()
        which = "train" if split == "train" else "test"
        meta = _find(root, "cars_meta.mat")
        if meta is None:
            raise DataError(f"cars_meta.mat not found under {root}; expected {DEVKIT_LAYOUT}")
        classes = [str(name) for name in _field(_loadmat(meta), "class_names", meta).tolist()]
        anno = _find(root, _ANNOTATIONS[which])
        if anno is None:
            unlabeled = " (cars_test_annos.mat has no labels)" if which == "test" else ""
            raise DataError(f"{_ANNOTATIONS[which]} not found under {root}{unlabeled}; expected {DEVKIT_LAYOUT}")
        annotations = _field(_loadmat(anno), "annotations", anno)
        missing = {"class", "fname"} - set(annotations.dtype.names or ())
        if missing:
            raise DataError(f"{anno}: annotations have no field(s) {', '.join(sorted(missing))}; "
                            "expected fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname")
        images = require_dir(root / f"cars_{which}", DEVKIT_LAYOUT)
        if (images / f"cars_{which}").is_dir():
            images = images / f"cars_{which}"
        paths, targets = [], []
        for k, row in enumerate(annotations, 1):
            fname, label = row["fname"], int(row["class"])
            if not 1 <= label <= len(classes):
                raise DataError(f"{anno}: annotation {k} ({fname}) has class {label}, expected 1..{len(classes)}")
            paths.append(inside(images, str(fname), f"{anno}, annotation {k}"))
            targets.append(label - 1)
        if not paths:
            raise DataError(f"{anno} lists no images; expected {DEVKIT_LAYOUT}")
        gone = find_missing(paths)
        if gone:
            raise missing_error(paths, gone, DEVKIT_LAYOUT)
        super().__init__(paths, classes, targets, transform, root, split)
