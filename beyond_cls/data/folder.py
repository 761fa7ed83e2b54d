"""ImageFolder-layout datasets (``root/<split>/<class>/<images>``) with errors that name the bad path."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from beyond_cls.config import default_num_workers
from beyond_cls.data.pixels import to_rgb

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageFolderDataset",
    "default_num_workers",
    "load_rgb",
    "make_loader",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """A dataset is missing, empty or unreadable; the message names the path and what was expected.

    Raised in a DataLoader worker, torch re-raises it in the main process as ``DataError(<worker traceback>)``;
    the constructor keeps only the original message, so the error stays one line naming the file.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(_worker_message(message, type(self)), *args)


def _worker_message(message: object, cls: type) -> object:
    """The original message inside torch's ``Caught <cls> in DataLoader worker …`` text, else ``message``."""
    if not (isinstance(message, str) and message.startswith(f"Caught {cls.__name__} in DataLoader worker")):
        return message
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind("\n" + prefix)
    return message[start + 1 + len(prefix):].strip() if start >= 0 else message


def _layout(root: Path, split: str) -> str:
    return f"expected {root}/{split}/<class>/<images> ({', '.join(IMAGE_EXTENSIONS)})"


class ImageFolderDataset(Dataset):
    """Images under ``root/split/<class>/`` (searched recursively), labelled by sorted class folder.

    Also satisfies the ``LabeledImages`` interface of :mod:`beyond_cls.data.datasets` (``paths``,
    ``multilabel``, ``num_classes``, ``target(i)``, ``load(i)``).
    """

    multilabel = False

    def __init__(self, root: str | os.PathLike, split: str = "val", transform: Callable | None = None):
        self.root = Path(root).expanduser()
        self.split = split
        self.transform = transform
        split_dir = self.root / split
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist; {_layout(self.root, split)}")
        if not split_dir.is_dir():
            raise DataError(f"split folder {split_dir} does not exist; {_layout(self.root, split)}")
        self.classes = sorted(
            e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise DataError(f"{split_dir} has no class folders; {_layout(self.root, split)}")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for name in self.classes:
            files = sorted(_image_files(split_dir / name))
            if not files:
                empty.append(name)
            self.samples.extend((f, self.class_to_idx[name]) for f in files)
        if empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise DataError(f"{split_dir}: no images in class folder(s) {shown}; {_layout(self.root, split)}")
        self.targets = [label for _, label in self.samples]
        self.paths = [path for path, _ in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def target(self, index: int) -> int:
        return self.samples[index][1]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.samples[index][0])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"classes={len(self.classes)}, images={len(self.samples)})"
        )


def _image_files(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return out


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (high bit depths rescaled, :func:`to_rgb`).

    Any failure becomes a DataError naming the file.
    """
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int | None = None,
    shuffle: bool = False,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """DataLoader with pinned memory when CUDA is available and persistent workers when there are any.

    ``num_workers=None`` uses :func:`default_num_workers`.
    """
    if sampler is not None and shuffle:
        raise ValueError("make_loader: pass either shuffle=True or a sampler, not both")
    workers = default_num_workers() if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )
