"""``--max-images`` takes a seeded random sample (recorded), not the first classes; ``analyze`` seeds random
encoder weights with ``--seed``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from beyond_cls.analysis.analyze import AnalyzeConfig, analyze
from beyond_cls.cli import main
from beyond_cls.data import DataError, SyntheticConfig, build_dataset, load_boxes, make_synthetic_dataset
from beyond_cls.data.sample import sample_images

SIZE = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "4"]
TINY = dict(model="vit_tiny_patch16_224", img_size=32, batch_size=4, num_workers=0, device="cpu", progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    cfg = SyntheticConfig(num_classes=4, train_per_class=1, val_per_class=5, image_size=64, object_size=(12, 20))
    return make_synthetic_dataset(tmp_path_factory.mktemp("sample") / "set", cfg)


def test_the_sample_is_seeded_random_and_spans_the_classes(data):
    ds = build_dataset("imagefolder", data, "val")
    _, indices, sample = sample_images(ds, 8, 0, "val")
    assert len(indices) == 8 and indices == sorted(indices) and len(set(indices)) == 8
    assert len({ds.targets[i] for i in indices}) >= 3  # the first 8 would be classes 0 and 1 only
    assert sample.as_dict() == {"images": 8, "of": 20, "random": True, "seed": 0}
    assert sample_images(ds, 8, 0, "val")[1] == indices and sample_images(ds, 8, 1, "val")[1] != indices
    whole, everything, all_of = sample_images(ds, 50, 3, "val")
    assert whole is ds and everything == list(range(20)) and not all_of.random
    with pytest.raises(DataError, match="^nowhere holds no images$"):
        sample_images([], 5, 0, "nowhere")


def test_analyze_takes_the_recorded_sample_and_seeds_random_weights(data, tmp_path, capsys):
    torch.manual_seed(1)  # the caller's RNG state does not decide the random weights
    a = analyze(AnalyzeConfig(data=str(data), out=str(tmp_path / "a"), max_images=8, **TINY))
    torch.manual_seed(2)
    b = analyze(AnalyzeConfig(data=str(data), out=str(tmp_path / "b"), max_images=8, **TINY))
    assert a.num_images == 8 and a.to_dict() == b.to_dict()
    assert "images: a random sample of 8 of 20 images (--seed 0)" in capsys.readouterr().out
    resolved = json.loads((tmp_path / "a" / "analyze_config.json").read_text())
    assert resolved["sample"] == {"images": 8, "of": 20, "random": True, "seed": 0} and resolved["seed"] == 0
    other = analyze(AnalyzeConfig(data=str(data), out=str(tmp_path / "c"), max_images=8, seed=1, **TINY))
    assert other.to_dict() != a.to_dict()
    # the same statistics as an analysis of exactly the sampled images (and the same --seed weights)
    ds = build_dataset("imagefolder", data, "val")
    _, indices, _ = sample_images(ds, 8, 0, "val")
    copy = tmp_path / "copy"
    for i in indices:
        target = copy / "val" / Path(ds.paths[i]).relative_to(data / "val")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ds.paths[i], target)
    assert analyze(AnalyzeConfig(data=str(copy), out=str(tmp_path / "d"), **TINY)).to_dict() == a.to_dict()


def _voc(data: Path, folder: Path) -> Path:
    """A VOC box file per image stem (the synthetic stems repeat over classes: the boxes only have to exist)."""
    folder.mkdir()
    for rel, (x0, y0, x1, y1) in load_boxes(data, "val").items():  # exclusive x1/y1; VOC corners are inclusive
        (folder / f"{Path(rel).stem}.xml").write_text(
            f"<annotation><size><width>64</width><height>64</height><depth>3</depth></size><object><name>o</name>"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1 - 1}</xmax><ymax>{y1 - 1}</ymax></bndbox>"
            "</object></annotation>")
    return folder


def test_localize_and_aggregations_take_the_sample(data, tmp_path):
    ds = build_dataset("imagefolder", data, "val")
    _, indices, _ = sample_images(ds, 6, 5, "val")
    out = tmp_path / "loc"
    assert main(["localize", "--model", "vit_tiny_patch16_224", "--data", str(data), "--boxes",
                 str(_voc(data, tmp_path / "xml")), "--map", "cls-attn", "--out", str(out), "--max-images", "6",
                 "--seed", "5", "--overlays", "0", *SIZE]) == 0
    results = json.loads((out / "localization.json").read_text())
    assert results["images"] == [ds.paths[i] for i in indices] and results["num_images"] == 6
    assert results["sample"] == {"images": 6, "of": 20, "random": True, "seed": 5}
    out = tmp_path / "agg"
    assert main(["aggregations", "--model", "vit_tiny_patch16_224", "--data", str(data), "--methods", "attn-mean",
                 "--out", str(out), "--max-images", "6", "--seed", "5", *SIZE]) == 0
    results = json.loads((out / "aggregations.json").read_text())
    assert results["num_images"] == 6 and results["sample"] == {"images": 6, "of": 20, "random": True, "seed": 5}
