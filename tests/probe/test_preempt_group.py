"""SIGTERM to the whole process group, as Slurm and ``timeout`` send it: the DataLoader workers get it too, and the
run still saves at the signal, exits 143 and resumes to the results of an uninterrupted run, on one process and
under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from beyond_cls.data import make_synthetic_dataset
from beyond_cls.probe.state import ignore_job_signals, load_state
from tests.tiny_probe import TINY, TINY_SET

# one optimizer step per epoch (24 images, effective batch 24), images from 2 loader workers per process
SETTINGS = dict(TINY, epochs=3, warmup_epochs=1, effective_batch=24, num_workers=2, ckpt_minutes=1000, heads="mean",
                lrs="1.0")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("group") / "set", TINY_SET)


def _command(dataset: Path, out: Path, launcher: list[str]) -> list[str]:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items() if k != "progress"]
    return [*launcher, "-m", "beyond_cls.cli", "probe", *flags, "--no-progress", f"--data={dataset}", f"--out={out}"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_stopped(pids: Callable[[], list[int]], count: int, proc: subprocess.Popen) -> None:
    """Wait until ``count`` of the processes ``pids()`` stopped themselves (BEYOND_CLS_FAULT=STOP@1)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if sum(_state(p) == "T" for p in pids()) >= count:
            return
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before it stopped: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run did not reach its first optimizer step in time")


def _bank(out: Path) -> dict[str, torch.Tensor]:
    return load_state(out / "seed0" / "checkpoint.pt")["bank"]


@pytest.mark.parametrize("launcher", ["one process", "torchrun"])
def test_sigterm_to_the_process_group_saves_exits_143_and_resumes(dataset, tmp_path, launcher):
    launch = [sys.executable] if launcher == "one process" else TORCHRUN
    whole = subprocess.run(_command(dataset, tmp_path / "whole", launch), capture_output=True, text=True,
                           timeout=600, env=_env())
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(_command(dataset, tmp_path / "cut", launch), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(BEYOND_CLS_FAULT="STOP@1"),
                            start_new_session=True)
    try:
        ranks = (lambda: [proc.pid]) if launcher == "one process" else (lambda: _children(proc.pid))
        _wait_stopped(ranks, 1 if launcher == "one process" else 2, proc)
        groups = {proc.pid, *ranks()}  # torchrun starts each rank in a process group of its own
        for group in groups:  # every process of the job, as Slurm signals it: launcher, ranks, loader workers
            os.killpg(group, signal.SIGTERM)
        for group in groups:
            os.killpg(group, signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    messages = [line for line in err.splitlines() if "SIGTERM received: saved" in line]
    assert len(messages) == (1 if launcher == "one process" else 2), err[-3000:]
    assert "DataLoader worker" not in err and "exited unexpectedly" not in err
    if launcher == "one process":
        assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    state = load_state(tmp_path / "cut" / "seed0" / "checkpoint.pt")
    assert state["final"] is None and state["global_step"] == 2  # saved at the step boundary after the signal
    resumed = subprocess.run(_command(dataset, tmp_path / "cut", launch), capture_output=True, text=True,
                             timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("whole", "cut"))
    assert json.dumps(a) == json.dumps(b)
    for key, value in _bank(tmp_path / "whole").items():
        torch.testing.assert_close(_bank(tmp_path / "cut")[key], value, rtol=0, atol=0, msg=key)


class _Pids(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> int:
        return os.getpid()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="no sigwaitinfo: workers keep torch's handling")
def test_loader_workers_leave_job_signals_to_their_main_process():
    loader = torch.utils.data.DataLoader(_Pids(), batch_size=1, num_workers=1, worker_init_fn=ignore_job_signals,
                                         persistent_workers=True)
    batches = iter(loader)
    pid = int(next(batches))
    for name in ("TERM", "USR1", "INT"):  # from another process, as Slurm, timeout or torchrun's agent send them
        subprocess.run(["kill", f"-{name}", str(pid)], check=True)
    time.sleep(0.5)
    assert [int(next(batches)) for _ in range(3)] == [pid] * 3
    del batches


def test_a_failed_run_still_ends_its_loader_workers():
    """torch ends a worker that did not quit with SIGTERM from the main process: that one is not ignored, so a
    process whose loader failed exits instead of waiting for its worker forever."""
    script = (
        "import torch\n"
        "from beyond_cls.probe.state import ignore_job_signals\n"
        "class Bad(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): raise ValueError('unreadable')\n"
        "loader = torch.utils.data.DataLoader(Bad(), num_workers=1, worker_init_fn=ignore_job_signals,\n"
        "                                     persistent_workers=True)\n"
        "failed = []\n"
        "try:\n"
        "    next(iter(loader))\n"
        "except ValueError as exc:\n"
        "    failed.append(exc)\n"
        "raise SystemExit(3 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
