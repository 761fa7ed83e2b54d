"""What rank 0 decides and holds for every process of a probe job: the output folder (locked, checked for resumable
checkpoints) and the feature-cache shards left to fill (their folders locked while they are filled)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from beyond_cls.config import ConfigError
from beyond_cls.probe.cache import FeatureCache
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv, all_gather_objects
from beyond_cls.probe.results import RESULTS_CSV, RESULTS_FILE
from beyond_cls.probe.state import STATE_FILE, load_state
from beyond_cls.probe.trainer import check_resumable
from beyond_cls.runlock import FolderLock, claim_output

__all__ = ["on_main", "output_folder", "shards_to_fill"]


def on_main(env: DistEnv, action: Callable[[], Any]) -> Any:
    """``action()`` on the main process only, its result given to every process; when it fails, every process
    raises (none is left waiting for the others)."""
    result, error = None, None
    if env.is_main:
        try:
            result = action()
        except Exception as exc:
            error = exc
    message = None if error is None else str(error) or type(error).__name__
    if env.distributed:
        message, result = all_gather_objects((message, result), env)[0]
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(message)
    return result


@contextmanager
def output_folder(cfg: ProbeConfig, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds ``--out`` (lock, kind "probe") for the whole run; the other processes write no file there.

    Before anything is written, every seed's checkpoint must be resumable by ``cfg`` (else config.yaml would be
    overwritten by a run that is then refused); a run that does not resume removes the results it replaces.
    """
    out = Path(cfg.out)

    def claim(held: ExitStack) -> None:
        held.enter_context(claim_output(out, "probe"))
        if cfg.resume != "none":
            _check_resumable(cfg, env)
            return
        for name in (RESULTS_FILE, RESULTS_CSV):
            (out / name).unlink(missing_ok=True)

    with ExitStack() as held:
        on_main(env, lambda: claim(held))
        yield


def _check_resumable(cfg: ProbeConfig, env: DistEnv) -> None:
    """ConfigError when ``--resume FILE`` is missing or a seed's checkpoint (``--resume auto``: those in the
    ``seed<k>/`` folders of ``--out``) cannot be continued by ``cfg`` (:func:`check_resumable`)."""
    if cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise ConfigError(f"--resume {cfg.resume}: file not found")
    accum, effective = cfg.accumulation(env.world_size)
    for seed in cfg.seed_list():
        path = Path(cfg.out) / f"seed{seed}" / STATE_FILE if cfg.resume == "auto" else Path(cfg.resume)
        if path.exists():
            check_resumable(path, load_state(path), cfg, seed, effective, (cfg.batch_size, env.world_size, accum))


@contextmanager
def shards_to_fill(
    caches: list[FeatureCache], split: str, view: int, env: DistEnv,
) -> Iterator[list[FeatureCache | None]]:
    """The caches whose shard ``(split, view)`` is incomplete (None for the complete ones), decided by rank 0.

    Rank 0 holds the folder lock of those caches until the shard is filled: every process of this job writes its
    rows there (in step through barriers), and another job about to fill the same folder is refused. Under the
    lock the shards are checked again, since a job that held it may just have filled them.
    """
    def decide(held: ExitStack) -> list[bool]:
        missing = [c for c in caches if not c.complete(split, view)]
        for folder in dict.fromkeys(c.dir for c in missing):
            held.enter_context(FolderLock(folder, "feature cache"))
        return [c in missing and not c.complete(split, view) for c in caches]

    with ExitStack() as held:
        fill = on_main(env, lambda: decide(held))
        yield [c if f else None for c, f in zip(caches, fill)]
