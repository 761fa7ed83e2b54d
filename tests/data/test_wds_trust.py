"""Shards that cannot lie: replaced shards, corrupt or truncated tars, repeated keys, unfinished or mixed
``shard`` folders, class names, label bounds, empty splits and inconsistent indexes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from beyond_cls.cli import main
from beyond_cls.data import DataError, SyntheticConfig, build_dataset, make_synthetic_dataset
from beyond_cls.data.shard_writer import write_shards
from beyond_cls.data.wds import MANIFEST_FILE, MAX_CLASSES, WebDatasetShards
from beyond_cls.runlock import FolderBusy, FolderLock


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("wdstrust") / "set"
    cfg = SyntheticConfig(num_classes=3, train_per_class=4, val_per_class=2, image_size=32, object_size=(8, 12))
    return make_synthetic_dataset(root, cfg)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("wdstrust") / "shards"
    write_shards(folder, out, name="syn", shard_size="4")
    return out


def _copy(shards: Path, out: Path, pattern: str = "syn-*.tar") -> Path:
    out.mkdir()
    for p in shards.glob(pattern):
        (out / p.name).write_bytes(p.read_bytes())
    return out


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return [m for m in tar if m.isfile()]


def _relabel(data: bytearray, shard: Path) -> list[int]:
    """Give every sample of ``shard`` (bytes ``data``) label (old + 1) mod 3 in place: same size; the new labels."""
    labels = []
    for m in _members(shard):
        if m.name.endswith(".cls"):
            new = (int(data[m.offset_data:m.offset_data + m.size]) + 1) % 3
            data[m.offset_data:m.offset_data + m.size] = str(new).encode()
            labels.append(new)
    return labels


@pytest.mark.parametrize("how", ["renamed over", "rewritten in place"])
def test_a_replaced_shard_of_the_same_size_and_mtime_is_indexed_again(shards, tmp_path, how):
    out = _copy(shards, tmp_path / "s")
    shard = out / "syn-train-0000.tar"
    before = WebDatasetShards(out, "train").targets[:4]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    labels = _relabel(data, shard)
    assert labels != before and len(data) == st.st_size
    time.sleep(0.05)  # a later change time than the index's
    if how == "renamed over":
        (out / "new.tmp").write_bytes(bytes(data))
        os.replace(out / "new.tmp", shard)
    else:
        with open(shard, "r+b") as f:
            f.write(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: size and mtime as before
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert WebDatasetShards(out, "train").targets[:4] == labels


def test_a_corrupt_header_mid_shard_is_refused(shards, tmp_path):
    out = _copy(shards, tmp_path / "s")
    shard = out / "syn-train-0001.tar"
    header = _members(shard)[6].offset  # the 7th of 12 members
    data = bytearray(shard.read_bytes())
    data[header + 3] ^= 0x01  # one bit of the member's name: its header checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"syn-train-0001\.tar.*byte {header}"):
        WebDatasetShards(out, "train")


def test_a_shard_truncated_at_a_member_boundary_is_refused(shards, tmp_path, capsys):
    out = _copy(shards, tmp_path / "s")
    shard = out / "syn-validation-00.tar"
    cut = _members(shard)[9].offset  # three whole samples, no end-of-archive blocks
    with open(shard, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(DataError, match=r"syn-validation-00\.tar is truncated"):
        WebDatasetShards(out, "val")
    argv = ["analyze", "--model", "vit_tiny_patch16_224", "--data", str(out), "--dataset", "wds",
            "--out", str(tmp_path / "a"), "--device", "cpu", "--img-size", "32", "--num-workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and len(err.splitlines()) == 1


def test_a_key_repeated_apart_is_refused(folder, tmp_path):
    jpg = (folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "x-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.cls", b"1"),
                                      ("a.jpg", jpg), ("a.cls", b"1")])
    with pytest.raises(DataError, match=r"x-train-0\.tar.*key 'a'.*twice"):
        build_dataset("wds", tmp_path, "train")
    _tar(tmp_path / "x-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("a.cls", b"1")])
    with pytest.raises(DataError, match=r"key 'a'.*two a\.cls members"):
        build_dataset("wds", tmp_path, "train")


def test_a_folder_left_by_a_killed_shard_is_refused(folder, tmp_path):
    out = tmp_path / "killed"
    script = (  # SIGKILL while the 2nd validation shard is written: no cleanup can run
        "import os, signal, sys\n"
        "from beyond_cls.data import shard_writer\n"
        "real, n = shard_writer._add, [0]\n"
        "def add(tar, name, data):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3 * 12 + 3 * 2 + 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(tar, name, data)\n"
        "shard_writer._add = add\n"
        "shard_writer.write_shards(sys.argv[1], sys.argv[2], name='k', shard_size='2')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(folder), str(out)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in out.glob("k-validation-*.tar")] == ["k-validation-00.tar"]
    for split in ("train", "val"):
        with pytest.raises(DataError, match=r"did not finish"):
            build_dataset("wds", out, split)
    with pytest.raises(DataError, match="already holds"):  # and shard does not write into it
        write_shards(folder, out, name="k", shard_size="2")


def test_a_complete_folder_is_checked_against_its_manifest(folder, shards, tmp_path):
    manifest = json.loads((shards / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["classes"] == build_dataset("imagefolder", folder, "train").classes
    assert [s["samples"] for s in manifest["splits"]["val"]["shards"]] == [4, 2]
    out = _copy(shards, tmp_path / "s", "*")
    (out / "syn-train-0002.tar").unlink()  # a shard lost in a copy
    with pytest.raises(DataError, match=r"syn-train-0002\.tar.*missing"):
        WebDatasetShards(out, "train")
    assert len(WebDatasetShards(out, "val")) == 6


def test_shards_of_other_tools_still_read(folder, tmp_path):
    jpg = (folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "imagenet1k-train-0000.tar", [("a.jpg", jpg), ("a.cls", b"1"), ("b.jpg", jpg), ("b.cls", b"0")])
    _tar(tmp_path / "imagenet1k-validation-00.tar", [("c.jpg", jpg), ("c.cls", b"1")])
    assert build_dataset("wds", tmp_path, "train").targets == [1, 0]
    assert build_dataset("wds", tmp_path, "val").classes == ["0", "1"]


def test_shard_locks_its_output_folder(folder, tmp_path):
    out = tmp_path / "locked"
    with FolderLock(out), pytest.raises(FolderBusy, match="in use by"):
        write_shards(folder, out, name="a", shard_size="4")
    assert not list(out.glob("*.tar"))


@pytest.mark.parametrize("name", ["x-validation-y", "x-train-y", "x-train", "x-validation"])
def test_names_that_mix_the_splits_are_refused(folder, tmp_path, name):
    with pytest.raises(DataError, match=f"shard name '{name}'"):
        write_shards(folder, tmp_path / "o", name=name, shard_size="4")


def test_a_second_set_in_one_folder_is_refused(folder, shards, tmp_path):
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(folder, shards, name="other", shard_size="4")
    jpg = (folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "setA-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0")])
    _tar(tmp_path / "setB-train-0.tar", [("b.jpg", jpg), ("b.cls", b"1")])
    with pytest.raises(DataError, match=r"2 shard sets \(setA, setB\)"):
        build_dataset("wds", tmp_path, "train")


def test_a_class_name_that_classes_txt_cannot_hold_is_refused(folder, tmp_path):
    root = tmp_path / "odd"
    for split in ("train", "val"):
        for name, src in (("a\nb", "00_disc"), ("c", "01_square")):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.jpg").write_bytes((folder / split / src / "0000.jpg").read_bytes())
    with pytest.raises(DataError, match=r"class folder 'a\\nb'"):
        write_shards(root, tmp_path / "o", name="odd")


@pytest.mark.parametrize("label", [MAX_CLASSES, 99999999999])
def test_labels_beyond_the_bound_are_refused(folder, tmp_path, label):
    jpg = (folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "x-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("big.jpg", jpg), ("big.cls", b"%d" % label)])
    with pytest.raises(DataError, match=rf"x-train-0\.tar, key 'big': label {label} "):
        build_dataset("wds", tmp_path, "train")


def test_analyze_of_a_split_without_samples_is_one_line(folder, tmp_path, capsys):
    jpg = (folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "e-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0")])
    _tar(tmp_path / "e-validation-0.tar", [])
    argv = ["analyze", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--dataset", "wds",
            "--out", str(tmp_path / "a"), "--device", "cpu", "--img-size", "32", "--num-workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "hold no samples" in err and "e-validation-0.tar" in err and len(err.splitlines()) == 1


def test_an_index_whose_lists_disagree_is_named(shards, tmp_path):
    out = _copy(shards, tmp_path / "s")
    WebDatasetShards(out, "train")
    index = out / "syn-train-0001.tar.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "labels": data["labels"][:-1]}))
    with pytest.raises(DataError, match=rf"index file {index}"):
        WebDatasetShards(out, "train")
