"""``beyond-cls shard``: an ImageFolder's train/ and val/ splits written as WebDataset shards.

Samples keep ImageFolder order (classes sorted, files sorted): ``<key>.<ext>`` (the file's bytes, unchanged;
the key is the file's stem when the split's stems are distinct and dot-free, else ``<split>_<index>``),
``<key>.cls`` (the class index) and ``<key>.json`` (the file's path under the split folder). Each shard is
written under a temporary name and renamed when complete, so a killed run leaves no ``.tar`` that looks whole.

The run holds the output folder's lock, writes into a folder holding no other shards (one set per folder), and
keeps the manifest (:data:`~beyond_cls.data.wds.MANIFEST_FILE`) up to date: written first as incomplete, last as
complete with the classes and each shard's file, size and sample count, after ``classes.txt`` (one class name
per line). Readers refuse a folder whose manifest is incomplete.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from beyond_cls.data.folder import DataError, ImageFolderDataset
from beyond_cls.data.wds import (
    CLASSES_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    SPLIT_TAGS,
    WDS_IMAGE_EXTENSIONS,
    write_text_atomic,
)
from beyond_cls.fileio import match_umask
from beyond_cls.runlock import FolderLock

__all__ = ["ShardSize", "check_name", "parse_shard_size", "write_shards"]

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
_TAR_BLOCK = 512
_DIGITS = {"train": 4, "val": 2}


@dataclass(frozen=True)
class ShardSize:
    """A shard's limit: ``samples`` per shard, or about ``bytes`` of tar (a shard holds at least one sample)."""

    samples: int | None = None
    bytes: int | None = None


def parse_shard_size(text: str | int) -> ShardSize:
    """``"1GB"``, ``"500MB"``, ``"64KiB"`` (decimal or binary units): bytes; a plain number: samples."""
    value = str(text).strip()
    if value.isdigit() and int(value) > 0:
        return ShardSize(samples=int(value))
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", value)
    if match and match.group(2).upper() in _UNITS and match.group(2) and float(match.group(1)) > 0:
        return ShardSize(bytes=int(float(match.group(1)) * _UNITS[match.group(2).upper()]))
    raise DataError(f"shard size {text!r}: expected a sample count (e.g. 1000) or a size like 500MB or 1GB")


