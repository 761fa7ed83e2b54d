"""What ``beyond-cls probe`` runs: one dataclass, every field a CLI flag and a YAML key.

Defaults are the paper's protocol (Appendix B.2, the MAE linear probe): LARS, base lr 0.1 scaled
by effective batch / 256, 10 warm-up epochs then half-cosine to 0, 90 epochs, effective batch
16384, momentum 0.9, no weight decay, bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from beyond_cls.config import ConfigError
from beyond_cls.data.folder import default_num_workers

__all__ = ["AMP_CHOICES", "DECODE_CHOICES", "OPTIMIZERS", "RESUME_CHOICES", "ProbeConfig", "parse_list"]

OPTIMIZERS = ("lars", "sgd")
DECODE_CHOICES = ("cpu", "gpu")
AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")
RESUME_CHOICES = ("auto", "none")
DEFAULT_HEADS = "cls,mean,abmilp,abmilp+cls"


MAE_WARMUP_EPOCHS, MAE_EPOCHS = 10, 90


def default_warmup(epochs: int) -> float:
    """MAE's warm-up: 10 epochs, or 10/90 of a run of 10 epochs or fewer (so a short run still warms up)."""
    return MAE_WARMUP_EPOCHS if epochs > MAE_WARMUP_EPOCHS else round(epochs * MAE_WARMUP_EPOCHS / MAE_EPOCHS, 6)


