"""The CAPI encoder port against a from-scratch reading of facebookresearch/capi ``model.py``."""

from __future__ import annotations

import math

import pytest
import torch

from beyond_cls import _extension, ops
from beyond_cls.analysis import AttentionRecorder
from beyond_cls.models import CheckpointError, adapt_checkpoint, create_encoder, encoder_info
from beyond_cls.models.architectures import architecture_of, attention_adapter
from beyond_cls.models.architectures.capi import CapiAttention, CapiVisionTransformer, capi_vit_large_patch14
from beyond_cls.models.formats.capi import CAPI_CHECKPOINT_FORMAT, adapt_capi_state_dict
from beyond_cls.probe.features import TokenSource

BACKENDS = ["reference"] + (["cpp"] if _extension.available() else [])
PATCH, DIM, HEADS, DEPTH = 4, 40, 2, 2  # head dim 20: divisible by 4, not a power of two

# ViT-L/14 with 16 registers, counted from the architecture (no biases except the patch conv):
#   patch conv 1024*3*14*14 + 1024 = 603,136; registers 16*1024 = 16,384
#   per block: 2 RMSNorm weights 2*1024; q, k, v, proj 4*1024^2; rope.freqs 2*64; fc1 + fc2 2*1024*4096
#            = 2,048 + 4,194,304 + 128 + 8,388,608 = 12,585,088; 24 blocks = 302,042,112
#   enc_norm has no parameters                                  -> 302,661,632 (CAPI README: "302M")
VIT_L_PARAMS = 603_136 + 16_384 + 24 * 12_585_088


# ------------------------------------------------------------------------------------ reference


def official_layout(dim: int, depth: int, heads: int, registers: int, patch: int, dec_depth: int = 1) -> dict:
    """Key -> shape of the released file: EncoderDecoder's state dict under ``backbone.`` + the head."""
    hd = dim // heads
    shapes = {"backbone.mask_token": (1, dim), "backbone.registers": (1, registers, dim)}
    shapes |= {"backbone.patch_embed.weight": (dim, 3, patch, patch), "backbone.patch_embed.bias": (dim,)}
    for part, n in (("encoder", depth), ("decoder", dec_depth)):
        for i in range(n):
            b = f"backbone.{part}.blocks.{i}."
            shapes[b + "residual1.norm.weight"] = (dim,)
            for proj in ("q_proj", "k_proj", "v_proj", "proj"):
                shapes[b + f"residual1.fn.{proj}.weight"] = (dim, dim)
            shapes[b + "residual1.fn.rope.freqs"] = (2, hd)
            shapes[b + "residual2.norm.weight"] = (dim,)
            shapes[b + "residual2.fn.fc1.weight"] = (4 * dim, dim)
            shapes[b + "residual2.fn.fc2.weight"] = (dim, 4 * dim)
    shapes |= {"head.last_layer.weight_g": (16, 1), "head.last_layer.weight_v": (16, dim)}
    return shapes


