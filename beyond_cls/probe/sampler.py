"""Batch samplers yielding ``(sample index, view)`` keys, deterministic and resumable mid-epoch.

Training: each epoch draws one global permutation from (seed, epoch); optimizer step ``s`` consumes
the ``effective`` consecutive indices ``perm[s·E : (s+1)·E]``, split into ``accum × world``
micro-batches, of which process ``rank`` takes micro-batch ``a·world + rank`` at accumulation step
``a``. One process with accumulation A·W therefore sees exactly the micro-batches W processes with
accumulation A see together. Incomplete steps at the end of an epoch are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EvalBatchSampler", "TrainBatchSampler"]

Key = tuple[int, int]


class TrainBatchSampler(Sampler[list[Key]]):
    """Micro-batches of one process for one epoch; ``set_epoch(e, start_step)`` before iterating."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        accum_iter: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        views: int | None = None,
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accum_iter = accum_iter
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.views = views
        self.effective = batch_size * accum_iter * world_size
        self.steps_per_epoch = num_samples // self.effective
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def view(self, epoch: int) -> int:
        """The augmentation view of ``epoch``: the epoch itself, or cycling over ``views`` views."""
        return epoch if self.views is None else epoch % self.views

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def __iter__(self) -> Iterator[list[Key]]:
        perm = self.permutation(self.epoch).tolist()
        view, b = self.view(self.epoch), self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            base = step * self.effective
            for a in range(self.accum_iter):
                start = base + (a * self.world_size + self.rank) * b
                yield [(i, view) for i in perm[start : start + b]]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.accum_iter


class EvalBatchSampler(Sampler[list[Key]]):
    """Process ``rank`` takes samples ``rank, rank + world, …`` in order (no padding, no repeats).

    Used for evaluation and for extracting one ``view`` of every sample into the feature cache.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, view: int = 0) -> None:
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size
        self.view = view

    def __iter__(self) -> Iterator[list[Key]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield [(i, self.view) for i in self.indices[start : start + self.batch_size]]

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)
