"""``--model hf:PATH``: tiny random ``transformers`` models of every family, saved with ``save_pretrained`` and loaded
as our timm encoders, must give the same tokens and the same attention statistics as the ``transformers`` model.

``transformers`` is imported inside the fixtures only, so collecting this file costs nothing without it.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from beyond_cls.analysis import AttentionRecorder
from beyond_cls.cli import main
from beyond_cls.data import SyntheticConfig, make_synthetic_dataset
from beyond_cls.models import CheckpointError, load_encoder

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                              reason="needs transformers: pip install 'beyond-cls[hf]'")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
VIT_LIKE = {**SMALL, "intermediate_size": 64}
# family -> (config class, model class saved, config kwargs)
FAMILIES = {
    "vit": ("ViTConfig", "ViTModel", {**VIT_LIKE, "layer_norm_eps": 1e-12}),
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {**VIT_LIKE, "num_labels": 3}),
    "vit_mae": ("ViTMAEConfig", "ViTMAEForPreTraining",
                {**VIT_LIKE, "mask_ratio": 0.0, "decoder_hidden_size": 32, "decoder_num_hidden_layers": 1,
                 "decoder_num_attention_heads": 2, "decoder_intermediate_size": 64}),
    "ijepa": ("IJepaConfig", "IJepaModel", {**VIT_LIKE, "qkv_bias": False}),
    "dinov2": ("Dinov2Config", "Dinov2Model", {**SMALL, "mlp_ratio": 2, "layer_norm_eps": 1e-6}),
    "dinov2_swiglu": ("Dinov2Config", "Dinov2Model", {**SMALL, "mlp_ratio": 4, "use_swiglu_ffn": True}),
    "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                   {**SMALL, "mlp_ratio": 2, "num_register_tokens": 2}),
    "beit": ("BeitConfig", "BeitForMaskedImageModeling",
             {**VIT_LIKE, "use_mask_token": True, "use_absolute_position_embeddings": True,
              "use_shared_relative_position_bias": True, "use_mean_pooling": False, "layer_scale_init_value": 0.1}),
    "data2vec": ("Data2VecVisionConfig", "Data2VecVisionForImageClassification",
                 {**VIT_LIKE, "use_relative_position_bias": True, "num_labels": 3}),
    "beit_base_no_pooler": ("BeitConfig", "BeitModel",
                            {**VIT_LIKE, "use_relative_position_bias": True, "layer_scale_init_value": 0.0}),
}
PREFIX = {"deit": 2, "dinov2_reg": 3, "ijepa": 0}


def _randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere (tables, layer scale, norms), sharper q/k so attention is far from uniform."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.4 if any(s in name for s in ("q_proj.w", "k_proj.w", "query.w", "key.w")) else 0.1
            offset = 1.0 if re.search(r"norm\w*\.weight$", name) else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + offset)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """family -> (folder, the transformers base model with eager attention), built once per module."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for key, (config_cls, model_cls, kwargs) in FAMILIES.items():
        config = getattr(transformers, config_cls)(**kwargs)
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager").eval()
        _randomize(model)
        folder = tmp_path_factory.mktemp(key)
        model.save_pretrained(folder)
        if key == "dinov2":
            (folder / "preprocessor_config.json").write_text(
                json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
        out[key] = (folder, model.base_model)
    return out


def _hf_outputs(base: torch.nn.Module, images: torch.Tensor, resized: bool):
    kwargs = {"output_hidden_states": True, "output_attentions": True}
    params = inspect.signature(base.forward).parameters
    if "noise" in params:  # ViT-MAE: ascending noise keeps every patch in order (mask_ratio 0)
        n = (images.shape[-1] // 8) ** 2
        kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(images.shape[0], n)
    if resized and "interpolate_pos_encoding" in params:
        kwargs["interpolate_pos_encoding"] = True
    with torch.no_grad():
        return base(pixel_values=images, **kwargs)


def _reference_stats(attentions, prefix: int, has_cls: bool) -> dict[str, torch.Tensor]:
    """The attention statistics (docs/statistics.md) from the transformers model's attention [B, H, N, N] (float64)."""
    out: dict[str, list] = {}
    for a in attentions:
        a = a.double()
        n = a.shape[-1]
        mass = a[..., prefix:].sum(-1)
        p = a[..., prefix:] / mass[..., None]
        ent = -torch.special.xlogy(p, p).sum(-1)  # 0 log 0 = 0
        diag = a[..., torch.arange(n), torch.arange(n)]
        stats = {"patch_self": (diag / mass)[..., prefix:].mean(-1).mean(0),
                 "patch_patch_entropy": ent[..., prefix:].mean(-1).mean(0)}
        if has_cls:
            stats |= {"cls_self": a[:, :, 0, 0].mean(0), "cls_patch_entropy": ent[:, :, 0].mean(0),
                      "cls_patch_mass": mass[:, :, 0].mean(0), "patch_cls": a[:, :, prefix:, 0].mean(-1).mean(0)}
        for k, v in stats.items():
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


@needs_hf
@pytest.mark.parametrize("key", list(FAMILIES))
def test_hf_model_loads_exactly(saved, key):
    folder, base = saved[key]
    for size in (32, 48):  # 48 px: position tables resized as the family interpolates them
        enc = load_encoder(f"hf:{folder}", img_size=size)
        info = enc.beyond_cls_info
        assert info.num_prefix_tokens == PREFIX.get(key, 1) and info.has_class_token == (key != "ijepa")
        assert info.checkpoint_format == f"hf:{base.config.model_type}" and info.depth == 2
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        probed: list[torch.Tensor] = []
        hook = enc.blocks[-1].register_forward_hook(lambda _m, _i, o, probed=probed: probed.append(o))
        try:
            with torch.no_grad(), AttentionRecorder(enc) as rec:
                final = enc.forward_features(images)
        finally:
            hook.remove()
        want = _hf_outputs(base, images, resized=size != 32)
        assert final.shape[1] == info.num_tokens == want.last_hidden_state.shape[1]
        torch.testing.assert_close(probed[0], want.hidden_states[-1], rtol=1e-4, atol=1e-5, msg="probed tokens")
        torch.testing.assert_close(final, want.last_hidden_state, rtol=1e-4, atol=1e-5, msg="final-normed tokens")
        summary = rec.summary()
        ref = _reference_stats(want.attentions, info.num_prefix_tokens, info.has_class_token)
        assert set(summary.fields()) == set(ref)
        for name, value in ref.items():
            torch.testing.assert_close(getattr(summary, name), value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, size=size: f"{name} at {size}: {m}")
        assert summary.patch_patch_entropy.min() < 0.97 * summary.max_entropy  # not trivially uniform


@needs_hf
@pytest.mark.parametrize("key", ["vit", "deit", "vit_mae", "ijepa", "dinov2_reg", "beit", "data2vec"])
def test_in_place_recorder_agrees_with_the_loaded_encoder(saved, key):
    """The same saved model two ways: loaded with ``hf:DIR`` and recorded by AttentionRecorder, and recorded in place
    by HFAttentionRecorder in its own ``transformers`` forward: the same fields, the same statistics."""
    from beyond_cls.analysis.hf_recorder import HFAttentionRecorder

    folder, base = saved[key]
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    enc = load_encoder(f"hf:{folder}", img_size=32)
    with torch.no_grad(), AttentionRecorder(enc) as ours:
        enc.forward_features(images)
    keep_order = "noise" in inspect.signature(base.forward).parameters  # ViT-MAE: ascending noise, patches in order
    kwargs = {"noise": torch.arange(16.0).expand(3, 16)} if keep_order else {}
    with torch.no_grad(), HFAttentionRecorder(base) as in_place:
        base(pixel_values=images, **kwargs)
    assert base.config._attn_implementation == "eager"  # restored
    a, b = ours.summary().fields(), in_place.summary().fields()
    assert set(a) == set(b) and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@needs_hf
def test_hf_normalization_and_notes(saved):
    dinov2 = load_encoder(f"hf:{saved['dinov2'][0]}", img_size=32).beyond_cls_info
    assert dinov2.mean == (0.485, 0.456, 0.406) and dinov2.std == (0.229, 0.224, 0.225)
    assert "mask token dropped (not used by the encoder)" in dinov2.notes
    mae = load_encoder(f"hf:{saved['vit_mae'][0]}", img_size=32).beyond_cls_info
    assert mae.mean is None and mae.std is None  # no preprocessor_config.json: the commands' default
    assert "task head dropped: decoder.*" in mae.notes
    assert mae.checkpoint.endswith("model.safetensors")


@needs_hf
def test_hf_sharded_folder_loads_the_same(saved, tmp_path):
    folder, base = saved["deit"]
    base.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    whole = load_encoder(f"hf:{folder}", img_size=32).state_dict()
    sharded = load_encoder(f"hf:{tmp_path}", img_size=32).state_dict()
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)


@needs_hf
def test_analyze_accepts_hf_and_records_its_normalization(saved, tmp_path):
    data = make_synthetic_dataset(tmp_path / "set", SyntheticConfig(num_classes=2, train_per_class=0, val_per_class=2,
                                                                   image_size=32, object_size=(8, 12)))
    out = tmp_path / "run"
    args = ["analyze", "--model", f"hf:{saved['dinov2'][0]}", "--data", str(data), "--out", str(out), "--img-size",
            "32", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    encoder = json.loads((out / "analyze_config.json").read_text())["encoder"]
    assert encoder["checkpoint_format"] == "hf:dinov2" and encoder["mean"] == [0.485, 0.456, 0.406]
    assert "image_mean/image_std from preprocessor_config.json" in encoder["notes"]


@needs_hf
def test_hf_wrong_keys_are_one_error(saved, tmp_path):
    folder = saved["vit"][0]
    sd = load_file(str(folder / "model.safetensors"))
    del sd["encoder.layer.1.layernorm_before.weight"]
    sd["encoder.layer.0.attention.attention.gate.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        load_encoder(f"hf:{tmp_path}", img_size=32)
    assert err.value.missing == ("blocks.1.norm1.weight",)
    assert err.value.unexpected == ("encoder.layer.0.attention.attention.gate.weight",)
    assert "missing keys (1): blocks.1.norm1.weight" in str(err.value)


@needs_hf
def test_hf_hub_id_from_the_local_cache_only(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_encoder("hf:someorg/absent-vit", img_size=32)
    message = str(err.value)
    assert "not in the local hub cache" in message and str(tmp_path) in message and "\n" not in message
    snapshot = tmp_path / "models--someorg--tiny-vit" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((saved["vit"][0] / name).read_bytes())
    (tmp_path / "models--someorg--tiny-vit" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-vit" / "refs" / "main").write_text("0123abcd")
    enc = load_encoder("hf:someorg/tiny-vit", img_size=32)
    assert enc.beyond_cls_info.name == "hf:someorg/tiny-vit" and enc.beyond_cls_info.depth == 2


@needs_hf
def test_hf_without_transformers_says_how_to_install(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError) as err:
        load_encoder(f"hf:{saved['vit'][0]}", img_size=32)
    assert str(err.value) == ("--model hf:PATH needs the optional dependency transformers: "
                              "pip install 'beyond-cls[hf]'")


@needs_hf
def test_hf_bad_requests_are_one_line(saved, tmp_path):
    folder = saved["vit"][0]
    with pytest.raises(ValueError, match="brings its own weights and architecture: drop --checkpoint, --arch"):
        load_encoder(f"hf:{folder}", checkpoint="x.pth", arch="vit_base_patch16_224")
    with pytest.raises(CheckpointError, match="no such folder"):
        load_encoder(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_encoder(f"hf:{tmp_path}")
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "swin"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "swin"}))
    (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model_type 'swin' is not supported; supported: vit, deit, vit_mae"):
        load_encoder(f"hf:{other}")
    assert config["model_type"] == "vit"


def test_hf_extra_is_declared():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert 'hf = ["transformers>=' in text
    assert '-e ".[dev,hf]"' in (Path(__file__).parents[2] / "Makefile").read_text()
