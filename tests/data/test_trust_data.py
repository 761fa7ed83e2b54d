"""Trust in the data layer: high-bit-depth images, annotation paths, the Stanford Cars devkit, one-line worker
errors, skip counts in the probe's results, and ``--dataset synthetic`` without ``--data``."""

from __future__ import annotations

import csv
import importlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from test_datasets import (
    CAR_NAMES,
    CAR_TEST,
    CAR_TRAIN,
    _jpg,
    make_cars_flat,
    make_coco,
    make_cub,
    make_food,
    make_nuswide,
    make_pets,
)

from beyond_cls.config import ConfigError, load_config
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.data.datasets import StanfordCarsDevkit, build_dataset
from beyond_cls.data.folder import DataError, load_rgb
from beyond_cls.data.gpu_decode import decode_batch, pil_rgb_tensor
from beyond_cls.data.pixels import to_rgb
from beyond_cls.data.views import ViewDataset
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.sampler import EvalBatchSampler
from beyond_cls.probe.streams import make_loader

DECODES = pytest.mark.parametrize("decode", ["cpu", "gpu"], ids=["decode_cpu", "decode_gpu"])


# ----------------------------------------------------------------------------------- 16-bit images
def _ramp16(h: int = 24, w: int = 40) -> np.ndarray:
    """uint16 levels spanning 0..65535 (a PIL convert("RGB") clips all but the darkest to white)."""
    return (np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB / RGBA PNG written from numpy (PIL cannot write one)."""
    h, w, c = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


class _Files:
    """The base-dataset interface ViewDataset reads."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def target(self, i: int) -> int:
        return i

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])


@pytest.fixture(scope="module")
def grey16(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("png16")
    levels = _ramp16()
    little, big = root / "little.png", root / "big.png"
    Image.fromarray(levels).save(little)  # mode I;16
    Image.frombytes("I;16B", levels.shape[::-1], levels.astype(">u2").tobytes()).save(big)
    expected = np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, -1)
    eight = root / "eight.png"
    Image.fromarray(expected[..., 0]).save(eight)
    return {"paths": [str(little), str(big)], "expected": expected, "eight": str(eight)}


def test_16bit_grey_png_decodes_to_its_levels_on_every_path(grey16):
    expected = grey16["expected"]
    for path in grey16["paths"]:
        with Image.open(path) as image:
            assert image.mode.startswith("I;16")
            np.testing.assert_array_equal(pil_rgb_tensor(image).permute(1, 2, 0).numpy(), expected)
        np.testing.assert_array_equal(np.asarray(load_rgb(path)), expected)  # CPU decode
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        (image,), (error,) = decode_batch([data], [path], "cpu")  # decode_jpeg fails, then the PIL fallback
        assert error is None
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


@DECODES
def test_16bit_png_views_equal_the_8bit_image(grey16, decode):
    paths = grey16["paths"] + [grey16["eight"]]
    views = ViewDataset(_Files(paths), train=False, img_size=16, decode=decode)
    batch = make_loader(views, EvalBatchSampler(len(paths), 4), 0, torch.device("cpu")).__iter__().__next__()
    images = batch.images_on("cpu")
    assert torch.equal(images[0], images[2]) and torch.equal(images[1], images[2])


def test_other_high_depth_modes():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(ramp)))[..., 1], np.rint(ramp * 255))  # F 0..1
    wide = Image.fromarray((ramp * 255).astype(np.float32))  # F 0..255
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], np.rint(ramp * 255))
    as_int = Image.fromarray((ramp * 65535).astype(np.int32))  # I holding 16-bit levels (older Pillow's PNG mode)
    assert as_int.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(as_int))[..., 2], (ramp * 65535).astype(np.int32) >> 8)
    signed = Image.fromarray(((ramp - 0.5) * 2e6).astype(np.int32))  # out of 16-bit range: stretched min..max
    grey = np.asarray(to_rgb(signed))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and np.all(np.diff(grey.ravel().astype(int)) >= 0)
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(nan))).max() == 0


def test_16bit_rgba_png_keeps_the_top_byte(tmp_path):
    levels = _ramp16(8, 8)
    pixels = np.stack([levels, 65535 - levels, levels // 3, np.full_like(levels, 65535)], -1)
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png16_rgb(pixels))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), (pixels[..., :3] >> 8).astype(np.uint8))
    path.write_bytes(_png16_rgb(pixels[..., :3]))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), (pixels[..., :3] >> 8).astype(np.uint8))


# ----------------------------------------------------------------------------------- annotation paths
def _poison_cub(parent: Path, entry: str) -> tuple[Path, str]:
    root = make_cub(parent)
    lines = (root / "images.txt").read_text().splitlines()
    (root / "images.txt").write_text("\n".join([f"1 {entry}", *lines[1:]]) + "\n")
    return parent, r"images\.txt, image id 1"


