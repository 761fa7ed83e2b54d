"""A wheel installed into a clean venv outside the repo imports the package, kernels and extension, and its commands
(``beyond-cls --version``, ``python -m beyond_cls --help``) run there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = """
import pathlib, sys, torch
import beyond_cls, beyond_cls.kernels, beyond_cls._C
prefix = pathlib.Path(sys.prefix).resolve()
for mod in (beyond_cls, beyond_cls.kernels, beyond_cls._C):
    assert prefix in pathlib.Path(mod.__file__).resolve().parents, (mod.__name__, mod.__file__)
q = torch.randn(1, 2, 9, 8)
out, *_ = torch.ops.beyond_cls.attention_with_stats(q, q, q, 1)
assert out.shape == q.shape
import contextlib, importlib, importlib.metadata, io, runpy
assert importlib.metadata.version("beyond-cls") == beyond_cls.__version__  # the wheel's version is the package's
for name in sys.argv[1:]:  # every module of the source tree must be in the wheel and import from it
    module = importlib.import_module(name)
    assert prefix in pathlib.Path(module.__file__).resolve().parents, (name, module.__file__)
help = io.StringIO()  # python -m beyond_cls --help, in this process (what -m runs: beyond_cls/__main__.py)
sys.argv = ["beyond_cls", "--help"]
with contextlib.redirect_stdout(help), contextlib.suppress(SystemExit):
    runpy.run_module("beyond_cls", run_name="__main__", alter_sys=True)
text = help.getvalue()
assert text.startswith("usage: beyond-cls") and "arxiv.org/abs/2412.03215" in text, text
print("ok", beyond_cls.__version__)
"""


def source_modules() -> list[str]:
    """Dotted names of every module in the source tree."""
    names = []
    for root, package in ((REPO / "beyond_cls", "beyond_cls"),):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join([package, *parts]))
    return names


def run(cmd, cwd, **kw):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_in_clean_venv(tmp_path):
    # stale build/lib, bdist or egg-info from an earlier build must not smuggle modules into the wheel; the
    # compiled objects in build/temp* are kept, so the extension is not compiled again
    for stale in [*REPO.glob("build/lib*"), *REPO.glob("build/bdist*"), *REPO.glob("*.egg-info")]:
        shutil.rmtree(stale)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", dist, REPO],
        cwd=tmp_path, timeout=900)
    (wheel,) = dist.glob("beyond_cls-*.whl")

    venv = tmp_path / "venv"
    # no pip inside the venv (ensurepip is the slow part of making one): this pip installs into it (--python)
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    # Dependencies (torch, timm, ...) come from the test environment, appended after the venv's own
    # site-packages; the package itself must come from the wheel.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    assert site.is_dir(), site
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
        cwd=tmp_path)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    modules = source_modules()
    assert "beyond_cls.localization.metric" in modules and "beyond_cls.kernels.abmilp" in modules
    assert "beyond_cls.__main__" in modules
    assert run([py, "-c", CHECK, *modules], cwd=tmp_path, env=env).startswith("ok")
    version = run([venv / "bin" / "beyond-cls", "--version"], cwd=tmp_path, env=env).splitlines()
    assert version[0].startswith("beyond-cls ") and "torch " in version[1] and "C++ extension built" in version[1]
