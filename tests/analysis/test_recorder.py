"""AttentionRecorder against timm's own materialized attention, on random timm models."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from beyond_cls import _extension
from beyond_cls.analysis import AttentionRecorder, AttentionSummary

MODELS = {
    "vit": ("vit_tiny_patch16_224", {}),
    "vit_no_cls": ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
    "vit_reg4": ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    "vit_reg4_no_cls": ("vit_tiny_patch16_224", {"reg_tokens": 4, "class_token": False, "global_pool": "avg"}),
    "vit_qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
    "beit_rel_pos": ("beitv2_base_patch16_224", {"embed_dim": 192, "num_heads": 3}),
    "beit_shared_rel_pos": (
        "beit_base_patch16_224",
        {"embed_dim": 192, "num_heads": 3, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True},
    ),
    "eva_rope": ("eva02_tiny_patch14_224", {"img_size": 112}),
}
BACKENDS = ["reference"] + (["cpp"] if _extension.available() else [])


def make_model(key: str, dtype=torch.float64) -> torch.nn.Module:
    """A small random model whose attention rows range from flat to peaked."""
    name, kwargs = MODELS[key]
    model = timm.create_model(name, pretrained=False, num_classes=0, depth=2, **kwargs)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("qkv.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(6.0)  # sharpen attention so the statistics are far from uniform
            elif "relative_position_bias_table" in pname or pname.endswith(("q_bias", "v_bias")):
                p.normal_(0.0, 1.0)
    return model.eval().to(dtype)


def materialized_attention(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """The attention matrices [B, H, N, N] of every block from timm's unfused path (caught after softmax)."""
    maps: list[torch.Tensor] = []
    attns = [m for m in model.modules() if hasattr(m, "attn_drop") and hasattr(m, "fused_attn")]
    hooks = [m.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out)) for m in attns]
    fused = [m.fused_attn for m in attns]
    for m in attns:
        m.fused_attn = False
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
        for m, f in zip(attns, fused):
            m.fused_attn = f
    return maps


def materialized_summary(model: torch.nn.Module, images: torch.Tensor, prefix: int, has_cls: bool) -> dict:
    """Statistics from the attention matrices timm's unfused path computes."""
    out: dict[str, list] = {}
    for a in materialized_attention(model, images):  # [B, H, N, N]
        n = a.shape[-1]
        idx = torch.arange(n)
        mass = a[..., prefix:].sum(-1)
        norm = a[..., prefix:] / mass[..., None]
        ent = -torch.special.xlogy(norm, norm).sum(-1)
        diag = a[..., idx, idx]
        stats = {
            "patch_self": (diag / mass)[..., prefix:].mean(-1).mean(0),
            "patch_patch_entropy": ent[..., prefix:].mean(-1).mean(0),
        }
        if has_cls:
            stats |= {
                "cls_self": a[:, :, 0, 0].mean(0),
                "cls_patch_entropy": ent[:, :, 0].mean(0),
                "cls_patch_mass": mass[:, :, 0].mean(0),
                "patch_cls": a[:, :, prefix:, 0].mean(-1).mean(0),
            }
        for k, v in stats.items():
            out.setdefault(k, []).append(v)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", list(MODELS))
def test_recorder_matches_materialized_attention(key, backend, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    model = make_model(key)
    images = torch.randn(3, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1], dtype=torch.float64)
    with torch.no_grad():
        plain = model.forward_features(images)
        with AttentionRecorder(model) as rec:
            recorded = model.forward_features(images)
    # float64 end to end with the reference; the C++ op accumulates in float64 too, stats rounded to float32
    tol = 1e-10 if backend == "reference" else 2e-6
    torch.testing.assert_close(recorded, plain, rtol=tol, atol=tol)

    summary = rec.summary()
    want = materialized_summary(model, images, rec.num_prefix_tokens, rec.has_class_token)
    assert summary.num_images == 3
    assert summary.num_blocks == 2 and summary.num_heads == model.blocks[0].attn.num_heads
    assert set(summary.fields()) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(getattr(summary, name), value, rtol=tol, atol=tol, msg=name)
    # the statistics are not trivially uniform for these models
    assert summary.patch_patch_entropy.min() < 0.95 * summary.max_entropy


