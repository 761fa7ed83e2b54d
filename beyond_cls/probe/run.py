"""``beyond_cls.probe.run(config)``: the whole probing job, every seed, on one process or many."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.distributed as dist

from beyond_cls.config import load_config
from beyond_cls.data.synthetic import make_synthetic_dataset
from beyond_cls.data.views import ViewDataset
from beyond_cls.probe.announce import announce, whole_run_clock
from beyond_cls.probe.bank import HeadBank, parse_heads
from beyond_cls.probe.claims import output_folder
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv, init_distributed
from beyond_cls.probe.inputs import RunInputs, load_inputs
from beyond_cls.probe.results import (
    RESULTS_FILE,
    SeedResults,
    results_report,
    run_results,
    seed_results,
    write_results,
)
from beyond_cls.probe.run_cache import RunCache
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.streams import CachedStream, EncoderStream
from beyond_cls.probe.summary import summarize
from beyond_cls.probe.trainer import ProbeTrainer
from beyond_cls.run_summary import RunClock

__all__ = ["RESULTS_FILE", "run", "summarize"]


def _config(config: ProbeConfig | dict | str | Path) -> ProbeConfig:
    if isinstance(config, ProbeConfig):
        return config
    if isinstance(config, dict):
        return load_config(ProbeConfig, None, **config)
    return load_config(ProbeConfig, config)


def run(config: ProbeConfig | dict | str | Path) -> dict[str, Any]:
    """Train the head bank for every seed and return ``{"rows": per seed and head, "summary": per head}``.

    Writes into ``out``: ``config.yaml`` (resolved), per seed ``seed<k>/`` (checkpoint, metrics.jsonl,
    TensorBoard), and ``results.json`` + ``results.csv``; prints the results table.
    """
    cfg = _config(config)
    if cfg.data is None:  # --dataset synthetic without --data: the default synthetic set, made on demand
        cfg = replace(cfg, data=str(make_synthetic_dataset()))
    specs = parse_heads(cfg.heads)
    base_lrs = cfg.base_lrs()
    env = init_distributed(cfg.device)
    try:
        if cfg.eval:  # evaluation only: OUT's checkpoints, nothing trained or rewritten
            from beyond_cls.probe.evaluate_only import evaluate_run

            return evaluate_run(cfg, env, specs, base_lrs)
        with output_folder(cfg, env):
            return _run(cfg, env, specs, base_lrs)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: ProbeConfig, env: DistEnv, specs: list[str], base_lrs: list[float]) -> dict[str, Any]:
    """The job in order: read the data and encoder, key the feature cache, announce the settings, train every
    seed's head bank (filling its cache shards first), then record and report the results."""
    started = time.perf_counter()
    inputs = load_inputs(cfg, env, specs)
    cache = None if cfg.cache is None else RunCache(inputs)
    announce(inputs, len(specs) * len(base_lrs) * len(inputs.token_blocks), cache)
    clock = whole_run_clock(inputs)
    seeds = [_train_seed(inputs, cache, specs, base_lrs, seed, clock) for seed in cfg.seed_list()]
    results = run_results(inputs, seeds, time.perf_counter() - started)
    if env.is_main:
        write_results(results, Path(cfg.out))
        print(results_report(results, inputs, seeds))
    return results


def _train_seed(inputs: RunInputs, cache: RunCache | None, specs: list[str], base_lrs: list[float], seed: int,
                clock: RunClock) -> SeedResults:
    """Train (or resume, or just reload when finished) ``seed``'s head bank and return its rows; the seed's stream
    and trainer are released on return, before the next seed's are built."""
    cfg, env = inputs.cfg, inputs.env
    train_views = inputs.train_views(seed)
    sampler, val_sampler = inputs.samplers(seed)
    stream = _stream(inputs, cache, seed, train_views, sampler, val_sampler)
    bank = HeadBank(
        specs, base_lrs, inputs.width, inputs.train_set.num_classes, inputs.info.num_prefix_tokens,
        inputs.info.has_class_token, seed=seed, blocks=inputs.blocks, grid=inputs.info.grid_size,
        head_init=cfg.head_init, n_last_blocks=cfg.n_last_blocks or 1,
    )
    trainer = ProbeTrainer(
        cfg, env, seed, Path(cfg.out) / f"seed{seed}", bank, stream, sampler.steps_per_epoch, inputs.effective,
        inputs.accum, inputs.multilabel, micro_per_epoch=sampler.micro_per_epoch, clock=clock,
        eval_batches=len(val_sampler),
    )
    return seed_results(inputs, seed, bank, trainer, trainer.fit())


def _stream(inputs: RunInputs, cache: RunCache | None, seed: int, train_views: ViewDataset,
            sampler: TrainBatchSampler, val_sampler: EvalBatchSampler) -> CachedStream | EncoderStream:
    """The seed's batches of tokens: read from its feature caches (their missing shards extracted first), else
    computed by the encoder every epoch."""
    if cache is not None:
        return cache.stream(cache.fill(seed, train_views), sampler, val_sampler)
    cfg = inputs.cfg
    return EncoderStream(inputs.source, train_views, inputs.val_views, sampler, val_sampler, cfg.num_workers,
                         inputs.env.device, cfg.precision, cfg.channels_last)
