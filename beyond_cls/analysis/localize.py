"""The ``localize`` job: MaxBoxAccV2 of [cls] attention and Selective Aggregation maps (paper App. C.3, Tab. 7/8,
Fig. 8).

Images are resized to ``img_size x img_size`` without cropping (the WSOL protocol), ground-truth boxes read from
Pascal-VOC XML files (``<boxes>/<image stem>.xml``) and scaled the same way. A map is a selection vector
(:mod:`beyond_cls.selection`) reshaped to the patch grid: ``cls-attn`` is ``attn-mean``, ``abmilp:RUN[#KEY]``
a trained head's scores (the head used is printed and recorded under ``heads``); any other selection method is
accepted too. Overlays are titled figures with a legend naming each box.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from beyond_cls.analysis.aggregations import normalization_used, selection_method
from beyond_cls.analysis.selection_runner import SelectionRunner
from beyond_cls.analysis.style import short_name
from beyond_cls.config import EXAMPLES, ConfigError, StreamSettings, setting, spec_list
from beyond_cls.data import DataError, build_dataset, make_loader
from beyond_cls.data.sample import sample_images
from beyond_cls.data.transforms import unnormalized_eval_transform
from beyond_cls.localization import MaxBoxAccV2Accumulator, best_boxes, box_iou, load_voc_boxes, overlay_figure
from beyond_cls.runlock import writes_out
from beyond_cls.runtime import resolve_device
from beyond_cls.selection import parse_method
from beyond_cls.units import as_percent, units_of

__all__ = ["LocalizeConfig", "localize", "map_method", "read_localization"]

RESULTS_FILE = "localization.json"
# Fig. 8: [cls] red, Selective Aggregation green; further maps in other colours
COLORS = {"cls-attn": (255, 0, 0), "attn-mean": (255, 0, 0)}
OTHER_COLORS = [(255, 255, 0), (255, 0, 255), (0, 255, 255), (255, 128, 0)]
SCORE_KEYS = ("maxboxacc_v2", "maxboxacc")  # in % since units were recorded; fractions of 1 before


def map_method(name: str) -> str:
    """The selection method behind a ``--heads`` entry (``cls-attn`` -> ``attn-mean``)."""
    return selection_method(name)


@dataclass(kw_only=True)
class LocalizeConfig(StreamSettings):
    """What ``beyond-cls localize`` runs; every field is also a CLI flag and a YAML key."""

    boxes: str = setting(help="folder of Pascal-VOC XML annotations named like the images", group="data")
    heads: list[str] = setting(help="comma-separated head specs whose maps are scored (the flag may repeat): cls-attn "
                               "(= attn-mean), abmilp:RUN[#KEY], or any other aggregations head", group="heads",
                               items=str, repeat=True, metavar="HEADS", aliases=("map", "maps"))
    examples: int = EXAMPLES(8, help=EXAMPLES.help + " as overlays/ (a file per image and head)")

    def __post_init__(self) -> None:
        self.heads = spec_list(self.heads, "heads")
        for m in self.heads:
            parse_method(map_method(m))
        super().__post_init__()


def read_localization(path: str | Path) -> dict:
    """A ``localization.json`` with its MaxBoxAccV2 scores in %, whichever version wrote it (files without a
    ``units`` block held fractions of 1)."""
    results = json.loads(Path(path).read_text())
    units = results.get("units")
    for scores in results.get("maps", {}).values():
        scores["maxboxacc_v2"] = as_percent(scores["maxboxacc_v2"], units, "maxboxacc_v2", "fraction")
        scores["maxboxacc"] = {d: as_percent(v, units, "maxboxacc", "fraction") for d, v in scores["maxboxacc"].items()}
    results["units"] = {**(units or {}), **units_of(SCORE_KEYS)}
    return results


def _color(name: str, index: int) -> tuple[int, int, int]:
    if name in COLORS:
        return COLORS[name]
    if map_method(name).startswith("abmilp:"):
        return (0, 255, 0)
    return OTHER_COLORS[index % len(OTHER_COLORS)]


@writes_out("localize")
def localize(cfg: LocalizeConfig) -> dict:
    """MaxBoxAccV2 (%) of each ``--heads`` map over ``cfg.data``/``cfg.split``; writes ``localization.json`` and
    overlay PNGs of the first ``cfg.examples`` images into ``cfg.out`` (ground truth blue, [cls] red, AbMILP green)."""
    device = resolve_device(cfg.device)
    if not Path(cfg.boxes).is_dir():
        raise DataError(f"boxes folder {cfg.boxes} does not exist (expected <image stem>.xml files)")
    methods = [map_method(m) for m in cfg.heads]
    mean, std = cfg.normalization()
    runner = SelectionRunner(
        methods, cfg.model, cfg.checkpoint, checkpoint_format=cfg.checkpoint_format, arch=cfg.arch,
        source=cfg.source, weights_dir=cfg.weights_dir, img_size=cfg.img_size, mean=mean, std=std, device=device,
        precision=cfg.precision,
    )
    used = runner.heads_used()
    heads = {name: used[method] for name, method in zip(cfg.heads, methods) if method in used}
    for name, head in heads.items():
        print(f"{name}: head {head['head']} (seed {head['seed']})")
    full = build_dataset(cfg.dataset, cfg.data, cfg.split, transform=unnormalized_eval_transform(cfg.img_size, False))
    taken, indices, sample = sample_images(full, cfg.max_images, cfg.seed, f"{cfg.data} split {cfg.split}")
    paths = [str(full.paths[i]) for i in indices]
    size = (cfg.img_size, cfg.img_size)
    gt = load_voc_boxes(cfg.boxes, paths, to_size=size)  # every annotation checked before the model runs
    loader = make_loader(taken, cfg.batch_size, num_workers=cfg.num_workers)
    accs = {m: MaxBoxAccV2Accumulator(image_size=size) for m in cfg.heads}
    kept_images, kept_maps = [], {m: [] for m in cfg.heads}
    start = 0
    for images, _ in tqdm(loader, desc="localize", unit="batch", disable=not cfg.progress):
        sel = runner(images)
        boxes = gt[start:start + images.shape[0]]
        for name, method in zip(cfg.heads, methods):
            maps = sel[method].reshape(-1, *runner.grid_size)
            accs[name].update(maps, boxes)
            kept_maps[name].extend(maps[: max(0, cfg.examples - len(kept_images))].cpu())
        kept_images.extend(images[: max(0, cfg.examples - len(kept_images))])
        start += images.shape[0]
    if start == 0:
        raise ConfigError(f"no images in {cfg.data} split {cfg.split}")
    scores = {name: acc.compute() for name, acc in accs.items()}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _overlays(cfg, kept_images, kept_maps, gt, scores, paths, out / "overlays") if kept_images else []
    results = {
        "maps": {name: {**s, "maxboxacc": {str(d): v for d, v in s["maxboxacc"].items()},
                        "best_threshold": {str(d): v for d, v in s["best_threshold"].items()}}
                 for name, s in scores.items()},
        "images": paths, "num_images": start, "sample": sample.as_dict(), "image_size": list(size),
        "grid_size": list(runner.grid_size), "normalization": normalization_used(cfg, runner),
        "overlays": files, "heads": heads, "config": asdict(cfg), "units": units_of([*SCORE_KEYS, "best_threshold"]),
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    for name, s in scores.items():
        per = ", ".join(f"@{d:g}: {v:.1f} %" for d, v in s["maxboxacc"].items())
        print(f"{name:<40} MaxBoxAccV2 {s['maxboxacc_v2']:.1f} % ({per})")
    print(f"{start} images ({sample}); wrote {out / RESULTS_FILE}" + (f" and {len(files)} overlays" if files else ""))
    return results


def _short(name: str, width: int = 40) -> str:
    return short_name(name, width)


def _image_iou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """IoU of one image's predicted box with its best-matching ground-truth box (0 without any), as MaxBoxAccV2
    counts it."""
    gt = torch.as_tensor(gt).reshape(-1, 4)
    if gt.numel() == 0:
        return 0.0
    return float(box_iou(pred.reshape(1, 1, 4), gt[None]).amax())


def _overlays(cfg, images, maps, gt, scores, paths, folder: Path) -> list[str]:
    """Per image: ``<i>_boxes.png`` (all boxes at each map's best threshold for IoU 0.5) and ``<i>_map<k>_<name>.png``
    (that map's heatmap, colour bar and box; ``k`` its position among the maps); each titled with the image's own
    IoU (%) and the map's MaxBoxAccV2 over all images (%), with a legend of the boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (cfg.img_size, cfg.img_size)
    n = len(images)
    pred, thresholds = {}, {}
    for name in cfg.heads:
        best = scores[name]["best_threshold"]
        thresholds[name] = best.get(0.5, next(iter(best.values())))
        pred[name] = best_boxes(torch.stack(maps[name]), thresholds[name], gt[:n], image_size=size)
    files = []
    for i, image in enumerate(images):
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        stem = Path(paths[i]).name
        iou = {name: 100 * _image_iou(pred[name][i], gt[i]) for name in cfg.heads}
        boxes = {f"{_short(name)} (threshold {thresholds[name]:.2f}, IoU {iou[name]:.0f} %)":
                 (pred[name][i], _color(name, k)) for k, name in enumerate(cfg.heads)}
        labels = list(boxes)
        path = folder / f"{i:04d}_boxes.png"
        fig = overlay_figure(pixels, None, gt[i], boxes, boxes_size=size,
                             title=f"{stem}: each map's box at its best threshold (IoU 0.5)")
        fig.savefig(path, dpi=100)
        files.append(str(path))
        for k, name in enumerate(cfg.heads):
            safe = "".join(c if c.isalnum() or c in "-+@" else "_" for c in name.rstrip("/"))[-40:]
            path = folder / f"{i:04d}_map{k}_{safe}.png"
            title = (f"{stem}: {_short(name)}\nthis image: IoU {iou[name]:.0f} %; "
                     f"MaxBoxAccV2 {scores[name]['maxboxacc_v2']:.1f} % (all images)")
            fig = overlay_figure(pixels, maps[name][i].float(), gt[i], {labels[k]: boxes[labels[k]]},
                                 boxes_size=size, title=title)
            fig.savefig(path, dpi=100)
            files.append(str(path))
    return files
