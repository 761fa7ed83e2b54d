"""beyond_cls.data.augment / views / gpu_decode / pixels: reproducible views, CPU (PIL) vs device (tensor)
decoding, high-bit-depth images, one-line worker errors."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from beyond_cls.data import augment
from beyond_cls.data.augment import (
    apply_train_params,
    crop_params,
    eval_params,
    sample_generator,
    train_params,
)
from beyond_cls.data.folder import DataError, load_rgb
from beyond_cls.data.gpu_decode import decode_batch, pil_rgb_tensor, transform_batch
from beyond_cls.data.pixels import to_rgb
from beyond_cls.data.transforms import eval_transform, train_transform
from beyond_cls.data.views import ViewBatch, ViewDataset, collate_views
from beyond_cls.probe.sampler import EvalBatchSampler
from beyond_cls.probe.streams import make_loader

# CPU path (PIL decode + PIL bicubic) vs device path run on the CPU (libjpeg-turbo + tensor bicubic), in
# normalized units (one uint8 level ≈ 0.0175). Measured on these images: mean ≤ 4e-4, max ≤ 0.12 (a few pixels
# at sharp edges where PIL's fixed-point coefficients round differently).
MEAN_TOL, MAX_TOL = 0.005, 0.2


def _natural(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour field, hard-edged discs and mild noise: JPEG-realistic content with sharp edges."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, height // 16), max(2, width // 16), 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    a = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(5):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(3, max(4, min(width, height) // 3))
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
    a += rng.normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


class FileSet:
    """The base-dataset interface ViewDataset consumes."""

    def __init__(self, paths: list[str], multilabel: bool = False):
        self.paths = paths
        self.multilabel = multilabel

    def __len__(self) -> int:
        return len(self.paths)

    def target(self, i: int):
        return torch.tensor([i % 2, 1.0, 0.0]) if self.multilabel else i % 3

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])


SIZES = [(320, 240), (240, 320), (97, 131), (40, 300), (300, 30), (64, 64)]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("views")
    jpegs = []
    for k, (w, h) in enumerate(SIZES):
        path = root / f"img{k}.jpg"
        _natural(w, h, k).save(path, quality=90)
        jpegs.append(str(path))
    odd = {"png": root / "png.jpg", "gray": root / "gray.jpg", "cmyk": root / "cmyk.jpg"}
    _natural(150, 110, 10).save(odd["png"], format="PNG")
    _natural(120, 90, 11).convert("L").save(odd["gray"], quality=90)
    _natural(100, 140, 12).convert("CMYK").save(odd["cmyk"], quality=90)
    corrupt = root / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not an image" * 10)
    truncated = root / "truncated.jpg"
    full = root / "full.jpg"
    _natural(160, 120, 13).save(full, quality=90)
    truncated.write_bytes(full.read_bytes()[:1500])  # a valid header: only a full decode notices
    return {"jpegs": jpegs, **{k: str(v) for k, v in odd.items()}, "corrupt": str(corrupt), "truncated": str(truncated)}


def _loader(ds: ViewDataset, keys, batch_size: int = 4, workers: int = 0) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, sampler=keys, collate_fn=collate_views, num_workers=workers)


# "gpu" alone as a test id would be read as the gpu mark by the root conftest (skipped without CUDA)
DECODES = pytest.mark.parametrize("decode", ["cpu", "gpu"], ids=["decode_cpu", "decode_gpu"])


# --- parameters ------------------------------------------------------------------------------------------

CROP_SIZES = [(224, 224), (500, 375), (375, 500), (31, 17), (1, 1), (2, 300), (1000, 10), (10, 1000), (3, 2)]


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.2, 5.0))])
def test_crop_params_match_torchvision(scale, ratio):
    fallbacks = 0
    for width, height in CROP_SIZES:
        img = torch.empty(1, height, width)
        for seed in range(40):
            torch.manual_seed(seed)
            want = RandomResizedCrop.get_params(img, list(scale), list(ratio))
            generator = torch.Generator().manual_seed(seed)
            got = crop_params(generator, width, height, scale, ratio)
            assert got == want, (width, height, seed)
            assert torch.rand(1).item() == torch.rand(1, generator=generator).item()  # same number of draws
            top, left, h, w = got
            assert top >= 0 and left >= 0 and top + h <= height and left + w <= width
            central = {(height, width), (height, round(height * max(ratio))), (round(width / min(ratio)), width)}
            fallbacks += (h, w) in central
    assert fallbacks > 50  # the extreme aspect ratios do reach the central-crop fallback


@pytest.mark.parametrize("crop", ["mae", "torchvision"])
def test_train_view_is_torchvision_transform(monkeypatch, files, crop):
    """Given the same RNG stream, the CPU train view equals the random resized crop (MAE's sampling or
    torchvision's) + flip transform bit for bit."""
    image = load_rgb(files["jpegs"][0])
    transform = train_transform(64, crop=crop)
    flips = set()
    for seed in range(12):
        monkeypatch.setattr(augment, "sample_generator", lambda *_, s=seed: torch.Generator().manual_seed(s))
        params = augment.train_params(0, 0, 0, image.width, image.height, crop)
        flips.add(params[-1])
        torch.manual_seed(seed)
        assert torch.equal(apply_train_params(image, params, 64), transform(image))
    assert flips == {True, False}


def test_params_are_stable_and_keyed():
    # a regression constant: the hash and the generator stream must not change between runs or machines
    assert train_params(0, 0, 0, 500, 375) == (32, 68, 335, 417, False)  # the first draw fits: both samplers agree
    assert train_params(0, 0, 2, 500, 375) == (0, 6, 375, 428, False)  # MAE's: clamped to full height
    assert train_params(0, 0, 2, 500, 375, "torchvision") == (4, 12, 371, 418, True)  # torchvision's: a retry
    with pytest.raises(ValueError, match="crop"):
        train_params(0, 0, 0, 500, 375, "tf")
    assert sample_generator(3, 1, 7).initial_seed() == sample_generator(3, 1, 7).initial_seed()
    keys = {(s, v, i) for s in range(3) for v in range(3) for i in range(30)}
    assert len({train_params(*k, 500, 375) for k in keys}) == len(keys)
    assert len({sample_generator(*k).initial_seed() for k in keys}) == len(keys)


def test_eval_params_match_eval_transform(files):
    for w, h in SIZES + [(256, 100), (100, 256)]:
        rh, rw, top, left = eval_params(w, h, 64, 73)
        img = Image.new("RGB", (w, h))
        resized = eval_transform(64, 64 / 73).transforms[0](img)
        assert (rh, rw) == (resized.height, resized.width)
        assert top == int(round((rh - 64) / 2)) and left == int(round((rw - 64) / 2))
    with pytest.raises(ValueError, match="resize_size"):
        eval_params(100, 100, 224, 200)


# --- datasets and loaders ----------------------------------------------------------------------------------


@DECODES
def test_views_pure_function_of_key(files, decode):
    base = FileSet(files["jpegs"])
    ds = ViewDataset(base, train=True, img_size=48, seed=5, decode=decode)

    def image(d, key):
        return collate_views([d[key]]).images_on("cpu")[0]

    again = ViewDataset(base, train=True, img_size=48, seed=5, decode=decode)
    assert torch.equal(image(ds, (1, 2)), image(again, (1, 2)))
    assert ds[(1, 2)].params != ds[(1, 3)].params
    assert ds[(1, 2)].params != ViewDataset(base, train=True, img_size=48, seed=6, decode=decode)[(1, 2)].params
    assert not torch.equal(image(ds, (1, 2)), image(ds, (1, 3)))
    ev = ViewDataset(base, train=False, img_size=48, decode=decode)
    assert torch.equal(image(ev, (2, 0)), image(ev, (2, 7)))


def test_crop_setting_and_cache_key(files):
    """``crop`` picks the train sampler; a feature cache's key tells MAE-crop views from torchvision-crop views, and
    torchvision's and eval views keep the key of caches written before ``crop`` existed."""
    base = FileSet(files["jpegs"])
    mae, tv = (ViewDataset(base, train=True, img_size=48, seed=5, crop=c) for c in ("mae", "torchvision"))
    assert ViewDataset(base, train=True, img_size=48, seed=5).spec == mae.spec  # MAE's is the default
    w, h = 500, 375
    assert [mae.params(i, 0, w, h) for i in range(30)] != [tv.params(i, 0, w, h) for i in range(30)]
    old_fields = {"train", "img_size", "resize_size", "mean", "std", "seed", "decode", "skip_bad_images"}
    assert set(tv.spec.key()) == old_fields and mae.spec.key() == {**tv.spec.key(), "crop": "mae"}
    for crop in ("mae", "torchvision"):  # eval views do not crop at random: one key
        ev = ViewDataset(base, train=False, img_size=48, crop=crop)
        assert ev.spec.crop is None and set(ev.spec.key()) == old_fields
    with pytest.raises(ValueError, match="crop"):
        ViewDataset(base, train=True, crop="tf")


@DECODES
def test_worker_count_does_not_change_batches(files, decode):
    ds = ViewDataset(FileSet(files["jpegs"], multilabel=True), train=True, img_size=32, seed=1, decode=decode)
    keys = [(i, v) for v in range(2) for i in reversed(range(len(ds)))]
    runs = [list(_loader(ds, keys, batch_size=5, workers=w)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert torch.equal(a.images_on("cpu"), b.images_on("cpu"))
        assert torch.equal(a.targets, b.targets) and torch.equal(a.indices, b.indices)
    assert runs[0][0].targets.shape == (5, 3)
    assert [i for batch in runs[1] for i in batch.indices.tolist()] == [i for i, _ in keys]


def test_cpu_eval_view_is_eval_transform(files):
    ds = ViewDataset(FileSet(files["jpegs"]), train=False, img_size=64, decode="cpu")
    transform = eval_transform(64, 64 / int(64 / 0.875))
    for i, path in enumerate(files["jpegs"]):
        assert torch.equal(ds[i].image, transform(load_rgb(path)))


def _max_mean(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a - b).abs()
    return d.max().item(), d.mean().item()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("img_size", [224, 40])
def test_cpu_and_device_paths_agree(files, train, img_size):
    paths = files["jpegs"] + [files["png"], files["gray"], files["cmyk"]]
    base = FileSet(paths)
    cpu = ViewDataset(base, train=train, img_size=img_size, seed=3, decode="cpu")
    dev = ViewDataset(base, train=train, img_size=img_size, seed=3, decode="gpu")
    keys = [(i, v) for i in range(len(base)) for v in range(3 if train else 1)]
    a = collate_views([cpu[k] for k in keys])
    b = collate_views([dev[k] for k in keys])
    assert b.pixels.tolist() == [p in paths[-3:] for p in b.paths]  # odd files decoded by the worker, with PIL
    assert torch.equal(b.params, torch.tensor([cpu[k].params for k in keys]))
    assert torch.equal(a.targets, b.targets) and torch.equal(a.indices, b.indices)
    x, y = a.images_on("cpu"), b.images_on("cpu")
    assert x.shape == y.shape == (len(keys), 3, img_size, img_size)
    worst, mean = _max_mean(x, y)
    print(f"train={train} img_size={img_size}: max abs diff {worst:.4f}, mean {mean:.5f}")
    assert mean < MEAN_TOL and worst < MAX_TOL


def test_decode_batch_fallbacks(files):
    """Raw PNG / grayscale / CMYK bytes given straight to decode_batch go through the per-image fallbacks."""
    paths = [files["jpegs"][0], files["png"], files["gray"], files["cmyk"], files["corrupt"]]
    encoded = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    images, errors = decode_batch(encoded, paths, "cpu")
    for path, image in zip(paths[:-1], images[:-1]):
        want = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert torch.equal(image, want), path
    assert images[-1] is None and errors[:-1] == [None] * 4 and files["corrupt"] in errors[-1]


def test_cuda_decode_allocates_on_a_side_stream_and_orders_the_callers_stream(files, monkeypatch):
    """pytorch/vision#9606: nvJPEG's outputs, allocated on the current stream, may be blocks whose readers are
    still queued there. The decode runs with a side stream current, the outputs are marked as used by the
    caller's stream and the caller's stream waits for the side stream. Stand-ins for the CUDA stream API and
    the decoder check that order on the CPU."""
    from contextlib import contextmanager

    from beyond_cls.data import gpu_decode

    class Stream:
        def __init__(self, name):
            self.name, self.waited_for = name, []

        def wait_stream(self, other):
            self.waited_for.append(other)

    class Output:
        def __init__(self):
            self.used_by = []

        def record_stream(self, stream):
            self.used_by.append(stream)

    caller = Stream("caller")
    state = {"current": caller}

    @contextmanager
    def use(stream):
        previous, state["current"] = state["current"], stream
        try:
            yield
        finally:
            state["current"] = previous

    calls = []

    def fake_decode(data, mode, device):
        calls.append((state["current"].name, str(device)))
        return [Output() for _ in data] if isinstance(data, list) else Output()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream(f"side {device}"))
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(gpu_decode, "decode_jpeg", fake_decode)
    monkeypatch.setattr(gpu_decode, "_DECODE_STREAMS", {}, raising=False)
    paths = files["jpegs"][:3]
    encoded = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    for _ in range(2):
        images, errors = decode_batch(encoded, paths, "cuda")
        assert errors == [None] * 3 and all(image.used_by == [caller] for image in images)
    assert calls == [("side cuda:0", "cuda:0")] * 2  # one batched call each time, on the device's one side stream
    assert [s.name for s in caller.waited_for] == ["side cuda:0"] * 2 and state["current"] is caller


def _rgb_images(files, count: int = 3) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(load_rgb(p))).permute(2, 0, 1).contiguous() for p in files["jpegs"][:count]]


