"""Datasets, transforms and loaders: dataset adapters, seeded views (CPU or GPU decoding), the synthetic set."""

from __future__ import annotations

from beyond_cls.data.datasets import DATASETS, LabeledImages, build_dataset
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
from beyond_cls.data.views import ViewBatch, ViewDataset, collate_views

__all__ = [
    "CLASS_DESIGNS",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageFolderDataset",
    "LabeledImages",
    "SyntheticConfig",
    "ViewBatch",
    "ViewDataset",
    "build_dataset",
    "collate_views",
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
