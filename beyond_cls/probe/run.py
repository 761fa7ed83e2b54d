"""``beyond_cls.probe.run(config)``: the whole probing job, every seed, on one process or many."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from beyond_cls.config import ConfigError, load_config
from beyond_cls.data.datasets import build_dataset
from beyond_cls.data.synthetic import make_synthetic_dataset
from beyond_cls.data.views import ViewDataset
from beyond_cls.models import load_encoder
from beyond_cls.probe.bank import HeadBank, parse_heads, selection_names, split_selection_name
from beyond_cls.probe.cache import FeatureCache
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv, all_gather_objects, init_distributed
from beyond_cls.probe.features import TokenSource, check_block_token_bytes, source_block
from beyond_cls.probe.fingerprint import dataset_fingerprint, fingerprint_file
from beyond_cls.probe.logs import format_image_counts, write_csv, write_json_atomic
from beyond_cls.probe.metrics import last_and_best
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.selections import SelectionSource
from beyond_cls.probe.state import STATE_FILE, load_state
from beyond_cls.probe.streams import CachedStream, EncoderStream, make_loader, target_tensor
from beyond_cls.probe.summary import summarize
from beyond_cls.probe.trainer import ProbeTrainer, check_resumable
from beyond_cls.run_summary import (
    RunClock,
    batch_line,
    cache_state,
    format_settings,
    probe_rows,
    probe_units,
    settings_dict,
)
from beyond_cls.runlock import FolderLock, claim_output
from beyond_cls.runtime import autocast, autocast_dtype
from beyond_cls.selection import encoder_norm, parse_method
from beyond_cls.tables import format_table
from beyond_cls.units import units_of

__all__ = ["RESULTS_FILE", "run", "summarize"]

RESULTS_FILE = "results.json"


def _config(config: ProbeConfig | dict | str | Path) -> ProbeConfig:
    if isinstance(config, ProbeConfig):
        return config
    if isinstance(config, dict):
        return load_config(ProbeConfig, None, **config)
    return load_config(ProbeConfig, config)


def _extract(
    split: str, view: int, views: ViewDataset, source: SelectionSource, cfg: ProbeConfig, env: DistEnv,
    caches: list[FeatureCache | None], shapes: list[tuple[int, ...]],
) -> None:
    """Fill the incomplete shards of one view with this process's share of ``views`` through one encoder pass.

    ``caches[:k]`` hold the tokens (k = 1, or one per block of a layer-wise run: tokens [B, k, N, D]), ``caches[k +
    m]`` the selections of non-trainable head ``m``; None: complete.
    """
    k = len(caches) - len(source.methods)
    sampler = EvalBatchSampler(len(views), cfg.batch_size, env.world_size, env.rank, view=view)
    loader = make_loader(views, sampler, cfg.num_workers, env.device)
    writers = [None if c is None else c.writer(split, view, len(views), shape, env) for c, shape in zip(caches, shapes)]
    bar = tqdm(loader, total=len(sampler), desc=f"cache {split} view {view}", unit="batch", leave=False,
               disable=not (cfg.progress and env.is_main))
    clock = RunClock(len(sampler))
    clock.mark()
    for i, batch in enumerate(bar, 1):
        images = batch.images_on(env.device, channels_last=cfg.channels_last)
        with autocast(cfg.precision, env.device):
            tokens, selections = source(images)
        for m, writer in enumerate(writers):
            if writer is not None:
                rows = selections[:, m - k] if m >= k else tokens[:, m].contiguous() if tokens.dim() == 4 else tokens
                writer.write(batch.indices, rows.float())
        clock.advance()
        line = None if cfg.progress or not env.is_main else batch_line(f"cache {split} view {view}", i, len(sampler),
                                                                         clock, cfg.batch_size * env.world_size)
        if line:
            print(line, flush=True)
    for writer in writers:
        if writer is not None:
            writer.close()


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
        with _output_folder(cfg, env):
            return _run(cfg, env, specs, base_lrs)
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: ProbeConfig, env: DistEnv, specs: list[str], base_lrs: list[float]) -> dict[str, Any]:
    started = time.perf_counter()
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
    blocks = cfg.block_list(info.depth)  # --blocks: a layer-wise bank, tokens [B, K, N, D] from one pass
    if blocks is not None:
        check_block_token_bytes(cfg.batch_size, len(blocks), info.num_tokens, info.embed_dim)
    tokens_only = TokenSource(encoder, info.block if blocks is None else None, info.final_norm,
                              blocks=blocks, n_last=cfg.n_last_blocks or 1).to(env.device)
    width = info.embed_dim * (cfg.n_last_blocks or 1)  # --n-last-blocks: tokens concatenated along the channels
    if cfg.channels_last:
        tokens_only = tokens_only.to(memory_format=torch.channels_last)
    if cfg.compile:
        tokens_only = torch.compile(tokens_only)
    accum, effective = cfg.accumulation(env.world_size)
    mean, std = encoder_norm(info, *cfg.normalization())
    view_kwargs = dict(
        img_size=cfg.img_size, mean=mean, std=std,
        decode=cfg.decode,
        skip_bad_images=cfg.skip_bad_images,
    )
    selections = selection_names(specs, blocks)  # HeadBank.selections
    source = SelectionSource(
        tokens_only, selections, view_kwargs["mean"], view_kwargs["std"], img_size=cfg.img_size,
        weights_dir=cfg.weights_dir, device=env.device,
    )
    token_blocks = blocks or [None]
    shapes = [(info.num_tokens, width)] * len(token_blocks) + [(info.num_patches,)] * len(selections)
    fingerprint = {  # "amp": the autocast dtype, under the key existing caches were written with
        "model": cfg.model, "weights": fingerprint_file(info.checkpoint), "format": cfg.checkpoint_format,
        "init_seed": cfg.seed_list()[0] if info.checkpoint is None else None,  # random weights (torch.manual_seed)
        "img_size": cfg.img_size, "block": source_block(tokens_only), "final_norm": info.final_norm,
        "arch": cfg.arch, "source": info.source,
        "dataset": cfg.dataset, "data": str(Path(cfg.data).resolve()), "subset": cfg.subset_file,
        "mean": view_kwargs["mean"], "std": view_kwargs["std"], "amp": str(autocast_dtype(cfg.precision, env.device)),
        "skip_bad": cfg.skip_bad_images,
        **({"n_last_blocks": cfg.n_last_blocks} if (cfg.n_last_blocks or 1) > 1 else {}),  # concatenated tokens
    }
    train_targets, val_targets = target_tensor(train_set), target_tensor(val_set)
    contents = {} if cfg.cache is None else {  # a changed image, label or split re-extracts
        "train": dataset_fingerprint(train_set, train_targets, env),
        "val": dataset_fingerprint(val_set, val_targets, env),
    }
    val_views = ViewDataset(val_set, train=False, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, **view_kwargs)
    clock = _announce(cfg, env, info, source_block(tokens_only), blocks, accum, effective, train_set, val_set, len(
        specs) * len(base_lrs) * len(token_blocks), lambda seed: _cache_state(
        cfg, fingerprint, contents, seed, token_blocks, selections, train_set, val_views, view_kwargs))
    rows: list[dict[str, Any]] = []
    counts: dict[int, dict[str, int]] = {}  # per seed: images evaluated and skipped
    images_trained = 0
    for seed in cfg.seed_list():
        train_views = ViewDataset(train_set, train=True, seed=seed, crop=cfg.crop, **view_kwargs)
        sampler = TrainBatchSampler(
            len(train_set), cfg.batch_size, accum, env.world_size, env.rank, seed=seed, views=cfg.views()
        )
        val_sampler = EvalBatchSampler(len(val_set), cfg.batch_size, env.world_size, env.rank)
        if cfg.cache is not None:
            split_caches = _caches(cfg, fingerprint, seed, token_blocks, selections, {
                "train": {"set": contents["train"], "views": train_views.spec.key()},
                "val": {"set": contents["val"], "views": val_views.spec.key()},
            })
            for split, views, count in (("train", train_views, cfg.views() or 1), ("val", val_views, 1)):
                for view in range(count):
                    with _to_fill([c.of(split) for c in split_caches], split, view, env) as todo:
                        if any(c is not None for c in todo):
                            _extract(split, view, views, source, cfg, env, todo, shapes)
            k = len(token_blocks)
            stream: Any = CachedStream(
                split_caches[0] if blocks is None else split_caches[:k], train_targets, val_targets, sampler,
                val_sampler, env.device, split_caches[k:],
            )
        else:
            stream = EncoderStream(
                source, train_views, val_views, sampler, val_sampler, cfg.num_workers, env.device, cfg.precision,
                cfg.channels_last,
            )
        bank = HeadBank(
            specs, base_lrs, width, train_set.num_classes, info.num_prefix_tokens, info.has_class_token,
            seed=seed, blocks=blocks, grid=info.grid_size, head_init=cfg.head_init,
            n_last_blocks=cfg.n_last_blocks or 1,
        )
        trainer = ProbeTrainer(
            cfg, env, seed, out / f"seed{seed}", bank, stream, sampler.steps_per_epoch, effective, accum, multilabel,
            micro_per_epoch=sampler.micro_per_epoch, clock=clock, eval_batches=len(val_sampler),
        )
        final = trainer.fit()
        counts[seed] = trainer.image_counts()
        images_trained += trainer.images_trained
        for entry in bank.entries:
            lr = cfg.lr if cfg.lr is not None else entry.blr * effective / 256
            block = source_block(tokens_only) if entry.block is None else entry.block
            metric = "mAP" if multilabel else "top1"
            rows.append({"seed": seed, "head": entry.key, "aggregation": entry.spec, "blr": entry.blr, "lr": lr,
                         **final[entry.key], **last_and_best(trainer.history, entry.key, metric),
                         **counts[seed], "block": block})
        del stream, trainer
    summary = summarize(rows)
    results = {
        "rows": rows, "summary": summary, "encoder": asdict(info), "config": asdict(cfg),
        "token_source": {"block": source_block(tokens_only), "blocks": blocks, "final_norm": info.final_norm,
                         "source": info.source, "n_last_blocks": cfg.n_last_blocks},
        "world_size": env.world_size, "accum_iter": accum, "effective_batch": effective,
        "seconds": time.perf_counter() - started, "images_trained": images_trained,
        "images": {str(seed): c for seed, c in counts.items()},  # evaluated and skipped, per seed
        "units": units_of(summary[0] if summary else ()),  # accuracies in %, entropies in nats
        "normalization": {"mean": list(view_kwargs["mean"]), "std": list(view_kwargs["std"])},
    }
    if env.is_main:
        write_json_atomic(results, out / RESULTS_FILE)
        write_csv(rows, out / "results.csv")
        metrics = ["mAP", "mAP_best"] if multilabel else ["top1", "top1_best", "top5"]
        if len(cfg.seed_list()) > 1:
            metrics = [m for name in metrics for m in (name, f"{name}_std")]
        columns = ["aggregation", "blr", "lr", *metrics, "best_epoch", "entropy", "best"]
        print(format_table(summary, columns if blocks is None else ["block", *columns]))
        print(f"{metrics[0]}: the last epoch's; {metrics[0]}_best: the best evaluated epoch's (best_epoch, per seed; "
              f"every epoch with --eval-every 1); * the best learning rate of each aggregation; {_speed(results)}")
        print(format_image_counts(counts))
        print(f"wrote {out / RESULTS_FILE} and {out / 'results.csv'}")
    return results


def _announce(
    cfg: ProbeConfig, env: DistEnv, info: Any, block: int, blocks: list[int] | None, accum: int, effective: int,
    train_set: Any, val_set: Any, heads: int, cache: Callable[[int], str],
) -> RunClock:
    """Print the resolved settings once (main process), write them with the resolved config into
    ``config.yaml``, and return the clock of the whole run's ETA (every seed, evaluations included)."""
    seed = cfg.seed_list()[0]
    sampler = TrainBatchSampler(len(train_set), cfg.batch_size, accum, env.world_size, env.rank, seed=seed,
                                views=cfg.views())
    eval_batches = len(EvalBatchSampler(len(val_set), cfg.batch_size, env.world_size, env.rank))
    if env.is_main:
        rows = probe_rows(
            cfg, info, device=env.device, dtype=autocast_dtype(cfg.precision, env.device), world_size=env.world_size,
            accum=accum, effective=effective, train=(len(train_set), train_set.num_classes),
            val=(len(val_set), val_set.num_classes), micro_per_epoch=sampler.micro_per_epoch,
            steps_per_epoch=sampler.steps_per_epoch, eval_batches=eval_batches, block=block, blocks=blocks,
            heads=heads, cache=None if cfg.cache is None else cache(seed),
        )
        print(format_settings(rows, f"probe {cfg.model} -> {cfg.out}"), flush=True)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**asdict(cfg), "world_size": env.world_size, "accum_iter": accum, "effective_batch": effective,
                    "settings": settings_dict(rows)}
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))
    units = probe_units(cfg.epochs, cfg.eval_every, sampler.micro_per_epoch, eval_batches)
    return RunClock(len(cfg.seed_list()) * units)


