"""``beyond-cls bench probe``: images/s of the probe's parts, and of a baseline like the authors' script.

Ours: the loader (decode + augment + copy to the device, CPU workers or GPU decoding), the frozen
encoder (no grad, autocast; compiled on CUDA, as ``probe`` runs it), the head bank (forward + backward +
LARS step on fixed tokens, as ``probe`` runs it: CUDA graphs on CUDA), and the full step (encoder + bank)
on a device batch; and the ATen + custom ops one bank step dispatches from the host
(:class:`HostOpCounter`), eagerly and as timed. Baseline: what a per-head linear-probe script does —
timm ViT with its unfused eager attention, one head per run (eager aggregation), fp16 autocast with a
gradient scaler, the whole model in DDP with ``find_unused_parameters=True``. Per head, the baseline
pays a whole run for every head; the bank pays one encoder pass for all of them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from beyond_cls.config import (
    BATCH_SIZE,
    CHECKPOINT,
    DATA,
    DATASET,
    DEVICE,
    IMG_SIZE,
    MODEL,
    NUM_WORKERS,
    POSITIVE_INT,
    PRECISION,
    STEPS,
    WARMUP,
    ConfigError,
    Settings,
    setting,
)
from beyond_cls.data import SyntheticConfig, ViewDataset, build_dataset, make_synthetic_dataset
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from beyond_cls.models import load_encoder
from beyond_cls.optim import LARS
from beyond_cls.probe.bank import HeadBank, parse_heads, selection_specs
from beyond_cls.probe.config import DECODE, HEADS, LRS, on_cuda, parse_list
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.selections import SelectionSource
from beyond_cls.probe.step import BankStep
from beyond_cls.probe.streams import make_loader
from beyond_cls.runtime import autocast, autocast_dtype, resolve_device

__all__ = ["BenchProbeConfig", "HostOpCounter", "bench_probe", "count_host_ops"]


@dataclass(kw_only=True)
class BenchProbeConfig(Settings):
    """Settings of ``beyond-cls bench probe`` (random weights unless a checkpoint is given)."""

    model: str = MODEL("vit_base_patch16_224")
    checkpoint: str | None = CHECKPOINT(shown="random weights")
    heads: str = HEADS()
    lrs: str = LRS("0.1")
    data: str | None = DATA(None, help="dataset root for the loader measurement", shown="the synthetic set")
    dataset: str = DATASET()
    img_size: int = IMG_SIZE()
    batch_size: int = BATCH_SIZE(256, help="images per micro-batch, as probe's --batch-size")
    num_classes: int = setting(1000, help="classes of the heads", group="heads", number=POSITIVE_INT)
    steps: int = STEPS()
    warmup: int = WARMUP()
    num_workers: int = NUM_WORKERS(8, help="loader workers")
    decode: str = DECODE()
    device: str = DEVICE()
    precision: str = PRECISION()
    compile: bool | None = setting(None, help="torch.compile the frozen encoder, as probe does", group="runtime",
                                   shown="on on CUDA, off on the CPU")
    cuda_graphs: bool = setting(True, help="replay the head bank's steps as CUDA graphs, as probe does (CUDA)",
                                group="runtime")
    baseline: bool = setting(True, help="the baseline runs (a per-head script like the authors')", group="output")

    def __post_init__(self) -> None:
        if self.compile is None:
            self.compile = on_cuda(self.device)
        super().__post_init__()
        self.base_lrs()
        fixed = selection_specs(parse_heads(self.heads))
        if fixed and self.baseline:
            raise ConfigError(f"the baseline trains one trainable head per run; {', '.join(fixed)} have none "
                              "(measure them with --no-baseline)")

    def base_lrs(self) -> list[float]:
        """The bank's learning rates: every head spec trains once per rate (heads × lrs entries)."""
        values = parse_list(str(self.lrs), float, "lrs")
        if not values or any(not v > 0 for v in values) or len(set(values)) != len(values):
            raise ConfigError(f"lrs must be distinct positive numbers, got {self.lrs!r}")
        return values


