"""Where the head bank's tokens come from: the frozen encoder on decoded images, or the feature cache.

Both yield ``(tokens float32 [b, N, D] on the device, targets on the device, images skipped)`` per
micro-batch, in the order the :class:`~beyond_cls.probe.sampler.TrainBatchSampler` dictates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from beyond_cls.data.views import ViewDataset, collate_views
from beyond_cls.probe.cache import FeatureCache
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.runtime import autocast

__all__ = ["CachedStream", "EncoderStream", "MicroBatch", "make_loader", "target_tensor"]

MicroBatch = tuple[Tensor, Tensor, int]


def target_tensor(dataset: Any) -> Tensor:
    """All targets of a dataset: int64 [n], or float32 [n, C] 0/1 for multi-label sets."""
    multilabel = getattr(dataset, "multilabel", False)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset.target(i) for i in range(len(dataset))]
        targets = torch.stack([torch.as_tensor(t) for t in targets]) if multilabel else targets
    return torch.as_tensor(targets).float() if multilabel else torch.as_tensor(targets, dtype=torch.int64)


def make_loader(views: ViewDataset, batch_sampler: Any, num_workers: int, device: torch.device) -> DataLoader:
    """The tuned loader: workers, pinned memory on CUDA, persistent workers, 4 batches prefetched each."""
    return DataLoader(
        views,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_views,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class EncoderStream:
    """Decode (CPU workers or GPU) → frozen encoder under autocast → tokens."""

    def __init__(
        self,
        source: TokenSource,
        train_views: ViewDataset,
        val_views: ViewDataset,
        train_sampler: TrainBatchSampler,
        val_sampler: EvalBatchSampler,
        num_workers: int,
        device: torch.device,
        amp: str,
        channels_last: bool = False,
    ) -> None:
        self.source, self.device, self.amp, self.channels_last = source, device, amp, channels_last
        self.train_sampler = train_sampler
        self.train_loader = make_loader(train_views, train_sampler, num_workers, device)
        self.val_loader = make_loader(val_views, val_sampler, num_workers, device)

    def _tokens(self, loader: DataLoader) -> Iterator[MicroBatch]:
        for batch in loader:
            images = batch.images_on(self.device, channels_last=self.channels_last)
            with autocast(self.amp, self.device):
                tokens = self.source(images)
            yield tokens.float(), batch.targets.to(self.device, non_blocking=True), batch.skipped

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[MicroBatch]:
        self.train_sampler.set_epoch(epoch, start_step)
        return self._tokens(self.train_loader)

    def eval_batches(self) -> Iterator[MicroBatch]:
        return self._tokens(self.val_loader)


class CachedStream:
    """Tokens read from the :class:`FeatureCache` shards (train view ``epoch mod V``; the eval view)."""

    def __init__(
        self,
        cache: FeatureCache,
        train_targets: Tensor,
        val_targets: Tensor,
        train_sampler: TrainBatchSampler,
        val_sampler: EvalBatchSampler,
        device: torch.device,
    ) -> None:
        self.cache, self.device = cache, device
        self.train_targets, self.val_targets = train_targets, val_targets
        self.train_sampler, self.val_sampler = train_sampler, val_sampler

    def _read(self, split: str, keys: list[tuple[int, int]], targets: Tensor) -> MicroBatch:
        view = keys[0][1] if keys else 0
        kept, tokens = self.cache.read(split, view, [i for i, _ in keys])
        pin = self.device.type == "cuda"
        tokens = (tokens.pin_memory() if pin else tokens).to(self.device, non_blocking=True).float()
        return tokens, targets[kept].to(self.device, non_blocking=True), len(keys) - len(kept)

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[MicroBatch]:
        self.train_sampler.set_epoch(epoch, start_step)
        return (self._read("train", keys, self.train_targets) for keys in self.train_sampler)

    def eval_batches(self) -> Iterator[MicroBatch]:
        return (self._read("val", keys, self.val_targets) for keys in self.val_sampler)