def test_transform_batch_sends_its_constants_once(files, monkeypatch):
    images = _rgb_images(files)
    params = torch.tensor([[0, 0, 40, 30, 1], [5, 5, 30, 20, 0], [1, 2, 10, 10, 1]])
    first = transform_batch(images, params, train=True, img_size=16)
    made = []
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    again = transform_batch(images, params, train=True, img_size=16)
    assert made == [] and torch.equal(again, first)  # mean/std stay on the device; the flips need no mask there
    unflipped = transform_batch(images, params * torch.tensor([1, 1, 1, 1, 0]), train=True, img_size=16)
    assert torch.equal(first[[0, 2]], unflipped[[0, 2]].flip(-1)) and torch.equal(first[1], unflipped[1])


@pytest.mark.gpu
def test_transform_batch_on_cuda_makes_no_host_sync(files):
    device = torch.device("cuda", torch.cuda.current_device())
    images = [image.to(device) for image in _rgb_images(files)]
    params = torch.tensor([[0, 0, 40, 30, 1], [5, 5, 30, 20, 0], [1, 2, 10, 10, 1]])
    want = transform_batch(images, params, train=True, img_size=16)  # first call: the constants go there once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = transform_batch(images, params, train=True, img_size=16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_cuda_decode_never_overwrites_memory_queued_kernels_still_read(files):
    """pytorch/vision#9606's reproducer: tensors freed while reductions of them are queued behind a long kernel,
    then a decode; without the side stream nvJPEG is handed their blocks and the sums come out wrong."""
    device = torch.device("cuda", torch.cuda.current_device())
    paths = files["jpegs"]
    encoded = [torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths]
    shapes = [image.shape for image in decode_batch(encoded, paths, device)[0]]
    torch.cuda.synchronize()
    wrong = 0
    for _ in range(20):
        victims = [torch.ones(shape, dtype=torch.uint8, device=device) for shape in shapes for _ in range(2)]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of queued work ahead of the reads
        sums = [v.sum(dtype=torch.int64) for v in victims]
        expected = [v.numel() for v in victims]
        del victims  # freed on the caller's stream while their reads are still queued
        decode_batch(encoded, paths, device)
        torch.cuda.synchronize()
        wrong += sum(int(s) != e for s, e in zip(sums, expected))
    assert wrong == 0


