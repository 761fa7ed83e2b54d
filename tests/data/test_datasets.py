"""beyond_cls.data.datasets: every adapter on a tiny fake copy of its official layout, plus the error cases:
annotation paths that leave the dataset, the official Stanford Cars devkit."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from beyond_cls.data.datasets import (
    DATASETS,
    NUSWIDE,
    COCOMultiLabel,
    LabeledImages,
    StanfordCarsDevkit,
    build_dataset,
)
from beyond_cls.data.folder import DataError, ImageFolderDataset
from beyond_cls.data.synthetic import SyntheticConfig, make_synthetic_dataset


def _color(key: str) -> tuple[int, int, int]:
    """A colour per class name, far enough apart to survive JPEG: the pixels tell which class a file is."""
    h = zlib.crc32(key.encode())
    return (h % 5) * 60, (h // 5 % 5) * 60, (h // 25 % 5) * 60


def _jpg(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), _color(key)).save(path, format="JPEG", quality=95)


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _pixel(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[8, 8])


def _near(a, b, tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ----------------------------------------------------------------------------- fake layouts


def make_imagefolder(root: Path, classes=("cat", "dog", "eel"), per=(2, 1)) -> Path:
    for split, n in zip(("train", "val"), per):
        for c in classes:
            for i in range(n):
                _jpg(root / split / c / f"{c}_{i}.jpg", c)
    return root


def make_imagenet(root: Path) -> Path:
    synsets = ("n01440764", "n01443537", "n01484850")
    for s in synsets:
        for i in range(3):
            _jpg(root / "train" / s / f"{s}_{i}.JPEG", s)
        _jpg(root / "val" / s / f"ILSVRC2012_val_{s}.JPEG", s)
    _write(root / "1percent.txt", ["n01484850_0.JPEG", "n01443537_2.JPEG", "n01484850_1.JPEG"])
    return root


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(parent: Path) -> Path:
    root = parent / "CUB_200_2011"
    # (class id, is_train) per image id 1..7; class 3 has one train image only
    spec = [(1, 1), (1, 0), (2, 1), (2, 1), (2, 0), (3, 1), (1, 1)]
    images, labels, split = [], [], []
    for k, (c, tr) in enumerate(spec, start=1):
        rel = f"{CUB_CLASSES[c - 1]}/img_{k:04d}.jpg"
        _jpg(root / "images" / rel, CUB_CLASSES[c - 1])
        images.append(f"{k} {rel}")
        labels.append(f"{k} {c}")
        split.append(f"{k} {tr}")
    _write(root / "images.txt", images)
    _write(root / "image_class_labels.txt", labels)
    _write(root / "train_test_split.txt", split)
    _write(root / "classes.txt", [f"{i} {c}" for i, c in enumerate(CUB_CLASSES, start=1)])
    return root


FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "waffles"]


def make_food(parent: Path, fmt: str = "json") -> Path:
    root = parent / "food-101"
    meta = {"train": {c: [f"{c}/{100 + i}" for i in range(2)] for c in FOOD_CLASSES},
            "test": {c: [f"{c}/{200}"] for c in FOOD_CLASSES}}
    for split, entries in meta.items():
        for c, names in entries.items():
            for e in names:
                _jpg(root / "images" / f"{e}.jpg", c)
        if fmt == "json":
            (root / "meta").mkdir(parents=True, exist_ok=True)
            (root / "meta" / f"{split}.json").write_text(json.dumps(entries))
        else:
            _write(root / "meta" / f"{split}.txt", [e for names in entries.values() for e in names])
    _write(root / "meta" / "classes.txt", FOOD_CLASSES)
    return root


CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C/V Cargo Van Minivan 2012"]
CAR_TRAIN = [("00001.jpg", 3), ("00002.jpg", 1), ("00003.jpg", 2), ("00004.jpg", 3)]
CAR_TEST = [("00001.jpg", 2), ("00002.jpg", 3), ("00003.jpg", 1)]


def make_cars_kaggle(root: Path, csv: bool = True) -> Path:
    """The Kaggle 'stanford-car-dataset-by-classes-folder': class folders plus headerless CSVs."""
    for which, rows in (("train", CAR_TRAIN), ("test", CAR_TEST)):
        for name, label in rows:
            folder = CAR_NAMES[label - 1].replace("/", "-")
            _jpg(root / "car_data" / "car_data" / which / folder / name, CAR_NAMES[label - 1])
        if csv:
            _write(root / f"anno_{which}.csv", [f"{n},10,20,30,40,{lab}" for n, lab in rows])
    if csv:
        _write(root / "names.csv", CAR_NAMES)
    return root


def make_cars_flat(root: Path) -> Path:
    """Official image tarballs (cars_train/, cars_test/) with the CSV annotations beside them."""
    for which, rows in (("train", CAR_TRAIN), ("test", CAR_TEST)):
        for name, label in rows:
            _jpg(root / f"cars_{which}" / name, CAR_NAMES[label - 1])
        _write(root / f"anno_{which}.csv", [f"{n},1,2,3,4,{lab}" for n, lab in rows])
    _write(root / "names.csv", CAR_NAMES)
    return root


PET_ROWS = {
    "trainval": ["Abyssinian_100 1 1 1", "american_bulldog_12 2 2 1", "Abyssinian_101 1 1 1"],
    "test": ["Abyssinian_7 1 1 1", "american_pit_bull_terrier_3 3 2 2", "american_bulldog_9 2 2 1"],
}


def make_pets(parent: Path) -> Path:
    root = parent / "oxford-iiit-pet"
    for split, rows in PET_ROWS.items():
        for row in rows:
            name = row.split()[0]
            _jpg(root / "images" / f"{name}.jpg", name.rsplit("_", 1)[0])
        _write(root / "annotations" / f"{split}.txt", rows)
    return root


COCO_CATS = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]  # sorted: 1, 3, 18


def make_coco(root: Path, images_subdir: bool = False) -> Path:
    for split, ids in (("train2014", [5, 2, 9]), ("val2014", [4, 7])):
        images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "width": 16, "height": 16} for i in ids]
        anns = {
            "train2014": [(2, 1), (2, 1), (2, 18), (5, 3), (9, 18), (9, 1)],  # image 2: person twice + dog
            "val2014": [(7, 3)],  # image 4: no annotation
        }[split]
        data = {
            "images": images,
            "annotations": [{"id": k, "image_id": i, "category_id": c, "iscrowd": 0} for k, (i, c) in enumerate(anns)],
            "categories": COCO_CATS,
        }
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        for im in images:
            _jpg(root / ("images" if images_subdir else "") / split / im["file_name"], im["file_name"])
    return root


NUS_CONCEPTS = ["animal", "sky", "water"]
NUS_TRAIN = ["actor\\0001_2124494179.jpg", "sky\\0002_33.jpg", "water\\0003_44.jpg", "sky\\0004_55.jpg"]
NUS_TRAIN_LABELS = {"animal": [1, 0, 0, 0], "sky": [0, 1, 1, 0], "water": [1, 0, 1, 0]}
NUS_TEST = ["actor\\0010_1.jpg", "water\\0011_2.jpg"]
NUS_TEST_LABELS = {"animal": [0, 1], "sky": [0, 0], "water": [1, 1]}


def make_nuswide(parent: Path) -> Path:
    root = parent / "NUS-WIDE"
    _write(root / "ConceptsList" / "Concepts81.txt", NUS_CONCEPTS)
    for which, entries, labels in (("Train", NUS_TRAIN, NUS_TRAIN_LABELS), ("Test", NUS_TEST, NUS_TEST_LABELS)):
        # official files are Windows text files
        (root / "ImageList").mkdir(parents=True, exist_ok=True)
        (root / "ImageList" / f"{which}Imagelist.txt").write_bytes("".join(f"{e}\r\n" for e in entries).encode())
        for c, vals in labels.items():
            _write(root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{which}.txt", [f"{v} " for v in vals])
        for e in entries:
            _jpg(root / "Flickr" / e.replace("\\", "/"), e)
    return root


def make_wds(root: Path) -> Path:
    """The ImageFolder case as WebDataset shards (two samples per train shard)."""
    from beyond_cls.data.shard_writer import write_shards

    write_shards(make_imagefolder(root / "folder"), root / "shards", name="t", shard_size=2)
    return root / "shards"


# (name, builder, options, root passed = built root or its parent, train size, val size, classes)
CASES = {
    "imagefolder": (make_imagefolder, {}, False, 6, 3, ["cat", "dog", "eel"]),
    "imagenet": (make_imagefolder, {}, False, 6, 3, ["cat", "dog", "eel"]),
    "synthetic": (make_imagefolder, {}, False, 6, 3, ["cat", "dog", "eel"]),
    "imagenet1pct": (make_imagenet, {}, False, 3, 3, ["n01440764", "n01443537", "n01484850"]),
    "cub": (make_cub, {}, True, 5, 2, CUB_CLASSES),
    "food101": (make_food, {}, True, 6, 3, FOOD_CLASSES),
    "cars": (make_cars_kaggle, {}, False, 4, 3, CAR_NAMES),
    "pets": (make_pets, {}, True, 3, 3, ["Abyssinian", "american_bulldog", "american_pit_bull_terrier"]),
    "coco": (make_coco, {}, False, 3, 2, ["person", "car", "dog"]),
    "nuswide": (make_nuswide, {}, True, 4, 2, NUS_CONCEPTS),
    "wds": (make_wds, {}, False, 6, 3, ["cat", "dog", "eel"]),
}


def _build_case(name: str, tmp_path: Path) -> Path:
    builder, _, parent, *_ = CASES[name]
    built = builder(tmp_path / "data")
    return tmp_path / "data" if parent else built


def test_every_registered_dataset_has_a_case():
    assert sorted(CASES) == sorted(DATASETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interface(name, tmp_path):
    _, options, _, n_train, n_val, classes = CASES[name]
    root = _build_case(name, tmp_path)
    train = build_dataset(name, root, "train", **options)
    val = build_dataset(name, root, "val", transform=lambda im: torch.from_numpy(np.asarray(im).copy()), **options)
    multilabel = name in ("coco", "nuswide")
    for ds, n in ((train, n_train), (val, n_val)):
        assert len(ds) == len(ds.paths) == n
        assert ds.classes == classes and ds.num_classes == len(classes)
        assert ds.multilabel is multilabel
        if name == "wds":  # <shard>/<key>.<ext>: the shard is the file
            assert all(Path(p).parent.is_file() and Path(p).parent.suffix == ".tar" for p in ds.paths)
        else:
            assert all(Path(p).is_file() for p in ds.paths)
        for i in range(len(ds)):
            t = ds.target(i)
            if multilabel:
                assert t.dtype == torch.float32 and t.shape == (len(classes),) and set(t.tolist()) <= {0.0, 1.0}
            else:
                assert type(t) is int and 0 <= t < len(classes)
                # the pixels were painted with the class's colour: label and file agree
                assert _near(_pixel(ds.load(i)), _color(classes[t])), (ds.paths[i], classes[t])
    assert not set(train.paths) & set(val.paths)  # the splits do not share images
    image, target = train[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (16, 16)
    x, y = val[len(val) - 1]
    assert isinstance(x, torch.Tensor) and x.shape == (16, 16, 3) and x.dtype == torch.uint8
    if multilabel:
        torch.testing.assert_close(y, val.target(len(val) - 1))
    else:
        assert y == val.target(len(val) - 1)
    assert [train.paths[i] for i in range(len(train))] == build_dataset(name, root, "train", **options).paths


# ----------------------------------------------------------------------------- per-dataset specifics


def test_imagefolder_interface_and_split_class_mismatch(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    ds = build_dataset("imagenet", root, "train")
    assert isinstance(ds, ImageFolderDataset) and not ds.multilabel
    assert [ds.target(i) for i in range(len(ds))] == ds.targets == [0, 0, 1, 1, 2, 2]
    assert ds.paths == [p for p, _ in ds.samples]
    assert _near(_pixel(ds.load(5)), _color("eel"))
    _jpg(root / "val" / "fox" / "fox_0.jpg", "fox")
    with pytest.raises(DataError, match="fox"):
        build_dataset("imagefolder", root, "train")
    with pytest.raises(DataError, match="fox"):
        build_dataset("imagefolder", root, "val")


def test_imagenet_1pct(tmp_path):
    root = make_imagenet(tmp_path / "in")
    ds = build_dataset("imagenet1pct", root, "train")
    assert [Path(p).name for p in ds.paths] == ["n01484850_0.JPEG", "n01443537_2.JPEG", "n01484850_1.JPEG"]
    assert ds.targets == [2, 1, 2]  # indices of the full ImageNet, not of the synsets listed
    custom = _write(tmp_path / "lists" / "mine.txt", ["n01440764_1.JPEG"])
    assert build_dataset("imagenet1pct", root, "train", subset_file=custom).targets == [0]
    assert len(build_dataset("imagenet1pct", root, "val")) == 3  # the full val set
    _write(custom, ["n01440764_1.JPEG", "n01440764_77.JPEG", "n01443537_78.JPEG"])
    with pytest.raises(DataError, match=r"2 of 3 .*n01440764_77\.JPEG"):
        build_dataset("imagenet1pct", root, "train", subset_file=custom)
    _write(custom, ["n09999999_1.JPEG"])
    with pytest.raises(DataError, match="n09999999"):
        build_dataset("imagenet1pct", root, "train", subset_file=custom)
    (root / "1percent.txt").unlink()
    with pytest.raises(DataError, match=r"1percent\.txt"):
        build_dataset("imagenet1pct", root, "train")


def test_cub(tmp_path):
    root = make_cub(tmp_path)
    for given in (root, tmp_path):
        train = build_dataset("cub", given, "train")
        assert train.targets == [0, 1, 1, 2, 0]
        assert [Path(p).name for p in train.paths] == [f"img_{k:04d}.jpg" for k in (1, 3, 4, 6, 7)]
    assert build_dataset("cub", root, "val").targets == [0, 1]
    (root / "images" / CUB_CLASSES[1] / "img_0004.jpg").unlink()
    with pytest.raises(DataError, match="img_0004.jpg"):
        build_dataset("cub", root, "train")
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match="image_class_labels.txt"):
        build_dataset("cub", root, "val")


@pytest.mark.parametrize("fmt", ["json", "txt"])
def test_food101(fmt, tmp_path):
    root = make_food(tmp_path, fmt)
    for given in (root, tmp_path):
        ds = build_dataset("food101", given, "val")
        assert ds.targets == [0, 1, 2]
        assert [Path(p).relative_to(root).as_posix() for p in ds.paths][1] == "images/baby_back_ribs/200.jpg"
    assert sorted(build_dataset("food101", root, "train").targets) == [0, 0, 1, 1, 2, 2]
    (root / "meta" / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt"):
        build_dataset("food101", root, "train")


def test_cars_layouts(tmp_path):
    kaggle = make_cars_kaggle(tmp_path / "kaggle")
    csv_train = build_dataset("cars", kaggle, "train")
    assert csv_train.classes == CAR_NAMES  # names.csv order = official class ids
    assert csv_train.targets == [2, 0, 1, 2]
    assert "Ram C-V Cargo Van Minivan 2012" in csv_train.paths[0]
    car_folders = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Ram C-V Cargo Van Minivan 2012"]
    assert build_dataset("cars", tmp_path / "kaggle" / "car_data", "val").classes == car_folders  # no CSV here
    flat = build_dataset("cars", make_cars_flat(tmp_path / "flat"), "val")
    assert flat.targets == [1, 2, 0] and [Path(p).parent.name for p in flat.paths] == ["cars_test"] * 3
    folders = build_dataset("cars", make_cars_kaggle(tmp_path / "folders", csv=False), "val")
    assert isinstance(folders, ImageFolderDataset) and folders.classes == car_folders
    assert folders.targets == [0, 1, 2]
    _jpg(tmp_path / "folders" / "car_data" / "car_data" / "train" / "Zz Extra 2020" / "x.jpg", "zz")
    with pytest.raises(DataError, match="Zz Extra 2020"):  # class folders of the two splits must agree
        build_dataset("cars", tmp_path / "folders", "val")
    (tmp_path / "flat" / "cars_train" / "00003.jpg").unlink()
    with pytest.raises(DataError, match="00003.jpg"):
        build_dataset("cars", tmp_path / "flat", "train")
    (tmp_path / "mat" / "devkit").mkdir(parents=True)  # the devkit is read with scipy (test_cars_official_devkit below)
    (tmp_path / "mat" / "devkit" / "cars_meta.mat").write_bytes(b"MATLAB 5.0")
    (tmp_path / "mat" / "devkit" / "cars_train_annos.mat").write_bytes(b"MATLAB 5.0")
    with pytest.raises(DataError, match=r"cannot read MATLAB file .*cars_meta\.mat"):
        build_dataset("cars", tmp_path / "mat", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Stanford Cars layout"):
        build_dataset("cars", tmp_path / "empty", "train")


def test_pets(tmp_path):
    root = make_pets(tmp_path)
    train = build_dataset("pets", root, "train")
    assert train.targets == [0, 1, 0]
    val = build_dataset("pets", tmp_path, "val")
    assert val.targets == [0, 2, 1] and Path(val.paths[1]).name == "american_pit_bull_terrier_3.jpg"
    _write(root / "annotations" / "test.txt", ["Abyssinian_7 1 1 1", "Bengal_3 2 1 2"])
    with pytest.raises(DataError, match="class id 2 names both"):
        build_dataset("pets", root, "train")
    (root / "annotations" / "test.txt").unlink()
    assert build_dataset("pets", root, "train").num_classes == 2  # names come from trainval alone
    with pytest.raises(DataError, match="test.txt"):
        build_dataset("pets", root, "val")


def test_coco(tmp_path):
    root = make_coco(tmp_path / "coco")
    train = build_dataset("coco", tmp_path, "train")  # the parent of coco/ is accepted
    assert isinstance(train, COCOMultiLabel) and train.classes == ["person", "car", "dog"]
    assert [Path(p).name for p in train.paths] == [f"COCO_train2014_{i:012d}.jpg" for i in (2, 5, 9)]
    expected = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    assert torch.stack([train.target(i) for i in range(3)]).tolist() == expected
    val = build_dataset("coco", root, "val")
    assert [val.target(i).tolist() for i in range(2)] == [[0, 0, 0], [0, 1, 0]]  # unlabeled image kept
    dropped = build_dataset("coco", root, "val", drop_unlabeled=True)
    assert len(dropped) == 1 and dropped.paths[0].endswith("000000000007.jpg")
    images = build_dataset("coco", make_coco(tmp_path / "nested", images_subdir=True), "val")
    assert "images/val2014" in Path(images.paths[0]).as_posix()
    Path(train.paths[1]).unlink()
    with pytest.raises(DataError, match="COCO_train2014_000000000005.jpg"):
        build_dataset("coco", root, "train")
    (root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DataError, match="instances_val2014.json"):
        build_dataset("coco", root, "val")


def test_nuswide(tmp_path):
    root = make_nuswide(tmp_path)
    train = build_dataset("nuswide", tmp_path, "train")
    assert isinstance(train, NUSWIDE) and train.classes == NUS_CONCEPTS
    assert Path(train.paths[0]).relative_to(root).as_posix() == "Flickr/actor/0001_2124494179.jpg"
    expected = [[NUS_TRAIN_LABELS[c][i] for c in NUS_CONCEPTS] for i in range(4)]
    assert torch.stack([train.target(i) for i in range(4)]).tolist() == expected
    assert len(build_dataset("nuswide", root, "train", drop_unlabeled=True)) == 3  # image 4 has no concept
    val = build_dataset("nuswide", root, "val")
    assert [val.target(i).tolist() for i in range(2)] == [[0, 0, 1], [1, 0, 1]]
    for gone in ("sky/0002_33.jpg", "sky/0004_55.jpg"):
        (root / "Flickr" / gone).unlink()
    with pytest.raises(DataError, match=r'2 of 4 .*0002_33\.jpg.*missing="skip"'):
        build_dataset("nuswide", root, "train")
    kept = build_dataset("nuswide", root, "train", missing="skip")
    assert [Path(p).name for p in kept.paths] == ["0001_2124494179.jpg", "0003_44.jpg"]
    assert torch.stack([kept.target(i) for i in range(2)]).tolist() == [expected[0], expected[2]]
    with pytest.raises(DataError, match="missing='maybe'"):
        build_dataset("nuswide", root, "train", missing="maybe")
    _write(root / "Groundtruth" / "TrainTestLabels" / "Labels_sky_Test.txt", ["0"])
    with pytest.raises(DataError, match=r"Labels_sky_Test\.txt has 1 labels but .* 2"):
        build_dataset("nuswide", root, "val")
    (root / "Groundtruth" / "TrainTestLabels" / "Labels_water_Train.txt").unlink()
    with pytest.raises(DataError, match=r"Labels_water_Train\.txt"):
        build_dataset("nuswide", root, "train", missing="skip")


# ----------------------------------------------------------------------------- shared errors


def test_build_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet21k'.*cub.*nuswide"):
        build_dataset("imagenet21k", tmp_path, "train")
    with pytest.raises(DataError, match="unknown split 'test'.*train, val"):
        build_dataset("cub", tmp_path, "test")
    with pytest.raises(DataError, match="no option.*subset.*valid options: year, drop_unlabeled"):
        build_dataset("coco", tmp_path, "train", subset="x")


@pytest.mark.parametrize("name", sorted(CASES))
def test_missing_root_names_path_and_layout(name, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        build_dataset(name, missing, "val")
    assert str(missing) in str(err.value) and "expected" in str(err.value).lower()


@pytest.mark.parametrize("name", ["imagefolder", "cub", "pets", "nuswide"])
def test_corrupt_image_raises_naming_file_on_load(name, tmp_path):
    root = _build_case(name, tmp_path)
    ds = build_dataset(name, root, "train")
    victim = Path(ds.paths[1])
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    ds = build_dataset(name, root, "train")  # listing does not open images
    assert isinstance(ds, (LabeledImages, ImageFolderDataset))
    ds.load(0)
    for fetch in (ds.load, ds.__getitem__):
        with pytest.raises(DataError, match=victim.name):
            fetch(1)


def test_synthetic_set_through_registry(tmp_path):
    config = SyntheticConfig(num_classes=3, train_per_class=2, val_per_class=1, image_size=32, object_size=(8, 12))
    root = make_synthetic_dataset(tmp_path / "syn", config)
    ds = build_dataset("synthetic", root, "val")
    assert ds.classes == config.class_names and ds.targets == [0, 1, 2]
    assert ds.load(2).size == (32, 32)


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
PATH_CASES = [(name, kind) for name in sorted(POISONS) for kind in ("climbs", "absolute") if (name, kind) != (
    "food101", "absolute")]


@pytest.mark.parametrize("name, kind", PATH_CASES)
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
