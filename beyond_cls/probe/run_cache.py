"""A probe run's feature caches (:mod:`beyond_cls.probe.cache`): what their folders are keyed by, how far they are
filled, the encoder pass that fills the missing shards, and the stream that trains from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from beyond_cls.data.views import ViewDataset
from beyond_cls.probe.bank import split_selection_name
from beyond_cls.probe.cache import FeatureCache
from beyond_cls.probe.claims import shards_to_fill
from beyond_cls.probe.fingerprint import dataset_fingerprint, fingerprint_file
from beyond_cls.probe.inputs import RunInputs
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.streams import CachedStream, make_loader
from beyond_cls.run_summary import RunClock, batch_line, cache_state
from beyond_cls.runtime import autocast, autocast_dtype
from beyond_cls.selection import parse_method

__all__ = ["RunCache", "SplitCaches"]


class SplitCaches:
    """Routes cache reads to the train cache (seeded views) or the val cache (shared by seeds)."""

    def __init__(self, train: FeatureCache, val: FeatureCache) -> None:
        self.train, self.val = train, val

    def of(self, split: str) -> FeatureCache:
        return self.train if split == "train" else self.val

    def read(self, split: str, view: int, indices: list[int]):
        return self.of(split).read(split, view, indices)


class RunCache:
    """The feature caches of the run ``inputs`` describes (``--cache`` set); computing the dataset contents'
    fingerprint is collective (every process builds this)."""

    def __init__(self, inputs: RunInputs) -> None:
        self.inputs = inputs
        cfg, env, info = inputs.cfg, inputs.env, inputs.info
        self.fingerprint = {  # "amp": the autocast dtype, under the key existing caches were written with
            "model": cfg.model, "weights": fingerprint_file(info.checkpoint), "format": cfg.checkpoint_format,
            "init_seed": cfg.seed_list()[0] if info.checkpoint is None else None,  # random weights (manual_seed)
            "img_size": cfg.img_size, "block": inputs.block, "final_norm": info.final_norm,
            "arch": cfg.arch, "source": info.source,
            "dataset": cfg.dataset, "data": str(Path(cfg.data).resolve()), "subset": cfg.subset_file,
            "mean": inputs.view_kwargs["mean"], "std": inputs.view_kwargs["std"],
            "amp": str(autocast_dtype(cfg.precision, env.device)),
            "skip_bad": cfg.skip_bad_images,
            **({"n_last_blocks": cfg.n_last_blocks} if (cfg.n_last_blocks or 1) > 1 else {}),  # concatenated tokens
        }
        self.contents = {  # a changed image, label or split re-extracts
            "train": dataset_fingerprint(inputs.train_set, inputs.train_targets, env),
            "val": dataset_fingerprint(inputs.val_set, inputs.val_targets, env),
        }

    def caches(self, seed: int, train_views: ViewDataset) -> list[SplitCaches]:
        """The tokens' caches (one per token block: a block's cache is that of a ``--block k`` run), then one per
        non-trainable head (float32 selections, keyed by the spec and guide weights too, so adding such a head to a
        cached run extracts its selections and reuses the tokens). Each split's shards depend on its dataset
        contents and view spec too; the train shards on ``seed``."""
        cfg = self.inputs.cfg
        splits = {"train": {"set": self.contents["train"], "views": train_views.spec.key()},
                  "val": {"set": self.contents["val"], "views": self.inputs.val_views.spec.key()}}
        out = []
        for name in [*self.inputs.token_blocks, *self.inputs.selections]:
            if isinstance(name, str):  # a selection; "b5/attn-mean": block 5's attention, keyed like a --block 5 run
                block, spec = split_selection_name(name)
                extra = {"selection": spec, "guide": fingerprint_file(parse_method(spec).checkpoint)}
            else:
                block, extra = name, {}
            if block is not None:
                extra["block"] = block
            dtype = cfg.cache_dtype if not isinstance(name, str) else "fp32"
            key = {**self.fingerprint, **extra}
            out.append(SplitCaches(
                FeatureCache(cfg.cache, {**key, **splits["train"], "split": "train", "seed": seed}, dtype),
                FeatureCache(cfg.cache, {**key, **splits["val"], "split": "val"}, dtype),
            ))
        return out

    def _shards(self) -> list[tuple[str, int]]:
        """Every (split, view) shard of a seed: the train views, then the eval view."""
        return [(split, v) for split, count in (("train", self.inputs.cfg.views() or 1), ("val", 1))
                for v in range(count)]

    def state(self, seed: int) -> str:
        """The cache folder and whether ``seed``'s shards are there (hit), partly (partial) or not at all (miss)."""
        cfg = self.inputs.cfg
        done = lambda cache, split, view: (cache.dir / f"{split}_v{view}.done").exists()  # its marker; checked on use
        shards = [(f"train view {v}" if split == "train" else split, done(c.of(split), split, v))
                  for c in self.caches(seed, self.inputs.train_views(seed)) for split, v in self._shards()]
        return cache_state(shards, cfg.cache) + (" (train shards per seed)" if len(cfg.seed_list()) > 1 else "")

    def fill(self, seed: int, train_views: ViewDataset) -> list[SplitCaches]:
        """``seed``'s caches, their incomplete shards extracted first (every process its share)."""
        caches = self.caches(seed, train_views)
        for split, view in self._shards():
            with shards_to_fill([c.of(split) for c in caches], split, view, self.inputs.env) as todo:
                if any(c is not None for c in todo):
                    self._extract(split, view, train_views if split == "train" else self.inputs.val_views, todo)
        return caches

    def stream(self, caches: list[SplitCaches], sampler: TrainBatchSampler,
               val_sampler: EvalBatchSampler) -> CachedStream:
        """The batches of filled ``caches``: tokens (one cache, or one per block of a layer-wise run), selections."""
        inputs = self.inputs
        k = len(inputs.token_blocks)
        return CachedStream(caches[0] if inputs.blocks is None else caches[:k], inputs.train_targets,
                            inputs.val_targets, sampler, val_sampler, inputs.env.device, caches[k:])

    def _extract(self, split: str, view: int, views: ViewDataset, caches: list[FeatureCache | None]) -> None:
        """Fill the incomplete shards of one view with this process's share of ``views`` through one encoder pass.

        ``caches[:k]`` hold the tokens (k = 1, or one per block of a layer-wise run: tokens [B, k, N, D]),
        ``caches[k + m]`` the selections of non-trainable head ``m``; None: complete.
        """
        cfg, env, info, source = self.inputs.cfg, self.inputs.env, self.inputs.info, self.inputs.source
        k = len(caches) - len(source.methods)
        shapes = ([(info.num_tokens, self.inputs.width)] * len(self.inputs.token_blocks)
                  + [(info.num_patches,)] * len(self.inputs.selections))
        sampler = EvalBatchSampler(len(views), cfg.batch_size, env.world_size, env.rank, view=view)
        loader = make_loader(views, sampler, cfg.num_workers, env.device)
        writers: list[Any] = [None if c is None else c.writer(split, view, len(views), shape, env)
                              for c, shape in zip(caches, shapes)]
        bar = tqdm(loader, total=len(sampler), desc=f"cache {split} view {view}", unit="batch", leave=False,
                   disable=not (cfg.progress and env.is_main))
        clock = RunClock(len(sampler))
        clock.mark()
        for i, batch in enumerate(bar, 1):
            images = batch.images_on(env.device, channels_last=cfg.channels_last)
            with autocast(cfg.precision, env.device):
                tokens, selections = source(images)
            for m, writer in enumerate(writers):
                if writer is None:
                    continue
                rows = selections[:, m - k] if m >= k else tokens[:, m].contiguous() if tokens.dim() == 4 else tokens
                writer.write(batch.indices, rows.float())
            clock.advance()
            line = None if cfg.progress or not env.is_main else batch_line(
                f"cache {split} view {view}", i, len(sampler), clock, cfg.batch_size * env.world_size)
            if line:
                print(line, flush=True)
        for writer in writers:
            if writer is not None:
                writer.close()
