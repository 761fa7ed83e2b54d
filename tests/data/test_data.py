"""beyond_cls.data: synthetic set (determinism, cache, atomicity, content), transforms, folders, loaders; skipped
images counted in the probe's results, and ``--dataset synthetic`` without ``--data``."""

from __future__ import annotations

import csv
import importlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import SequentialSampler

from beyond_cls.config import ConfigError, load_config
from beyond_cls.data import (
    CLASS_DESIGNS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageFolderDataset,
    SyntheticConfig,
    default_cache_dir,
    eval_transform,
    load_boxes,
    load_manifest,
    make_loader,
    make_synthetic_dataset,
    synthetic,
    synthetic_root,
    train_transform,
)
from beyond_cls.probe.config import ProbeConfig
from tests.tiny_probe import TINY, TINY_SET

SMALL = SyntheticConfig(
    num_classes=3, train_per_class=3, val_per_class=2, image_size=64, object_size=(12, 20)
)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "small", SMALL)


# ----------------------------------------------------------------------------- synthetic set


def test_default_set_layout_boxes_and_speed(tmp_path):
    config = SyntheticConfig()
    start = time.perf_counter()
    root = make_synthetic_dataset(tmp_path / "default", config)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"default set took {elapsed:.1f} s"
    assert config.num_classes > 5  # top-5 accuracy on the default (demo) set is not trivially 100 %
    for split, per_class in (("train", config.train_per_class), ("val", config.val_per_class)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [name for name, _, _ in CLASS_DESIGNS[: config.num_classes]]
        for name in classes:
            assert len(list((root / split / name).glob("*.jpg"))) == per_class
    manifest = load_manifest(root)
    assert manifest["config"] == config.to_dict()
    assert len(manifest["images"]) == config.num_classes * (config.train_per_class + config.val_per_class)
    sides = set()
    for rec in manifest["images"]:
        x0, y0, x1, y1 = rec["box"]
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
        assert 32 <= x1 - x0 <= 48 and x1 - x0 == y1 - y0
        sides.add(x1 - x0)
        with Image.open(root / rec["path"]) as img:
            assert img.size == (224, 224) and img.format == "JPEG"
    assert len(sides) > 5  # sizes really vary over the range
    # positions spread over the whole image, not clustered
    centers = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b in load_boxes(root).values()])
    assert centers.min() < 60 and centers.max() > 164


def test_deterministic_across_roots_and_order(tmp_path, monkeypatch):
    a = make_synthetic_dataset(tmp_path / "a", SMALL)
    # generation order must not matter: each image is seeded from (seed, split, class, index)
    monkeypatch.setattr(synthetic, "_records", lambda cfg, orig=synthetic._records: reversed(list(orig(cfg))))
    b = make_synthetic_dataset(tmp_path / "b", SMALL)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 3 * 5 + 1
    assert fa == fb
    # images differ from one another (no accidental reuse of one seed)
    jpgs = [v for k, v in fa.items() if k.endswith(".jpg")]
    assert len(set(jpgs)) == len(jpgs)