@DECODES
@pytest.mark.parametrize("bad", ["corrupt", "truncated"])
def test_bad_image_raises_naming_file(files, decode, bad):
    base = FileSet(files["jpegs"][:2] + [files[bad]])
    ds = ViewDataset(base, train=True, img_size=32, decode=decode)
    # one case through a worker process (its header check raises there); each costs ~5 s of worker shutdown
    workers = 1 if (bad, decode) == ("corrupt", "gpu") else 0
    with pytest.raises(DataError, match=files[bad]):
        for batch in _loader(ds, [(i, 0) for i in range(3)], workers=workers):
            batch.images_on("cpu")


@DECODES
@pytest.mark.parametrize("bad", ["corrupt", "truncated"])
def test_bad_image_skipped_and_counted(files, decode, bad):
    base = FileSet([files["jpegs"][0], files[bad], files["jpegs"][1]], multilabel=True)
    ds = ViewDataset(base, train=False, img_size=32, decode=decode, skip_bad_images=True)
    (batch,) = list(_loader(ds, [(i, 0) for i in range(3)]))
    images = batch.images_on("cpu")
    assert images.shape == (2, 3, 32, 32)
    assert batch.skipped == 1 and batch.skipped_paths == [files[bad]]
    assert batch.indices.tolist() == [0, 2]
    assert torch.equal(batch.targets, torch.stack([base.target(0), base.target(2)]))
    assert torch.equal(batch.images_on("cpu"), images)  # idempotent once dropped
    ok = collate_views([ds[0], ds[2]]).images_on("cpu")
    assert torch.equal(images, ok)
    all_bad = collate_views([ds[1]])
    assert all_bad.images_on("cpu").shape == (0, 3, 32, 32) and all_bad.skipped == 1 and len(all_bad.targets) == 0


