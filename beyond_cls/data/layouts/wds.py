"""``wds``: WebDataset shards written by ``beyond-cls shard`` (:class:`WebDatasetShards`)."""

from __future__ import annotations

from beyond_cls.data.registry import DatasetLayout, register
from beyond_cls.data.wds import WebDatasetShards

register(DatasetLayout(
    "wds", "WebDataset shards (cluster-scale reading)",
    "`*-train-*.tar`, `*-validation-*.tar` of `<key>.jpg` (.jpeg/.png/.webp/.bmp) + `<key>.cls`",
    "`-train-` / `-validation-` shards", "the manifest of `shard`, else `classes.txt` if present, else 0..max label",
    "top1", WebDatasetShards,
))