def _member_bytes(size: int) -> int:
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def _plan(files: list[tuple[str, int]], limit: ShardSize) -> list[list[int]]:
    """Sample indices per shard: consecutive runs under the limit."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, (path, _label) in enumerate(files):
        cost = _member_bytes(os.path.getsize(path)) + 2 * _member_bytes(64)
        full = (len(shards[-1]) >= limit.samples if limit.samples else used + cost > limit.bytes)
        if shards[-1] and full:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += cost
    return shards


def _keys(split: str, files: list[str]) -> list[str]:
    """Sample keys: the files' stems when they are distinct and dot-free (ImageNet's are), so tools that match
    by stem (``localize``'s ``<stem>.xml`` boxes) find them; else ``<split>_<index>``."""
    stems = [Path(f).stem for f in files]
    if len(set(stems)) == len(stems) and all(re.fullmatch(r"[A-Za-z0-9_-]+", s) for s in stems):
        return stems
    width = len(str(len(files) - 1))
    return [f"{split}_{i:0{width}d}" for i in range(len(files))]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: list[tuple[str, str, int, str]]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for key, file, label, rel in samples:
                ext = Path(file).suffix.lower().lstrip(".")
                with open(file, "rb") as f:
                    _add(tar, f"{key}.{ext}", f.read())
                _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.json", json.dumps({"path": rel}).encode())
        match_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_name(name: str) -> None:
    """DataError unless ``name`` is a plain file-name prefix whose shards no reader can take for the other split."""
    if not name or "/" in name or name.startswith("."):
        raise DataError(f"shard name {name!r}: expected a plain file-name prefix such as imagenet1k")
    for split, tag in SPLIT_TAGS.items():
        example = f"{name}{tag}0.tar"
        for other, other_tag in SPLIT_TAGS.items():
            if other != split and other_tag in example:
                raise DataError(f"shard name {name!r}: its {split} shards ({example}) would also read as {other} "
                                f"shards ({other_tag}); choose a name without -train or -validation")


def _check_classes(classes: list[str], split_dir: Path) -> None:
    """classes.txt holds one name per line: no name may hold a line break or edge white space."""
    for name in classes:
        if name != name.strip() or len(name.splitlines()) != 1:
            raise DataError(f"class folder {name!r} in {split_dir}: a class name with a line break or leading or "
                            f"trailing white space cannot be listed in {CLASSES_FILE} (one name per line); "
                            "rename the folder")


def _check_empty(out: Path) -> None:
    """A reader takes every shard of a folder: new shards beside any others (or a killed run's) would mix sets."""
    held = sorted((p.name for p in out.iterdir() if p.name == MANIFEST_FILE or p.name.endswith(".tar.partial")
                   or (p.name.endswith(".tar") and any(tag in p.name for tag in SPLIT_TAGS.values()))),
                  key=lambda name: (not name.endswith(".tar"), name))  # shards named first
    if held:
        more = f", … {len(held)} files in all" if len(held) > 1 else ""
        raise DataError(f"{out} already holds shards ({held[0]}{more}): one set per folder; write into an empty "
                        "folder or remove them first")


def _manifest(name: str, classes: list[str] | None, shards: dict[str, list[dict]] | None) -> str:
    complete = shards is not None
    data = {"format": MANIFEST_FORMAT, "name": name, "complete": complete}
    if complete:
        data["classes"] = classes
        data["splits"] = {split: {"samples": sum(s["samples"] for s in files), "shards": files}
                          for split, files in shards.items()}
    return json.dumps(data, indent=1)


def write_shards(
    data: str | os.PathLike, out: str | os.PathLike, name: str = "shards", shard_size: str | int = "1GB"
) -> dict[str, list[str]]:
    """Shard ``data/{train,val}`` into ``out/NAME-train-NNNN.tar`` / ``NAME-validation-NN.tar``; split -> files."""
    limit = parse_shard_size(shard_size)
    check_name(name)
    root = Path(data).expanduser()
    splits = {s: ImageFolderDataset(root, s) for s in ("train", "val") if s == "train" or (root / s).is_dir()}
    classes = splits["train"].classes
    _check_classes(classes, root / "train")
    for split, ds in splits.items():
        if ds.classes != classes:
            raise DataError(f"class folders of {root / 'train'} and {root / split} differ; labels would not agree")
        bad = [p for p in ds.paths if Path(p).suffix.lower().lstrip(".") not in WDS_IMAGE_EXTENSIONS]
        if bad:
            raise DataError(f"{bad[0]}: extension not one of {', '.join(WDS_IMAGE_EXTENSIONS)}")
    out = Path(out).expanduser()
    with FolderLock(out, "shard folder"):
        _check_empty(out)
        write_text_atomic(out / MANIFEST_FILE, _manifest(name, None, None))
        written: dict[str, list[str]] = {}
        recorded: dict[str, list[dict]] = {}
        for split, ds in splits.items():
            plan = _plan(ds.samples, limit)
            digits = max(_DIGITS[split], len(str(len(plan) - 1)))
            tag = SPLIT_TAGS[split]
            keys = _keys(split, [file for file, _ in ds.samples])
            written[split], recorded[split] = [], []
            for n, indices in enumerate(plan):
                path = out / f"{name}{tag}{n:0{digits}d}.tar"
                samples = []
                for i in indices:
                    file, label = ds.samples[i]
                    samples.append((keys[i], file, label, os.path.relpath(file, root / split)))
                _write_shard(path, samples)
                written[split].append(str(path))
                recorded[split].append({"file": path.name, "samples": len(samples), "bytes": path.stat().st_size})
        write_text_atomic(out / CLASSES_FILE, "".join(f"{c}\n" for c in classes))
        write_text_atomic(out / MANIFEST_FILE, _manifest(name, classes, recorded))
    return written
