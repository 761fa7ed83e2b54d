"""``analyze`` says what it will do: the resolved-settings block, its copy in analyze_config.json, and one log line
per batch stretch with the whole run's ETA when there is no progress bar."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

import beyond_cls.analysis.analyze as analyze_module
from beyond_cls import statistics
from beyond_cls.analysis import AttentionSummary
from beyond_cls.analysis.analyze import AnalyzeConfig, analyze_models
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.models import load_encoder
from beyond_cls.run_summary import settings_dict

VIT = "vit_tiny_patch16_224"
RUN = dict(img_size=32, batch_size=2, max_images=5, num_workers=0, progress=False, device="cpu", split="val")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "set"
    return make_synthetic_dataset(root, SyntheticConfig(num_classes=2, train_per_class=0, val_per_class=3,
                                                        image_size=64, object_size=(12, 20)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(root / f"w{seed}.pth")
        torch.save(load_encoder(VIT, img_size=32).state_dict(), paths[-1])
    return paths


def _rows(monkeypatch, cfg: AnalyzeConfig) -> list[tuple[str, object]]:
    blocks = []
    real = analyze_module.format_settings
    monkeypatch.setattr(analyze_module, "format_settings", lambda rows, title: blocks.append(rows) or real(rows, title))
    monkeypatch.setattr(analyze_module, "plot_information_flow", lambda *a, **k: None)  # no figure: faster
    analyze_models(cfg)
    assert len(blocks) == 1
    return blocks[0]


def test_block_rows_log_lines_and_metadata(dataset, weights, tmp_path, monkeypatch, capsys):
    out = tmp_path / "one"
    rows = _rows(monkeypatch, AnalyzeConfig(model=VIT, checkpoint=str(weights[0]), data=str(dataset), out=str(out),
                                            **RUN))
    values = dict(rows)
    fmt = load_encoder(VIT, str(weights[0]), img_size=32).beyond_cls_info.checkpoint_format
    assert fmt and values["format"] == f"{fmt} (detected)" and values["checkpoint"].endswith("w1.pth")
    assert values["images"] == "a random sample of 5 of 6 images (--seed 0)" and values["classes"] == 2
    assert values["batches"].startswith("3 ") and values["batch"] == 2 and values["processes"] == 1
    assert values["tokens"] == "5: [cls] + 4 patches (2x2), attention of all 12 blocks"
    assert values["precision"] == "auto: autocast none (fp32) on cpu"

    text = capsys.readouterr().out
    assert text.count("analyze -> ") == 1
    lines = re.findall(rf"^analyze {VIT}  batch (\d)/3  img/s \d+  ETA (\S+)$", text, re.M)
    assert [b for b, _ in lines] == ["1", "2", "3"] and lines[-1][1] == "0s"  # 3 batches: a line after each
    saved = json.loads((out / "analyze_config.json").read_text())
    assert saved["settings"] == settings_dict(rows) and saved["settings"]["classes"] == "2"
    check_per_block_csv(out)


def check_per_block_csv(out) -> None:
    """analyze's per-block CSV lists every registered statistic, each block's mean, min and max over heads."""
    summary = AttentionSummary.load(out / "attention_stats.json")
    with open(out / "attention_stats_by_block.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["metric"] for r in rows[:: summary.num_blocks]] == [s.name for s in statistics.statistics()]
    assert {(r["metric"], r["unit"]) for r in rows} == {(s.name, s.unit) for s in statistics.statistics()}
    for r in rows:
        values = summary.fields()[r["metric"]][int(r["block"])]
        assert (r["model"], r["family"], r["depth"]) == (VIT, "other", "12")
        assert float(r["value"]) == pytest.approx(float(values.mean()), abs=1e-12)
        assert (float(r["head_min"]), float(r["head_max"])) == (float(values.min()), float(values.max()))
    assert len(rows) == 12 * len(statistics.statistics())


def test_every_model_has_its_rows(dataset, weights, tmp_path, monkeypatch):
    cfg = AnalyzeConfig(model=[VIT, VIT], checkpoint=[str(w) for w in weights], data=str(dataset),
                        out=str(tmp_path / "two"), **RUN)
    values = dict(_rows(monkeypatch, cfg))
    for label, path in zip(("vit_tiny_patch16_224@w1", "vit_tiny_patch16_224@w2"), weights):
        assert values[f"{label}: checkpoint"] == str(path) and values[f"{label}: format"].endswith("(detected)")
    saved = json.loads((tmp_path / "two" / "vit_tiny_patch16_224@w2" / "analyze_config.json").read_text())
    assert saved["settings"]["vit_tiny_patch16_224@w1: checkpoint"] == str(weights[0])
