"""The ``beyond-cls`` command: outputs on the synthetic set, one-line errors with exit code 2, and the flags and
``--config`` files that every command takes from its config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beyond_cls import cli
from beyond_cls.analysis import AttentionSummary
from beyond_cls.cli import build_parser, main
from beyond_cls.config import GROUPS, ConfigError, load_config, settings_of
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.probe import ProbeConfig

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
    assert "unknown keys ['modle'] (did you mean model?); known keys:" in capsys.readouterr().err


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


# ------------------------------------------------------------------------ flags made from the config dataclasses
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command that takes settings: name -> its parser (``bench analyze`` under its two words)."""
    commands = dict(_subparsers(build_parser()))
    bench = commands.pop("bench")
    return {**commands, **{f"bench {name}": p for name, p in _subparsers(bench).items()}}


def _config_class(name: str) -> type:
    words = name.split()
    return (cli.BENCH[words[1]] if words[0] == "bench" else cli.COMMANDS[name]).config


def test_every_command_takes_settings_from_a_config_dataclass():
    assert set(_command_parsers()) == {*cli.COMMANDS, *(f"bench {n}" for n in cli.BENCH)}


@pytest.mark.parametrize("name", sorted(_command_parsers()))
def test_every_config_field_has_a_flag_with_help_in_its_group(name):
    parser = _command_parsers()[name]
    by_dest = {a.dest: a for a in parser._actions}
    group_of = {a.dest: g.title for g in parser._action_groups for a in g._group_actions}
    assert "config" in by_dest, f"{name} takes no --config"
    for field_name, setting in settings_of(_config_class(name)).items():
        assert field_name in by_dest, f"{name}: no flag for {field_name}"
        assert setting.help and by_dest[field_name].help, f"{name} {field_name}: no help"
        assert setting.group in GROUPS and group_of[field_name] == f"{setting.group} settings", field_name
    assert len(dataclasses.fields(_config_class(name))) == len(settings_of(_config_class(name)))


@pytest.mark.parametrize("name", sorted(_command_parsers()))
def test_defaults_are_shown_once_and_read_off_the_dataclass(name):
    parser = _command_parsers()[name]
    for action in parser._actions:
        assert (action.help or "").count("default") <= 1, (name, action.dest, action.help)
    for field_name, setting in settings_of(_config_class(name)).items():
        assert "default" not in setting.help, f"{field_name}: the default is written into its help text"
    text = " ".join(parser.format_help().split())
    if "--img-size" in text:
        assert "input resolution (default: 224)" in text


CONFIG_CASES = {  # command: (YAML settings, flags given, expected config values)
    "analyze": (dict(model="m", data="d", out="o", batch_size=3, max_images=7), ["--batch-size", "5"],
                dict(batch_size=5, max_images=7, model="m")),
    "probe": (dict(model="m", data="d", out="o", epochs=3, seeds="1"), ["--epochs", "4"], dict(epochs=4, seeds="1")),
    "aggregations": (dict(data="d", out="o", methods="attn-mean", examples=2, split="train"), ["--examples", "3"],
                     dict(examples=3, split="train")),
    "localize": (dict(data="d", out="o", boxes="b", maps=["cls-attn"], overlays=2), ["--overlays", "3"],
                 dict(examples=3, heads=["cls-attn"], boxes="b")),  # former names in the YAML and flag
    "demo": (dict(img_size=32, batch_size=2), ["--batch-size", "4"], dict(img_size=32, batch_size=4)),
    "compare": (dict(inputs=["a", "b"], out="o", names="x,y"), ["--names", "p,q"],
                dict(inputs=["a", "b"], names="p,q")),
    "probe-report": (dict(run="r", out="o"), ["--analyze", "a"], dict(run="r", out="o", analyze="a")),
    "zoo": (dict(weights_dir="w"), ["--check"], dict(weights_dir="w", check=True)),
    "shard": (dict(data="d", out="o", name="n"), ["--shard-size", "2GB"], dict(name="n", shard_size="2GB")),
    "bench analyze": (dict(steps=2, precision="bf16"), ["--warmup", "0"], dict(steps=2, warmup=0, precision="bf16")),
    "bench probe": (dict(steps=2, heads="cls", baseline=False), ["--precision", "fp32"],
                    dict(steps=2, heads="cls", baseline=False, precision="fp32")),
}


def test_config_cases_cover_every_command():
    assert set(CONFIG_CASES) == set(_command_parsers())


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_config_file_values_are_used_and_flags_given_win(name, tmp_path, monkeypatch):
    values, flags, expected = CONFIG_CASES[name]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(values))
    seen = []
    words = name.split()
    table, key = (cli.BENCH, words[1]) if words[0] == "bench" else (cli.COMMANDS, name)
    monkeypatch.setitem(table, key, dataclasses.replace(table[key], run=seen.append))
    assert main([*words, "--config", str(config), *flags]) == 0
    assert {k: getattr(seen[0], k) for k in expected} == expected


