"""Official checkpoint layouts: each is rebuilt from a small random model of its family and must load strictly.

Every file below copies the released file's layout (wrapper keys, prefixes, decoders, predictors,
projection heads, momentum encoders, training state, pickled configs; see docs/models.md). The
loaded timm model must reproduce the source model's ``forward_features`` exactly; DINOv2 at 224 px is
compared with an independent re-implementation of DINOv2's own position interpolation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from beyond_cls.models import (
    CHECKPOINT_FORMATS,
    CheckpointError,
    checkpoint_model_kwargs,
    create_encoder,
    detect_checkpoint_formats,
    load_encoder_checkpoint,
    prepare_checkpoint,
    read_checkpoint,
    resolve_checkpoint_format,
)

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 64}  # 4x4 patches of 16 px
VIT, BEIT = "vit_base_patch16_224", "beitv2_base_patch16_224"
BEIT_PT = {"use_abs_pos_emb": False, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "init_values": 0.1}
OFFICIAL = {"timm", "mae", "simmim", "maskfeat", "beitv2", "ijepa", "ibot", "dinov2", "dino", "mocov3"}


def _model(name: str, seed: int, num_classes: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def _images(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))


def _prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def _train_state() -> dict:
    """What training scripts save next to the weights (optimizer, scaler, args)."""
    return {
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "epoch": 799,
        "scaler": {"scale": 65536.0, "growth_factor": 2.0},
        "args": argparse.Namespace(model="vit_base", lr=1.5e-4, output_dir="/out"),
    }


@contextlib.contextmanager
def _fake_yacs():
    """``yacs.config.CfgNode`` (a dict subclass keeping private attributes, like yacs') while writing a file."""
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None, new_allowed=False):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {}
            self.__dict__["__new_allowed__"] = new_allowed

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode, pkg.config = CfgNode, mod
    sys.modules["yacs"], sys.modules["yacs.config"] = pkg, mod
    try:
        yield CfgNode
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


# ------------------------------------------------------------------------ DINOv2, independently


def _dinov2_interpolate(pos_embed: torch.Tensor, h: int, w: int, patch: int, offset: float, antialias: bool):
    """DINOv2 ``interpolate_pos_encoding`` semantics for an h x w image (pos_embed holds a cls row)."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    h0, w0 = h // patch, w // patch
    if h0 * w0 == n and h == w:
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(grid, scale_factor=((h0 + offset) / m, (w0 + offset) / m), mode="bicubic",
                             antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=antialias)
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)), dim=1)


def _dinov2_reference(blocks_from: torch.nn.Module, sd: dict, reg: bool) -> Callable:
    """Forward of DINOv2's ``prepare_tokens_with_masks`` + blocks + norm on the official file's tensors."""
    offset, antialias = (0.0, True) if reg else (0.1, False)

    def forward(x: torch.Tensor) -> torch.Tensor:
        tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
        tokens = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), tokens.flatten(2).transpose(1, 2)), dim=1)
        tokens = tokens + _dinov2_interpolate(sd["pos_embed"], x.shape[2], x.shape[3], 14, offset, antialias)
        if reg:
            regs = sd["register_tokens"].expand(x.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        for blk in blocks_from.blocks:
            tokens = blk(tokens)
        return blocks_from.norm(tokens)

    return forward


# ------------------------------------------------------------------------ the official layouts


@dataclass
class Case:
    name: str
    obj: dict
    ref: Callable[[torch.Tensor], torch.Tensor]  # the source model's forward_features
    fmt: str  # the format to name explicitly
    auto: str  # what "auto" must detect
    arch: str = VIT
    size: dict = field(default_factory=lambda: dict(SMALL))
    entry: tuple[str, ...] = ()  # where the weights sit in the file (() = flat)
    prefix: str = ""  # the prefix of the weights' keys there
    img: int = 64
    _want: torch.Tensor | None = None

    def want(self) -> torch.Tensor:
        """The source model's features on :func:`_images` (computed once)."""
        if self._want is None:
            with torch.no_grad():
                self._want = self.ref(_images(self.img))
        return self._want


