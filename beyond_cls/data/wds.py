"""WebDataset shards read by random access: ``DIR/*-train-*.tar`` and ``DIR/*-validation-*.tar``.

A sample is ``<key>.<jpg|jpeg|png|webp|bmp>`` + ``<key>.cls`` (the class index as decimal text), optionally
``<key>.json``; samples are ordered by shard name, then tar order. Each shard is indexed once
(:mod:`beyond_cls.data.wds_index`). Images are read with ``os.pread`` from a file descriptor opened lazily in
each process.

A folder holds one set of shards (one name before ``-train-`` / ``-validation-``). A folder written by
``beyond-cls shard`` holds its manifest (:data:`MANIFEST_FILE`, written first as incomplete and last as complete):
an incomplete one is refused, a complete one must list exactly the shards found, with their sizes and sample
counts. Folders without a manifest (other tools' shards, e.g. the public ``imagenet-1k-wds`` layout) are read as
they are, unless a ``.partial`` shard shows that a ``shard`` run was killed there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split
from beyond_cls.data.pixels import to_rgb
from beyond_cls.data.wds_index import MAX_CLASSES, WDS_IMAGE_EXTENSIONS, ShardIndex, shard_index
from beyond_cls.fileio import write_atomic

__all__ = [
    "MANIFEST_FILE", "MAX_CLASSES", "WDS_IMAGE_EXTENSIONS", "ShardIndex", "WebDatasetShards", "find_shards",
    "read_manifest", "shard_index", "write_text_atomic",
]

SPLIT_TAGS = {"train": "-train-", "val": "-validation-"}
MAX_OPEN_SHARDS = 64  # descriptors a process keeps open (least recently used closed first)
CLASSES_FILE = "classes.txt"
MANIFEST_FILE = "beyond_cls_shards.json"
MANIFEST_FORMAT = "beyond-cls shards 1"
_LAYOUT = "shards DIR/<name>-train-<n>.tar and DIR/<name>-validation-<n>.tar of <key>.jpg + <key>.cls samples"
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_RERUN = "delete the folder and run beyond-cls shard again"


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def _split_tag(name: str) -> str | None:
    """The split tag in a shard's file name; DataError when it holds both (a reader could not tell its split)."""
    tags = [tag for tag in SPLIT_TAGS.values() if tag in name]
    if len(tags) > 1:
        raise DataError(f"shard {name} names both splits ({' and '.join(tags)}); rename it")
    return tags[0] if tags else None


