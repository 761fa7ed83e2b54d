"""The statistics table (beyond_cls/statistics.py) drives the op's stacked output, the recorders, the summary, the
CSVs, the figures and docs/statistics.md: a derived statistic added in one place reaches all of them."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import matplotlib.figure
import pytest
import timm
import torch

from beyond_cls import _extension, ops, reference, statistics, units
from beyond_cls.analysis import AttentionRecorder, AttentionSummary
from beyond_cls.analysis.analyze import BLOCKS_FILE, PLOT_FILE, STATS_FILE, AnalyzeConfig, analyze
from beyond_cls.analysis.compare import BLOCKS_CSV, COMBINED_FILE, MODELS_CSV, compare
from beyond_cls.analysis.compare_figures import panel_file
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.ops._dispatch import unavailable
from beyond_cls.statistics import ROW_STATISTICS, Statistic
from tests.ops.attention_checks import poison_heap, qkv_inputs

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "statistics.md"
TABLE = re.compile(r"<!-- statistics-table:start -->\n(.*?)\n<!-- statistics-table:end -->", re.S)
DERIVED = "patch_others"  # the statistic the walk-through of docs/statistics.md registers
FUSED_CPU = "cpp" if _extension.available() else "triton"
BACKENDS = ["reference", *[b for b in ("cpp", "triton")
                           if unavailable(b, "attention_with_stats", torch.device("cpu"), torch.float32) is None]]


def walkthrough_code() -> str:
    """The Python block of the docs' "A derived statistic" walk-through."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### A derived statistic"):text.index("### A new in-kernel row statistic")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the walk-through has one Python block"
    return blocks[0]


@pytest.fixture
def derived():
    """The walk-through's statistic, registered for one test and always removed after it."""
    exec(compile(walkthrough_code(), str(DOC), "exec"), {})
    try:
        yield statistics.find(DERIVED)
    finally:
        if DERIVED in {s.name for s in statistics.statistics()}:
            statistics.unregister(DERIVED)


def test_docs_table_is_the_generated_one():
    found = TABLE.search(DOC.read_text(encoding="utf-8"))
    assert found, "docs/statistics.md lost its statistics-table markers"
    assert found.group(1) == statistics.statistics_table_markdown()


def test_markdown_table_escapes_pipes_and_lists_every_statistic():
    table = statistics.statistics_table_markdown().splitlines()
    assert len(table) == 2 + len(statistics.statistics())
    assert all(line.count("|") - line.count("\\|") == 8 for line in table), table  # 7 cells in every row
    assert "log \\|J\\|" in "\n".join(table) and "| log |J| |" not in "\n".join(table)


def test_registry_rules():
    base = statistics.find("patch_self")
    with pytest.raises(ValueError, match="already registered"):
        statistics.register(base)
    with pytest.raises(KeyError, match="known: cls_self"):
        statistics.find("nope")
    with pytest.raises(KeyError, match="no attention statistic 'nope'"):
        statistics.unregister("nope")
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    for change, match in (({"unit": "bits"}, "unit must be one of"), ({"queries": "all"}, "queries must be"),
                          ({"queries": "cls"}, "needs a \\[cls\\] token"), ({"name": "a-b"}, "Python identifier")):
        with pytest.raises(ValueError, match=match):
            Statistic(**{**fields, **change})
    assert [s.name for s in statistics.statistics(has_cls=False)] == ["patch_self", "patch_patch_entropy"]
    assert all(s.panel for s in statistics.panels()) and len(statistics.panels(has_cls=False)) == 2
    assert base.ylabel == "share of patch attention (fraction, 0–1)"
    value, text = statistics.find("cls_patch_entropy").uniform_reference(196, 1)
    assert value == pytest.approx(math.log(196)) and text == "uniform: log |J| = 5.28 (N = 197, |J| = 196)"
    assert statistics.find("cls_self").uniform_reference(0, 1) is None
    assert units.units_of(["patch_self", "cls_patch_entropy", "max_entropy"]) == {
        "patch_self": "fraction of 1", "cls_patch_entropy": "nats", "max_entropy": "nats"}


