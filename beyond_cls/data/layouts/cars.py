"""``cars``: Stanford Cars as the official devkit, the Kaggle CSV annotations, or class folders."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path

from beyond_cls.data.cars import DEVKIT_LAYOUT, StanfordCarsDevkit, find_devkit
from beyond_cls.data.folder import DataError, ImageFolderDataset
from beyond_cls.data.labeled import LabeledImages, check_split, inside, read_lines, require_file
from beyond_cls.data.layouts.imagefolder import check_missing, folder_split
from beyond_cls.data.registry import DatasetLayout, register

__all__ = ["StanfordCarsCSV", "StanfordCarsDevkit", "stanford_cars"]


_CARS_LAYOUTS = (
    "Stanford Cars as (c) " + DEVKIT_LAYOUT + ", or (a) class folders <root>/{train,test}/<class>/ (also under "
    "car_data/ or car_data/car_data/, as in the Kaggle 'stanford-car-dataset-by-classes-folder'), or (b) CSV "
    "annotations <root>/{anno_train.csv, anno_test.csv, names.csv} (rows '<file>,x1,y1,x2,y2,<class 1..196>'; "
    "one class name per line) with images in <root>/cars_{train,test}/ or in the class folders of (a)"
)


class StanfordCarsCSV(LabeledImages):
    """Stanford Cars from ``anno_{train,test}.csv`` + ``names.csv``; classes in names.csv order (official ids)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        root = Path(root).expanduser()
        which = "train" if split == "train" else "test"
        classes = [",".join(r).strip() for r in csv.reader(read_lines(root / "names.csv", _CARS_LAYOUTS))]
        anno = require_file(root / f"anno_{which}.csv", _CARS_LAYOUTS)
        rows = []
        for i, row in enumerate(csv.reader(read_lines(anno, _CARS_LAYOUTS))):
            if i == 0 and not row[-1].strip().isdigit():
                continue  # a header line
            if len(row) < 2 or not row[-1].strip().isdigit() or not 1 <= int(row[-1]) <= len(classes):
                raise DataError(f"{anno}: bad row {row}; expected '<file>,x1,y1,x2,y2,<class 1..{len(classes)}>'")
            inside(root, row[0].strip(), f"{anno}, row {i + 1}")  # a bare file name: no folder may be named
            rows.append((row[0].strip(), int(row[-1]) - 1))
        flat = root / f"cars_{which}"
        folders = _cars_folder_root(root, need=which)
        if flat.is_dir():
            paths = [str(flat / name) for name, _ in rows]
        elif folders is not None:
            # names.csv spells one class 'Ram C/V Cargo Van Minivan 2012'; its folder is 'Ram C-V ...'
            paths = [str(folders / which / classes[label].replace("/", "-") / name) for name, label in rows]
        else:
            raise DataError(f"no images for {anno}: neither {flat} nor <root>/car_data/car_data/{which}/ exists; "
                            "expected " + _CARS_LAYOUTS)
        super().__init__(paths, classes, [label for _, label in rows], transform, root, split)
        check_missing(self, _CARS_LAYOUTS)


def _cars_folder_root(root: Path, need: str = "train") -> Path | None:
    for candidate in (root, root / "car_data", root / "car_data" / "car_data"):
        if (candidate / need).is_dir() and (candidate / ("test" if need == "train" else "train")).is_dir():
            return candidate
    return None


def stanford_cars(
    root: str | os.PathLike, split: str = "train", transform: Callable | None = None
) -> LabeledImages | ImageFolderDataset:
    """Stanford Cars; accepted layouts, in this order of preference:

    (c) The official release: devkit ``.mat`` files + ``cars_{train,test}/`` (:class:`StanfordCarsDevkit`),
        used when ``cars_meta.mat`` and the split's annotations (``cars_test_annos_withlabels.mat`` for val)
        are there; classes are the official ids in ``cars_meta.mat`` order.
    (b) CSV: ``root/{anno_train.csv, anno_test.csv, names.csv}`` (``root`` or ``root/stanford-car-dataset-by-
        classes-folder``) as in the Kaggle re-distribution: headerless rows ``<file>,x1,y1,x2,y2,<class 1..196>``
        and one class name per line (the official class ids); images in ``root/cars_{train,test}/`` (official
        tarballs) or in the class folders of (a). Classes keep names.csv order.
    (a) Class folders ``{train,test}/<class>/`` under root, ``root/car_data`` or ``root/car_data/car_data``;
        classes are the sorted folder names (so label ids differ from (b)).
    """
    check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; expected {_CARS_LAYOUTS}")
    devkit = find_devkit(root, split)
    if devkit is not None:
        return StanfordCarsDevkit(devkit, split, transform)
    for candidate in (root, root / "stanford-car-dataset-by-classes-folder"):
        if (candidate / "names.csv").is_file() and (candidate / "anno_train.csv").is_file():
            return StanfordCarsCSV(candidate, split, transform)
    folders = _cars_folder_root(root)
    if folders is not None:
        return folder_split(folders, "train" if split == "train" else "test",
                             "test" if split == "train" else "train", transform)
    devkit = find_devkit(root)
    if devkit is not None:  # the devkit without this split's annotations: its error names the missing file
        return StanfordCarsDevkit(devkit, split, transform)
    raise DataError(f"no Stanford Cars layout found in {root}; expected " + _CARS_LAYOUTS)

register(DatasetLayout(
    "cars", "Stanford Cars",
    "the official devkit (`devkit/cars_meta.mat`, `devkit/cars_train_annos.mat`, `cars_test_annos_withlabels.mat`, "
    "`cars_train/`, `cars_test/`), the Kaggle CSV annotations, or class folders",
    "train / test annotations (or folders)",
    "devkit and CSV: `cars_meta.mat` / `names.csv` order (official ids); folders: sorted names", "top1", stanford_cars,
))
