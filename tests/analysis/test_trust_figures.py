"""What users see: 0-based blocks everywhere, explicit probe heads, Table 3 on the console, readable figures."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from tiny_probe import trained_probe

from beyond_cls.analysis import AttentionSummary
from beyond_cls.analysis import compare as compare_module
from beyond_cls.analysis.aggregations import examples_figure, kl_figure, kl_label
from beyond_cls.analysis.compare import compare
from beyond_cls.analysis.plots import information_flow_figure
from beyond_cls.analysis.selection_runner import SelectionRunner
from beyond_cls.cli import main
from beyond_cls.config import ConfigError
from beyond_cls.localization import overlay_figure
from beyond_cls.probe.head_loading import load_probe_head
from beyond_cls.selection import parse_method

SIZE = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "4"]


def make(model: str, depth: int, heads: int, base: float, *, cls: bool = True) -> AttentionSummary:
    """A summary whose values rise with the block and the head."""
    b = torch.arange(depth, dtype=torch.float64)[:, None]
    h = torch.arange(heads, dtype=torch.float64)[None, :]
    g = lambda offset, slope: base + offset + slope * b + 0.01 * h  # noqa: E731
    return AttentionSummary(
        patch_self=g(0.0, 0.001), patch_patch_entropy=g(4.0, -0.01), cls_self=g(0.2, 0.01) if cls else None,
        cls_patch_entropy=g(4.5, -0.02) if cls else None, patch_cls=g(0.01, 0.0) if cls else None,
        cls_patch_mass=g(0.5, -0.01) if cls else None, num_images=10, num_prefix_tokens=int(cls),
        num_patches=196, model=model,
    )


def _draw(fig):
    """Lay out and draw ``fig`` (a bare ``Figure`` gets an Agg canvas); returns the renderer."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _inside(fig) -> None:
    """Every artist (labels, titles, legends, colour bars) lies inside the figure: nothing is clipped."""
    renderer = _draw(fig)
    tight = fig.get_tightbbox(renderer)  # inches
    w, h = fig.get_size_inches()
    assert tight.x0 >= -1e-3 and tight.y0 >= -1e-3 and tight.x1 <= w + 1e-3 and tight.y1 <= h + 1e-3, (tight, w, h)


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


# ------------------------------------------------------------------------------------------------------------------
# 1. blocks are 0-based in figures, heatmaps and CSVs


def test_information_flow_figure_blocks_units_and_legend():
    fig = information_flow_figure({"mae": make("mae", 12, 3, 0.1), "ijepa": make("ijepa", 12, 3, 0.0, cls=False)})
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
    _inside(fig)
    legend = fig.legends[0].get_window_extent()
    assert not any(_overlaps(legend, ax.get_window_extent()) for ax in axes)


@pytest.fixture
def captured(monkeypatch):
    """Figures ``compare`` saves, by file name (still open)."""
    figs = {}
    save = compare_module._save

    def keep(fig, path):
        figs[Path(path).name] = fig
        fig.canvas.draw()
        return save(fig, path)

    monkeypatch.setattr(compare_module, "_save", keep)
    return figs


def test_compare_numbers_blocks_from_zero(tmp_path, captured, capsys):
    a = make("mae_vit_base_patch16", 12, 3, 0.1).save(tmp_path / "a.json")
    b = make("dino_vit_base_patch16", 12, 4, 0.0).save(tmp_path / "b.json")
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
    ax = fig.axes[0]
    assert ax.get_xlabel() == "block (0-based)" and ax.get_ylabel() == "entropy (nats)"
    assert not _overlaps(ax.get_legend().get_window_extent(), ax.get_window_extent())
    assert "block index, 0-based" in res["files"]["report"].read_text()


# ------------------------------------------------------------------------------------------------------------------
# 3. compare prints Table 3


def test_compare_prints_table3(tmp_path, capsys):
    a = make("mae_vit_base_patch16", 12, 3, 0.1).save(tmp_path / "a.json")
    b = make("ijepa_vit_huge", 12, 3, 0.0, cls=False).save(tmp_path / "b.json")
    res = compare([a, b], tmp_path / "out")
    out = capsys.readouterr().out
    assert "Table 3" in out
    rows = {r["model"]: r for r in res["rows"]}
    mae = next(line for line in out.splitlines() if "mae_vit_base_patch16" in line)
    assert "MIM" in mae and f"{rows['mae_vit_base_patch16']['aggregation_entropy']:.3f}" in mae
    ijepa = next(line for line in out.splitlines() if "ijepa_vit_huge" in line)
    assert f"{math.log(196):.3f} ‡" in ijepa and "uniform" in out
    assert main(["compare", str(a), "--out", str(tmp_path / "cli")]) == 0
    assert "Table 3" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------------
# 4. figures of the aggregations and localize jobs


