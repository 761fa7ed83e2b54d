"""Feature cache trust: keys that follow the data, seed and weights; checksummed shards; a full disk is one line."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.data.datasets import build_dataset
from beyond_cls.probe import run, shardio
from beyond_cls.probe.cache import CacheError, FeatureCache
from beyond_cls.probe.distributed import DistEnv
from beyond_cls.probe.fingerprint import dataset_fingerprint
from beyond_cls.probe.streams import target_tensor

ENV = DistEnv(0, 1, 0, torch.device("cpu"))
DINO_FILE = "dino_vitbase16_pretrain.pth"  # the zoo's official file name
N, ROW = 10, (3, 4)
TINY = dict(model="vit_tiny_patch16_224", img_size=32, epochs=1, warmup_epochs=0, batch_size=4, effective_batch=8,
            num_workers=0, progress=False, heads="mean", device="cpu")


def _rows(n: int = N) -> torch.Tensor:
    return torch.arange(n * 12, dtype=torch.float32).reshape(n, *ROW) / 7


def _filled(root: Path, dtype: str = "fp32", skip: tuple[int, ...] = (5,)) -> FeatureCache:
    """A cache with one shard ``train_v0`` of N rows written in two batches (one contiguous, one scattered)."""
    cache = FeatureCache(root, {"test": 1}, dtype)
    writer = cache.writer("train", 0, N, ROW, ENV)
    first = torch.arange(0, 5)
    writer.write(first, _rows()[first])
    rest = torch.tensor([i for i in (9, 7, 5, 6, 8, 4) if i not in skip])
    writer.write(rest, _rows()[rest])
    writer.close()
    return cache


def _fresh(cache: FeatureCache) -> FeatureCache:
    return FeatureCache(cache.dir.parent, {"test": 1}, "bf16" if cache.torch_dtype == torch.bfloat16 else "fp32")


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_shard_round_trip_with_checksums(tmp_path, dtype):
    cache = _filled(tmp_path, dtype)
    assert sorted(p.name for p in cache.dir.iterdir() if "train" in p.name) == [
        f"train_v0{ext}" for ext in (".bin", ".crc.npy", ".done", ".json", ".valid.npy")]
    reader = _fresh(cache)
    assert reader.complete("train", 0) and reader.num_valid("train", 0) == N - 1
    kept, rows = reader.read("train", 0, [2, 5, 9, 0])
    assert kept.tolist() == [2, 9, 0]
    torch.testing.assert_close(rows.float(), _rows()[[2, 9, 0]].to(reader.torch_dtype).float(), rtol=0, atol=0)


def test_truncated_shard_is_extracted_again_or_refused(tmp_path):
    cache = _filled(tmp_path)
    path = cache.dir / "train_v0.bin"
    os.truncate(path, path.stat().st_size - 48)
    reader = _fresh(cache)
    with pytest.warns(UserWarning, match=r"train_v0\.bin holds .* bytes, expected .*extracting the shard again"):
        assert not reader.complete("train", 0)
    with pytest.raises(CacheError, match=r"train_v0\.bin holds") as info:
        reader.read("train", 0, [0])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".valid.npy", ".crc.npy", ".json", ".done"])
def test_damaged_small_file_is_extracted_again(tmp_path, suffix):
    cache = _filled(tmp_path)
    path = cache.dir / f"train_v0{suffix}"
    if suffix == ".done":
        path.write_text("not a checksum")
    else:
        _flip_byte(path, path.stat().st_size - 2)  # a label / a row's CRC / the metadata, still parseable
    with pytest.warns(UserWarning, match=rf"train_v0{suffix}.*(damaged|checksum)"):
        assert not _fresh(cache).complete("train", 0)
    rewritten = _filled(tmp_path)  # extracting again makes it whole
    assert _fresh(rewritten).complete("train", 0)


def test_corrupt_row_is_refused_and_the_shard_unmarked(tmp_path):
    cache = _filled(tmp_path)
    _flip_byte(cache.dir / "train_v0.bin", 7 * 12 * 4 + 5)  # inside row 7; the size is unchanged
    reader = _fresh(cache)
    assert reader.complete("train", 0)  # only the rows' CRCs can tell
    kept, _ = reader.read("train", 0, [0, 1, 2])  # good rows read fine
    assert kept.tolist() == [0, 1, 2]
    with pytest.raises(CacheError, match=r"train_v0\.bin: row 7 fails its checksum.*rerun to extract") as info:
        reader.read("train", 0, [6, 7])
    assert "\n" not in str(info.value)
    assert not (cache.dir / "train_v0.done").exists() and not _fresh(cache).complete("train", 0)


def test_rows_are_verified_once_per_process(tmp_path, monkeypatch):
    import beyond_cls.probe.cache as cache_module

    cache = _filled(tmp_path)
    calls = []
    real = cache_module.row_crcs
    monkeypatch.setattr(cache_module, "row_crcs", lambda rows: calls.append(len(rows)) or real(rows))
    reader = _fresh(cache)
    reader.read("train", 0, [0, 1, 2])
    _fresh(cache).read("train", 0, [1, 2, 4])  # a new FeatureCache in the same process: only row 4 is new
    reader.read("train", 0, [0, 1, 2, 4])
    assert calls == [3, 1]


def test_rewriting_unmarks_the_shard_first(tmp_path):
    cache = _filled(tmp_path)
    writer = cache.writer("train", 0, N, ROW, ENV)
    assert not (cache.dir / "train_v0.done").exists()  # an interrupted rewrite is never taken as done
    writer.write(torch.arange(N), _rows() + 1)
    writer.close()
    _, rows = _fresh(cache).read("train", 0, list(range(N)))
    torch.testing.assert_close(rows, _rows() + 1, rtol=0, atol=0)


def test_full_disk_fails_with_one_line_naming_the_shard(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shardio, "_FALLOCATE", full)
    cache = FeatureCache(tmp_path, {"test": 1}, "fp32")
    with pytest.raises(CacheError, match=r"no disk space for feature cache file .*train_v0\.bin: it needs "
                                         r"0\.0 MiB, [\d.]+ [MG]iB free") as info:
        cache.writer("train", 0, N, ROW, ENV)
    assert "\n" not in str(info.value) and not (cache.dir / "train_v0.bin").exists()


def test_full_disk_without_fallocate_fails_in_the_checked_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(shardio, "_FALLOCATE", None)
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    cache = FeatureCache(tmp_path, {"test": 1}, "fp32")
    writer = cache.writer("train", 0, N, ROW, ENV)

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CacheError, match=r"no disk space for feature cache file .*train_v0\.bin"):
        writer.write(torch.arange(2), _rows(2))


def test_file_systems_without_fallocate_get_a_sparse_file(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(shardio, "_FALLOCATE", unsupported)
    cache = _filled(tmp_path)
    torch.testing.assert_close(_fresh(cache).read("train", 0, [4])[1], _rows()[[4]], rtol=0, atol=0)


@pytest.fixture
def small_set(tmp_path):
    cfg = SyntheticConfig(num_classes=2, train_per_class=4, val_per_class=2, image_size=32, object_size=(8, 12))
    return make_synthetic_dataset(tmp_path / "set", cfg)


def _replace_image(path: str) -> None:
    with Image.open(path) as image:
        size, fmt = image.size, image.format
    Image.new("RGB", size, (250, 10, 10)).save(path, format=fmt)


def test_dataset_fingerprint_follows_images_and_labels(small_set):
    ds = build_dataset("imagefolder", small_set, "train")
    targets = target_tensor(ds)
    before = dataset_fingerprint(ds, targets)
    assert before == dataset_fingerprint(ds, targets) and before["samples"] == 8 and before["classes"] == 2
    relabelled = targets.clone()
    relabelled[0] = 1 - relabelled[0]
    assert dataset_fingerprint(ds, relabelled)["targets"] != before["targets"]
    stat = os.stat(ds.paths[3])
    os.utime(ds.paths[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched (or replaced in place)
    touched = dataset_fingerprint(ds, targets)
    assert touched["files"] != before["files"] and touched["paths"] == before["paths"]
    os.remove(ds.paths[5])
    assert dataset_fingerprint(build_dataset("imagefolder", small_set, "train"), targets[:-1])["samples"] == 7


def _done_dirs(cache: Path, name: str) -> set[Path]:
    return {p.parent for p in cache.rglob(name)}


def test_changed_image_extracts_again(small_set, tmp_path):
    cache = tmp_path / "cache"
    common = dict(TINY, data=str(small_set), cache=str(cache))
    run(dict(common, out=str(tmp_path / "a")))
    run(dict(common, out=str(tmp_path / "b")))
    assert len(_done_dirs(cache, "train_v0.done")) == 1  # unchanged: reused
    _replace_image(build_dataset("imagefolder", small_set, "train").paths[0])
    run(dict(common, out=str(tmp_path / "c")))
    assert len(_done_dirs(cache, "train_v0.done")) == 2  # the train set changed: extracted again
    assert len(_done_dirs(cache, "val_v0.done")) == 1  # the val set did not


def test_random_weights_key_the_cache_by_their_seed(small_set, tmp_path):
    cache = tmp_path / "cache"
    common = dict(TINY, data=str(small_set), cache=str(cache))
    run(dict(common, out=str(tmp_path / "a"), seeds="0"))
    run(dict(common, out=str(tmp_path / "b"), seeds="1"))  # another random encoder: its val tokens differ
    assert len(_done_dirs(cache, "val_v0.done")) == 2


def test_zoo_weights_file_keys_the_cache(small_set, tmp_path, monkeypatch):
    from beyond_cls.models.loader import create_encoder

    monkeypatch.delenv("BEYOND_CLS_WEIGHTS", raising=False)
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(create_encoder("vit_tiny_patch16_224", img_size=32).state_dict(), weights / DINO_FILE)
    cache = tmp_path / "cache"
    common = dict(TINY, model="dino_vit_base_patch16", arch="vit_tiny_patch16_224", weights_dir=str(weights),
                  data=str(small_set), cache=str(cache))
    run(dict(common, out=str(tmp_path / "a"), seeds="0"))
    run(dict(common, out=str(tmp_path / "b"), seeds="1"))
    assert len(_done_dirs(cache, "val_v0.done")) == 1  # loaded weights: the val tokens do not depend on the seed
    torch.manual_seed(1)
    torch.save(create_encoder("vit_tiny_patch16_224", img_size=32).state_dict(), weights / DINO_FILE)
    run(dict(common, out=str(tmp_path / "c"), seeds="0"))
    assert len(_done_dirs(cache, "val_v0.done")) == 2  # a new weights file under the same name


def test_fingerprint_takes_file_names_that_are_not_utf8():
    names = [os.fsdecode(b"caf\xe9.jpg"), "plain.jpg"]  # Latin-1 bytes decode to a surrogate
    dataset = type("D", (), {"paths": names, "num_classes": 2})()
    first = dataset_fingerprint(dataset, torch.tensor([0, 1]))
    assert first == dataset_fingerprint(dataset, torch.tensor([0, 1]))
    assert first != dataset_fingerprint(type("D", (), {"paths": names[::-1], "num_classes": 2})(), torch.tensor([0, 1]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fallocate(2) is Linux's")
def test_reservation_uses_the_system_call_not_glibcs_byte_writing_emulation(tmp_path):
    """On Linux the space is reserved with fallocate(2) itself (and really reserved: the blocks are there)."""
    assert shardio._FALLOCATE is not None
    path = tmp_path / "shard.bin"
    shardio.allocate(path, 1 << 20)
    assert path.stat().st_size == 1 << 20 and path.stat().st_blocks * 512 >= 1 << 20