def random_official_file(registers: int = 16, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """A small CAPI file with random weights: sharp attention, dense (not block) RoPE frequencies."""
    sd = {}
    for key, shape in official_layout(DIM, DEPTH, HEADS, registers, PATCH).items():
        t = torch.randn(shape, dtype=dtype)
        if key.endswith("norm.weight"):
            t = 1 + 0.3 * t
        elif key.endswith("rope.freqs"):
            t = 4 * t
        elif key.endswith(("q_proj.weight", "k_proj.weight")):
            t = t * 1.5 / math.sqrt(shape[1])
        elif key.endswith(".weight") and len(shape) == 2:
            t = t / math.sqrt(shape[1])
        sd[key] = t
    return sd


def reference_capi(sd: dict, images: torch.Tensor, heads: int, eps: float = 1e-5):
    """CAPI's encoder written out with plain tensor ops; returns normed tokens and attention maps.

    Tokens: registers, then patches row-major. Patch (i, j) sits at (linspace(0,1,rows)[i],
    linspace(0,1,cols)[j]); the r = 4s registers walk the border (t,0), (1,t), (1-t,1), (0,1-t),
    t = k/s, mapped into the patches' bounding box. RoPE: theta = pos_0 f_0 + pos_1 f_1 per channel,
    channel c rotated with channel c + d/2.
    """
    w = sd["backbone.patch_embed.weight"]
    p = w.shape[-1]
    b = images.shape[0]
    rows, cols = images.shape[2] // p, images.shape[3] // p
    patches = []
    for i in range(rows):
        for j in range(cols):
            pix = images[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(b, -1)
            patches.append(pix @ w.reshape(w.shape[0], -1).T + sd["backbone.patch_embed.bias"])
    regs = sd["backbone.registers"]
    x = torch.cat([regs.expand(b, -1, -1), torch.stack(patches, dim=1)], dim=1)

    lin_r = [i / (rows - 1) if rows > 1 else 0.0 for i in range(rows)]
    lin_c = [j / (cols - 1) if cols > 1 else 0.0 for j in range(cols)]
    patch_pos = [(lin_r[i], lin_c[j]) for i in range(rows) for j in range(cols)]
    s = regs.shape[1] // 4
    border = [(k / s, 0.0) for k in range(s)] + [(1.0, k / s) for k in range(s)]
    border += [(1 - k / s, 1.0) for k in range(s)] + [(0.0, 1 - k / s) for k in range(s)]
    lo = [min(q[a] for q in patch_pos) for a in (0, 1)]
    hi = [max(q[a] for q in patch_pos) for a in (0, 1)]
    reg_pos = [(lo[0] + u * (hi[0] - lo[0]), lo[1] + v * (hi[1] - lo[1])) for u, v in border]
    pos = torch.tensor(reg_pos + patch_pos, dtype=x.dtype)

    def rms(t, weight=None):
        t = t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps)
        return t if weight is None else t * weight

    def rope(t, freqs):
        theta = pos[:, 0:1] * freqs[0] + pos[:, 1:2] * freqs[1]  # [N, d]
        half = t.shape[-1] // 2
        c, sn = torch.cos(theta), torch.sin(theta)
        t1, t2 = t[..., :half], t[..., half:]
        return torch.cat([t1 * c[:, :half] - t2 * sn[:, :half], t2 * c[:, half:] + t1 * sn[:, half:]], dim=-1)

    n, d = x.shape[1], x.shape[2]
    hd = d // heads
    maps = []
    i = 0
    while f"backbone.encoder.blocks.{i}.residual1.norm.weight" in sd:
        k_ = f"backbone.encoder.blocks.{i}."
        h = rms(x, sd[k_ + "residual1.norm.weight"])
        q, k, v = (
            (h @ sd[k_ + f"residual1.fn.{m}.weight"].T).reshape(b, n, heads, hd).transpose(1, 2)
            for m in ("q_proj", "k_proj", "v_proj")
        )
        freqs = sd[k_ + "residual1.fn.rope.freqs"]
        q, k = rope(q, freqs), rope(k, freqs)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        maps.append(attn)
        x = x + (attn @ v).transpose(1, 2).reshape(b, n, d) @ sd[k_ + "residual1.fn.proj.weight"].T
        h = rms(x, sd[k_ + "residual2.norm.weight"]) @ sd[k_ + "residual2.fn.fc1.weight"].T
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ sd[k_ + "residual2.fn.fc2.weight"].T
        i += 1
    return rms(x), maps


def tiny_model(registers: int = 16, img_size=(3 * PATCH, 5 * PATCH), **kwargs) -> CapiVisionTransformer:
    return CapiVisionTransformer(
        img_size=img_size,
        patch_size=PATCH,
        embed_dim=DIM,
        depth=DEPTH,
        num_heads=HEADS,
        num_registers=registers,
        **kwargs,
    )


def loaded_tiny(registers: int = 16, **kwargs) -> tuple[CapiVisionTransformer, dict]:
    sd = random_official_file(registers)
    model = tiny_model(registers, **kwargs).double().eval()
    model.load_state_dict(adapt_capi_state_dict(sd), strict=True)
    return model, sd


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize(
    ("registers", "grid", "extra", "dynamic"),
    [
        (16, (3, 5), (0, 0), False),  # non-square grid at the built size
        (8, (5, 3), (3, 1), True),  # pixels beyond the last patch are ignored
        (4, (1, 4), (0, 2), True),  # one row: registers collapse onto it
    ],
)
def test_forward_matches_reference(registers, grid, extra, dynamic):
    model, sd = loaded_tiny(registers, img_size=(grid[0] * PATCH, grid[1] * PATCH), dynamic_img_size=dynamic)
    images = torch.randn(2, 3, grid[0] * PATCH + extra[0], grid[1] * PATCH + extra[1], dtype=torch.float64)
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = model(images)
    want, _ = reference_capi(sd, images, HEADS)
    assert tokens.shape == (2, registers + grid[0] * grid[1], DIM)
    torch.testing.assert_close(tokens, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pooled, want[:, registers:].mean(1), rtol=1e-10, atol=1e-10)


def test_rope_uses_stored_frequencies_and_positions():
    """Changing one layer's stored freqs changes the output; the built-in init is CAPI's formula."""
    model, sd = loaded_tiny()
    images = torch.randn(1, 3, 3 * PATCH, 5 * PATCH, dtype=torch.float64)
    sd["backbone.encoder.blocks.1.residual1.fn.rope.freqs"] = torch.randn(2, DIM // HEADS, dtype=torch.float64)
    model.load_state_dict(adapt_capi_state_dict(sd), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), reference_capi(sd, images, HEADS)[0])
    freqs = tiny_model().blocks[0].attn.rope.freqs  # head dim 20 -> 5 frequencies per axis
    f1d = 7 * 1e4 ** -torch.linspace(0, 1, 5) * 2 * math.pi
    torch.testing.assert_close(freqs[0, :10], torch.cat([f1d, f1d]).float())
    torch.testing.assert_close(freqs[1, 10:], torch.cat([f1d, f1d]).float())
    assert freqs[0, 10:].abs().sum() == 0 and freqs[1, :10].abs().sum() == 0


def test_official_layout_loads_strictly_and_extra_or_missing_keys_fail():
    sd = random_official_file()
    adapted = adapt_capi_state_dict(sd)
    assert not any(k.startswith(("backbone.", "decoder.", "head.")) or k == "mask_token" for k in adapted)
    model = tiny_model().double()
    assert model.load_state_dict(adapted, strict=True).missing_keys == []
    # the same through the checkpoint machinery (flat file, head.* dropped, format detected by the lead)
    via_format = adapt_checkpoint(sd, "capi.pth", CAPI_CHECKPOINT_FORMAT)
    assert via_format.keys() == adapted.keys()
    assert CAPI_CHECKPOINT_FORMAT.detect(sd) and not CAPI_CHECKPOINT_FORMAT.detect({"model": {}})

    missing = dict(adapted)
    del missing["encoder.blocks.1.residual1.fn.rope.freqs"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*encoder\.blocks\.1\.residual1\.fn\.rope\.freqs"):
        model.load_state_dict(missing, strict=True)
    extra = dict(adapted)
    extra["encoder.blocks.0.residual1.fn.q_proj.bias"] = torch.zeros(DIM, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*q_proj\.bias"):
        model.load_state_dict(extra, strict=True)
    wrapped = {k.replace("encoder.", "encoder._orig_mod.", 1): v for k, v in sd.items()}
    assert adapt_capi_state_dict(wrapped).keys() == adapted.keys()
    with pytest.raises(CheckpointError, match="not a CAPI checkpoint"):
        adapt_capi_state_dict({"model.pos_embed": torch.zeros(1)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_recorder_matches_reference_attention(backend, monkeypatch):
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    model, sd = loaded_tiny(16)
    images = torch.randn(3, 3, 3 * PATCH, 5 * PATCH, dtype=torch.float64)
    _, maps = reference_capi(sd, images, HEADS)
    p = 16
    with torch.no_grad():
        plain = model.forward_features(images)
        with AttentionRecorder(model) as rec:
            recorded = model.forward_features(images)
        again = model.forward_features(images)
    tol = 1e-10 if backend == "reference" else 2e-6
    torch.testing.assert_close(recorded, plain, rtol=tol, atol=tol)
    assert torch.equal(again, plain)  # forwards restored

    summary = rec.summary()
    assert (rec.num_prefix_tokens, rec.has_class_token) == (16, False)
    assert set(summary.fields()) == {"patch_self", "patch_patch_entropy"} and summary.cls_self is None
    assert (summary.num_blocks, summary.num_heads, summary.num_patches) == (DEPTH, HEADS, 15)
    assert summary.block_names == [f"encoder.blocks.{i}.residual1.fn" for i in range(DEPTH)]
    for i, a in enumerate(maps):
        mass = a[..., p:].sum(-1)
        cond = a[..., p:] / mass[..., None]
        ent = -torch.special.xlogy(cond, cond).sum(-1)
        diag = a.diagonal(dim1=-2, dim2=-1)
        torch.testing.assert_close(summary.patch_self[i], (diag / mass)[..., p:].mean((0, 2)), rtol=tol, atol=tol)
        torch.testing.assert_close(summary.patch_patch_entropy[i], ent[..., p:].mean((0, 2)), rtol=tol, atol=tol)
    assert summary.patch_patch_entropy.min() < 0.9 * summary.max_entropy  # far from uniform


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_rows_are_those_of_the_rotated_attention(backend, monkeypatch):
    """Per-row statistics (self, register-0, patch mass, patch entropy) from the adapter's q, k, v."""
    monkeypatch.setenv("BEYOND_CLS_BACKEND", backend)
    model, sd = loaded_tiny(8, img_size=(4 * PATCH, 3 * PATCH))
    images = torch.randn(2, 3, 4 * PATCH, 3 * PATCH, dtype=torch.float64)
    _, maps = reference_capi(sd, images, HEADS)
    inputs = []
    hooks = [blk.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args)) for blk in model.blocks]
    with torch.no_grad():
        model.forward_features(images)
    for h in hooks:
        h.remove()
    tol = 1e-10 if backend == "reference" else 2e-6
    p = model.num_prefix_tokens
    for blk, args, a in zip(model.blocks, inputs, maps):
        assert isinstance(blk.attn, CapiAttention)
        proj = attention_adapter(blk.attn).project(blk.attn, *args)
        with torch.no_grad():
            out, rows = ops.attention_with_stats(proj.q, proj.k, proj.v, p, blk.attn.scale, proj.bias)
            torch.testing.assert_close(out, a @ proj.v, rtol=tol, atol=tol)
        mass = a[..., p:].sum(-1)
        cond = a[..., p:] / mass[..., None]
        want = {
            "self_attn": a.diagonal(dim1=-2, dim2=-1),
            "cls_attn": a[..., 0],
            "patch_mass": mass,
            "patch_entropy": -torch.special.xlogy(cond, cond).sum(-1),
        }
        for name, value in want.items():
            torch.testing.assert_close(getattr(rows, name).double(), value, rtol=tol, atol=tol, msg=name)


def test_float32_recording_and_autocast():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 3 * PATCH, 5 * PATCH)
    with torch.no_grad():
        plain = model.forward_features(images)
        with AttentionRecorder(model):
            recorded = model.forward_features(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.forward_features(images)
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(low).all() and (low.float() - plain).abs().mean() < 0.1


def test_timm_view_and_token_source():
    model = tiny_model(global_pool="")
    info = encoder_info(model)
    assert (info.num_prefix_tokens, info.has_class_token, info.num_reg_tokens) == (16, False, 16)
    assert (info.grid_size, info.num_patches, info.embed_dim, info.num_heads, info.depth) == ((3, 5), 15, DIM, 2, 2)
    assert model.cls_token is None and model(torch.randn(1, 3, 12, 20)).shape == (1, 31, DIM)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        model.forward_features(torch.randn(1, 3, 16, 16))
    source = TokenSource(model, block=0, final_norm=False)  # truncates blocks and drops the norm in place
    assert len(model.encoder.blocks) == 1 and not any(k.startswith("blocks.") for k in model.state_dict())
    assert source(torch.randn(1, 3, 12, 20)).shape == (1, 31, DIM)


def test_vit_large_constructor_on_meta():
    with torch.device("meta"):
        model = capi_vit_large_patch14()
    assert sum(p.numel() for p in model.parameters()) == VIT_L_PARAMS == 302_661_632
    shapes = {k.removeprefix("backbone."): s for k, s in official_layout(1024, 24, 16, 16, 14, dec_depth=12).items()}
    kept = adapt_capi_state_dict(dict.fromkeys(official_layout(1024, 24, 16, 16, 14, dec_depth=12)))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: shapes[k] for k in kept}
    info = encoder_info(model)
    assert info.name == "capi_vit_large_patch14"
    assert (info.num_prefix_tokens, info.has_class_token, info.grid_size, info.num_heads, info.depth) == (
        16,
        False,
        (16, 16),
        16,
        24,
    )
    with pytest.raises(ValueError, match="downloads nothing"):
        capi_vit_large_patch14(pretrained=True)


def test_registered_as_the_capi_architecture():
    with torch.device("meta"):
        model = create_encoder("capi", img_size=28)
    assert isinstance(model, CapiVisionTransformer) and architecture_of(model).name == "capi"
    assert model.patch_embed.grid_size == (2, 2)
