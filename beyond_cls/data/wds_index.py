"""The index of one WebDataset shard: each sample's key, image offset and size, and label, read once from the tar.

The index is cached as ``<shard>.index.json`` beside the shard, or under ``$BEYOND_CLS_CACHE/wds-index/`` when
the shard folder is read-only. It is keyed by the shard's name, size, mtime, change time and inode, so a shard
rewritten in place or renamed over is indexed again, even when given back its old size and mtime (``touch -r``).

Building an index refuses what ``tar`` would stop at or what would silently lose samples: a corrupt header mid-shard,
a shard cut short of its end-of-archive block, a key repeated apart from its sample (WebDataset groups adjacent
members only), a member given twice, a label of :data:`MAX_CLASSES` or more.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beyond_cls.data.folder import DataError
from beyond_cls.fileio import write_atomic

__all__ = ["INDEX_FORMAT", "MAX_CLASSES", "WDS_IMAGE_EXTENSIONS", "ShardIndex", "build_index", "shard_index"]

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
INDEX_FORMAT = 2
MAX_CLASSES = 1_000_000  # labels are below this: a class list is made from the largest label when none is given
_MAX_LABEL_BYTES = 64
_FIELDS = ("keys", "exts", "offsets", "sizes", "labels")


@dataclass
class ShardIndex:
    """One shard's samples in tar order: key, image extension, data offset and size, label."""

    keys: list[str]
    exts: list[str]
    offsets: list[int]
    sizes: list[int]
    labels: list[int]


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the key ends at the first dot of the member's base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path, key: str) -> int:
    where = f"shard {shard}, key {key!r}"
    if member.size > _MAX_LABEL_BYTES:
        raise DataError(f"{where}: {key}.cls holds {member.size} bytes, expected a class index as decimal text")
    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
    if not (text.isascii() and text.isdigit()):
        raise DataError(f"{where}: {key}.cls holds {text[:20]!r}, expected a class index as decimal text")
    label = int(text)
    if label >= MAX_CLASSES:
        raise DataError(f"{where}: label {label} is not below {MAX_CLASSES:,}, the most classes a set may have here")
    return label


def _check_end(shard: Path, end: int) -> None:
    """The member walk stopped at byte ``end``: tar's end-of-archive (a zero block) must be there."""
    with open(shard, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        raise DataError(f"shard {shard} is truncated: it ends at byte {end + len(block)} without tar's end-of-archive "
                        "block (copied or written only in part?)")
    if block.count(0) != len(block):
        raise DataError(f"shard {shard}: unreadable tar header at byte {end} (corrupt); the members from there on "
                        "would be lost")


def build_index(shard: Path) -> ShardIndex:
    """Walk the tar headers of ``shard``; DataError naming the shard (and key) of anything it cannot trust."""
    samples: dict[str, dict[str, Any]] = {}
    current = None
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_name(member.name)
                if key != current:
                    if key in samples:
                        raise DataError(f"shard {shard}: key {key!r} appears twice, apart (WebDataset takes adjacent "
                                        "members as one sample); give each sample its own key")
                    samples[key], current = {"seen": set()}, key
                entry = samples[key]
                if ext in entry["seen"]:
                    raise DataError(f"shard {shard}, key {key!r}: two {key}.{ext} members")
                entry["seen"].add(ext)
                if ext in WDS_IMAGE_EXTENSIONS and "image" not in entry:
                    entry["image"] = (ext, member.offset_data, member.size)
                elif ext == "cls":
                    entry["cls"] = _label(tar, member, shard, key)
            end = tar.offset
        _check_end(shard, end)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read shard {shard}: {exc}; expected an uncompressed tar") from exc
    index = ShardIndex([], [], [], [], [])
    for key, entry in samples.items():
        if "image" not in entry:
            raise DataError(f"shard {shard}, key {key!r}: no image member ({', '.join(WDS_IMAGE_EXTENSIONS)})")
        if "cls" not in entry:
            raise DataError(f"shard {shard}, key {key!r}: no {key}.cls label member")
        ext, offset, size = entry["image"]
        index.keys.append(key)
        index.exts.append(ext)
        index.offsets.append(offset)
        index.sizes.append(size)
        index.labels.append(entry["cls"])
    return index


def _index_locations(shard: Path) -> list[Path]:
    """Where an index of ``shard`` may live: beside it, then in the cache folder (read-only shard folders)."""
    from beyond_cls.data.synthetic import default_cache_dir

    folder = hashlib.sha256(str(shard.parent.resolve()).encode()).hexdigest()[:16]
    return [shard.with_name(shard.name + ".index.json"),
            default_cache_dir() / "wds-index" / folder / (shard.name + ".index.json")]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _problem(data: dict[str, Any], shard_size: int) -> str:
    """What makes a cached index's lists unusable for its shard, or ""."""
    lists = {f: data.get(f) for f in _FIELDS}
    if not all(isinstance(v, list) for v in lists.values()):
        return "a list is missing"
    if len({len(v) for v in lists.values()}) != 1:
        return "lists of different lengths: " + ", ".join(f"{len(v)} {f}" for f, v in lists.items())
    if not all(isinstance(v, str) for f in ("keys", "exts") for v in lists[f]):
        return "keys and extensions must be strings"
    if not all(_is_count(v) for f in ("offsets", "sizes", "labels") for v in lists[f]):
        return "offsets, sizes and labels must be integers >= 0"
    if any(o + s > shard_size for o, s in zip(lists["offsets"], lists["sizes"])):
        return "an image lies past the end of the shard"
    if any(v >= MAX_CLASSES for v in lists["labels"]):
        return f"a label is not below {MAX_CLASSES:,}"
    return ""


def shard_index(shard: Path) -> ShardIndex:
    """The index of ``shard``: a cached one whose stamp (name, size, mtime, ctime, inode) matches, else built and
    cached. DataError naming the index file when a matching one holds lists that do not fit the shard."""
    st = shard.stat()
    stamp = {"format": INDEX_FORMAT, "shard": shard.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    locations = _index_locations(shard)
    for path in locations:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and all(data.get(k) == v for k, v in stamp.items()):
            problem = _problem(data, st.st_size)
            if problem:
                raise DataError(f"index file {path} does not fit its shard ({problem}); delete it and it is built "
                                "again")
            return ShardIndex(*(data[f] for f in _FIELDS))
    index = build_index(shard)
    text = json.dumps({**stamp, **vars(index)}, separators=(",", ":"))
    for path in locations:
        try:
            write_atomic(path, text.encode())
            break
        except OSError:
            continue  # read-only shard folder: the cache folder; neither: index again next time
    return index
