"""``analyze`` with several encoders on one data loader: per-model results, shared decoding, own normalization."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import beyond_cls.analysis.analyze as analyze_module
import beyond_cls.data.folder as folder
from beyond_cls.analysis import AttentionRecorder, AttentionSummary
from beyond_cls.analysis.analyze import AnalyzeConfig, EncoderSpec, analyze, analyze_models, encoder_labels
from beyond_cls.cli import build_parser, main
from beyond_cls.config import ConfigError, load_config
from beyond_cls.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    SyntheticConfig,
    eval_transform,
    make_synthetic_dataset,
)
from beyond_cls.data.sample import sample_images
from beyond_cls.models import load_encoder

VIT = "vit_tiny_patch16_224"
SIZE = 32  # 2x2 patches: every forward is cheap
IMAGES = 5
OTHER_NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
RUN = dict(img_size=SIZE, batch_size=2, max_images=IMAGES, num_workers=0, progress=False, device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "set"
    return make_synthetic_dataset(root, SyntheticConfig(num_classes=2, train_per_class=0, val_per_class=3,
                                                        image_size=64, object_size=(16, 32)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two random ViT-Ti files of the same architecture; sharp attention so inputs and weights matter."""
    root = tmp_path_factory.mktemp("weights")
    paths = []
    for seed, stem in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = load_encoder(VIT, img_size=SIZE)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("qkv.weight"):
                    p.mul_(8)
        paths.append(root / f"{stem}.pth")
        torch.save(model.state_dict(), paths[-1])
    return paths


@pytest.fixture(scope="module")
def two_model_run(dataset, checkpoints, tmp_path_factory):
    """One CLI run of both checkpoints, counting image decodes."""
    out = tmp_path_factory.mktemp("many") / "run"
    decoded = []
    real = folder.load_rgb
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(folder, "load_rgb", lambda path: decoded.append(path) or real(path))
        argv = ["analyze", "--model", VIT, "--checkpoint", str(checkpoints[0]), "--model", VIT, "--checkpoint",
                str(checkpoints[1]), "--data", str(dataset), "--out", str(out), "--img-size", str(SIZE),
                "--max-images", str(IMAGES), "--batch-size", "2", "--num-workers", "0", "--no-progress",
                "--device", "cpu"]
        assert main(argv) == 0
    return out, decoded


def _assert_close(a: AttentionSummary, b: AttentionSummary, atol: float = 1e-6) -> None:
    assert a.fields().keys() == b.fields().keys()
    for name, value in a.fields().items():
        torch.testing.assert_close(value, b.fields()[name], atol=atol, rtol=0, msg=name)
    assert (a.num_images, a.num_patches) == (b.num_images, b.num_patches)


def _max_diff(a: AttentionSummary, b: AttentionSummary) -> float:
    return max(float((v - b.fields()[k]).abs().max()) for k, v in a.fields().items())