def parse_list(value: Any, kind: type, name: str) -> list:
    """``"0.05,0.1"`` / ``[0.05, 0.1]`` / ``0.1`` → a non-empty list of ``kind``; ConfigError otherwise."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else item
        if text == "":
            continue
        try:
            out.append(kind(text))
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: cannot read {item!r} as {kind.__name__} (in {value!r})") from None
    if not out:
        raise ConfigError(f"{name}: expected a comma-separated list, got {value!r}")
    return out


@dataclass
class ProbeConfig:
    """Settings of one probing run (all seeds); see ``beyond-cls probe --help`` for each field."""

    model: str
    data: str | None = field(default=None, kw_only=True)  # None only with dataset "synthetic": the default set
    out: str
    dataset: str = "imagefolder"
    checkpoint: str | None = None
    checkpoint_format: str = "auto"
    arch: str | None = None
    source: str | None = None
    weights_dir: str | None = None
    img_size: int = 224
    block: int | None = None
    blocks: str | None = None  # "5,11" or "all": a layer-wise bank, one encoder pass (replaces block)
    final_norm: bool | None = None
    heads: str = DEFAULT_HEADS
    lrs: str | None = None
    epochs: int = 90
    warmup_epochs: float | None = None  # None: MAE's 10 of 90, scaled to 10/90 of runs of 10 epochs or fewer
    batch_size: int = 256
    accum_iter: int | None = None
    effective_batch: int = 16384
    blr: float = 0.1
    lr: float | None = None
    min_lr: float = 0.0
    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 0.0
    seeds: str = "0"
    eval_every: int = 0
    num_workers: int = field(default_factory=default_num_workers)
    decode: str = "cpu"
    cache: str | None = None
    cache_views: int | None = None
    cache_dtype: str = "bf16"
    ckpt_minutes: float = 30.0
    resume: str = "auto"
    compile: bool = False
    channels_last: bool = False
    amp: str = "auto"
    skip_bad_images: bool = False
    subset_file: str | None = None
    mean: str | None = None
    std: str | None = None
    device: str = "auto"
    log_every: int = 20
    progress: bool = True

    def __post_init__(self) -> None:
        if self.data is None and str(self.dataset).lower() != "synthetic":
            raise ConfigError(f"--data is required for --dataset {self.dataset} (only --dataset synthetic, "
                              "the built-in set, is made on demand without it)")
        for name in ("img_size", "epochs", "batch_size", "effective_batch", "log_every"):
            _positive(name, getattr(self, name))
        for name in ("accum_iter", "cache_views"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("eval_every", "num_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.warmup_epochs is None:
            self.warmup_epochs = default_warmup(self.epochs)
        value = self.warmup_epochs
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"warmup_epochs must be a number >= 0, got {value!r}")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        for name in ("blr", "min_lr", "momentum", "weight_decay", "ckpt_minutes"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr <= 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.lr is not None and self.lrs is not None:
            raise ConfigError("give either --lr (one absolute learning rate) or --lrs (base learning rates), not both")
        if self.block is not None and (not isinstance(self.block, int) or self.block < -1):
            raise ConfigError(f"block must be a block index >= 0 (or -1 for the last), got {self.block!r}")
        if self.blocks is not None:
            if self.block is not None:
                raise ConfigError("give either --block (one token block) or --blocks (several), not both")
            listed = self.block_list(None)
            self.blocks = "all" if not listed else ",".join(map(str, listed))  # one spelling: resume compares it
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("decode", self.decode, DECODE_CHOICES)
        _choice("amp", self.amp, AMP_CHOICES)
        _choice("cache_dtype", self.cache_dtype, ("bf16", "fp32"))
        if self.resume not in RESUME_CHOICES and not self.resume.endswith((".pt", ".pth")):
            raise ConfigError(f"resume must be auto, none or a checkpoint file (.pt), got {self.resume!r}")
        self.seed_list()
        self.base_lrs()
        for name in ("mean", "std"):
            if getattr(self, name) is not None and len(self.normalization()[name == "std"]) != 3:
                raise ConfigError(f"{name} must be three comma-separated numbers, got {getattr(self, name)!r}")

    def seed_list(self) -> list[int]:
        seeds = parse_list(self.seeds, int, "seeds")
        if len(set(seeds)) != len(seeds) or min(seeds) < 0:
            raise ConfigError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
        return seeds

    def block_list(self, depth: int | None) -> list[int] | None:
        """``--blocks`` as ascending 0-based indices (``all``: 0..depth-1); None without ``--blocks``.

        With ``depth`` None only the syntax is checked (``all`` gives [])."""
        if self.blocks is None:
            return None
        if isinstance(self.blocks, str) and self.blocks.strip().lower() == "all":
            return [] if depth is None else list(range(depth))
        values = parse_list(self.blocks, int, "blocks")
        if len(set(values)) != len(values) or min(values) < 0:
            raise ConfigError(f"blocks must be distinct block indices >= 0 (0-based) or all, got {self.blocks!r}")
        if depth is not None and max(values) >= depth:
            raise ConfigError(f"blocks {self.blocks!r}: the encoder has blocks 0..{depth - 1}")
        return sorted(values)

    def base_lrs(self) -> list[float]:
        """Base learning rates of the head bank (``--lrs``, else ``--blr``); scaled by batch/256 later."""
        values = parse_list(self.lrs, float, "lrs") if self.lrs is not None else [self.blr]
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ConfigError(f"lrs must be positive numbers, got {values}")
        if len(set(values)) != len(values):
            raise ConfigError(f"lrs must be distinct, got {values}")
        return values

    def normalization(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(mean, std) overrides as float tuples, None where the encoder's default applies."""
        return tuple(
            None if v is None else tuple(parse_list(v, float, name))
            for name, v in (("mean", self.mean), ("std", self.std))
        )

    def views(self) -> int | None:
        """Augmented views cycled over the epochs (epoch e uses view e mod V); None: a new view every epoch."""
        if self.cache is not None:
            return self.cache_views or 1
        return self.cache_views

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(accum_iter, effective batch) for ``world_size`` processes.

        With ``accum_iter`` unset it is ``effective_batch / (batch_size · world_size)``, which must be a
        whole number; with it set, the effective batch follows from it.
        """
        per_step = self.batch_size * world_size
        if self.accum_iter is not None:
            return self.accum_iter, per_step * self.accum_iter
        if self.effective_batch % per_step:
            raise ConfigError(
                f"effective_batch {self.effective_batch} is not a multiple of batch_size {self.batch_size} × "
                f"{world_size} process(es) = {per_step}; change --batch-size or set --accum-iter"
            )
        return self.effective_batch // per_step, self.effective_batch


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