def _mae_cases() -> list[Case]:
    src = _model(VIT, 1, **SMALL)
    sd = src.state_dict()
    decoder = {
        "mask_token": torch.randn(1, 1, 64),
        "decoder_embed.weight": torch.randn(32, 64),
        "decoder_pos_embed": torch.randn(1, 17, 32),
        "decoder_blocks.0.norm1.weight": torch.randn(32),
        "decoder_norm.weight": torch.randn(32),
        "decoder_pred.weight": torch.randn(768, 32),
    }
    ft = _model(VIT, 2, num_classes=10, global_pool="avg", fc_norm=True, **SMALL)
    return [
        Case("mae_encoder", {"model": sd}, src.forward_features, "mae", "mae", entry=("model",)),
        Case("mae_full", {"model": sd | decoder, **_train_state()}, src.forward_features, "mae", "mae",
             entry=("model",)),
        Case("mae_finetuned", {"model": ft.state_dict(), **_train_state()}, ft.forward_features, "mae", "mae",
             entry=("model",)),
    ]


def _beit_cases() -> list[Case]:
    src = _model(BEIT, 3, global_pool="token", **BEIT_PT, **SMALL)
    sd = src.state_dict()
    index = {"rel_pos_bias.relative_position_index": torch.zeros(17, 17, dtype=torch.long)}
    simmim = _prefixed(sd | index | {"mask_token": torch.randn(1, 1, 64)}, "encoder.")
    simmim |= {"decoder.0.weight": torch.randn(768, 64, 1, 1), "decoder.0.bias": torch.randn(768)}
    with _fake_yacs() as CfgNode:
        config = CfgNode({"MODEL": CfgNode({"TYPE": "vit", "VIT": CfgNode({"USE_SHARED_RPB": True})}), "OUTPUT": "o"})
        simmim_file = {"model": simmim, "optimizer": {}, "lr_scheduler": {"t_initial": 800}, "max_accuracy": 0.0,
                       "epoch": 799, "config": config}
        simmim_bytes = _to_bytes(simmim_file)  # pickled while yacs "exists"
    cls_pt = {k.replace("blocks.", "cls_pt_layers.", 1): v.clone() for k, v in sd.items() if k.startswith("blocks.")}
    beitv2 = sd | index | cls_pt | {
        "mask_token": torch.randn(1, 1, 64),
        "lm_head.weight": torch.randn(8192, 64),
        "lm_head.bias": torch.randn(8192),
    }
    return [
        Case("simmim", simmim_bytes, src.forward_features, "simmim", "simmim", BEIT, entry=("model",),
             prefix="encoder."),
        Case("beitv2", {"model": beitv2, **_train_state()}, src.forward_features, "beitv2", "beitv2", BEIT,
             entry=("model",)),
    ]


def _to_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _maskfeat_case() -> Case:
    src = _model(VIT, 4, **SMALL)
    sd = {k.replace("norm.", "pred_head.transforms.0.0.", 1) if k.startswith("norm.") else k: v
          for k, v in src.state_dict().items()}
    sd |= {
        "mask_token": torch.randn(1, 1, 64),
        "pred_head.projections.0.weight": torch.randn(108 * 4, 64),
        "pred_head.projections.0.bias": torch.randn(108 * 4),
        "hogs.0.weight_x": torch.randn(3, 1, 3, 3),
        "hogs.0.weight_y": torch.randn(3, 1, 3, 3),
    }
    obj = {"epoch": 1600, "model_state": sd, "optimizer_state": {"state": {}}, "cfg": "MODEL:\n  ARCH: vit\n"}
    return Case("maskfeat", obj, src.forward_features, "maskfeat", "maskfeat", entry=("model_state",))


IJEPA = {"class_token": False, "global_pool": "avg", "fc_norm": False}


