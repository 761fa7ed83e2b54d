"""Ground-truth boxes from ImageNet's Pascal-VOC-style XML annotations, scaled to the evaluation frame."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from beyond_cls.data.folder import DataError


@dataclass(frozen=True)
class VocAnnotation:
    """One XML file: boxes ``[n, 4]`` int64 x0y0x1y1 as written, the image ``size = (width, height)``, and the
    objects' names (ImageNet: wnids)."""

    boxes: Tensor
    size: tuple[int, int]
    names: tuple[str, ...]


def _int(node: ET.Element, tag: str, path: Path, where: str) -> int:
    text = node.findtext(tag)
    if text is None:
        raise DataError(f"{path}: {where} has no <{tag}>")
    try:
        value = float(text.strip())
    except ValueError:
        raise DataError(f"{path}: {where}/<{tag}> is {text!r}, expected a number") from None
    if not value.is_integer():
        raise DataError(f"{path}: {where}/<{tag}> is {text!r}, expected whole pixels")
    return int(value)


def read_voc_annotation(xml_path: str | os.PathLike) -> VocAnnotation:
    """Parse an ImageNet / Pascal-VOC XML annotation; any problem becomes a DataError naming the file."""
    path = Path(xml_path)
    if not path.is_file():
        raise DataError(f"annotation {path} does not exist")
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{path}: cannot parse XML ({exc})") from exc
    size = root.find("size")
    if size is None:
        raise DataError(f"{path}: no <size> element (expected <size><width>..</width><height>..</height>)")
    width, height = _int(size, "width", path, "<size>"), _int(size, "height", path, "<size>")
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size {width}x{height} is not positive")
    boxes, names = [], []
    for i, obj in enumerate(root.findall("object")):
        where = f"<object> #{i}"
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{path}: {where} has no <bndbox>")
        box = [_int(bnd, tag, path, f"{where}/<bndbox>") for tag in ("xmin", "ymin", "xmax", "ymax")]
        if box[0] < 0 or box[1] < 0 or box[2] < box[0] or box[3] < box[1]:
            raise DataError(f"{path}: {where} box {box} is not non-negative xmin <= xmax, ymin <= ymax")
        boxes.append(box)
        names.append((obj.findtext("name") or "").strip())
    tensor = torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4)
    return VocAnnotation(tensor, (width, height), tuple(names))


def read_voc_boxes(xml_path: str | os.PathLike) -> Tensor:
    """``[n, 4]`` int64 x0y0x1y1 boxes of one XML annotation, in the original image's pixels."""
    return read_voc_annotation(xml_path).boxes


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int] = (224, 224)) -> Tensor:
    """Boxes of an image of ``from_size = (width, height)`` resized (no crop) to ``to_size = (width, height)``:
    ``int(x * new_w / w)`` per corner, as the official ``resize_bbox``; int64."""
    (w, h), (new_w, new_h) = from_size, to_size
    if min(w, h, new_w, new_h) <= 0:
        raise ValueError(f"sizes must be positive; got from_size={from_size}, to_size={to_size}")
    boxes = torch.as_tensor(boxes).to(torch.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must be [..., 4]; got shape {tuple(boxes.shape)}")
    factor = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float64, device=boxes.device)
    size = torch.tensor([w, h, w, h], dtype=torch.float64, device=boxes.device)
    return torch.trunc(boxes * factor / size).to(torch.int64)


def load_voc_boxes(
    xml_dir: str | os.PathLike,
    images: Iterable[str | os.PathLike],
    to_size: tuple[int, int] | None = (224, 224),
) -> list[Tensor]:
    """Ground truth for images matched by stem: ``<xml_dir>/<stem>.xml`` (ImageNet val:
    ``ILSVRC2012_val_00000001.JPEG`` -> ``ILSVRC2012_val_00000001.xml``), scaled to ``to_size = (width, height)``
    (None: original pixels). A missing or unreadable annotation is a DataError naming the file and the image."""
    root = Path(xml_dir)
    if not root.is_dir():
        raise DataError(f"annotation folder {root} does not exist")
    out = []
    for image in images:
        stem = Path(image).stem
        xml = root / f"{stem}.xml"
        if not xml.is_file():
            raise DataError(f"no annotation {xml} for image {image}")
        ann = read_voc_annotation(xml)
        if len(ann.boxes) == 0:
            raise DataError(f"{xml}: no <object> boxes for image {image}")
        out.append(ann.boxes if to_size is None else scale_boxes(ann.boxes, ann.size, to_size))
    return out
