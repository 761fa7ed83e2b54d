"""Checkpoint formats and architectures are registered by one module (or one call) each, and looked up."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import VisionTransformer

from beyond_cls.analysis import AttentionRecorder
from beyond_cls.models import (
    ARCHITECTURES,
    CHECKPOINT_FORMATS,
    Architecture,
    CheckpointFormat,
    load_encoder,
    register_architecture,
    register_checkpoint_format,
)
from beyond_cls.models.architectures import AttentionAdapter, architecture_of, attention_adapter
from beyond_cls.models.architectures.vit import project_vit

PACKAGE = Path(__file__).resolve().parents[2] / "beyond_cls"
VIT, TINY = "vit_tiny_patch16_224", {"depth": 2, "img_size": 64}

TOY_FORMAT = '''
from beyond_cls.models.formats import CheckpointFormat, register_checkpoint_format

register_checkpoint_format(
    CheckpointFormat(
        "toy",
        "{'toy_weights': trunk.* keys, 'epoch': N}",
        key="toy_weights",
        rename=(("trunk.", ""),),
        detect=lambda obj: isinstance(obj, dict) and "toy_weights" in obj,
    )
)
'''


@pytest.fixture
def restored_registries():
    """Whatever a test registers is gone afterwards."""
    formats, architectures = dict(CHECKPOINT_FORMATS), dict(ARCHITECTURES)
    yield
    for registry, saved in ((CHECKPOINT_FORMATS, formats), (ARCHITECTURES, architectures)):
        registry.clear()
        registry.update(saved)


def _source(**kwargs) -> torch.nn.Module:
    model = timm.create_model(VIT, pretrained=False, num_classes=0, **TINY, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model


def _features(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_features(x)


# ------------------------------------------------------------------------------------------ formats


def test_a_format_module_registers_itself_and_load_encoder_uses_it(tmp_path, monkeypatch, restored_registries):
    (tmp_path / "toy_format.py").write_text(TOY_FORMAT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_format", raising=False)
    importlib.import_module("toy_format")
    monkeypatch.delitem(sys.modules, "toy_format")
    assert "toy" in CHECKPOINT_FORMATS

    src = _source()
    path = tmp_path / "toy.pth"
    torch.save({"toy_weights": {f"trunk.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    for fmt in ("auto", "toy"):
        enc = load_encoder(VIT, path, checkpoint_format=fmt, **TINY)
        assert enc.beyond_cls_info.checkpoint_format == "toy"
        assert torch.equal(_features(enc), _features(src))


def test_a_registered_format_keeps_prefix_renames_drops_and_wins_by_priority(tmp_path, restored_registries):
    register_checkpoint_format(
        CheckpointFormat(
            "capi_like",
            "backbone.-prefixed flat dict with a head",
            keep_prefix="backbone.",
            rename=(("final_norm.", "norm."),),
            drop=("rope.*",),
            detect=lambda obj: isinstance(obj, dict) and "backbone.cls_token" in obj,
            priority=10,
        )
    )
    src = _source()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd = {k.replace("backbone.norm.", "backbone.final_norm."): v for k, v in sd.items()}
    sd |= {"head.weight": torch.zeros(3), "backbone.rope.freqs": torch.zeros(2)}
    path = tmp_path / "capi.pth"
    torch.save(sd, path)
    enc = load_encoder(VIT, path, **TINY)  # detected automatically
    assert torch.equal(_features(enc), _features(src))
    with pytest.raises(ValueError, match="already registered"):
        register_checkpoint_format(CheckpointFormat("mae", "dup"))


def _imported(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


# Who may import a plugin module besides its package's __init__: the Beit layout names Beit's shared table.
ALLOWED_IMPORTERS = {"formats": set(), "architectures": {"beyond_cls/models/formats/beit.py"}}


@pytest.mark.parametrize("package", sorted(ALLOWED_IMPORTERS))
def test_registries_import_no_plugin_and_only_the_package_imports_them(package):
    folder = PACKAGE / "models" / package
    shared = ("__init__", "registry", "common", "attention")
    plugins = {f"beyond_cls.models.{package}.{p.stem}" for p in folder.glob("*.py") if p.stem not in shared}
    assert len(plugins) >= 4, plugins
    assert not _imported(folder / "registry.py") & plugins
    importers = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path != folder / "__init__.py" and _imported(path) & plugins
    }
    assert importers <= ALLOWED_IMPORTERS[package]


# ------------------------------------------------------------------------------------- architectures


class ToyAttention(Attention):
    """A timm attention subclass: exact-class lookup must not take it for timm's own."""


