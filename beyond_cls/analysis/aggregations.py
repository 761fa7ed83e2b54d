"""The ``aggregations`` job: non-trainable and trained token aggregations compared (paper Tab. 5, Figs. 7 and 9).

Every head's selection vector (:mod:`beyond_cls.selection`; ``--heads``, formerly ``--methods``) over a dataset
split: mean aggregation entropy per head and mean pairwise KL divergence between heads (both in nats), and the
selection maps of the first images (one colour scale for all maps). ``abmilp:RUN[#KEY]`` heads print and record
(``heads`` in ``aggregations.json``) the trained head they use.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from beyond_cls.analysis.selection_runner import SelectionRunner
from beyond_cls.analysis.style import plain_ticks, short_name
from beyond_cls.config import EXAMPLES, ConfigError, StreamSettings, setting, spec_list
from beyond_cls.data import build_dataset, make_loader
from beyond_cls.data.sample import sample_images
from beyond_cls.data.transforms import unnormalized_eval_transform
from beyond_cls.numerics import entropy, max_entropy
from beyond_cls.runlock import writes_out
from beyond_cls.runtime import resolve_device
from beyond_cls.selection import ATTENTION_METHODS, encoder_norm, kl, parse_methods
from beyond_cls.units import units_of

__all__ = ["AggregationsConfig", "aggregations", "examples_figure", "kl_figure", "kl_label", "plot_examples",
           "plot_kl"]

RESULTS_FILE = "aggregations.json"
MAP_CMAP = "viridis"  # perceptually uniform, readable in grey scale


#: other names of selection methods, accepted wherever a head spec is (``cls-attn``: localize's name for Fig. 8)
SPEC_ALIASES = {"cls-attn": "attn-mean"}


def selection_method(spec: str) -> str:
    """The selection method behind a head spec (``cls-attn`` -> ``attn-mean``)."""
    return SPEC_ALIASES.get(spec, spec)


@dataclass(kw_only=True)
class AggregationsConfig(StreamSettings):
    """What ``beyond-cls aggregations`` runs; every field is also a CLI flag and a YAML key."""

    heads: list[str] = setting(
        help="comma-separated head specs (the flag may repeat): attn-mean (= cls-attn), attn-minent, attn-center, "
        "guide:MODEL[@CHECKPOINT], abmilp:RUN[#KEY] (RUN: a beyond-cls probe --out folder, KEY: one of its heads)",
        group="heads", items=str, repeat=True, metavar="HEADS", aliases=("methods",))
    examples: int = EXAMPLES(4, help=EXAMPLES.help + " in examples.png (one figure, a row each)")

    def __post_init__(self) -> None:
        self.heads = spec_list(self.heads, "heads")
        super().__post_init__()
        parse_methods([selection_method(h) for h in self.heads])


def _runner(cfg, device: torch.device) -> SelectionRunner:
    mean, std = cfg.normalization()
    return SelectionRunner(
        [selection_method(h) for h in cfg.heads], cfg.model, cfg.checkpoint, checkpoint_format=cfg.checkpoint_format,
        arch=cfg.arch, source=cfg.source, weights_dir=cfg.weights_dir, img_size=cfg.img_size, mean=mean, std=std,
        device=device, precision=cfg.precision,
    )


def normalization_used(cfg, runner: SelectionRunner) -> dict[str, list[float]] | None:
    """The mean/std applied for ``--model``'s attn-* heads (--mean/--std, else the encoder's, else ImageNet's);
    None when no head uses ``--model`` (guide: and abmilp:RUN heads normalize as their own encoder or run)."""
    attn = [m.name for m in runner.methods if m.kind in ATTENTION_METHODS]
    if cfg.model is None or not attn:
        return None
    info = runner.encoder_for(attn[0]).beyond_cls_info
    mean, std = encoder_norm(info, *cfg.normalization())
    return {"mean": list(mean), "std": list(std)}


def _dataset(cfg, crop: bool):
    """The split and the images taken from it (at most ``max_images``: a sample seeded by ``seed``)."""
    dataset = build_dataset(cfg.dataset, cfg.data, cfg.split, transform=unnormalized_eval_transform(cfg.img_size, crop))
    taken, _, sample = sample_images(dataset, cfg.max_images, cfg.seed, f"{cfg.data} split {cfg.split}")
    return dataset, taken, sample


@writes_out("aggregations")
def aggregations(cfg: AggregationsConfig) -> dict:
    """Run every method over ``cfg.data``/``cfg.split``; write ``aggregations.json``/``.csv``, ``kl.csv``,
    ``kl.png`` and ``examples.png`` into ``cfg.out`` and return the results."""
    device = resolve_device(cfg.device)
    runner = _runner(cfg, device)  # bad methods, runs and models fail before the data is read
    heads = runner.heads_used()
    for name, head in heads.items():
        print(f"{name}: head {head['head']} (seed {head['seed']})")
    _, dataset, sample = _dataset(cfg, crop=True)
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.num_workers)
    names = [m.name for m in runner.methods]
    ent_sum = {n: 0.0 for n in names}
    ent_sq = {n: 0.0 for n in names}
    kl_sum = torch.zeros(len(names), len(names), dtype=torch.float64)
    count = 0
    example_images, example_maps = [], {n: [] for n in names}
    for images, _ in tqdm(loader, desc="aggregations", unit="batch", disable=not cfg.progress):
        sel = {k: v.cpu() for k, v in runner(images).items()}
        for n in names:
            e = entropy(sel[n])
            ent_sum[n] += float(e.sum())
            ent_sq[n] += float((e * e).sum())
        for i, p in enumerate(names):
            for j, q in enumerate(names):
                if i != j:
                    kl_sum[i, j] += kl(sel[p], sel[q], reduction="none").sum()
        take = max(0, cfg.examples - len(example_images))
        if take:
            example_images.extend(images[:take])
            for n in names:
                example_maps[n].extend(sel[n][:take].reshape(-1, *runner.grid_size))
        count += images.shape[0]
    if count == 0:
        raise ConfigError(f"no images in {cfg.data} split {cfg.split}")
    kl_mean = kl_sum / count
    rows = []
    for n in names:
        mean = ent_sum[n] / count
        std = math.sqrt(max(0.0, ent_sq[n] / count - mean * mean))
        rows.append({"method": n, "entropy": mean, "entropy_std": std, "max_entropy": max_entropy(runner.num_patches)})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "methods": rows, "kl": {p: {q: float(kl_mean[i, j]) for j, q in enumerate(names)} for i, p in enumerate(names)},
        "num_images": count, "sample": sample.as_dict(), "num_patches": runner.num_patches,
        "grid_size": list(runner.grid_size), "normalization": normalization_used(cfg, runner),
        "heads": heads, "config": asdict(cfg), "units": units_of(["entropy", "entropy_std", "max_entropy", "kl"]),
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    with open(out / "aggregations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "kl.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["KL(row || column)", *names])
        for i, p in enumerate(names):
            writer.writerow([p, *(f"{float(v):.6g}" for v in kl_mean[i])])
    plot_kl(kl_mean, names, out / "kl.png")
    if example_images:
        plot_examples(example_images, example_maps, out / "examples.png")
    for r in rows:
        print(f"{r['method']:<40} entropy {r['entropy']:.4f} nats (max {r['max_entropy']:.4f})")
    print(f"{count} images ({sample}); wrote {out / RESULTS_FILE}, kl.csv, kl.png"
          + (", examples.png" if example_images else ""))
    return results


def kl_label(value: float) -> str:
    """A KL heatmap annotation: 2 decimals from 0.1 up, 2 significant digits below (0.0042), ``0`` for zero."""
    if value == 0:
        return "0"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.2g}"


def kl_figure(matrix: torch.Tensor, names: list[str]) -> Figure:
    """Heatmap of mean pairwise KL(row || column) in nats, each cell annotated (Fig. 7)."""
    size = 3.0 + 0.6 * len(names)  # room for the tick labels (method names up to 28 characters)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(matrix.numpy(), cmap=MAP_CMAP)
    short = [_short(n) for n in names]
    ax.set_xticks(range(len(names)), short, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), short, fontsize=8)
    ax.set_xlabel("q (column)")
    ax.set_ylabel("p (row)")
    for i in range(len(names)):
        for j in range(len(names)):
            value = float(matrix[i, j])
            color = "black" if im.norm(value) > 0.6 else "white"  # readable on viridis's light end
            ax.text(j, i, kl_label(value), ha="center", va="center", color=color, fontsize=7)
    ax.set_title("mean KL(p || q) between selection vectors")
    plain_ticks(fig.colorbar(im, ax=ax, label="KL divergence (nats)").ax)
    return fig


def plot_kl(matrix: torch.Tensor, names: list[str], path: Path) -> Path:
    """Save :func:`kl_figure` as a PNG."""
    kl_figure(matrix, names).savefig(path, dpi=120)
    return Path(path)


def _short(name: str) -> str:
    return short_name(name, 28)


def examples_figure(images: list[torch.Tensor], maps: dict[str, list[torch.Tensor]]) -> Figure:
    """Grid: one row per image, the image then each method's selection map over it (Fig. 9).

    Every map shares one colour scale (viridis), 0 to the largest patch weight shown, so a near-uniform selection
    looks flat next to a selective one instead of being stretched to the full range; each overlay has its colour
    bar and a title with that image's selection entropy (nats, and % of the uniform log P).
    """
    names = list(maps)
    vmax = max(float(m.max()) for n in names for m in maps[n]) or 1.0
    fig = Figure(figsize=(2.9 * len(names) + 2.0, max(3.0, 2.4 * len(images) + 0.6)), layout="constrained")
    axes = fig.subplots(len(images), 1 + len(names), squeeze=False)
    for r, image in enumerate(images):
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        h, w = pixels.shape[:2]
        axes[r, 0].imshow(pixels)
        axes[r, 0].set_title(f"image {r}", fontsize=7)
        for c, n in enumerate(names, start=1):
            ax = axes[r, c]
            selection = maps[n][r].double()
            h_sel = float(entropy(selection.flatten()))
            h_max = max_entropy(selection.numel())
            ax.imshow(pixels)
            mappable = ax.imshow(selection.float().numpy(), cmap=MAP_CMAP, alpha=0.6, vmin=0.0, vmax=vmax,
                                 extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
            score = f"H {h_sel:.2f} nats ({100 * h_sel / h_max:.0f} % of log P)" if h_max > 0 else "H 0 nats"
            ax.set_title(f"{_short(n)}\n{score}" if r == 0 else score, fontsize=7)
            bar = fig.colorbar(mappable, ax=ax, fraction=0.08, pad=0.02)
            bar.ax.tick_params(labelsize=6)
            plain_ticks(bar.ax)
            if c == len(names):
                bar.set_label("patch weight (shared scale)", fontsize=7)
        for ax in axes[r]:
            ax.set_axis_off()
    return fig


def plot_examples(images: list[torch.Tensor], maps: dict[str, list[torch.Tensor]], path: Path) -> Path:
    """Save :func:`examples_figure` as a PNG."""
    examples_figure(images, maps).savefig(path, dpi=100)
    return Path(path)
