"""The ``analyze`` job: stream a dataset once through one or more encoders, each under an AttentionRecorder."""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from beyond_cls.analysis.plots import plot_information_flow
from beyond_cls.analysis.recorder import AttentionRecorder
from beyond_cls.analysis.stats_csv import block_rows, write_csv
from beyond_cls.analysis.style import data_label, infer_family
from beyond_cls.analysis.summary import AttentionSummary
from beyond_cls.config import ARCH, CHECKPOINT, CHECKPOINT_FORMAT, MODEL, SEED, SOURCE, ConfigError, StreamSettings
from beyond_cls.data import ImageFolderDataset, build_dataset, make_loader
from beyond_cls.data.sample import sample_images
from beyond_cls.data.transforms import unnormalized_eval_transform
from beyond_cls.models import load_encoder
from beyond_cls.run_summary import RunClock, analyze_rows, batch_line, format_settings, settings_dict
from beyond_cls.runlock import writes_out
from beyond_cls.runtime import autocast, autocast_dtype, resolve_device
from beyond_cls.selection import encoder_norm

STATS_FILE = "attention_stats.json"
PLOT_FILE = "attention_stats.png"
BLOCKS_FILE = "attention_stats_by_block.csv"
CONFIG_FILE = "analyze_config.json"
MODELS_FILE = "analyze_models.json"
# Config fields given once per encoder: one value for all encoders, or a list aligned with ``model``.
PER_MODEL = ("checkpoint", "checkpoint_format", "arch", "source")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".tar", ".safetensors", ".pyth", ".bin", ".ckpt")

