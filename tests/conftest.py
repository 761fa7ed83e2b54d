"""Test setup: deterministic seeds (GPU cases are skipped without CUDA by the root conftest.py).

Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET must be
set before any kernel is decorated, so it is set here, before the tests import the kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