@pytest.mark.parametrize("key", ["vit_reg4", "beit_rel_pos", "eva_rope"])
def test_recorder_with_triton_kernel(key, monkeypatch):
    """The Triton kernel (interpreted on CPU, compiled on GPU) drives the recorder like the reference."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(key, torch.float32).to(device)
    images = torch.randn(2, 3, *model.patch_embed.img_size, device=device)
    summaries = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
        with AttentionRecorder(model) as rec, torch.no_grad():
            summaries[backend] = (model.forward_features(images), rec.summary())
    (ref_out, ref), (tri_out, tri) = summaries["reference"], summaries["triton"]
    torch.testing.assert_close(tri_out, ref_out, rtol=1e-4, atol=1e-4)
    for name, value in ref.fields().items():
        torch.testing.assert_close(tri.fields()[name], value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key", ["vit", "vit_reg4", "beit_rel_pos"])
def test_recorder_kept_rows_are_rows_of_materialized_attention(key, backend, monkeypatch):
    """kept_rows[block] are timm's own attention rows; recording them changes no statistic or output."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    model = make_model(key)
    images = torch.randn(2, 3, *model.patch_embed.img_size, dtype=torch.float64)
    with torch.no_grad(), AttentionRecorder(model) as plain:
        plain_out = model.forward_features(images)
    prefix = plain.num_prefix_tokens
    central = prefix + model.patch_embed.num_patches // 2 + model.patch_embed.grid_size[1] // 2
    keep = {0: (prefix - 1,), -1: (0, central, -1)}  # [cls] (or the last register) of block 0; last block
    with torch.no_grad(), AttentionRecorder(model, keep_rows=keep) as rec:
        out = model.forward_features(images)
    assert torch.equal(out, plain_out)
    summary, want_summary = rec.summary(), plain.summary()
    for name, value in want_summary.fields().items():
        assert torch.equal(summary.fields()[name], value), name

    maps = materialized_attention(model, images)
    n = maps[0].shape[-1]
    assert sorted(rec.kept_rows) == [0, 1] and rec.kept_rows[-1] is rec.kept_rows[1]
    tol = 1e-10 if backend == "reference" else 2e-6
    for block, rows in ((0, [prefix - 1]), (1, [0, central, n - 1])):
        kept = rec.kept_rows[block]
        assert kept.shape == (2, model.blocks[0].attn.num_heads, len(rows), n)
        assert kept.dtype == (torch.float64 if backend == "reference" else torch.float32)
        torch.testing.assert_close(kept.double(), maps[block][:, :, rows, :], rtol=tol, atol=tol, msg=str(block))


