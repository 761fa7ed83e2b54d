"""``coco``: COCO instances as 80-way multi-label classification (:class:`COCOMultiLabel`)."""

from __future__ import annotations

from beyond_cls.data.multilabel import COCOMultiLabel
from beyond_cls.data.registry import DatasetLayout, register

register(DatasetLayout(
    "coco", "COCO-2014 (2017 with `year`), multi-label",
    "`annotations/instances_*2014.json`, `train2014/`, `val2014/`", "`train2014` / `val2014`",
    "the category names, in sorted id order", "map", COCOMultiLabel,
))