def test_kl_heatmap_digits_and_colorbar():
    assert [kl_label(v) for v in (0.0, 0.0042, 0.031, 0.123, 2.5)] == ["0", "0.0042", "0.031", "0.12", "2.50"]
    matrix = torch.tensor([[0.0, 0.0042], [0.031, 0.0]], dtype=torch.float64)
    fig = kl_figure(matrix, ["attn-mean", "attn-center"])
    ax, bar = fig.axes
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["0", "0", "0.0042", "0.031"]  # not 0.00 / 0.03
    assert "nats" in bar.get_ylabel() and ax.get_xlabel() and ax.get_ylabel()
    _inside(fig)


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
    _inside(fig)
    _inside(examples_figure(images[:1], {"a" * 40: [peaky]}))  # one row: the colour bar label still fits


def test_overlay_figure_title_and_box_legend():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    fig = overlay_figure(image, torch.rand(2, 2), torch.tensor([[2, 2, 20, 20]]),
                         {"cls-attn (threshold 0.40)": (torch.tensor([[1, 1, 10, 10]]), (255, 0, 0))},
                         title="img.jpg: cls-attn")
    assert fig.axes[0].get_title() == "img.jpg: cls-attn"
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["ground truth", "cls-attn (threshold 0.40)"]
    assert [tuple(h.get_edgecolor()[:3]) for h in legend.legend_handles] == [(0, 0, 1), (1, 0, 0)]
    _inside(fig)
    assert not _overlaps(legend.get_window_extent(), fig.axes[0].get_window_extent())


# ------------------------------------------------------------------------------------------------------------------
# 2. abmilp:RUN picks its head explicitly; unsafe run configs are one-line errors


@pytest.fixture(scope="module")
def two_head_run(tmp_path_factory):
    """A probe run with two AbMILP heads (two learning rates) and a [cls] head, plus a boxes folder."""
    return trained_probe(tmp_path_factory.mktemp("heads"), "cls,abmilp", classes=2, train=4, val=3, boxes=True,
                         lrs="0.1,0.2", epochs=1, warmup_epochs=0, effective_batch=4)


def test_head_key_after_hash():
    m = parse_method("abmilp:/no/such/run#abmilp+cls@blr0p1")
    assert (m.run, m.head) == ("/no/such/run", "abmilp+cls@blr0p1")


def test_ambiguous_head_is_an_error_listing_the_keys(two_head_run):
    _, run, _ = two_head_run
    with pytest.raises(ConfigError, match="2 AbMILP heads") as info:
        load_probe_head(run)
    message = str(info.value)
    assert "\n" not in message and "abmilp@blr0p1, abmilp@blr0p2" in message and "#KEY" in message
    with pytest.raises(ConfigError, match="matches 2 AbMILP heads"):  # a spec naming several heads
        load_probe_head(run, "abmilp")
    head = load_probe_head(run, "abmilp@blr0p2")
    assert (head.key, head.seed) == ("abmilp@blr0p2", 0)


def test_aggregations_and_localize_record_the_head(two_head_run, tmp_path, capsys):
    data, run, xml = two_head_run
    base = ["--model", "vit_tiny_patch16_224", "--data", str(data), *SIZE]
    method = f"abmilp:{run}#abmilp@blr0p2"
    assert main(["aggregations", *base, "--methods", f"attn-mean,{method}", "--out", str(tmp_path / "a"),
                 "--max-images", "2", "--examples", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{method}: head abmilp@blr0p2 (seed 0)" in printed
    results = json.loads((tmp_path / "a" / "aggregations.json").read_text())
    assert results["heads"][method]["head"] == "abmilp@blr0p2" and results["heads"][method]["spec"] == "abmilp"
    assert main(["localize", *base, "--boxes", str(xml), "--map", "cls-attn", "--map", method,
                 "--out", str(tmp_path / "l"), "--max-images", "2", "--overlays", "1"]) == 0
    assert "head abmilp@blr0p2" in capsys.readouterr().out
    results = json.loads((tmp_path / "l" / "localization.json").read_text())
    assert list(results["heads"]) == [method] and results["heads"][method]["head"] == "abmilp@blr0p2"
    # without #KEY: one line naming the keys, exit 2
    assert main(["aggregations", *base, "--methods", f"abmilp:{run}", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "abmilp@blr0p1, abmilp@blr0p2" in err, err


def test_run_config_with_python_tags_is_one_line(tmp_path, capsys):
    run = tmp_path / "evil"
    run.mkdir()
    (run / "config.yaml").write_text("model: vit_tiny_patch16_224\nx: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=re.escape(str(run / "config.yaml"))):
        SelectionRunner([f"abmilp:{run}"], img_size=32)
    with pytest.raises(ConfigError, match="not plain YAML"):
        load_probe_head(run)
    argv = ["aggregations", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
            "--methods", f"abmilp:{run}", *SIZE]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.yaml" in err and "python/object" in err, err