def _poison_coco(parent: Path, entry: str) -> tuple[Path, str]:
    root = make_coco(parent / "coco")
    ann = root / "annotations" / "instances_train2014.json"
    data = json.loads(ann.read_text())
    data["images"][0]["file_name"] = entry
    ann.write_text(json.dumps(data))
    return root, rf"instances_train2014\.json, image id {data['images'][0]['id']}"


def _poison_nuswide(parent: Path, entry: str) -> tuple[Path, str]:
    root = make_nuswide(parent)
    path = root / "ImageList" / "TrainImagelist.txt"
    lines = path.read_bytes().decode().splitlines()
    path.write_bytes("".join(f"{e}\r\n" for e in [lines[0], entry.replace("/", "\\"), *lines[2:]]).encode())
    return parent, r"TrainImagelist\.txt, entry 2"


def _poison_food(parent: Path, entry: str) -> tuple[Path, str]:
    root = make_food(parent)
    meta = root / "meta" / "train.json"
    data = json.loads(meta.read_text())
    data["apple_pie"][0] = "apple_pie/" + entry.removesuffix(".jpg")
    meta.write_text(json.dumps(data))
    return parent, r"train\.json/\.txt, entry"


def _poison_pets(parent: Path, entry: str) -> tuple[Path, str]:
    root = make_pets(parent)
    path = root / "annotations" / "trainval.txt"
    path.write_text(path.read_text() + f"{entry.removesuffix('.jpg')}_1 4 1 1\n")
    return parent, r"trainval\.txt, line"


def _poison_cars(parent: Path, entry: str) -> tuple[Path, str]:
    root = make_cars_flat(parent / "cars")
    path = root / "anno_train.csv"
    path.write_text(path.read_text() + f"{entry},1,2,3,4,1\n")
    return root, r"anno_train\.csv, row 5"


POISONS = {"cub": _poison_cub, "coco": _poison_coco, "nuswide": _poison_nuswide, "food101": _poison_food,
           "pets": _poison_pets, "cars": _poison_cars}


# food101 entries start with their class folder, so cannot be absolute; NUS-WIDE drops a leading '/' (its lists
# hold Windows paths), so its absolute case is a drive letter
CASES = [(name, kind) for name in sorted(POISONS) for kind in ("climbs", "absolute") if (name, kind) != (
    "food101", "absolute")]


@pytest.mark.parametrize("name, kind", CASES)
def test_annotation_paths_must_stay_inside_the_dataset(name, kind, tmp_path):
    outside = tmp_path / "outside" / "secret.jpg"  # exists: without the check most adapters read it silently
    _jpg(outside, "secret")
    data = tmp_path / "data"
    data.mkdir()
    if kind == "absolute":
        entry = "D:/other/secret.jpg" if name == "nuswide" else str(outside)
    else:
        entry = "../" * 12 + outside.relative_to(outside.anchor).as_posix()
    root, where = POISONS[name](data, entry)
    with pytest.raises(DataError, match=rf"{where}.*leaves the dataset folder") as info:
        build_dataset(name, root, "train")
    assert len(str(info.value).splitlines()) == 1


def test_windows_drive_and_inner_dotdot(tmp_path):
    root, where = _poison_cub(tmp_path, "C:\\ImageData\\x.jpg")
    with pytest.raises(DataError, match=rf"{where}: image path 'C:"):
        build_dataset("cub", root, "train")
    root = make_cub(tmp_path / "ok")
    lines = (root / "images.txt").read_text().splitlines()
    first = lines[0].split()[1]
    (root / "images.txt").write_text("\n".join([f"1 {first.split('/')[0]}/../{first}", *lines[1:]]) + "\n")
    assert len(build_dataset("cub", root, "train")) == 5  # '..' that stays inside is fine


# ----------------------------------------------------------------------------------- Stanford Cars devkit
def _annotations(rows: list[tuple[str, int]]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    table = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for k, (name, label) in enumerate(rows):
        box = [np.array([[v]], dtype=np.uint16) for v in (5, 6, 70 + k, 80)]
        table[0, k] = (*box, np.array([[label]], dtype=np.uint8), np.array([name]))
    return table


def make_cars_devkit(root: Path, test_labels: bool = True, nested: bool = False) -> Path:
    """The official release: car_devkit.tgz's devkit/, cars_{train,test}/ and the labelled test annotations."""
    names = np.empty((1, len(CAR_NAMES)), dtype=object)
    names[0, :] = CAR_NAMES
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(CAR_TRAIN)})
    unlabeled = [(n, 0) for n, _ in CAR_TEST]
    scipy.io.savemat(root / "devkit" / "cars_test_annos.mat", {"annotations": _annotations(unlabeled)})
    if test_labels:
        scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _annotations(CAR_TEST)})
    for which, rows in (("train", CAR_TRAIN), ("test", CAR_TEST)):
        for name, label in rows:
            folder = root / f"cars_{which}" / (f"cars_{which}" if nested else "")
            _jpg(folder / name, CAR_NAMES[label - 1])
    return root


