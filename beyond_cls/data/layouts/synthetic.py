"""``synthetic``: the built-in set of :mod:`beyond_cls.data.synthetic`, an ImageFolder."""

from __future__ import annotations

from beyond_cls.data.layouts.imagefolder import image_folder
from beyond_cls.data.registry import DatasetLayout, register

register(DatasetLayout(
    "synthetic", "the built-in synthetic set (without `--data`: made on demand in the cache)",
    "`train/<class>/*`, `val/<class>/*` + `manifest.json`", "`train/`, `val/`", "the sorted class folder names",
    "top1", image_folder,
))