def test_recorder_keeps_the_last_batch_only(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    model = make_model("vit", torch.float32)
    images = torch.randn(5, 3, 224, 224)
    with torch.no_grad(), AttentionRecorder(model, keep_rows=(0, 105)) as rec:  # bare indices: the last block
        model.forward_features(images[:3])
        model.forward_features(images[3:])
    assert list(rec.kept_rows) == [1]
    want = materialized_attention(model, images[3:])[1][:, :, [0, 105]]
    torch.testing.assert_close(rec.kept_rows[-1], want, rtol=1e-5, atol=1e-6)
    assert rec.summary().num_images == 5  # the statistics still accumulate over both batches
    rec.reset()
    assert not rec.kept_rows
    with pytest.raises(KeyError, match="no kept rows recorded for block -1"):
        rec.kept_rows[-1]


def test_recorder_rejects_bad_keep_rows():
    model = make_model("vit", torch.float32)
    with pytest.raises(ValueError, match="block 2 is outside"):
        AttentionRecorder(model, keep_rows={2: (0,)})
    with pytest.raises(TypeError, match="sequence of query indices"):
        AttentionRecorder(model, keep_rows={0: 0})
    with AttentionRecorder(model, keep_rows=(0, 197)) as rec, pytest.raises(ValueError, match="outside"):
        model.forward_features(torch.randn(1, 3, 224, 224))
    assert not rec.kept_rows


def test_recorder_kept_rows_with_triton_kernel(monkeypatch):
    """The Triton kernel's kept rows (interpreted on CPU, compiled on GPU) match the reference's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model("beit_rel_pos", torch.float32).to(device)
    images = torch.randn(1, 3, *model.patch_embed.img_size, device=device)  # one image: the interpreter is slow
    keep = {0: (0, 106), 1: (-1,)}
    kept = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
        with AttentionRecorder(model, keep_rows=keep) as rec, torch.no_grad():
            model.forward_features(images)
        kept[backend] = dict(rec.kept_rows)
    for block in (0, 1):
        assert kept["triton"][block].device.type == device
        torch.testing.assert_close(kept["triton"][block], kept["reference"][block], rtol=1e-5, atol=1e-6)


def test_prefix_layout_is_read_from_the_model():
    expected = {"vit": (1, True), "vit_no_cls": (0, False), "vit_reg4": (5, True), "vit_reg4_no_cls": (4, False)}
    for key, (prefix, has_cls) in expected.items():
        rec = AttentionRecorder(make_model(key, torch.float32))
        assert (rec.num_prefix_tokens, rec.has_class_token) == (prefix, has_cls), key
    summary_fields = {"patch_self", "patch_patch_entropy"}
    model = make_model("vit_reg4_no_cls", torch.float32)
    with AttentionRecorder(model) as rec:
        model.forward_features(torch.randn(1, 3, 224, 224))
    summary = rec.summary()
    assert set(summary.fields()) == summary_fields and summary.cls_self is None
    assert summary.num_patches == 196 and summary.max_entropy == pytest.approx(math.log(196))


def test_float32_outputs_unchanged_with_default_backend(monkeypatch):
    monkeypatch.delenv("BEYOND_CLS_BACKEND", raising=False)
    for key in ("vit", "beit_rel_pos", "eva_rope"):
        model = make_model(key, torch.float32)
        images = torch.randn(2, 3, *model.patch_embed.img_size)
        with torch.no_grad():
            plain = model.forward_features(images)
            with AttentionRecorder(model):
                recorded = model.forward_features(images)
        torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-4, msg=key)


class _Float32Norm(torch.nn.Module):
    """A q/k norm as CUDA autocast runs it: layer_norm is on CUDA autocast's float32 list, so q and k come out
    float32 next to a bf16 v (CPU autocast keeps LayerNorm in bf16, so this wrapper stands in for it)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.norm(x.float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_under_autocast_hands_the_op_one_dtype(backend, monkeypatch):
    from beyond_cls import ops

    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    model = make_model("vit_qk_norm", torch.float32)
    for block in model.blocks:
        block.attn.q_norm, block.attn.k_norm = _Float32Norm(block.attn.q_norm), _Float32Norm(block.attn.k_norm)
    seen = []
    op = ops.attention_with_stats

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return op(q, k, v, *args, **kwargs)

    monkeypatch.setattr(ops, "attention_with_stats", spy)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model.forward_features(images)  # timm's SDPA casts q, k, v to bf16 itself
        with AttentionRecorder(model) as rec:
            recorded = model.forward_features(images)
    assert seen == [(torch.bfloat16,) * 3] * 2
    torch.testing.assert_close(recorded.float(), plain.float(), rtol=5e-2, atol=5e-2)
    assert rec.summary().num_images == 2


def test_modules_restored_after_exception():
    model = make_model("vit", torch.float32)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model.forward_features(images)
    rec = AttentionRecorder(model)
    with pytest.raises(KeyError, match="boom"), rec:
        assert all("forward" in m.__dict__ for _, m in rec.modules)
        raise KeyError("boom")
    assert all("forward" not in m.__dict__ for _, m in rec.modules)
    with torch.no_grad():
        assert torch.equal(model.forward_features(images), before)


def test_batches_accumulate_like_one_batch(monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", "reference")
    model = make_model("vit_reg4")
    images = torch.randn(5, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        with AttentionRecorder(model) as split:
            model.forward_features(images[:3])
            model.forward_features(images[3:])
        with AttentionRecorder(model) as whole:
            model.forward_features(images)
    a, b = split.summary(), whole.summary()
    assert a.num_images == b.num_images == 5
    for name, value in b.fields().items():
        torch.testing.assert_close(a.fields()[name], value, rtol=1e-12, atol=1e-14)


def test_summary_before_any_image_and_length_change_are_errors():
    model = make_model("vit", torch.float32)
    rec = AttentionRecorder(model)
    with pytest.raises(RuntimeError, match="run the model first"):
        rec.summary()
    model224 = make_model("vit", torch.float32)
    with AttentionRecorder(model224) as rec, torch.no_grad():
        model224.forward_features(torch.randn(1, 3, 224, 224))
        model224.set_input_size(img_size=(112, 112)) if hasattr(model224, "set_input_size") else None
        with pytest.raises(ValueError, match="sequence length changed"):
            model224.forward_features(torch.randn(1, 3, 112, 112))


def test_unsupported_model_is_rejected():
    with pytest.raises(TypeError, match="no attention module"):
        AttentionRecorder(torch.nn.Sequential(torch.nn.Linear(4, 4)), 1, True, "mlp")
    with pytest.raises(TypeError, match="not a ViT-style timm model"):
        AttentionRecorder(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_summary_save_load_and_table(tmp_path):
    model = make_model("vit", torch.float32)
    with AttentionRecorder(model, name="tiny") as rec, torch.no_grad():
        model.forward_features(torch.randn(2, 3, 224, 224))
    summary = rec.summary()
    path = summary.save(tmp_path / "sub" / "stats.json")
    loaded = AttentionSummary.load(path)
    assert loaded.num_images == 2 and loaded.model == "tiny" and loaded.num_patches == 196
    for name, value in summary.fields().items():
        assert torch.equal(loaded.fields()[name], value), name
    per_block = summary.per_block()
    assert per_block["cls_self"].shape == (2,)
    torch.testing.assert_close(per_block["cls_self"], summary.cls_self.mean(1))
    table = str(summary)
    assert "cls-patch H" in table and "mean" in table
    assert len(table.splitlines()) == 3 + 2 + 2
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        AttentionSummary.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        AttentionSummary.load(tmp_path / "missing.json")


@pytest.mark.gpu
def test_recorder_keeps_sums_on_the_gpu():
    model = make_model("vit", torch.float32).cuda()
    with AttentionRecorder(model) as rec, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.forward_features(torch.randn(4, 3, 224, 224, device="cuda"))
    assert all(t.device.type == "cuda" and t.dtype == torch.float64 for t in rec._sums)
    assert rec.summary().num_images == 4
