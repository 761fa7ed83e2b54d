"""Training-state files: atomic writes, safe reads, and the preemption signals that trigger them.

Slurm (at the end of a job's time or on preemption), ``timeout`` and torchrun's agent send SIGTERM to every
process of the job, DataLoader workers included. The main process notes the signal (:class:`PreemptionWatch`),
saves at the next optimizer-step boundary and exits 143; its loader workers must keep serving batches until then,
so they leave such signals to it (:func:`ignore_job_signals`, their ``worker_init_fn``). A signal from the
worker's own main process (torch stopping a worker that did not quit) still ends the worker.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from beyond_cls.fileio import write_atomic
from beyond_cls.models.checkpoint import read_checkpoint
from beyond_cls.models.errors import CheckpointError

__all__ = ["READABLE_VERSIONS", "STATE_FILE", "STATE_VERSION", "PreemptionWatch", "ignore_job_signals", "load_state",
           "save_atomic"]

STATE_FILE = "checkpoint.pt"
# 2: the authors' epoch ends (micro-batch drop_last, lr spaced per micro-batch, leftover micro-batches forwarded
# without a step). 1: whole optimizer steps dropped at the epoch end, lr spaced per step: its finished runs are
# still read (results, heads); an unfinished one cannot be continued (probe.trainer.check_resumable).
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
WORKER_SIGNALS = (*PREEMPTION_SIGNALS, "SIGINT")  # Ctrl-C reaches the terminal's whole process group too


def ignore_job_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: SIGTERM, SIGUSR1 and SIGINT from anyone but the worker's main process are
    ignored (the main process handles them; torch's default would end the worker and fail the main process's next
    batch). A thread takes them with ``sigwaitinfo`` to see the sender: one from the main process (torch ending
    a worker at shutdown) ends the worker as before. Where ``sigwaitinfo`` is missing (macOS), nothing changes."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    signums = {getattr(signal, name) for name in WORKER_SIGNALS if hasattr(signal, name)}
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)  # threads started later inherit the mask
    threading.Thread(target=_sort_signals, args=(signums, os.getppid()), daemon=True,
                     name="job signals").start()


def _sort_signals(signums: set[int], parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(signums)
        if info.si_pid == parent:
            os._exit(128 + info.si_signo)  # as the signal's default action would (no cleanup: none is due)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flush it to disk, then rename over ``path``.

    A crash at any moment leaves either the previous file or the new one, never a torn one (the temporary it
    may leave is removed by the next run's :func:`~beyond_cls.runlock.claim_output`). The file gets the mode
    ``open()`` would give (group-readable under the usual umask), not mkstemp's 0600.
    """
    return write_atomic(path, lambda f: torch.save(obj, f))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state written by :func:`save_atomic` (``weights_only`` unpickling), of any version in
    :data:`READABLE_VERSIONS`."""
    state = read_checkpoint(path)
    if not isinstance(state, dict) or state.get("format") != "beyond_cls.probe":
        raise CheckpointError(path, "not a beyond-cls probe checkpoint (no 'format': 'beyond_cls.probe')")
    if state.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(path, f"probe checkpoint version {state.get('version')}, expected one of "
                                    f"{', '.join(map(str, READABLE_VERSIONS))}")
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