def test_positional_arguments_override_the_config_file(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("inputs: [a, b]\nout: o\n")
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "compare", dataclasses.replace(cli.COMMANDS["compare"], run=seen.append))
    assert main(["compare", "c", "--config", str(config)]) == 0
    assert seen[0].inputs == ["c"] and seen[0].out == "o"


@pytest.mark.parametrize("command", [["analyze"], ["probe"], ["demo"], ["bench", "analyze"], ["bench", "probe"]])
def test_amp_and_precision_are_one_setting(command):
    parser = build_parser()
    assert parser.parse_args([*command, "--amp", "fp16"]).precision == "fp16"
    assert parser.parse_args([*command, "--precision", "bf16"]).precision == "bf16"
    assert parser.parse_args(command).precision is None  # unset: a --config file's value stands


def test_an_old_amp_key_still_loads(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text("model: m\ndata: d\nout: o\namp: bf16\n")
    assert load_config(ProbeConfig, config).precision == "bf16"
    assert load_config(ProbeConfig, config, precision="fp16").precision == "fp16"  # a flag given wins
    assert load_config(ProbeConfig, None, model="m", data="d", out="o", amp="fp32").precision == "fp32"
    config.write_text("model: m\ndata: d\nout: o\namp: bf16\nprecision: fp16\n")
    with pytest.raises(ConfigError, match="precision given twice"):
        load_config(ProbeConfig, config)


def test_a_checkpoint_saved_with_amp_still_resumes():
    from beyond_cls.probe.trainer import check_resumable

    cfg = load_config(ProbeConfig, None, model="m", data="d", out="o", precision="bf16")
    saved = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "precision"}, "amp": "fp16"}
    check_resumable(Path("seed0/checkpoint.pt"), {"config": saved, "effective_batch": 16384, "seed": 0}, cfg, 0, 16384)


@pytest.mark.parametrize("cls,values,message", [
    (ProbeConfig, dict(epochs=0), "epochs must be a positive integer, got 0"),
    (ProbeConfig, dict(precision="fp8"), "precision must be one of auto, bf16, fp16, fp32; got 'fp8'"),
    (ProbeConfig, dict(block=-2), "block must be a block index"),
    (ProbeConfig, dict(momentum=float("nan")), "momentum must be a number >= 0"),
    (ProbeConfig, dict(compile=True, batch_size=True), "batch_size must be a positive integer, got True"),
])
def test_config_values_are_checked_by_their_setting(cls, values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(cls, None, model="m", data="d", out="o", **values)


def test_flags_keep_their_special_forms(capsys):
    parser = build_parser()
    args = parser.parse_args(["probe", "--no-progress", "--final-norm", "--compile", "--block", "-1"])
    assert (args.progress, args.final_norm, args.compile, args.block) == (False, True, True, -1)
    assert parser.parse_args(["probe", "--no-final-norm"]).final_norm is False
    assert parser.parse_args(["localize", "--map", "a", "--heads", "b"]).heads == ["a", "b"]
    assert parser.parse_args(["bench", "probe", "--no-baseline"]).baseline is False
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["probe", "--block", "-2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("argument --block: expected a block index (0-based, -1 = last), got '-2'")


@pytest.mark.parametrize("argv,named", [
    (["localize", "--data", "d", "--out", "o", "--boxes", "b"], "--heads"),
    (["compare", "--out", "o"], "inputs (positional)"),  # no --inputs flag exists
    (["probe-report", "--out", "o"], "run (positional)"),
])
def test_a_missing_setting_is_named_as_the_command_line_takes_it(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"missing required setting(s) {named} (" in err


def test_compare_config_files_may_give_lists_and_single_values(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "compare", dataclasses.replace(cli.COMMANDS["compare"], run=seen.append))
    config = tmp_path / "c.yaml"
    config.write_text("inputs: a\nout: o\nnames: [x]\nfamily: x=MIM\n")
    assert main(["compare", "--config", str(config)]) == 0
    assert seen[0].inputs == ["a"] and seen[0].name_list() == ["x"] and seen[0].families() == {"x": "MIM"}


@pytest.mark.parametrize("cls", [ProbeConfig, cli.BENCH["probe"].config])
def test_heads_may_be_a_yaml_list(cls, tmp_path):
    from beyond_cls.probe.bank import parse_heads

    config = tmp_path / "c.yaml"
    required = "model: m\ndata: d\nout: o\n" if cls is ProbeConfig else "baseline: false\n"
    config.write_text(required + "heads: [cls, ABMILP]\n")
    assert parse_heads(load_config(cls, config).heads) == ["cls", "abmilp"]
    with pytest.raises(ConfigError, match="heads: expected a comma-separated list"):
        parse_heads(5)
