"""Test setup: deterministic seeds (GPU cases are skipped without CUDA by the root conftest.py).

Without CUDA, Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET must be
set before any kernel is decorated, so it is set here, before the tests import the kernels.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (``make test`` runs ``-n auto --dist loadscope``): each worker process gets an equal share of the
# cores for torch's intra-op threads, so that the workers do not oversubscribe them
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if XDIST_WORKERS > 1:
    CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, CPUS // XDIST_WORKERS))

AOT_TEST = "tests/ops/test_triton_aot.py::"
AOT_MODULE = "tests.ops.test_triton_aot"  # its name in sys.modules (tests/ is a package)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The ahead-of-time compile test runs last in one process: its compiles start after collection, in the
    background. Under xdist it runs first, on one worker, whose fixture starts the compiles while the other
    workers test."""
    items.sort(key=lambda item: item.nodeid.startswith(AOT_TEST) != bool(XDIST_WORKERS))


def pytest_collection_finish(session):
    needed = any(item.nodeid.startswith(AOT_TEST) and "rows" in getattr(item, "fixturenames", ())
                 for item in session.items)  # the tests reading the compiled rows
    if needed and not XDIST_WORKERS and not session.config.option.collectonly:
        importlib.import_module(AOT_MODULE).start_background_compile(tempfile.mkdtemp(prefix="beyond_cls_aot_"))


def pytest_sessionfinish(session):
    module = sys.modules.get(AOT_MODULE)
    if module is not None:
        module.stop_background_compile()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
