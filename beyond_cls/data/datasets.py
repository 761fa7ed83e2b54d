"""Dataset adapters for linear probing: each official on-disk layout read into one ``LabeledImages`` interface.

``build_dataset(name, root, split)`` picks an adapter from ``DATASETS``; ``split`` is ``"train"`` or ``"val"``
(``"val"`` = the set's official test / validation split). Nothing is downloaded; listing a set reads its label
files and lists each image folder once (no per-image stat or open), and images decode lazily via ``load_rgb``.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path

from beyond_cls.data.cars import DEVKIT_LAYOUT, StanfordCarsDevkit, find_devkit
from beyond_cls.data.folder import DataError, ImageFolderDataset
from beyond_cls.data.labeled import (
    SPLITS,
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
from beyond_cls.data.multilabel import NUSWIDE, COCOMultiLabel
from beyond_cls.data.wds import WebDatasetShards

__all__ = [
    "DATASETS",
    "SPLITS",
    "COCOMultiLabel",
    "CUB200",
    "Food101",
    "ImageNetSubset",
    "LabeledImages",
    "NUSWIDE",
    "OxfordPets",
    "StanfordCarsCSV",
    "StanfordCarsDevkit",
    "WebDatasetShards",
    "build_dataset",
    "image_folder",
    "imagenet_1pct",
    "stanford_cars",
]


def _folder_classes(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _check_missing(ds: LabeledImages, layout: str) -> None:
    missing = find_missing(ds.paths)
    if missing:
        raise missing_error(ds.paths, missing, layout)


def _folder_split(root: Path, folder: str, other: str, transform: Callable | None) -> ImageFolderDataset:
    """ImageFolderDataset of ``root/folder`` whose class folders must match ``root/other`` (if present)."""
    ds = ImageFolderDataset(root, folder, transform)
    if (root / other).is_dir() and (other_classes := _folder_classes(root / other)) != ds.classes:
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
    return _folder_split(Path(root).expanduser(), split, "val" if split == "train" else "train", transform)


class ImageNetSubset(LabeledImages):
    """ImageNet training images named by a list file (lines like ``n01440764_10026.JPEG``, synset = prefix).

    Labels index the sorted synset folders of ``root/train``, as in the full ImageNet.
    """

    def __init__(self, root: str | os.PathLike, subset_file: str | os.PathLike, transform: Callable | None = None):
        root = Path(root).expanduser()
        layout = f"{root}/train/<synset>/<synset>_<n>.JPEG and a list file of such names"
        train = require_dir(root / "train", layout)
        classes = _folder_classes(train)
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
        if _folder_classes(require_dir(root / "train", "root/{train,val}/<synset>/<images>")) != ds.classes:
            raise DataError(f"class folders of {root / 'val'} and {root / 'train'} differ; labels would not agree")
        return ds
    if not subset_file.is_file():
        raise DataError(f"subset list {subset_file} not found; pass subset_file=<path to 1percent.txt>")
    return ImageNetSubset(root, subset_file, transform)


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
        _check_missing(self, layout)


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
        _check_missing(self, layout)


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
        _check_missing(self, layout)


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
        _check_missing(self, _CARS_LAYOUTS)


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
        return _folder_split(folders, "train" if split == "train" else "test",
                             "test" if split == "train" else "train", transform)
    devkit = find_devkit(root)
    if devkit is not None:  # the devkit without this split's annotations: its error names the missing file
        return StanfordCarsDevkit(devkit, split, transform)
    raise DataError(f"no Stanford Cars layout found in {root}; expected " + _CARS_LAYOUTS)


DATASETS: dict[str, Callable[..., LabeledImages | ImageFolderDataset]] = {
    "imagefolder": image_folder,
    "imagenet": image_folder,
    "synthetic": image_folder,
    "imagenet1pct": imagenet_1pct,
    "cub": CUB200,
    "food101": Food101,
    "cars": stanford_cars,
    "pets": OxfordPets,
    "coco": COCOMultiLabel,
    "nuswide": NUSWIDE,
    "wds": WebDatasetShards,
}


def build_dataset(
    name: str, root: str | os.PathLike, split: str, transform: Callable | None = None, **options
) -> LabeledImages | ImageFolderDataset:
    """The ``split`` ("train" or "val") of dataset ``name`` under ``root``; ``options`` go to its adapter."""
    factory = DATASETS.get(name.lower())
    if factory is None:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    check_split(split)
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("root", "split", "transform")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(accepted) or 'none'}")
    return factory(root, split, transform, **options)
