"""Layer-wise probing (``probe --blocks``): one encoder pass, one head bank per listed block, results per block."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from beyond_cls.cli import main
from beyond_cls.config import ConfigError
from beyond_cls.models import load_encoder
from beyond_cls.probe import ProbeConfig, run
from beyond_cls.probe.bank import HeadBank, selection_names
from beyond_cls.probe.features import TokenSource, check_block_token_bytes
from beyond_cls.probe.head_loading import load_probe_head
from beyond_cls.probe.state import load_state
from beyond_cls.probe.trainer import check_resumable
from tests.probe.test_probe_run import _flags, dataset  # noqa: F401 (the dataset fixture)
from tests.tiny_probe import TINY


def _bank(out, seed: int = 0) -> dict[str, torch.Tensor]:
    return load_state(out / f"seed{seed}" / "checkpoint.pt")["bank"]


def _metrics(row: dict) -> tuple:
    return tuple(row[k] for k in ("top1", "top5", "entropy"))


def _same_rows(layered: dict, block: int, alone: dict) -> None:
    got = {r["head"].split("/", 1)[1]: r for r in layered["rows"] if r["block"] == block}
    assert set(got) == {r["head"] for r in alone["rows"]}
    for row in alone["rows"]:
        mine = got[row["head"]]
        assert mine["aggregation"] == row["aggregation"] and mine["lr"] == row["lr"]
        torch.testing.assert_close(torch.tensor(_metrics(mine)), torch.tensor(_metrics(row)), rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize("final_norm", [False, True])
def test_token_source_blocks_equal_single_block_sources(final_norm):
    torch.manual_seed(0)
    model = load_encoder("vit_tiny_patch16_224", img_size=32)
    state = model.state_dict()
    images = torch.randn(3, 3, 32, 32)
    layered = TokenSource(model, final_norm=final_norm, blocks=[0, 5, 11])(images)
    assert layered.shape == (3, 3, 5, 192)
    for i, k in enumerate((0, 5, 11)):
        alone = load_encoder("vit_tiny_patch16_224", img_size=32)
        alone.load_state_dict(state)
        torch.testing.assert_close(layered[:, i], TokenSource(alone, k, final_norm)(images), rtol=0, atol=0)
    assert not torch.equal(layered[:, 0], layered[:, 2])


def test_block_rows_equal_runs_of_each_block_alone(dataset, tmp_path, capsys):  # noqa: F811
    common = dict(TINY, data=str(dataset))
    layered = run(dict(common, out=str(tmp_path / "layered"), blocks="11,5"))
    table = capsys.readouterr().out
    assert "| block" in table and "| 5 " in table and "| 11 " in table
    assert len(layered["rows"]) == 12 and {r["block"] for r in layered["rows"]} == {5, 11}
    assert [r["head"] for r in layered["rows"]][:2] == ["b5/cls@blr0p1", "b5/cls@blr1"]
    saved = json.loads((tmp_path / "layered" / "results.json").read_text())
    assert saved["token_source"]["blocks"] == [5, 11] and all("block" in r for r in saved["summary"])
    with open(tmp_path / "layered" / "results.csv") as f:
        assert {row["block"] for row in csv.DictReader(f)} == {"5", "11"}
    bank = _bank(tmp_path / "layered")
    for k in (11, 5):
        alone = run(dict(common, out=str(tmp_path / f"b{k}"), block=k))
        _same_rows(layered, k, alone)
        assert all(r["block"] == k for r in alone["rows"])
        weights = _bank(tmp_path / f"b{k}")
        for key, value in weights.items():  # weights and BatchNorm statistics, bit for bit
            torch.testing.assert_close(bank[key.replace("heads.", f"heads.b{k}/", 1)], value, rtol=0, atol=0, msg=key)
    key = "heads.b{}/abmilp@blr1.head.1.weight"
    assert not torch.equal(bank[key.format(5)], bank[key.format(11)])
    head = load_probe_head(tmp_path / "layered", "b5/abmilp@blr1")  # abmilp:RUN#KEY reads block 5's head
    assert head.block == 5 and head.key == "b5/abmilp@blr1"
    with pytest.raises(ConfigError, match="matches 4 AbMILP heads"):
        load_probe_head(tmp_path / "layered", "abmilp")
    results = tmp_path / "layered" / "results.json"
    info = load_encoder(common["model"], img_size=common["img_size"]).beyond_cls_info
    results.rename(results.with_suffix(".bak"))  # an unfinished run: the blocks come from the checkpoint's keys
    unfinished = load_probe_head(tmp_path / "layered", "b11/abmilp@blr1", encoder_info=info)
    results.with_suffix(".bak").rename(results)
    finished = load_probe_head(tmp_path / "layered", "b11/abmilp@blr1")
    assert unfinished.block == finished.block == 11
    for a, b in zip(unfinished.aggregation.state_dict().values(), finished.aggregation.state_dict().values()):
        assert torch.equal(a, b)
    again = run(dict(common, out=str(tmp_path / "layered"), blocks="5,11"))  # finished: resumed, not retrained
    assert again["images_trained"] == 0 and [r["head"] for r in again["rows"]] == [r["head"] for r in layered["rows"]]


def test_blocks_all_and_attention_heads_read_their_own_block(dataset, tmp_path):  # noqa: F811
    common = dict(TINY, data=str(dataset), heads="mean,attn-mean", lrs="1.0", epochs=2)
    layered = run(dict(common, out=str(tmp_path / "layered"), blocks="all"))
    assert sorted({r["block"] for r in layered["rows"]}) == list(range(12))
    alone = run(dict(common, out=str(tmp_path / "b5"), block=5))
    _same_rows(layered, 5, alone)  # blocks 0..5 run alike in both (block 5's attention captured in both)
    entropy = {r["block"]: r["entropy"] for r in layered["rows"] if r["aggregation"] == "attn-mean"}
    assert len(set(entropy.values())) > 1  # each block's heads weight the patches with that block's attention


def test_cache_holds_each_block_once_and_single_block_runs_reuse_it(dataset, tmp_path):  # noqa: F811
    common = dict(TINY, data=str(dataset), cache=str(tmp_path / "cache"), cache_dtype="fp32", heads="mean,abmilp",
                  lrs="1.0")
    layered = run(dict(common, out=str(tmp_path / "layered"), blocks="5,11"))
    shards = sorted((tmp_path / "cache").rglob("*.bin"))
    assert len(shards) == 4  # (train, val) x 2 blocks
    stamps = [p.stat().st_mtime_ns for p in shards]
    alone = run(dict(common, out=str(tmp_path / "b11"), block=11))
    again = run(dict(common, out=str(tmp_path / "again"), blocks="5,11"))
    assert sorted((tmp_path / "cache").rglob("*.bin")) == shards
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # reused, not extracted again
    _same_rows(layered, 11, alone)
    for k in (5, 11):
        _same_rows(again, k, {"rows": [dict(r, head=r["head"].split("/", 1)[1]) for r in layered["rows"]
                                       if r["block"] == k]})


def test_bank_keys_and_selections_per_block():
    bank = HeadBank(["mean", "attn-mean", "guide:x"], [0.1], 16, 3, 1, True, blocks=[2, 7])
    assert [e.key for e in bank.entries][:3] == ["b2/mean@blr0p1", "b2/attn-mean@blr0p1", "b2/guide:x@blr0p1"]
    assert bank.selections == ["b2/attn-mean", "guide:x", "b7/attn-mean"] == selection_names(
        ["mean", "attn-mean", "guide:x"], [2, 7])
    tokens, selections = torch.randn(4, 2, 5, 16), torch.softmax(torch.randn(4, 3, 4), -1)
    logits = bank(tokens, selections)
    assert list(logits) == list(bank.heads) and all(v.shape == (4, 3) for v in logits.values())
    with pytest.raises(ValueError, match=r"\[B, 2, N, D\]"):
        bank(tokens[:, 0], selections)


def test_token_memory_bound_is_one_clear_error():
    check_block_token_bytes(256, 12, 197, 768)  # ViT-B/16, every block, batch 256: 1.7 GiB
    with pytest.raises(ConfigError, match=r"24 blocks x 256 images .* above the 4.0 GiB bound; lower --batch-size"):
        check_block_token_bytes(256, 24, 257, 1024)  # ViT-L/14 at 224, every block


def test_resume_refuses_other_blocks(tmp_path):
    cfg = ProbeConfig(**dict(TINY, data="-", out="o", blocks="5,11"))
    state = {"config": {**cfg.__dict__}, "seed": 0, "effective_batch": 8}
    check_resumable(tmp_path / "c.pt", state, ProbeConfig(**dict(TINY, data="-", out="o", blocks=[11, 5])), 0, 8)
    with pytest.raises(ConfigError, match=r"blocks: '5,11' → '11'"):
        check_resumable(tmp_path / "c.pt", state, ProbeConfig(**dict(TINY, data="-", out="o", blocks="11")), 0, 8)


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--blocks", "5,11", "--block", "11"], "not both"),
        (["--blocks", "5,5"], "distinct"),
        (["--blocks", "-1"], "distinct block indices >= 0"),
        (["--blocks", "5,x"], "cannot read 'x'"),
        (["--blocks", "3,12"], "blocks 0..11"),
        (["--blocks", "all", "--batch-size", "4096", "--effective-batch", "4096", "--img-size", "224"], "GiB bound"),
    ],
)
def test_bad_blocks_are_one_line_exit_2(argv_tail, message, dataset, tmp_path, capsys):  # noqa: F811
    argv = ["probe", *_flags(**TINY, data=dataset, out=tmp_path / "o"), *argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("beyond-cls probe: error:"), err
    assert message in err


def test_probe_report_plots_accuracy_per_block_beside_entropy(tmp_path, capsys):
    from beyond_cls.analysis.layers_report import block_curves
    from beyond_cls.analysis.summary import AttentionSummary

    summary = [{"head": f"b{b}/{a}@blr{lr}", "block": b, "aggregation": a, "lr": lr, "top1": b + lr + (a == "mean"),
                "top1_std": 0.5} for b in (5, 2) for a in ("cls", "mean") for lr in (1, 2)]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"summary": summary, "token_source": {"block": 5}}))
    metric, curves = block_curves(json.loads((run_dir / "results.json").read_text()))
    assert metric == "top1" and curves == {"cls": [(2, 4, 0.5), (5, 7, 0.5)], "mean": [(2, 5, 0.5), (5, 8, 0.5)]}
    grid = torch.arange(12.0).repeat_interleave(3).view(12, 3).double()
    stats = AttentionSummary(patch_self=grid, patch_patch_entropy=grid, cls_self=grid, cls_patch_entropy=grid + 1,
                             num_patches=4)
    (tmp_path / "an").mkdir()
    stats.save(tmp_path / "an" / "attention_stats.json")
    assert main(["probe-report", str(run_dir), "--out", str(tmp_path / "rep"), "--analyze", str(tmp_path / "an")]) == 0
    with open(tmp_path / "rep" / "blocks.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["aggregation"], r["block"], r["cls_patch_entropy"]) for r in rows][:2] == [("cls", "2", "3.0"),
                                                                                          ("cls", "5", "6.0")]
    assert (tmp_path / "rep" / "blocks.png").stat().st_size > 1000
    capsys.readouterr()
    assert main(["probe-report", str(tmp_path / "an"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no results.json" in err
