"""``beyond_cls.probe.run(config)``: the whole probing job, every seed, on one process or many."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from beyond_cls.config import load_config
from beyond_cls.data.datasets import build_dataset
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from beyond_cls.data.views import ViewDataset
from beyond_cls.models import load_encoder
from beyond_cls.probe.bank import HeadBank, parse_heads, selection_specs
from beyond_cls.probe.cache import FeatureCache, fingerprint_file
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv, init_distributed
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.logs import format_table, write_csv, write_json_atomic
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.selections import SelectionSource
from beyond_cls.probe.streams import CachedStream, EncoderStream, make_loader, target_tensor
from beyond_cls.probe.trainer import ProbeTrainer
from beyond_cls.runtime import autocast
from beyond_cls.selection import parse_method

__all__ = ["RESULTS_FILE", "run", "summarize"]

RESULTS_FILE = "results.json"


def _config(config: ProbeConfig | dict | str | Path) -> ProbeConfig:
    if isinstance(config, ProbeConfig):
        return config
    if isinstance(config, dict):
        return load_config(ProbeConfig, None, **config)
    return load_config(ProbeConfig, config)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and (sample) std over seeds of every metric, one row per head."""
    by_head: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_head.setdefault(row["head"], []).append(row)
    out = []
    for group in by_head.values():
        first = group[0]
        summary = {k: first[k] for k in ("head", "aggregation", "blr", "lr")}
        for metric in ("top1", "top5", "mAP", "entropy"):
            values = [r[metric] for r in group if metric in r]
            if not values:
                continue
            if any(math.isnan(v) for v in values):  # e.g. the entropy of [cls], which has none
                summary[metric] = summary[f"{metric}_std"] = math.nan
                continue
            summary[metric] = statistics.fmean(values)
            summary[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary["seeds"] = len(group)
        out.append(summary)
    return out


def _extract(
    split: str, view: int, views: ViewDataset, source: SelectionSource, cfg: ProbeConfig, env: DistEnv,
    caches: list[FeatureCache | None], shapes: list[tuple[int, ...]],
) -> None:
    """Fill the incomplete shards of one view with this process's share of ``views`` through one encoder pass.

    ``caches[0]`` holds the tokens, ``caches[1 + m]`` the selections of non-trainable head ``m``; None: complete.
    """
    sampler = EvalBatchSampler(len(views), cfg.batch_size, env.world_size, env.rank, view=view)
    loader = make_loader(views, sampler, cfg.num_workers, env.device)
    writers = [None if c is None else c.writer(split, view, len(views), shape, env) for c, shape in zip(caches, shapes)]
    bar = tqdm(loader, total=len(sampler), desc=f"cache {split} view {view}", unit="batch", leave=False,
               disable=not (cfg.progress and env.is_main))
    for batch in bar:
        images = batch.images_on(env.device, channels_last=cfg.channels_last)
        with autocast(cfg.amp, env.device):
            tokens, selections = source(images)
        for m, writer in enumerate(writers):
            if writer is not None:
                writer.write(batch.indices, tokens.float() if m == 0 else selections[:, m - 1])
    for writer in writers:
        if writer is not None:
            writer.close()


def run(config: ProbeConfig | dict | str | Path) -> dict[str, Any]:
    """Train the head bank for every seed and return ``{"rows": per seed and head, "summary": per head}``.

    Writes into ``out``: ``config.yaml`` (resolved), per seed ``seed<k>/`` (checkpoint, metrics.jsonl,
    TensorBoard), and ``results.json`` + ``results.csv``; prints the results table.
    """
    cfg = _config(config)
    specs = parse_heads(cfg.heads)
    base_lrs = cfg.base_lrs()
    env = init_distributed(cfg.device)
    try:
        return _run(cfg, env, specs, base_lrs)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: ProbeConfig, env: DistEnv, specs: list[str], base_lrs: list[float]) -> dict[str, Any]:
    out = Path(cfg.out)
    options = {"subset_file": cfg.subset_file} if cfg.subset_file else {}
    train_set = build_dataset(cfg.dataset, cfg.data, "train", **options)
    val_set = build_dataset(cfg.dataset, cfg.data, "val", **options)
    multilabel = bool(getattr(train_set, "multilabel", False))
    torch.manual_seed(cfg.seed_list()[0])  # a randomly initialized encoder (no --checkpoint) is reproducible
    encoder = load_encoder(
        cfg.model, cfg.checkpoint, checkpoint_format=cfg.checkpoint_format, arch=cfg.arch, img_size=cfg.img_size,
        block=cfg.block, final_norm=cfg.final_norm, source=cfg.source, weights_dir=cfg.weights_dir,
    )
    info = encoder.beyond_cls_info  # token source: the flags, else the zoo's, else the last block, pre-norm
    tokens_only = TokenSource(encoder, info.block, info.final_norm).to(env.device)
    if cfg.channels_last:
        tokens_only = tokens_only.to(memory_format=torch.channels_last)
    if cfg.compile:
        tokens_only = torch.compile(tokens_only)
    accum, effective = cfg.accumulation(env.world_size)
    mean, std = cfg.normalization()
    view_kwargs = dict(
        img_size=cfg.img_size, mean=mean or info.mean or IMAGENET_MEAN, std=std or info.std or IMAGENET_STD,
        decode=cfg.decode,
        skip_bad_images=cfg.skip_bad_images,
    )
    selections = selection_specs(specs)  # HeadBank.selections
    source = SelectionSource(
        tokens_only, selections, view_kwargs["mean"], view_kwargs["std"], img_size=cfg.img_size,
        weights_dir=cfg.weights_dir, device=env.device,
    )
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**asdict(cfg), "world_size": env.world_size, "accum_iter": accum, "effective_batch": effective}
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    shapes = [(info.num_tokens, info.embed_dim)] + [(info.num_patches,)] * len(selections)
    fingerprint = {
        "model": cfg.model, "weights": fingerprint_file(cfg.checkpoint), "format": cfg.checkpoint_format,
        "img_size": cfg.img_size, "block": source_block(tokens_only), "final_norm": info.final_norm,
        "arch": cfg.arch, "source": info.source,
        "dataset": cfg.dataset, "data": str(Path(cfg.data).resolve()), "subset": cfg.subset_file,
        "mean": view_kwargs["mean"], "std": view_kwargs["std"], "amp": cfg.amp, "skip_bad": cfg.skip_bad_images,
    }
    train_targets, val_targets = target_tensor(train_set), target_tensor(val_set)
    val_views = ViewDataset(val_set, train=False, **view_kwargs)
    rows: list[dict[str, Any]] = []
    for seed in cfg.seed_list():
        train_views = ViewDataset(train_set, train=True, seed=seed, **view_kwargs)
        sampler = TrainBatchSampler(
            len(train_set), cfg.batch_size, accum, env.world_size, env.rank, seed=seed, views=cfg.views()
        )
        val_sampler = EvalBatchSampler(len(val_set), cfg.batch_size, env.world_size, env.rank)
        if cfg.cache is not None:
            split_caches = _caches(cfg, fingerprint, seed, selections)
            for split, views, count in (("train", train_views, cfg.views() or 1), ("val", val_views, 1)):
                for view in range(count):
                    todo = [c.of(split) for c in split_caches]
                    todo = [None if c.complete(split, view) else c for c in todo]
                    if any(c is not None for c in todo):
                        _extract(split, view, views, source, cfg, env, todo, shapes)
            stream: Any = CachedStream(
                split_caches[0], train_targets, val_targets, sampler, val_sampler, env.device, split_caches[1:]
            )
        else:
            stream = EncoderStream(
                source, train_views, val_views, sampler, val_sampler, cfg.num_workers, env.device, cfg.amp,
                cfg.channels_last,
            )
        bank = HeadBank(
            specs, base_lrs, info.embed_dim, train_set.num_classes, info.num_prefix_tokens, info.has_class_token,
            seed=seed,
        )
        trainer = ProbeTrainer(
            cfg, env, seed, out / f"seed{seed}", bank, stream, sampler.steps_per_epoch, effective, accum, multilabel
        )
        final = trainer.fit()
        for entry in bank.entries:
            lr = cfg.lr if cfg.lr is not None else entry.blr * effective / 256
            rows.append({"seed": seed, "head": entry.key, "aggregation": entry.spec, "blr": entry.blr, "lr": lr,
                         **final[entry.key]})
        del stream, trainer
    summary = summarize(rows)
    results = {
        "rows": rows, "summary": summary, "encoder": asdict(info), "config": asdict(cfg),
        "token_source": {"block": source_block(tokens_only), "final_norm": info.final_norm, "source": info.source},
        "world_size": env.world_size, "accum_iter": accum, "effective_batch": effective,
    }
    if env.is_main:
        write_json_atomic(results, out / RESULTS_FILE)
        write_csv(rows, out / "results.csv")
        metrics = ["mAP"] if multilabel else ["top1", "top5"]
        if len(cfg.seed_list()) > 1:
            metrics = [m for name in metrics for m in (name, f"{name}_std")]
        print(format_table(summary, ["aggregation", "blr", "lr", *metrics, "entropy"]))
        print(f"wrote {out / RESULTS_FILE} and {out / 'results.csv'}")
    return results