def find_shards(root: Path, split: str) -> list[Path]:
    """The split's shards (``*-train-*.tar`` or ``*-validation-*.tar``) under ``root``, sorted by name.

    DataError when the folder holds shards of several sets (names before the split tag differ): a reader would
    merge them."""
    wanted = SPLIT_TAGS[check_split(split)]
    shards, sets = [], set()
    for p in root.iterdir():
        if p.name.startswith(".") or not p.name.endswith(".tar"):
            continue
        tag = _split_tag(p.name)
        if tag is None:
            continue
        sets.add(p.name.partition(tag)[0])
        if tag == wanted:
            shards.append(p)
    if len(sets) > 1:
        raise DataError(f"{root} holds {len(sets)} shard sets ({', '.join(sorted(sets))}): a reader would merge "
                        "them; put each set in its own folder")
    return sorted(shards, key=lambda p: p.name)


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The complete manifest of a folder written by ``beyond-cls shard``; None without one; DataError when it is
    unreadable or says the run did not finish (or, without one, a ``.partial`` shard says so)."""
    path = root / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        partial = sorted(p.name for p in root.glob(".*.tar.partial"))
        if partial:
            raise DataError(f"{root} holds {partial[0]}: beyond-cls shard did not finish writing these shards; "
                            f"{_RERUN}") from None
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the shard manifest {path}: {exc}") from None
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path} is not a manifest of beyond-cls shard ({MANIFEST_FORMAT!r})")
    if data.get("complete") is not True:
        raise DataError(f"{root}: beyond-cls shard did not finish writing these shards ({path} says incomplete: "
                        f"killed or failed); {_RERUN}")
    good = isinstance(splits, dict) and all(
        isinstance(s, dict) and isinstance(s.get("shards"), list)
        and all(isinstance(x, dict) and isinstance(x.get("file"), str) for x in s["shards"]) for s in splits.values()
    ) and isinstance(data.get("classes"), list) and all(isinstance(c, str) for c in data["classes"])
    if not good:
        raise DataError(f"{path}: expected classes (a list of names) and splits (shards with file, samples, bytes)")
    return data


def _listed(root: Path, split: str, shards: list[Path], manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's entries of ``split``'s shards, which must be exactly the shards found, of the recorded sizes."""
    listed = {s["file"]: s for s in manifest["splits"].get(split, {}).get("shards", [])}
    found = {p.name: p for p in shards}
    missing = sorted(set(listed) - set(found))
    if missing:
        raise DataError(f"shard {root / missing[0]} is missing: {MANIFEST_FILE} lists {len(listed)} {split} shards, "
                        f"{len(missing)} of them are not there")
    extra = sorted(set(found) - set(listed))
    if extra:
        raise DataError(f"shard {root / extra[0]} is not listed in {root / MANIFEST_FILE}: not written by that "
                        "beyond-cls shard run; remove it or put the shards in a folder of their own")
    for name, entry in listed.items():
        size = found[name].stat().st_size
        if size != entry.get("bytes"):
            raise DataError(f"shard {found[name]} holds {size} bytes, {MANIFEST_FILE} says {entry.get('bytes')}: "
                            "changed since beyond-cls shard wrote it")
    return listed


class WebDatasetShards(LabeledImages):
    """A split of WebDataset shards as :class:`LabeledImages`; ``paths`` name ``<shard>/<key>.<ext>``.

    Classes: those of the manifest of ``beyond-cls shard``, else the lines of ``DIR/classes.txt`` if present,
    else ``0..max`` over the labels of both splits, so train and val agree.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None):
        check_split(split)
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"dataset folder {root} does not exist; expected {_LAYOUT}")
        manifest = read_manifest(root)
        shards = find_shards(root, split)
        if not shards:
            raise DataError(f"no {SPLIT_TAGS[split].strip('-')} shards (*{SPLIT_TAGS[split]}*.tar) in {root}; "
                            f"expected {_LAYOUT}")
        listed = None if manifest is None else _listed(root, split, shards, manifest)
        self.shards = [str(s) for s in shards]
        self._shard_of: list[int] = []
        self._offsets: list[int] = []
        self._sizes: list[int] = []
        paths, targets = [], []
        for i, shard in enumerate(shards):
            index = shard_index(shard)
            if listed is not None and len(index.keys) != listed[shard.name].get("samples"):
                raise DataError(f"shard {shard} holds {len(index.keys)} samples, {MANIFEST_FILE} says "
                                f"{listed[shard.name].get('samples')}")
            paths += [f"{shard}/{k}.{e}" for k, e in zip(index.keys, index.exts)]
            targets += index.labels
            self._shard_of += [i] * len(index.keys)
            self._offsets += index.offsets
            self._sizes += index.sizes
        if not paths:
            names = shards[0].name + (f" and {len(shards) - 1} more" if len(shards) > 1 else "")
            raise DataError(f"the {split} shards in {root} hold no samples ({names}); expected {_LAYOUT}")
        classes = manifest["classes"] if manifest is not None else self._classes(root, split, targets)
        bad = [(p, t) for p, t in zip(paths, targets) if t >= len(classes)]
        if bad:
            source = root / (MANIFEST_FILE if manifest is not None else CLASSES_FILE)
            raise DataError(f"{bad[0][0]}: label {bad[0][1]} but {source} lists {len(classes)} classes")
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
