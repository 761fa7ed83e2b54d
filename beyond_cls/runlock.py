"""One writer per folder, and one kind of run per output folder.

:class:`FolderLock` creates ``<folder>/.beyond-cls.lock`` exclusively, holding the holder's host and pid (plus the
boot id and the pid's start time where ``/proc`` has them). A second process is refused with one line naming
the holder. A lock left by a process that is gone (same host; pid not alive, reused, or from before a reboot)
is taken over. A holder on another host (or in another PID namespace) cannot be checked: instead, while it holds
the lock it touches the file every :data:`HEARTBEAT_S` seconds, and a lock whose heartbeat is
:data:`STALE_BEATS` beats old (5 minutes) is taken over: a job hard-killed on one node does not block its
requeued run on another. Ages are read on the file system's own clock (a file written there), so clock skew
between nodes does not count. Locks written without a heartbeat (earlier versions) are never taken by age: the
line says which file to delete.

:func:`claim_output` holds the lock of a command's ``--out`` and records the kind of run in ``run.json`` (for
folders written before it, the kind follows from their result files). Another kind of run in the same folder
is refused, so no stale file of the earlier run is left looking like an output of the new one.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from beyond_cls.config import ConfigError

__all__ = ["KINDS", "LOCK_FILE", "RUN_FILE", "FolderBusy", "FolderLock", "claim_output", "folder_kind", "writes_out"]

LOCK_FILE = ".beyond-cls.lock"
RUN_FILE = "run.json"
HEARTBEAT_S = 30.0  # a holder touches its lock file this often
STALE_BEATS = 10  # a lock whose last touch is this many beats old is taken over (holders elsewhere)
KINDS = {
    "probe": "beyond-cls probe",
    "analyze": "beyond-cls analyze of one model",
    "analyze-models": "beyond-cls analyze of several models",
    "aggregations": "beyond-cls aggregations",
    "localize": "beyond-cls localize",
    "compare": "beyond-cls compare",
}
# Folders written before run.json existed: the kind of the first result file found (glob patterns, in order).
_LEGACY = (
    ("analyze_models.json", "analyze-models"), ("attention_stats.json", "analyze"), ("seed*/checkpoint.pt", "probe"),
    ("aggregations.json", "aggregations"), ("localization.json", "localize"), ("summary_by_model.csv", "compare"),
)
F = TypeVar("F", bound=Callable[..., Any])


class FolderBusy(ConfigError):
    """Another live process holds the folder's lock; the message names it."""


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _boot_id() -> str | None:
    return _read(Path("/proc/sys/kernel/random/boot_id"))