def _ijepa_case() -> tuple[Case, torch.nn.Module]:
    target = _model(VIT, 5, **IJEPA, **SMALL)
    context = _model(VIT, 6, **IJEPA, **SMALL)
    predictor = {
        "predictor_embed.weight": torch.randn(32, 64),
        "mask_token": torch.randn(1, 1, 32),
        "predictor_pos_embed": torch.randn(1, 16, 32),
        "predictor_blocks.0.norm1.weight": torch.randn(32),
        "predictor_norm.weight": torch.randn(32),
        "predictor_proj.weight": torch.randn(64, 32),
    }
    obj = {
        "encoder": _prefixed(context.state_dict(), "module."),
        "predictor": _prefixed(predictor, "module."),
        "target_encoder": _prefixed(target.state_dict(), "module."),
        "opt": {"state": {}},
        "scaler": None,
        "epoch": 300,
        "loss": 0.12,
        "batch_size": 2048,
        "world_size": 16,
        "lr": 1e-3,
    }
    case = Case("ijepa", obj, target.forward_features, "ijepa", "ijepa", entry=("target_encoder",), prefix="module.")
    return case, context


def _proj_head(prefix: str) -> dict:
    return {f"{prefix}mlp.0.weight": torch.randn(32, 64), f"{prefix}last_layer.weight_g": torch.randn(50, 1),
            f"{prefix}last_layer.weight_v": torch.randn(50, 32)}


def _distill_cases() -> tuple[list[Case], dict[str, torch.nn.Module]]:
    dino_s = {"depth": 2, "img_size": 64}  # DINO ViT-S/16 widths
    dino_t, dino_st = _model("vit_small_patch16_224", 7, **dino_s), _model("vit_small_patch16_224", 8, **dino_s)
    dino_head = {"head.mlp.0.weight": torch.randn(32, 384), "head.last_layer.weight_v": torch.randn(50, 32)}
    dino_full = {
        "student": _prefixed(_prefixed(dino_st.state_dict(), "backbone.") | dino_head, "module."),
        "teacher": _prefixed(dino_t.state_dict(), "backbone.") | dino_head,
        "dino_loss": {"center": torch.zeros(1, 50)},
        **_train_state(),
    }
    ibot_l = {"depth": 1, "img_size": 32}  # iBOT ViT-L/16 widths, one block
    ibot_vitl = _model("vit_large_patch16_224", 9, **ibot_l)
    ibot_t, ibot_st = _model(VIT, 10, **SMALL), _model(VIT, 11, **SMALL)
    student = _prefixed(ibot_st.state_dict() | {"masked_embed": torch.randn(1, 64)}, "backbone.")
    ibot_full = {
        "student": _prefixed(student | _proj_head("head."), "module."),
        "teacher": _prefixed(ibot_t.state_dict(), "backbone.") | _proj_head("head."),
        "ibot_loss": {"center": torch.zeros(1, 50), "center2": torch.zeros(1, 1, 50)},
        **_train_state(),
    }
    cases = [
        Case("dino_backbone", dino_t.state_dict(), dino_t.forward_features, "dino", "timm",
             "vit_small_patch16_224", dino_s),
        Case("dino_full", dino_full, dino_t.forward_features, "dino", "dino", "vit_small_patch16_224", dino_s,
             entry=("teacher",), prefix="backbone."),
        # vitb_16[_rand_mask]/checkpoint_teacher.pth: extract_backbone_weights.py output, a timm state dict
        Case("ibot_teacher_vitl", {"state_dict": ibot_vitl.state_dict()}, ibot_vitl.forward_features, "ibot", "timm",
             "vit_large_patch16_224", ibot_l, entry=("state_dict",), img=32),
        # the same script run --with_head on an unstripped checkpoint (defensive case)
        Case("ibot_teacher_prefixed", {"state_dict": _prefixed(ibot_t.state_dict(), "backbone.") | _proj_head("head.")},
             ibot_t.forward_features, "ibot", "ibot", entry=("state_dict",), prefix="backbone."),
        Case("ibot_full", ibot_full, ibot_t.forward_features, "ibot", "ibot", entry=("teacher",), prefix="backbone."),
    ]
    return cases, {"dino_full": dino_st, "ibot_full": ibot_st}


