"""``probe`` says what it will do: the resolved-settings block, its copy in config.yaml, the no-progress log lines
and the whole run's ETA."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import yaml

import beyond_cls.run_summary as summary
from beyond_cls.data import make_synthetic_dataset
from beyond_cls.models import load_encoder
from beyond_cls.models.info import EncoderInfo
from beyond_cls.probe import run
from beyond_cls.run_summary import RunClock, format_duration, format_numbers, format_settings
from tests.tiny_probe import TINY, TINY_SET

announcer = importlib.import_module("beyond_cls.probe.announce")  # where probe formats its settings block
LINE = re.compile(r"^seed 0  epoch (\d)/2  step (\d)/3  loss \S+  lr \S+  img/s \d+  ETA (\S+)$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings") / "set"
    return make_synthetic_dataset(root, TINY_SET)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(load_encoder(TINY["model"], img_size=TINY["img_size"]).state_dict(), path)
    return path


def _run(monkeypatch, **settings) -> list[tuple[str, object]]:
    """One tiny probe run; the rows of its settings block (captured where they are formatted)."""
    blocks = []
    real = announcer.format_settings
    monkeypatch.setattr(announcer, "format_settings", lambda rows, title: blocks.append(rows) or real(rows, title))
    run({**TINY, "heads": "cls,mean", "epochs": 2, **settings})
    assert len(blocks) == 1  # printed once
    return blocks[0]


def test_block_rows_log_lines_and_metadata(dataset, weights, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "run", tmp_path / "cache"
    rows = _run(monkeypatch, data=str(dataset), out=str(out), checkpoint=str(weights), cache=str(cache), log_every=2)
    values = dict(rows)
    assert len(values) == len(rows)  # one row per label
    assert values["processes"] == 1 and values["batch per process"] == 4 and values["accumulation"] == 2
    assert values["effective batch"] == 8 == values["batch per process"] * values["accumulation"] * values["processes"]
    assert (values["train images"], values["train classes"], values["eval images"], values["eval classes"]) == (
        24, 3, 12, 3)
    assert values["lr = blr x 8/256"] == "0.003125 (blr 0.1), 0.03125 (blr 1)"  # 0.1 x 8/256, 1 x 8/256: exact
    fmt = load_encoder(TINY["model"], str(weights), img_size=32).beyond_cls_info.checkpoint_format
    assert fmt and values["format"] == f"{fmt} (detected)"
    assert values["checkpoint"].endswith("vit_tiny.pth") and values["epochs"] == 2 and values["warm-up epochs"] == 1
    assert values["micro-batches/epoch"].startswith("6 per process: 3 steps x 2 + 0 left over")
    assert values["token source"] == "block 11 of 0..11, final norm off"
    assert values["precision"] == "auto: autocast none (fp32) on cpu"
    assert values["cache"].startswith(f"{cache}: miss")
    assert (values["crop"], values["head init"]) == ("mae", "pytorch")

    text = capsys.readouterr().out
    assert text.count("probe vit_tiny_patch16_224 ->") == 1 and "  effective batch      8\n" in text
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    assert [(int(m[1]), int(m[2])) for m in lines] == [(e, s) for e in (1, 2) for s in (2, 3)]  # every 2, epoch end
    assert all(re.fullmatch(r"\d+s|\d+m\d\ds|\?", m[3]) for m in lines)

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["settings"] == summary.settings_dict(rows)
    assert saved["settings"]["effective batch"] == "8" and saved["settings"]["format"] == f"{fmt} (detected)"

    # the same cache again, with the bar and one absolute lr: a hit, and the run's ETA on the bar (no log lines)
    rows = _run(monkeypatch, data=str(dataset), out=str(tmp_path / "again"), checkpoint=str(weights),
                cache=str(cache), progress=True, lrs=None, lr=0.0123456, log_every=1)
    values = dict(rows)
    assert values["cache"].startswith(f"{cache}: hit") and values["lr (--lr, every head)"] == "0.0123456"
    assert "  lr (--lr, every head)  0.0123456\n" in format_settings(rows, "t") + "\n"
    captured = capsys.readouterr()
    assert "run ETA " in captured.err and not any(map(LINE.match, captured.out.splitlines()))


def test_encoder_rows_of_an_hf_folder():
    info = EncoderInfo("vit_base_patch16_224", 1, True, 196, (14, 14), 768, 12, 12, checkpoint="m/model.safetensors",
                       checkpoint_format="hf-vit", notes=("task head dropped: classifier.*", "pooler dropped"))
    rows = summary.encoder_rows(info, "hf:m", "auto", 0)
    assert dict(rows)["hf folder"] == "m" and dict(rows)["format"] == "hf-vit (detected)"
    assert dict(rows)["loading notes"] == ["task head dropped: classifier.*", "pooler dropped"]
    assert "loading notes  task head dropped: classifier.*; pooler dropped" in format_settings(rows, "t")


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0, "0s"), (59.4, "59s"), (61, "1m01s"), (3599, "59m59s"),
                                           (3600 + 23 * 60 + 5, "1h23m"), (2 * 86400 + 3 * 3600, "2d03h")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_numbers_tells_values_apart():
    assert format_numbers([0.1 * 8 / 256, 1.0 * 8 / 256]) == ["0.003125", "0.03125"]
    assert format_numbers([0.0031250, 0.0031251]) == ["0.003125", "0.0031251"]
    assert format_numbers([1.0, 0.5]) == ["1", "0.5"]


def test_run_clock_eta(monkeypatch):
    now = iter([10.0, 12.0, 14.0, 100.0, 101.0])
    monkeypatch.setattr(summary.time, "perf_counter", lambda: next(now))
    clock = RunClock(20)
    clock.skip(4)  # done before a resume: not timed
    assert clock.eta() is None
    clock.mark()  # 10
    clock.advance()  # 12
    clock.advance()  # 14: 2 s per unit, 14 units left
    assert clock.eta() == pytest.approx(28.0)
    clock.mark()  # 100: a pause (e.g. a cache extraction) is not counted
    clock.advance(2)  # 101
    assert clock.eta() == pytest.approx(12 * 5 / 4)
