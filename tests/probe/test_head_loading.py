"""Reading a probe run back: its config.yaml (trained heads load in tests/analysis and test_probe_blocks)."""

from __future__ import annotations

import pytest

from beyond_cls.config import ConfigError
from beyond_cls.probe.head_loading import read_run_config


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
