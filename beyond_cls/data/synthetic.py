"""A small deterministic image-classification set: one shape per image on a cluttered background.

The class is decided only by the shape and fill of one object (a few 16-px patches at 224 px) placed
uniformly at random; background clutter uses the same colour palette as the objects, and the object
colour is chosen by contrast with its surroundings, never by class, so global colour statistics say
nothing about the label. Files form an ImageFolder (``root/{train,val}/<class>/<index>.jpg``) plus
``root/manifest.json`` holding the config and every object's box.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from beyond_cls.fileio import match_umask

__all__ = [
    "CLASS_DESIGNS",
    "GENERATOR_VERSION",
    "SyntheticConfig",
    "config_hash",
    "default_cache_dir",
    "load_manifest",
    "load_boxes",
    "make_synthetic_dataset",
    "render_image",
    "render_object",
    "synthetic_root",
]

# Bump whenever rendering changes, so cached sets made by older code are regenerated.
GENERATOR_VERSION = 1
MANIFEST_NAME = "manifest.json"
JPEG_QUALITY = 90
SPLITS = ("train", "val")

# (class folder name, shape, fill). Folder names carry their index so sorted order == label order.
CLASS_DESIGNS: tuple[tuple[str, str, str], ...] = (
    ("00_disc", "disc", "solid"),
    ("01_square", "square", "solid"),
    ("02_triangle", "triangle", "solid"),
    ("03_ring", "ring", "solid"),
    ("04_cross", "cross", "solid"),
    ("05_striped_square", "square", "stripes"),
    ("06_checker_disc", "disc", "checker"),
    ("07_diamond", "diamond", "solid"),
    ("08_frame", "frame", "solid"),
    ("09_striped_triangle", "triangle", "stripes"),
)

# Saturated colours plus a few neutrals, shared by objects and clutter.
_PALETTE = np.array(
    [
        [220, 40, 40], [40, 170, 60], [40, 80, 220], [240, 200, 30], [150, 50, 190], [30, 190, 200],
        [240, 130, 30], [230, 90, 170], [120, 80, 40], [20, 20, 20], [235, 235, 235], [128, 128, 128],
    ],
    dtype=np.float32,
)
_SUPERSAMPLE = 4  # sub-pixels per pixel side for anti-aliased object edges


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate; the same config always gives byte-identical files."""

    num_classes: int = 10  # every design: top-5 is far from certain (chance 50 %), top-1 chance 10 %
    train_per_class: int = 16
    val_per_class: int = 8
    image_size: int = 224
    object_size: tuple[int, int] = (32, 48)  # inclusive range of the object's side, in pixels
    seed: int = 0

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.object_size)
        object.__setattr__(self, "object_size", size)
        if not 1 <= self.num_classes <= len(CLASS_DESIGNS):
            raise ValueError(f"num_classes={self.num_classes}: expected 1..{len(CLASS_DESIGNS)}")
        if self.train_per_class < 0 or self.val_per_class < 0:
            raise ValueError(
                f"train_per_class={self.train_per_class}, val_per_class={self.val_per_class}: expected >= 0"
            )
        if len(size) != 2 or not 4 <= size[0] <= size[1] <= self.image_size:
            raise ValueError(
                f"object_size={self.object_size}: expected (lo, hi) with 4 <= lo <= hi <= "
                f"image_size={self.image_size}"
            )
        if self.seed < 0:
            raise ValueError(f"seed={self.seed}: expected a non-negative integer")

    @property
    def class_names(self) -> list[str]:
        return [name for name, _, _ in CLASS_DESIGNS[: self.num_classes]]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["object_size"] = list(self.object_size)
        return d


