"""The benchmark reports: kernel tables (bandwidth over the copy's) and the end-to-end table (GPU-hours)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _case(group: str, impl: str, seconds: list[float], **extra) -> dict:
    return {"group": group, "params": {"impl": impl}, "stats": {"data": seconds}, "extra_info": extra}


def test_kernel_table_states_bandwidth_over_the_copy():
    report = _module("report")
    gb = 1e9
    results = {"benchmarks": [
        _case("g", "fused", [2e-3, 2e-3, 2e-3], shape=[4, 8], bytes=gb, **{"pass": "fwd"}),
        _case("g", "eager", [6e-3] * 3, shape=[4, 8], bytes=gb, **{"pass": "fwd"}),
        _case("g", "copy", [1e-3] * 3, shape=[4, 8], bytes=2 * gb),
    ]}
    rows = {r["impl"]: r for r in report.rows_from(results)}
    assert rows["fused"]["gbps"] == pytest.approx(500.0)
    assert rows["fused"]["shape"] == "4x8 fwd" and rows["copy"]["shape"] == "4x8"
    # fused moves 1 GB in 2 ms, the copy 2 GB in 1 ms: a quarter of the copy's bandwidth; eager takes 3x the time
    assert "eager=3" in rows["fused"]["others_over_fused"]
    assert "bandwidth/copy=25%" in rows["fused"]["others_over_fused"]


def _write(path: Path, rows: list[dict]) -> None:
    e2e = _module("e2e")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=e2e.COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({"device": "gpu", "torch": "t", "triton": "tr", "date": "d", "unit": "images/s",
                             "detail": "", **r})


def test_e2e_report_adds_the_table1_gpu_hours(tmp_path):
    e2e = _module("e2e")
    path = tmp_path / "e2e_gpu.csv"
    _write(path, [
        {"measure": "probe_step_images_per_s[gpu decode]", "ours": 4000.0, "baseline": 5000.0, "ratio": 0.8},
        {"measure": "probe_encoder_images_per_s[gpu decode]", "ours": 10000.0, "baseline": 5000.0, "ratio": 2.0},
    ])
    text = e2e.report(path)
    rows = {r["measure"]: r for r in csv.DictReader(path.open())}
    hours = 90 * (1_281_167 / 4000 + 50_000 / 10000) / 3600
    assert float(rows["table1_row_gpu_hours"]["ours"]) == pytest.approx(hours)
    assert float(rows["table1_row_gpu_hours"]["ratio"]) == pytest.approx(hours / 300)
    assert "table1_row_gpu_hours" in text and path.with_suffix(".md").read_text() == text
    e2e.report(path)  # a second report replaces the estimate instead of adding another row
    assert [r["measure"] for r in csv.DictReader(path.open())].count("table1_row_gpu_hours") == 1


def test_e2e_report_without_probe_rows_adds_no_estimate(tmp_path):
    e2e = _module("e2e")
    path = tmp_path / "e2e.csv"
    _write(path, [{"measure": "analyze_vs_inference", "ours": 900.0, "baseline": 1000.0, "ratio": 0.9}])
    e2e.report(path)
    assert [r["measure"] for r in csv.DictReader(path.open())] == ["analyze_vs_inference"]


def test_device_script_refuses_unknown_arguments():
    result = subprocess.run(["bash", str(BENCHMARKS / "device.sh"), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_bench_probe_trains_heads_times_lrs():
    from beyond_cls.config import ConfigError
    from beyond_cls.probe.bench import BenchProbeConfig

    assert BenchProbeConfig(lrs="0.05,0.1,0.2").base_lrs() == [0.05, 0.1, 0.2]
    for bad in ("0.1,0.1", "-1", "x"):
        with pytest.raises(ConfigError, match="lrs"):
            BenchProbeConfig(lrs=bad)


def test_loader_is_timed_past_the_prefetched_batches():
    from beyond_cls.probe.bench import BenchProbeConfig, loader_batches

    # 16 workers keep 64 batches ready: none of them may fall in the timed window
    assert loader_batches(BenchProbeConfig(num_workers=16, warmup=3, steps=10)) == (64, 128)
    assert loader_batches(BenchProbeConfig(num_workers=0, warmup=5, steps=20)) == (5, 20)