def _moco_case() -> tuple[Case, torch.nn.Module]:
    base, momentum = _model(VIT, 12, **SMALL), _model(VIT, 13, **SMALL)
    projector = {"head.0.weight": torch.randn(32, 64), "head.1.running_mean": torch.zeros(32),
                 "head.1.num_batches_tracked": torch.tensor(5), "head.3.weight": torch.randn(16, 32)}
    sd = _prefixed(base.state_dict() | projector, "module.base_encoder.")
    sd |= _prefixed(momentum.state_dict() | projector, "module.momentum_encoder.")
    sd |= {"module.predictor.0.weight": torch.randn(32, 16), "module.predictor.1.running_var": torch.ones(32)}
    obj = {"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {"state": {}}, "scaler": {"scale": 1.0}}
    case = Case("mocov3", obj, base.forward_features, "mocov3", "mocov3", entry=("state_dict",),
                prefix="module.base_encoder.")
    return case, momentum


DINOV2 = {"depth": 2, "embed_dim": 64, "num_heads": 4}


def _dinov2_cases() -> list[Case]:
    plain = _model("vit_small_patch14_dinov2", 14, img_size=518, **DINOV2)
    assert plain.pos_embed.shape == (1, 1 + 37 * 37, 64)
    plain_sd = plain.state_dict() | {"mask_token": torch.randn(1, 64)}
    reg = _model("vit_small_patch14_reg4_dinov2", 15, img_size=518, **DINOV2)
    torch.manual_seed(16)
    reg_sd = {k: v for k, v in reg.state_dict().items() if k not in ("reg_token", "pos_embed", "cls_token")}
    reg_sd |= {  # DINOv2's own layout: a cls row in pos_embed, registers without position
        "cls_token": torch.randn(1, 1, 64) * 0.05,
        "pos_embed": torch.randn(1, 1 + 37 * 37, 64) * 0.05,
        "register_tokens": torch.randn(1, 4, 64) * 0.05,
        "mask_token": torch.randn(1, 64),
    }
    out = []
    for name, arch, sd, src, is_reg in (
        ("dinov2", "vit_small_patch14_dinov2", plain_sd, plain, False),
        ("dinov2_reg4", "vit_small_patch14_reg4_dinov2", reg_sd, reg, True),
    ):
        for img in (224, 518):
            out.append(Case(f"{name}_{img}", sd, _dinov2_reference(src, sd, is_reg), "dinov2", "dinov2", arch,
                            {**DINOV2, "img_size": img}, img=img))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """Every layout written to disk once: name -> (Case, path); plus the extra source models."""
    folder = tmp_path_factory.mktemp("official")
    ijepa, context = _ijepa_case()
    distill, students = _distill_cases()
    moco, momentum = _moco_case()
    cases = [*_mae_cases(), *_beit_cases(), _maskfeat_case(), ijepa, *distill, moco, *_dinov2_cases()]
    out = {}
    for case in cases:
        path = folder / f"{case.name}.pth"
        if isinstance(case.obj, bytes):
            path.write_bytes(case.obj)
            case.obj = read_checkpoint(path)
        else:
            torch.save(case.obj, path)
        out[case.name] = (case, path)
    out["_others"] = {"ijepa_context": context, "moco_momentum": momentum, **students}
    return out


CASES = [
    "mae_encoder", "mae_full", "mae_finetuned", "simmim", "beitv2", "maskfeat", "ijepa", "dino_backbone", "dino_full",
    "ibot_teacher_vitl", "ibot_teacher_prefixed", "ibot_full", "mocov3", "dinov2_224", "dinov2_518", "dinov2_reg4_224",
    "dinov2_reg4_518",
]


def _load(case: Case, path: Path, fmt: str, **kwargs) -> torch.nn.Module:
    ckpt = prepare_checkpoint(path, fmt, **kwargs)
    model = create_encoder(case.arch, **case.size, **ckpt.model_kwargs).eval()
    assert load_encoder_checkpoint(model, ckpt).name == ckpt.format.name
    return model


def _same_features(model: torch.nn.Module, want: torch.Tensor | Callable, img: int, atol: float = 0.0) -> None:
    x = _images(img)
    with torch.no_grad():
        got = model.forward_features(x)
        want = want if isinstance(want, torch.Tensor) else want(x)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


# ------------------------------------------------------------------------ every layout


def test_all_official_formats_registered():
    assert set(CHECKPOINT_FORMATS) >= OFFICIAL


@pytest.mark.parametrize("name", CASES)
def test_loads_strictly_and_reproduces_source(zoo, name):
    case, path = zoo[name]
    _same_features(_load(case, path, case.fmt), case.want(), case.img)
    if case.auto != case.fmt:  # backbone-only DINO/iBOT files are plain timm state dicts: same result
        _same_features(_load(case, path, "auto"), case.want(), case.img)


@pytest.mark.parametrize("name", CASES)
def test_auto_detection(zoo, name):
    case, path = zoo[name]
    assert resolve_checkpoint_format(case.obj).name == case.auto
    assert prepare_checkpoint(path).format.name == case.auto


def _mutated(case: Case, tmp_path: Path, change: Callable[[dict], None]) -> Path:
    obj = copy.copy(case.obj)
    holder = obj
    for key in case.entry[:-1]:
        holder = holder[key] = copy.copy(holder[key])
    if case.entry:
        weights = holder[case.entry[-1]] = dict(holder[case.entry[-1]])
    else:
        weights = obj = dict(obj)
    change(weights)
    path = tmp_path / f"{case.name}_changed.pth"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name", CASES)
def test_extra_or_missing_key_is_named(zoo, name, tmp_path):
    case, _ = zoo[name]
    extra_key = f"{case.prefix}blocks.0.attn.extra_scale"
    extra = _mutated(case, tmp_path, lambda sd: sd.__setitem__(extra_key, torch.ones(1)))
    with pytest.raises(CheckpointError) as info:
        _load(case, extra, case.fmt)
    assert info.value.unexpected == ("blocks.0.attn.extra_scale",) and not info.value.missing
    assert "blocks.0.attn.extra_scale" in str(info.value)

    missing = _mutated(case, tmp_path, lambda sd: sd.pop(f"{case.prefix}blocks.0.mlp.fc2.bias"))
    with pytest.raises(CheckpointError) as info:
        _load(case, missing, case.fmt)
    assert info.value.missing == ("blocks.0.mlp.fc2.bias",) and not info.value.unexpected
    assert "blocks.0.mlp.fc2.bias" in str(info.value)


@pytest.mark.parametrize(
    ("name", "wrong"),
    [
        ("mae_full", "dinov2"),
        ("simmim", "beitv2"),
        ("beitv2", "simmim"),
        ("maskfeat", "mae"),
        ("ijepa", "dino"),
        ("dino_full", "ijepa"),
        ("ibot_full", "mocov3"),
        ("mocov3", "ibot"),
        ("dinov2_reg4_224", "timm"),
    ],
)
def test_wrong_format_flag_is_a_clear_error(zoo, name, wrong):
    case, path = zoo[name]
    with pytest.raises(CheckpointError) as info, pytest.warns(UserWarning, match=f"looks like .*{case.auto!r}"):
        _load(case, path, wrong)
    msg = str(info.value)
    assert str(path) in msg
    if wrong != "timm":
        assert f"looks like checkpoint_format {case.auto!r}" in msg and f"--checkpoint-format {case.auto}" in msg


def test_wrong_format_that_happens_to_fit_warns(zoo):
    case, path = zoo["dinov2_224"]  # as 'mae' it loads, but with timm's resampling instead of DINOv2's
    with pytest.warns(UserWarning, match="looks like checkpoint_format 'dinov2', not 'mae'"):
        enc = _load(case, path, "mae")
    assert not torch.equal(enc.pos_embed, _load(case, path, "dinov2").pos_embed)


def test_capi_layout_left_to_capi():
    """A flat dict of backbone.-prefixed keys (CAPI) is claimed by none of these formats."""
    capi = {
        "backbone.patch_embed.weight": torch.zeros(8, 3, 14, 14),
        "backbone.registers": torch.zeros(1, 16, 8),
        "backbone.encoder.blocks.0.residual1.norm.weight": torch.zeros(8),
        "backbone.encoder.blocks.0.residual1.fn.rope.freqs": torch.zeros(2, 2),
        "backbone.decoder.blocks.0.norm.weight": torch.zeros(8),
        "backbone.mask_token": torch.zeros(1, 8),
        "head.weight": torch.zeros(4, 8),
    }
    assert [f.name for f in detect_checkpoint_formats(capi) if f.name in OFFICIAL] == []


def test_ambiguous_layout_asks_for_a_format(zoo, tmp_path):
    sd = zoo["ijepa"][0].obj["target_encoder"]
    obj = {"teacher": sd, "student": sd, "dino_loss": {}, "target_encoder": sd}
    with pytest.raises(CheckpointError, match=r"ambiguous: it matches formats ('dino', 'ijepa'|'ijepa', 'dino')"):
        resolve_checkpoint_format(obj)
    path = tmp_path / "both.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="--checkpoint-format") as info:
        prepare_checkpoint(path)
    assert str(path) in str(info.value)
    assert prepare_checkpoint(path, "ijepa").format.name == "ijepa"


# ------------------------------------------------------------------------ model kwargs, sources, heads


def test_model_kwargs(zoo):
    def kwargs(name):
        return prepare_checkpoint(zoo[name][1], zoo[name][0].fmt).model_kwargs

    cls_vit = {"class_token": True, "reg_tokens": 0, "no_embed_class": False, "init_values": None,
               "global_pool": "token", "fc_norm": False}
    for name in ("mae_encoder", "mae_full", "maskfeat", "dino_full", "ibot_full", "mocov3"):
        assert kwargs(name) == cls_vit, name
    assert kwargs("mae_finetuned") == cls_vit | {"global_pool": "avg", "fc_norm": True}
    assert kwargs("ijepa") == cls_vit | {"class_token": False, "global_pool": "avg"}
    assert kwargs("dinov2_224") == cls_vit | {"init_values": 1e-5}
    assert kwargs("dinov2_reg4_224") == cls_vit | {"init_values": 1e-5, "reg_tokens": 4, "no_embed_class": True}
    beit = {"use_abs_pos_emb": False, "use_shared_rel_pos_bias": True, "use_rel_pos_bias": False,
            "init_values": 0.1, "global_pool": "token"}
    assert kwargs("simmim") == kwargs("beitv2") == beit
    ijepa = zoo["ijepa"][0].obj
    assert checkpoint_model_kwargs(ijepa)["class_token"] is False
    assert checkpoint_model_kwargs(ijepa, "ijepa", source="encoder") == kwargs("ijepa")


def test_sources_pick_sub_models(zoo):
    others = zoo["_others"]
    for name, source, model in (
        ("ijepa", "encoder", others["ijepa_context"]),
        ("dino_full", "student", others["dino_full"]),
        ("ibot_full", "student", others["ibot_full"]),
        ("mocov3", "momentum_encoder", others["moco_momentum"]),
    ):
        case, path = zoo[name]
        _same_features(_load(case, path, "auto", source=source), model.forward_features, case.img)
        with pytest.raises(ValueError, match=f"unknown source 'decoder'.*'{source}'"):
            prepare_checkpoint(path, case.fmt, source="decoder")
    case, path = zoo["dino_backbone"]
    with pytest.raises(CheckpointError, match="single model, so source='student' does not apply"):
        prepare_checkpoint(path, "dino", source="student")
    with pytest.raises(ValueError, match="not supported by this format"):
        prepare_checkpoint(zoo["mae_full"][1], "mae", source="encoder")


def test_mae_finetuned_head_and_pooling(zoo):
    case, path = zoo["mae_finetuned"]
    src = _model(VIT, 2, num_classes=10, global_pool="avg", fc_norm=True, **SMALL)  # the file's model
    x = _images(64)
    enc = _load(case, path, "mae")
    assert isinstance(enc.norm, torch.nn.Identity) and isinstance(enc.fc_norm, torch.nn.LayerNorm)
    with torch.no_grad():
        pooled = enc.forward_head(enc.forward_features(x), pre_logits=True)
        torch.testing.assert_close(pooled, src.forward_head(src.forward_features(x), pre_logits=True), rtol=0, atol=0)

    ckpt = prepare_checkpoint(path, keep_head=True)
    assert ckpt.num_classes == 10 and "head.weight" in ckpt.state_dict
    clf = timm.create_model(VIT, pretrained=False, num_classes=ckpt.num_classes, **SMALL, **ckpt.model_kwargs)
    load_encoder_checkpoint(clf, ckpt)
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(x), src(x), rtol=0, atol=0)

    with pytest.raises(CheckpointError, match="pass keep_head=True") as info:  # head in the model, not loaded
        load_encoder_checkpoint(timm.create_model(VIT, num_classes=10, **SMALL, **ckpt.model_kwargs), path)
    assert set(info.value.missing) == {"head.weight", "head.bias"}
    with pytest.raises(CheckpointError, match="global_pool='avg', fc_norm=True") as info:  # token-pool model
        load_encoder_checkpoint(create_encoder(VIT, **SMALL), path)
    assert set(info.value.missing) == {"norm.weight", "norm.bias"}
    assert set(info.value.unexpected) == {"fc_norm.weight", "fc_norm.bias"}