class HostOpCounter(TorchDispatchMode):
    """Counts the ops dispatched from the host while active: ATen and custom ops, forward and backward
    (autograd's threads inherit the mode), by name in :attr:`ops`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self) -> int:
        return sum(self.ops.values())


def count_host_ops(fn: Callable[[], Any]) -> int:
    """The ops ``fn`` dispatches from the host (:class:`HostOpCounter`)."""
    with HostOpCounter() as counter:
        fn()
    return counter.count


def _rate(fn: Callable[[], Any], images: int, steps: int, warmup: int, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return steps * images / (time.perf_counter() - start)


LOADER_PREFETCH = 4  # batches each worker keeps ready (make_loader's prefetch_factor)


def loader_batches(cfg: BenchProbeConfig) -> tuple[int, int]:
    """(untimed, timed) loader batches: both at least the batches in flight, so prefetched ones are not timed.

    Workers prefetch ``workers × 4`` batches while the first is awaited; timing only ``steps`` batches
    after ``warmup`` would time those ready-made batches and overstate the loader many times over.
    """
    depth = max(1, cfg.num_workers) * LOADER_PREFETCH
    return max(cfg.warmup, depth), max(cfg.steps, 2 * depth)


def _loader_rate(cfg: BenchProbeConfig, device: torch.device) -> float:
    if cfg.data is None:
        per_class = max(1, -(-cfg.batch_size * (cfg.steps + cfg.warmup) // 10))
        root = make_synthetic_dataset(config=SyntheticConfig(num_classes=10, train_per_class=per_class,
                                                             val_per_class=1))
        base = build_dataset("synthetic", root, "train")
    else:
        base = build_dataset(cfg.dataset, cfg.data, "train")
    if len(base) == 0:
        raise ConfigError(f"{cfg.data}: no training images")
    views = ViewDataset(base, train=True, img_size=cfg.img_size, decode=cfg.decode)
    warmup, steps = loader_batches(cfg)
    # passes over a small set repeat its images with a new view each pass (key = (index, pass))
    keys = ((k % len(base), k // len(base)) for k in range((warmup + steps) * cfg.batch_size))
    batches = [[next(keys) for _ in range(cfg.batch_size)] for _ in range(warmup + steps)]
    loader = make_loader(views, batches, cfg.num_workers, device)
    it = iter(loader)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        next(it).images_on(device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        next(it).images_on(device)
    sync()
    rate = steps * cfg.batch_size / (time.perf_counter() - start)
    del it, loader
    return rate


@contextlib.contextmanager
def _single_process_group(device: torch.device):
    """A world of one, so the baseline can be wrapped in DDP like the authors' multi-GPU script."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextlib.contextmanager
def _drop_cpp_warning(fragment: str):
    """Swallow the C++ warnings (written straight to file descriptor 2) that contain ``fragment``.

    DDP's reducer warns from the autograd thread, past Python's ``warnings``; every other line written
    to stderr meanwhile is written back afterwards, in order.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if fragment not in line))
            sys.stderr.flush()


def _frozen_encoder(cfg: BenchProbeConfig) -> nn.Module:
    """The encoder with the token source the probe would use (the zoo's block and norm, e.g. SimMIM's block 7)."""
    encoder = load_encoder(cfg.model, cfg.checkpoint, img_size=cfg.img_size)
    info = encoder.beyond_cls_info
    TokenSource(encoder, info.block, info.final_norm)  # truncates the encoder in place
    return encoder


class _BaselineModel(nn.Module):
    """Encoder (frozen by requires_grad only) + one head, as one module, like a per-head probe script."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(images))


def _baseline_rate(cfg: BenchProbeConfig, spec: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    device = images.device
    encoder = _frozen_encoder(cfg).to(device).requires_grad_(False)
    for module in encoder.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # timm's unfused eager attention
    info = encoder.beyond_cls_info
    bank = HeadBank([spec], [0.1], info.embed_dim, cfg.num_classes, info.num_prefix_tokens, info.has_class_token,
                    grid=info.grid_size)
    model = _BaselineModel(encoder, bank.heads[bank.entries[0].key]).to(device)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    with _single_process_group(device):
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )
        opt = LARS([p for p in model.parameters() if p.requires_grad], lr=0.1)

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                loss = nn.functional.cross_entropy(ddp(images), labels)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        previous = os.environ.get("BEYOND_CLS_BACKEND")
        os.environ["BEYOND_CLS_BACKEND"] = "reference"  # eager aggregation
        try:
            # DDP's notes on grad strides and on find_unused_parameters finding none: part of what the
            # baseline does, nothing for the reader to act on
            with warnings.catch_warnings(), _drop_cpp_warning("find_unused_parameters=True was specified"):
                warnings.filterwarnings("ignore", message="Grad strides do not match")
                return _rate(step, images.shape[0], cfg.steps, cfg.warmup, device)
        finally:
            if previous is None:
                os.environ.pop("BEYOND_CLS_BACKEND")
            else:
                os.environ["BEYOND_CLS_BACKEND"] = previous


