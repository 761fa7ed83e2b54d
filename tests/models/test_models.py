"""Encoder loading: checkpoint layouts, safety, position-table resampling and EncoderInfo; bad weights, mismatch
messages, bad sizes and blocks, and NaN statistics from an encoder that overflows."""

from __future__ import annotations

import argparse
import json
import pathlib
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

from beyond_cls.analysis import AttentionSummary
from beyond_cls.analysis.compare import compare
from beyond_cls.cli import main
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.models import (
    CheckpointError,
    EncoderInfo,
    adapt_checkpoint,
    encoder_info,
    extract_state_dict,
    load_encoder,
    read_checkpoint,
    resolve_checkpoint_format,
)
from beyond_cls.models.arch import parse_arch
from beyond_cls.models.fit import describe_weights, size_hint

VIT = "vit_tiny_patch16_224"
TINY = {"depth": 2, "img_size": 64}  # 4x4 patches keep every forward cheap


def _timm(name: str = VIT, **kwargs) -> torch.nn.Module:
    kwargs = {**TINY, **kwargs}
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter non-trivial values so a missed key would change the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def _features(model: torch.nn.Module, size: int | None = None) -> torch.Tensor:
    size = size or model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_features(x)


def _assert_frozen_eval(model: torch.nn.Module) -> None:
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def vit_src() -> torch.nn.Module:
    """A randomized tiny ViT, shared read-only by the tests that only need its weights."""
    torch.manual_seed(0)
    return _randomize(_timm())


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".pth.tar", ".pyth", ".bin"])
def test_timm_layout_round_trip(vit_src, tmp_path, suffix):
    src = vit_src
    path = tmp_path / f"vit{suffix}"
    torch.save(src.state_dict(), path)
    enc = load_encoder(VIT, path, **TINY)
    assert torch.equal(_features(enc), _features(src))
    _assert_frozen_eval(enc)
    assert enc.beyond_cls_info.checkpoint == str(path)


def test_legacy_serialization_loads(vit_src, tmp_path):
    src = vit_src
    path = tmp_path / "legacy.pth"
    torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
    enc = load_encoder(VIT, path, checkpoint_format="timm", **TINY)
    assert torch.equal(_features(enc), _features(src))


def _mae_file(src: torch.nn.Module) -> dict:
    d = src.embed_dim
    sd = dict(src.state_dict())
    sd |= {
        "mask_token": torch.zeros(1, 1, d),
        "decoder_embed.weight": torch.randn(16, d),
        "decoder_embed.bias": torch.randn(16),
        "decoder_pos_embed": torch.randn(1, 197, 16),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16),
        "decoder_norm.weight": torch.ones(16),
        "decoder_pred.weight": torch.randn(768, 16),
        "head.weight": torch.randn(1000, d),
        "head.bias": torch.randn(1000),
    }
    return {"model": sd, "epoch": 799, "args": argparse.Namespace(lr=1.5e-4, model="mae_vit_tiny")}


@pytest.mark.parametrize("fmt", ["auto", "mae"])
def test_mae_layout_loads(vit_src, tmp_path, fmt):
    src = vit_src
    path = tmp_path / "checkpoint-799.pth"
    torch.save(_mae_file(src), path)
    enc = load_encoder(VIT, path, checkpoint_format=fmt, **TINY)
    assert torch.equal(_features(enc), _features(src))


def test_auto_detects_mae_and_timm(vit_src):
    sd = vit_src.state_dict()
    assert resolve_checkpoint_format(_mae_file(vit_src)).name == "mae"
    assert resolve_checkpoint_format(dict(sd)).name == "timm"
    assert resolve_checkpoint_format({"state_dict": dict(sd)}).name == "timm"
    adapted = adapt_checkpoint(_mae_file(vit_src), "f.pth", "mae")
    assert set(adapted) == set(sd)


