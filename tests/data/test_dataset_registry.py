"""beyond_cls.data.registry: every ``--dataset`` layout registers itself once; build_dataset, DATASETS, the CLI's
choices and help and the table of docs/reference.md come from it, and a new layout is one module (shown with a
tiny one)."""

from __future__ import annotations

import argparse
import pkgutil
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from beyond_cls.cli_args import add_settings
from beyond_cls.config import StreamSettings
from beyond_cls.data import DATASETS, DataError, LabeledImages, build_dataset
from beyond_cls.data import layouts as layouts_package
from beyond_cls.data.labeled import check_split, read_lines
from beyond_cls.data.registry import (
    LAYOUTS,
    METRICS,
    DatasetLayout,
    dataset_names,
    datasets_help,
    datasets_table_markdown,
    register,
)

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
#: the names and their order before the registry (the unknown-name error lists them in this order)
NAMES = ("imagefolder", "imagenet", "synthetic", "imagenet1pct", "cub", "food101", "cars", "pets", "coco", "nuswide",
         "wds")


class ListedImages(LabeledImages):
    """A tiny layout: ``root/<split>.txt`` of ``<file> <class name>`` lines, images beside it."""

    def __init__(self, root, split="train", transform=None, sort_classes: bool = True):
        check_split(split)
        root = Path(root)
        rows = [line.split() for line in read_lines(root / f"{split}.txt", "root/{train,val}.txt")]
        names = [name for _, name in rows]
        classes = sorted(set(names)) if sort_classes else list(dict.fromkeys(names))
        super().__init__([str(root / f) for f, _ in rows], classes, [classes.index(n) for n in names], transform, root,
                         split)


@pytest.fixture
def listed():
    """The tiny layout registered for one test, then taken out again."""
    layout = register(DatasetLayout("listed", "a list file per split", "`train.txt`, `val.txt`", "`train.txt` / "
                                    "`val.txt`", "the names in the list files, sorted", "top1", ListedImages))
    yield layout
    del LAYOUTS["listed"], DATASETS["listed"]


def test_the_names_and_their_order_stay():
    assert dataset_names() == NAMES and tuple(DATASETS) == NAMES and tuple(LAYOUTS) == NAMES
    assert all(DATASETS[name] is LAYOUTS[name].build for name in NAMES)
    with pytest.raises(DataError, match="^unknown dataset 'imagenet21k'; valid names: " + ", ".join(NAMES) + "$"):
        build_dataset("imagenet21k", ".", "train")


def test_every_layout_module_is_imported_by_the_package():
    modules = {m.name for m in pkgutil.iter_modules(layouts_package.__path__)}
    assert {f"{layouts_package.__name__}.{m}" for m in modules} <= set(sys.modules)
    assert modules == {"imagefolder", "synthetic", "imagenet1pct", "cub", "food101", "cars", "pets", "coco", "nuswide",
                       "wds"}
    moved = {name: LAYOUTS[name].build.__module__.rsplit(".", 1)[-1] for name in ("cub", "food101", "pets", "cars")}
    assert moved == {"cub": "cub", "food101": "food101", "pets": "pets", "cars": "cars"}


def test_the_cli_choices_and_help_come_from_the_registry(listed, capsys):
    parser = argparse.ArgumentParser(prog="x")
    add_settings(parser, StreamSettings)
    action = next(a for a in parser._actions if a.dest == "dataset")
    assert tuple(action.choices) == (*NAMES, "listed")
    assert "CUB" in action.choices and "nope" not in action.choices  # any case, as build_dataset reads names
    assert parser.parse_args(["--dataset", "Listed"]).dataset == "Listed"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "imagenet21k"])
    assert "invalid choice: 'imagenet21k'" in capsys.readouterr().err
    assert datasets_help().startswith("dataset layout of --data: imagefolder, imagenet, ")
    assert datasets_help().count("listed") == 1


def test_the_docs_table_is_the_generated_one():
    text = REFERENCE.read_text(encoding="utf-8")
    header = datasets_table_markdown().splitlines()[0]
    assert text.count(header) == 1, "docs/reference.md must have one datasets table"
    assert datasets_table_markdown() in text, "docs/reference.md's datasets table is stale: paste the generated one"
    assert datasets_table_markdown().count("\n") == len(LAYOUTS) + 2


def test_a_new_layout_is_one_registration(listed, tmp_path):
    for i, colour in enumerate(("red", "blue", "red")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
    (tmp_path / "train.txt").write_text("0.png red\n1.png blue\n")
    (tmp_path / "val.txt").write_text("2.png red\n")
    train = build_dataset("LISTED", tmp_path, "train")
    val = build_dataset("listed", tmp_path, "val", sort_classes=False)
    assert train.classes == ["blue", "red"] and train.targets == [1, 0] and len(train) == 2
    assert val.classes == ["red"] and val.targets == [0]
    assert train[0][0].getpixel((0, 0)) == (255, 0, 0) and train[0][1] == 1
    assert "| `listed` | a list file per split | `train.txt`, `val.txt` |" in datasets_table_markdown()
    assert datasets_table_markdown().rstrip().endswith("| top-1/5 |")
    with pytest.raises(DataError, match="^dataset 'listed' has no option.s. year; valid options: sort_classes$"):
        build_dataset("listed", tmp_path, "train", year=2014)
    with pytest.raises(DataError, match="val.txt"):
        (tmp_path / "val.txt").unlink()
        build_dataset("listed", tmp_path, "val")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "cub"}, "'cub' is registered twice"),
        ({"name": "Mixed"}, "lower case"),
        ({"metric": "top5"}, re.escape(f"metric must be one of {sorted(METRICS)}")),
    ],
)
def test_bad_registrations_are_refused(changes, message):
    fields = {"name": "other", "description": "d", "layout": "l", "splits": "s", "classes": "c", "metric": "top1",
              "build": ListedImages, **changes}
    with pytest.raises(ValueError, match=message):
        register(DatasetLayout(**fields))
    assert tuple(LAYOUTS) == NAMES
