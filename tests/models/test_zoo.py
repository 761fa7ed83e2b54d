"""The encoder zoo: names, architectures (parameter counts from docs/models.md's table), files, paper numbers."""

from __future__ import annotations

import pytest

from beyond_cls.cli import main
from beyond_cls.models.zoo import ZOO, find_weights, zoo_entry
from beyond_cls.models.zoo_table import build_zoo_architecture

NAMES = [
    "mae_vit_small_patch16", "mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14",
    "simmim_vit_base_patch16", "maskfeat_vit_base_patch16", "beitv2_vit_base_patch16", "ijepa_vit_huge_patch14",
    "capi_vit_large_patch14", "ibot_vit_base_patch16", "dinov2_vit_base_patch14", "dinov2_vit_base_patch14_reg4",
    "dino_vit_base_patch16", "mocov3_vit_base_patch16",
]

# docs/models.md, architectures: patch, dim, depth, heads, [cls], registers, tokens with a position embedding,
# layer scale, BEiT-style (q/v bias only, shared relative position bias instead of absolute embeddings)
ARCH = {
    "mae_vit_small_patch16": (16, 384, 12, 6, True, 0, 197, False, False),
    "mae_vit_base_patch16": (16, 768, 12, 12, True, 0, 197, False, False),
    "mae_vit_large_patch16": (16, 1024, 24, 16, True, 0, 197, False, False),
    "mae_vit_huge_patch14": (14, 1280, 32, 16, True, 0, 257, False, False),
    "simmim_vit_base_patch16": (16, 768, 12, 12, True, 0, 0, True, True),
    "maskfeat_vit_base_patch16": (16, 768, 12, 12, True, 0, 197, False, False),
    "beitv2_vit_base_patch16": (16, 768, 12, 12, True, 0, 0, True, True),
    "ijepa_vit_huge_patch14": (14, 1280, 32, 16, False, 0, 256, False, False),
    "ibot_vit_base_patch16": (16, 768, 12, 12, True, 0, 197, False, False),
    "dinov2_vit_base_patch14": (14, 768, 12, 12, True, 0, 257, True, False),
    "dinov2_vit_base_patch14_reg4": (14, 768, 12, 12, True, 4, 256, True, False),
    "dino_vit_base_patch16": (16, 768, 12, 12, True, 0, 197, False, False),
    "mocov3_vit_base_patch16": (16, 768, 12, 12, True, 0, 197, False, False),
}


def _vit_params(patch, dim, depth, heads, cls, regs, pos_tokens, layer_scale, beit) -> int:
    """Parameters of a pre-norm ViT encoder (MLP ratio 4, biases, LayerNorm) at 224 px, no head."""
    grid = 224 // patch
    block = 12 * dim * dim + 13 * dim  # norms, qkv, proj, fc1, fc2
    if beit:
        block -= dim  # no k bias
    if layer_scale:
        block += 2 * dim
    total = 3 * patch * patch * dim + dim + cls * dim + regs * dim + pos_tokens * dim + depth * block + 2 * dim
    if beit:
        total += ((2 * grid - 1) ** 2 + 3) * heads  # one shared relative-position table
    return total


def test_zoo_has_every_encoder_of_the_paper():
    assert list(ZOO) == NAMES
    assert zoo_entry("vit_base_patch16_224") is None
    assert {ZOO[n].family for n in NAMES} == {"MIM", "JEA"}
    assert [n for n in NAMES if ZOO[n].family == "JEA"] == NAMES[-5:]


@pytest.mark.parametrize("name", list(ARCH))
def test_architecture_matches_the_official_weights(name):
    entry = ZOO[name]
    model = build_zoo_architecture(entry)
    assert sum(p.numel() for p in model.parameters()) == _vit_params(*ARCH[name])
    assert model.num_prefix_tokens == entry.num_prefix_tokens
    assert (getattr(model, "cls_token", None) is not None) == entry.has_class_token
    assert len(model.blocks) == ARCH[name][2]


def test_capi_is_the_port_with_the_official_size():
    model = build_zoo_architecture(ZOO["capi_vit_large_patch14"])
    # patch conv 3·14²·1024 + 1024, 16 registers, 24 bias-free blocks (RMSNorm weights, q/k/v/proj, fc1/fc2, rope)
    block = 2 * 1024 + 4 * 1024 * 1024 + 2 * 4 * 1024 * 1024 + 2 * 64
    assert sum(p.numel() for p in model.parameters()) == 3 * 14 * 14 * 1024 + 1024 + 16 * 1024 + 24 * block
    assert model.num_prefix_tokens == 16 and not model.has_class_token


