"""The ``beyond-cls`` command on the synthetic set: outputs, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from beyond_cls.analysis import AttentionSummary
from beyond_cls.cli import main
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset

FAST = ["--model", "vit_tiny_patch16_224", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--device",
        "cpu"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "set"
    return make_synthetic_dataset(root, SyntheticConfig(num_classes=2, train_per_class=1, val_per_class=3))


def test_analyze_writes_stats_plot_and_table(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["analyze", *FAST, "--data", str(dataset), "--out", str(out), "--max-images", "5"]) == 0
    data = json.loads((out / "attention_stats.json").read_text())
    assert data["num_images"] == 5 and data["num_blocks"] == 12 and data["num_heads"] == 3
    assert data["num_patches"] == 196 and data["model"] == "vit_tiny_patch16_224"
    for name in ("cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy", "patch_cls"):
        assert len(data["fields"][name]) == 12 and len(data["fields"][name][0]) == 3, name
        assert len(data["per_block"][name]) == 12, name
    summary = AttentionSummary.load(out / "attention_stats.json")
    assert 0 < summary.cls_patch_entropy.max() <= summary.max_entropy + 1e-6
    png = (out / "attention_stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    printed = capsys.readouterr().out
    assert "cls-patch H" in printed and "5 images" in printed


def test_yaml_config_with_flag_override(dataset, tmp_path):
    config = tmp_path / "analyze.yaml"
    config.write_text(f"model: vit_tiny_patch16_224\ndata: {dataset}\nbatch_size: 2\nmax_images: 6\nnum_workers: 0\n"
                      "device: cpu\n")
    out = tmp_path / "run"
    assert main(["analyze", "--config", str(config), "--max-images", "2", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "attention_stats.json").read_text())["num_images"] == 2
    saved = json.loads((out / "analyze_config.json").read_text())
    assert saved["batch_size"] == 2 and saved["max_images"] == 2


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--data", "{missing}"], "does-not-exist"),
        (["--data", "{dataset}", "--split", "test"], "test"),
        (["--data", "{dataset}", "--checkpoint", "{missing}/w.pth"], "w.pth"),
        (["--data", "{dataset}", "--model", "vit_nonexistent_patch16"], "vit_nonexistent_patch16"),
        (["--data", "{dataset}", "--device", "tpu:7"], "device"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv_tail, message, dataset, tmp_path, capsys):
    fill = {"missing": str(tmp_path / "does-not-exist"), "dataset": str(dataset)}
    argv = ["analyze", *FAST, "--out", str(tmp_path / "out"), *[a.format(**fill) for a in argv_tail]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("beyond-cls analyze: error:")
    assert message in err


def test_missing_required_and_unknown_yaml_key(tmp_path, capsys):
    assert main(["analyze", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("modle: vit_tiny_patch16_224\n")
    assert main(["analyze", "--config", str(config)]) == 2
    assert "modle" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "many"), ("--precision", "fp8")])
def test_bad_flag_values_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_console_script_reports_bad_data(tmp_path):
    exe = shutil.which("beyond-cls", path=str(sys.executable).rsplit("/", 1)[0])
    assert exe is not None, "the beyond-cls console script is not installed next to python"
    proc = subprocess.run(
        [exe, "analyze", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_analyze_reports_both_throughputs(capsys):
    argv = ["bench", "analyze", "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--steps", "1", "--warmup", "0",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "recorder" in out and "ratio" in out


def test_bench_analyze_ratio_is_measured():
    from beyond_cls.analysis.bench import BenchAnalyzeConfig, bench_analyze

    result = bench_analyze(BenchAnalyzeConfig(model="vit_tiny_patch16_224", batch_size=2, steps=1, warmup=0,
                                              device="cpu"))
    assert result["plain_images_per_s"] > 0 and result["recorder_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["recorder_images_per_s"] / result["plain_images_per_s"])


def test_demo_analyzes_and_probes_the_synthetic_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BEYOND_CLS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--num-workers", "0", "--no-progress", "--device", "cpu"]) == 0
    assert (out / "attention_stats.json").exists()
    rows = json.loads((out / "probe" / "results.json").read_text())["rows"]
    assert [r["aggregation"] for r in rows] == ["cls", "mean", "abmilp"]
    assert "| aggregation" in capsys.readouterr().out
