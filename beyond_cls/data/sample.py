"""The images a ``--max-images N`` run takes: a seeded random sample, not the first N.

Datasets list their images class by class, so the first 5,000 of ImageNet's validation split are classes 0-99
only; statistics over them would be silently biased. :func:`sample_images` draws N indices uniformly without
replacement from a generator seeded with ``--seed`` (the same seed gives the same images on every machine) and
keeps them in dataset order; runs record what they took (:class:`Sample`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from beyond_cls.data.folder import DataError

__all__ = ["Sample", "sample_images"]


@dataclass(frozen=True)
class Sample:
    """What a run took: ``images`` of the ``of`` in the split, ``random`` (seeded by ``seed``) or all of them."""

    images: int
    of: int
    random: bool
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if not self.random:
            return f"all {self.of} images"
        return f"a random sample of {self.images} of {self.of} images (--seed {self.seed})"


def sample_images(dataset: Dataset, max_images: int | None, seed: int, where: str) -> tuple[Dataset, list[int], Sample]:
    """``(dataset or its Subset, the indices taken, Sample)`` for at most ``max_images`` images of ``dataset``.

    DataError naming ``where`` (e.g. "DATA split val") when the dataset holds no image."""
    n = len(dataset)
    if n == 0:
        raise DataError(f"{where} holds no images")
    if max_images is None or max_images >= n:
        return dataset, list(range(n)), Sample(n, n, False, seed)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(n, generator=generator)[:max_images].sort().values.tolist()
    return Subset(dataset, indices), indices, Sample(max_images, n, True, seed)
