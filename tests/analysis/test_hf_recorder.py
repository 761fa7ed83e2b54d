"""HFAttentionRecorder on small random transformers models, against their own eager attention probabilities."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from beyond_cls import _extension
from beyond_cls.analysis import AttentionRecorder
from beyond_cls.analysis.hf_recorder import _ACTIVE, IMPLEMENTATION, HFAttentionRecorder, require_transformers

transformers = pytest.importorskip("transformers")

COMMON = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3, "image_size": 32, "patch_size": 4}
BIASES = {"use_relative_position_bias": True, "use_shared_relative_position_bias": True}
FAMILIES = {  # key -> (config class, model class, config kwargs, (prefix tokens, has [cls]))
    "vit": ("ViTConfig", "ViTModel", {"intermediate_size": 96}, (1, True)),
    "deit": ("DeiTConfig", "DeiTModel", {"intermediate_size": 96}, (2, True)),
    "vit_mae": ("ViTMAEConfig", "ViTMAEModel", {"intermediate_size": 96, "mask_ratio": 0.0}, (1, True)),
    "dinov2": ("Dinov2Config", "Dinov2Model", {"mlp_ratio": 2}, (1, True)),
    "dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                   {"mlp_ratio": 2, "num_register_tokens": 4}, (5, True)),
    "ijepa": ("IJepaConfig", "IJepaModel", {"intermediate_size": 96}, (0, False)),
    "beit": ("BeitConfig", "BeitModel", {"intermediate_size": 96, **BIASES}, (1, True)),
    "data2vec": ("Data2VecVisionConfig", "Data2VecVisionModel", {"intermediate_size": 96, **BIASES}, (1, True)),
}
DEFAULT_BACKEND = "cpp" if _extension.available() else "reference"
PATCHES = (32 // 4) ** 2


def make_model(key: str, **config_kwargs) -> torch.nn.Module:
    """A random float32 model whose attention ranges from flat to peaked (and whose position biases are not 0)."""
    config_name, model_name, kwargs, _ = FAMILIES[key]
    config = getattr(transformers, config_name)(**COMMON, **(kwargs | config_kwargs))
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "query.weight", "key.weight")):
                p.normal_(0.0, 0.25)
            elif "relative_position_bias_table" in name:
                p.normal_(0.0, 1.0)
    return model


def inputs(key: str, batch: int = 2) -> dict:
    """Pixel values (and, for ViT-MAE, the noise that keeps the patch order: its default noise shuffles)."""
    kwargs = {"pixel_values": torch.randn(batch, 3, 32, 32)}
    if key == "vit_mae":
        kwargs["noise"] = torch.arange(PATCHES, dtype=torch.float32).expand(batch, -1)
    return kwargs


def eager_run(model: torch.nn.Module, kwargs: dict):
    """The model's outputs and attention probabilities [B, H, N, N] per block from its eager twin (same weights)."""
    twin = type(model)._from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = twin(**kwargs, output_attentions=True)
    assert len(out.attentions) == COMMON["num_hidden_layers"]
    return out.last_hidden_state, out.attentions


def reference_summary(attentions, prefix: int, has_cls: bool) -> dict[str, torch.Tensor]:
    """The attention statistics (docs/statistics.md) [blocks, heads] in float64 from materialized probabilities."""
    out: dict[str, list] = {}
    for a in attentions:
        a = a.double()
        idx = torch.arange(a.shape[-1])
        mass = a[..., prefix:].sum(-1)
        norm = a[..., prefix:] / mass[..., None]
        ent = -torch.special.xlogy(norm, norm).sum(-1)
        stats = {
            "patch_self": (a[..., idx, idx] / mass)[..., prefix:].mean((0, 2)),
            "patch_patch_entropy": ent[..., prefix:].mean((0, 2)),
        }
        if has_cls:
            stats |= {
                "cls_self": a[:, :, 0, 0].mean(0),
                "cls_patch_entropy": ent[:, :, 0].mean(0),
                "cls_patch_mass": mass[:, :, 0].mean(0),
                "patch_cls": a[:, :, prefix:, 0].mean((0, 2)),
            }
        for k, v in stats.items():
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