def _cache_state(
    cfg: ProbeConfig, fingerprint: dict[str, Any], contents: dict[str, Any], seed: int, token_blocks: list[int | None],
    selections: list[str], train_set: Any, val_views: ViewDataset, view_kwargs: dict[str, Any],
) -> str:
    """The cache folder and whether ``seed``'s shards are there (hit), partly (partial) or not at all (miss)."""
    train_views = ViewDataset(train_set, train=True, seed=seed, crop=cfg.crop, **view_kwargs)
    caches = _caches(cfg, fingerprint, seed, token_blocks, selections, {
        "train": {"set": contents["train"], "views": train_views.spec.key()},
        "val": {"set": contents["val"], "views": val_views.spec.key()},
    })
    done = lambda cache, split, view: (cache.dir / f"{split}_v{view}.done").exists()  # its marker; checked on use
    shards = [(f"train view {v}" if split == "train" else split, done(c.of(split), split, v))
              for c in caches for split, count in (("train", cfg.views() or 1), ("val", 1)) for v in range(count)]
    return cache_state(shards, cfg.cache) + (" (train shards per seed)" if len(cfg.seed_list()) > 1 else "")


def _speed(results: dict[str, Any]) -> str:
    """'12.3 min in all, 456 training images/s' (images trained by this invocation, every process)."""
    seconds, images = results["seconds"], results["images_trained"]
    if not images:
        return f"{seconds / 60:.1f} min in all (nothing left to train: a finished run)"
    rate = f", {images / seconds:.0f} training images/s"
    return f"{seconds / 60:.1f} min in all{rate}"