def naive_planes(q, k, prefix):
    """Every row statistic from its definition, in float64, by name (independent of reference.ROW_DEFINITIONS)."""
    a = torch.softmax(q.double() @ k.double().transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    idx = torch.arange(a.shape[-1])
    mass = a[..., prefix:].sum(-1)
    p = a[..., prefix:] / mass[..., None]
    return {"self_attn": a[..., idx, idx], "cls_attn": a[..., 0], "patch_mass": mass,
            "patch_entropy": -torch.special.xlogy(p, p).sum(-1)}


# ragged sizes: [cls] + 196 patches, no prefix at d = 80, [cls] + 4 registers; the interpreter (slow) skips the first
STACKED_CASES = [(backend, *case) for backend in BACKENDS for case in ((197, 64, 1), (257, 80, 0), (261, 64, 5))
                 if backend != "triton" or case[0] != 197]


@pytest.mark.parametrize("backend,n,d,prefix", STACKED_CASES)
def test_stacked_rows_follow_row_statistics(backend, n, d, prefix, monkeypatch):
    """Each backend's stacked [S, B, H, N] output holds plane i = ROW_STATISTICS[i] (every plane written: NaN-poisoned
    memory beneath), and AttentionRows reads it by name."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = qkv_inputs(1, 1, n, d, dtype, 4.0, contiguous=False)
    poison_heap(len(ROW_STATISTICS) * n + 2 * n * d)
    _, rows = ops.attention_with_stats(q, k, v, prefix)
    assert rows.stacked.shape == (len(ROW_STATISTICS), 1, 1, n) and rows.stacked.dtype == dtype
    want = naive_planes(q, k, prefix)
    tol = dict(rtol=1e-9, atol=1e-12) if backend == "reference" else dict(rtol=1e-5, atol=2e-6)
    for i, row in enumerate(ROW_STATISTICS):
        torch.testing.assert_close(rows.stacked[i].double(), want[row.name], **tol, msg=f"{backend} {row.name}")
    present = [r.name for r in ROW_STATISTICS if prefix or not r.needs_prefix]
    assert list(rows) == present and len(rows) == len(present)
    assert (rows.cls_attn is None) == (prefix == 0) and ("cls_attn" in rows) == (prefix > 0) and "nope" not in rows
    for name in present:
        assert torch.equal(rows[name], getattr(rows, name)) and torch.equal(rows[name], rows.stacked[
            statistics.row_index(name)])
    with pytest.raises(AttributeError, match="no row statistic 'nope'"):
        _ = rows.nope
    with pytest.raises(ValueError, match=r"stacked must be \[4, B, H, N\]"):
        reference.AttentionRows(rows.stacked[:2])


def patch_others_means(captured, prefix):
    """Per-head mean over images and patch queries of Σ_{j ∉ {i, 0}} a_ij, from q and k in float64."""
    total, images = 0.0, 0
    for q, k, scale in captured:
        a = torch.softmax(q.double() @ k.double().transpose(-2, -1) * scale, dim=-1)
        n = a.shape[-1]
        keep = ~torch.eye(n, dtype=torch.bool)
        keep[:, 0] = False  # neither the query itself nor [cls]
        others = (a * keep).sum(-1)[..., prefix:]  # [B, H, |J|]
        total = total + others.mean(-1).sum(0)
        images += a.shape[0]
    return total / images


def savefig_titles(monkeypatch) -> dict[str, list[str]]:
    """File name -> panel titles of every figure saved while the test runs (rendered at a low resolution: the
    files are written, faster)."""
    saved: dict[str, list[str]] = {}
    real = matplotlib.figure.Figure.savefig

    def spy(fig, fname, *args, **kwargs):
        saved[Path(fname).name] = [ax.get_title() for ax in fig.axes]
        return real(fig, fname, *args, **{**kwargs, "dpi": 24})

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_derived_statistic_added_in_one_place(derived, tmp_path, monkeypatch):
    """The docs' walk-through registers patch_others; recorder, summary JSON, printed table, analyze's CSV and
    figure, compare's CSVs and figure all carry it, with the value of its float64 definition."""
    assert derived.name == DERIVED and derived.panel and derived in statistics.panels()
    assert units.units_of([DERIVED]) == {DERIVED: "fraction of 1"}
    assert f"| `{DERIVED}` |" in statistics.statistics_table_markdown()

    # the recorder sums it: equal to its definition from the attention matrix in float64
    monkeypatch.setenv("BEYOND_CLS_BACKEND", FUSED_CPU)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=64).eval()
    captured = []  # (q, k, scale) per call: blocks 0, 1, 0, 1
    op = ops.attention_with_stats

    def spy(q, k, v, num_prefix_tokens, scale, *args, **kwargs):
        captured.append((q, k, scale))
        return op(q, k, v, num_prefix_tokens, scale, *args, **kwargs)

    monkeypatch.setattr(ops, "attention_with_stats", spy)
    with torch.inference_mode(), AttentionRecorder(model) as rec:
        for batch in (torch.randn(3, 3, 64, 64), torch.randn(2, 3, 64, 64)):
            model.forward_features(batch)
    monkeypatch.setattr(ops, "attention_with_stats", op)
    summary = rec.summary()
    assert summary.patch_others.shape == (2, 3) and DERIVED in summary.fields()
    for block in (0, 1):
        want = patch_others_means(captured[block::2], 1)
        torch.testing.assert_close(summary.patch_others[block], want, rtol=1e-5, atol=1e-6, msg=f"block {block}")

    # the summary JSON, saved and loaded; the printed table
    path = summary.save(tmp_path / "tiny.json")
    data = json.loads(path.read_text())
    assert DERIVED in data["fields"] and DERIVED in data["per_block"] and data["units"][DERIVED] == "fraction of 1"
    loaded = AttentionSummary.load(path)
    assert torch.equal(loaded.patch_others, summary.patch_others)
    assert derived.header in str(summary).splitlines()[1]

    # analyze: its per-block CSV and a figure panel titled with it
    titles = savefig_titles(monkeypatch)
    data_root = make_synthetic_dataset(tmp_path / "set", SyntheticConfig(
        num_classes=2, train_per_class=0, val_per_class=2, image_size=32, object_size=(8, 16)))
    run = tmp_path / "run"
    analyze(AnalyzeConfig(model="vit_tiny_patch16_224", data=str(data_root), out=str(run), img_size=32,
                          batch_size=2, max_images=4, num_workers=0, progress=False, device="cpu"))
    metrics = [r for r in read_csv(run / BLOCKS_FILE) if r["metric"] == DERIVED]
    assert len(metrics) == 12 and all(0 < float(r["value"]) < 1 and r["unit"] == "fraction of 1" for r in metrics)
    assert AttentionSummary.load(run / STATS_FILE).patch_others.shape == (12, 3)
    assert any(derived.title in t for t in titles[PLOT_FILE]), titles[PLOT_FILE]

    # compare (of the recorder's summary): both CSVs, the combined figure and the statistic's own figure
    compare([path], tmp_path / "cmp", names=["tiny"], families={"tiny": "JEA"})
    (by_model,) = read_csv(tmp_path / "cmp" / MODELS_CSV)
    assert float(by_model[DERIVED]) == pytest.approx(float(summary.patch_others.mean()), rel=1e-6)
    by_block = [r for r in read_csv(tmp_path / "cmp" / BLOCKS_CSV) if r["metric"] == DERIVED]
    assert [float(r["value"]) for r in by_block] == pytest.approx(summary.patch_others.mean(1).tolist(), rel=1e-6)
    assert any(derived.title in t for t in titles[COMBINED_FILE]), titles[COMBINED_FILE]
    assert any(derived.title in t for t in titles[panel_file(DERIVED)]), titles[panel_file(DERIVED)]
    assert (tmp_path / "cmp" / panel_file(DERIVED)).is_file()

    # and it leaves again
    statistics.unregister(DERIVED)
    assert DERIVED not in units.units_of([DERIVED]) and DERIVED not in statistics.statistics_table_markdown()
    assert AttentionSummary.load(path).fields().keys() == summary.fields().keys() - {DERIVED}


