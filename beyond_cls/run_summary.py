"""What a run will do, said once at its start, and how long it has left.

:func:`format_settings` renders a block of resolved settings, built as data (a list of ``(label, value)`` rows,
see :func:`probe_rows` and :func:`analyze_rows`); :class:`RunClock` turns the measured time per unit of work
(micro-batch or batch) into an ETA for the whole run; :func:`progress_line` is the one-line log of runs without a
progress bar (Slurm logs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from beyond_cls.units import format_lr, format_lrs

if TYPE_CHECKING:
    from beyond_cls.models.info import EncoderInfo

__all__ = [
    "RunClock", "analyze_rows", "batch_line", "cache_state", "encoder_rows", "format_duration", "format_numbers",
    "format_settings", "probe_rows", "probe_units", "progress_line", "settings_dict",
]

Row = tuple[str, Any]


def format_duration(seconds: float | None) -> str:
    """``45s``, ``12m05s``, ``1h23m``, ``2d03h``; ``?`` when unknown (nothing measured yet)."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_numbers(values: Sequence[float], digits: int = 4) -> list[str]:
    """Each value as ``%g`` with ``digits`` significant digits, more where two different values would print
    alike (so 0.0031250 and 0.0031251 stay apart)."""
    for d in range(digits, 18):
        text = [f"{v:.{d}g}" for v in values]
        if len(set(text)) == len(set(values)):
            return text
    return [repr(v) for v in values]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "–"
    if isinstance(value, float):
        return format_numbers([value])[0]
    if isinstance(value, (list, tuple)):
        return "; ".join(_text(v) for v in value) if value else "–"
    return str(value)


def format_settings(rows: Sequence[Row], title: str) -> str:
    """``title`` then one aligned ``label  value`` line per row (lists joined by ``; ``, floats ``%.4g``)."""
    width = max((len(label) for label, _ in rows), default=0)
    return "\n".join([title, *(f"  {label.ljust(width)}  {_text(value)}" for label, value in rows)])


def settings_dict(rows: Sequence[Row]) -> dict[str, str]:
    """The rows as ``{label: rendered value}``, for a run's metadata file."""
    return {label: _text(value) for label, value in rows}


def encoder_rows(info: EncoderInfo, model: str, requested_format: str | None, seed: int | None = None,
                 prefix: str = "") -> list[Row]:
    """Model name, weights file (or random init), the checkpoint format as detected, source, hf notes."""
    fmt = info.checkpoint_format or "–"
    if info.checkpoint is not None and requested_format in (None, "auto"):
        fmt = f"{fmt} (detected)"
    weights = info.checkpoint if info.checkpoint is not None else f"none: random init (seed {seed})"
    arch = "" if info.name == model else f"{info.name}: "
    rows: list[Row] = [(f"{prefix}model", f"{model} ({arch}{info.depth} blocks, dim {info.embed_dim}, "
                                          f"{info.num_heads} attention heads)")]
    if model.startswith("hf:"):
        rows.append((f"{prefix}hf folder", model[3:]))
    rows += [(f"{prefix}checkpoint", weights), (f"{prefix}format", fmt), (f"{prefix}source", info.source)]
    if info.notes:
        rows.append((f"{prefix}loading notes", list(info.notes)))
    return rows


def _tokens(info: EncoderInfo) -> str:
    parts = ["[cls]"] if info.has_class_token else []
    if info.num_reg_tokens:
        parts.append(f"{info.num_reg_tokens} registers")
    parts.append(f"{info.num_patches} patches ({info.grid_size[0]}x{info.grid_size[1]})")
    return f"{info.num_tokens}: " + " + ".join(parts)


def _precision(precision: str, dtype: torch.dtype | None, device: torch.device) -> str:
    used = "none (fp32)" if dtype is None else str(dtype).removeprefix("torch.")
    return f"{precision}: autocast {used} on {device.type}"