def _start_time(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of ``/proc/<pid>/stat``), None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text[text.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _pid_namespace() -> str | None:
    """This process's PID namespace (``pid:[4026531836]``), None where ``/proc`` does not say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _identity() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pidns": _pid_namespace(), "boot": _boot_id(),
            "start": _start_time(pid), "since": time.strftime("%Y-%m-%d %H:%M:%S"), "heartbeat": HEARTBEAT_S}


def _stale_after(holder: dict[str, Any]) -> float | None:
    """Seconds after its last heartbeat that ``holder``'s lock is stale; None: it does not beat."""
    beat = holder.get("heartbeat")
    if isinstance(beat, bool) or not isinstance(beat, (int, float)) or not 0 < beat < 86400:
        return None
    return STALE_BEATS * beat


def _file_system_now(folder: Path) -> float:
    """The current time on ``folder``'s file system clock (the mtime of a file touched there), else this host's."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{LOCK_FILE}.clock.", suffix=".tmp", dir=folder)
    except OSError:
        return time.time()
    try:
        os.close(fd)
        os.utime(probe)
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()
    finally:
        with suppress(OSError):
            os.unlink(probe)


def _checkable(holder: dict[str, Any]) -> bool:
    """Whether ``holder``'s pid can be looked up here: same host and PID namespace (containers sharing a
    hostname through host networking have PID namespaces of their own)."""
    return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and holder.get("pidns") == _pid_namespace())


def _gone(holder: dict[str, Any]) -> bool:
    """True when ``holder`` certainly no longer runs: checkable here, and its pid is dead, reused or pre-reboot."""
    if not _checkable(holder):
        return False
    if holder.get("boot") and _boot_id() and holder["boot"] != _boot_id():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    start = _start_time(holder["pid"])
    return bool(holder.get("start") and start and holder["start"] != start)


class FolderLock:
    """``with FolderLock(folder):`` this process is the folder's only writer (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._mine: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = json.dumps(_identity())
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                seen = self._holder_text()
                holder = _parse(seen)
                age = None if holder is None or _checkable(holder) else self._heartbeat_age()
                if seen is not None and (holder is None or not (_gone(holder) or self._stale(holder, age))):
                    raise FolderBusy(self._busy(holder, age)) from None
                if seen is not None:
                    self._take_over(seen)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(mine)
            except BaseException:  # e.g. a full disk: an empty lock file would block the folder for good
                self.path.unlink(missing_ok=True)
                raise
            self._mine = mine
            self._stop.clear()
            self._beat = threading.Thread(target=self._beating, args=(mine,), daemon=True, name="lock heartbeat")
            self._beat.start()
            return self
        raise FolderBusy(f"{self.what} {self.folder}: could not take {self.path} (other processes keep taking it)")

    def _beating(self, mine: str) -> None:
        """Touch the lock file every HEARTBEAT_S seconds while it is this process's."""
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if _read(self.path) != mine:
                    return
                os.utime(self.path)
            except OSError:
                pass  # a file system hiccup: the next beat tries again

    def _heartbeat_age(self) -> float | None:
        """Seconds since the lock file was last touched, on the file system's clock; None if it is gone."""
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return None
        return max(0.0, _file_system_now(self.folder) - mtime)

    @staticmethod
    def _stale(holder: dict[str, Any], age: float | None) -> bool:
        limit = _stale_after(holder)
        return limit is not None and age is not None and age >= limit

    def release(self) -> None:
        """Stop the heartbeat; remove the lock file if it is still this process's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        if self._mine is not None and _read(self.path) == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _holder_text(self) -> str | None:
        """The lock file's text; a file just created is given a moment to be written."""
        for _ in range(10):
            text = _read(self.path)
            if text is None or _parse(text) is not None:
                return text
            time.sleep(0.05)
        return text

    def _take_over(self, seen: str) -> None:
        """Move a dead holder's lock aside; if it changed meanwhile (taken over by another), put it back."""
        aside = self.path.with_name(f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.stale")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if _read(aside) != seen:
            with suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _busy(self, holder: dict[str, Any] | None, age: float | None) -> str:
        if holder is None:
            return (f"{self.what} {self.folder} is locked ({self.path} is unreadable); if no process is writing "
                    "there, delete that file")
        who = f"pid {holder.get('pid')} on host {holder.get('host')}"
        since = f" since {holder['since']}" if holder.get("since") else ""
        limit = _stale_after(holder)
        if limit is not None and age is not None:
            return (f"{self.what} {self.folder} is in use by {who}{since} (heartbeat {age:.0f} s ago); wait for it "
                    f"or use another folder: if that process is gone, its lock is taken over once it is {limit:.0f} "
                    "s old")
        return (f"{self.what} {self.folder} is in use by {who}{since}; wait for it, use another folder, or delete "
                f"{self.path} if that process is gone")


def _parse(text: str | None) -> dict[str, Any] | None:
    try:
        holder = json.loads(text or "")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def folder_kind(out: str | os.PathLike) -> str | None:
    """The kind of run whose outputs ``out`` holds (``run.json``, else its result files); None: none."""
    out = Path(out)
    recorded = _parse(_read(out / RUN_FILE))
    if recorded is not None and isinstance(recorded.get("kind"), str):
        return recorded["kind"]
    return next((kind for pattern, kind in _LEGACY if any(out.glob(pattern))), None)


def _remove_temporaries(out: Path) -> None:
    """Delete atomic-write temporaries (``.<name>[.<random>].tmp``) a killed run left in ``out`` and its subfolders."""
    for pattern in (".*.tmp", "*/.*.tmp"):
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink(missing_ok=True)


@contextmanager
def claim_output(out: str | os.PathLike, kind: str) -> Iterator[Path]:
    """Hold ``out``'s lock for a run of ``kind`` (a :data:`KINDS` key); ConfigError if another kind wrote it.

    Leftover temporaries of a killed run are removed. A run that fails before writing anything leaves no
    ``run.json`` (and no folder it created) behind.
    """
    out = Path(out)
    created = not out.exists()
    lock = FolderLock(out).acquire()
    recorded = False
    try:
        held = folder_kind(out)
        if held is not None and held != kind:
            raise ConfigError(
                f"--out {out} holds the outputs of {KINDS.get(held, held)}, not of {KINDS[kind]}; "
                "use another --out (or delete that folder)"
            )
        if not (out / RUN_FILE).exists():
            (out / RUN_FILE).write_text(json.dumps({"kind": kind}) + "\n")
            recorded = True
        _remove_temporaries(out)
        yield out
    except BaseException:
        if recorded and {p.name for p in out.iterdir()} <= {RUN_FILE, LOCK_FILE}:
            (out / RUN_FILE).unlink(missing_ok=True)
        raise
    finally:
        lock.release()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def writes_out(kind: str | Callable[[Any], str]) -> Callable[[F], F]:
    """Decorate ``job(cfg, ...)`` to run under :func:`claim_output` of ``cfg.out`` (``kind``: a str or f(cfg))."""

    def wrap(job: F) -> F:
        @functools.wraps(job)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            with claim_output(cfg.out, kind(cfg) if callable(kind) else kind):
                return job(cfg, *args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
