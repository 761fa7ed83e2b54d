"""What a reviewer checks on each figure, read from matplotlib's artist tree."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from PIL import Image

from beyond_cls import statistics
from beyond_cls.analysis import AttentionSummary, compare_figures
from beyond_cls.analysis import localize as localize_module
from beyond_cls.analysis.aggregations import examples_figure, kl_figure, kl_label
from beyond_cls.analysis.compare import compare, compared_models
from beyond_cls.analysis.layers_report import blocks_figure
from beyond_cls.analysis.plots import information_flow_figure, panel_title
from beyond_cls.analysis.style import BAND_LABEL, short_name
from beyond_cls.cli import main
from beyond_cls.localization import draw_overlay, overlay_figure
from beyond_cls.localization.maps import prepare_maps

ROOT = Path(__file__).resolve().parents[2]
PATCHES = 16  # log 16 = 2.77: entropies near it are what once got "+2.77" offset labels
LONG = "abmilp:/scratch/user/experiments/probe_runs/mae_b16#abmilp+cls@blr0p1"


def summary(model: str, base: float, *, cls: bool = True, images: int = 10) -> AttentionSummary:
    """4 blocks x 3 heads; entropies a hair below log 16, so a default tick formatter would use an offset."""
    b = torch.arange(4, dtype=torch.float64)[:, None]
    h = torch.arange(3, dtype=torch.float64)[None, :]
    g = lambda start, step: start + step * b + 1e-6 * h  # noqa: E731
    top = math.log(PATCHES)
    return AttentionSummary(
        patch_self=g(0.06 + base, 0.001), patch_patch_entropy=g(top - 1e-4 - base / 1000, 1e-5),
        cls_self=g(0.05 + base, 0.002) if cls else None, cls_patch_entropy=g(top - 8e-5, 1e-5) if cls else None,
        patch_cls=g(0.05, 0.0) if cls else None, cls_patch_mass=g(0.9, 0.0) if cls else None,
        num_images=images, num_prefix_tokens=int(cls), num_patches=PATCHES, model=model,
    )


def rising(model: str, depth: int, heads: int, base: float, *, cls: bool = True) -> AttentionSummary:
    """A summary of 196 patches whose values rise with the block and the head."""
    b = torch.arange(depth, dtype=torch.float64)[:, None]
    h = torch.arange(heads, dtype=torch.float64)[None, :]
    g = lambda offset, slope: base + offset + slope * b + 0.01 * h  # noqa: E731
    return AttentionSummary(
        patch_self=g(0.0, 0.001), patch_patch_entropy=g(4.0, -0.01), cls_self=g(0.2, 0.01) if cls else None,
        cls_patch_entropy=g(4.5, -0.02) if cls else None, patch_cls=g(0.01, 0.0) if cls else None,
        cls_patch_mass=g(0.5, -0.01) if cls else None, num_images=10, num_prefix_tokens=int(cls),
        num_patches=196, model=model,
    )


def draw(fig):
    """Lay out and draw ``fig`` (a bare ``Figure`` gets an Agg canvas); returns the renderer."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def inside(fig) -> None:
    """Every artist (labels, titles, legends, colour bars) lies inside the figure: nothing is clipped."""
    renderer = draw(fig)
    tight = fig.get_tightbbox(renderer)  # inches
    w, h = fig.get_size_inches()
    assert tight.x0 >= -1e-3 and tight.y0 >= -1e-3 and tight.x1 <= w + 1e-3 and tight.y1 <= h + 1e-3, (tight, w, h)


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def expected_uniform(metric: str, prefix: int) -> float:
    return {"cls_self": 1 / (PATCHES + prefix), "patch_self": 1 / PATCHES}.get(metric, math.log(PATCHES))


def check_flow_panels(fig, curves: dict[str, int]) -> None:
    """Uniform reference, head bands and plain tick labels on each of the four panels; the band in the legend."""
    draw(fig)
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == [panel_title(s) for s in statistics.panels()]
    assert list(panels)[:4] == ["[cls]-[cls] attention (paper Fig. 3)", "[cls]-patch entropy (paper Fig. 4)",
                                "patch self-attention (of patch mass) (paper Fig. 5)",
                                "patch-patch entropy (paper Fig. 6)"]
    for stat in statistics.panels():
        metric, ax = stat.name, panels[panel_title(stat)]
        assert ax.get_ylabel() == stat.ylabel and ("nats" in stat.ylabel) == metric.endswith("entropy")
        references = [ln for ln in ax.get_lines() if ln.get_label().startswith("uniform")]
        assert len(references) == 1, (metric, [ln.get_label() for ln in ax.get_lines()])
        assert list(references[0].get_ydata()) == pytest.approx([expected_uniform(metric, 1)] * 2), metric
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == curves[metric], metric
        assert ax.yaxis.get_offset_text().get_text() == "", metric
        assert ax.xaxis.get_offset_text().get_text() == "", metric
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert BAND_LABEL in legend and "min–max over heads" in BAND_LABEL
    box = fig.legends[0].get_window_extent()
    assert not any(overlaps(box, ax.get_window_extent()) for ax in fig.axes)