def probe_rows(cfg: Any, info: EncoderInfo, *, device: torch.device, dtype: torch.dtype | None, world_size: int,
               accum: int, effective: int, train: tuple[int, int], val: tuple[int, int], micro_per_epoch: int,
               steps_per_epoch: int, eval_batches: int, block: int, blocks: list[int] | None, heads: int,
               cache: str | None) -> list[Row]:
    """The settings block of a probe run. ``train``/``val``: (images, classes); ``micro_per_epoch``,
    ``steps_per_epoch``: per process (the train sampler's); ``eval_batches``: per process and evaluation;
    ``block``: the token block (``blocks``: a layer-wise run's); ``heads``: the bank's size; ``cache``: its state."""
    base = cfg.base_lrs()
    if cfg.lr is not None:
        lrs: Row = ("lr (--lr, every head)", format_lr(cfg.lr))
    else:
        text = format_lrs([b * effective / 256 for b in base])
        lrs = (f"lr = blr x {effective}/256", ", ".join(f"{t} (blr {b})" for t, b in zip(text, format_lrs(base))))
    evals = probe_units(cfg.epochs, cfg.eval_every, 0, 1)
    leftover = micro_per_epoch - steps_per_epoch * accum
    where = f"block {block} of 0..{info.depth - 1}" if blocks is None else f"blocks {','.join(map(str, blocks))}"
    n_last = getattr(cfg, "n_last_blocks", None) or 1
    if n_last > 1:
        where = f"blocks {block - n_last + 1}..{block} of 0..{info.depth - 1} concatenated (--n-last-blocks)"
    views = cfg.views()
    seeds = cfg.seed_list()
    return [
        *encoder_rows(info, cfg.model, cfg.checkpoint_format, seeds[0]),
        ("token source", f"{where}, final norm {'on' if info.final_norm else 'off'}"),
        ("tokens", _tokens(info)),
        ("data", f"{cfg.dataset} at {cfg.data}" + (f" (subset {cfg.subset_file})" if cfg.subset_file else "")),
        ("train images", train[0]), ("train classes", train[1]),
        ("eval images", val[0]), ("eval classes", val[1]),
        ("unreadable images", "skipped and counted" if cfg.skip_bad_images else "stop the run"),
        ("processes", world_size), ("batch per process", cfg.batch_size), ("accumulation", accum),
        ("effective batch", effective),
        ("micro-batches/epoch", f"{micro_per_epoch} per process: {steps_per_epoch} steps x {accum}"
                                f" + {leftover} left over (forwarded, not stepped)"),
        ("heads", f"{heads}: {cfg.heads} x {len(base) if cfg.lr is None else 1} lr"
                  + ("" if blocks is None else f" x {len(blocks)} blocks")),
        lrs,
        ("optimizer", f"{cfg.optimizer}, momentum {cfg.momentum:g}, weight decay {cfg.weight_decay:g}, "
                      f"min lr {format_lr(cfg.min_lr)}"),
        ("epochs", cfg.epochs), ("warm-up epochs", float(cfg.warmup_epochs)),
        ("eval_every", f"{cfg.eval_every} ({evals} evaluations of {eval_batches} batches/process)"
                       if cfg.eval_every else f"0 (only at the end: {eval_batches} batches/process)"),
        ("seeds", f"{cfg.seeds} (one after another)" if len(seeds) > 1 else cfg.seeds),
        ("crop", cfg.crop),
        ("views", "a new view every epoch" if views is None else f"{views} augmented view(s) cycled over the epochs"),
        ("head init", cfg.head_init),
        ("precision", _precision(cfg.precision, dtype, device)),
        ("runtime", f"compile {'on' if cfg.compile else 'off'}, CUDA graphs {'on' if cfg.cuda_graphs else 'off'},"
                    f" {cfg.num_workers} workers"),
        ("cache", cache or "none: tokens from the encoder every epoch"),
        ("out", cfg.out),
    ]


def cache_state(shards: Sequence[tuple[str, bool]], folder: str) -> str:
    """``folder: hit``, ``miss (extracts train, val)`` or ``partial ...`` from ``(shard name, complete)``."""
    missing = list(dict.fromkeys(name for name, done in shards if not done))
    if not missing:
        return f"{folder}: hit ({len(shards)} shards complete)"
    state = "miss" if len(missing) == len(dict.fromkeys(n for n, _ in shards)) else "partial"
    return f"{folder}: {state} (extracts {', '.join(missing)} first)"


def analyze_rows(cfg: Any, encoders: Sequence[tuple[str, str, str | None, EncoderInfo]], *, device: torch.device,
                 dtype: torch.dtype | None, images: str, classes: int | None, batches: int) -> list[Row]:
    """The settings block of an analyze run: every encoder (label, model, requested checkpoint format, info), the
    data and how it is streamed."""
    rows: list[Row] = []
    for label, model, fmt, info in encoders:
        prefix = "" if len(encoders) == 1 else f"{label}: "
        rows += encoder_rows(info, model, fmt, cfg.seed, prefix)
        rows.append((f"{prefix}tokens", _tokens(info) + f", attention of all {info.depth} blocks"))
    rows += [
        ("data", f"{cfg.dataset} at {cfg.data}, split {cfg.split}"),
        ("images", images), ("classes", classes),
        ("processes", 1), ("batch", cfg.batch_size), ("batches", f"{batches} (every model on each)"),
        ("precision", _precision(cfg.precision, dtype, device)),
        ("workers", cfg.num_workers), ("out", cfg.out),
    ]
    return rows


def probe_units(epochs: int, eval_every: int, micro_per_epoch: int, eval_batches: int) -> int:
    """One seed's units of work: every training micro-batch and every evaluation batch (per process)."""
    evaluations = (epochs - 1) // eval_every + 1 if eval_every else 1
    return epochs * micro_per_epoch + evaluations * eval_batches


class RunClock:
    """The whole run's ETA from the measured time per unit of work (micro-batch, evaluation batch).

    ``total``: every unit of the run; :meth:`skip` counts units done before (a resumed run) without timing them;
    :meth:`mark` starts timing (after a pause such as a cache extraction); :meth:`advance` counts units done since
    the last mark or advance."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.measured, self.seconds = total, 0, 0, 0.0
        self._last: float | None = None

    def skip(self, units: int) -> None:
        self.done += units

    def mark(self) -> None:
        self._last = time.perf_counter()

    def advance(self, units: int = 1) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
            self.measured += units
        self._last = now
        self.done += units

    def eta(self) -> float | None:
        """Seconds left: remaining units x measured seconds per unit; None before any unit was timed."""
        if not self.measured:
            return None
        return max(self.total - self.done, 0) * self.seconds / self.measured


def progress_line(fields: Sequence[tuple[str, str]]) -> str:
    """``epoch 2/90  step 120/312  loss 1.234 ...``: one log line of ``(name, value)`` fields."""
    return "  ".join(f"{name} {value}" for name, value in fields)


def batch_line(what: str, done: int, total: int, clock: RunClock, batch_size: int) -> str | None:
    """The line to print after batch ``done`` of ``total`` of a streaming loop without a progress bar (about 20
    per loop, and the last), else None: ``what  batch 40/400  img/s 123  ETA 5m10s``."""
    if done % max(1, total // 20) and done != total:
        return None
    rate = f"{clock.measured * batch_size / clock.seconds:.0f}" if clock.seconds > 0 else "?"
    fields = [("batch", f"{done}/{total}"), ("img/s", rate), ("ETA", format_duration(clock.eta()))]
    return f"{what}  {progress_line(fields)}"