def test_mae_leftovers_rejected_as_timm(vit_src, tmp_path):
    path = tmp_path / "mae.pth"
    torch.save(_mae_file(vit_src), path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(VIT, path, checkpoint_format="timm", **TINY)
    assert "decoder_embed.weight" in info.value.unexpected
    assert "mask_token" in str(info.value)
    assert "head.weight" not in info.value.unexpected  # classifier keys are always dropped


def test_safetensors_round_trip(vit_src, tmp_path):
    src = vit_src
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = load_encoder(VIT, path, **TINY)
    assert torch.equal(_features(enc), _features(src))


def test_module_prefix_stripped(vit_src, tmp_path):
    src = vit_src
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    enc = load_encoder(VIT, path, **TINY)
    assert torch.equal(_features(enc), _features(src))


def test_partial_module_prefix_kept():
    sd = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert set(extract_state_dict(sd)) == {"module.a", "b"}


def test_explicit_key(vit_src, tmp_path):
    src = vit_src
    path = tmp_path / "dino_full.pth"
    torch.save(
        {"teacher": src.state_dict(), "student": {k: v + 1 for k, v in src.state_dict().items()}, "epoch": 3},
        path,
    )
    enc = load_encoder(VIT, path, checkpoint_key="teacher", **TINY)
    assert torch.equal(_features(enc), _features(src))
    obj = read_checkpoint(path)
    with pytest.raises(CheckpointError, match="'teacher', 'student', 'epoch'"):
        adapt_checkpoint(obj, path)  # nothing to pick automatically
    with pytest.raises(CheckpointError, match="no top-level key 'target_encoder'"):
        adapt_checkpoint(obj, path, key="target_encoder")
    with pytest.raises(CheckpointError, match="entry 'epoch' is not a dict of tensors"):
        adapt_checkpoint(obj, path, key="epoch")


# ------------------------------------------------------------------------------------ errors


def test_renamed_and_deleted_keys_listed(vit_src, tmp_path):
    sd = dict(vit_src.state_dict())
    sd["blocks.0.attn.qkv.weight_renamed"] = sd.pop("blocks.0.attn.qkv.weight")
    del sd["norm.bias"]
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(VIT, path, **TINY)
    err = info.value
    assert set(err.missing) == {"blocks.0.attn.qkv.weight", "norm.bias"}
    assert err.unexpected == ("blocks.0.attn.qkv.weight_renamed",)
    msg = str(err)
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg
    assert "blocks.0.attn.qkv.weight_renamed" in msg and "norm.bias" in msg and str(path) in msg


def test_shape_mismatch_names_key_and_shapes(vit_src, tmp_path):
    sd = dict(vit_src.state_dict())
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(10)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.mlp\.fc1\.bias: checkpoint \(10,\) vs model \(768,\)"
    ):
        load_encoder(VIT, path, **TINY)


