"""Per-sample augmented views keyed by (sample index, view), decoded in the loader workers or on the device.

``decode="cpu"``: workers load, augment and normalize (PIL). ``decode="gpu"``: workers only read the file bytes
and the header size and compute the view parameters; :meth:`ViewBatch.images_on` decodes and transforms the
whole batch on the device. Parameters come from :mod:`beyond_cls.data.augment`, so both paths, any worker
count and a resumed run see the same crops and flips.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from beyond_cls.data.augment import CROPS, apply_eval_params, apply_train_params, eval_params, train_params
from beyond_cls.data.folder import DataError
from beyond_cls.data.gpu_decode import decode_batch, pil_rgb_tensor, transform_batch
from beyond_cls.data.transforms import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, eval_resize_size

__all__ = ["ViewBatch", "ViewDataset", "ViewSample", "ViewSpec", "collate_views"]

_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ViewSpec:
    """What a view is: shared by a dataset, its samples and their batch. ``crop``: how train crops are drawn
    (:data:`~beyond_cls.data.augment.CROPS`; None for eval views); ``interpolation``: the eval resize's
    (:data:`~beyond_cls.data.transforms.INTERPOLATIONS`; None for train views, which are bicubic)."""

    train: bool
    img_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    decode: Literal["cpu", "gpu"]
    skip_bad_images: bool
    crop: str | None = None
    interpolation: str | None = None

    def key(self) -> dict[str, Any]:
        """The fields as a feature cache's key: ``crop`` only where it is not torchvision's, the views that caches
        written before it was a field hold (so those stay valid, and MAE-crop views never reuse them); likewise
        ``interpolation`` only where it is not bicubic. ``resize_size`` carries the eval crop_pct."""
        out = dataclasses.asdict(self)
        if out["crop"] in (None, "torchvision"):
            del out["crop"]
        if out["interpolation"] in (None, "bicubic"):
            del out["interpolation"]
        return out


@dataclass
class ViewSample:
    """One loaded view: ``image`` (cpu decode) or ``data`` + ``params`` (gpu decode); ``error`` if unreadable."""

    index: int
    target: Any
    spec: ViewSpec
    path: str
    image: Tensor | None = None
    data: Tensor | None = None  # 1-D uint8: JPEG file bytes, or (pixels=True) worker-decoded HWC RGB pixels
    pixels: bool = False
    size: tuple[int, int] = (0, 0)  # (height, width) from the file header
    params: tuple[int, ...] = ()
    error: str | None = None


class ViewDataset(Dataset):
    """Views of ``base`` (``paths``, ``__len__``, ``target(i)``, ``load(i)``), indexed by ``(index, view)``.

    Train views are a pure function of (seed, view, index), their crops drawn as ``crop`` says
    (:data:`~beyond_cls.data.augment.CROPS`); eval views ignore the view. ``resize_size`` (eval) defaults to
    ``floor(img_size / crop_pct)`` (timm's; 0.875: 224 from 256), resized with ``interpolation`` (eval only).
    With ``skip_bad_images`` an unreadable image is dropped from its batch and counted in :attr:`ViewBatch.skipped`;
    otherwise it raises :class:`DataError` naming the file.
    """

    def __init__(
        self,
        base: Any,
        *,
        train: bool,
        img_size: int = 224,
        resize_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        decode: Literal["cpu", "gpu"] = "cpu",
        skip_bad_images: bool = False,
        crop: str = "mae",
        crop_pct: float = EVAL_CROP_PCT,
        interpolation: str = "bicubic",
    ):
        if decode not in ("cpu", "gpu"):
            raise ValueError(f"ViewDataset: decode={decode!r}, expected 'cpu' or 'gpu'")
        if crop not in CROPS:
            raise ValueError(f"ViewDataset: crop={crop!r}, expected one of {CROPS}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"ViewDataset: interpolation={interpolation!r}, expected one of {INTERPOLATIONS}")
        if decode == "gpu" and not train and interpolation != "bicubic":
            raise ValueError(f"ViewDataset: decode='gpu' resizes bicubic only, got interpolation={interpolation!r}")
        eval_resize = eval_resize_size(img_size, crop_pct)  # train views keep the default's: one cache key
        if resize_size is None:
            resize_size = eval_resize_size(img_size) if train else eval_resize
        if resize_size < img_size:
            raise ValueError(f"ViewDataset: resize_size={resize_size} is smaller than img_size={img_size}")
        self.base = base
        self.spec = ViewSpec(train, img_size, resize_size, tuple(mean), tuple(std), int(seed), decode, skip_bad_images,
                             crop if train else None, None if train else interpolation)

    def __len__(self) -> int:
        return len(self.base)

    def params(self, index: int, view: int, width: int, height: int) -> tuple[int, ...]:
        """Geometry of one view: train (top, left, h, w, flip), eval (resize_h, resize_w, top, left, 0)."""
        s = self.spec
        if s.train:
            return tuple(int(v) for v in train_params(s.seed, view, index, width, height, s.crop))
        return (*eval_params(width, height, s.img_size, s.resize_size), 0)

    def __getitem__(self, key: tuple[int, int] | int) -> ViewSample:
        index, view = key if isinstance(key, (tuple, list)) else (key, 0)
        index, view = int(index), int(view)
        path = str(self.base.paths[index])
        sample = ViewSample(index, self.base.target(index), self.spec, path)
        try:
            if self.spec.decode == "cpu":
                self._load_cpu(sample, view)
            else:
                self._load_encoded(sample, view)
        except DataError as exc:
            if not self.spec.skip_bad_images:
                raise
            sample.error, sample.image, sample.data = str(exc), None, None
        return sample

    def _load_cpu(self, sample: ViewSample, view: int) -> None:
        image = self.base.load(sample.index)
        s = self.spec
        sample.size = (image.height, image.width)
        sample.params = self.params(sample.index, view, image.width, image.height)
        if s.train:
            sample.image = apply_train_params(image, sample.params[:5], s.img_size, s.mean, s.std)
        else:
            sample.image = apply_eval_params(image, sample.params[:4], s.img_size, s.mean, s.std, s.interpolation)

    def _load_encoded(self, sample: ViewSample, view: int) -> None:
        try:
            raw = _encoded(self.base, sample)
            with Image.open(io.BytesIO(raw)) as image:  # lazy: header only; EXIF orientation not applied
                width, height = image.size
                # nvJPEG gets baseline/progressive YCbCr JPEGs; anything else is decoded here, as load() would
                if image.format == "JPEG" and image.mode == "RGB":
                    sample.data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                else:
                    sample.data = pil_rgb_tensor(image).permute(1, 2, 0).reshape(-1)
                    sample.pixels = True
        except DataError:
            raise
        except _READ_ERRORS as exc:
            raise DataError(f"cannot read image {sample.path}: {exc}") from exc
        sample.size = (height, width)
        sample.params = self.params(sample.index, view, width, height)


def _encoded(base: Any, sample: ViewSample) -> bytes:
    """The encoded image: ``base.read_bytes(index)`` where the base has it (shards), else the file's bytes."""
    read_bytes = getattr(base, "read_bytes", None)
    if read_bytes is not None:
        return read_bytes(sample.index)
    with open(sample.path, "rb") as f:
        return f.read()


def _stack_targets(targets: list[Any]) -> Tensor:
    if not targets:
        return torch.empty(0, dtype=torch.long)
    return torch.stack([torch.as_tensor(t) for t in targets])


@dataclass
class ViewBatch:
    """A collated batch of views; bad samples already dropped (``skipped`` counts them, ``skipped_paths`` names).

    cpu decode: ``images`` [B, 3, S, S] normalized. gpu decode: ``data`` holds every sample's bytes back to back
    (``offsets`` [B + 1]; ``pixels`` marks worker-decoded HWC RGB pixels instead of JPEG bytes), ``sizes`` [B, 2]
    (height, width) and ``params`` [B, 5] (see :meth:`ViewDataset.params`).
    """

    targets: Tensor
    indices: Tensor
    skipped: int = 0
    skipped_paths: list[str] = field(default_factory=list)
    spec: ViewSpec | None = None
    images: Tensor | None = None
    data: Tensor | None = None
    offsets: Tensor | None = None
    pixels: Tensor | None = None
    sizes: Tensor | None = None
    params: Tensor | None = None
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def encoded(self) -> list[Tensor]:
        """gpu decode: per sample, 1-D JPEG bytes or a uint8 [3, H, W] image (views into ``data``)."""
        if self.data is None:
            return []
        out = []
        for i, (start, end) in enumerate(zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())):
            chunk = self.data[start:end]
            if self.pixels[i]:
                h, w = self.sizes[i].tolist()
                chunk = chunk.view(h, w, 3).permute(2, 0, 1)
            out.append(chunk)
        return out

    def pin_memory(self) -> ViewBatch:
        """Page-locked copy of the tensors (``DataLoader(pin_memory=True)`` calls this); itself without CUDA."""
        if not torch.cuda.is_available():
            return self
        pin = lambda t: None if t is None else t.pin_memory()
        return dataclasses.replace(
            self, targets=pin(self.targets), indices=pin(self.indices), images=pin(self.images), data=pin(self.data)
        )

    def images_on(
        self, device: torch.device | str, dtype: torch.dtype = torch.float32, channels_last: bool = False
    ) -> Tensor:
        """Normalized [B, 3, S, S] views on ``device``: a copy (cpu decode) or decode + transform there (gpu).

        gpu decode may find a file it cannot decode: it raises :class:`DataError` naming the file, or with
        ``skip_bad_images`` drops it and filters ``targets``/``indices`` in place, so read them after this call.
        """
        if self.images is not None:
            x = self.images.to(device, non_blocking=True).to(dtype)
        else:
            x = self._decode_on(torch.device(device), dtype)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def _decode_on(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        s = self.spec
        if s is None or self.data is None or len(self) == 0:
            size = 224 if s is None else s.img_size
            return torch.empty(0, 3, size, size, device=device, dtype=dtype)
        images, errors = decode_batch(self.encoded, self.paths, device)
        for i, image in enumerate(images):
            if image is not None and tuple(image.shape[-2:]) != tuple(self.sizes[i].tolist()):
                got, want = tuple(image.shape[-2:]), tuple(self.sizes[i].tolist())
                errors[i] = f"cannot decode image {self.paths[i]}: decoded size {got} differs from header {want}"
        bad = [i for i, e in enumerate(errors) if e is not None]
        if bad and not s.skip_bad_images:
            raise DataError(errors[bad[0]])
        if bad:
            self._drop(bad)
            images = [im for im, e in zip(images, errors) if e is None]
            if not images:
                return torch.empty(0, 3, s.img_size, s.img_size, device=device, dtype=dtype)
        return transform_batch(
            images, self.params, train=s.train, img_size=s.img_size, mean=s.mean, std=s.std, dtype=dtype
        )

    def _drop(self, bad: list[int]) -> None:
        keep = [i for i in range(len(self)) if i not in set(bad)]
        chunks = [self.data[a:b] for a, b in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist())]
        kept = [chunks[i] for i in keep]
        lengths = torch.tensor([0] + [len(c) for c in kept], dtype=torch.long)
        self.skipped += len(bad)
        self.skipped_paths += [self.paths[i] for i in bad]
        self.data = torch.cat(kept) if kept else self.data[:0]
        self.offsets = lengths.cumsum(0)
        index = torch.tensor(keep, dtype=torch.long)
        self.targets = self.targets[index.to(self.targets.device)]
        self.indices = self.indices[index.to(self.indices.device)]
        self.pixels, self.sizes, self.params = self.pixels[index], self.sizes[index], self.params[index]
        self.paths = [self.paths[i] for i in keep]


