"""Batch samplers yielding ``(sample index, view)`` keys, deterministic and resumable mid-epoch.

Training follows the authors' loader (MAE's ``main_linprobe.py``): a ``DistributedSampler`` (``drop_last``
False) gives each of ``W`` processes ``ceil(n / W)`` samples of the epoch's permutation, padded by repeating it
from its start, and the DataLoader's ``drop_last`` keeps ``ceil(n / W) // b`` whole micro-batches of ``b``
per process. One permutation is drawn from (seed, epoch); micro-batch ``j`` of process ``rank`` is the ``b``
consecutive entries from ``(j·W + rank)·b`` of the padded permutation. That takes the same positions of the
permutation as the DistributedSampler's interleaving (only which process gets which of them differs), and one
process with accumulation A·W sees in each optimizer step the micro-batches W processes with accumulation A
see together. Optimizer steps take ``accum`` micro-batches each; the micro-batches after the epoch's last
whole step are left over (the trainer forwards them without a step, as the authors' loop does).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EvalBatchSampler", "TrainBatchSampler"]

Key = tuple[int, int]


class TrainBatchSampler(Sampler[list[Key]]):
    """Micro-batches of one process for one epoch; ``set_epoch(e, start_step)`` before iterating.

    ``micro_per_epoch``: micro-batches per epoch and process; ``steps_per_epoch``: whole optimizer steps among
    them; ``leftover``: the micro-batches after the last step. Iteration starts at micro-batch
    ``start_step · accum_iter`` and runs to the epoch's end, leftovers included.
    """

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
        self.per_process = -(-num_samples // world_size)  # DistributedSampler: padded to a multiple of W
        self.micro_per_epoch = self.per_process // batch_size  # the loader's drop_last, per micro-batch
        self.steps_per_epoch = self.micro_per_epoch // accum_iter
        self.leftover = self.micro_per_epoch - self.steps_per_epoch * accum_iter
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

    def padded(self, epoch: int) -> list[int]:
        """The epoch's permutation, repeated from its start up to ``per_process × world_size`` entries."""
        perm = self.permutation(epoch).tolist()
        total = self.per_process * self.world_size
        return (perm * -(-total // max(len(perm), 1)))[:total]

    def __iter__(self) -> Iterator[list[Key]]:
        order = self.padded(self.epoch)
        view, b, w = self.view(self.epoch), self.batch_size, self.world_size
        for j in range(self.start_step * self.accum_iter, self.micro_per_epoch):
            start = (j * w + self.rank) * b
            yield [(i, view) for i in order[start : start + b]]

    def __len__(self) -> int:
        return self.micro_per_epoch - self.start_step * self.accum_iter


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