class _Touch:
    """Unpickling this would create ``path``: stands in for a checkpoint that runs code."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_refused(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    payload = {"model": {"w": torch.zeros(1)}, "x": _Touch(marker)}
    if writer == "torch_zip":
        torch.save(payload, path, _use_new_zipfile_serialization=True)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused as unsafe") as info:
        load_encoder(VIT, path, **TINY)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="file not found") as info:
        load_encoder(VIT, path, **TINY)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", ["truncated_zip", "truncated_legacy", "garbage", "safetensors"])
def test_corrupt_file(vit_src, tmp_path, kind):
    sd = vit_src.state_dict()
    path = tmp_path / ("bad.safetensors" if kind == "safetensors" else "bad.pth")
    if kind == "garbage":
        path.write_bytes(b"definitely not a checkpoint" * 20)
    else:
        if kind == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        else:
            torch.save(sd, path, _use_new_zipfile_serialization=kind == "truncated_zip")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a dict of tensors, got list"):
        adapt_checkpoint(read_checkpoint(path), path)


def test_unknown_model_and_reserved_kwargs():
    with pytest.raises(ValueError, match="unknown timm model 'vit_tinyy_patch16_224'.*vit_tiny_patch16_224"):
        load_encoder("vit_tinyy_patch16_224")
    with pytest.raises(ValueError, match="pretrained"):
        load_encoder(VIT, pretrained=True, **TINY)


def test_unknown_format(vit_src, tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(vit_src.state_dict(), path)
    with pytest.raises(ValueError, match="unknown checkpoint_format 'dinov3'.*'mae'"):
        load_encoder(VIT, path, checkpoint_format="dinov3", **TINY)


# ------------------------------------------------------------------------ position tables


def test_pos_embed_interpolated(tmp_path):
    src = _randomize(_timm(img_size=224))
    path = tmp_path / "vit224.pth"
    torch.save(src.state_dict(), path)
    enc = load_encoder(VIT, path, img_size=160, depth=2)
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[10, 10], num_prefix_tokens=1)
    assert enc.pos_embed.shape == (1, 101, 192)
    assert torch.equal(enc.pos_embed, want)
    assert torch.equal(enc.pos_embed[:, :1], src.pos_embed[:, :1])
    assert torch.equal(enc.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    out = _features(enc, size=160)
    assert out.shape == (2, 101, 192) and torch.isfinite(out).all()
    assert enc.beyond_cls_info.grid_size == (10, 10)


def test_pos_embed_no_embed_class_registers(tmp_path):
    name = "vit_small_patch14_reg4_dinov2"
    src = _randomize(_timm(name, img_size=70))
    assert src.no_embed_class and src.pos_embed.shape[1] == 25
    path = tmp_path / "reg.pth"
    torch.save(src.state_dict(), path)
    enc = load_encoder(name, path, img_size=56, depth=2)
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[4, 4], num_prefix_tokens=0)
    assert torch.equal(enc.pos_embed, want)
    assert _features(enc, size=56).shape == (2, 5 + 16, 384)


def test_pos_embed_not_a_grid(vit_src, tmp_path):
    sd = dict(vit_src.state_dict())
    sd["pos_embed"] = torch.zeros(1, 1 + 15, 192)
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="not a square grid"):
        load_encoder(VIT, path, **TINY)


# ------------------------------------------------------------------------ Beit and Eva


def test_beit_round_trip_with_relative_position_index(tmp_path):
    name = "beitv2_base_patch16_224"
    src = _randomize(_timm(name))
    sd = dict(src.state_dict())
    # official BEiT files also store the index buffers, which timm rebuilds (non-persistent)
    sd |= {f"blocks.{i}.attn.relative_position_index": torch.zeros(17, 17, dtype=torch.long) for i in (0, 1)}
    path = tmp_path / "beit.pth"
    torch.save({"model": sd}, path)
    enc = load_encoder(name, path, checkpoint_format="timm", **TINY)
    assert torch.equal(_features(enc), _features(src))
    _assert_frozen_eval(enc)


def test_beit_relative_position_table_resized(tmp_path):
    name, narrow = "beitv2_base_patch16_224", {"embed_dim": 192, "num_heads": 3}
    src = _randomize(_timm(name, **narrow))
    path = tmp_path / "beit.pth"
    torch.save(src.state_dict(), path)
    enc = load_encoder(name, path, img_size=96, depth=2, **narrow)
    for i in (0, 1):
        table = src.blocks[i].attn.relative_position_bias_table.detach()
        want = resize_rel_pos_bias_table(table, new_window_size=(6, 6), new_bias_shape=(11 * 11 + 3, 3))
        assert torch.equal(enc.blocks[i].attn.relative_position_bias_table, want)
    assert torch.equal(enc.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert _features(enc).shape == (2, 1 + 36, 192)


def test_eva_round_trip(tmp_path):
    name = "eva02_tiny_patch14_224"
    src = _randomize(_timm(name, img_size=56))
    path = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = load_encoder(name, path, img_size=56, depth=2)
    assert torch.equal(_features(enc), _features(src))
    _assert_frozen_eval(enc)


# ------------------------------------------------------------------------ EncoderInfo


@pytest.mark.parametrize(
    ("name", "kwargs", "want"),
    [
        (VIT, {}, EncoderInfo(VIT, 1, True, 196, (14, 14), 192, 3, 2)),
        (
            VIT,
            {"class_token": False, "global_pool": "avg", "fc_norm": False},
            EncoderInfo(VIT, 0, False, 196, (14, 14), 192, 3, 2),
        ),
        (
            "vit_small_patch14_reg4_dinov2",
            {"img_size": 70},
            EncoderInfo("vit_small_patch14_reg4_dinov2", 5, True, 25, (5, 5), 384, 6, 2),
        ),
        (VIT, {"reg_tokens": 4}, EncoderInfo(VIT, 5, True, 196, (14, 14), 192, 3, 2)),
        (
            "beitv2_base_patch16_224",
            {},
            EncoderInfo("beitv2_base_patch16_224", 1, True, 196, (14, 14), 768, 12, 2),
        ),
        (
            "eva02_tiny_patch14_224",
            {},
            EncoderInfo("eva02_tiny_patch14_224", 1, True, 256, (16, 16), 192, 3, 2),
        ),
    ],
)
def test_encoder_info(name, kwargs, want):
    enc = load_encoder(name, depth=2, **kwargs)
    assert enc.beyond_cls_info == want
    assert encoder_info(enc) == want
    _assert_frozen_eval(enc)
    tokens = _features(enc, size=want.grid_size[0] * enc.patch_embed.patch_size[0])
    assert tokens.shape[1] == want.num_tokens
    assert want.num_reg_tokens == want.num_prefix_tokens - int(want.has_class_token)


def test_encoder_info_rejects_non_vit():
    with pytest.raises(TypeError, match="not a ViT-style"):
        encoder_info(torch.nn.Linear(2, 2))


def test_non_vit_model_is_one_clear_line():
    with pytest.raises(ValueError) as err:
        load_encoder("resnet50")
    message = str(err.value)
    assert message.startswith("resnet50 is not a Vision Transformer (timm's resnet models); supported architectures:")
    assert "hf:PATH" in message and "img_size" not in message and "\n" not in message


def test_format_of_another_family_names_what_the_file_looks_like(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model(VIT, pretrained=False, num_classes=0, **TINY).state_dict(), path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(VIT, path, checkpoint_format="beitv2", **TINY)
    message = str(err.value)
    assert "the file looks like checkpoint_format 'timm', not 'beitv2'" in message
    assert "pass --checkpoint-format timm or auto" in message and "unexpected keyword" not in message


# ------------------------------------------------------------------------------------ files that do not fit


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
