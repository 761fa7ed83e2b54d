"""WebDataset shards: ``beyond-cls shard``, the ``wds`` adapter (index cache, views, errors) and probe equality;
shards that cannot lie (replaced, corrupt or truncated tars, repeated keys, unfinished or mixed ``shard`` folders,
class names, label bounds, empty splits, inconsistent indexes)."""

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
import torch

from beyond_cls.cli import main
from beyond_cls.data import (
    DataError,
    SyntheticConfig,
    ViewDataset,
    build_dataset,
    collate_views,
    make_synthetic_dataset,
    shard_writer,
)
from beyond_cls.data.shard_writer import ShardSize, parse_shard_size, write_shards
from beyond_cls.data.wds import MANIFEST_FILE, MAX_CLASSES, WebDatasetShards
from beyond_cls.probe import run
from beyond_cls.probe.state import load_state
from beyond_cls.runlock import FolderBusy, FolderLock
from tests.tiny_probe import TINY, TINY_SET


def _sharded(folder: Path, tmp_path_factory, shard_size: str) -> Path:
    """``folder`` written as shards ``syn-<split>-NNNN.tar`` of ``shard_size`` samples, in a fresh folder."""
    out = tmp_path_factory.mktemp("wds") / "shards"
    write_shards(folder, out, name="syn", shard_size=shard_size)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("wds") / "set", TINY_SET)


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return _sharded(folder, tmp_path_factory, "5")


