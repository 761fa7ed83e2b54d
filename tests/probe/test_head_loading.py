"""Reading a probe run back: its config.yaml (trained heads load in tests/analysis and test_probe_blocks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from beyond_cls.config import ConfigError
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.head_loading import read_run_config
from beyond_cls.probe.trainer import check_resumable


def test_read_run_config_keeps_the_raw_dict_and_the_probe_fields(tmp_path):
    (tmp_path / "config.yaml").write_text("model: vit_tiny_patch16_224\ndata: d\nout: o\nheads: cls,abmilp\n"
                                          "written_by: a later version\n")
    raw, cfg = read_run_config(tmp_path)
    assert raw["written_by"] == "a later version"
    assert (cfg.model, cfg.heads) == ("vit_tiny_patch16_224", "cls,abmilp")


@pytest.mark.parametrize("text,error,match", [
    (None, FileNotFoundError, "not found"),
    ("- a\n- b\n", ConfigError, "must be a mapping"),
    ("model: [unclosed\n", ConfigError, "not plain YAML"),
])
def test_read_run_config_errors_name_the_file(tmp_path, text, error, match):
    if text is not None:
        (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(error, match=match) as info:
        read_run_config(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_a_run_from_before_the_crop_and_head_init_settings_resumes_only_with_its_protocol():
    """Configs written before ``crop`` / ``head_init`` existed trained with torchvision's crop and MAE's init: a
    finished one is reused with those settings and refused, in one line naming both, with the new defaults."""
    new = ProbeConfig(model="m", data="d", out="o")
    old = {k: v for k, v in dataclasses.asdict(new).items() if k not in ("crop", "head_init")}
    state = {"config": old, "effective_batch": 16384, "seed": 0, "version": 1, "final": {"cls@blr0p1": {}}}
    path = Path("seed0/checkpoint.pt")
    with pytest.raises(ConfigError, match="crop: 'torchvision' → 'mae', head_init: 'mae' → 'pytorch'") as info:
        check_resumable(path, state, new, 0, 16384)
    assert "\n" not in str(info.value)
    check_resumable(path, state, dataclasses.replace(new, crop="torchvision", head_init="mae"), 0, 16384)
