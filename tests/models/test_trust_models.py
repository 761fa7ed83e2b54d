"""Trust in what loads and what is written: bad weights, mismatch messages, bad sizes, NaN statistics, zoo checks."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from beyond_cls.analysis import AttentionSummary
from beyond_cls.analysis.compare import compare
from beyond_cls.cli import main
from beyond_cls.config import ConfigError
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.models import CheckpointError, load_encoder
from beyond_cls.models.arch import parse_arch
from beyond_cls.models.fit import describe_weights, size_hint
from beyond_cls.probe.bank import parse_heads

VIT = "vit_tiny_patch16_224"
TINY = {"depth": 2, "img_size": 64}


def _sd(name: str = VIT, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(timm.create_model(name, pretrained=False, num_classes=0, **{**TINY, **kwargs}).state_dict())


def _save(sd: dict, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


def _meta_sd(name: str, **kwargs) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return model, dict(model.state_dict())


# ------------------------------------------------------------------------------------ weight values


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_non_finite_weights_are_one_error_naming_the_keys(tmp_path, suffix):
    sd = _sd()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].clone()
    sd["blocks.0.attn.qkv.weight"][0, :3] = float("nan")
    sd["norm.bias"] = torch.full_like(sd["norm.bias"], float("inf"))
    path = tmp_path / f"nan{suffix}"
    _save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(VIT, path, **TINY)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and str(path) in msg
    assert "blocks.0.attn.qkv.weight (3 NaN)" in msg and "norm.bias (192 Inf)" in msg


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_tensor_for_a_float_parameter_is_refused(tmp_path, suffix, dtype):
    sd = _sd()
    sd["cls_token"] = torch.ones(sd["cls_token"].shape, dtype=dtype)
    path = tmp_path / f"int{suffix}"
    _save(sd, path)
    with pytest.raises(CheckpointError, match=rf"integer/bool.*cls_token \({str(dtype)[6:]}\)"):
        load_encoder(VIT, path, **TINY)


# ------------------------------------------------------------------------------------ mismatches


def test_key_lists_are_capped_with_counts(tmp_path):
    path = tmp_path / "deep.pth"
    torch.save(_sd(depth=4), path)  # 2 extra blocks: 24 unexpected keys
    with pytest.raises(CheckpointError) as info:
        load_encoder(VIT, path, **TINY)
    err = info.value
    assert len(err.unexpected) == 24  # the full list stays on the error
    line = next(s for s in str(err).splitlines() if "unexpected keys" in s)
    assert "unexpected keys (24)" in line and "... and 19 more" in line and line.count("blocks.") == 5
    assert "the file holds a ViT (width 192, 4 blocks, patch 16, grid 4x4" in str(err)


def test_shape_mismatch_says_which_vit_the_file_holds(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(_sd("vit_small_patch16_224", depth=12), path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(VIT, path, img_size=64)
    msg = str(info.value)
    assert "shape mismatches (" in msg and "... and" in msg and len(msg.splitlines()) <= 6
    assert "the file holds a ViT-S/16 (width 384, 12 blocks, patch 16, grid 4x4" in msg
    assert "grid 4x4): try --model vit_small_patch16_224" in msg
    assert "attention heads are not stored in the weights (6 for this size)" in msg


def test_zoo_name_mismatch_suggests_arch_and_zoo_name(tmp_path):
    path = tmp_path / "mae_small.pth"
    torch.save({"model": _sd("vit_small_patch16_224", depth=12)}, path)
    with pytest.raises(CheckpointError, match="try --arch vit_small_patch16_224 or the zoo name mae_vit_small_patch16"):
        load_encoder("mae_vit_base_patch16", path, img_size=64)


def test_model_of_an_unregistered_class_still_gets_a_timm_vit_name():
    """A timm ViT subclass no architecture registers (DeiT's distilled ViT) is offered timm's ViT names."""
    _, sd = _meta_sd("vit_large_patch16_224")
    deit, _ = _meta_sd("deit_tiny_distilled_patch16_224")
    hint = size_hint(sd, deit, "deit_tiny_distilled_patch16_224", "timm", {})
    assert "14x14): try --model vit_large_patch16_224;" in hint


def test_vit_large_file_described_from_its_weights():
    _, sd = _meta_sd("vit_large_patch16_224")
    assert str(describe_weights(sd)) == "a ViT-L/16 (width 1024, 24 blocks, patch 16, grid 14x14)"
    base, _ = _meta_sd("vit_base_patch16_224")
    hint = size_hint(sd, base, "mae_vit_base_patch16", "mae", {})
    assert "(16 for this size)" in hint
    assert "14x14): try --arch vit_large_patch16_224 or the zoo name mae_vit_large_patch16;" in hint
    _, reg = _meta_sd("vit_base_patch14_reg4_dinov2")  # registers have no position rows: 37x37 grid
    assert str(describe_weights(reg)) == "a ViT-B/14 (width 768, 12 blocks, patch 14, grid 37x37)"


# ------------------------------------------------------------------------------------ heads, sizes, blocks


def test_arch_states_the_head_count():
    assert parse_arch("vit_small_patch16_224:heads=12") == ("vit_small_patch16_224", {"num_heads": 12})
    enc = load_encoder("vit_small_patch16_224", arch="vit_small_patch16_224:heads=12", img_size=32, depth=1)
    assert enc.beyond_cls_info.num_heads == 12 and enc.blocks[0].attn.num_heads == 12
    for bad, message in [(":heads=0", "positive integer"), (":width=3", "unknown option"), (":heads=7", "divisible")]:
        with pytest.raises(ValueError, match=message):
            load_encoder(VIT, arch=VIT + bad, img_size=32, depth=1)


def test_mocov3_vit_small_builds_twelve_heads(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=32, depth=1, num_heads=12).eval()
    state = {f"module.base_encoder.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"arch": "vit_small", "state_dict": state}, path)
    enc = load_encoder("mocov3_vit_base_patch16", path, arch="vit_small_patch16_224", img_size=32, depth=1)
    assert enc.beyond_cls_info.num_heads == 12
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.forward_features(x), source.forward_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("size,message", [(100, "not a multiple of .* patch size 16: use 96 or 112"),
                                          (8, "smaller than one 16-pixel patch")])
def test_img_size_must_be_whole_patches(size, message):
    with pytest.raises(ValueError, match=message):
        load_encoder(VIT, img_size=size, depth=1)


def test_block_out_of_range_names_the_valid_range():
    with pytest.raises(ValueError, match=r"block 5 does not exist: .* has blocks 0\.\.1 \(-1 = the last\)"):
        load_encoder(VIT, block=5, **TINY)
    assert load_encoder(VIT, block=-1, **TINY).beyond_cls_info.block == -1


@pytest.mark.parametrize("spec", ["abmilp-k0", "abmilp-k17", "abmilp+cls-k64", "saabmilp-k32"])
def test_abmilp_branches_outside_1_to_16_refused(spec):
    with pytest.raises(ConfigError, match=r"1\.\.16"):
        parse_heads(f"cls,{spec}")
    assert parse_heads("abmilp-k16") == ["abmilp-k16"]


# ------------------------------------------------------------------------------------ NaN statistics


def _summary(value: float = 0.5) -> AttentionSummary:
    t = torch.full((2, 3), 0.5, dtype=torch.float64)
    bad = t.clone()
    bad[1, 2] = value
    return AttentionSummary(patch_self=t, patch_patch_entropy=t.clone(), cls_self=bad, cls_patch_entropy=t.clone(),
                            patch_cls=t.clone(), cls_patch_mass=t.clone(), num_images=4, num_patches=16,
                            model="m", block_names=["blocks.0.attn", "blocks.1.attn"])


def test_summary_with_nan_is_not_saved(tmp_path):
    path = tmp_path / "attention_stats.json"
    with pytest.raises(ValueError, match=r"cls_self at block 1 \(blocks\.1\.attn\), head 2 is nan"):
        _summary(float("nan")).save(path)
    assert not path.exists()


def test_stats_file_with_nan_refused_by_load_and_compare(tmp_path):
    path = _summary().save(tmp_path / "run" / "attention_stats.json")
    data = json.loads(path.read_text())
    data["fields"]["cls_self"][0][1] = float("inf")
    path.write_text(json.dumps(data))  # Python's json writes Infinity
    with pytest.raises(ValueError, match=r"attention_stats\.json.*cls_self at block 0 .*head 1 is inf"):
        AttentionSummary.load(path)
    with pytest.raises(ValueError, match=r"attention_stats\.json.*non-finite"):
        compare([str(path.parent)], str(tmp_path / "cmp"))


def test_analyze_with_nan_statistics_exits_2_and_writes_nothing(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "set", SyntheticConfig(num_classes=2, train_per_class=1, val_per_class=1))
    sd = _sd(depth=12)
    sd["pos_embed"] = torch.full_like(sd["pos_embed"], 3e38)  # finite weights that overflow in the forward
    torch.save(sd, tmp_path / "overflow.pth")
    out = tmp_path / "out"
    argv = ["analyze", "--model", VIT, "--checkpoint", str(tmp_path / "overflow.pth"), "--img-size", "64",
            "--data", str(data), "--out", str(out), "--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing written" in err and "at block 0" in err
    assert not (out / "attention_stats.json").exists()


def test_analyze_img_size_smaller_than_a_patch_is_one_line(tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "set", SyntheticConfig(num_classes=2, train_per_class=1, val_per_class=1))
    argv = ["analyze", "--model", VIT, "--img-size", "8", "--data", str(data), "--out", str(tmp_path / "o"),
            "--num-workers", "0", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "smaller than one 16-pixel patch" in err


# ------------------------------------------------------------------------------------ zoo command


def test_zoo_check_failure_exits_nonzero_with_details_below_the_table(tmp_path, capsys):
    (tmp_path / "mae_pretrain_vit_base.pth").write_bytes(b"not a checkpoint")
    assert main(["zoo", "--weights-dir", str(tmp_path), "--check"]) != 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    row = next(line for line in out if line.startswith("| mae_vit_base_patch16 "))
    assert "| failed" in row and "not a checkpoint" not in row and "corrupt" not in row
    table_end = max(i for i, line in enumerate(out) if line.startswith("| "))
    details = "\n".join(out[table_end:])
    assert "check failed: mae_vit_base_patch16" in details and "mae_pretrain_vit_base.pth" in details
    assert "1 zoo check(s) failed: mae_vit_base_patch16" in captured.err


def test_zoo_weights_dir_that_does_not_exist(tmp_path, capsys):
    assert main(["zoo", "--weights-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "weights folder" in err and "nope" in err and "does not exist" in err