@DECODES
def test_batch_pin_memory_and_device_options(files, decode):
    ds = ViewDataset(FileSet(files["jpegs"]), train=True, img_size=32, decode=decode)
    batch = collate_views([ds[(i, 0)] for i in range(3)])
    pinned = batch.pin_memory()
    assert isinstance(pinned, ViewBatch)
    if torch.cuda.is_available():
        assert pinned.targets.is_pinned() and (pinned.images if decode == "cpu" else pinned.data).is_pinned()
        out = pinned.images_on("cuda", torch.bfloat16, channels_last=True)
        assert out.device.type == "cuda"
        assert (out.float().cpu() - batch.images_on("cpu")).abs().max() < (MAX_TOL if decode == "gpu" else 0.05)
    out = batch.images_on("cpu", torch.bfloat16, channels_last=True)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 3, 32, 32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert len(batch.encoded) == (3 if decode == "gpu" else 0)


@pytest.mark.parametrize("crop_pct, interpolation", [(0.875, "bicubic"), (0.95, "bilinear"), (1.0, "nearest"),
                                                     (0.8, "lanczos")])
def test_eval_view_crop_pct_and_interpolation_are_timms(files, crop_pct, interpolation):
    """The eval view (``--crop-pct``, ``--interpolation``) is torchvision's Resize(floor(img_size / crop_pct)) with that
    interpolation, then CenterCrop(img_size), as timm's eval transform; ``eval_transform`` is the same."""
    from torchvision import transforms as T

    size, mean, std = 48, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    resize = int(np.floor(size / crop_pct))
    expected = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode(interpolation)), T.CenterCrop(size),
                          T.ToTensor(), T.Normalize(mean, std)])
    ds = ViewDataset(FileSet(files["jpegs"]), train=False, img_size=size, mean=mean, std=std, crop_pct=crop_pct,
                     interpolation=interpolation)
    assert ds.spec.resize_size == resize and ds.spec.interpolation == interpolation
    ours = eval_transform(size, crop_pct, mean, std, interpolation)
    for i, path in enumerate(files["jpegs"]):
        want = expected(load_rgb(path))
        assert torch.equal(ds[i].image, want) and torch.equal(ours(load_rgb(path)), want)