@pytest.mark.parametrize("name", ["simmim", "beitv2"])
def test_shared_table_copied_into_per_block_tables(zoo, name):
    case, path = zoo[name]
    ckpt = prepare_checkpoint(path)
    per_block = create_encoder(BEIT, **SMALL, **(ckpt.model_kwargs | {"use_shared_rel_pos_bias": False,
                                                                      "use_rel_pos_bias": True})).eval()
    assert per_block.rel_pos_bias is None
    load_encoder_checkpoint(per_block, ckpt)
    table = ckpt.state_dict["rel_pos_bias.relative_position_bias_table"]
    assert all(torch.equal(blk.attn.relative_position_bias_table, table) for blk in per_block.blocks)
    # Same bias, but SDPA sees a (1, H, N, N) mask instead of (H, N, N): equal up to float rounding, while the
    # shared-table model (the default model_kwargs) is bit-exact.
    _same_features(per_block, case.want(), 64, atol=1e-6)


def test_dinov2_interpolation_is_dinov2s_not_timms(zoo):
    case, path = zoo["dinov2_224"]
    enc = _load(case, path, "dinov2")
    stored = case.obj["pos_embed"]
    want = _dinov2_interpolate(stored, 224, 224, 14, 0.1, False)
    torch.testing.assert_close(enc.pos_embed.detach(), want, rtol=0, atol=0)
    timm_way = resample_abs_pos_embed(stored, new_size=[16, 16], num_prefix_tokens=1)
    assert (timm_way - want).abs().max() > 1e-3  # the default would not reproduce DINOv2 at 224 px

    case, path = zoo["dinov2_reg4_224"]
    enc = _load(case, path, "dinov2")
    assert enc.no_embed_class and enc.num_prefix_tokens == 5 and enc.pos_embed.shape == (1, 256, 64)
    sd = case.obj
    torch.testing.assert_close(enc.cls_token.detach(), sd["cls_token"] + sd["pos_embed"][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(enc.reg_token.detach(), sd["register_tokens"], rtol=0, atol=0)


# ------------------------------------------------------------------------ safe reading


def test_simmim_yacs_config_read_without_yacs(zoo):
    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules
    obj = read_checkpoint(zoo["simmim"][1])
    config = obj["config"]
    assert type(config) is collections.OrderedDict and config["MODEL"]["VIT"]["USE_SHARED_RPB"] is True
    assert "yacs" not in sys.modules


class _System:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_refused_by_name(zoo, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    obj = copy.copy(zoo["simmim"][0].obj)
    obj["hook"] = _System(marker)
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"refused as unsafe.*GLOBAL (posix|nt)\.system") as info:
        prepare_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