def test_cached_second_call_does_not_rewrite(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "s", SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def boom(*args, **kwargs):
        raise AssertionError("regenerated a cached set")

    monkeypatch.setattr(synthetic, "render_image", boom)
    time.sleep(0.01)
    assert make_synthetic_dataset(root, SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_missing_file_triggers_regeneration(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", SMALL)
    victim = root / load_manifest(root)["images"][4]["path"]
    original = victim.read_bytes()
    victim.unlink()
    make_synthetic_dataset(root, SMALL)
    assert victim.read_bytes() == original


def test_different_config_regenerates_cleanly(tmp_path):
    root = make_synthetic_dataset(tmp_path / "s", SMALL)
    old = _files(root)
    other = SyntheticConfig(num_classes=2, train_per_class=3, val_per_class=2, image_size=64,
                            object_size=(12, 20), seed=1)
    make_synthetic_dataset(root, other)
    new = _files(root)
    assert load_manifest(root)["config"] == other.to_dict()
    assert not (root / "train" / CLASS_DESIGNS[2][0]).exists()  # no stale class folder left behind
    assert len(new) == 2 * 5 + 1
    shared = [k for k in new if k.endswith(".jpg") and k in old]
    assert shared and all(new[k] != old[k] for k in shared)  # new seed, new pixels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp folders left


def _failing_writer(monkeypatch, after: int) -> None:
    calls = {"n": 0}
    real = synthetic._write_file

    def writer(path, data):
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("simulated crash")
        real(path, data)

    monkeypatch.setattr(synthetic, "_write_file", writer)


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    _failing_writer(monkeypatch, after=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_synthetic_dataset(tmp_path / "s", SMALL)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    root = make_synthetic_dataset(tmp_path / "s", SMALL)
    assert len(load_manifest(root)["images"]) == 15


def test_interrupted_regeneration_keeps_previous_complete_set(tmp_path, monkeypatch):
    root = make_synthetic_dataset(tmp_path / "s", SMALL)
    old = _files(root)
    _failing_writer(monkeypatch, after=2)
    with pytest.raises(RuntimeError):
        make_synthetic_dataset(root, SyntheticConfig(num_classes=2, image_size=64, object_size=(12, 20)))
    assert _files(root) == old  # still the old, complete set; the new config's set does not exist
    assert load_manifest(root)["config"] == SMALL.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        make_synthetic_dataset(tmp_path / "mine", SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_object_is_really_in_its_box():
    config = SyntheticConfig(num_classes=len(CLASS_DESIGNS))
    for k in range(len(CLASS_DESIGNS)):
        for i in range(3):
            img, box = synthetic.render_image(config, "val", k, i)
            bare, box2 = synthetic.render_image(config, "val", k, i, draw_object=False)
            assert box == box2
            x0, y0, x1, y1 = box
            diff = np.abs(img.astype(np.int32) - bare.astype(np.int32)).sum(-1)
            inside = np.zeros(diff.shape, dtype=bool)
            inside[y0:y1, x0:x1] = True
            assert diff[~inside].max() == 0  # the object touches only its box
            # the changed pixels have the class's shape
            changed = diff[y0:y1, x0:x1] > 20
            shape = synthetic.render_object(k, x1 - x0) > 0.25  # primary (1) or secondary (0.5) fill
            iou = (changed & shape).sum() / (changed | shape).sum()
            assert iou > 0.8, (CLASS_DESIGNS[k][0], i, iou)


def test_object_visible_after_jpeg(small_set):
    for rec in load_manifest(small_set)["images"][:8]:
        split, label, name = rec["split"], rec["label"], Path(rec["path"]).stem
        with Image.open(small_set / rec["path"]) as f:
            img = np.asarray(f.convert("RGB"), dtype=np.float32)
        bare, _ = synthetic.render_image(SMALL, split, label, int(name), draw_object=False)
        diff = np.abs(img - bare).mean(-1)
        x0, y0, x1, y1 = rec["box"]
        inside = np.zeros(diff.shape, dtype=bool)
        inside[y0:y1, x0:x1] = True
        assert diff[inside].mean() > 20 and diff[inside].mean() > 4 * diff[~inside].mean()


def test_class_designs_differ():
    assert len(CLASS_DESIGNS) >= 8
    assert len({name for name, _, _ in CLASS_DESIGNS}) == len({(s, f) for _, s, f in CLASS_DESIGNS})
    pics = [synthetic.render_object(k, 40) for k in range(len(CLASS_DESIGNS))]
    for a in range(len(pics)):
        for b in range(a + 1, len(pics)):
            assert np.abs(pics[a] - pics[b]).mean() > 0.05, (CLASS_DESIGNS[a][0], CLASS_DESIGNS[b][0])


def test_colour_statistics_do_not_reveal_class():
    # mean image colour per class should be about the same: the label lives in the shape only
    config = SyntheticConfig(num_classes=4)
    means = np.array(
        [[synthetic.render_image(config, "train", k, i)[0].mean((0, 1)) for i in range(12)] for k in range(4)]
    )
    class_means = means.mean(1)  # [classes, 3]
    spread = class_means.max(0) - class_means.min(0)
    within = means.std(1).mean(0)
    assert np.all(spread < within), (spread, within)


def test_config_validation_and_cache_dir(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticConfig(num_classes=len(CLASS_DESIGNS) + 1)
    with pytest.raises(ValueError, match="object_size"):
        SyntheticConfig(image_size=32, object_size=(32, 48))
    assert SyntheticConfig(object_size=[32, 40]).object_size == (32, 40)
    monkeypatch.setenv("BEYOND_CLS_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    assert synthetic_root(SMALL).parent == tmp_path / "cache"
    assert synthetic_root(SMALL).name.startswith("synthetic-")
    assert synthetic_root(SMALL) != synthetic_root(SyntheticConfig(seed=1))
    assert make_synthetic_dataset(config=SMALL) == synthetic_root(SMALL)
    assert (synthetic_root(SMALL) / "manifest.json").is_file()
    monkeypatch.delenv("BEYOND_CLS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "beyond_cls"


# ----------------------------------------------------------------------------- transforms


def test_eval_transform_shapes_and_normalization():
    mean_rgb = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)
    img = Image.new("RGB", (300, 200), mean_rgb)
    out = eval_transform()(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert out.abs().max() < 0.02  # the mean colour maps to ~0
    white = eval_transform()(Image.new("RGB", (256, 256), (255, 255, 255)))
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    torch.testing.assert_close(white[:, 100, 100], expected, atol=1e-3, rtol=0)
    assert eval_transform(img_size=160)(img).shape == (3, 160, 160)
    resize = eval_transform().transforms[0]
    assert resize.size == 256 and resize.interpolation.value == "bicubic"


def test_eval_transform_center_crop_keeps_center():
    arr = np.zeros((256, 256, 3), dtype=np.uint8)
    arr[:, :128] = 255  # left half white: the crop's left half must be bright, right half dark
    out = eval_transform()(Image.fromarray(arr))
    assert out[:, :, :100].mean() > 1.0 and out[:, :, -100:].mean() < -1.0


def test_train_transform_random_and_shaped():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(180, 240, 3), dtype=np.uint8))
    tf = train_transform(img_size=96)
    torch.manual_seed(1)
    a = tf(img)
    b = tf(img)
    assert a.shape == b.shape == (3, 96, 96)
    assert not torch.equal(a, b)
    torch.manual_seed(1)
    assert torch.equal(tf(img), a)  # randomness comes from torch's RNG
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["MAERandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]  # MAE's crop
    names = [type(t).__name__ for t in train_transform(img_size=96, crop="torchvision").transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    with pytest.raises(ValueError, match="crop"):
        train_transform(crop="tf")


# ----------------------------------------------------------------------------- folders and loaders


def test_image_folder_on_synthetic(small_set):
    ds = ImageFolderDataset(small_set, "train", transform=eval_transform(img_size=64, crop_pct=1.0))
    assert ds.classes == SMALL.class_names
    assert len(ds) == 3 * 3
    labels = {rec["path"]: rec["label"] for rec in load_manifest(small_set)["images"]}
    for i, (path, label) in enumerate(ds.samples):
        assert labels[Path(path).relative_to(small_set).as_posix()] == label
        x, y = ds[i]
        assert y == label and x.shape == (3, 64, 64)
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    val = ImageFolderDataset(small_set, "val")
    img, label = val[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 1


def test_image_folder_extensions(tmp_path):
    for cls in ("b", "a"):
        (tmp_path / "val" / cls / "sub").mkdir(parents=True)
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "val" / cls / "x.PNG")
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / cls / "sub" / "y.JpEg", format="JPEG")
        Image.new("L", (8, 8)).save(tmp_path / "val" / cls / "z.bmp")
        (tmp_path / "val" / cls / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["a", "b"]
    assert len(ds) == 6
    assert {Path(p).suffix for p, _ in ds.samples} == {".PNG", ".JpEg", ".bmp"}
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))


def test_missing_dirs_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        ImageFolderDataset(missing, "val")
    assert str(missing) in str(err.value) and "expected" in str(err.value) and "val/<class>" in str(err.value)
    (tmp_path / "ds" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="split folder .*val.* does not exist"):
        ImageFolderDataset(tmp_path / "ds", "val")
    with pytest.raises(DataError, match="no class folders"):
        ImageFolderDataset(tmp_path / "ds", "train")
    (tmp_path / "ds" / "train" / "cat").mkdir()
    with pytest.raises(DataError, match="no images in class folder.*cat"):
        ImageFolderDataset(tmp_path / "ds", "train")
    assert issubclass(DataError, ValueError)


def _set_with_corrupt_file(root: Path) -> Path:
    (root / "val" / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "val" / "a" / "good.jpg")
    (root / "val" / "a" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    good = (root / "val" / "a" / "good.jpg").read_bytes()
    (root / "val" / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_corrupt_image_names_the_file(tmp_path):
    ds = ImageFolderDataset(_set_with_corrupt_file(tmp_path))  # listing works; decoding fails per item
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["broken.jpg", "good.jpg", "truncated.jpg"]
    assert ds[1][1] == 0
    for i in (0, 2):
        with pytest.raises(DataError) as err:
            ds[i]
        assert names[i] in str(err.value)


def test_make_loader_batches(small_set):
    ds = ImageFolderDataset(small_set, "train", transform=eval_transform(img_size=32, crop_pct=1.0))
    loader = make_loader(ds, batch_size=4, num_workers=0)
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (1, 3, 32, 32)]
    assert torch.cat([b[1] for b in batches]).tolist() == ds.targets
    assert loader.pin_memory == torch.cuda.is_available()
    assert len(make_loader(ds, batch_size=4, num_workers=0, drop_last=True)) == 2
    shuffled = make_loader(ds, batch_size=9, num_workers=0, shuffle=True)
    assert sorted(next(iter(shuffled))[1].tolist()) == sorted(ds.targets)
    with pytest.raises(ValueError, match="sampler"):
        make_loader(ds, batch_size=4, num_workers=0, shuffle=True, sampler=SequentialSampler(ds))


def test_make_loader_workers_propagate_data_error(tmp_path):
    ds = ImageFolderDataset(_set_with_corrupt_file(tmp_path), transform=eval_transform(img_size=16))
    loader = make_loader(ds, batch_size=1, num_workers=1)
    assert loader.persistent_workers and loader.num_workers == 1
    with pytest.raises(DataError, match="broken.jpg"):
        list(loader)


def test_manifest_is_json_with_boxes(small_set):
    data = json.loads((small_set / "manifest.json").read_text())
    assert data["classes"] == SMALL.class_names
    boxes = load_boxes(small_set, split="val")
    assert len(boxes) == 3 * 2 and all(k.startswith("val/") for k in boxes)
    for x0, y0, x1, y1 in boxes.values():
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 12 <= x1 - x0 <= 20


# ----------------------------------------------------------------------------- the probe: skips, synthetic
# the shared tiny probe with one head and one learning rate: one results row
PROBE = dict(TINY, epochs=2, heads="mean", lrs=None)


@pytest.fixture(scope="module")
def probe_set(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("trust") / "set", TINY_SET)


def test_skipped_images_are_counted_in_results_and_summary(probe_set, tmp_path, capsys):
    from beyond_cls.probe import run

    data = tmp_path / "set"
    shutil.copytree(probe_set, data)
    for split in ("train", "val"):
        victim = sorted((data / split).rglob("*.jpg"))[1]
        victim.write_bytes(b"broken" * 10)
    results = run(dict(PROBE, data=str(data), out=str(tmp_path / "out"), skip_bad_images=True))
    (row,) = results["rows"]
    assert (row["eval_images"], row["eval_skipped"], row["train_skipped"]) == (11, 1, 2)  # one bad image x 2 epochs
    assert results["images"] == {"0": {"train_skipped": 2, "eval_images": 11, "eval_skipped": 1}}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["rows"][0]["eval_skipped"] == 1
    with open(tmp_path / "out" / "results.csv") as f:
        (line,) = list(csv.DictReader(f))
    assert (line["eval_images"], line["eval_skipped"], line["train_skipped"]) == ("11", "1", "2")
    printed = capsys.readouterr().out
    assert "images: 11 evaluated, 1 skipped; 2 skipped in training (all epochs)" in printed
    again = run(dict(PROBE, data=str(data), out=str(tmp_path / "out"), skip_bad_images=True))  # a finished run
    assert again["rows"][0]["eval_skipped"] == 1 and again["rows"][0]["train_skipped"] == 2


def test_synthetic_dataset_needs_no_data(probe_set, tmp_path, monkeypatch):
    run_module = importlib.import_module("beyond_cls.probe.run")  # the package exports run(), the function

    cfg = load_config(ProbeConfig, None, model="m", out=str(tmp_path), dataset="synthetic")
    assert cfg.data is None
    with pytest.raises(ConfigError, match="--data is required for --dataset cub"):
        load_config(ProbeConfig, None, model="m", out=str(tmp_path), dataset="cub")
    made = []
    monkeypatch.setattr(run_module, "make_synthetic_dataset", lambda: made.append(1) or probe_set)
    results = run_module.run(dict(PROBE, dataset="synthetic", out=str(tmp_path / "out"), epochs=2))
    assert made and results["config"]["data"] == str(probe_set) and 0 <= results["rows"][0]["top1"] <= 100
