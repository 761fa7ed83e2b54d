"""The GPU sweep's machinery (benchmarks/sweep.py) on the CPU: rows written as measured, the deadline, winners."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import triton

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _sweep():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("_bench_sweep", BENCHMARKS / "sweep.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


sweep = _sweep()


def test_deadline_leaves_room_for_the_longest_measurement():
    now = [0.0]
    deadline = sweep.Deadline(10.0, clock=lambda: now[0])
    assert deadline.allows()
    deadline.took(4.0)
    now[0] = 3.0
    assert deadline.allows()  # 3 + 1.5 * 4 < 10
    now[0] = 4.5
    assert not deadline.allows()


def _row(kernel, shape, config, ms, gbps=""):
    return dict(kernel=kernel, shape=shape, config=config, median_ms=ms, gbps=gbps)


def test_winners_and_ratios():
    rows = [
        _row("sdpa", "vit", "", 1.0), _row("eager+stats", "vit", "", 10.0),
        _row("attention", "vit", "M128 N64", 1.2), _row("attention", "vit", "M64 N64", 1.1),
        _row("copy", "d768", "", 0.1, gbps=4000.0), _row("abmilp fwd", "d768", "eager", 0.3),
        _row("abmilp fwd", "d768", "compiled", 0.25), _row("abmilp fwd", "d768", "fused, fastest configs", 0.2, 1000.0),
        _row("abmilp.fwd", "d768", "N2", 0.3), _row("abmilp.fwd", "d768", "N4", 0.2),
    ]
    lines = sweep.winners(rows)
    assert lines[2] == ("| attention | vit | M64 N64 | 1.1 | M128 N64 (1.2) | time / SDPA's 1.10; "
                        "eager+stats' time / this 9.1 |")
    assert lines[3] == ("| abmilp fwd | d768 | fused, fastest configs | 0.2 |  | eager's time / this 1.50; "
                        "compiled's time / this 1.25; bandwidth 25% of the copy's |")
    assert lines[4] == "| abmilp.fwd | d768 | N4 | 0.2 | N2 (0.3) |  |"
    assert len(lines) == 5  # baselines are no groups of their own


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="the sweep's CPU path runs Triton's interpreter")
def test_rows_are_written_as_measured_and_the_deadline_stops_cleanly(tmp_path, capsys, monkeypatch):
    out, seen, now = tmp_path / "sweep.csv", [], [0.0]
    monkeypatch.setattr(sweep, "CLOCK", lambda: now[0])  # setup takes no time; each measurement one second

    def timer(fn):
        with out.open() as f:
            seen.append(len(list(csv.DictReader(f))))  # every earlier measurement is on disk already
        fn()
        now[0] += 1.0
        return (1.0 + len(seen), 1.0, 2.0), "test timer"

    assert sweep.main(["--csv", str(out), "--seconds", "5", "--quick"], timer=timer) == 0
    rows = list(csv.DictReader(out.open()))
    assert seen == [0, 1, 2, 3] and len(rows) == 4  # at 4 s another one-second measurement would end past 5 - 1.5
    assert [r["kernel"] for r in rows] == ["sdpa", "eager+stats", "attention", "attention+keep2"]
    assert rows[0]["timer"] == "test timer" and rows[2]["config"] == "interpreter config"
    assert "stopped cleanly before the deadline after 4 measurements" in capsys.readouterr().out
    md = out.with_suffix(".md").read_text()
    assert "(stopped at the deadline)" in md
    assert ("| attention | tiny 1x2x40x16 P1 float32 | interpreter config | 4 |  | time / SDPA's 2.00; "
            "eager+stats' time / this 0.8 |") in md  # times 2, 3, 4, 5 ms in order
