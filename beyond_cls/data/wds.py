"""WebDataset shards read by random access: ``DIR/*-train-*.tar`` and ``DIR/*-validation-*.tar``.

A sample is ``<key>.<jpg|jpeg|png|webp|bmp>`` + ``<key>.cls`` (the class index as decimal text), optionally
``<key>.json``; samples are ordered by shard name, then tar order. Each shard is indexed once (member offsets
and labels, read with :mod:`tarfile`) into ``<shard>.index.json`` beside it, or under
``$BEYOND_CLS_CACHE/wds-index/`` when the shard folder is read-only; an index whose shard changed size or
mtime is rebuilt. Images are read with ``os.pread`` from a file descriptor opened lazily in each process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split
from beyond_cls.data.pixels import to_rgb
from beyond_cls.fileio import write_atomic

__all__ = [
    "WDS_IMAGE_EXTENSIONS", "ShardIndex", "WebDatasetShards", "find_shards", "shard_index", "write_text_atomic",
]

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
SPLIT_TAGS = {"train": "-train-", "val": "-validation-"}
INDEX_FORMAT = 1
MAX_OPEN_SHARDS = 64  # descriptors a process keeps open (least recently used closed first)
CLASSES_FILE = "classes.txt"
_LAYOUT = "shards DIR/<name>-train-<n>.tar and DIR/<name>-validation-<n>.tar of <key>.jpg + <key>.cls samples"
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class ShardIndex:
    """One shard's samples in tar order: key, image extension, data offset and size, label."""

    keys: list[str]
    exts: list[str]
    offsets: list[int]
    sizes: list[int]
    labels: list[int]


def find_shards(root: Path, split: str) -> list[Path]:
    """The split's shards (``*-train-*.tar`` or ``*-validation-*.tar``) under ``root``, sorted by name."""
    tag = SPLIT_TAGS[check_split(split)]
    return sorted((p for p in root.iterdir() if p.name.endswith(".tar") and tag in p.name), key=lambda p: p.name)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the key ends at the first dot of the member's base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _build_index(shard: Path) -> ShardIndex:
    """Walk the tar headers of ``shard``; DataError naming the shard and key of a sample without image/label."""
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                entry = samples.setdefault(key, {})
                if ext in WDS_IMAGE_EXTENSIONS and "image" not in entry:
                    entry["image"] = (ext, member.offset_data, member.size)
                elif ext == "cls":
                    entry["cls"] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read shard {shard}: {exc}; expected an uncompressed tar") from exc
    index = ShardIndex([], [], [], [], [])
    for key, entry in samples.items():
        if "image" not in entry:
            raise DataError(f"shard {shard}, key {key!r}: no image member ({', '.join(WDS_IMAGE_EXTENSIONS)})")
        if "cls" not in entry:
            raise DataError(f"shard {shard}, key {key!r}: no {key}.cls label member")
        if not (entry["cls"].isascii() and entry["cls"].isdigit()):
            raise DataError(f"shard {shard}, key {key!r}: {key}.cls holds {entry['cls'][:20]!r}, "
                            "expected a class index as decimal text")
        ext, offset, size = entry["image"]
        index.keys.append(key)
        index.exts.append(ext)
        index.offsets.append(offset)
        index.sizes.append(size)
        index.labels.append(int(entry["cls"]))
    return index


