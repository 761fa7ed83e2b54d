"""Where the head bank's tokens come from: the frozen encoder on decoded images, or the feature cache.

Both yield a :class:`MicroBatch` per micro-batch, in the order the
:class:`~beyond_cls.probe.sampler.TrainBatchSampler` dictates: tokens float32 [b, N, D], the selection weights
of the bank's non-trainable heads [b, M, num_patches] (None without such heads) and targets, all on the
device, and the number of images skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from beyond_cls.config import ConfigError
from beyond_cls.data.views import ViewDataset, collate_views
from beyond_cls.probe.cache import FeatureCache
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.selections import SelectionSource
from beyond_cls.probe.state import ignore_job_signals
from beyond_cls.runtime import autocast

__all__ = ["CachedStream", "EncoderStream", "MicroBatch", "make_loader", "target_tensor"]


class MicroBatch(NamedTuple):
    """What the head bank trains or evaluates on (see the module docstring)."""

    tokens: Tensor
    selections: Tensor | None
    targets: Tensor
    skipped: int


def target_tensor(dataset: Any) -> Tensor:
    """All targets of a dataset: int64 [n], or float32 [n, C] 0/1 for multi-label sets."""
    multilabel = getattr(dataset, "multilabel", False)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset.target(i) for i in range(len(dataset))]
        targets = torch.stack([torch.as_tensor(t) for t in targets]) if multilabel else targets
    return torch.as_tensor(targets).float() if multilabel else torch.as_tensor(targets, dtype=torch.int64)


def make_loader(views: ViewDataset, batch_sampler: Any, num_workers: int, device: torch.device) -> DataLoader:
    """The tuned loader: workers (which leave SIGTERM to the main process), pinned memory on CUDA, persistent
    workers, 4 batches prefetched each."""
    return DataLoader(
        views,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        worker_init_fn=ignore_job_signals if num_workers > 0 else None,
        collate_fn=collate_views,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class EncoderStream:
    """Decode (CPU workers or GPU) → frozen encoder under autocast → tokens and selections."""

    def __init__(
        self,
        source: SelectionSource,
        train_views: ViewDataset,
        val_views: ViewDataset,
        train_sampler: TrainBatchSampler,
        val_sampler: EvalBatchSampler,
        num_workers: int,
        device: torch.device,
        precision: str,
        channels_last: bool = False,
    ) -> None:
        self.source, self.device, self.precision, self.channels_last = source, device, precision, channels_last
        self.train_sampler = train_sampler
        self.train_loader = make_loader(train_views, train_sampler, num_workers, device)
        self.val_loader = make_loader(val_views, val_sampler, num_workers, device)

    def _tokens(self, loader: DataLoader) -> Iterator[MicroBatch]:
        for batch in loader:
            images = batch.images_on(self.device, channels_last=self.channels_last)
            with autocast(self.precision, self.device):
                tokens, selections = self.source(images)
            yield MicroBatch(tokens.float(), selections, batch.targets.to(self.device, non_blocking=True),
                             batch.skipped)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[MicroBatch]:
        self.train_sampler.set_epoch(epoch, start_step)
        return self._tokens(self.train_loader)

    def eval_batches(self) -> Iterator[MicroBatch]:
        return self._tokens(self.val_loader)


class CachedStream:
    """Tokens (and selections) read from :class:`FeatureCache` shards (train view ``epoch mod V``; the eval view).

    ``cache``: the tokens' cache, or a sequence of one per block of a layer-wise run (tokens [b, K, N, D]);
    ``selection_caches``: one cache per non-trainable head, in :attr:`HeadBank.selections` order.
    """

    def __init__(
        self,
        cache: FeatureCache | Sequence[FeatureCache],
        train_targets: Tensor,
        val_targets: Tensor,
        train_sampler: TrainBatchSampler,
        val_sampler: EvalBatchSampler,
        device: torch.device,
        selection_caches: Sequence[FeatureCache] = (),
    ) -> None:
        self.cache, self.device = cache, device
        self.selection_caches = list(selection_caches)
        self.train_targets, self.val_targets = train_targets, val_targets
        self.train_sampler, self.val_sampler = train_sampler, val_sampler

    def _to_device(self, rows: Tensor) -> Tensor:
        return self._pinned(rows).to(self.device, non_blocking=True).float()

    def _pinned(self, rows: Tensor) -> Tensor:
        """Page-locked on CUDA: a non_blocking copy from pageable memory may wait for the device."""
        return rows.pin_memory() if self.device.type == "cuda" else rows

    def _read(self, split: str, keys: list[tuple[int, int]], targets: Tensor) -> MicroBatch:
        view = keys[0][1] if keys else 0
        indices = [i for i, _ in keys]
        layered = isinstance(self.cache, Sequence)
        token_caches = list(self.cache) if layered else [self.cache]
        kept, tokens = token_caches[0].read(split, view, indices)
        blocks = [tokens]
        for cache in token_caches[1:]:
            blocks.append(self._agreeing(cache, split, view, indices, kept))
        tokens = torch.stack(blocks, 1) if layered else tokens
        selections = None
        if self.selection_caches:
            parts = [self._agreeing(cache, split, view, indices, kept) for cache in self.selection_caches]
            selections = self._to_device(torch.stack(parts, 1))
        return MicroBatch(self._to_device(tokens), selections,
                          self._pinned(targets[kept]).to(self.device, non_blocking=True), len(keys) - len(kept))

    @staticmethod
    def _agreeing(cache: FeatureCache, split: str, view: int, indices: list[int], kept: Tensor) -> Tensor:
        """Rows of another cache of the same images; ConfigError when it kept other images."""
        kept_here, rows = cache.read(split, view, indices)
        if not torch.equal(kept_here, kept):
            raise ConfigError(f"the feature cache's token and selection shards disagree on which {split} "
                              "images are valid; delete the --cache folder to extract them again")
        return rows

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[MicroBatch]:
        self.train_sampler.set_epoch(epoch, start_step)
        return (self._read("train", keys, self.train_targets) for keys in self.train_sampler)

    def eval_batches(self) -> Iterator[MicroBatch]:
        return (self._read("val", keys, self.val_targets) for keys in self.val_sampler)
