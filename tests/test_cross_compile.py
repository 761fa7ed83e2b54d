"""csrc/ compiles for aarch64 (the Grace CPU of GH200 nodes) with Debian's cross compiler: an x86-only intrinsic,
header or flag fails here, not on a cluster node.

Each ``csrc/*.cpp`` is compiled (``-c``, not linked) against this torch's headers with the portable flags of
setup.py. ``make test`` installs ``g++-aarch64-linux-gnu`` when it runs as root with apt; elsewhere, without the
compiler, the test says that it cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CROSS = "aarch64-linux-gnu-g++"
ROOT = Path(__file__).resolve().parents[1]
# setup.py's portable flags (no architecture-specific ones), plus what torch's BuildExtension adds
FLAGS = ["-std=c++20", "-O3", "-fopenmp-simd", "-fno-trapping-math", "-fopenmp", "-fPIC", "-Wno-psabi",
         "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _includes() -> list[str]:
    from torch.utils import cpp_extension

    paths = [str(ROOT / "csrc"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [f"-I{p}" for p in paths]


def _compile(source: Path, out: Path) -> tuple[str, str]:
    """(source name, its first error lines or "" when it compiled)."""
    cmd = [CROSS, *FLAGS, *_includes(), "-c", str(source), "-o", str(out / (source.stem + ".o"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode == 0:
        return source.name, ""
    errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()
    return source.name, "\n".join(errors[:15])


@pytest.mark.slow
def test_csrc_cross_compiles_for_aarch64(tmp_path):
    if shutil.which(CROSS) is None:
        pytest.skip(f"cannot run: {CROSS} is not installed (Debian: apt-get install g++-aarch64-linux-gnu; "
                    "make test installs it when run as root)")
    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    assert sources, "no csrc/*.cpp"
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda s: _compile(s, tmp_path), sources))
    failed = {name: errors for name, errors in results if errors}
    assert not failed, "aarch64 cross-compile failed:\n" + "\n".join(f"{n}:\n{e}" for n, e in failed.items())
    objects = sorted(tmp_path.glob("*.o"))
    assert len(objects) == len(sources)
    header = objects[0].read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
