"""The tiny probe run the CPU tests share (probe, blocks, shards, aggregations, figures)."""

from __future__ import annotations

from pathlib import Path

from beyond_cls.data import SyntheticConfig

#: The synthetic set most CPU tests read: 3 classes of 8 train and 4 val images, 64 px.
TINY_SET = SyntheticConfig(num_classes=3, train_per_class=8, val_per_class=4, image_size=64, object_size=(12, 20))

# vit_tiny at 32 px: 4 patches + [cls]; 24 train images, 3 optimizer steps of 8 per epoch. On the CPU (fp32)
# also where CUDA is present: the equivalences below are CPU ones ("auto" would be bf16 on CUDA).
TINY = dict(model="vit_tiny_patch16_224", img_size=32, epochs=3, warmup_epochs=1, batch_size=4, effective_batch=8,
            num_workers=0, progress=False, heads="cls,mean,abmilp", lrs="0.1,1.0", device="cpu")


def trained_probe(root: Path, heads: str, classes: int = 3, train: int = 8, val: int = 4, boxes: bool = False,
                  **settings) -> tuple[Path, Path, Path | None]:
    """``(data, run, boxes)``: a tiny CPU probe run of ``heads`` on a synthetic set made under ``root``; with
    ``boxes``, a folder of VOC XML files holding the val objects' boxes (``<stem>.xml``)."""
    from beyond_cls.data import load_boxes, make_synthetic_dataset
    from beyond_cls.probe import run

    data = make_synthetic_dataset(root / "data", SyntheticConfig(num_classes=classes, train_per_class=train,
                                                                 val_per_class=val, image_size=64,
                                                                 object_size=(12, 20)))
    out = root / "run"
    run(dict(dict(TINY, heads=heads, epochs=2, lrs=None), data=str(data), out=str(out), **settings))
    if not boxes:
        return data, out, None
    xml = root / "boxes"
    xml.mkdir()
    for rel, (x0, y0, x1, y1) in load_boxes(data, "val").items():  # exclusive x1/y1; VOC corners are inclusive
        (xml / f"{Path(rel).stem}.xml").write_text(
            f"<annotation><size><width>64</width><height>64</height><depth>3</depth></size><object><name>o</name>"
            f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1 - 1}</xmax><ymax>{y1 - 1}</ymax></bndbox>"
            "</object></annotation>")
    return data, out, xml
