"""Shared test setup: deterministic seeds, GPU tests skipped without CUDA.

Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET must be
set before any kernel is decorated, so it is set here, before the tests import the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
