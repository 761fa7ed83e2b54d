"""Dataset adapters for linear probing: each official on-disk layout read into one ``LabeledImages`` interface.

``build_dataset(name, root, split)`` picks the layout registered as ``name`` (:mod:`beyond_cls.data.registry`;
one module per layout in :mod:`beyond_cls.data.layouts`); ``split`` is ``"train"`` or ``"val"`` (``"val"`` = the
set's official test / validation split). Nothing is downloaded; listing a set reads its label files and lists each
image folder once (no per-image stat or open), and images decode lazily via ``load_rgb``.
"""

from __future__ import annotations

from beyond_cls.data.labeled import SPLITS, LabeledImages
from beyond_cls.data.layouts.cars import StanfordCarsCSV, StanfordCarsDevkit, stanford_cars
from beyond_cls.data.layouts.cub import CUB200
from beyond_cls.data.layouts.food101 import Food101
from beyond_cls.data.layouts.imagefolder import image_folder
from beyond_cls.data.layouts.imagenet1pct import ImageNetSubset, imagenet_1pct
from beyond_cls.data.layouts.pets import OxfordPets
from beyond_cls.data.multilabel import NUSWIDE, COCOMultiLabel
from beyond_cls.data.registry import DATASETS, LAYOUTS, build_dataset
from beyond_cls.data.wds import WebDatasetShards

__all__ = [
    "DATASETS",
    "LAYOUTS",
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
