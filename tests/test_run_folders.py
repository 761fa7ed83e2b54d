"""Output and cache folders: one writer at a time, one kind of run, resumes only with the same training settings,
no leftover temporaries, group-readable files."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from beyond_cls.analysis import AttentionSummary
from beyond_cls.analysis.aggregations import AggregationsConfig, aggregations
from beyond_cls.analysis.analyze import AnalyzeConfig, analyze
from beyond_cls.analysis.compare import compare
from beyond_cls.analysis.localize import LocalizeConfig, localize
from beyond_cls.cli import main
from beyond_cls.config import ConfigError
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.probe import NonFiniteLoss, ProbeConfig, run
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.state import load_state, save_atomic
from beyond_cls.probe.trainer import RESUME_KEYS, check_resumable
from beyond_cls.runlock import LOCK_FILE, RUN_FILE, FolderBusy, FolderLock, _pid_namespace, claim_output, folder_kind
from tests.tiny_probe import TINY_SET

TINY = dict(model="vit_tiny_patch16_224", img_size=32, epochs=2, warmup_epochs=1, batch_size=4, effective_batch=8,
            num_workers=0, progress=False, heads="mean,abmilp", lrs="1.0", device="cpu")
ANALYZE = dict(model="vit_tiny_patch16_224", img_size=32, batch_size=4, max_images=4, num_workers=0, progress=False,
               device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders") / "set"
    return make_synthetic_dataset(root, TINY_SET)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **holder) -> Path:
    """A lock file of ``holder``, in this process's PID namespace unless it says otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"pidns": _pid_namespace(), **holder}))
    return path


# ------------------------------------------------------------------------------------------------ the lock
def test_second_writer_is_refused_with_one_line_naming_the_holder(tmp_path):
    with FolderLock(tmp_path / "out"), pytest.raises(FolderBusy) as exc:
        FolderLock(tmp_path / "out").acquire()
    message = str(exc.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "\n" not in message
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released
    FolderLock(tmp_path / "out").acquire().release()


_NO_PROC = pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/stat").exists(),
                              reason="no /proc: pid start times and boot ids are unknown")


@pytest.mark.parametrize("how", ["dead pid", pytest.param("reused pid", marks=_NO_PROC),
                                 pytest.param("rebooted", marks=_NO_PROC)])
def test_a_gone_holder_on_this_host_is_taken_over(tmp_path, how):
    holder = {"host": socket.gethostname(), "pid": _dead_pid()}
    if how == "reused pid":  # our own (live) pid, but it started at another time than the holder did
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": "1"}
    if how == "rebooted":
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "boot": "another-boot"}
    path = _write_lock(tmp_path, **holder)
    lock = FolderLock(tmp_path).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists() and not list(tmp_path.glob("*.stale"))


def test_a_killed_holder_is_detected_and_its_lock_taken_over(tmp_path):
    code = "import sys, time; from beyond_cls.runlock import FolderLock; FolderLock(sys.argv[1]).acquire(); " \
           "print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"in use by pid {holder.pid} on host"):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    FolderLock(tmp_path).acquire().release()


def test_a_dead_pid_in_another_pid_namespace_is_not_taken_for_gone(tmp_path):
    """A container with the same hostname (host networking) has its own pids: they cannot be checked here."""
    _write_lock(tmp_path, host=socket.gethostname(), pid=_dead_pid(), pidns="pid:[1]")
    with pytest.raises(FolderBusy):
        FolderLock(tmp_path).acquire()


def test_a_holder_on_another_host_is_refused_with_the_file_to_delete(tmp_path):
    path = _write_lock(tmp_path, host="some-other-node", pid=_dead_pid(), since="2024-01-01 00:00:00")
    with pytest.raises(FolderBusy, match=f"pid .* on host some-other-node since 2024.*delete {path}"):
        FolderLock(tmp_path).acquire()


def _age(path: Path, seconds: float) -> None:
    """Make the lock's last heartbeat ``seconds`` old (by the clock of its file system: a file written now)."""
    probe = path.with_name("clock")
    probe.write_text("")
    now = probe.stat().st_mtime
    probe.unlink()
    os.utime(path, (now - seconds, now - seconds))


def test_a_lock_from_another_host_is_taken_over_once_its_heartbeat_stops(tmp_path):
    """A job hard-killed on another node leaves its lock; the requeued job takes it once the heartbeat is old."""
    path = _write_lock(tmp_path, host="some-other-node", pid=1234, heartbeat=30)
    _age(path, 100)
    with pytest.raises(FolderBusy, match=r"on host some-other-node .*heartbeat 10\d s ago.*taken over once it is "
                                         r"300 s old"):
        FolderLock(tmp_path).acquire()
    _age(path, 301)
    lock = FolderLock(tmp_path).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid() and json.loads(path.read_text())["heartbeat"] > 0
    lock.release()
    assert not path.exists()


