"""``probe --eval``: a probe run's checkpoints evaluated again on the eval split, its training state untouched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from beyond_cls.cli import main
from beyond_cls.config import ConfigError
from beyond_cls.probe import run
from tests.probe.test_probe_run import _flags, dataset  # noqa: F401 (the dataset fixture)
from tests.tiny_probe import TINY

SETTINGS = dict(TINY, heads="cls,cls+mean,abmilp", epochs=1, warmup_epochs=0)
METRICS = ("top1", "top5", "entropy")


@pytest.fixture(scope="module")
def finished(dataset, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("eval") / "run"
    results = run(dict(SETTINGS, data=str(dataset), out=str(out)))
    return out, results


def _files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_eval_reproduces_the_final_results_and_writes_nothing_else(dataset, finished, capsys):  # noqa: F811
    out, results = finished
    before = _files(out)
    capsys.readouterr()
    assert main(["probe", *_flags(**SETTINGS, data=dataset, out=out, eval=True)]) in (0, None)
    printed = capsys.readouterr().out
    assert "evaluated checkpoints at epoch 1;" in printed and "eval.json" in printed
    evaluated = json.loads((out / "eval.json").read_text())
    assert [r["head"] for r in evaluated["rows"]] == [r["head"] for r in results["rows"]]
    for got, want in zip(evaluated["rows"], results["rows"]):
        assert [got[k] for k in METRICS[:2]] == [want[k] for k in METRICS[:2]], got["head"]
        if want["entropy"] is not None and want["entropy"] == want["entropy"]:  # NaN for [cls]
            assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-12, abs=0)
        assert got["epoch"] == 1 and got["finished"] is True and got["eval_images"] == want["eval_images"]
    assert evaluated["eval_view"] == {"crop_pct": 0.875, "interpolation": "bicubic", "resize_size": 36}
    after = _files(out)
    assert {k: v for k, v in after.items() if k not in ("eval.json", "eval.csv")} == before  # checkpoints, logs
    assert (out / "eval.csv").read_text().count("\n") == len(results["rows"]) + 1


def test_eval_of_an_unfinished_run_with_another_eval_view(dataset, finished, tmp_path):  # noqa: F811
    """The latest checkpoint of an unfinished run evaluates too (its epoch, ``finished`` false); --crop-pct and
    --interpolation may differ from the run's."""
    out = tmp_path / "unfinished"
    shutil.copytree(finished[0], out)
    path = out / "seed0" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    torch.save({**state, "final": None, "epoch": 0}, path)
    again = run(dict(SETTINGS, data=str(dataset), out=str(out), eval=True, crop_pct=1.0, interpolation="bilinear"))
    assert again["eval_view"] == {"crop_pct": 1.0, "interpolation": "bilinear", "resize_size": 32}
    assert len(again["rows"]) == 6 and all(r["eval_images"] == 12 for r in again["rows"])
    assert all(r["epoch"] == 0 and r["finished"] is False for r in again["rows"])


def test_eval_errors_are_one_line(dataset, finished, tmp_path):  # noqa: F811
    out, _ = finished
    common = dict(SETTINGS, data=str(dataset), eval=True)
    with pytest.raises(ConfigError, match="holds no probe checkpoint") as info:
        run(dict(common, out=str(tmp_path / "empty")))
    assert "\n" not in str(info.value) and not (tmp_path / "empty").exists()
    with pytest.raises(ConfigError, match=r"other model/data settings \(mean: None → \[0.5, 0.5, 0.5\]\)|"
                                          r"other model/data settings \(mean: None → '0.5,0.5,0.5'\)"):
        run(dict(common, out=str(out), mean="0.5,0.5,0.5"))
    with pytest.raises(ConfigError, match="holds heads cls@blr0p1, cls@blr1, cls\\+mean"):
        run(dict(common, out=str(out), heads="cls,abmilp"))
    with pytest.raises(ConfigError, match="other model/data settings \\(img_size: 32 → 48\\)"):
        run(dict(common, out=str(out), img_size=48))