def source_block(source: Any) -> int:
    return getattr(source, "_orig_mod", source).block


class _SplitCaches:
    """Routes cache reads to the train cache (seeded views) or the val cache (shared by seeds)."""

    def __init__(self, train: FeatureCache, val: FeatureCache) -> None:
        self.train, self.val = train, val

    def of(self, split: str) -> FeatureCache:
        return self.train if split == "train" else self.val

    def read(self, split: str, view: int, indices: list[int]):
        return self.of(split).read(split, view, indices)


def _caches(cfg: ProbeConfig, fingerprint: dict[str, Any], seed: int, selections: list[str]) -> list[_SplitCaches]:
    """The tokens' caches, then one per non-trainable head (float32 selections, keyed by the spec and guide
    weights too, so adding such a head to a cached run extracts its selections and reuses the tokens)."""
    out = []
    for spec in [None, *selections]:
        extra = {} if spec is None else {"selection": spec, "guide": fingerprint_file(parse_method(spec).checkpoint)}
        dtype = cfg.cache_dtype if spec is None else "fp32"
        out.append(_SplitCaches(
            FeatureCache(cfg.cache, {**fingerprint, **extra, "split": "train", "seed": seed}, dtype),
            FeatureCache(cfg.cache, {**fingerprint, **extra, "split": "val"}, dtype),
        ))
    return out


