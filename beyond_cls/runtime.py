"""Device and precision choices shared by the jobs (analyze, bench, probe), and how warnings reach a console."""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch

from beyond_cls.config import PRECISIONS, ConfigError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec} requested but CUDA is not available")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on CUDA and none (fp32) on the CPU."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _DTYPES[precision]


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# Third-party warnings that tell a user of ours nothing: (module regex, message regex), matched as warnings filters.
HARMLESS = (
    # PIL on real photo sets (ImageNet has such files): every image is converted to RGB, its EXIF is not read
    (r"PIL\.Image", r"Palette images with Transparency expressed in bytes should be converted to RGBA"),
    (r"PIL\.(Image|TiffImagePlugin)", r"Possibly corrupt EXIF"),
)
# Third-party warnings that matter, retold in our words: (package, message regex, note with the regex's groups).
RETOLD = (
    ("torch", r"This DataLoader will create (\d+) worker processes in total\. Our suggested max number of worker in "
     r"current system is (\d+)", "--num-workers {0} is more than the {1} CPUs this process may use: loading may "
     "slow down or freeze (give --num-workers {1} or fewer)"),
)
PACKAGE = Path(__file__).resolve().parent


def _source(filename: str) -> str | None:
    """The top-level package a warning came from (None: ours, or unknown)."""
    path = Path(filename).resolve()
    if PACKAGE in path.parents:
        return None
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] in ("site-packages", "dist-packages"):
            return parts[i].removesuffix(".py")
    return None


def note_line(prefix: str, message: Warning | str, category: type[Warning], filename: str) -> str:
    """A warning as one console line: ``PREFIX: note: MESSAGE``, in our words where :data:`RETOLD` has it, else
    naming the package it came from when not ours."""
    text = " ".join(str(message).split())
    source = _source(filename)
    for package, pattern, note in RETOLD:
        found = re.match(pattern, text) if source == package else None
        if found:
            return f"{prefix}: note: {note.format(*found.groups())}"
    return f"{prefix}: note: {text}" + (f" ({source} {category.__name__})" if source else "")


@contextmanager
def console_warnings(prefix: str) -> Iterator[None]:
    """Within: the :data:`HARMLESS` third-party warnings are dropped and every other warning is one line on stderr
    (:func:`note_line`), once, instead of Python's file, line and source dump."""

    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = note_line(prefix, message, category, filename)
        if text not in shown:  # the same warning from several places (or loaders) once
            shown.add(text)
            print(text, file=file or sys.stderr)

    with warnings.catch_warnings():
        for module, message in HARMLESS:
            warnings.filterwarnings("ignore", message=message, module=module)
        warnings.showwarning = show
        yield
