"""Datasets, transforms and loaders: the embedded synthetic set, MAE transforms, ImageFolder reading."""

from __future__ import annotations

from beyond_cls.data.folder import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageFolderDataset,
    default_num_workers,
    load_rgb,
    make_loader,
)
from beyond_cls.data.synthetic import (
    CLASS_DESIGNS,
    SyntheticConfig,
    default_cache_dir,
    load_boxes,
    load_manifest,
    make_synthetic_dataset,
    synthetic_root,
)
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "CLASS_DESIGNS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageFolderDataset",
    "SyntheticConfig",
    "default_cache_dir",
    "default_num_workers",
    "eval_transform",
    "load_boxes",
    "load_manifest",
    "load_rgb",
    "make_loader",
    "make_synthetic_dataset",
    "synthetic_root",
    "train_transform",
]
