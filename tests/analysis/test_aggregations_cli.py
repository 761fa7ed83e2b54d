"""``beyond-cls aggregations`` and ``beyond-cls localize`` end to end on the synthetic set (CPU, random weights)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from beyond_cls.cli import main
from tests.tiny_probe import trained_probe

SIZE = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return trained_probe(tmp_path_factory.mktemp("agg"), "abmilp", boxes=True)


def test_aggregations_end_to_end(setup, tmp_path):
    data, run, _ = setup
    methods = f"attn-mean,attn-minent,attn-center,abmilp:{run},guide:vit_tiny_patch16_224"
    out = tmp_path / "agg"
    code = main(["aggregations", "--model", "vit_tiny_patch16_224", "--data", str(data), "--methods", methods,
                 "--out", str(out), "--max-images", "7", *SIZE])
    assert code == 0
    results = json.loads((out / "aggregations.json").read_text())
    names = methods.split(",")
    assert [r["method"] for r in results["methods"]] == names
    assert results["num_images"] == 7 and results["num_patches"] == 4
    for r in results["methods"]:
        assert 0.0 <= r["entropy"] <= math.log(4) + 1e-9 and r["max_entropy"] == pytest.approx(math.log(4))
    assert results["kl"]["attn-mean"]["attn-mean"] == 0.0
    assert all(results["kl"][p][q] >= 0 for p in names for q in names)
    with open(out / "kl.csv") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == names and [row[0] for row in table[1:]] == names
    with open(out / "aggregations.csv") as f:
        assert [row["method"] for row in csv.DictReader(f)] == names
    for png in ("kl.png", "examples.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100


def test_localize_end_to_end(setup, tmp_path):
    data, run, xml = setup
    out = tmp_path / "loc"
    code = main(["localize", "--model", "vit_tiny_patch16_224", "--data", str(data), "--boxes", str(xml),
                 "--map", "cls-attn", "--map", f"abmilp:{run}", "--out", str(out), "--overlays", "2", *SIZE])
    assert code == 0
    results = json.loads((out / "localization.json").read_text())
    assert results["num_images"] == 12 and len(results["images"]) == 12 and results["image_size"] == [32, 32]
    assert set(results["maps"]) == {"cls-attn", f"abmilp:{run}"}
    for score in results["maps"].values():
        assert 0.0 <= score["maxboxacc_v2"] <= 100.0  # %
        assert set(score["maxboxacc"]) == set(score["best_threshold"]) == {"0.3", "0.5", "0.7"}
        assert score["maxboxacc_v2"] == pytest.approx(sum(score["maxboxacc"].values()) / 3)
    assert len(results["overlays"]) == 2 * 3
    for path in results["overlays"]:
        with Image.open(path) as im:  # a titled figure with a legend of the boxes around the 32 x 32 image
            assert im.size[0] > 100 and im.size[1] > 100
    assert results["heads"][f"abmilp:{run}"]["head"] == "abmilp@blr0p1"


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys):
    data, run, xml = setup
    base = ["--model", "vit_tiny_patch16_224", "--data", str(data), "--out", str(tmp_path / "x"), *SIZE]
    _one_line_error(capsys, ["aggregations", *base, "--methods", "attn-mean,attn-max"], "unknown aggregation method")
    _one_line_error(capsys, ["aggregations", *base, "--methods", f"abmilp:{tmp_path / 'nope'}"], "not found")
    _one_line_error(capsys, ["aggregations", *base[2:], "--methods", "attn-mean"], "needs --model")
    _one_line_error(capsys, ["localize", *base, "--boxes", str(tmp_path / "none"), "--map", "cls-attn"],
                    "does not exist")
    _one_line_error(capsys, ["localize", *base, "--boxes", str(xml), "--map", f"abmilp:{tmp_path / 'nope'}"],
                    "not found")
    _one_line_error(capsys, ["localize", *base, "--boxes", str(tmp_path), "--map", "cls-attn"], "no annotation")
    _one_line_error(capsys, ["localize", *base, "--boxes", str(xml)], "--heads")