def test_a_lock_without_heartbeat_is_never_taken_by_age(tmp_path):
    """Locks of earlier versions do not beat: their age says nothing about their holder."""
    path = _write_lock(tmp_path, host="some-other-node", pid=1234)
    _age(path, 10**6)
    with pytest.raises(FolderBusy, match=f"delete {path}"):
        FolderLock(tmp_path).acquire()


def test_a_held_lock_beats_and_stops_beating_when_released(tmp_path, monkeypatch):
    import beyond_cls.runlock as runlock

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = FolderLock(tmp_path).acquire()
    _age(lock.path, 1000)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and time.time() - lock.path.stat().st_mtime > 100:
        time.sleep(0.02)
    assert time.time() - lock.path.stat().st_mtime < 100  # beaten again
    thread = lock._beat
    lock.release()
    assert not lock.path.exists() and thread is not None and not thread.is_alive()


def test_release_leaves_a_successors_lock_alone(tmp_path):
    lock = FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


def test_every_command_writing_an_out_takes_its_lock(dataset, tmp_path, capsys):
    out = tmp_path / "busy"
    stats = _summary("m").save(tmp_path / "m.json")
    with FolderLock(out):
        argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--data", str(dataset), "--out", str(out),
                "--device", "cpu", "--num-workers", "0"]
        assert main(["probe", *argv, "--epochs", "2", "--warmup-epochs", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err and "in use" in err
        jobs = [
            lambda: analyze(AnalyzeConfig(data=str(dataset), out=str(out), **ANALYZE)),
            lambda: aggregations(AggregationsConfig(data=str(dataset), out=str(out), heads="attn-mean",
                                                    **ANALYZE)),
            lambda: localize(LocalizeConfig(data=str(dataset), out=str(out), boxes=str(tmp_path), heads=["cls-attn"],
                                            **ANALYZE)),
            lambda: compare([stats], out),
        ]
        for job in jobs:
            with pytest.raises(FolderBusy, match="in use by"):
                job()
    assert not any(out.iterdir())  # each refused run left nothing behind


def test_a_cache_folder_being_filled_is_locked(dataset, tmp_path):
    cache = tmp_path / "cache"
    run(dict(TINY, data=str(dataset), out=str(tmp_path / "a"), cache=str(cache)))
    shard = next(cache.glob("*/train_v0.done"))
    shard.unlink()  # incomplete again: the next run must fill it
    busy = f"feature cache {shard.parent} is in use by pid {os.getpid()}"
    with FolderLock(shard.parent, "feature cache"), pytest.raises(FolderBusy, match=busy):
        run(dict(TINY, data=str(dataset), out=str(tmp_path / "b"), cache=str(cache)))
    run(dict(TINY, data=str(dataset), out=str(tmp_path / "b"), cache=str(cache)))
    assert shard.exists() and not list(cache.rglob(LOCK_FILE))


# ------------------------------------------------------------------------------------------------ resuming
def _state(cfg: ProbeConfig) -> dict:
    return {"config": dataclasses.asdict(cfg), "seed": 0, "effective_batch": 8}


SAME = ProbeConfig(**TINY, data="set", out="o")


@pytest.mark.parametrize("change", [
    dict(data="other"), dict(dataset="cub"), dict(subset_file="subset.txt"), dict(checkpoint_format="mae"),
    dict(arch="vit_small_patch16_224"), dict(source="student"), dict(cache="c"),  # cache: one view, not fresh ones
    dict(cache_views=2), dict(heads="mean"), dict(epochs=3), dict(mean="0.5,0.5,0.5"), dict(crop="torchvision"),
    dict(head_init="mae"),
])
def test_settings_that_change_what_is_trained_refuse_a_resume(change):
    key = next(iter(change))
    with pytest.raises(ConfigError, match=f"({'views' if key.startswith('cache') else key}): .* → "):
        check_resumable(Path("ckpt.pt"), _state(SAME), dataclasses.replace(SAME, **change), 0, 8)


@pytest.mark.parametrize("change", [
    dict(num_workers=3), dict(decode="gpu"), dict(precision="bf16"), dict(log_every=1), dict(ckpt_minutes=1.0),
    dict(progress=True), dict(data=os.path.join(".", "set")), dict(data=os.path.abspath("set")),
    dict(cache="c", cache_views=None),
])
def test_speed_and_logging_settings_and_path_spellings_resume(change):
    saved = dataclasses.replace(SAME, cache_views=1) if "cache" in change else SAME
    check_resumable(Path("ckpt.pt"), _state(saved), dataclasses.replace(SAME, **change), 0, 8)


def test_every_probe_setting_is_classified():
    """A new ProbeConfig field must be added to RESUME_KEYS or, if it only changes speed or logging, here."""
    speed_only = {"out", "weights_dir", "batch_size", "accum_iter", "effective_batch", "seeds", "eval_every",
                  "num_workers", "decode", "cache", "cache_views", "cache_dtype", "ckpt_minutes", "resume", "compile",
                  "cuda_graphs", "channels_last", "precision", "skip_bad_images", "device", "log_every", "progress",
                  "eval"}
    fields = {f.name for f in dataclasses.fields(ProbeConfig)}
    assert fields - set(RESUME_KEYS) == speed_only  # cache, cache_views: through "views"; effective batch, seeds:
    assert set(RESUME_KEYS) - fields == {"views"}   # checked apart


def test_a_finished_run_rerun_with_other_data_is_refused_before_anything_is_written(dataset, tmp_path):
    out = tmp_path / "run"
    first = run(dict(TINY, data=str(dataset), out=str(out)))
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    config, results = (out / "config.yaml").read_text(), (out / "results.json").read_text()
    with pytest.raises(ConfigError, match=re.escape(f"data: '{dataset}' → '{other}'")):
        run(dict(TINY, data=str(other), out=str(out)))
    assert (out / "config.yaml").read_text() == config and (out / "results.json").read_text() == results
    again = run(dict(TINY, data=str(dataset), out=str(out)))  # the same settings: the finished run's numbers
    assert again["rows"] == first["rows"]
    state = out / "seed0" / "checkpoint.pt"
    config, results = (out / "config.yaml").read_text(), (out / "results.json").read_text()
    with pytest.raises(ConfigError, match="data:"):  # an explicit --resume PATH is checked as early, keeps results
        run(dict(TINY, data=str(other), out=str(out), resume=str(state)))
    assert (out / "config.yaml").read_text() == config and (out / "results.json").read_text() == results
    with pytest.raises(ValueError, match="missing"):  # a fresh start failing early: no stale results left
        run(dict(TINY, data=str(tmp_path / "missing"), out=str(out), resume="none"))
    assert not (out / "results.json").exists() and not (out / "results.csv").exists()
    run(dict(TINY, data=str(other), out=str(out), resume="none", epochs=1, warmup_epochs=0))
    assert load_state(out / "seed0" / "checkpoint.pt")["config"]["data"] == str(other)


# ------------------------------------------------------------------------------------------------ leftovers
def test_temporaries_of_a_killed_run_are_removed_at_the_next_start(tmp_path):
    seed = tmp_path / "seed0"
    seed.mkdir(parents=True)
    left = [seed / ".checkpoint.pt.k2j3h4.tmp", tmp_path / ".results.json.tmp", seed / ".metrics.jsonl.tmp"]
    for path in left:
        path.write_bytes(b"torn")
    (seed / "keep.tmp").write_bytes(b"not ours")
    with claim_output(tmp_path, "probe"):
        assert not any(p.exists() for p in left) and (seed / "keep.tmp").exists()


def test_non_finite_loss_before_any_checkpoint_names_none(dataset, tmp_path, monkeypatch):
    forward = TokenSource.forward
    monkeypatch.setattr(TokenSource, "forward", lambda self, images: forward(self, images) * float("nan"))
    with pytest.raises(NonFiniteLoss) as exc:
        run(dict(TINY, data=str(dataset), out=str(tmp_path), ckpt_minutes=1000))
    assert not (tmp_path / "seed0" / "checkpoint.pt").exists()
    assert "checkpoint.pt" not in str(exc.value) and "no checkpoint of this run was saved" in str(exc.value)


# ------------------------------------------------------------------------------------------------ kinds of run
def test_an_analyze_folder_is_not_reused_by_another_kind_of_run(dataset, tmp_path):
    out = tmp_path / "flow"
    analyze(AnalyzeConfig(data=str(dataset), out=str(out), **ANALYZE))
    assert folder_kind(out) == "analyze"
    with pytest.raises(ConfigError, match="holds the outputs of beyond-cls analyze of one model, not of beyond-cls "
                                          "probe"):
        run(dict(TINY, data=str(dataset), out=str(out)))
    several = {**ANALYZE, "model": ["vit_tiny_patch16_224", "vit_small_patch16_224"]}
    with pytest.raises(ConfigError, match="not of beyond-cls analyze of several models"):
        analyze(AnalyzeConfig(data=str(dataset), out=str(out), **several))
    with pytest.raises(ConfigError, match="not of beyond-cls compare"):
        compare([out], out)
    analyze(AnalyzeConfig(data=str(dataset), out=str(out), **ANALYZE))  # the same kind again: fine
    assert not (out / "analyze_models.json").exists() and not (out / "config.yaml").exists()


@pytest.mark.parametrize("marker,kind", [
    ("attention_stats.json", "analyze"), ("seed3/checkpoint.pt", "probe"), ("analyze_models.json", "analyze-models"),
    ("summary_by_model.csv", "compare"),
])
def test_folders_from_before_run_json_are_recognized_by_their_results(tmp_path, marker, kind):
    (tmp_path / marker).parent.mkdir(exist_ok=True)
    (tmp_path / marker).write_text("{}")
    other = "localize" if kind != "localize" else "probe"
    with pytest.raises(ConfigError, match="holds the outputs of"), claim_output(tmp_path, other):
        pass
    with claim_output(tmp_path, kind):
        pass
    assert json.loads((tmp_path / RUN_FILE).read_text()) == {"kind": kind}


def test_a_run_failing_before_writing_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError), claim_output(tmp_path / "new", "probe"):
        raise RuntimeError("data not found")
    assert not (tmp_path / "new").exists()


def _summary(model: str, depth: int = 3) -> AttentionSummary:
    grid = torch.rand(depth, 2, dtype=torch.float64)
    return AttentionSummary(patch_self=grid, patch_patch_entropy=grid + 1, cls_self=grid, cls_patch_entropy=grid + 2,
                            patch_cls=grid, cls_patch_mass=grid, num_images=4, num_prefix_tokens=1, num_patches=4,
                            model=model)


def test_compare_expands_a_multi_model_analyze_folder(tmp_path):
    flow = tmp_path / "flow"
    labels = {"mae_vit_base_patch16": "mae", "dino_vit_base_patch16": "dino"}
    for label, sub in labels.items():
        _summary(label).save(flow / sub / "attention_stats.json")
    index = {label: {"model": label, "checkpoint": None, "subfolder": sub} for label, sub in labels.items()}
    (flow / "analyze_models.json").write_text(json.dumps(index))
    _summary("ibot_vit_base_patch16").save(tmp_path / "ibot.json")
    result = compare([flow, tmp_path / "ibot.json"], tmp_path / "cmp")
    assert [r["model"] for r in result["rows"]] == [*labels, "ibot_vit_base_patch16"]
    with pytest.raises(ValueError, match=r"names has 2 entries for 3 inputs \(a multi-model"):
        compare([flow, tmp_path / "ibot.json"], tmp_path / "cmp", names=["a", "b"])
    heads = sorted(p.name for p in (tmp_path / "cmp").glob("heads_*.png"))
    compare([flow], tmp_path / "cmp")  # fewer models: the third heatmap is not left behind
    assert len(heads) == 3 and len(list((tmp_path / "cmp").glob("heads_*.png"))) == 2


# ------------------------------------------------------------------------------------------------ file modes
@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_written_files_are_group_readable(tmp_path, umask_002):
    assert (save_atomic({"a": 1}, tmp_path / "checkpoint.pt").stat().st_mode & 0o777) == 0o664
    assert (_summary("m").save(tmp_path / "stats.json").stat().st_mode & 0o777) == 0o664
    root = make_synthetic_dataset(tmp_path / "set", SyntheticConfig(num_classes=2, train_per_class=1, val_per_class=1,
                                                                     image_size=32, object_size=(8, 12)))
    assert (root.stat().st_mode & 0o777) == 0o775
    with FolderLock(tmp_path / "o") as lock:
        assert (lock.path.stat().st_mode & 0o777) == 0o664


def test_a_failed_lock_write_leaves_no_lock_file(tmp_path, monkeypatch):
    """A full disk while writing the lock must not leave an empty lock that blocks the folder for good."""
    real = os.fdopen

    def full(fd, *args, **kwargs):
        handle = real(fd, *args, **kwargs)
        handle.write = lambda text: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return handle

    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(OSError, match="No space"):
        FolderLock(tmp_path).acquire()
    monkeypatch.setattr(os, "fdopen", real)
    assert not (tmp_path / LOCK_FILE).exists()
    FolderLock(tmp_path).acquire().release()