def test_eval_view_settings_enter_the_cache_key(files):
    """crop_pct (through resize_size) and a non-bicubic interpolation change an eval view's cache key; the bicubic
    default keeps the key of caches written before the setting existed; train views ignore both."""
    base = FileSet(files["jpegs"])
    old_fields = {"train", "img_size", "resize_size", "mean", "std", "seed", "decode", "skip_bad_images"}
    default = ViewDataset(base, train=False, img_size=224).spec.key()
    assert set(default) == old_fields and default["resize_size"] == 256
    assert ViewDataset(base, train=False, img_size=224, crop_pct=1.0).spec.key() == {**default, "resize_size": 224}
    bilinear = ViewDataset(base, train=False, img_size=224, interpolation="bilinear").spec.key()
    assert bilinear == {**default, "interpolation": "bilinear"}
    train = ViewDataset(base, train=True, img_size=224, interpolation="bilinear", crop_pct=0.5).spec
    assert train.interpolation is None and train == ViewDataset(base, train=True, img_size=224).spec
    with pytest.raises(ValueError, match="interpolation"):
        ViewDataset(base, train=False, interpolation="cubic")
    with pytest.raises(ValueError, match="bicubic only"):
        ViewDataset(base, train=False, decode="gpu", interpolation="bilinear")
    with pytest.raises(ValueError, match="crop_pct"):
        ViewDataset(base, train=False, crop_pct=1.5)