def test_default_formatter_would_offset_these_values():
    """The control: without plain ticks, matplotlib labels this panel's y axis with an offset."""
    fig = Figure()
    ax = fig.subplots()
    s = summary("x", 0.0)
    ax.plot(range(4), s.patch_patch_entropy.mean(1).numpy())
    ax.axhline(math.log(PATCHES))
    draw(fig)
    assert ax.yaxis.get_offset_text().get_text() != ""


def test_analyze_figure_title_references_band_and_ticks():
    summaries = {"mae_vit_base_patch16": summary("mae_vit_base_patch16", 0.0),
                 "ijepa_vit_huge_patch14": summary("ijepa_vit_huge_patch14", 0.01, cls=False)}
    fig = information_flow_figure(summaries, data="imagenet, split val")
    title = fig._suptitle.get_text()
    assert "imagenet, split val" in title and "10 images" in title
    check_flow_panels(fig, {"cls_self": 1, "cls_patch_entropy": 1, "patch_self": 2, "patch_patch_entropy": 2})


def _run(folder: Path, s: AttentionSummary, model: str, data: str = "/datasets/imagenet") -> Path:
    s.save(folder / "attention_stats.json")
    (folder / "analyze_config.json").write_text(json.dumps({"model": model, "data": data, "dataset": "imagefolder",
                                                            "split": "val"}))
    return folder


@pytest.fixture
def captured(monkeypatch):
    """Figures ``compare`` would save, by file name, kept open and not written (test_compare.py checks the PNGs):
    drawing them for a PNG is most of compare's time."""
    figs = {}

    def keep(fig, path):
        figs[Path(path).name] = fig
        return path

    monkeypatch.setattr(compare_figures, "save_figure", keep)
    return figs