def collate_views(samples: Sequence[ViewSample]) -> ViewBatch:
    """Stack good samples into a :class:`ViewBatch` (runs in the worker); bad ones are counted and dropped."""
    good = [s for s in samples if s.error is None]
    bad = [s for s in samples if s.error is not None]
    spec = samples[0].spec if samples else None
    batch = ViewBatch(
        targets=_stack_targets([s.target for s in good]),
        indices=torch.tensor([s.index for s in good], dtype=torch.long),
        skipped=len(bad),
        skipped_paths=[s.path for s in bad],
        spec=spec,
        paths=[s.path for s in good],
    )
    if spec is None or spec.decode == "cpu":
        size = 224 if spec is None else spec.img_size
        batch.images = torch.stack([s.image for s in good]) if good else torch.empty(0, 3, size, size)
        return batch
    lengths = torch.tensor([0] + [len(s.data) for s in good], dtype=torch.long)
    batch.data = torch.cat([s.data for s in good]) if good else torch.empty(0, dtype=torch.uint8)
    batch.offsets = lengths.cumsum(0)
    batch.pixels = torch.tensor([s.pixels for s in good], dtype=torch.bool)
    batch.sizes = torch.tensor([s.size for s in good], dtype=torch.long).reshape(-1, 2)
    batch.params = torch.tensor([s.params for s in good], dtype=torch.long).reshape(-1, 5)
    return batch