def _on_main(env: DistEnv, action: Callable[[], Any]) -> Any:
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
def _output_folder(cfg: ProbeConfig, env: DistEnv) -> Iterator[None]:
    """Rank 0 holds ``--out`` (lock, kind "probe") for the whole run; the other processes write no file there.

    Before anything is written, every seed's checkpoint must be resumable by ``cfg`` (else config.yaml would be
    overwritten by a run that is then refused); a run that does not resume removes the results it replaces.
    """
    out = Path(cfg.out)

    def claim(held: ExitStack) -> None:
        held.enter_context(claim_output(out, "probe"))
        if cfg.resume == "none":
            for name in (RESULTS_FILE, "results.csv"):
                (out / name).unlink(missing_ok=True)
            return
        if cfg.resume != "auto" and not Path(cfg.resume).exists():
            raise ConfigError(f"--resume {cfg.resume}: file not found")
        accum, effective = cfg.accumulation(env.world_size)
        for seed in cfg.seed_list():
            path = out / f"seed{seed}" / STATE_FILE if cfg.resume == "auto" else Path(cfg.resume)
            if path.exists():
                check_resumable(path, load_state(path), cfg, seed, effective, (cfg.batch_size, env.world_size, accum))

    with ExitStack() as held:
        _on_main(env, lambda: claim(held))
        yield