def test_cars_official_devkit(tmp_path):
    root = make_cars_devkit(tmp_path / "stanford_cars")
    for given in (root, tmp_path):  # the folder itself or its parent (torchvision's layout)
        train = build_dataset("cars", given, "train")
        assert isinstance(train, StanfordCarsDevkit)
        assert train.classes == CAR_NAMES and train.targets == [label - 1 for _, label in CAR_TRAIN]
        assert [Path(p).relative_to(root).as_posix() for p in train.paths] == [f"cars_train/{n}" for n, _ in CAR_TRAIN]
    val = build_dataset("cars", root, "val")
    assert val.targets == [label - 1 for _, label in CAR_TEST] and Path(val.paths[0]).parent.name == "cars_test"
    nested = build_dataset("cars", make_cars_devkit(tmp_path / "kaggle", nested=True), "train")
    assert Path(nested.paths[0]).parent.as_posix().endswith("cars_train/cars_train")


def test_cars_devkit_errors_name_the_file(tmp_path):
    root = make_cars_devkit(tmp_path / "nolabels", test_labels=False)
    assert len(build_dataset("cars", root, "train")) == len(CAR_TRAIN)
    with pytest.raises(DataError, match=r"cars_test_annos_withlabels\.mat not found.*has no labels"):
        build_dataset("cars", root, "val")
    root = make_cars_devkit(tmp_path / "badclass")
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations([("00001.jpg", 9)])})
    with pytest.raises(DataError, match=r"cars_train_annos\.mat: annotation 1 \(00001\.jpg\) has class 9"):
        build_dataset("cars", root, "train")
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations([("../../x.jpg", 1)])})
    with pytest.raises(DataError, match=r"cars_train_annos\.mat, annotation 1: image path '\.\./\.\./x\.jpg' leaves"):
        build_dataset("cars", root, "train")
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"labels": np.zeros(3)})
    with pytest.raises(DataError, match=r"cars_train_annos\.mat has no variable 'annotations' \(found labels\)"):
        build_dataset("cars", root, "train")
    (root / "devkit" / "cars_meta.mat").write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(DataError, match=r"cannot read MATLAB file .*cars_meta\.mat"):
        build_dataset("cars", root, "train")
    (root / "cars_test" / CAR_TEST[0][0]).unlink()
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(CAR_NAMES, dtype=object)})
    with pytest.raises(DataError, match=rf"1 of 3 listed images are missing, first .*{CAR_TEST[0][0]}"):
        build_dataset("cars", root, "val")


# ----------------------------------------------------------------------------------- worker errors
def test_worker_error_is_one_line_naming_the_file(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    _jpg(good, "good")
    bad.write_bytes(b"not an image at all" * 8)
    views = ViewDataset(_Files([str(good), str(bad)]), train=False, img_size=16)
    loader = make_loader(views, EvalBatchSampler(2, 2), 1, torch.device("cpu"))
    with pytest.raises(DataError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message, message


# ----------------------------------------------------------------------------------- probe: skips, synthetic
TINY = dict(model="vit_tiny_patch16_224", img_size=32, epochs=2, warmup_epochs=1, batch_size=4, effective_batch=8,
            num_workers=0, progress=False, heads="mean", device="cpu")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    cfg = SyntheticConfig(num_classes=3, train_per_class=8, val_per_class=4, image_size=64, object_size=(12, 20))
    return make_synthetic_dataset(tmp_path_factory.mktemp("trust") / "set", cfg)


def test_skipped_images_are_counted_in_results_and_summary(small_set, tmp_path, capsys):
    from beyond_cls.probe import run

    data = tmp_path / "set"
    shutil.copytree(small_set, data)
    for split in ("train", "val"):
        victim = sorted((data / split).rglob("*.jpg"))[1]
        victim.write_bytes(b"broken" * 10)
    results = run(dict(TINY, data=str(data), out=str(tmp_path / "out"), skip_bad_images=True))
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
    again = run(dict(TINY, data=str(data), out=str(tmp_path / "out"), skip_bad_images=True))  # a finished run
    assert again["rows"][0]["eval_skipped"] == 1 and again["rows"][0]["train_skipped"] == 2


def test_synthetic_dataset_needs_no_data(small_set, tmp_path, monkeypatch):
    run_module = importlib.import_module("beyond_cls.probe.run")  # the package exports run(), the function

    cfg = load_config(ProbeConfig, None, model="m", out=str(tmp_path), dataset="synthetic")
    assert cfg.data is None
    with pytest.raises(ConfigError, match="--data is required for --dataset cub"):
        load_config(ProbeConfig, None, model="m", out=str(tmp_path), dataset="cub")
    made = []
    monkeypatch.setattr(run_module, "make_synthetic_dataset", lambda: made.append(1) or small_set)
    results = run_module.run(dict(TINY, dataset="synthetic", out=str(tmp_path / "out"), epochs=2))
    assert made and results["config"]["data"] == str(small_set) and 0 <= results["rows"][0]["top1"] <= 100