def _index_locations(shard: Path) -> list[Path]:
    """Where an index of ``shard`` may live: beside it, then in the cache folder (read-only shard folders)."""
    from beyond_cls.data.synthetic import default_cache_dir

    folder = hashlib.sha256(str(shard.parent.resolve()).encode()).hexdigest()[:16]
    return [shard.with_name(shard.name + ".index.json"),
            default_cache_dir() / "wds-index" / folder / (shard.name + ".index.json")]


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def shard_index(shard: Path) -> ShardIndex:
    """The index of ``shard``: a cached one whose shard name, size and mtime match, else built and cached."""
    st = shard.stat()
    stamp = {"format": INDEX_FORMAT, "shard": shard.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    locations = _index_locations(shard)
    for path in locations:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(data.get(k) == v for k, v in stamp.items()):
            try:
                return ShardIndex(*(data[f] for f in ("keys", "exts", "offsets", "sizes", "labels")))
            except (KeyError, TypeError):
                continue
    index = _build_index(shard)
    text = json.dumps({**stamp, **vars(index)}, separators=(",", ":"))
    for path in locations:
        try:
            write_text_atomic(path, text)
            break
        except OSError:
            continue  # read-only shard folder: the cache folder; neither: index again next time
    return index


class WebDatasetShards(LabeledImages):
    """A split of WebDataset shards as :class:`LabeledImages`; ``paths`` name ``<shard>/<key>.<ext>``.

    Classes: the lines of ``DIR/classes.txt`` if present (as ``beyond-cls shard`` writes it), else ``0..max``
    over the labels of both splits, so train and val agree.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"dataset folder {root} does not exist; expected {_LAYOUT}")
        shards = find_shards(root, split)
        if not shards:
            raise DataError(f"no {SPLIT_TAGS[split].strip('-')} shards (*{SPLIT_TAGS[split]}*.tar) in {root}; "
                            f"expected {_LAYOUT}")
        self.shards = [str(s) for s in shards]
        self._shard_of: list[int] = []
        self._offsets: list[int] = []
        self._sizes: list[int] = []
        paths, targets = [], []
        for i, shard in enumerate(shards):
            index = shard_index(shard)
            paths += [f"{shard}/{k}.{e}" for k, e in zip(index.keys, index.exts)]
            targets += index.labels
            self._shard_of += [i] * len(index.keys)
            self._offsets += index.offsets
            self._sizes += index.sizes
        classes = self._classes(root, split, targets)
        bad = [(p, t) for p, t in zip(paths, targets) if t >= len(classes)]
        if bad:
            raise DataError(f"{bad[0][0]}: label {bad[0][1]} but {root / CLASSES_FILE} lists {len(classes)} classes")
        super().__init__(paths, classes, targets, transform, root, split)
        # least recently used first; a forked worker keeps its inherited copies (pread shares no file offset)
        self._fds: OrderedDict[int, int] = OrderedDict()

    @staticmethod
    def _classes(root: Path, split: str, targets: list[int]) -> list[str]:
        listed = root / CLASSES_FILE
        if listed.is_file():
            return [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
        labels = list(targets)
        other = "val" if split == "train" else "train"
        for shard in find_shards(root, other):
            labels += shard_index(shard).labels
        return [str(i) for i in range(max(labels, default=-1) + 1)]

    @property
    def content_files(self) -> list[str]:
        """The files whose size and mtime stand for the images' contents (the cache fingerprint stats them)."""
        return self.shards

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": OrderedDict()}  # a spawned worker opens its own descriptors

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index``; DataError naming shard and key if it cannot be read."""
        shard = self._shard_of[index]
        try:
            fd = self._descriptor(shard)
            data = os.pread(fd, self._sizes[index], self._offsets[index])
        except OSError as exc:
            raise DataError(f"cannot read image {self.paths[index]}: {exc}") from exc
        if len(data) != self._sizes[index]:
            raise DataError(f"cannot read image {self.paths[index]}: shard is shorter than its index (truncated?)")
        return data

    def _descriptor(self, shard: int) -> int:
        """An open descriptor of shard ``shard``; at most MAX_OPEN_SHARDS stay open (1,024 shards, a usual
        ``ulimit -n``, would otherwise exhaust a worker's descriptors)."""
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= MAX_OPEN_SHARDS:
            with contextlib.suppress(OSError):
                os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def load(self, index: int) -> Image.Image:
        raw = self.read_bytes(index)
        try:
            with Image.open(io.BytesIO(raw)) as img:
                return to_rgb(img)
        except _READ_ERRORS as exc:
            raise DataError(f"cannot read image {self.paths[index]}: {exc}") from exc

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)