class ToyViT(VisionTransformer):
    def __init__(self, img_size=64, num_classes=0, **kwargs) -> None:
        super().__init__(img_size=img_size, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                         num_classes=num_classes, attn_layer=ToyAttention, **kwargs)


def test_an_architecture_registered_by_one_call_is_built_loaded_and_recorded(tmp_path, restored_registries):
    src = ToyViT().eval()
    assert attention_adapter(src.blocks[0].attn) is None and architecture_of(src) is None
    with pytest.raises(ValueError, match="unknown timm model 'toy_vit'"):
        load_encoder("toy_vit")

    register_architecture(
        Architecture(
            "toy",
            models=(ToyViT,),
            attention={ToyAttention: AttentionAdapter(project_vit)},
            builders={"toy_vit": ToyViT},
        )
    )
    with pytest.raises(ValueError, match="already"):
        register_architecture(Architecture("toy2", builders={"toy_vit": ToyViT}))
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path / "toy.pth"
    torch.save(src.state_dict(), path)

    enc = load_encoder("toy_vit", path, img_size=64)
    assert type(enc) is ToyViT and architecture_of(enc).name == "toy"
    assert enc.beyond_cls_info.num_heads == 3 and torch.equal(_features(enc), _features(src))
    with AttentionRecorder(enc) as rec:
        recorded = _features(enc)
    torch.testing.assert_close(recorded, _features(src), rtol=1e-4, atol=1e-5)
    assert len(rec.modules) == 2 and rec.summary().cls_self.shape == (2, 3)


# ------------------------------------------------------------------------------------------ reloads

RELOAD = """
import importlib, pkgutil, sys
import timm, torch
import beyond_cls.models.architectures as architectures
import beyond_cls.models.formats as formats
from beyond_cls.analysis import AttentionRecorder
from beyond_cls.models import ARCHITECTURES, CHECKPOINT_FORMATS, load_encoder

families, layouts = sorted(ARCHITECTURES), sorted(CHECKPOINT_FORMATS)
shared = ("registry", "common", "attention")
for package in (architectures, formats):  # a family module again: it re-registers what it registered before
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in shared:
            importlib.reload(importlib.import_module(f"{package.__name__}.{info.name}"))
for name in ("beyond_cls.models.architectures.registry", "beyond_cls.models.formats.registry"):
    importlib.reload(sys.modules[name])  # the registry itself: the family modules do not run again
from beyond_cls.models.architectures import registry
from beyond_cls.models.formats import registry as format_registry
assert registry.ARCHITECTURES is ARCHITECTURES and sorted(ARCHITECTURES) == families, sorted(registry.ARCHITECTURES)
assert format_registry.CHECKPOINT_FORMATS is CHECKPOINT_FORMATS, sorted(format_registry.CHECKPOINT_FORMATS)
assert sorted(CHECKPOINT_FORMATS) == layouts, sorted(CHECKPOINT_FORMATS)

src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=64)
path = sys.argv[1]
torch.save({"model": src.state_dict(), "optimizer": {}, "epoch": 1}, path)  # MAE's layout: detected as 'mae'
enc = load_encoder("vit_tiny_patch16_224", path, depth=2, img_size=64)
assert enc.beyond_cls_info.checkpoint_format == "mae", enc.beyond_cls_info.checkpoint_format
with AttentionRecorder(enc) as rec:
    enc.forward_features(torch.randn(1, 3, 64, 64))
assert len(rec.modules) == 2
print("ok")
"""


def test_reloading_a_registry_or_a_family_module_keeps_every_registration(tmp_path):
    """importlib.reload of a family module registers it again (no 'already registered' error), and a reload of a
    registry keeps what the family modules registered (they do not run again). In a fresh interpreter: reloaded
    classes must not leak into the other tests."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "mae.pth")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