def test_token_sources_and_paper_numbers():
    assert ZOO["simmim_vit_base_patch16"].block == 7  # the 8th block, 0-based
    assert all(ZOO[n].final_norm is False for n in NAMES)  # the paper's features are pre-norm
    assert ZOO["ijepa_vit_huge_patch14"].source == "target_encoder"
    assert ZOO["mae_vit_base_patch16"].paper_top1["cls"] == 67.8
    assert ZOO["mae_vit_base_patch16"].paper_top1["abmilp"] == 71.6
    assert "cls" not in ZOO["capi_vit_large_patch14"].paper_top1
    assert ZOO["dino_vit_base_patch16"].paper_entropy == 4.70
    assert ZOO["capi_vit_large_patch14"].num_prefix_tokens == 16


def test_find_weights_names_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("BEYOND_CLS_WEIGHTS", raising=False)
    entry = ZOO["mae_vit_base_patch16"]
    with pytest.raises(FileNotFoundError, match="mae_pretrain_vit_base.pth.*BEYOND_CLS_WEIGHTS"):
        find_weights(entry)
    with pytest.raises(FileNotFoundError, match=r"not in .*dl\.fbaipublicfiles\.com/mae"):
        find_weights(entry, tmp_path)
    (tmp_path / "ibot" / "vitb_16").mkdir(parents=True)
    (tmp_path / "ibot" / "vitb_16" / "checkpoint_teacher.pth").write_bytes(b"x")
    (tmp_path / entry.file).write_bytes(b"x")
    monkeypatch.setenv("BEYOND_CLS_WEIGHTS", str(tmp_path))
    assert find_weights(entry) == tmp_path / entry.file
    assert find_weights(ZOO["ibot_vit_base_patch16"]).parent.name == "vitb_16"
    with pytest.raises(FileNotFoundError, match="no public weights"):
        find_weights(ZOO["mae_vit_small_patch16"], tmp_path)


def test_zoo_command_lists_presence(tmp_path, capsys):
    (tmp_path / "dino_vitbase16_pretrain.pth").write_bytes(b"x")
    assert main(["zoo", "--weights-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert set(NAMES) <= set(lines)
    assert "| yes" in lines["dino_vit_base_patch16"] and "| no" in lines["mae_vit_base_patch16"]
    assert "85.8" in lines["mae_vit_base_patch16"]


def test_zoo_names_load_their_official_file_from_the_weights_folder(tmp_path, monkeypatch):
    import torch

    from beyond_cls.models import CheckpointError, load_encoder
    from beyond_cls.models.loader import create_encoder

    monkeypatch.delenv("BEYOND_CLS_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match=r"dino_vitbase16_pretrain\.pth.*dl\.fbaipublicfiles\.com/dino"):
        load_encoder("dino_vit_base_patch16", weights_dir=tmp_path)
    source = create_encoder("vit_tiny_patch16_224", img_size=32, depth=2)
    torch.save(source.state_dict(), tmp_path / "dino_vitbase16_pretrain.pth")  # the official flat layout
    enc = load_encoder("dino_vit_base_patch16", weights_dir=tmp_path, arch="vit_tiny_patch16_224", img_size=32,
                       depth=2)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc.forward_features(x), source.eval().forward_features(x), rtol=0, atol=0)
    info = enc.beyond_cls_info
    assert (info.checkpoint_format, info.final_norm, info.block) == ("dino", False, None)
    assert info.mean == (0.485, 0.456, 0.406) and info.checkpoint.endswith("dino_vitbase16_pretrain.pth")
    assert load_encoder("vit_tiny_patch16_224", img_size=32, depth=2, block=1).beyond_cls_info.block == 1


def test_zoo_check_reports_a_bad_file(tmp_path, capsys):
    (tmp_path / "mae_pretrain_vit_base.pth").write_bytes(b"not a checkpoint")
    assert main(["zoo", "--weights-dir", str(tmp_path), "--check"]) == 2  # a failed check is not a success
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| mae_vit_base_patch16 "))
    assert "failed" in row  # the error itself is printed below the table
    assert "check failed: mae_vit_base_patch16" in out and "mae_pretrain_vit_base.pth" in out


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
