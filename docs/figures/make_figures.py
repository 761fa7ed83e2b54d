"""Regenerate the figures of docs/figures.md (docs/figures/*.png) on the synthetic set with tiny random-weight ViTs.

The encoders are untrained, so the numbers mean nothing: the figures show the layout of what ``analyze``,
``compare``, ``aggregations``, ``localize`` and ``probe-report`` write. Runs on the CPU in a few minutes:

    .venv/bin/python docs/figures/make_figures.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = 64  # pixels: 16 patches of 16 px
COMMON = dict(img_size=SIZE, device="cpu", num_workers=0, progress=False, batch_size=8)
PROBE = dict(model="vit_tiny_patch16_224", epochs=2, warmup_epochs=0, effective_batch=8, lrs="0.1,1.0",
             seeds="0,1", **COMMON)


def _data(work: Path) -> tuple[Path, Path]:
    """The synthetic set (4 classes, 64 px) and a folder of VOC XML boxes of its val objects."""
    from beyond_cls.data import SyntheticConfig, load_boxes, make_synthetic_dataset

    data = make_synthetic_dataset(work / "data", SyntheticConfig(num_classes=4, train_per_class=6, val_per_class=4,
                                                                 image_size=SIZE, object_size=(20, 36)))
    boxes = work / "boxes"
    boxes.mkdir(exist_ok=True)
    for rel, (x0, y0, x1, y1) in load_boxes(data, "val").items():  # exclusive ends; VOC's are inclusive
        (boxes / f"{Path(rel).stem}.xml").write_text(
            f"<annotation><size><width>{SIZE}</width><height>{SIZE}</height><depth>3</depth></size><object>"
            f"<name>o</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1 - 1}</xmax><ymax>{y1 - 1}</ymax>"
            "</bndbox></object></annotation>")
    return data, boxes


def _keep(source: Path, name: str, colours: int = 64) -> Path:
    """Copy a figure into docs/figures as a PNG of ``colours`` colours (small enough for the repository; 256 where
    a colour bar would show bands)."""
    target = HERE / name
    with Image.open(source) as im:
        im.convert("RGB").quantize(colours).save(target, optimize=True)
    print(f"{target.name}: {target.stat().st_size / 1024:.0f} kB")
    return target


def main(work: Path) -> None:
    """Run every command in ``work`` (by relative paths, so no folder of this machine shows in a figure)."""
    work.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(work)
    try:
        _figures(Path("."))
    finally:
        os.chdir(here)


def _figures(work: Path) -> None:
    from beyond_cls.analysis.aggregations import AggregationsConfig, aggregations
    from beyond_cls.analysis.analyze import AnalyzeConfig, analyze
    from beyond_cls.analysis.compare import compare
    from beyond_cls.analysis.layers_report import probe_report
    from beyond_cls.analysis.localize import LocalizeConfig, localize
    from beyond_cls.probe import run

    data, boxes = _data(work)
    models = ["vit_tiny_patch16_224", "vit_small_patch16_224"]
    flow = work / "flow"
    analyze(AnalyzeConfig(model=models, data=str(data), out=str(flow), **COMMON))
    _keep(flow / "attention_stats.png", "analyze.png")
    # families given by hand: random timm ViTs belong to no family of the paper
    cmp = compare([flow], work / "compare", families={models[0]: "MIM", models[1]: "JEA"})
    _keep(cmp["files"]["figure"], "compare.png")

    layered = work / "probe_blocks"
    run(dict(PROBE, data=str(data), out=str(layered), heads="cls,mean,abmilp", blocks="3,7,11"))
    analyze(AnalyzeConfig(model=models[0], data=str(data), out=str(work / "tiny"), **COMMON))
    _keep(probe_report(layered, work / "report", analyze=work / "tiny")["figure"], "probe_report.png")
    single = work / "runs" / "mae_b16_probe_lr_sweep"  # a long run name: figures shorten it in the middle
    run(dict(PROBE, data=str(data), out=str(single), heads="cls,mean,abmilp,abmilp+cls"))
    _keep(probe_report(single, work / "report1")["figure"], "probe_report_one_block.png")

    key = json.loads((single / "results.json").read_text())["summary"]
    key = next(r["head"] for r in key if r["aggregation"] == "abmilp")
    method = f"abmilp:{single}#{key}"
    aggr = work / "aggr"
    aggregations(AggregationsConfig(model=models[0], data=str(data), out=str(aggr), examples=3,
                                    heads=f"attn-mean,attn-minent,attn-center,{method}", **COMMON))
    _keep(aggr / "examples.png", "aggregations_examples.png", 256)
    _keep(aggr / "kl.png", "aggregations_kl.png", 256)
    loc = work / "loc"
    result = localize(LocalizeConfig(model=models[0], data=str(data), boxes=str(boxes), out=str(loc), examples=1,
                                     heads=["cls-attn", method], **COMMON))
    overlays = [Path(p) for p in result["overlays"]]
    _keep(next(p for p in overlays if "_map1_" in p.name), "localize_map.png", 256)
    _keep(next(p for p in overlays if p.name.endswith("_boxes.png")), "localize_boxes.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    if args.work is not None:
        main(args.work)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