@contextmanager
def _to_fill(caches: list[FeatureCache], split: str, view: int, env: DistEnv) -> Iterator[list[FeatureCache | None]]:
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
        fill = _on_main(env, lambda: decide(held))
        yield [c if f else None for c, f in zip(caches, fill)]


class _SplitCaches:
    """Routes cache reads to the train cache (seeded views) or the val cache (shared by seeds)."""

    def __init__(self, train: FeatureCache, val: FeatureCache) -> None:
        self.train, self.val = train, val

    def of(self, split: str) -> FeatureCache:
        return self.train if split == "train" else self.val

    def read(self, split: str, view: int, indices: list[int]):
        return self.of(split).read(split, view, indices)


def _caches(
    cfg: ProbeConfig, fingerprint: dict[str, Any], seed: int, token_blocks: list[int | None], selections: list[str],
    splits: dict[str, dict[str, Any]],
) -> list[_SplitCaches]:
    """The tokens' caches (one per token block: a block's cache is that of a ``--block k`` run), then one per
    non-trainable head (float32 selections, keyed by the spec and guide weights too, so adding such a head to a
    cached run extracts its selections and reuses the tokens). ``splits``: per split, what else its shards depend
    on (dataset contents, view spec)."""
    out = []
    for name in [*token_blocks, *selections]:
        if isinstance(name, str):  # a selection; "b5/attn-mean": block 5's attention, keyed like a --block 5 run
            block, spec = split_selection_name(name)
            extra = {"selection": spec, "guide": fingerprint_file(parse_method(spec).checkpoint)}
        else:
            block, extra = name, {}
        if block is not None:
            extra["block"] = block
        dtype = cfg.cache_dtype if not isinstance(name, str) else "fp32"
        out.append(_SplitCaches(
            FeatureCache(cfg.cache, {**fingerprint, **extra, **splits["train"], "split": "train", "seed": seed}, dtype),
            FeatureCache(cfg.cache, {**fingerprint, **extra, **splits["val"], "split": "val"}, dtype),
        ))
    return out