# --- high-bit-depth images ------------------------------------------------------------------------------
def _ramp16(h: int = 24, w: int = 40) -> np.ndarray:
    """uint16 levels spanning 0..65535 (a PIL convert("RGB") clips all but the darkest to white)."""
    return (np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB / RGBA PNG written from numpy (PIL cannot write one)."""
    h, w, c = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def grey16(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("png16")
    levels = _ramp16()
    little, big = root / "little.png", root / "big.png"
    Image.fromarray(levels).save(little)  # mode I;16
    Image.frombytes("I;16B", levels.shape[::-1], levels.astype(">u2").tobytes()).save(big)
    expected = np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, -1)
    eight = root / "eight.png"
    Image.fromarray(expected[..., 0]).save(eight)
    return {"paths": [str(little), str(big)], "expected": expected, "eight": str(eight)}


def test_16bit_grey_png_decodes_to_its_levels_on_every_path(grey16):
    expected = grey16["expected"]
    for path in grey16["paths"]:
        with Image.open(path) as image:
            assert image.mode.startswith("I;16")
            np.testing.assert_array_equal(pil_rgb_tensor(image).permute(1, 2, 0).numpy(), expected)
        np.testing.assert_array_equal(np.asarray(load_rgb(path)), expected)  # CPU decode
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        (image,), (error,) = decode_batch([data], [path], "cpu")  # decode_jpeg fails, then the PIL fallback
        assert error is None
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


@DECODES
def test_16bit_png_views_equal_the_8bit_image(grey16, decode):
    paths = grey16["paths"] + [grey16["eight"]]
    views = ViewDataset(FileSet(paths), train=False, img_size=16, decode=decode)
    batch = make_loader(views, EvalBatchSampler(len(paths), 4), 0, torch.device("cpu")).__iter__().__next__()
    images = batch.images_on("cpu")
    assert torch.equal(images[0], images[2]) and torch.equal(images[1], images[2])


def test_other_high_depth_modes():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(ramp)))[..., 1], np.rint(ramp * 255))  # F 0..1
    wide = Image.fromarray((ramp * 255).astype(np.float32))  # F 0..255
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], np.rint(ramp * 255))
    as_int = Image.fromarray((ramp * 65535).astype(np.int32))  # I holding 16-bit levels (older Pillow's PNG mode)
    assert as_int.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(as_int))[..., 2], (ramp * 65535).astype(np.int32) >> 8)
    signed = Image.fromarray(((ramp - 0.5) * 2e6).astype(np.int32))  # out of 16-bit range: stretched min..max
    grey = np.asarray(to_rgb(signed))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and np.all(np.diff(grey.ravel().astype(int)) >= 0)
    nan = np.full((4, 4), np.nan, dtype=np.float32)
    assert np.asarray(to_rgb(Image.fromarray(nan))).max() == 0


def test_16bit_rgba_png_keeps_the_top_byte(tmp_path):
    levels = _ramp16(8, 8)
    pixels = np.stack([levels, 65535 - levels, levels // 3, np.full_like(levels, 65535)], -1)
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png16_rgb(pixels))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), (pixels[..., :3] >> 8).astype(np.uint8))
    path.write_bytes(_png16_rgb(pixels[..., :3]))
    np.testing.assert_array_equal(np.asarray(load_rgb(path)), (pixels[..., :3] >> 8).astype(np.uint8))


# --- worker errors ---------------------------------------------------------------------------------------
def test_worker_error_is_one_line_naming_the_file(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    _natural(24, 24, 0).save(good, quality=90)
    bad.write_bytes(b"not an image at all" * 8)
    views = ViewDataset(FileSet([str(good), str(bad)]), train=False, img_size=16)
    loader = make_loader(views, EvalBatchSampler(2, 2), 1, torch.device("cpu"))
    with pytest.raises(DataError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert message.startswith(f"cannot read image {bad}: ") and "\n" not in message, message
