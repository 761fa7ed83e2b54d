"""End-to-end measures (targets in docs/performance.md: analyze ≥ 0.95 × inference, probe ≥ 2.5 × per-head script).

Each call measures one thing and appends rows to a CSV (one process per measure, so one failing or
timed-out measure loses nothing else); ``report`` turns the CSV into the Markdown table beside it,
with the GPU-hour estimate of the paper's Table 1 row for MAE ViT-B.

    python benchmarks/e2e.py analyze --csv OUT.csv --model vit_base_patch16_224 --batch-size 256
    python benchmarks/e2e.py probe   --csv OUT.csv --decode gpu --data SYNTHETIC_ROOT --dataset synthetic
    python benchmarks/e2e.py report  --csv OUT.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
from pathlib import Path

import torch

COLUMNS = ["measure", "ours", "baseline", "ratio", "unit", "detail", "device", "torch", "triton", "date"]
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_VAL_IMAGES = 50_000
TABLE1_EPOCHS = 90
AUTHORS_V100_HOURS = 300.0  # the authors' cost of one Table 1 row, 12 heads run one at a time (docs/performance.md)


def _versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "date": datetime.date.today().isoformat()}


def _append(path: Path, rows: list[dict]) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**_versions(), **row})
    for row in rows:
        print(f"{row['measure']}: ours {row['ours']:.4g} {row['unit']}, baseline {row['baseline']:.4g}, "
              f"ratio {row['ratio']:.3f}  ({row['detail']})")


def _row(measure: str, ours: float, baseline: float, unit: str, detail: str) -> dict:
    return {"measure": measure, "ours": ours, "baseline": baseline,
            "ratio": ours / baseline if baseline else math.nan, "unit": unit, "detail": detail}


def measure_analyze(args: argparse.Namespace) -> list[dict]:
    from beyond_cls.analysis.bench import BenchAnalyzeConfig, bench_analyze

    cfg = BenchAnalyzeConfig(model=args.model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                             device=args.device, precision=args.precision)
    r = bench_analyze(cfg)
    return [_row("analyze_vs_inference", r["recorder_images_per_s"], r["plain_images_per_s"], "images/s",
                 f"{args.model}, batch {args.batch_size}, {args.precision}, recorder on every block "
                 "vs plain forward_features")]


def measure_probe(args: argparse.Namespace) -> list[dict]:
    from beyond_cls.probe.bench import BenchProbeConfig, bench_probe

    cfg = BenchProbeConfig(model=args.model, heads=args.heads, lrs=args.lrs, data=args.data, dataset=args.dataset,
                           batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                           num_workers=args.num_workers, decode=args.decode, device=args.device,
                           precision=args.precision, baseline=not args.no_baseline,
                           compile=False if args.no_compile else None, cuda_graphs=not args.no_cuda_graphs)
    r = bench_probe(cfg)
    heads, tag = r["head_count"], f"{args.decode} decode"
    what = f"{args.model}, batch {args.batch_size}, {heads} heads ({args.heads} × lrs {args.lrs}), {args.precision}"
    rows = [
        _row(f"probe_step_images_per_s[{tag}]", min(r["step"], r["loader"]), r["step"], "images/s",
             f"{what}; ours = min(loader, encoder + bank), baseline = encoder + bank on a device batch"),
        _row(f"probe_loader_over_step[{tag}]", r["loader"], r["step"], "images/s",
             f"loader ({args.num_workers} workers) over encoder + bank: < 1 means the loader is the bottleneck"),
        _row(f"probe_encoder_images_per_s[{tag}]", r["encoder"], r["step"], "images/s",
             "frozen encoder alone (no grad) vs the full step"),
        _row(f"probe_bank_images_per_s[{tag}]", r["heads"], r["step"], "images/s",
             "head bank alone (fwd + bwd + LARS) vs the full step"),
        _row("probe_bank_host_ops_per_step", r["host_ops_per_step"], r["host_ops_per_step_eager"], "ops",
             f"ATen + custom ops one bank step ({heads} heads: fwd, losses, bwd, LARS) dispatches from the host: "
             f"ours as timed (CUDA graphs {r['bank_graphs']}), baseline the same step eagerly"),
    ]
    if "speedup_per_head" in r:
        rows.append(_row("probe_per_head_vs_baseline", r["step"] * heads, r["baseline_per_head"], "head-images/s",
                         f"{what}; baseline: eager attention + eager head, fp16 + GradScaler, DDP, one head per run"))
    return rows


def gpu_hours(rows: list[dict]) -> list[dict]:
    """GPU-hours of the Table 1 row of MAE ViT-B (90 epochs, 12 heads in one bank) from the measured rates."""
    by = {r["measure"]: float(r["ours"]) for r in rows}
    rate = by.get("probe_step_images_per_s[gpu decode]")
    encoder = by.get("probe_encoder_images_per_s[gpu decode]")
    if rate is None or encoder is None:
        return []
    hours = TABLE1_EPOCHS * (IMAGENET_TRAIN_IMAGES / rate + IMAGENET_VAL_IMAGES / encoder) / 3600
    return [_row("table1_row_gpu_hours", hours, AUTHORS_V100_HOURS, "GPU-hours",
                 f"{TABLE1_EPOCHS} epochs × ({IMAGENET_TRAIN_IMAGES:,} train images at the step rate + "
                 f"{IMAGENET_VAL_IMAGES:,} eval images at the encoder rate); baseline: the authors' ≈ 300 "
                 "V100-hours for the same row, one head at a time (another GPU)")]


def report(csv_path: Path) -> str:
    with csv_path.open() as f:
        rows = [r for r in csv.DictReader(f) if r["measure"] != "table1_row_gpu_hours"]
    rows += [{**_versions(), **r} for r in gpu_hours(rows)]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    head = rows[0] if rows else _versions()
    lines = [f"# End to end on {head['device']} (torch {head['torch']}, triton {head['triton']}, {head['date']})", "",
             "| measure | ours | baseline | ratio | unit | what |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['measure']} | {float(r['ours']):.4g} | {float(r['baseline']):.4g} | "
                     f"{float(r['ratio']):.3f} | {r['unit']} | {r['detail']} |")
    text = "\n".join(lines) + "\n"
    csv_path.with_suffix(".md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("analyze", "probe", "report"):
        p = sub.add_parser(name)
        p.add_argument("--csv", type=Path, required=True)
        if name == "report":
            continue
        p.add_argument("--model", default="vit_base_patch16_224")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--steps", type=int, default=10)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", "--amp", default="bf16")
    probe = sub.choices["probe"]
    probe.add_argument("--heads", default="cls,mean,abmilp,abmilp+cls")
    probe.add_argument("--lrs", default="0.05,0.1,0.2")
    probe.add_argument("--data")
    probe.add_argument("--dataset", default="imagefolder")
    probe.add_argument("--num-workers", type=int, default=16)
    probe.add_argument("--decode", choices=["cpu", "gpu"], default="gpu")
    probe.add_argument("--no-baseline", action="store_true")
    probe.add_argument("--no-compile", action="store_true", help="eager frozen encoder (compiled on CUDA by default)")
    probe.add_argument("--no-cuda-graphs", action="store_true", help="eager head bank steps")
    args = parser.parse_args(argv)
    if args.what == "report":
        print(report(args.csv))
        return
    _append(args.csv, measure_analyze(args) if args.what == "analyze" else measure_probe(args))


if __name__ == "__main__":
    main()
