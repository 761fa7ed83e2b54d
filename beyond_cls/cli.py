"""The ``beyond-cls`` command: a thin shell over functions users can import."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from beyond_cls.config import load_config

PROG = "beyond-cls"
DEMO_MODEL = "vit_tiny_patch16_224"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_encoder_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=False, help="timm ViT name, e.g. vit_base_patch16_224"
                   + ("" if required else f" (default {DEMO_MODEL})"))
    p.add_argument("--checkpoint", help="encoder weights: .pth/.pt/.pth.tar or .safetensors (local path)")
    p.add_argument("--checkpoint-format", choices=["auto", "timm", "mae"], help="checkpoint layout (default auto)")
    p.add_argument("--img-size", type=_positive_int, help="input resolution (default 224)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, help="images per batch (default 64)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (default auto: bf16 on CUDA, fp32 on CPU)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_device_args(p)
    p.add_argument("--max-images", type=_positive_int, help="stop after this many images (default: all)")
    p.add_argument("--num-workers", type=_non_negative_int, help="data loading workers (default min(8, cpus))")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="hide the progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Information flow in self-supervised ViTs and Selective Aggregation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze", help="attention statistics of an encoder over a dataset (paper Figs. 3-6)",
        description="Stream an ImageFolder split through an encoder under the AttentionRecorder; write "
        "attention_stats.json and attention_stats.png into --out and print the per-block table.",
    )
    analyze.add_argument("--config", help="YAML file with the same keys as the flags (flags win)")
    _add_encoder_args(analyze, required=True)
    analyze.add_argument("--data", help="dataset root holding SPLIT/<class>/<images>")
    analyze.add_argument("--split", help="split folder under --data (default val)")
    analyze.add_argument("--out", help="output directory")
    _add_run_args(analyze)

    demo = sub.add_parser(
        "demo", help="generate the synthetic set and analyze a small ViT on it",
        description="Write the embedded synthetic dataset into the cache ($BEYOND_CLS_CACHE or "
        "~/.cache/beyond_cls) and run analyze on it (random weights unless --checkpoint).",
    )
    _add_encoder_args(demo, required=False)
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="output directory (default runs/demo)")
    _add_run_args(demo)

    bench = sub.add_parser("bench", help="throughput measurements").add_subparsers(
        dest="bench", required=True, metavar="WHAT"
    )
    bench_analyze = bench.add_parser(
        "analyze", help="images/s of the recorder pass vs plain inference of the same model and batch",
        description="Random inputs (and random weights unless --checkpoint); prints both throughputs and "
        "their ratio. The design target on GPU is a ratio >= 0.9.",
    )
    bench_analyze.add_argument("--model", help="timm ViT name (default vit_base_patch16_224)")
    bench_analyze.add_argument("--checkpoint", help="encoder weights (local path)")
    bench_analyze.add_argument("--img-size", type=_positive_int, help="input resolution (default 224)")
    bench_analyze.add_argument("--steps", type=_positive_int, help="timed batches per measurement (default 10)")
    bench_analyze.add_argument("--warmup", type=_non_negative_int, help="untimed batches first (default 3)")
    _add_device_args(bench_analyze)
    return parser


def _run_analyze(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.analyze import AnalyzeConfig, analyze

    analyze(load_config(AnalyzeConfig, args.config, **_overrides(args)))


def _run_demo(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.analyze import AnalyzeConfig, analyze
    from beyond_cls.data import make_synthetic_dataset

    root = make_synthetic_dataset()
    overrides = _overrides(args)
    overrides["model"] = overrides["model"] or DEMO_MODEL
    analyze(load_config(AnalyzeConfig, None, data=str(root), **overrides))


def _run_bench(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.bench import BenchAnalyzeConfig, bench_analyze

    bench_analyze(load_config(BenchAnalyzeConfig, None, **_overrides(args)))


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "bench")}


COMMANDS = {"analyze": _run_analyze, "demo": _run_demo, "bench": _run_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``beyond-cls``; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError, TypeError) as exc:
        if os.environ.get("BEYOND_CLS_DEBUG") == "1":
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