def _recorded(checkpoint, dataset, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> AttentionSummary:
    """The pre-multi-model path: CPU ToTensor + Normalize, then the recorder."""
    model = load_encoder(VIT, checkpoint, img_size=SIZE)
    split = ImageFolderDataset(dataset, "val", transform=eval_transform(SIZE, mean=mean, std=std))
    images = Subset(split, sample_images(split, IMAGES, 0, "val")[1])  # the images analyze --max-images takes
    with AttentionRecorder(model) as rec, torch.inference_mode():
        for x, _ in DataLoader(images, batch_size=2):
            model.forward_features(x)
    return rec.summary()


@pytest.fixture
def no_plots(monkeypatch):
    """Skip drawing (half a second per figure on 2 cores); records what would have been drawn."""
    drawn = []
    monkeypatch.setattr(analyze_module, "plot_information_flow", lambda summaries, path, **kw: drawn.append(path.name))
    return drawn


def test_each_model_matches_its_single_run(two_model_run, dataset, checkpoints, tmp_path, no_plots):
    out, _ = two_model_run
    labels = [f"{VIT}@a", f"{VIT}@b"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == labels
    many = {label: AttentionSummary.load(out / label / "attention_stats.json") for label in labels}
    for label, ckpt in zip(labels, checkpoints):
        assert many[label].model == label and many[label].num_images == IMAGES
        single = analyze(AnalyzeConfig(model=VIT, checkpoint=str(ckpt), data=str(dataset), out=str(tmp_path / label),
                                       **RUN))
        assert isinstance(single, AttentionSummary) and single.model == VIT
        _assert_close(many[label], single)
        saved = json.loads((out / label / "analyze_config.json").read_text())
        assert saved["model"] == VIT and saved["checkpoint"] == str(ckpt) and saved["label"] == label
    assert no_plots == ["attention_stats.png"] * 2  # single runs: their own figure only
    assert _max_diff(*many.values()) > 1e-3  # the two files really differ


def test_images_are_decoded_once_for_all_models(two_model_run):
    _, decoded = two_model_run
    assert len(decoded) == IMAGES and len(set(decoded)) == IMAGES


def test_combined_plot_and_models_file(two_model_run, checkpoints, capsys):
    out, _ = two_model_run
    png = (out / "attention_stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > (out / f"{VIT}@a" / "attention_stats.png").stat().st_size
    models = json.loads((out / "analyze_models.json").read_text())
    assert models == {f"{VIT}@{s}": {"model": VIT, "checkpoint": str(c), "subfolder": f"{VIT}@{s}"}
                      for s, c in zip("ab", checkpoints)}
    assert not (out / "attention_stats.json").exists()


def test_each_encoder_gets_its_own_normalization(dataset, checkpoints, tmp_path, monkeypatch, no_plots):
    def load(name, checkpoint=None, **kw):  # file b is an encoder with its own (zoo-style) normalization
        model = load_encoder(name, checkpoint, **kw)
        if str(checkpoint).endswith("b.pth"):
            model.beyond_cls_info = dataclasses.replace(model.beyond_cls_info, mean=OTHER_NORM[0], std=OTHER_NORM[1])
        return model

    monkeypatch.setattr(analyze_module, "load_encoder", load)
    cfg = AnalyzeConfig(model=[VIT, VIT], checkpoint=[str(c) for c in checkpoints], data=str(dataset),
                        out=str(tmp_path), **RUN)
    result = analyze_models(cfg)
    imagenet_a, own_b = result[f"{VIT}@a"], result[f"{VIT}@b"]
    _assert_close(imagenet_a, _recorded(checkpoints[0], dataset))  # unchanged for ImageNet-normalized encoders
    _assert_close(own_b, _recorded(checkpoints[1], dataset, *OTHER_NORM))
    assert _max_diff(own_b, _recorded(checkpoints[1], dataset)) > 1e-4  # the old ImageNet-only path differs


def test_cli_encoder_flags_attach_to_the_preceding_model():
    parser = build_parser()
    args = parser.parse_args(["analyze", "--model", "a", "--checkpoint", "a.pth", "--model", "b", "--arch",
                              "vit_small_patch16_224", "--model", "c", "--source", "student", "--checkpoint", "c.pth"])
    assert args.model == ["a", "b", "c"]
    assert args.checkpoint == ["a.pth", None, "c.pth"]
    assert args.arch == [None, "vit_small_patch16_224", None] and args.source == [None, None, "student"]
    assert args.checkpoint_format is None
    single = parser.parse_args(["analyze", "--model", "a", "--checkpoint", "a.pth", "--checkpoint-format", "mae"])
    assert (single.model, single.checkpoint, single.checkpoint_format) == ("a", "a.pth", "mae")
    yaml_override = parser.parse_args(["analyze", "--config", "c.yaml", "--checkpoint", "x.pth"])
    assert yaml_override.model is None and yaml_override.checkpoint == "x.pth"
    other = parser.parse_args(["localize", "--checkpoint", "x.pth", "--model", "a"])  # other commands unchanged
    assert (other.model, other.checkpoint) == ("a", "x.pth")


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "a.pth", "--model", "a"], "--checkpoint must come after the --model"),
    (["--model", "a", "--model", "b", "--arch", "x", "--arch", "y"], "--arch given twice for --model b"),
    (["--model", "a", "--source", "x", "--source", "y"], "--source given twice for --model a"),
])
def test_cli_misplaced_encoder_flag_is_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["analyze", *argv])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"beyond-cls analyze: error: {message}")


def test_yaml_lists_and_single_model_values(tmp_path):
    config = tmp_path / "analyze.yaml"
    config.write_text("model: [a, b]\ncheckpoint: [x.pth, null]\narch: vit_small_patch16_224\ndata: d\nout: o\n")
    cfg = load_config(AnalyzeConfig, config)
    assert cfg.encoders() == [EncoderSpec("a", "x.pth", "auto", "vit_small_patch16_224"),
                              EncoderSpec("b", None, "auto", "vit_small_patch16_224")]
    one = load_config(AnalyzeConfig, None, model=["a"], checkpoint=["x.pth"], checkpoint_format=[None], data="d",
                      out="o")
    assert (one.model, one.checkpoint, one.checkpoint_format) == ("a", "x.pth", "auto")


@pytest.mark.parametrize("values,message", [
    (dict(model=["a", "b"], checkpoint=["x.pth"]), "checkpoint: 1 values for 2 models"),
    (dict(model=["a", "b"], checkpoint="x.pth"), "ambiguous"),
    (dict(model=[]), "non-empty list"),
    (dict(model=["a", "a"], checkpoint=["x.pth", "./x.pth"]), "listed twice"),
    (dict(model=["a", 3]), "model[1]"),
    (dict(model=["a", "b"], source=["teacher", 1]), "source[1]"),
])
def test_bad_model_lists_name_the_problem(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        AnalyzeConfig(data="d", out="o", **values)


def test_labels_are_distinct_and_filesystem_safe():
    specs = [EncoderSpec("m", "x/w.pth"), EncoderSpec("m", "y/w.pth.tar"), EncoderSpec("M", "z/W.pth"),
             EncoderSpec("m"), EncoderSpec("odd/name:1", None)]
    assert encoder_labels(specs) == ["m@w", "m@w-2", "M", "m-2", "odd_name_1"]  # "M" vs "m": case-insensitive
    specs = [EncoderSpec("m", "x/w.pth"), EncoderSpec("m", "y/v.pth"), EncoderSpec("m@w")]
    assert encoder_labels(specs) == ["m@w", "m@v", "m@w-2"]