def test_the_hf_recorder_sums_it_too(derived, monkeypatch):
    """HFAttentionRecorder (a transformers ViT, DeiT's two prefix tokens) sums the derived statistic, equal to its
    definition from the model's own eager attention probabilities."""
    pytest.importorskip("transformers")
    from beyond_cls.analysis.hf_recorder import HFAttentionRecorder
    from tests.analysis.test_hf_recorder import eager_run, inputs, make_model

    monkeypatch.setenv("BEYOND_CLS_BACKEND", FUSED_CPU)
    model = make_model("deit")
    kwargs = inputs("deit")
    with torch.no_grad(), HFAttentionRecorder(model) as rec:
        model(**kwargs)
    _, attentions = eager_run(model, kwargs)
    prefix = rec.num_prefix_tokens
    want = []
    for a in attentions:  # Σ_{j ∉ {i, 0}} a_ij, mean over images and patch queries
        a = a.double()
        keep = ~torch.eye(a.shape[-1], dtype=torch.bool)
        keep[:, 0] = False
        want.append((a * keep).sum(-1)[..., prefix:].mean((0, 2)))
    torch.testing.assert_close(rec.summary().patch_others, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_registry_change_while_recording_is_refused(derived):
    """Sums of one recording cover one set of statistics: a change in between needs reset()."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=32).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.inference_mode(), AttentionRecorder(model) as rec:
        model.forward_features(images)
        statistics.unregister(DERIVED)
        with pytest.raises(RuntimeError, match="statistics changed while recording .*call reset"):
            model.forward_features(images)
        rec.reset()
        model.forward_features(images)
    assert DERIVED not in rec.summary().fields() and len(rec.summary().fields()) == len(statistics.statistics())


def test_files_without_a_later_statistic_still_load(derived, tmp_path):
    """A FORMAT_VERSION 1 file written before a statistic existed loads with that statistic absent (None)."""
    grid = torch.full((2, 3), 0.25, dtype=torch.float64)
    old = AttentionSummary(patch_self=grid, patch_patch_entropy=grid + 1, num_patches=4, num_prefix_tokens=0)
    data = old.to_dict()
    del data["fields"][DERIVED], data["units"][DERIVED]
    file = tmp_path / "old.json"
    file.write_text(json.dumps(data))
    loaded = AttentionSummary.load(file)
    assert loaded.patch_others is None and set(loaded.fields()) == {"patch_self", "patch_patch_entropy"}
    with pytest.raises(TypeError, match="no registered attention statistic \\['nope'\\]"):
        AttentionSummary(patch_self=grid, nope=grid)
    with pytest.raises(AttributeError, match="no attribute or statistic 'nope'"):
        _ = loaded.nope