def _line_styles(fig) -> dict[str, tuple]:
    ax = fig.axes[0]
    return {ln.get_label(): (ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines()
            if not ln.get_label().startswith("uniform")}


def test_compare_matches_analyze_styles_and_titles(tmp_path, captured, capsys):
    mae, dino = summary("mae_vit_base_patch16", 0.0), summary("dino_vit_base_patch16", 0.02)
    runs = [_run(tmp_path / "a", mae, "mae_vit_base_patch16"), _run(tmp_path / "b", dino, "dino_vit_base_patch16")]
    result = compare(runs, tmp_path / "out")
    fig = captured["information_flow.png"]
    title = fig._suptitle.get_text()
    assert "imagenet, split val" in title and "10 images" in title
    check_flow_panels(fig, {stat.name: 2 for stat in statistics.panels()})
    analyzed = information_flow_figure({"mae_vit_base_patch16": mae, "dino_vit_base_patch16": dino})
    same = _line_styles(analyzed)
    assert _line_styles(fig) == same and len(same) == 2
    assert same["mae_vit_base_patch16 (MIM)"][0] != same["dino_vit_base_patch16 (JEA)"][0]
    # one colour per family: another MIM model gets MAE's colour and its own line style
    beit = information_flow_figure({"beitv2_vit_base_patch16": summary("beitv2_vit_base_patch16", 0.0)})
    (colour, *look), = _line_styles(beit).values()
    assert colour == same["mae_vit_base_patch16 (MIM)"][0] and look != list(same["mae_vit_base_patch16 (MIM)"][1:])
    for name in ("fig3_cls_self.png", "heads_mae_vit_base_patch16.png"):
        assert "imagenet" in captured[name]._suptitle.get_text() and "10 images" in captured[name]._suptitle.get_text()
    assert "min–max over heads (band)" in result["files"]["report"].read_text()
    capsys.readouterr()


def test_family_from_metadata_never_from_the_folder(tmp_path):
    unnamed = summary("", 0.0)
    jea = _run(tmp_path / "mae_looking_folder", unnamed, "dino_vit_base_patch16")
    bare = tmp_path / "mae_other_folder"
    unnamed.save(bare / "attention_stats.json")
    models = compared_models([jea, bare])  # what compare plots, without drawing
    assert [(m.name, m.family) for m in models] == [("mae_looking_folder", "JEA"), ("mae_other_folder", "other")]
    assert models[0].data == "imagenet, split val" and models[1].data is None


def test_short_names_keep_the_method_type_and_the_head():
    short = short_name(LONG, 28)
    assert len(short) == 28 and short.startswith("abmilp:…") and short.endswith("#abmilp+cls@blr0p1")
    assert short_name("attn-mean", 28) == "attn-mean"
    fig = kl_figure(torch.zeros(2, 2, dtype=torch.float64), ["attn-mean", LONG])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["attn-mean", short]


def test_examples_colour_bar_per_overlay_and_scores_per_image():
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    flat = torch.full((2, 2), 0.25, dtype=torch.float64)
    peaky = torch.tensor([[0.7, 0.1], [0.1, 0.1]], dtype=torch.float64)
    fig = examples_figure(images, {"attn-mean": [flat, peaky], LONG: [peaky, flat]})
    overlays = [ax for ax in fig.axes if len(ax.get_images()) == 2]
    bars = [ax for ax in fig.axes if not ax.get_images()]
    assert len(overlays) == len(bars) == 4
    assert {ax.get_images()[1].get_cmap().name for ax in overlays} == {"viridis"}
    h_peaky = -sum(p * math.log(p) for p in (0.7, 0.1, 0.1, 0.1))
    titles = [ax.get_title() for ax in overlays]
    assert titles[0] == "attn-mean\nH 1.39 nats (100 % of log P)"
    assert titles[1] == f"{short_name(LONG, 28)}\nH {h_peaky:.2f} nats ({100 * h_peaky / math.log(4):.0f} % of log P)"
    assert titles[2] == f"H {h_peaky:.2f} nats ({100 * h_peaky / math.log(4):.0f} % of log P)"


def test_overlay_viridis_with_colour_bar():
    w, h = 96, 64
    heat = torch.zeros(4, 4)
    heat[1, 2] = 1.0
    out = np.asarray(draw_overlay(Image.new("RGB", (w, h), (128, 128, 128)), heat, None), dtype=np.float64)
    values = prepare_maps(heat[None], (h, w))[0].numpy()
    y, x = np.unravel_index(values.argmax(), values.shape)
    expected = 0.5 * 128 + 0.5 * 255 * np.asarray(colormaps["viridis"](values[y, x])[:3])
    assert out[y, x] == pytest.approx(expected, abs=1.0)  # viridis's yellow top, not jet's dark red
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    with_map = overlay_figure(image, heat, None, title="t")
    assert len(with_map.axes) == 2 and with_map.axes[1].get_ylabel().startswith("map value")
    assert with_map.axes[1].collections or with_map.axes[1].images  # the colour bar's ramp is drawn
    assert len(overlay_figure(image, None, None, title="t").axes) == 1


def test_localize_titles_carry_each_image_iou(tmp_path, monkeypatch):
    figs = []
    make = localize_module.overlay_figure

    def keep(*args, **kwargs):
        figs.append(make(*args, **kwargs))
        return figs[-1]

    monkeypatch.setattr(localize_module, "overlay_figure", keep)
    cfg = SimpleNamespace(img_size=32, heads=["cls-attn", LONG])
    corner = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    gt = [torch.tensor([[0, 0, 15, 15]]), torch.tensor([[18, 18, 31, 31]])]  # the map finds the first only
    scores = {name: {"best_threshold": {0.5: 0.5}, "maxboxacc_v2": 50.0} for name in cfg.heads}  # %
    localize_module._overlays(cfg, [torch.rand(3, 32, 32)] * 2, {n: [corner, corner] for n in cfg.heads}, gt, scores,
                              ["x/a.jpg", "x/b.jpg"], tmp_path)
    titles = [f.axes[0].get_title() for f in figs if len(f.axes) == 2]  # the map overlays, each with a colour bar
    assert len(titles) == 4
    iou = [int(re.search(r"this image: IoU (\d+) %", t).group(1)) for t in titles]
    assert iou[0] == iou[1] > 50 and iou[2] == iou[3] < 10
    assert all("MaxBoxAccV2 50.0 % (all images)" in t for t in titles)
    assert short_name(LONG, 40) in titles[1] and "#abmilp+cls@blr0p1" in titles[1]
    legend = [t.get_text() for t in figs[0].legends[0].get_texts()]  # the boxes figure of image 0
    assert legend[1] == f"cls-attn (threshold 0.50, IoU {iou[0]} %)"


def test_probe_report_offsets_and_legend_outside():
    curves = {a: [(b, 50.0 + i + b, 1.0) for b in (2, 5, 8)] for i, a in enumerate(("cls", "mean", "abmilp"))}
    fig = blocks_figure("top1", curves, [2.0] * 12)
    draw(fig)
    ax = fig.axes[0]
    xs = [c.lines[0].get_xdata() for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(xs) == 3
    for j, block in enumerate((2, 5, 8)):
        at = [float(x[j]) for x in xs]
        assert len(set(at)) == 3 and sum(at) / 3 == pytest.approx(block) and max(at) - min(at) < 1.5
    box = fig.legends[0].get_window_extent()
    assert not any(overlaps(box, a.get_window_extent()) for a in fig.axes)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["cls", "mean", "abmilp"]


def test_probe_report_one_block_is_bars():
    fig = blocks_figure("top1", {"cls": [(11, 60.0, 1.0)], "abmilp": [(11, 70.0, 2.0)]})
    ax = fig.axes[0]
    assert len(ax.patches) == 2 and [p.get_height() for p in ax.patches] == [60.0, 70.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cls", "abmilp"] and "block 11" in ax.get_title()
    assert not [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1 and ln.get_linestyle() != "None"]


ENCODER = dict(name="vit_tiny_patch16_224", checkpoint=None, checkpoint_format=None, source=None, depth=12,
               embed_dim=192, num_heads=3)


def test_probe_report_refuses_another_encoders_analyze_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"head": f"b{b}/cls@blr0p1", "block": b, "aggregation": "cls", "top1": 50.0, "top1_std": 0.0}
            for b in (3, 11)]
    (run / "results.json").write_text(json.dumps({"summary": rows, "encoder": ENCODER}))
    for name, encoder in (("same", ENCODER), ("other", dict(ENCODER, name="vit_small_patch16_224", embed_dim=384))):
        folder = tmp_path / name
        AttentionSummary(**{k: torch.full((12, 3), 0.5, dtype=torch.float64) for k in
                            ("patch_self", "patch_patch_entropy", "cls_self", "cls_patch_entropy")},
                         num_patches=4).save(folder / "attention_stats.json")
        (folder / "analyze_config.json").write_text(json.dumps({"encoder": encoder}))
    assert main(["probe-report", str(run), "--out", str(tmp_path / "ok"), "--analyze", str(tmp_path / "same")]) == 0
    capsys.readouterr()
    assert main(["probe-report", str(run), "--out", str(tmp_path / "no"), "--analyze", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another encoder" in err and "vit_small_patch16_224" in err, err
    assert not (tmp_path / "no").exists()


def test_information_flow_figure_blocks_units_and_legend():
    fig = information_flow_figure({"mae": rising("mae", 12, 3, 0.1), "ijepa": rising("ijepa", 12, 3, 0.0, cls=False)})
    axes = fig.axes[:4]
    for ax in axes:
        assert "0-based" in ax.get_xlabel()
        assert ax.get_ylabel(), ax.get_title()
        assert ax.get_legend() is None  # one figure legend below the panels, over no data
        for line in ax.get_lines():
            if line.get_label() in ("mae (MIM)", "ijepa (MIM)"):
                assert list(line.get_xdata()) == list(range(12))
    assert [ax.get_ylabel() for ax in axes if "entropy" in ax.get_title()] == ["entropy (nats)"] * 2
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "mae (MIM)" in labels and "ijepa (MIM)" in labels and any("log |J|" in t for t in labels)
    # the same encoder keeps its colour and line style in panels where another one is missing
    style = {ax.get_title(): {ln.get_label(): (ln.get_color(), ln.get_linestyle()) for ln in ax.get_lines()}
             for ax in axes}
    assert len({c["mae (MIM)"] for c in style.values()}) == 1
    inside(fig)
    legend = fig.legends[0].get_window_extent()
    assert not any(overlaps(legend, ax.get_window_extent()) for ax in axes)


def test_compare_numbers_blocks_from_zero(tmp_path, captured, capsys):
    a = rising("mae_vit_base_patch16", 12, 3, 0.1).save(tmp_path / "a.json")
    b = rising("dino_vit_base_patch16", 12, 4, 0.0).save(tmp_path / "b.json")
    res = compare([a, b], tmp_path / "out")
    assert res["x_axis"] == "block"
    assert res["series"]["cls_self"]["mae_vit_base_patch16"]["x"] == [float(i) for i in range(12)]
    with open(res["files"]["blocks_csv"], newline="") as f:
        blocks = [int(r["block"]) for r in csv.DictReader(f) if r["model"] == "dino_vit_base_patch16"
                  and r["metric"] == "cls_self"]
    assert blocks == list(range(12))
    heads = captured["heads_mae_vit_base_patch16.png"]
    for ax in [ax for ax in heads.axes if ax.get_images()]:
        assert ax.get_ylabel() == "block (0-based)" and ax.get_xlabel() == "head (0-based)"
        x0, x1, y0, y1 = ax.get_images()[0].get_extent()
        assert (x0, x1, y1, y0) == (-0.5, 2.5, -0.5, 11.5)  # head 0..2, block 0..11 at the cell centres
    assert len([ax for ax in heads.axes if not ax.get_images()]) == 4  # a labelled colour bar per heatmap
    assert all(ax.get_ylabel() for ax in heads.axes if not ax.get_images())
    # per-metric figures: labelled axes, legend beside the data
    fig = captured["fig4_cls_patch_entropy.png"]
    draw(fig)  # at the figure's own dpi, for the window extents compared below
    ax = fig.axes[0]
    assert ax.get_xlabel() == "block (0-based)" and ax.get_ylabel() == "entropy (nats)"
    assert not overlaps(ax.get_legend().get_window_extent(), ax.get_window_extent())
    assert "block index, 0-based" in res["files"]["report"].read_text()


@pytest.fixture
def derived():
    """A panel statistic derived from the row statistics (the patches' attention to the prefix tokens), registered
    for one test only."""
    stat = statistics.register(statistics.Statistic(
        name="patch_prefix_mass", header="patch-prefix", title="patch attention to prefix tokens",
        definition="1 - m_i", paper="", axis="attention mass on the prefix tokens", unit="fraction of 1",
        queries="patches", value=lambda rows: 1 - rows["patch_mass"], needs_cls=False,
        uniform=lambda patches, prefix: prefix / (patches + prefix), uniform_text="P/N", panel=True,
    ))
    yield stat
    statistics.unregister(stat.name)


def test_a_registered_statistic_is_drawn_and_tabulated(derived, tmp_path, captured, capsys):
    """A statistic registered at run time gets its panel in analyze's and compare's figures (title, unit,
    uniform reference), its heatmap, its CSV rows and columns, its unit and its report section."""
    plain = rising("dino_vit_base_patch16", 4, 3, 0.0)  # saved before the statistic existed
    values = dict(plain.fields(), patch_prefix_mass=0.2 + 0.01 * torch.arange(12, dtype=torch.float64).view(4, 3))
    recorded = AttentionSummary(values, num_images=10, num_prefix_tokens=1, num_patches=196,
                                model="mae_vit_base_patch16")
    assert len(statistics.panels()) == 5 and statistics.panels()[-1] is derived
    fig = information_flow_figure({"mae": recorded, "dino": plain})
    ax = fig.axes[-1]
    assert len(fig.axes) == 5 and ax.get_title() == "patch attention to prefix tokens"
    assert ax.get_ylabel() == "attention mass on the prefix tokens (fraction, 0–1)"
    uniform = [ln for ln in ax.get_lines() if ln.get_label().startswith("uniform: P/N")]
    assert len(uniform) == 1 and list(uniform[0].get_ydata()) == pytest.approx([1 / 197] * 2)
    assert [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("uniform")] == ["mae (MIM)"]
    inside(fig)  # five panels: no empty sixth cell, nothing clipped

    a = recorded.save(tmp_path / "a.json")
    b = plain.save(tmp_path / "b.json")
    res = compare([a, b], tmp_path / "out")
    assert list(res["series"]["patch_prefix_mass"]) == ["mae_vit_base_patch16"]
    assert res["files"]["metrics"]["patch_prefix_mass"].name == "patch_prefix_mass.png"
    assert captured["patch_prefix_mass.png"].axes[0].get_title() == "patch attention to prefix tokens"
    heads = captured["heads_mae_vit_base_patch16.png"]
    assert [ax.get_title() for ax in heads.axes if ax.get_images()][-1] == "patch attention to prefix tokens"
    assert "not recorded" in [t.get_text() for ax in captured["heads_dino_vit_base_patch16.png"].axes
                              for t in ax.texts]
    with open(res["files"]["models_csv"], newline="") as f:
        models = {r["model"]: r for r in csv.DictReader(f)}
    assert float(models["mae_vit_base_patch16"]["patch_prefix_mass"]) == pytest.approx(0.2 + 0.01 * 5.5)
    assert models["dino_vit_base_patch16"]["patch_prefix_mass"] == ""
    with open(res["files"]["blocks_csv"], newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["metric"] == "patch_prefix_mass"]
    assert [(r["model"], r["block"], r["unit"]) for r in rows] == [("mae_vit_base_patch16", str(b), "fraction of 1")
                                                                   for b in range(4)]
    assert [float(r["value"]) for r in rows] == pytest.approx([0.21 + 0.03 * b for b in range(4)])
    with open(res["files"]["units_csv"], newline="") as f:
        assert {"column": "patch_prefix_mass", "unit": "fraction of 1"} in list(csv.DictReader(f))
    report = res["files"]["report"].read_text()
    assert "### patch attention to prefix tokens" in report and "(patch_prefix_mass.png)" in report
    assert "patch attention to prefix tokens (fraction of 1)" in report  # a column of the overall means
    capsys.readouterr()


def test_kl_heatmap_digits_and_colorbar():
    assert [kl_label(v) for v in (0.0, 0.0042, 0.031, 0.123, 2.5)] == ["0", "0.0042", "0.031", "0.12", "2.50"]
    matrix = torch.tensor([[0.0, 0.0042], [0.031, 0.0]], dtype=torch.float64)
    fig = kl_figure(matrix, ["attn-mean", "attn-center"])
    ax, bar = fig.axes
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0", "0", "0.0042", "0.031"]  # not 0.00 / 0.03
    assert "nats" in bar.get_ylabel() and ax.get_xlabel() and ax.get_ylabel()
    inside(fig)


def test_examples_share_one_colour_scale():
    images = [torch.rand(3, 16, 16) for _ in range(2)]
    flat = torch.full((2, 2), 0.25, dtype=torch.float64)
    peaky = torch.tensor([[0.9, 0.05], [0.03, 0.02]], dtype=torch.float64)
    maps = {"attn-mean": [flat, flat], "attn-minent": [peaky, flat]}
    fig = examples_figure(images, maps)
    overlays = [ax.get_images()[1] for ax in fig.axes if len(ax.get_images()) == 2]
    assert len(overlays) == 4
    assert {im.get_clim() for im in overlays} == {(0.0, 0.9)}  # shared, not min-max per map
    bars = [ax for ax in fig.axes if not ax.get_images()]
    assert len(bars) == 4 and sum("patch weight" in ax.get_ylabel() for ax in bars) == 2  # each overlay; label per row
    inside(fig)
    inside(examples_figure(images[:1], {"a" * 40: [peaky]}))  # one row: the colour bar label still fits


def test_overlay_figure_title_and_box_legend():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    fig = overlay_figure(image, torch.rand(2, 2), torch.tensor([[2, 2, 20, 20]]),
                         {"cls-attn (threshold 0.40)": (torch.tensor([[1, 1, 10, 10]]), (255, 0, 0))},
                         title="img.jpg: cls-attn")
    assert fig.axes[0].get_title() == "img.jpg: cls-attn"
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["ground truth", "cls-attn (threshold 0.40)"]
    assert [tuple(h.get_edgecolor()[:3]) for h in legend.legend_handles] == [(0, 0, 1), (1, 0, 0)]
    inside(fig)
    assert not overlaps(legend.get_window_extent(), fig.axes[0].get_window_extent())


def test_no_global_backend_or_pyplot_in_the_library():
    """Importing the package never switches matplotlib's backend; figures are built without pyplot."""
    for path in (ROOT / "beyond_cls").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "matplotlib.use(" not in text and "import matplotlib.pyplot" not in text, path


def test_readme_figures_exist_and_stay_small():
    text = (ROOT / "docs/figures.md").read_text("utf-8")
    links = ["docs/" + f for f in re.findall(r"\]\((figures/[^)]+\.png)\)", text)]
    assert len(links) == len(set(links)) == 8
    sizes = [(ROOT / link).stat().st_size for link in links]
    assert sum(sizes) < 400_000 and all(s > 1000 for s in sizes)
