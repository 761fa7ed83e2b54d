"""One vocabulary across commands: flag names and their former names, defaults, --mean/--std,
units in JSON and console, learning-rate text."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from beyond_cls import cli
from beyond_cls.analysis.layers_report import block_curves
from beyond_cls.analysis.localize import read_localization
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.cli import build_parser, main
from beyond_cls.config import INFERENCE_BATCH, MEAN, STD, ConfigError, load_config, settings_of
from beyond_cls.units import as_percent, format_lr, format_lrs
from tests.tiny_probe import trained_probe

SIZE = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "3"]
NORMALIZING = ("analyze", "aggregations", "localize", "probe", "demo")  # commands that normalize images
INFERENCE = ("analyze", "aggregations", "localize", "demo", "bench analyze")  # a batch without gradients
TRAINING = ("probe", "bench probe")  # the probe's per-process micro-batch


def _parsers() -> dict[str, argparse.ArgumentParser]:
    def sub(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    commands = dict(sub(build_parser()))
    bench = commands.pop("bench")
    return {**commands, **{f"bench {name}": p for name, p in sub(bench).items()}}


def _config(name: str) -> type:
    words = name.split()
    return (cli.BENCH[words[1]] if words[0] == "bench" else cli.COMMANDS[name]).config


def _defaults(name: str) -> dict:
    return {f.name: f.default for f in dataclasses.fields(_config(name))}


# ------------------------------------------------------------------------------------------- names and aliases
@pytest.mark.parametrize("command,former", [
    ("aggregations", ["--methods"]), ("localize", ["--map", "--maps"]), ("probe", []), ("bench probe", []),
])
def test_head_specs_are_heads_everywhere_and_former_names_reach_the_same_setting(command, former):
    parser = _parsers()[command]
    for flag in ("--heads", *former):
        args = vars(parser.parse_args([flag, "attn-mean"]))
        assert args["heads"] in ("attn-mean", ["attn-mean"])
        assert flag == "--heads" or flag[2:] not in args  # no setting of its own
    assert "heads" in _defaults(command)
    options = " ".join(parser.format_help().split("options:", 1)[1].split())
    for flag in former:  # shown once, in the --heads help, not as a setting of its own
        assert f"also {former[0]}" in options and options.count(f"{flag} ") + options.count(f"{flag},") == 1


@pytest.mark.parametrize("command", ["aggregations", "localize"])
def test_images_drawn_are_examples_with_overlays_as_the_former_name(command):
    parser = _parsers()[command]
    assert parser.parse_args(["--examples", "3"]).examples == parser.parse_args(["--overlays", "3"]).examples == 3
    assert "also --overlays" in parser.format_help()
    assert settings_of(_config(command))["examples"].aliases == ("overlays",)


def test_former_names_in_config_files_and_mixed_flags(tmp_path):
    from beyond_cls.analysis.aggregations import AggregationsConfig
    from beyond_cls.analysis.localize import LocalizeConfig

    cfg = load_config(LocalizeConfig, None, data="d", out="o", boxes="b", maps=["cls-attn,attn-center"], overlays=1)
    assert (cfg.heads, cfg.examples) == (["cls-attn", "attn-center"], 1)
    agg = load_config(AggregationsConfig, None, data="d", out="o", model="m", methods="attn-mean,attn-minent")
    assert agg.heads == ["attn-mean", "attn-minent"] and agg.examples == 4
    args = _parsers()["localize"].parse_args(["--map", "cls-attn", "--heads", "attn-center,attn-minent"])
    assert args.heads == ["cls-attn", "attn-center,attn-minent"]  # one grammar: commas and repeats add up
    with pytest.raises(ConfigError, match="given twice"):
        load_config(LocalizeConfig, None, data="d", out="o", boxes="b", heads="cls-attn", maps=["x"])
    with pytest.raises(ConfigError, match="heads: attn-mean given twice"):
        load_config(AggregationsConfig, None, data="d", out="o", model="m", heads=["attn-mean", "attn-mean"])
    with pytest.raises(ConfigError, match="twice"):  # cls-attn is attn-mean in aggregations too
        load_config(AggregationsConfig, None, data="d", out="o", model="m", heads="cls-attn,attn-mean")


# ---------------------------------------------------------------------------------------------------- defaults
def test_batch_sizes_agree_per_meaning_and_say_why():
    parsers = _parsers()
    assert set(INFERENCE) | set(TRAINING) == {n for n in parsers if "batch_size" in _defaults(n)}
    assert {_defaults(n)["batch_size"] for n in INFERENCE} == {64}
    assert {_defaults(n)["batch_size"] for n in TRAINING} == {256}
    for name in ("analyze", "aggregations", "localize", "demo"):
        assert settings_of(_config(name))["batch_size"] == INFERENCE_BATCH
        assert "inference batch" in parsers[name].format_help()
    assert "training images per process per micro-batch" in " ".join(parsers["probe"].format_help().split())
    assert "as probe's --batch-size" in parsers["bench probe"].format_help()


@pytest.mark.parametrize("name", NORMALIZING)
def test_every_normalizing_command_takes_the_shared_mean_and_std(name):
    settings = settings_of(_config(name))
    assert (settings["mean"], settings["std"]) == (MEAN, STD)
    args = _parsers()[name].parse_args(["--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    assert (args.mean, args.std) == ("0.5,0.5,0.5", "0.25,0.25,0.25")
    required = {"analyze": dict(model="m", data="d", out="o"), "aggregations": dict(model="m", data="d", out="o",
                heads="attn-mean"), "localize": dict(data="d", out="o", boxes="b", heads="cls-attn"),
                "probe": dict(model="m", data="d", out="o"), "demo": {}}[name]
    cfg = load_config(_config(name), None, **required, mean="0.5,0.5,0.5", std=[0.25, 0.25, 0.25])
    if hasattr(cfg, "normalization"):
        assert cfg.normalization() == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for bad, message in (({"mean": "0.5,0.5"}, "mean must be three"), ({"std": "1,0,1"}, "std must be three")):
        with pytest.raises(ConfigError, match=message):
            load_config(_config(name), None, **required, **bad)


# ----------------------------------------------------------------------------------------- runs: units, metadata
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return trained_probe(tmp_path_factory.mktemp("vocab"), "abmilp", boxes=True, mean="0.5,0.5,0.5",
                         std="0.25,0.25,0.25")


def test_a_probe_run_records_percent_and_nats(setup):
    _, run, _ = setup
    results = json.loads((run / "results.json").read_text())
    assert results["units"]["top1"] == results["units"]["top5"] == "%" and results["units"]["entropy"] == "nats"
    rows = results["summary"]
    assert all(0.0 <= r["top1"] <= 100.0 and r["top5"] >= r["top1"] for r in rows)
    assert any(r["top1"] > 1.0 for r in rows)  # % (3 classes: a fraction would be at most 1)
    assert results["normalization"] == {"mean": [0.5] * 3, "std": [0.25] * 3}  # --mean/--std recorded
    assert (results["config"]["mean"], results["config"]["std"]) == ("0.5,0.5,0.5", "0.25,0.25,0.25")
    old = {k: v for k, v in results.items() if k != "units"}  # a file from before units were recorded
    assert block_curves(old) == block_curves(results)


def test_localize_scores_in_percent_with_the_mean_and_std_recorded(setup, tmp_path, capsys):
    data, run, xml = setup
    out = tmp_path / "loc"
    assert main(["localize", "--model", "vit_tiny_patch16_224", "--data", str(data), "--boxes", str(xml),
                 "--heads", f"cls-attn,abmilp:{run}", "--out", str(out), "--examples", "0", "--max-images", "6",
                 "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", *SIZE]) == 0
    console = capsys.readouterr().out
    results = json.loads((out / "localization.json").read_text())
    assert results["units"]["maxboxacc_v2"] == results["units"]["maxboxacc"] == "%"
    assert results["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert results["config"]["mean"] == "0.5,0.5,0.5"
    for score in results["maps"].values():
        assert score["maxboxacc_v2"] == pytest.approx(sum(score["maxboxacc"].values()) / 3)
        assert all(v * 6 / 100 == pytest.approx(round(v * 6 / 100)) for v in score["maxboxacc"].values())  # k of 6
        assert f"MaxBoxAccV2 {score['maxboxacc_v2']:.1f} %" in console
    assert read_localization(out / "localization.json")["maps"] == results["maps"]  # % files read unchanged
    # a file written before units were recorded held fractions: read as %
    old = json.loads((out / "localization.json").read_text())
    del old["units"]
    for score in old["maps"].values():
        score["maxboxacc_v2"] /= 100
        score["maxboxacc"] = {d: v / 100 for d, v in score["maxboxacc"].items()}
    (tmp_path / "old.json").write_text(json.dumps(old))
    again = read_localization(tmp_path / "old.json")["maps"]
    for name, score in results["maps"].items():
        assert again[name]["maxboxacc_v2"] == pytest.approx(score["maxboxacc_v2"])
        assert again[name]["maxboxacc"] == pytest.approx(score["maxboxacc"])


def test_analyze_applies_and_records_the_given_normalization(setup, tmp_path):
    data, _, _ = setup
    args = ["analyze", "--model", "vit_tiny_patch16_224", "--data", str(data), "--max-images", "2", *SIZE]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--mean", "0.1,0.2,0.3", "--std", "0.5,0.5,0.5"]) == 0
    a, b = (json.loads((tmp_path / x / "analyze_config.json").read_text()) for x in "ab")
    assert a["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # ImageNet's
    assert b["normalization"] == {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]} and b["mean"] == "0.1,0.2,0.3"
    stats = [json.loads((tmp_path / x / "attention_stats.json").read_text()) for x in "ab"]
    assert stats[0]["fields"] != stats[1]["fields"]  # the normalization was applied
    assert stats[0]["units"]["cls_patch_entropy"] == "nats" and stats[0]["units"]["cls_self"] == "fraction of 1"
    del stats[0]["units"]  # files from before units were recorded load alike
    (tmp_path / "old.json").write_text(json.dumps(stats[0]))
    assert AttentionSummary.load(tmp_path / "old.json").to_dict() == json.loads(
        (tmp_path / "a" / "attention_stats.json").read_text())


def test_aggregations_print_entropy_in_nats(setup, tmp_path, capsys):
    data, _, _ = setup
    out = tmp_path / "agg"
    assert main(["aggregations", "--model", "vit_tiny_patch16_224", "--data", str(data), "--methods",
                 "attn-mean", "--heads", "attn-center", "--out", str(out),
                 "--max-images", "3", "--overlays", "1", *SIZE]) == 0
    results = json.loads((out / "aggregations.json").read_text())
    assert [r["method"] for r in results["methods"]] == ["attn-mean", "attn-center"]
    assert results["units"]["entropy"] == results["units"]["kl"] == "nats"
    assert results["normalization"]["mean"] == [0.485, 0.456, 0.406]
    console = capsys.readouterr().out
    assert all(f"entropy {r['entropy']:.4f} nats" in console for r in results["methods"])


# ------------------------------------------------------------------------------------------------ units, lrs
def test_as_percent_reads_either_unit():
    assert as_percent(0.25, None, "maxboxacc_v2", "fraction") == 25.0
    assert as_percent(25.0, {"maxboxacc_v2": "%"}, "maxboxacc_v2", "fraction") == 25.0
    assert as_percent(25.0, None, "top1", "%") == 25.0
    with pytest.raises(ValueError, match="unknown unit"):
        as_percent(1.0, {"top1": "permille"}, "top1", "%")


def test_round_learning_rates_print_short_whatever_their_origin():
    assert format_lr(1e-3) == format_lr(float(np.float32(1e-3))) == format_lr(torch.tensor(1e-3)) == "0.001"
    assert [format_lr(v) for v in (0.1 * 16384 / 256, 1e-5, 0.0015625, 2.5e6, 0.0, 3)] == [
        "6.4", "1e-5", "0.0015625", "2.5e6", "0", "3"]
    assert format_lr(float("nan")) == "nan"


def test_different_learning_rates_print_differently():
    rng = np.random.default_rng(0)
    for _ in range(200):
        base = float(rng.uniform(1e-5, 1.0))
        values = [base, base * (1 + float(rng.choice([1e-9, 1e-7, 1e-4]))), base * 2, base]
        texts = format_lrs(values)
        assert texts[0] == texts[3] and len(set(texts)) == 3
        for v, t in zip(values, texts):
            assert math.isclose(float(t), v, rel_tol=1e-6)  # never rounded by more than 1e-6
    assert format_lrs([0.001, 0.0010001]) == ["0.001", "0.0010001"]
    assert format_lrs([0.1 * 8 / 256, 1.0 * 8 / 256]) == ["0.003125", "0.03125"]