def config_hash(config: SyntheticConfig) -> str:
    """Short stable hash of a config and the generator version (names the cache folder)."""
    blob = json.dumps({"config": config.to_dict(), "version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def default_cache_dir() -> Path:
    """``$BEYOND_CLS_CACHE`` if set, else ``~/.cache/beyond_cls``."""
    env = os.environ.get("BEYOND_CLS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "beyond_cls"


def synthetic_root(config: SyntheticConfig | None = None) -> Path:
    """Default location of a synthetic set: ``<cache>/synthetic-<config hash>``."""
    return default_cache_dir() / f"synthetic-{config_hash(config or SyntheticConfig())}"


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of a shape on normalized coordinates u, v in [-1, 1] (v grows downwards)."""
    au, av = np.abs(u), np.abs(v)
    r2 = u * u + v * v
    if shape == "disc":
        return r2 <= 1.0
    if shape == "square":
        return np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if shape == "triangle":  # apex at the top, base along the bottom edge
        return au <= (v + 1.0) / 2.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "cross":
        return (au <= 0.3) | (av <= 0.3)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "frame":
        return (au >= 0.55) | (av >= 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def _fill_pattern(fill: str, u: np.ndarray, v: np.ndarray, vertical: bool) -> np.ndarray:
    """0/1 map choosing the primary or secondary colour: four bands per side for stripes/checker."""
    bu = np.floor((u + 1.0) * 2.0).astype(np.int64)
    bv = np.floor((v + 1.0) * 2.0).astype(np.int64)
    if fill == "solid":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    if fill == "stripes":
        bands = bu if vertical else bv
        return np.broadcast_to(bands % 2, np.broadcast_shapes(u.shape, v.shape)).astype(np.float32)
    if fill == "checker":
        return ((bu + bv) % 2).astype(np.float32)
    raise ValueError(f"unknown fill {fill!r}")


def _object_layers(class_index: int, size: int, vertical: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage alpha [size, size] and secondary-colour weight [size, size] of a design."""
    _, shape, fill = CLASS_DESIGNS[class_index]
    n = size * _SUPERSAMPLE
    t = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    u, v = t[None, :], t[:, None]
    inside = _shape_mask(shape, u, v).astype(np.float32)
    second = _fill_pattern(fill, u, v, vertical) * inside

    def pool(a: np.ndarray) -> np.ndarray:
        return a.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))

    return pool(inside), pool(second)


def render_object(class_index: int, size: int) -> np.ndarray:
    """Grey-level picture of a class design in [0, 1]: 0 outside, 1 primary fill, 0.5 secondary fill."""
    alpha, second = _object_layers(class_index, size)
    return alpha - 0.5 * second


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-frequency colour field: a coarse grid of muted palette colours, bicubically upsampled."""
    g = int(rng.integers(3, 6))
    coarse = _PALETTE[rng.integers(0, len(_PALETTE), size=(g, g))]
    coarse = 0.55 * coarse + 0.45 * 128.0 + rng.normal(0.0, 12.0, size=coarse.shape)
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _draw_clutter(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """Many small strokes, blobs and boxes in palette colours: too small to be mistaken for objects."""
    size = field.shape[0]
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    scale = size / 224.0
    count = max(8, int(size * size / 600))
    kinds = rng.integers(0, 3, size=count)
    centers = rng.uniform(0, size, size=(count, 2))
    colors = rng.integers(0, len(_PALETTE), size=count)
    extents = rng.uniform(2.0, 6.0, size=(count, 2)) * scale
    angles = rng.uniform(0, 2 * np.pi, size=count)
    lengths = rng.uniform(6.0, 22.0, size=count) * scale
    widths = rng.integers(1, 4, size=count)
    for kind, (cx, cy), ci, (ex, ey), ang, length, width in zip(
        kinds, centers, colors, extents, angles, lengths, widths, strict=True
    ):
        color = tuple(int(c) for c in _PALETTE[ci])
        if kind == 0:  # stroke
            dx, dy = 0.5 * length * np.cos(ang), 0.5 * length * np.sin(ang)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=color, width=int(width))
        elif kind == 1:  # blob
            draw.ellipse([cx - ex, cy - ey, cx + ex, cy + ey], fill=color)
        else:  # small box
            draw.rectangle([cx - ex, cy - ey, cx + ex, cy + ey], fill=color)
    return np.asarray(img, dtype=np.float32)


def _contrasting(rng: np.random.Generator, *references: np.ndarray) -> int:
    """Index of a palette colour far from all ``references``: random among the three most distant."""
    dist = np.min([np.linalg.norm(_PALETTE - ref, axis=1) for ref in references], axis=0)
    return int(np.argsort(-dist, kind="stable")[rng.integers(0, 3)])


def _image_rngs(config: SyntheticConfig, split: str, class_index: int, index: int):
    ss = np.random.SeedSequence([config.seed, SPLITS.index(split), class_index, index])
    bg_seq, obj_seq = ss.spawn(2)
    return np.random.default_rng(bg_seq), np.random.default_rng(obj_seq)


def render_image(
    config: SyntheticConfig, split: str, class_index: int, index: int, draw_object: bool = True
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One image as uint8 [H, W, 3] and its object box (x0, y0, x1, y1), x1/y1 exclusive.

    Seeded from (seed, split, class, index) only. With ``draw_object=False`` the same image is
    rendered without its object (the background is identical pixel for pixel).
    """
    bg_rng, obj_rng = _image_rngs(config, split, class_index, index)
    size = config.image_size
    base = _draw_clutter(bg_rng, _smooth_field(bg_rng, size))
    noise = bg_rng.normal(0.0, 6.0, size=base.shape).astype(np.float32)

    lo, hi = config.object_size
    side = int(obj_rng.integers(lo, hi + 1))
    x0 = int(obj_rng.integers(0, size - side + 1))
    y0 = int(obj_rng.integers(0, size - side + 1))
    vertical = bool(obj_rng.integers(0, 2))
    box = (x0, y0, x0 + side, y0 + side)
    if draw_object:
        patch = base[y0 : y0 + side, x0 : x0 + side]
        local = patch.reshape(-1, 3).mean(axis=0)
        first = _contrasting(obj_rng, local)
        second = _contrasting(obj_rng, local, _PALETTE[first])
        alpha, weight = _object_layers(class_index, side, vertical)
        color = (alpha - weight)[..., None] * _PALETTE[first] + weight[..., None] * _PALETTE[second]
        base[y0 : y0 + side, x0 : x0 + side] = patch * (1.0 - alpha[..., None]) + color
    return np.clip(np.rint(base + noise), 0, 255).astype(np.uint8), box


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


# ----------------------------------------------------------------------------- dataset on disk


def _records(config: SyntheticConfig) -> Iterator[tuple[str, int, int]]:
    for split, per_class in zip(SPLITS, (config.train_per_class, config.val_per_class), strict=True):
        for class_index in range(config.num_classes):
            for index in range(per_class):
                yield split, class_index, index


def _relpath(config: SyntheticConfig, split: str, class_index: int, index: int) -> str:
    per_class = max(config.train_per_class, config.val_per_class)
    width = max(4, len(str(per_class - 1)))
    return f"{split}/{CLASS_DESIGNS[class_index][0]}/{index:0{width}d}.jpg"


def load_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a synthetic set (config, classes, and one record per image with its box)."""
    path = Path(root) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no synthetic-set manifest (run make_synthetic_dataset)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: manifest is not valid JSON ({exc})") from None


def load_boxes(root: str | os.PathLike, split: str | None = None) -> dict[str, tuple[int, int, int, int]]:
    """Object boxes (x0, y0, x1, y1; x1/y1 exclusive) keyed by path relative to ``root``."""
    return {
        r["path"]: tuple(r["box"])
        for r in load_manifest(root)["images"]
        if split is None or r["split"] == split
    }


def _is_complete(root: Path, config: SyntheticConfig) -> bool:
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != GENERATOR_VERSION or manifest.get("config") != config.to_dict():
        return False
    return all((root / r["path"]).is_file() for r in manifest.get("images", []))


def _owned_or_empty(root: Path) -> bool:
    """True if ``root`` may be replaced: empty, or holding a synthetic set (a manifest of ours)."""
    if not any(root.iterdir()):
        return True
    try:
        return json.loads((root / MANIFEST_NAME).read_text()).get("generator") == __name__
    except (OSError, ValueError, AttributeError):
        return False


def make_synthetic_dataset(
    root: str | os.PathLike | None = None, config: SyntheticConfig | None = None
) -> Path:
    """Write the synthetic set to ``root`` (default: :func:`synthetic_root`) and return its path.

    A complete set with the same config is reused as is. Otherwise the set is built in a temporary
    sibling folder and renamed into place, so an interrupted run never leaves a complete-looking set.
    """
    config = config or SyntheticConfig()
    root = Path(root).expanduser().absolute() if root is not None else synthetic_root(config)
    if _is_complete(root, config):
        return root
    if root.exists() and (not root.is_dir() or not _owned_or_empty(root)):
        raise FileExistsError(
            f"{root} exists and is not a synthetic set (no {MANIFEST_NAME}); refusing to overwrite it"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    match_umask(tmp, directory=True)  # mkdtemp's 0700 -> what mkdir() gives
    try:
        images = []
        for split, class_index, index in _records(config):
            rel = _relpath(config, split, class_index, index)
            pixels, box = render_image(config, split, class_index, index)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            _write_file(tmp / rel, _encode_jpeg(pixels))
            name = CLASS_DESIGNS[class_index][0]
            images.append(
                {"path": rel, "split": split, "class": name, "label": class_index, "box": list(box)}
            )
        manifest = {
            "generator": __name__,
            "version": GENERATOR_VERSION,
            "config": config.to_dict(),
            "classes": config.class_names,
            "box_format": "x0 y0 x1 y1, pixels, x1/y1 exclusive",
            "images": sorted(images, key=lambda r: r["path"]),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _install(tmp, root, config)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _install(tmp: Path, root: Path, config: SyntheticConfig) -> None:
    """Move the finished set ``tmp`` to ``root``, replacing an outdated set if one is there."""
    old = None
    if root.exists():
        if _is_complete(root, config):  # another process finished the same set meanwhile
            return
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / "set")
    try:
        os.replace(tmp, root)
    except OSError:
        if not _is_complete(root, config):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