def bench_probe(cfg: BenchProbeConfig) -> dict[str, Any]:
    """Measure and print the rates (images/s); returns them with the per-head ratios."""
    device = resolve_device(cfg.device)
    specs = parse_heads(cfg.heads)
    torch.manual_seed(0)
    encoder = _frozen_encoder(cfg)
    info = encoder.beyond_cls_info
    tokens_only = TokenSource(encoder, len(encoder.blocks) - 1, info.final_norm).to(device)
    if cfg.compile:
        tokens_only = torch.compile(tokens_only)
    source = SelectionSource(tokens_only, selection_specs(specs), info.mean or IMAGENET_MEAN,
                             info.std or IMAGENET_STD, img_size=cfg.img_size, device=device)
    bank = HeadBank(specs, cfg.base_lrs(), info.embed_dim, cfg.num_classes, info.num_prefix_tokens,
                    info.has_class_token, grid=info.grid_size).to(device)
    opt = LARS(bank.param_groups(1.0), lr=0.1)
    amp = autocast_dtype(cfg.precision, device)
    steps = BankStep(bank, opt, amp_dtype=amp, graphs="auto" if cfg.cuda_graphs else "off", say=print)
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)
    with autocast(cfg.precision, device):
        tokens, selections = source(images)
    tokens = tokens.float()

    def heads_step(t: torch.Tensor = tokens, sel: torch.Tensor | None = selections, run: BankStep = steps) -> None:
        run.micro(t, sel, labels)
        run.update()

    def encoder_step() -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast(cfg.precision, device):
            t, sel = source(images)
        return t.float(), sel

    n, s, w, count = cfg.batch_size, cfg.steps, cfg.warmup, len(bank.entries)
    result: dict[str, Any] = {
        "model": cfg.model, "token_block": len(encoder.blocks) - 1, "final_norm": info.final_norm,
        "heads": specs, "batch_size": n, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "decode": cfg.decode,
        "head_count": count, "num_workers": cfg.num_workers,
    }
    result["loader"] = _loader_rate(cfg, device)
    result["encoder"] = _rate(encoder_step, n, s, w, device)
    result["heads"] = _rate(heads_step, n, s, w, device)
    result["step"] = _rate(lambda: heads_step(*encoder_step()), n, s, w, device)
    result["host_ops_per_step"] = count_host_ops(heads_step)  # as timed: with CUDA graphs, copies and replays
    result["bank_graphs"] = steps.status
    eager = BankStep(bank, opt, amp_dtype=amp, graphs="off")
    heads_step(run=eager)  # warm-up: lazily made tensors
    result["host_ops_per_step_eager"] = count_host_ops(lambda: heads_step(run=eager))
    depth = len(encoder.blocks)
    tokens = f"block {depth - 1}, {'final norm' if info.final_norm else 'pre-norm'}"
    warmup, timed = loader_batches(cfg)
    rows = [
        (f"loader ({cfg.decode} decode, {cfg.num_workers} workers, {timed} batches after {warmup})",
         result["loader"], ""),
        (f"encoder (no grad, {cfg.precision} autocast, tokens of {tokens})", result["encoder"], ""),
        ("head bank (fwd + bwd + LARS step)", result["heads"], ""),
        ("encoder + bank", result["step"], f"  (= {result['step'] * count:.1f} head-images/s)"),
    ]
    summary = ""
    if cfg.baseline:
        baseline = {spec: _baseline_rate(cfg, spec, images, labels) for spec in specs}
        # a baseline run trains one head: H heads cost the sum of H runs' times
        per_head = len(specs) / sum(1.0 / r for r in baseline.values())
        result["baseline"] = baseline
        result["baseline_per_head"] = per_head
        result["speedup_per_head"] = result["step"] * count / per_head
        rows += [(f"baseline, one run per head ({spec})", r, "") for spec, r in baseline.items()]
        summary = (f"  per head: ours {result['step'] * count:.1f} vs baseline {per_head:.1f} head-images/s "
                   f"= {result['speedup_per_head']:.2f}x")
    width = max(len(label) for label, _, _ in rows)
    lines = [f"{cfg.model} batch {n} on {result['device_name']}, {count} heads ({', '.join(specs)} × lrs {cfg.lrs}):"]
    lines += [f"  {label:<{width}}  {rate:10.1f} images/s{note}" for label, rate, note in rows]
    if summary:
        lines.append(summary)
    lines.append(f"  head bank step: {result['host_ops_per_step_eager']} ops dispatched from the host eagerly, "
                 f"{result['host_ops_per_step']} as timed (CUDA graphs {result['bank_graphs']})")
    print("\n".join(lines))
    return result
