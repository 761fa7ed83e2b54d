"""The ``beyond-cls`` command: a thin shell over functions users can import; each command's flags come from the
fields of its config dataclass (:mod:`beyond_cls.cli_args`)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from beyond_cls import __version__
from beyond_cls.analysis.aggregations import AggregationsConfig, aggregations
from beyond_cls.analysis.analyze import PER_MODEL, AnalyzeConfig, analyze
from beyond_cls.analysis.bench import BenchAnalyzeConfig, bench_analyze
from beyond_cls.analysis.localize import LocalizeConfig, localize
from beyond_cls.cli_args import Parser, add_settings, habits_note
from beyond_cls.cli_configs import CompareConfig, ProbeReportConfig, ShardConfig, ZooConfig
from beyond_cls.config import load_config
from beyond_cls.demo import DemoConfig, demo
from beyond_cls.probe import ProbeConfig, run
from beyond_cls.probe.bench import BenchProbeConfig, bench_probe
from beyond_cls.probe.trainer import Preempted
from beyond_cls.runtime import console_warnings

PROG = "beyond-cls"
PAPER = "https://arxiv.org/abs/2412.03215"
CITATION = r"""@article{przewiezlikowski2024beyondcls,
  title   = {Beyond [cls]: Exploring the true potential of {M}asked {I}mage {M}odeling representations},
  author  = {Przewi{\k{e}}{\'z}likowski, Marcin and Balestriero, Randall and Jasi{\'n}ski, Wojciech and
             {\'S}mieja, Marek and Zieli{\'n}ski, Bartosz},
  journal = {arXiv preprint arXiv:2412.03215},
  year    = {2024}
}"""
EPILOG = f"""The paper: Beyond [cls]: Exploring the true potential of Masked Image Modeling representations
(Przewięźlikowski, Balestriero, Jasiński, Śmieja, Zieliński), {PAPER}
If beyond-cls helps your work, please cite it:

{CITATION}"""


def version_text() -> str:
    """``beyond-cls --version``: the package, then torch (with its CUDA), Triton and the C++ extension."""
    import torch

    from beyond_cls import _extension

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    if torch.version.cuda:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cuda += f", {gpus} GPU{'s' if gpus != 1 else ''} visible"
    try:
        triton = f"triton {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton = "triton not installed (no Triton kernels)"
    built = _extension.load_error() is None
    ext = "C++ extension built" if built else "C++ extension not built (pip install --no-build-isolation .)"
    return (f"{PROG} {__version__} (Python {platform.python_version()})\n"
            f"torch {torch.__version__} ({cuda}), {triton}, {ext}")


class _Version(argparse.Action):
    """``--version``: prints :func:`version_text` (computed only when asked) and exits."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="the version of beyond-cls, torch, Triton and the C++ extension")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _compare(cfg: CompareConfig) -> None:
    from beyond_cls.analysis.compare import compare

    result = compare(cfg.inputs, cfg.out, names=cfg.name_list(), families=cfg.families())
    for warning in result["warnings"]:
        print(f"note: {warning}")
    print(f"wrote {result['files']['report']}")


def _probe_report(cfg: ProbeReportConfig) -> None:
    from beyond_cls.analysis.layers_report import probe_report

    files = probe_report(cfg.run, cfg.out, analyze=cfg.analyze)
    print(f"wrote {files['figure']} and {files['csv']}")


def _zoo(cfg: ZooConfig) -> None:
    from beyond_cls.models.zoo_table import zoo_rows
    from beyond_cls.tables import format_table

    rows = zoo_rows(cfg.weights_dir, check=cfg.check)
    columns = ["name", "family", "architecture", "params (M)", "file", "present"] + (["check"] if cfg.check else [])
    print(format_table(rows, columns))
    print()
    for row in rows:
        print(f"{row['name']}: {row['get it from']}")
    failed = [row for row in rows if "error" in row]
    for row in failed:  # below the table, so its cells stay one line each
        print(f"\ncheck failed: {row['name']}:\n  " + row["error"].replace("\n", "\n  "))
    if failed:
        raise ValueError(f"{len(failed)} zoo check(s) failed: {', '.join(r['name'] for r in failed)} (details above)")


def _shard(cfg: ShardConfig) -> None:
    from beyond_cls.data.shard_writer import write_shards

    written = write_shards(cfg.data, cfg.out, name=cfg.name, shard_size=cfg.shard_size)
    for split, files in written.items():
        print(f"{split}: {len(files)} shard(s) in {cfg.out}")


@dataclass(frozen=True)
class Command:
    """A subcommand: its config dataclass (the flags), the function that runs it, and its help."""

    config: type
    run: Callable[[Any], Any]
    help: str
    description: str
    per_model: tuple[str, ...] = ()


COMMANDS = {
    "analyze": Command(
        AnalyzeConfig, analyze, "attention statistics of an encoder over a dataset (paper Figs. 3-6)",
        "Stream a dataset split (an ImageFolder unless --dataset) through an encoder under the AttentionRecorder; "
        "write attention_stats.json and attention_stats.png into --out and print the per-block table. --model "
        "repeats: the images are decoded once for all encoders, each normalized with its own mean/std, and each "
        "--checkpoint, --checkpoint-format, --arch and --source belongs to the --model before it, e.g. beyond-cls "
        "analyze --model mae_vit_base_patch16 --checkpoint mae.pth --model dino_vit_base_patch16 --checkpoint "
        "dino.pth --data IMAGENET --out runs/flow (in a --config file: model: [a, b] with checkpoint: [a.pth, null]). "
        "Several models write OUT/<label>/ per model (label: the model name, name@<checkpoint stem> when names "
        "repeat), OUT/attention_stats.png with all of them and OUT/analyze_models.json; compare them with "
        "beyond-cls compare OUT/*/.",
        per_model=("model", *PER_MODEL),
    ),
    "probe": Command(
        ProbeConfig, run, "linear probing with a bank of aggregation heads (paper Table 1)",
        "Train BatchNorm + Linear heads on the frozen encoder's tokens, every --heads x --lrs combination at once "
        "on one encoder pass, following the MAE linear-probing protocol; write results.json/.csv and print the "
        "table. Launch with torchrun or srun for many GPUs.",
    ),
    "compare": Command(
        CompareConfig, _compare, "the paper's Figs. 3-6 and Table 3 from several analyze runs",
        "Draw the information-flow figures (one line per model over blocks, MIM solid, JEA dashed), per-head "
        "heatmaps and Table 3 (aggregation entropy) from analyze outputs; write CSVs and report.md.",
    ),
    "probe-report": Command(
        ProbeReportConfig, _probe_report, "accuracy vs block per aggregation of a probe --blocks run",
        "Plot the best-lr accuracy of each aggregation over the blocks of a layer-wise probe run (probe --blocks) "
        "into OUT/blocks.png and OUT/blocks.csv, beside the [cls]-to-patch attention entropy per block of an "
        "analyze run when --analyze is given.",
    ),
    "zoo": Command(
        ZooConfig, _zoo, "the paper's encoders: architecture, size, official file, where to get it, presence",
        "List the encoder zoo. Official files are looked up under --weights-dir or $BEYOND_CLS_WEIGHTS (nothing "
        "is downloaded); --check loads every present file strictly.",
    ),
    "demo": Command(
        DemoConfig, demo, "generate the synthetic set, analyze a small ViT on it and probe it",
        "Write the embedded synthetic dataset into the cache ($BEYOND_CLS_CACHE or ~/.cache/beyond_cls), run "
        "analyze on it, then probe with [cls], mean and AbMILP heads on cached tokens (random weights unless "
        "--checkpoint). Outputs in OUT and OUT/probe.",
    ),
    "aggregations": Command(
        AggregationsConfig, aggregations,
        "non-trainable vs trained aggregations: entropy, KL, maps (paper Tab. 5, Figs. 7, 9)",
        "Selection vectors of each --heads entry over a dataset split (eval transform: resize 256, center crop "
        "224): write aggregations.json/.csv (mean aggregation entropy per method), kl.csv and kl.png (mean "
        "pairwise KL) and examples.png (selection maps of the first images) into --out.",
    ),
    "localize": Command(
        LocalizeConfig, localize, "MaxBoxAccV2 of [cls] attention and AbMILP maps (paper Tab. 7/8, Fig. 8)",
        "Resize images to --img-size squared (no crop, the WSOL protocol), read ground-truth boxes from "
        "--boxes/<image stem>.xml (Pascal VOC), score each --heads map with MaxBoxAccV2; write localization.json "
        "and overlays (ground truth blue, [cls] red, AbMILP green) into --out.",
    ),
    "shard": Command(
        ShardConfig, _shard, "write an ImageFolder's train/ and val/ as WebDataset shards (read with --dataset wds)",
        "Write DATA/train and DATA/val in ImageFolder order (classes sorted, files sorted) as "
        "OUT/NAME-train-NNNN.tar and OUT/NAME-validation-NN.tar (<key>.jpg + <key>.cls + <key>.json) plus "
        "OUT/classes.txt. Each shard is renamed into place only when complete; OUT/beyond_cls_shards.json (classes, "
        "each shard's size and sample count) is written complete last; readers refuse a folder it marks incomplete.",
    ),
}
BENCH = {
    "analyze": Command(
        BenchAnalyzeConfig, bench_analyze,
        "images/s of the recorder pass vs plain inference of the same model and batch",
        "Random inputs (and random weights unless --checkpoint); prints both throughputs and their ratio. The "
        "design target on GPU is a ratio >= 0.9.",
    ),
    "probe": Command(
        BenchProbeConfig, bench_probe,
        "images/s of the probe's loader, encoder and head bank vs a per-head baseline script",
        "Loader (synthetic set unless --data), frozen encoder, head bank and the full step, then a baseline like "
        "the authors' script (unfused eager attention, one head per run, fp16, DDP with find_unused_parameters). "
        "The design target on GPU is >= 2.5x the baseline per head.",
    ),
}


def _add_commands(sub: argparse._SubParsersAction, commands: dict[str, Command]) -> None:
    for name, command in commands.items():
        parser = sub.add_parser(name, help=command.help, description=command.description)
        add_settings(parser, command.config, per_model=command.per_model)
        parser.epilog = habits_note(parser)
        parser.set_defaults(job=command)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Information flow in self-supervised ViTs and Selective Aggregation.",
                    epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, COMMANDS)
    bench = sub.add_parser("bench", help="throughput measurements")
    _add_commands(bench.add_subparsers(dest="bench", required=True, metavar="WHAT"), BENCH)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("command", "bench", "job", "config")}


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (``beyond-cls zoo | head -1``): stdout now goes to /dev/null, so that the flush at
    exit does not fail again, and the exit code is a SIGPIPE death's (128 + 13), with nothing printed."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout is no file (captured, replaced)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``beyond-cls``; returns the exit code (2 for bad input, 141 when stdout's reader is gone)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        sys.stdout.flush()  # --help or --version into a closed pipe fails here rather than at exit
        raise
    job: Command = args.job
    try:
        with console_warnings(f"{PROG} {args.command}"):
            job.run(load_config(job.config, args.config, **_overrides(args)))
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except (ValueError, OSError, TypeError) as exc:
        if os.environ.get("BEYOND_CLS_DEBUG") == "1":
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Preempted as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
