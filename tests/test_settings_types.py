"""Settings that cannot be misread: values of the wrong type, YAML alias bombs, files that are not UTF-8 and
unknown keys of the Python API are refused with one short line naming the key or file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from beyond_cls.analysis.aggregations import AggregationsConfig
from beyond_cls.analysis.analyze import AnalyzeConfig
from beyond_cls.cli import main
from beyond_cls.cli_configs import CompareConfig, ShardConfig, ZooConfig
from beyond_cls.config import ConfigError, load_config
from beyond_cls.probe import ProbeConfig, run

REQUIRED = "model: m\ndata: d\nout: o\n"


def _probe(tmp_path: Path, text: str) -> ProbeConfig:
    config = tmp_path / "c.yaml"
    config.write_text(REQUIRED + text)
    return load_config(ProbeConfig, config)


@pytest.mark.parametrize("text,message", [
    ('final_norm: "false"', "final_norm must be true, false or null, got 'false' (str)"),
    ('skip_bad_images: "false"', "skip_bad_images must be true or false, got 'false' (str)"),
    ("seeds: 1.5", "seeds must be a comma-separated string, an integer or a list of integers, got 1.5 (float)"),
    ("seeds: [0, true]", "seeds[1] must be an integer or a string, got True (bool)"),
    ("blocks: 5.7", "blocks must be a comma-separated string, an integer, a list of integers or null, got 5.7"),
    ("lrs: [0.1, [1]]", "lrs[1] must be a number or a string, got [1] (list)"),
    ("resume: 5", "resume must be a string, got 5 (int)"),
    ("out: 5", "out must be a string, got 5 (int)"),
    ("device: 0", "device must be a string, got 0 (int)"),
    ("heads: {cls: 1}", "heads must be a comma-separated string or a list of strings, got {'cls': 1} (dict)"),
    ("cache_dtype: [bf16]", "cache_dtype must be one of bf16, fp32; got ['bf16']"),
])
def test_values_of_the_wrong_type_are_refused_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        _probe(tmp_path, text)


def test_values_of_the_right_type_still_load(tmp_path):
    cfg = _probe(tmp_path, "seeds: 1\nblocks: [2, 11]\nlrs: 0.1\nheads: [cls, mean]\nmean: [0.5, 0.5, 0.5]\n"
                 "final_norm: null\nskip_bad_images: true\nwarmup_epochs: 1\nepochs: 2\n")
    assert cfg.seed_list() == [1] and cfg.block_list(12) == [2, 11] and cfg.base_lrs() == [0.1]
    assert cfg.normalization()[0] == (0.5, 0.5, 0.5) and cfg.skip_bad_images is True and cfg.warmup_epochs == 1
    assert _probe(tmp_path, "blocks: 5\nseeds: [0, 1]\nlrs: '0.05,0.1'\n").block_list(12) == [5]
    paths = load_config(ProbeConfig, None, model="m", data=tmp_path / "d", out=tmp_path / "o")  # Python API: Paths
    assert paths.data == str(tmp_path / "d") and paths.out == str(tmp_path / "o")
    config = tmp_path / "s.yaml"
    config.write_text("data: d\nout: o\nshard_size: 1000\n")
    assert load_config(ShardConfig, config).shard_size == 1000
    config.write_text("inputs: [a, b]\nout: o\nnames: [x, y]\n")
    assert load_config(CompareConfig, config).name_list() == ["x", "y"]
    config.write_text("model: m\ndata: d\nout: o\nmethods: [attn-mean, attn-minent]\n")
    assert load_config(AggregationsConfig, config).heads == ["attn-mean", "attn-minent"]  # methods: the former name


@pytest.mark.parametrize("cls,text,message", [
    (ZooConfig, 'check: "no"', "check must be true or false, got 'no' (str)"),
    (ShardConfig, "data: d\nout: o\nshard_size: 1.5", "shard_size must be a string or an integer, got 1.5"),
    (AnalyzeConfig, "model: m\ndata: d\nout: o\nmax_images: 2.0", "max_images must be a positive integer, got 2.0"),
    (AnalyzeConfig, "model: m\ndata: d\nout: o\ncheckpoint: [5]", "checkpoint[0] must be a string or null, got 5"),
    (AnalyzeConfig, "model: m\ndata: d\nout: [o]", "out must be a string, got ['o'] (list)"),
])
def test_other_commands_check_types_too(tmp_path, cls, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text + "\n")
    with pytest.raises(ConfigError, match="^" + __import__("re").escape(message)):
        load_config(cls, config)


def test_a_wrong_type_on_the_command_line_path_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(REQUIRED + "resume: 5\n")
    assert main(["probe", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "beyond-cls probe: error: resume must be a string, got 5 (int)"


def _alias_bomb(levels: int = 9) -> str:
    """``heads:`` holding 9 lists, each of 9 aliases of the one before: 9**9 strings once expanded (1 KB of YAML)."""
    lists = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    lists += [f"&a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return "heads: [" + ", ".join(lists) + "]\n"


def test_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(REQUIRED + _alias_bomb())
    assert config.stat().st_size < 1500
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"config file {config}: .*more than 10000 values") as info:
        load_config(ProbeConfig, config)
    assert time.perf_counter() - start < 5 and len(str(info.value)) < 300
    assert main(["probe", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err) < 300 and len(err.splitlines()) == 1


def test_long_values_are_shown_short(tmp_path):
    with pytest.raises(ConfigError, match=r"^precision must be one of") as info:
        _probe(tmp_path, "precision: " + "x" * 5000)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("content,message", [
    (b"model: m\nout: \xff\xfe\n", "is not UTF-8 text"),
    (b"model: [m\nout: o\n", "is not valid YAML"),
    (b"1: m\n", "key 1 is not a setting name"),
    (b"heads: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested too deeply"),
])
def test_unreadable_config_files_are_named_in_one_line(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"config file {config}.*{message}"):
        load_config(ProbeConfig, config)
    assert main(["probe", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(config) in err and len(err.splitlines()) == 1


def test_the_python_api_refuses_unknown_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown settings \['epoch'\] of ProbeConfig"):
        run(dict(model="vit_tiny_patch16_224", data=str(tmp_path / "none"), out=str(tmp_path / "o"), epoch=5))
    with pytest.raises(ConfigError, match=r"unknown settings \['lr_list'\]"):
        load_config(ProbeConfig, None, model="m", data="d", out="o", lr_list=None)
    assert not (tmp_path / "o").exists()