def _tar(path: Path, members: dict[str, bytes] | list[tuple[str, bytes]]) -> None:
    """A tar of ``members`` in order (a list may repeat a name)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items() if isinstance(members, dict) else members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_names_order_and_classes(folder, shards):
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == [f"syn-train-{i:04d}.tar" for i in range(5)] + [f"syn-validation-{i:02d}.tar" for i in range(3)]
    assert (shards / "classes.txt").read_text().split() == build_dataset("imagefolder", folder, "train").classes
    assert not list(shards.glob(".*partial"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_wds_matches_image_folder(folder, shards, split):
    ref = build_dataset("imagefolder", folder, split)
    ds = build_dataset("wds", shards, split)
    assert len(ds) == len(ref) and ds.classes == ref.classes and ds.num_classes == 3
    assert [ds.target(i) for i in range(len(ds))] == ref.targets
    for i in range(len(ds)):
        assert ds.read_bytes(i) == Path(ref.paths[i]).read_bytes()
    assert torch.equal(torch.tensor(list(ds.load(3).tobytes())), torch.tensor(list(ref.load(3).tobytes())))


def test_index_cached_beside_and_rebuilt_when_shard_changes(shards, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    for p in shards.glob("syn-*.tar"):
        (out / p.name).write_bytes(p.read_bytes())
    WebDatasetShards(out, "train")
    index = out / "syn-train-0000.tar.index.json"
    data = json.loads(index.read_text())
    assert data["shard"] == "syn-train-0000.tar" and len(data["keys"]) == 5
    index.write_text(json.dumps({**data, "labels": [0] * 5}))  # a stale-looking index is used while stamps match
    assert WebDatasetShards(out, "train").targets[:5] == [0] * 5
    os.utime(out / "syn-train-0000.tar", ns=(1, 1))  # the shard "changed": rebuilt
    assert WebDatasetShards(out, "train").targets[:5] == data["labels"]
    assert WebDatasetShards(out, "train").classes == ["0", "1", "2"]  # without classes.txt: 0..max label


def test_index_falls_back_to_cache_folder_when_read_only(shards, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    for p in shards.glob("syn-train-*.tar"):
        (out / p.name).write_bytes(p.read_bytes())
    monkeypatch.setenv("BEYOND_CLS_CACHE", str(tmp_path / "cache"))
    real_mkstemp = __import__("tempfile").mkstemp

    def refuse(*args, dir=None, **kw):  # root ignores chmod: refuse writes into the shard folder instead
        if Path(dir) == out:
            raise PermissionError(13, "Read-only file system", str(dir))
        return real_mkstemp(*args, dir=dir, **kw)

    monkeypatch.setattr("beyond_cls.fileio.tempfile.mkstemp", refuse)
    assert len(WebDatasetShards(out, "train")) == 24
    assert not list(out.glob("*.index.json"))
    assert len(list((tmp_path / "cache" / "wds-index").rglob("*.index.json"))) == 5


@pytest.mark.parametrize("decode", ["cpu", "gpu"], ids=["pil", "encoded"])  # "encoded": worker side of gpu decode
def test_views_equal_folder_views_in_workers(folder, shards, decode):
    def batches(base):
        views = ViewDataset(base, train=True, img_size=32, decode=decode)
        loader = torch.utils.data.DataLoader(views, batch_size=6, num_workers=2, collate_fn=collate_views,
                                             sampler=[(i, 1) for i in range(len(views))])
        return list(loader)

    got, want = batches(build_dataset("wds", shards, "train")), batches(build_dataset("imagefolder", folder, "train"))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want):
        assert torch.equal(a.targets, b.targets)
        if decode == "cpu":
            assert torch.equal(a.images, b.images)
        else:
            assert torch.equal(a.data, b.data) and torch.equal(a.params, b.params)


def test_probe_on_shards_equals_probe_on_folder(folder, shards, tmp_path):
    res = {}
    for name, kw in {"folder": dict(data=str(folder)), "wds": dict(data=str(shards), dataset="wds")}.items():
        res[name] = run(dict(TINY, **kw, out=str(tmp_path / name), seeds="0"))
    rows = {name: json.loads((tmp_path / name / "results.json").read_text())["rows"] for name in res}
    assert json.dumps(rows["wds"]) == json.dumps(rows["folder"])  # text: NaN entropies compare equal
    assert len(rows["wds"]) == 6 and json.dumps(res["wds"]["rows"]) == json.dumps(res["folder"]["rows"])
    a, b = (load_state(tmp_path / n / "seed0" / "checkpoint.pt")["bank"] for n in ("folder", "wds"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_member_names_shard_and_key_or_is_skipped(tmp_path, capsys):
    _tar(tmp_path / "x-train-0.tar", {"a.jpg": b"not a jpeg", "a.cls": b"0", "b.png": b"junk", "b.cls": b"1"})
    ds = build_dataset("wds", tmp_path, "train")
    assert ds.classes == ["0", "1"] and ds.targets == [0, 1]
    with pytest.raises(DataError, match=r"cannot read image .*x-train-0\.tar/a\.jpg"):
        ds.load(0)
    views = ViewDataset(ds, train=False, img_size=32, skip_bad_images=True)
    batch = collate_views([views[0], views[1]])
    assert batch.skipped == 2 and batch.skipped_paths[1].endswith("x-train-0.tar/b.png")


def test_bad_shards_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(DataError, match=r"no train shards \(\*-train-\*\.tar\) in"):
        build_dataset("wds", tmp_path, "train")
    _tar(tmp_path / "x-train-0.tar", {"a.jpg": b"x", "a.cls": b"0", "k7.jpg": b"x"})
    with pytest.raises(DataError, match=r"x-train-0\.tar, key 'k7': no k7\.cls label member"):
        build_dataset("wds", tmp_path, "train")
    _tar(tmp_path / "x-train-0.tar", {"a.jpg": b"x", "a.cls": b"dog"})
    with pytest.raises(DataError, match=r"key 'a': a\.cls holds 'dog'"):
        build_dataset("wds", tmp_path, "train")
    (tmp_path / "x-train-0.tar").write_bytes(b"\x1f\x8b gzip?")
    assert main(["probe", "--data", str(tmp_path), "--dataset", "wds", "--out", str(tmp_path / "o"),
                 "--model", "vit_tiny_patch16_224", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read shard" in err and "x-train-0.tar" in err and len(err.splitlines()) == 1


def test_shard_size_parsing():
    assert parse_shard_size("1000") == ShardSize(samples=1000)
    assert parse_shard_size("500MB") == ShardSize(bytes=500_000_000)
    assert parse_shard_size("1GB") == ShardSize(bytes=10**9) and parse_shard_size("2KiB") == ShardSize(bytes=2048)
    for bad in ("0", "-3", "1XB", "MB", ""):
        with pytest.raises(DataError, match="expected a sample count"):
            parse_shard_size(bad)


def test_shard_cli_bytes_limit_and_bad_input(folder, tmp_path, capsys):
    assert main(["shard", "--data", str(folder), "--out", str(tmp_path / "s"), "--name", "n",
                 "--shard-size", "8KB"]) == 0
    assert "train:" in capsys.readouterr().out
    tars = sorted((tmp_path / "s").glob("n-train-*.tar"))
    assert len(tars) > 1 and all(p.stat().st_size <= 8000 + 10240 for p in tars)
    assert len(WebDatasetShards(tmp_path / "s", "train")) == 24
    assert main(["shard", "--data", str(folder), "--out", str(tmp_path / "t"), "--shard-size", "lots"]) == 2
    assert main(["shard", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "t")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and "shard size 'lots'" in errs[0] and "does not exist" in errs[1]


def test_killed_shard_write_leaves_no_complete_looking_shard(folder, tmp_path, monkeypatch):
    calls = []

    real = shard_writer._add

    def die(tar, name, data):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        real(tar, name, data)

    monkeypatch.setattr("beyond_cls.data.shard_writer._add", die)
    with pytest.raises(KeyboardInterrupt):
        write_shards(folder, tmp_path, name="k", shard_size="4")
    names = sorted(p.name for p in tmp_path.iterdir())  # 4 samples x 3 members done; no partials
    assert names == ["beyond_cls_shards.json", "k-train-0000.tar"]
    with pytest.raises(DataError, match="did not finish"):  # the manifest says incomplete
        WebDatasetShards(tmp_path, "train")


def test_analyze_reads_shards(folder, shards, tmp_path):
    from beyond_cls.analysis.analyze import AnalyzeConfig, analyze

    kw = dict(model="vit_tiny_patch16_224", img_size=32, batch_size=8, num_workers=0, device="cpu", progress=False)
    torch.manual_seed(0)  # the same random encoder weights for both
    a = analyze(AnalyzeConfig(data=str(folder), out=str(tmp_path / "f"), **kw))
    torch.manual_seed(0)
    b = analyze(AnalyzeConfig(data=str(shards), dataset="wds", out=str(tmp_path / "w"), **kw))
    assert a.num_images == b.num_images == 12
    assert a.to_dict() == b.to_dict()


def test_cache_fingerprint_follows_shard_contents(shards, tmp_path):
    from beyond_cls.probe.fingerprint import dataset_fingerprint

    out = tmp_path / "s"
    out.mkdir()
    for p in shards.glob("syn-train-*.tar"):
        (out / p.name).write_bytes(p.read_bytes())
    ds = WebDatasetShards(out, "train")
    before = dataset_fingerprint(ds, torch.tensor(ds.targets))
    assert dataset_fingerprint(ds, torch.tensor(ds.targets)) == before
    os.utime(out / "syn-train-0003.tar", ns=(5, 5))  # a rewritten shard: same sample paths, new contents
    assert dataset_fingerprint(ds, torch.tensor(ds.targets))["content_files"] != before["content_files"]


def _distinct_names(folder: Path, out: Path, prefix: str = "") -> Path:
    """A copy of the synthetic set whose file stems are distinct (<prefix><class>_<split>_<stem>.jpg)."""
    for split in ("train", "val"):
        for path in sorted((folder / split).glob("*/*.jpg")):
            target = out / split / path.parent.name / f"{prefix}{path.parent.name}_{split}_{path.stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return out


def test_keys_are_the_file_stems_when_distinct(folder, shards, tmp_path):
    """Distinct, dot-free stems (ImageNet's) become the keys, so `localize` finds `<stem>.xml` boxes."""
    named = _distinct_names(folder, tmp_path / "named")
    write_shards(named, tmp_path / "out", name="named", shard_size="5")
    for split in ("train", "val"):
        ref = build_dataset("imagefolder", named, split)
        ds = build_dataset("wds", tmp_path / "out", split)
        assert [Path(p).stem for p in ds.paths] == [Path(p).stem for p in ref.paths]
    repeated = build_dataset("wds", shards, "train")  # the synthetic set repeats 0000.jpg in every class
    assert Path(repeated.paths[0]).stem == "train_00"


def test_shards_are_not_written_beside_older_ones(folder, shards):
    """A reader takes every matching shard: writing a second set into the folder would mix the two."""
    with pytest.raises(DataError, match=r"already holds shards \(syn-"):
        write_shards(folder, shards, name="syn", shard_size="2")
    assert len(build_dataset("wds", shards, "train")) == len(build_dataset("imagefolder", folder, "train"))


def test_long_stems_and_unicode_digit_labels(folder, tmp_path):
    long = _distinct_names(folder, tmp_path / "long", prefix="x" * 120)
    write_shards(long, tmp_path / "out", name="long")  # keys past tar's 100-character names: PAX headers
    ds = build_dataset("wds", tmp_path / "out", "train")
    assert [Path(p).stem for p in ds.paths] == [Path(p).stem for p in build_dataset("imagefolder", long, "train").paths]
    bad = tmp_path / "bad"
    bad.mkdir()
    _tar(bad / "b-train-0000.tar", {"a.jpg": (folder / "train" / "00_disc" / "0000.jpg").read_bytes(),
                                    "a.cls": "²".encode()})
    with pytest.raises(DataError, match=r"key 'a': a\.cls holds '²', expected a class index"):
        build_dataset("wds", bad, "train")


def test_open_shards_are_bounded(shards, monkeypatch):
    """Random access over many shards keeps at most MAX_OPEN_SHARDS descriptors open per process."""
    from beyond_cls.data import wds

    monkeypatch.setattr(wds, "MAX_OPEN_SHARDS", 2)
    ds = build_dataset("wds", shards, "train")
    expected = [ds.read_bytes(i) for i in range(len(ds))]
    assert len(ds._fds) == 2
    for i in reversed(range(len(ds))):  # evicted shards are opened again and read the same bytes
        assert ds.read_bytes(i) == expected[i] and len(ds._fds) <= 2


# ----------------------------------------------------------------------------------- shards that cannot lie
# a smaller set than ``folder``: 12 train and 6 val images in shards of 4 samples (the counts below rely on it)
@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    cfg = SyntheticConfig(num_classes=3, train_per_class=4, val_per_class=2, image_size=32, object_size=(8, 12))
    return make_synthetic_dataset(tmp_path_factory.mktemp("wds") / "small", cfg)


@pytest.fixture(scope="module")
def small_shards(small_folder, tmp_path_factory):
    return _sharded(small_folder, tmp_path_factory, "4")


def _copy(shards: Path, out: Path, pattern: str = "syn-*.tar") -> Path:
    out.mkdir()
    for p in shards.glob(pattern):
        (out / p.name).write_bytes(p.read_bytes())
    return out


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
def test_a_replaced_shard_of_the_same_size_and_mtime_is_indexed_again(small_shards, tmp_path, how):
    out = _copy(small_shards, tmp_path / "s")
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


def test_a_corrupt_header_mid_shard_is_refused(small_shards, tmp_path):
    out = _copy(small_shards, tmp_path / "s")
    shard = out / "syn-train-0001.tar"
    header = _members(shard)[6].offset  # the 7th of 12 members
    data = bytearray(shard.read_bytes())
    data[header + 3] ^= 0x01  # one bit of the member's name: its header checksum no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"syn-train-0001\.tar.*byte {header}"):
        WebDatasetShards(out, "train")


def test_a_shard_truncated_at_a_member_boundary_is_refused(small_shards, tmp_path, capsys):
    out = _copy(small_shards, tmp_path / "s")
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


def test_a_key_repeated_apart_is_refused(small_folder, tmp_path):
    jpg = (small_folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "x-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.cls", b"1"),
                                      ("a.jpg", jpg), ("a.cls", b"1")])
    with pytest.raises(DataError, match=r"x-train-0\.tar.*key 'a'.*twice"):
        build_dataset("wds", tmp_path, "train")
    _tar(tmp_path / "x-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("a.cls", b"1")])
    with pytest.raises(DataError, match=r"key 'a'.*two a\.cls members"):
        build_dataset("wds", tmp_path, "train")


def test_a_folder_left_by_a_killed_shard_is_refused(small_folder, tmp_path):
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
    proc = subprocess.run([sys.executable, "-c", script, str(small_folder), str(out)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert [p.name for p in out.glob("k-validation-*.tar")] == ["k-validation-00.tar"]
    for split in ("train", "val"):
        with pytest.raises(DataError, match=r"did not finish"):
            build_dataset("wds", out, split)
    with pytest.raises(DataError, match="already holds"):  # and shard does not write into it
        write_shards(small_folder, out, name="k", shard_size="2")


def test_a_complete_folder_is_checked_against_its_manifest(small_folder, small_shards, tmp_path):
    manifest = json.loads((small_shards / MANIFEST_FILE).read_text())
    assert manifest["complete"] and manifest["classes"] == build_dataset("imagefolder", small_folder, "train").classes
    assert [s["samples"] for s in manifest["splits"]["val"]["shards"]] == [4, 2]
    out = _copy(small_shards, tmp_path / "s", "*")
    (out / "syn-train-0002.tar").unlink()  # a shard lost in a copy
    with pytest.raises(DataError, match=r"syn-train-0002\.tar.*missing"):
        WebDatasetShards(out, "train")
    assert len(WebDatasetShards(out, "val")) == 6


def test_shards_of_other_tools_still_read(small_folder, tmp_path):
    jpg = (small_folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "imagenet1k-train-0000.tar", [("a.jpg", jpg), ("a.cls", b"1"), ("b.jpg", jpg), ("b.cls", b"0")])
    _tar(tmp_path / "imagenet1k-validation-00.tar", [("c.jpg", jpg), ("c.cls", b"1")])
    assert build_dataset("wds", tmp_path, "train").targets == [1, 0]
    assert build_dataset("wds", tmp_path, "val").classes == ["0", "1"]


def test_shard_locks_its_output_folder(small_folder, tmp_path):
    out = tmp_path / "locked"
    with FolderLock(out), pytest.raises(FolderBusy, match="in use by"):
        write_shards(small_folder, out, name="a", shard_size="4")
    assert not list(out.glob("*.tar"))


@pytest.mark.parametrize("name", ["x-validation-y", "x-train-y", "x-train", "x-validation"])
def test_names_that_mix_the_splits_are_refused(small_folder, tmp_path, name):
    with pytest.raises(DataError, match=f"shard name '{name}'"):
        write_shards(small_folder, tmp_path / "o", name=name, shard_size="4")


def test_a_second_set_in_one_folder_is_refused(small_folder, small_shards, tmp_path):
    with pytest.raises(DataError, match="already holds shards"):
        write_shards(small_folder, small_shards, name="other", shard_size="4")
    jpg = (small_folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "setA-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0")])
    _tar(tmp_path / "setB-train-0.tar", [("b.jpg", jpg), ("b.cls", b"1")])
    with pytest.raises(DataError, match=r"2 shard sets \(setA, setB\)"):
        build_dataset("wds", tmp_path, "train")


def test_a_class_name_that_classes_txt_cannot_hold_is_refused(small_folder, tmp_path):
    root = tmp_path / "odd"
    for split in ("train", "val"):
        for name, src in (("a\nb", "00_disc"), ("c", "01_square")):
            (root / split / name).mkdir(parents=True)
            (root / split / name / "0.jpg").write_bytes((small_folder / split / src / "0000.jpg").read_bytes())
    with pytest.raises(DataError, match=r"class folder 'a\\nb'"):
        write_shards(root, tmp_path / "o", name="odd")


@pytest.mark.parametrize("label", [MAX_CLASSES, 99999999999])
def test_labels_beyond_the_bound_are_refused(small_folder, tmp_path, label):
    jpg = (small_folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "x-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("big.jpg", jpg), ("big.cls", b"%d" % label)])
    with pytest.raises(DataError, match=rf"x-train-0\.tar, key 'big': label {label} "):
        build_dataset("wds", tmp_path, "train")


def test_analyze_of_a_split_without_samples_is_one_line(small_folder, tmp_path, capsys):
    jpg = (small_folder / "train" / "00_disc" / "0000.jpg").read_bytes()
    _tar(tmp_path / "e-train-0.tar", [("a.jpg", jpg), ("a.cls", b"0")])
    _tar(tmp_path / "e-validation-0.tar", [])
    argv = ["analyze", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--dataset", "wds",
            "--out", str(tmp_path / "a"), "--device", "cpu", "--img-size", "32", "--num-workers", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "hold no samples" in err and "e-validation-0.tar" in err and len(err.splitlines()) == 1


def test_an_index_whose_lists_disagree_is_named(small_shards, tmp_path):
    out = _copy(small_shards, tmp_path / "s")
    WebDatasetShards(out, "train")
    index = out / "syn-train-0001.tar.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps({**data, "labels": data["labels"][:-1]}))
    with pytest.raises(DataError, match=rf"index file {index}"):
        WebDatasetShards(out, "train")
