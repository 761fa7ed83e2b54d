"""The shared settings of the CPU tests pin the CPU: with CUDA present, ``device="auto"`` would move those tests
onto the GPU under bf16 autocast, where their CPU equivalences (two runs, cached vs uncached, 2 vs 1 processes,
bit-exact resume, single vs multi-model) no longer test what they claim. GPU cases are marked ``gpu`` instead."""

from __future__ import annotations

import importlib

import pytest
import torch

from beyond_cls.runtime import autocast_dtype, resolve_device

# (test module under tests/, name of its shared settings): dicts of config fields or command-line arguments
SHARED = [
    ("tiny_probe", "TINY"),
    ("probe/test_selection_heads", "TINY"),
    ("analysis/test_analyze_many", "RUN"),
    ("analysis/test_aggregations_cli", "SIZE"),
    ("test_cli", "FAST"),
]


def _load(module: str):
    return importlib.import_module(f"{__package__}.{module.replace('/', '.')}")


def _setting(settings: dict | list, name: str, flag: str) -> str:
    if isinstance(settings, dict):
        return settings.get(name, "auto")
    return settings[settings.index(flag) + 1] if flag in settings else "auto"


@pytest.mark.parametrize("module,name", SHARED)
def test_shared_settings_resolve_to_the_cpu_with_cuda_present(module, name, monkeypatch):
    settings = getattr(_load(module), name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    device = resolve_device(_setting(settings, "device", "--device"))
    assert device == torch.device("cpu"), f"{module}.{name} must pin device cpu"
    assert autocast_dtype(_setting(settings, "precision", "--precision"), device) is None  # float32
