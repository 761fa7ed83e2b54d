"""What ``beyond-cls probe`` runs: one dataclass, every field a CLI flag and a YAML key.

Defaults are the paper's protocol (Appendix B.2, the MAE linear probe): LARS, base lr 0.1 scaled
by effective batch / 256, 10 warm-up epochs then half-cosine to 0, 90 epochs, effective batch
16384, momentum 0.9, no weight decay, bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from beyond_cls.config import (
    BATCH_SIZE,
    BLOCK,
    DATA,
    DATASET,
    DEVICE,
    MEAN,
    NON_NEGATIVE_FLOAT,
    NON_NEGATIVE_INT,
    NUM_WORKERS,
    OUT,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    PRECISION,
    PROGRESS,
    STD,
    ConfigError,
    EncoderSettings,
    Setting,
    parse_normalization,
    setting,
)
from beyond_cls.data.crops import CROPS
from beyond_cls.data.transforms import EVAL_CROP_PCT, INTERPOLATIONS
from beyond_cls.heads.linear_probe import HEAD_INITS
from beyond_cls.heads.registry import heads_help

__all__ = ["DECODE_CHOICES", "OPTIMIZERS", "RESUME_CHOICES", "ProbeConfig", "parse_list"]

OPTIMIZERS = ("lars", "sgd")
DECODE_CHOICES = ("cpu", "gpu")
RESUME_CHOICES = ("auto", "none")
MAE_WARMUP_EPOCHS, MAE_EPOCHS = 10, 90

# Settings that ``bench probe`` shares.
HEADS = Setting(
    "cls,mean,abmilp,abmilp+cls", group="heads", items=str,
    help=heads_help(),  # read off the heads registry
)
LRS = Setting(None, help="comma-separated base learning rates; every head is trained with each", group="heads",
              shown="--blr", items=float)
DECODE = Setting("cpu", help="where JPEGs are decoded and augmented", group="runtime", choices=DECODE_CHOICES)


def on_cuda(device: str) -> bool:
    """Whether a ``--device`` value means a CUDA device here (``auto``: when one is available)."""
    if str(device) == "auto":
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


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


@dataclass(kw_only=True)
class ProbeConfig(EncoderSettings):
    """Settings of one probing run (all seeds); see ``beyond-cls probe --help`` for each field."""

    data: str | None = DATA(None, help=DATA.help + "; required, except for --dataset synthetic (the built-in set)")
    dataset: str = DATASET()
    subset_file: str | None = setting(None, help="ImageNet-1% file list (imagenet1pct)", group="data",
                                      shown="ROOT/1percent.txt")
    mean: str | None = MEAN()
    std: str | None = STD()
    skip_bad_images: bool = setting(False, help="skip and count unreadable images instead of stopping", group="data")
    cache_views: int | None = setting(None, help="augmented train views cycled over the epochs", group="data",
                                      shown="1 with --cache, else a new view every epoch", number=POSITIVE_INT)
    crop: str = setting("mae", help="train crop sampling: mae (MAE's util/crop.py: one draw of area and aspect, "
                        "sides clamped to the image; MAE's and the authors') or torchvision (RandomResizedCrop: ten "
                        "tries, centre fallback)", group="data", choices=CROPS)
    crop_pct: float = setting(EVAL_CROP_PCT, help="eval view: resize the shorter side to img_size / crop_pct, then "
                              "center-crop img_size (timm's --crop-pct; 0.875: 224 from 256)", group="data",
                              number=POSITIVE_FLOAT)
    interpolation: str = setting("bicubic", help="eval view resize interpolation (timm's --interpolation; MAE and "
                                 "timm evaluate bicubic)", group="data", choices=INTERPOLATIONS)
    block: int | None = setting(None, help="take tokens from this block (0-based, -1 = last)", group="model",
                                number=BLOCK, shown="the zoo's (SimMIM: 7), else the last")
    blocks: str | None = setting(
        None, group="model", help="layer-wise probing: train the heads on each of these blocks (comma-separated, "
        "0-based, or all) from one encoder pass; one result row per block, aggregation and lr; excludes --block",
        items=int)
    n_last_blocks: int | None = setting(
        None, group="model", help="DINO's linear eval: the tokens of the last N blocks up to the token block, each "
        "through the final norm (on unless --no-final-norm), concatenated along the channels; cls gives DINO's "
        "concatenated [cls] tokens, cls+mean adds the last block's patch mean (DINOv2: N = 1 or 4); excludes --blocks",
        shown="off: one block", number=POSITIVE_INT)
    final_norm: bool | None = setting(None, help="apply the encoder's final norm to the tokens", group="model",
                                      shown="off: the paper's pre-norm features; on with --n-last-blocks")
    heads: str = HEADS()
    lrs: str | None = LRS()
    head_init: str = setting("pytorch", help="init of each head's Linear: pytorch (nn.Linear's own, the authors') "
                             "or mae (trunc-normal std 0.01, zero bias)", group="heads", choices=HEAD_INITS)
    epochs: int = setting(MAE_EPOCHS, help="training epochs (the paper: 90, 50 for ViT-L/H)", group="schedule",
                          number=POSITIVE_INT)
    warmup_epochs: float | None = setting(None, help="linear warm-up epochs", group="schedule",
                                          shown="10, or 10/90 of runs of 10 epochs or fewer", number=NON_NEGATIVE_FLOAT)
    batch_size: int = BATCH_SIZE(256, help="training images per process per micro-batch (analyze, aggregations "
                                 "and localize: 64 per inference batch)", group="schedule")
    accum_iter: int | None = setting(None, help="micro-batches per optimizer step", group="schedule",
                                     shown="effective batch / (batch size x processes)", number=POSITIVE_INT)
    effective_batch: int = setting(16384, help="images per optimizer step over all processes", group="schedule",
                                   number=POSITIVE_INT)
    blr: float = setting(0.1, help="base learning rate: lr = blr x effective batch / 256", group="schedule",
                         number=POSITIVE_FLOAT)
    lr: float | None = setting(None, help="absolute learning rate (overrides --blr)", group="schedule",
                               number=POSITIVE_FLOAT)
    min_lr: float = setting(0.0, help="learning rate at the end of the cosine", group="schedule",
                            number=NON_NEGATIVE_FLOAT)
    optimizer: str = setting("lars", help="lars (MAE protocol) or sgd (small sets: CUB, ImageNet-1%)",
                             group="schedule", choices=OPTIMIZERS)
    momentum: float = setting(0.9, help="optimizer momentum", group="schedule", number=NON_NEGATIVE_FLOAT)
    weight_decay: float = setting(0.0, help="weight decay", group="schedule", number=NON_NEGATIVE_FLOAT)
    seeds: str = setting("0", help="comma-separated seeds; results are averaged over them", group="schedule",
                         items=int)
    eval_every: int = setting(0, help="evaluate every N epochs as well as at the end (0: only at the end)",
                              group="schedule", number=NON_NEGATIVE_INT)
    num_workers: int = NUM_WORKERS()
    decode: str = DECODE()
    cache: str | None = setting(None, help="feature cache folder: extract tokens once, train the heads from disk",
                                group="runtime")
    cache_dtype: str = setting("bf16", help="feature cache precision", group="runtime", choices=("bf16", "fp32"))
    compile: bool | None = setting(None, help="torch.compile the frozen encoder", group="runtime",
                                   shown="on on CUDA, off on the CPU")
    cuda_graphs: bool = setting(True, help="replay the head bank's micro-batch and LARS update as captured CUDA "
                                "graphs (CUDA; fp16 loss scaling and SGD updates run eagerly)", group="runtime")
    channels_last: bool = setting(False, help="channels-last images and encoder", group="runtime")
    precision: str = PRECISION()
    device: str = DEVICE()
    out: str = OUT(help="output folder: results, checkpoints, logs")
    ckpt_minutes: float = setting(30.0, help="also checkpoint every this many minutes (0: every step)",
                                  group="output", number=NON_NEGATIVE_FLOAT)
    eval: bool = setting(False, help="evaluation only: evaluate the heads of OUT's finished (or latest) checkpoints "
                         "on the eval split and write eval.json / eval.csv there, training state untouched; the "
                         "model and data settings must be the run's (--crop-pct, --interpolation may differ)",
                         group="output")
    resume: str = setting("auto", help="auto (continue OUT's checkpoint), none, or a checkpoint file", group="output")
    log_every: int = setting(20, help="optimizer steps per log line", group="output", number=POSITIVE_INT)
    progress: bool = PROGRESS()

    def __post_init__(self) -> None:
        if self.data is None and str(self.dataset).lower() != "synthetic":
            raise ConfigError(f"--data is required for --dataset {self.dataset} (only --dataset synthetic, "
                              "the built-in set, is made on demand without it)")
        if self.warmup_epochs is None and POSITIVE_INT.holds(self.epochs):
            self.warmup_epochs = default_warmup(self.epochs)
        if self.compile is None:  # on by default where it pays: CUDA
            self.compile = on_cuda(self.device)
        super().__post_init__()
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        if self.lr is not None and self.lrs is not None:
            raise ConfigError("give either --lr (one absolute learning rate) or --lrs (base learning rates), not both")
        if self.n_last_blocks is not None:
            if self.blocks is not None:
                raise ConfigError("--n-last-blocks concatenates blocks into one token source; it does not combine "
                                  "with --blocks (layer-wise probing): give one of them")
            if self.final_norm is None:  # DINO's get_intermediate_layers(n, norm=True)
                self.final_norm = True
        if not self.crop_pct <= 1.0:
            raise ConfigError(f"crop_pct must be in (0, 1] (img_size / crop_pct is the resize), got {self.crop_pct}")
        if self.interpolation != "bicubic" and self.decode == "gpu":
            raise ConfigError(f"--interpolation {self.interpolation}: the GPU decode path resizes bicubic only; use "
                              "--decode cpu")
        if self.blocks is not None:
            if self.block is not None:
                raise ConfigError("give either --block (one token block) or --blocks (several), not both")
            listed = self.block_list(None)
            self.blocks = "all" if not listed else ",".join(map(str, listed))  # one spelling: resume compares it
        if self.resume not in RESUME_CHOICES and not self.resume.endswith((".pt", ".pth")):
            raise ConfigError(f"resume must be auto, none or a checkpoint file (.pt), got {self.resume!r}")
        self.seed_list()
        self.base_lrs()
        parse_normalization(self.mean, self.std)

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
        names: dict[str, float] = {}
        for v in values:  # a head's key names its lr in 6 significant digits (probe.bank.head_key)
            other = names.setdefault(f"{v:g}", v)
            if other != v:
                raise ConfigError(f"lrs {other!r} and {v!r} are distinct but agree in their first 6 significant "
                                  f"digits, so their heads would share one name (blr{v:g}); give lrs that differ "
                                  "there")
        return values

    def normalization(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(mean, std) overrides as float tuples, None where the encoder's default applies."""
        return parse_normalization(self.mean, self.std)

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
