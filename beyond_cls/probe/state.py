"""Training-state files: atomic writes, safe reads, and the preemption signals that trigger them."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from beyond_cls.fileio import write_atomic
from beyond_cls.models.checkpoint import read_checkpoint
from beyond_cls.models.errors import CheckpointError

__all__ = ["STATE_FILE", "STATE_VERSION", "PreemptionWatch", "load_state", "save_atomic"]

STATE_FILE = "checkpoint.pt"
STATE_VERSION = 1
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flush it to disk, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn one (the temporary it
    may leave is removed by the next run's :func:`~beyond_cls.runlock.claim_output`). The file gets the mode
    ``open()`` would give (group-readable under the usual umask), not mkstemp's 0600.
    """
    return write_atomic(path, lambda f: torch.save(obj, f))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by :func:`save_atomic` (``weights_only`` unpickling)."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != "beyond_cls.probe":
        raise CheckpointError(path, "not a beyond-cls probe checkpoint (no 'format': 'beyond_cls.probe')")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(path, f"probe checkpoint version {state.get('version')}, expected {STATE_VERSION}")
    return state


class PreemptionWatch:
    """Within ``with``: SIGTERM / SIGUSR1 set :attr:`signal_name` instead of killing the process.

    The trainer polls it at optimizer-step boundaries, saves, and exits. Handlers are restored on exit.
    Only the main thread can install handlers; elsewhere the watch stays inert.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> PreemptionWatch:
        for name in PREEMPTION_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for a process ended by that signal."""
        return 128 + int(getattr(signal, self.signal_name or "SIGTERM"))
