"""Probe loader images/s from WebDataset shards vs from the same ImageFolder, side by side in one run.

CPU decoding (PIL, the probe's train views) in ``WORKERS`` persistent loader workers over the synthetic set
(JPEGs of ``IMAGE_SIZE`` px) and its shards made by ``beyond-cls shard``. Each case records ``images_per_s``;
the shards case also records ``vs_folder``, its images/s over the folder's. Run with
``.venv/bin/python -m pytest benchmarks/bench_loader.py -p no:cacheprovider``.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader

from beyond_cls.data import SyntheticConfig, ViewDataset, build_dataset, collate_views, make_synthetic_dataset
from beyond_cls.data.shard_writer import write_shards

WORKERS = 2
IMAGE_SIZE = 256
CONFIG = SyntheticConfig(num_classes=4, train_per_class=64, val_per_class=1, image_size=IMAGE_SIZE)
_RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    folder = make_synthetic_dataset(tmp_path_factory.mktemp("loader") / "set", CONFIG)
    shards = tmp_path_factory.mktemp("loader") / "shards"
    write_shards(folder, shards, name="bench", shard_size="4MB")
    build_dataset("wds", shards, "train")  # the index is built once, before timing (as on a cluster)
    return {"folder": (folder, "imagefolder"), "wds": (shards, "wds")}


@pytest.mark.parametrize("impl", ["folder", "wds"])
def test_loader_cpu(benchmark, roots, impl):
    root, name = roots[impl]
    views = ViewDataset(build_dataset(name, root, "train"), train=True, img_size=224)
    loader = DataLoader(views, batch_size=64, num_workers=WORKERS, persistent_workers=True,
                        collate_fn=collate_views, sampler=[(i, 0) for i in range(len(views))])

    def epoch() -> int:
        return sum(len(batch) for batch in loader)

    benchmark.group = "loader-cpu"
    start = time.perf_counter()
    images = benchmark.pedantic(epoch, rounds=3, warmup_rounds=1, iterations=1)
    assert images == len(views)
    rate = len(views) / benchmark.stats.stats.mean
    _RATES[impl] = rate
    benchmark.extra_info.update(images=len(views), workers=WORKERS, image_size=IMAGE_SIZE, device="cpu",
                                images_per_s=round(rate, 1), threads=torch.get_num_threads(),
                                wall_s=round(time.perf_counter() - start, 2))
    if impl == "wds" and "folder" in _RATES:
        benchmark.extra_info["vs_folder"] = round(rate / _RATES["folder"], 3)