PerModel = str | list[str | None] | None


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder of an analyze run: what :func:`~beyond_cls.models.load_encoder` gets besides shared settings."""

    model: str
    checkpoint: str | None = None
    checkpoint_format: str = "auto"
    arch: str | None = None
    source: str | None = None


@dataclass(kw_only=True)
class AnalyzeConfig(StreamSettings):
    """What ``beyond-cls analyze`` runs; every field is also a CLI flag and a YAML key.

    ``model`` is one name or a list of names analyzed on the same images. ``checkpoint``,
    ``checkpoint_format``, ``arch`` and ``source`` are one value for every model or a list aligned with
    ``model`` (None: no explicit value); one explicit checkpoint for several models is ambiguous.
    """

    model: str | list[str] = MODEL(help=MODEL.help + "; repeatable: several encoders on the same images")
    checkpoint: PerModel = CHECKPOINT()
    checkpoint_format: PerModel = CHECKPOINT_FORMAT()
    arch: PerModel = ARCH()
    source: PerModel = SOURCE()
    seed: int = SEED(help=SEED.help + " and of random encoder weights (no --checkpoint), as probe's first seed does")

    def __post_init__(self) -> None:
        super().__post_init__()
        if _is_list(self.model) and len(self.model) == 1:
            self.model = self.model[0]
        if not _is_list(self.model):  # one model: plain values, as a single-model config always had
            for name in PER_MODEL:
                value = getattr(self, name)
                if _is_list(value) and len(value) == 1:
                    setattr(self, name, value[0])
            if self.checkpoint_format is None:
                self.checkpoint_format = "auto"
        self.encoders()

    def encoders(self) -> list[EncoderSpec]:
        """One :class:`EncoderSpec` per model, in order; ConfigError naming the key when the lists do not fit."""
        models = self.model if _is_list(self.model) else [self.model]
        if not models:
            raise ConfigError("model: expected a model name or a non-empty list of names, got []")
        for i, name in enumerate(models):
            if not isinstance(name, str) or not name:
                raise ConfigError(f"model[{i}]: expected a model name, got {name!r}")
        n = len(models)
        columns = {}
        for key in PER_MODEL:
            value = getattr(self, key)
            if _is_list(value):
                if len(value) != n:
                    raise ConfigError(f"{key}: {len(value)} values for {n} models {models}; "
                                      "give one per model (null for none)")
                values = list(value)
            elif key == "checkpoint" and value is not None and n > 1:
                raise ConfigError(f"checkpoint: one file ({value}) for {n} models {models} is ambiguous; "
                                  "give a list with one entry per model (null for none)")
            else:
                values = [value] * n
            for i, v in enumerate(values):
                if v is not None and not isinstance(v, (str, os.PathLike)):
                    where = f"{key}[{i}]" if _is_list(value) else key
                    raise ConfigError(f"{where}: expected a string or null, got {v!r}")
            columns[key] = [None if v is None else os.fspath(v) for v in values]
        specs = [
            EncoderSpec(name, columns["checkpoint"][i], columns["checkpoint_format"][i] or "auto",
                        columns["arch"][i], columns["source"][i])
            for i, name in enumerate(models)
        ]
        seen = set()
        for spec in specs:
            key = replace(spec, checkpoint=spec.checkpoint and os.path.normpath(spec.checkpoint))
            if key in seen:
                given = f" with checkpoint {spec.checkpoint}" if spec.checkpoint else ""
                raise ConfigError(f"model {spec.model}{given} is listed twice with the same settings")
            seen.add(key)
        return specs

    def for_encoder(self, spec: EncoderSpec) -> dict:
        """This config as a plain dict for one encoder (its values in place of the lists)."""
        return {**asdict(self), **asdict(spec)}


def _is_list(value: object) -> bool:
    return isinstance(value, (list, tuple))


def _weights_stem(checkpoint: str) -> str:
    name = Path(checkpoint).name
    while name.lower().endswith(_WEIGHT_SUFFIXES) and "." in name[1:]:
        name = name[: name.rindex(".")]
    return name


def encoder_labels(specs: list[EncoderSpec]) -> list[str]:
    """Distinct, filesystem-safe names: the model name, ``name@<checkpoint stem>`` when names repeat, then -2, -3."""
    labels: list[str] = []
    taken: set[str] = set()  # lower case: folders must differ on case-insensitive filesystems too
    for spec in specs:
        base = spec.model
        if spec.checkpoint and sum(s.model == spec.model for s in specs) > 1:
            base = f"{base}@{_weights_stem(spec.checkpoint)}"
        base = re.sub(r"[^A-Za-z0-9._@+-]+", "_", base).strip("._") or "model"
        label, i = base, 2
        while label.lower() in taken:
            label, i = f"{base}-{i}", i + 1
        taken.add(label.lower())
        labels.append(label)
    return labels


@dataclass
class _Encoder:
    label: str
    spec: EncoderSpec
    model: nn.Module
    mean: Tensor  # [1, 3, 1, 1] on the device
    std: Tensor


def _load_encoders(cfg: AnalyzeConfig, device: torch.device) -> list[_Encoder]:
    specs = cfg.encoders()
    labels = [cfg.model] if len(specs) == 1 else encoder_labels(specs)
    encoders = []
    for label, spec in zip(labels, specs):
        model = load_encoder(
            spec.model, spec.checkpoint, checkpoint_format=spec.checkpoint_format, arch=spec.arch,
            img_size=cfg.img_size, source=spec.source, weights_dir=cfg.weights_dir,
        ).to(device)
        info = model.beyond_cls_info
        given = encoder_norm(info, *cfg.normalization())  # --mean/--std, else the encoder's own
        mean = torch.tensor(given[0], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(given[1], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        encoders.append(_Encoder(label, spec, model, mean, std))
    return encoders


@writes_out(lambda cfg: "analyze" if len(cfg.encoders()) == 1 else "analyze-models")
def analyze_models(cfg: AnalyzeConfig) -> dict[str, AttentionSummary]:
    """Record the attention statistics of every model of ``cfg`` over ``cfg.data``/``cfg.split``; label -> summary.

    Images are decoded once, with MAE's evaluation geometry (resize 256 bicubic, center crop 224), and
    normalized on the device with each encoder's own mean/std (ImageNet's unless its zoo entry says
    otherwise). One model writes ``attention_stats.json``, ``attention_stats.png``, ``analyze_config.json`` and
    ``attention_stats_by_block.csv`` (every statistic per block: mean, min and max over heads) into ``cfg.out``;
    several write them into ``cfg.out/<label>/``, plus ``attention_stats.png`` with every model and
    ``analyze_models.json`` (label -> model, checkpoint, subfolder). Labels are summaries' names.
    """
    device = resolve_device(cfg.device)
    transform = unnormalized_eval_transform(cfg.img_size)
    if cfg.dataset.lower() == "imagefolder":  # any split folder name, as before
        dataset = ImageFolderDataset(cfg.data, cfg.split, transform=transform)
    else:
        dataset = build_dataset(cfg.dataset, cfg.data, cfg.split, transform=transform)
    classes = getattr(dataset, "num_classes", None)
    dataset, _, sample = sample_images(dataset, cfg.max_images, cfg.seed, f"{cfg.data} split {cfg.split}")
    with torch.random.fork_rng(devices=[]):  # random weights from --seed; the caller's RNG state is kept
        torch.manual_seed(cfg.seed)
        encoders = _load_encoders(cfg, device)  # all of them before the first image is read
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers)

    rows = analyze_rows(cfg, [(e.label, e.spec.model, e.spec.checkpoint_format, e.model.beyond_cls_info)
                              for e in encoders], device=device, dtype=autocast_dtype(cfg.precision, device),
                        images=str(sample), classes=classes, batches=len(loader))
    print(format_settings(rows, f"analyze -> {cfg.out}"), flush=True)
    desc = f"analyze {cfg.model}" if len(encoders) == 1 else f"analyze {len(encoders)} models"
    start = time.perf_counter()
    clock = RunClock(len(loader))  # the whole run: every batch goes through every model
    with ExitStack() as stack, torch.inference_mode():
        recorders = [stack.enter_context(AttentionRecorder(e.model, name=e.label)) for e in encoders]
        clock.mark()
        for i, (images, _) in enumerate(tqdm(loader, desc=desc, unit="batch", disable=not cfg.progress), 1):
            images = images.to(device, non_blocking=True)
            for enc in encoders:
                x = (images - enc.mean) / enc.std
                with autocast(cfg.precision, device):
                    enc.model.forward_features(x)
            clock.advance()
            line = None if cfg.progress else batch_line(desc, i, len(loader), clock, cfg.batch_size)
            if line:
                print(line, flush=True)
    summaries = {e.label: r.summary() for e, r in zip(encoders, recorders)}
    seconds = time.perf_counter() - start
    for label, summary in summaries.items():  # before anything is written: no NaN statistics with exit 0
        summary.check_finite(f"{label}: nothing written (try --precision fp32)")

    out = Path(cfg.out)
    if len(encoders) == 1:
        enc = encoders[0]
        _write_run(out, summaries[enc.label], {**asdict(cfg), "sample": sample.as_dict(),
                                               "encoder": asdict(enc.model.beyond_cls_info),
                                               "normalization": _normalization(enc),
                                               "settings": settings_dict(rows)})
    else:
        for enc in encoders:
            resolved = {**cfg.for_encoder(enc.spec), "label": enc.label, "sample": sample.as_dict(),
                        "encoder": asdict(enc.model.beyond_cls_info), "normalization": _normalization(enc),
                        "settings": settings_dict(rows)}
            _write_run(out / enc.label, summaries[enc.label], resolved)
        plot_information_flow(summaries, out / PLOT_FILE, data=data_label(asdict(cfg)))
        models = {e.label: {"model": e.spec.model, "checkpoint": e.spec.checkpoint, "subfolder": e.label}
                  for e in encoders}
        (out / MODELS_FILE).write_text(json.dumps(models, indent=1))
    for summary in summaries.values():
        print(summary)
    images = next(iter(summaries.values())).num_images
    print(f"images: {sample}")
    if len(encoders) == 1:
        print(f"{images} images in {seconds:.1f} s ({images / seconds:.1f} images/s) "
              f"on {device}; wrote {out / STATS_FILE}, {out / PLOT_FILE} and {out / BLOCKS_FILE}")
    else:
        print(f"{images} images x {len(encoders)} models in {seconds:.1f} s ({images / seconds:.1f} images/s "
              f"through all models) on {device}; wrote {', '.join(summaries)} under {out} and {out / PLOT_FILE}")
    return summaries


def _normalization(enc: _Encoder) -> dict[str, list[float]]:
    """The mean/std ``enc``'s images were normalized with (recorded in ``analyze_config.json``)."""
    return {"mean": [round(v, 6) for v in enc.mean.flatten().tolist()],
            "std": [round(v, 6) for v in enc.std.flatten().tolist()]}


def _write_run(out: Path, summary: AttentionSummary, resolved: dict) -> None:
    summary.save(out / STATS_FILE)
    write_csv(out / BLOCKS_FILE, block_rows(summary.model, infer_family(summary.model), summary))
    plot_information_flow({summary.model: summary}, out / PLOT_FILE, data=data_label(resolved))
    (out / CONFIG_FILE).write_text(json.dumps(resolved, indent=1, default=str))


def analyze(cfg: AnalyzeConfig) -> AttentionSummary | dict[str, AttentionSummary]:
    """:func:`analyze_models`; with one model its :class:`AttentionSummary`, with several the dict by label."""
    summaries = analyze_models(cfg)
    return next(iter(summaries.values())) if len(summaries) == 1 else summaries