def check_summary(summary, want: dict, tol: float) -> None:
    assert set(summary.fields()) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(summary.fields()[name], value, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_in_place_statistics_match_eager_attention(key, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", DEFAULT_BACKEND)
    model = make_model(key)
    kwargs = inputs(key)
    implementation = model.config._attn_implementation
    with torch.no_grad():
        plain = model(**kwargs).last_hidden_state
        with HFAttentionRecorder(model) as rec:
            assert key == "data2vec" or model.config._attn_implementation == IMPLEMENTATION
            recorded = model(**kwargs).last_hidden_state
    assert model.config._attn_implementation == implementation
    assert not _ACTIVE and all("forward" not in m.__dict__ for _, m in rec.modules)
    eager_out, attentions = eager_run(model, kwargs)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recorded, eager_out, rtol=1e-5, atol=1e-5)

    prefix, has_cls = FAMILIES[key][3]
    assert (rec.num_prefix_tokens, rec.has_class_token) == (prefix, has_cls)
    summary = rec.summary()
    assert summary.num_images == 2 and summary.num_patches == PATCHES
    assert summary.num_blocks == 2 and summary.num_heads == 3
    check_summary(summary, reference_summary(attentions, prefix, has_cls), 1e-5)
    assert summary.patch_patch_entropy.min() < 0.95 * summary.max_entropy  # not trivially uniform


def test_reference_backend_with_relative_position_bias_and_a_padding_mask(monkeypatch):
    """BEiT's biases and an attention_mask (made into eager's additive mask for the fused op) add up as in eager."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    model = make_model("beit")
    kwargs = inputs("beit")
    kwargs["attention_mask"] = torch.ones(2, 1 + PATCHES, dtype=torch.long)
    kwargs["attention_mask"][0, -5:] = 0  # the last 5 patch keys of image 0 are masked out
    with torch.no_grad(), HFAttentionRecorder(model) as rec:
        recorded = model(**kwargs).last_hidden_state
    eager_out, attentions = eager_run(model, kwargs)
    assert attentions[0][0, :, :, -5:].max() == 0 and attentions[0][1, :, :, -5:].min() > 0
    torch.testing.assert_close(recorded, eager_out, rtol=1e-5, atol=1e-5)
    check_summary(rec.summary(), reference_summary(attentions, 1, True), 1e-5)


def test_mae_patch_order_does_not_change_the_statistics(monkeypatch):
    """ViT-MAE shuffles its patches even with mask_ratio 0 unless noise is given; the statistics are averages over
    patch queries, so they do not depend on the order (kept rows of patch queries do)."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", DEFAULT_BACKEND)
    model = make_model("vit_mae")
    kwargs = inputs("vit_mae")
    summaries = []
    for run_kwargs in (kwargs, {"pixel_values": kwargs["pixel_values"]}):
        with torch.no_grad(), HFAttentionRecorder(model) as rec:
            model(**run_kwargs)
        summaries.append(rec.summary())
    check_summary(summaries[1], summaries[0].fields(), 1e-5)


def test_kept_rows_are_rows_of_eager_attention(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", DEFAULT_BACKEND)
    model = make_model("dinov2_reg")
    kwargs = inputs("dinov2_reg")
    central = 5 + PATCHES // 2 + 4
    with torch.no_grad(), HFAttentionRecorder(model, keep_rows={0: (4,), -1: (0, central, -1)}) as rec:
        model(**kwargs)
    _, attentions = eager_run(model, kwargs)
    for block, rows in ((0, [4]), (1, [0, central, 5 + PATCHES - 1])):
        torch.testing.assert_close(rec.kept_rows[block], attentions[block][:, :, rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["vit", "data2vec"])
def test_attention_weights_are_refused_and_everything_is_restored(key):
    model = make_model(key, attn_implementation="eager")
    kwargs = inputs(key, batch=1)
    rec = HFAttentionRecorder(model)
    with pytest.raises(ValueError, match="does not produce attention weights"), torch.no_grad(), rec:
        with pytest.raises(RuntimeError, match="already being recorded"):
            HFAttentionRecorder(model).__enter__()
        model(**kwargs, output_attentions=True)
    assert model.config._attn_implementation == "eager" and not _ACTIVE
    assert all("forward" not in m.__dict__ for _, m in rec.modules)
    with torch.no_grad():
        assert len(model(**kwargs, output_attentions=True).attentions) == 2  # eager attention works again


def test_bad_models_and_missing_transformers_are_one_line_errors(monkeypatch):
    vit = make_model("vit")
    with pytest.raises(TypeError, match="HFAttentionRecorder"):
        AttentionRecorder(vit)
    with pytest.raises(TypeError, match="not a transformers PreTrainedModel"):
        HFAttentionRecorder(torch.nn.Linear(2, 2))
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(TypeError, match="'resnet' is not supported; supported: vit, deit"):
        HFAttentionRecorder(resnet)
    masking = make_model("vit_mae", mask_ratio=0.75)
    with pytest.raises(ValueError, match="set model.config.mask_ratio = 0.0"), HFAttentionRecorder(masking):
        pass
    assert masking.config._attn_implementation == "sdpa"
    vit.set_attn_implementation(IMPLEMENTATION)  # the registered name outside a recorder
    with pytest.raises(RuntimeError, match="runs only inside HFAttentionRecorder"), torch.no_grad():
        vit(**inputs("vit", batch=1))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'beyond-cls\[hf\]'"):
        require_transformers()
