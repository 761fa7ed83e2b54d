"""beyond_cls.analysis.compare on hand-built summaries with known means (no model needed)."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from beyond_cls import statistics
from beyond_cls.analysis import AttentionSummary, compare_figures
from beyond_cls.analysis.compare import compare, infer_family
from beyond_cls.analysis.style import zoo_of
from beyond_cls.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def grid(depth: int, heads: int, base: float, slope: float) -> torch.Tensor:
    """value[b, h] = base + slope * b + 0.01 * (h - (heads - 1) / 2): the head mean of block b is base + slope * b."""
    b = torch.arange(depth, dtype=torch.float64)[:, None]
    h = torch.arange(heads, dtype=torch.float64)[None, :]
    return base + slope * b + 0.01 * (h - (heads - 1) / 2)


def make(model: str, depth: int, heads: int, base: float, *, cls: bool = True, patches: int = 196) -> AttentionSummary:
    def g(offset: float, slope: float) -> torch.Tensor:
        return grid(depth, heads, base + offset, slope)

    return AttentionSummary(
        patch_self=g(0.0, 0.001),
        patch_patch_entropy=g(4.0, -0.01),
        cls_self=g(0.2, 0.01) if cls else None,
        cls_patch_entropy=g(4.5, -0.02) if cls else None,
        patch_cls=g(0.01, 0.0) if cls else None,
        cls_patch_mass=g(0.5, -0.01) if cls else None,
        num_images=10,
        num_prefix_tokens=1 if cls else 0,
        num_patches=patches,
        model=model,
    )


def block_mean(depth: int, base: float, slope: float) -> float:
    return base + slope * (depth - 1) / 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    specs = {
        "mae_vit_base_patch16": make("mae_vit_base_patch16", 12, 3, 0.10),
        "dino_vit_base_patch16": make("dino_vit_base_patch16", 12, 3, 0.00),
        "ijepa_vit_huge": make("ijepa_vit_huge", 24, 2, 0.02, cls=False),
    }
    paths = []
    for name, summary in specs.items():
        if name == "dino_vit_base_patch16":  # a JSON file rather than a run directory
            paths.append(summary.save(root / "dino.json"))
        else:
            summary.save(root / name / "attention_stats.json")
            paths.append(root / name)
    return specs, paths, root


@pytest.fixture(scope="module")
def result(runs, tmp_path_factory):
    _, paths, _ = runs
    return compare(paths, tmp_path_factory.mktemp("cmp"))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_families_inferred():
    assert [infer_family(n) for n in ("mae_vit_base_patch16", "beitv2_vit_base_patch16", "I-JEPA", "CAPI",
                                      "maskfeat", "SimMIM")] == ["MIM"] * 6
    assert [infer_family(n) for n in ("dino_vit_base_patch16", "DINOv2", "iBOT", "MoCo-v3",
                                      "vit_base_patch16_224.dino")] == ["JEA"] * 5
    assert infer_family("vit_tiny_patch16_224") == "other"


def test_analyze_labels_of_zoo_models_keep_their_zoo_entry():
    # several checkpoints of one zoo model in one analyze run are labelled name@<checkpoint stem>[-k]
    assert zoo_of("mae_vit_base_patch16@ep400-2") is zoo_of("mae_vit_base_patch16") is not None
    assert zoo_of("vit_tiny_patch16_224@x") is None


def test_model_table_matches_hand_means(runs, result):
    specs, _, _ = runs
    rows = {r["model"]: r for r in read_csv(result["files"]["models_csv"])}
    assert list(rows) == list(specs)
    assert rows["mae_vit_base_patch16"]["family"] == "MIM" and rows["ijepa_vit_huge"]["family"] == "MIM"
    assert rows["dino_vit_base_patch16"]["family"] == "JEA"
    # Table 3: [cls]->patch entropy averaged over blocks and heads ...
    for name, base in (("mae_vit_base_patch16", 0.10), ("dino_vit_base_patch16", 0.00)):
        expected = block_mean(12, base + 4.5, -0.02)
        assert float(rows[name]["aggregation_entropy"]) == pytest.approx(expected, abs=1e-12)
        assert float(rows[name]["cls_patch_entropy"]) == pytest.approx(expected, abs=1e-12)
        assert float(rows[name]["cls_self"]) == pytest.approx(block_mean(12, base + 0.2, 0.01), abs=1e-12)
        assert float(rows[name]["patch_self"]) == pytest.approx(block_mean(12, base, 0.001), abs=1e-12)
        assert float(rows[name]["patch_patch_entropy"]) == pytest.approx(block_mean(12, base + 4.0, -0.01), abs=1e-12)
        assert rows[name]["aggregation"] == "[cls]"
    # ... and uniform log |J| for an encoder without [cls]
    ijepa = rows["ijepa_vit_huge"]
    assert float(ijepa["aggregation_entropy"]) == pytest.approx(math.log(196))
    assert round(float(ijepa["aggregation_entropy"]), 3) == 5.278
    assert float(ijepa["aggregation_entropy_normalized"]) == pytest.approx(1.0)
    assert ijepa["aggregation"].startswith("uniform") and ijepa["has_cls"] == "False"
    assert ijepa["cls_self"] == "" and ijepa["cls_patch_entropy"] == ""
    assert float(ijepa["patch_self"]) == pytest.approx(block_mean(24, 0.02, 0.001), abs=1e-12)
    assert result["rows"][2]["aggregation_entropy"] == pytest.approx(math.log(196))
    assert result["warnings"] == []
    # the paper's Table 3 value rides along for zoo names
    paper = rows["mae_vit_base_patch16"]["paper_entropy"]
    assert paper in ("", "5.03")


def test_block_table_long_format(result):
    rows = read_csv(result["files"]["blocks_csv"])
    mae = [r for r in rows if r["model"] == "mae_vit_base_patch16" and r["metric"] == "cls_patch_entropy"]
    assert [int(r["block"]) for r in mae] == list(range(12))  # 0-based, as --block
    for b, r in enumerate(mae):
        assert float(r["value"]) == pytest.approx(0.10 + 4.5 - 0.02 * b, abs=1e-12)
        assert float(r["head_min"]) == pytest.approx(float(r["value"]) - 0.01, abs=1e-12)
        assert float(r["head_max"]) == pytest.approx(float(r["value"]) + 0.01, abs=1e-12)
        assert float(r["position"]) == pytest.approx(b / 11)
    ijepa = [r for r in rows if r["model"] == "ijepa_vit_huge"]
    assert {r["metric"] for r in ijepa} == {"patch_self", "patch_patch_entropy"}
    assert len(ijepa) == 2 * 24 and {r["depth"] for r in ijepa} == {"24"}
    # the columns older tooling reads keep their names and places; the unit rides along at the end
    assert list(rows[0]) == ["model", "family", "block", "depth", "position", "metric", "value", "head_min",
                             "head_max", "unit"]
    units = {(r["metric"], r["unit"]) for r in rows}
    fraction = "fraction of 1"
    assert {("cls_self", fraction), ("cls_patch_entropy", "nats"), ("patch_self", fraction),
            ("patch_patch_entropy", "nats"), ("patch_cls", fraction), ("cls_patch_mass", fraction)} <= units
    assert {metric for metric, _ in units} == {s.name for s in statistics.statistics()}


def test_model_table_columns_and_units_file(result):
    with open(result["files"]["models_csv"], newline="") as f:
        header = next(csv.reader(f))
    assert header[:19] == ["model", "family", "source", "has_cls", "num_images", "num_blocks", "num_heads",
                           "num_patches", "max_entropy", "aggregation", "aggregation_entropy",
                           "aggregation_entropy_normalized", "paper_entropy", "cls_self", "cls_patch_entropy",
                           "patch_self", "patch_patch_entropy", "patch_cls", "cls_patch_mass"]
    assert header[13:] == [s.name for s in statistics.statistics()]  # every registered statistic, in table order
    units = {r["column"]: r["unit"] for r in read_csv(result["files"]["units_csv"])}
    assert units["cls_patch_entropy"] == units["aggregation_entropy"] == units["max_entropy"] == "nats"
    assert units["cls_self"] == units["patch_cls"] == "fraction of 1"
    assert set(units) <= set(header) and len(units) == 4 + len(statistics.statistics())


def test_plotted_series_use_relative_depth(result):
    assert result["x_axis"] == "relative"
    series = result["series"]
    assert "ijepa_vit_huge" not in series["cls_self"] and "ijepa_vit_huge" not in series["cls_patch_entropy"]
    ijepa = series["patch_self"]["ijepa_vit_huge"]
    assert ijepa["x"] == pytest.approx([b / 23 for b in range(24)])
    assert ijepa["y"] == pytest.approx([0.02 + 0.001 * b for b in range(24)])
    mae = series["cls_self"]["mae_vit_base_patch16"]
    assert mae["x"] == pytest.approx([b / 11 for b in range(12)])
    assert mae["x"][0] == 0.0 and mae["x"][-1] == 1.0
    assert mae["y"] == pytest.approx([0.3 + 0.01 * b for b in range(12)])


def test_figures_and_report(result):
    files = result["files"]
    pngs = [files["figure"], *files["metrics"].values(), *files["heatmaps"].values()]
    assert len(pngs) == 1 + 4 + 3
    assert {p.name for p in files["metrics"].values()} == {
        "fig3_cls_self.png", "fig4_cls_patch_entropy.png", "fig5_patch_self.png", "fig6_patch_patch_entropy.png"}
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, p
    report = files["report"]
    text = report.read_text()
    links = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text))
    assert links == {p.name for p in pngs}
    for link in links:
        assert (report.parent / link).is_file()
    assert "Table 3" in text and "5.278 ‡" in text and "no [cls] token" in text
    assert "summary_by_model.csv" in text and "summary_by_block.csv" in text
    mae_row = next(line for line in text.splitlines() if line.startswith("| MIM | mae_vit_base_patch16 |"))
    assert f"{block_mean(12, 4.6, -0.02):.3f}" in mae_row
    assert "depths differ" in text


def test_compare_prints_table3(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare_figures, "save_figure", lambda fig, path: path)  # the table only: no PNGs drawn
    a = make("mae_vit_base_patch16", 12, 3, 0.1).save(tmp_path / "a.json")
    b = make("ijepa_vit_huge", 12, 3, 0.0, cls=False).save(tmp_path / "b.json")
    res = compare([a, b], tmp_path / "out")
    out = capsys.readouterr().out
    assert "Table 3" in out
    rows = {r["model"]: r for r in res["rows"]}
    mae = next(line for line in out.splitlines() if "mae_vit_base_patch16" in line)
    assert "MIM" in mae and f"{rows['mae_vit_base_patch16']['aggregation_entropy']:.3f}" in mae
    ijepa = next(line for line in out.splitlines() if "ijepa_vit_huge" in line)
    assert f"{math.log(196):.3f} ‡" in ijepa and "uniform" in out
    assert main(["compare", str(a), "--out", str(tmp_path / "cli")]) == 0
    assert "Table 3" in capsys.readouterr().out


def test_equal_depths_names_families_and_patch_mismatch(tmp_path):
    """Equal depths plot block numbers; differing patch counts are allowed but reported."""
    a = make("mae_vit_base_patch16", 12, 3, 0.1).save(tmp_path / "a.json")
    b = make("some_encoder", 12, 4, 0.0, patches=256).save(tmp_path / "b.json")
    data = json.loads(b.read_text())  # save() refuses NaN: write the other tools' "no [cls]" convention by hand
    for name in ("cls_self", "cls_patch_entropy", "patch_cls", "cls_patch_mass"):  # NaN = no [cls], like None
        data["fields"][name] = [[float("nan")] * 4] * 12
    b.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="patch counts differ"):
        res = compare([a, b], tmp_path / "out", names=["MAE", "CAPI-like"], families={"CAPI-like": "mim"})
    assert res["x_axis"] == "block"
    assert res["series"]["patch_self"]["MAE"]["x"] == [float(b) for b in range(12)]
    assert res["series"]["patch_self"]["CAPI-like"]["x"] == [float(b) for b in range(12)]
    assert list(res["series"]["cls_self"]) == ["MAE"]
    assert [r["model"] for r in res["rows"]] == ["MAE", "CAPI-like"]
    assert [r["family"] for r in res["rows"]] == ["MIM", "MIM"]
    assert res["rows"][1]["aggregation_entropy"] == pytest.approx(math.log(256))
    assert res["rows"][1]["aggregation_entropy_normalized"] == pytest.approx(1.0)
    text = res["files"]["report"].read_text()
    assert "patch counts differ" in text and "depths differ" not in text
    assert res["files"]["heatmaps"]["CAPI-like"].name == "heads_CAPI-like.png"


def test_bad_inputs_name_the_path(runs, tmp_path):
    _, paths, _ = runs
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        compare([paths[0], missing], tmp_path / "o1")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        compare([empty], tmp_path / "o2")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{ not json")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        compare([corrupt], tmp_path / "o3")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(str(listed))):
        compare([listed], tmp_path / "o4")
    ragged = tmp_path / "ragged.json"
    data = make("mae", 12, 3, 0.1).to_dict()
    data["fields"]["cls_self"] = data["fields"]["cls_self"][:5]
    ragged.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(ragged))):
        compare([ragged], tmp_path / "o5")
    with pytest.raises(ValueError, match="names has 1 entries for 2 inputs"):
        compare(paths[:2], tmp_path / "o6", names=["x"])
    with pytest.raises(ValueError, match="unknown model names"):
        compare(paths[:1], tmp_path / "o7", families={"typo": "MIM"})


def test_compare_command(runs, tmp_path, capsys):
    inputs = [str(p) for p in runs[1]]
    out = tmp_path / "cmp"
    assert main(["compare", *inputs, "--out", str(out), "--family", "mae_vit_base_patch16=MIM"]) == 0
    assert (out / "report.md").exists() and "report.md" in capsys.readouterr().out
    assert main(["compare", *inputs, "--out", str(out), "--family", "oops"]) == 2
    assert "NAME=FAMILY" in capsys.readouterr().err
