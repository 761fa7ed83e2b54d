"""The ``beyond-cls`` command: a thin shell over functions users can import."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from beyond_cls.config import load_config

PROG = "beyond-cls"
DEMO_MODEL = "vit_tiny_patch16_224"
# The demo's probe: the Table 1 heads on cached tokens of 2 augmented views, a few short epochs.
DEMO_PROBE = dict(heads="cls,mean,abmilp", epochs=12, warmup_epochs=2, batch_size=32, effective_batch=32,
                  cache_views=2, optimizer="sgd", blr=0.5)


def _number(kind: type, minimum: float, strict: bool, what: str):
    """An argparse type: a finite ``kind`` above (``strict``) or at least ``minimum``, else ``expected {what}``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 0, True, "a positive integer")
_non_negative_int = _number(int, 0, False, "an integer >= 0")
_positive_float = _number(float, 0, True, "a positive number")
_non_negative_float = _number(float, 0, False, "a number >= 0")
_block = _number(int, -1, False, "a block index (0-based, -1 = last)")


def _formats() -> list[str]:
    from beyond_cls.models import CHECKPOINT_FORMATS

    return ["auto", *CHECKPOINT_FORMATS]


class _PerModel(argparse.Action):
    """``--model`` (repeatable) and the encoder flags that belong to the most recent ``--model``.

    With one ``--model`` every dest holds a plain value; from the second on, ``model`` and each flag given
    for any model hold lists aligned with the models (None: not given). Flags before any ``--model`` stay
    plain values that override a --config file's, unless a ``--model`` follows: then they are an error.
    """

    attached = ("checkpoint", "checkpoint_format", "arch", "source")

    def __call__(self, parser, namespace, values, option_string=None):
        models = getattr(namespace, "model", None)
        count = 0 if models is None else len(models) if isinstance(models, list) else 1
        if self.dest == "model":
            for dest in self.attached:
                value = getattr(namespace, dest, None)
                if count == 0 and value is not None:
                    self._fail(parser, f"{_flag(dest)} must come after the --model it belongs to")
                if count >= 1 and value is not None:  # keep the lists aligned with the models
                    setattr(namespace, dest, (value if isinstance(value, list) else [value]) + [None])
            namespace.model = values if count == 0 else [*(models if count > 1 else [models]), values]
            return
        value = getattr(namespace, self.dest, None)
        if count <= 1:
            if value is not None:
                self._fail(parser, f"{option_string} given twice" + (f" for --model {models}" if count else ""))
            setattr(namespace, self.dest, values)
            return
        value = list(value) if isinstance(value, list) else [None] * count
        if value[-1] is not None:
            self._fail(parser, f"{option_string} given twice for --model {models[-1]}")
        value[-1] = values
        setattr(namespace, self.dest, value)

    @staticmethod
    def _fail(parser: argparse.ArgumentParser, message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message}\n")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _add_encoder_args(p: argparse.ArgumentParser, required: bool, per_model: bool = False) -> None:
    """Encoder flags; ``per_model``: --model repeats and the next four flags belong to the --model before them."""
    kw = {"action": _PerModel} if per_model else {}
    p.add_argument("--model", required=False, help="timm ViT name, e.g. vit_base_patch16_224"
                   + ("" if required else f" (default {DEMO_MODEL})")
                   + ("; repeatable: several encoders on the same images" if per_model else ""), **kw)
    p.add_argument("--checkpoint", help="encoder weights: .pth/.pt/.pth.tar or .safetensors (local path)", **kw)
    p.add_argument("--checkpoint-format", choices=_formats(), help="checkpoint layout (default auto: detected)",
                   **kw)
    p.add_argument("--arch", help="timm architecture for a zoo name's weights, e.g. vit_small_patch16_224; "
                   "NAME:heads=N states the head count (MoCo-v3 ViT-S: vit_small_patch16_224:heads=12)", **kw)
    p.add_argument("--source", help="sub-model of a training checkpoint: I-JEPA target_encoder (default) or "
                   "encoder; DINO/iBOT teacher (default) or student", **kw)
    p.add_argument("--weights-dir", help="folder with the zoo's official files (default $BEYOND_CLS_WEIGHTS)")
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


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``probe``; each help ends with the default, read off ProbeConfig."""
    from beyond_cls.probe.config import AMP_CHOICES, DECODE_CHOICES, OPTIMIZERS, ProbeConfig

    d = ProbeConfig.__dataclass_fields__

    def default(name: str) -> object:
        f = d[name]
        return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()

    def add(flag: str, text: str, shown: str | None = None, **kw) -> None:
        p.add_argument(flag, help=f"{text} (default: {shown or default(flag[2:].replace('-', '_'))})", **kw)

    p.add_argument("--config", help="YAML file whose keys are these flags' names (flags win)")
    p.add_argument("--model", help="zoo name (beyond-cls zoo) or timm ViT name, e.g. mae_vit_base_patch16 (required)")
    add("--checkpoint", "encoder weights file (local path)", shown="a zoo name's official file under --weights-dir")
    add("--checkpoint-format", "checkpoint layout", shown="auto: the zoo's, else detected", choices=_formats())
    add("--arch", "timm architecture for the weights of a zoo name (e.g. a DINO ViT-S/16); NAME:heads=N states "
        "the head count", shown="the zoo's")
    add("--source", "sub-model of a training checkpoint (I-JEPA target_encoder or encoder, DINO teacher/student)",
        shown="the zoo's")
    add("--weights-dir", "folder with the zoo's official files", shown="$BEYOND_CLS_WEIGHTS")
    p.add_argument("--data", help="dataset root folder (required, except with --dataset synthetic: the built-in set)")
    add("--dataset", "dataset adapter: imagefolder, imagenet, imagenet1pct, cub, food101, cars, pets, coco, "
        "nuswide, synthetic, wds")
    add("--subset-file", "ImageNet-1%% file list (imagenet1pct; default ROOT/1percent.txt)")
    p.add_argument("--out", help="output folder: results, checkpoints, logs (required)")
    add("--img-size", "input resolution", type=_positive_int)
    add("--block", "take tokens from this block (0-based, -1 = last)", shown="the zoo's (SimMIM: 7), else the last",
        type=_block)
    add("--blocks", "layer-wise probing: train the heads on each of these blocks (comma-separated, 0-based, or all) "
        "from one encoder pass; one result row per block, aggregation and lr; excludes --block")
    add("--final-norm", "apply the encoder's final norm to the tokens", shown="off: the paper's pre-norm features",
        action=argparse.BooleanOptionalAction)
    add("--heads", "comma-separated aggregations: cls, mean, abmilp, abmilp+cls, abmilp-k4-mlp2-gelu-pos, "
        "saabmilp, ap1, ap12, ...; non-trainable: attn-mean, attn-minent, attn-center (the token block's "
        "attention), guide:MODEL[@CHECKPOINT] (another encoder's [cls] attention)")
    add("--lrs", "comma-separated base learning rates; every head is trained with each (default: --blr)")
    add("--epochs", "training epochs (the paper: 90, 50 for ViT-L/H)", type=_positive_int)
    add("--warmup-epochs", "linear warm-up epochs", shown="10, or 10/90 of runs of 10 epochs or fewer",
        type=_non_negative_float)
    add("--batch-size", "images per process per micro-batch", type=_positive_int)
    add("--accum-iter", "micro-batches per optimizer step; default effective batch / (batch size x processes)",
        type=_positive_int)
    add("--effective-batch", "images per optimizer step over all processes", type=_positive_int)
    add("--blr", "base learning rate: lr = blr x effective batch / 256", type=_positive_float)
    add("--lr", "absolute learning rate (overrides --blr)", type=_positive_float)
    add("--min-lr", "learning rate at the end of the cosine", type=_non_negative_float)
    add("--optimizer", "lars (MAE protocol) or sgd (small sets: CUB, ImageNet-1%%)", choices=OPTIMIZERS)
    add("--momentum", "optimizer momentum", type=_non_negative_float)
    add("--weight-decay", "weight decay", type=_non_negative_float)
    add("--seeds", "comma-separated seeds; results are averaged over them")
    add("--eval-every", "evaluate every N epochs as well as at the end (0: only at the end)", type=_non_negative_int)
    add("--num-workers", "data loading workers per process", type=_non_negative_int)
    add("--decode", "where JPEGs are decoded and augmented", choices=DECODE_CHOICES)
    add("--cache", "feature cache folder: extract tokens once, train the heads from disk")
    add("--cache-views", "augmented train views cycled over the epochs (with --cache: default 1)",
        type=_positive_int)
    add("--cache-dtype", "feature cache precision", choices=["bf16", "fp32"])
    add("--ckpt-minutes", "also checkpoint every this many minutes (0: every step)", type=_non_negative_float)
    add("--resume", "auto (continue OUT's checkpoint), none, or a checkpoint file")
    add("--compile", "torch.compile the encoder", action="store_true", default=None)
    add("--channels-last", "channels-last images and encoder", action="store_true", default=None)
    add("--amp", "autocast precision (auto: bf16 on CUDA, fp32 on CPU)", choices=AMP_CHOICES)
    add("--skip-bad-images", "skip and count unreadable images instead of stopping", action="store_true",
        default=None)
    add("--mean", "input normalization mean, three comma-separated numbers (default ImageNet's)")
    add("--std", "input normalization std, three comma-separated numbers (default ImageNet's)")
    add("--device", "auto, cpu, cuda or cuda:N (under torchrun/srun: the local GPU)")
    add("--log-every", "optimizer steps per log line", type=_positive_int)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Information flow in self-supervised ViTs and Selective Aggregation."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze", help="attention statistics of an encoder over a dataset (paper Figs. 3-6)",
        description="Stream a dataset split (an ImageFolder unless --dataset) through an encoder under the "
        "AttentionRecorder; write "
        "attention_stats.json and attention_stats.png into --out and print the per-block table. --model repeats: "
        "the images are decoded once for all encoders, each normalized with its own mean/std, and each "
        "--checkpoint, --checkpoint-format, --arch and --source belongs to the --model before it, e.g. "
        "beyond-cls analyze --model mae_vit_base_patch16 --checkpoint mae.pth --model dino_vit_base_patch16 "
        "--checkpoint dino.pth --data IMAGENET --out runs/flow. Several models write OUT/<label>/ per model "
        "(label: the model name, name@<checkpoint stem> when names repeat), OUT/attention_stats.png with all of "
        "them and OUT/analyze_models.json; compare them with beyond-cls compare OUT/*/.",
    )
    analyze.add_argument("--config", help="YAML file with the same keys as the flags (flags win); "
                         "model: [a, b] with checkpoint: [a.pth, null] for several encoders")
    _add_encoder_args(analyze, required=True, per_model=True)
    analyze.add_argument("--data", help="dataset root holding SPLIT/<class>/<images> (or --dataset's layout)")
    analyze.add_argument("--dataset", help="dataset adapter of --data (default imagefolder; e.g. wds for shards)")
    analyze.add_argument("--split", help="split folder under --data (default val); train or val for other adapters")
    analyze.add_argument("--out", help="output directory")
    _add_run_args(analyze)

    probe = sub.add_parser(
        "probe", help="linear probing with a bank of aggregation heads (paper Table 1)",
        description="Train BatchNorm + Linear heads on the frozen encoder's tokens, every --heads x --lrs "
        "combination at once on one encoder pass, following the MAE linear-probing protocol; write "
        "results.json/.csv and print the table. Launch with torchrun or srun for many GPUs.",
    )
    _add_probe_args(probe)

    compare = sub.add_parser(
        "compare", help="the paper's Figs. 3-6 and Table 3 from several analyze runs",
        description="Draw the information-flow figures (one line per model over blocks, MIM solid, JEA dashed), "
        "per-head heatmaps and Table 3 (aggregation entropy) from analyze outputs; write CSVs and report.md.",
    )
    compare.add_argument("inputs", nargs="+", help="analyze output folders (a multi-model one stands for each of "
                         "its models) or attention_stats.json files")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--names", help="comma-separated display names, one per input")
    compare.add_argument("--family", action="append", default=[], metavar="NAME=FAMILY",
                         help="family of a model (MIM or JEA), repeatable; inferred from the name otherwise")

    report = sub.add_parser(
        "probe-report", help="accuracy vs block per aggregation of a probe --blocks run",
        description="Plot the best-lr accuracy of each aggregation over the blocks of a layer-wise probe run "
        "(probe --blocks) into OUT/blocks.png and OUT/blocks.csv, beside the [cls]-to-patch attention entropy "
        "per block of an analyze run when --analyze is given.",
    )
    report.add_argument("run", help="probe output folder (holding results.json)")
    report.add_argument("--out", required=True, help="output folder")
    report.add_argument("--analyze", help="analyze output folder of the same encoder (attention_stats.json)")

    zoo = sub.add_parser(
        "zoo", help="the paper's encoders: architecture, size, official file, where to get it, presence",
        description="List the encoder zoo. Official files are looked up under --weights-dir or "
        "$BEYOND_CLS_WEIGHTS (nothing is downloaded); --check loads every present file strictly.",
    )
    zoo.add_argument("--weights-dir", help="folder holding the official files (default $BEYOND_CLS_WEIGHTS)")
    zoo.add_argument("--check", action="store_true", help="load every present file strictly; print OK or the error")

    demo = sub.add_parser(
        "demo", help="generate the synthetic set, analyze a small ViT on it and probe it",
        description="Write the embedded synthetic dataset into the cache ($BEYOND_CLS_CACHE or "
        "~/.cache/beyond_cls), run analyze on it, then probe with [cls], mean and AbMILP heads on cached "
        "tokens (random weights unless --checkpoint). Outputs in OUT and OUT/probe.",
    )
    _add_encoder_args(demo, required=False)
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="output directory (default runs/demo)")
    _add_run_args(demo)

    aggregations = sub.add_parser(
        "aggregations", help="non-trainable vs trained aggregations: entropy, KL, maps (paper Tab. 5, Figs. 7, 9)",
        description="Selection vectors of each --methods entry over a dataset split (eval transform: resize 256, "
        "center crop 224): write aggregations.json/.csv (mean aggregation entropy per method), kl.csv and kl.png "
        "(mean pairwise KL) and examples.png (selection maps of the first images) into --out.",
    )
    _add_encoder_args(aggregations, required=True)
    aggregations.add_argument("--data", help="dataset root")
    aggregations.add_argument("--dataset", help="dataset adapter of --data (default imagefolder)")
    aggregations.add_argument("--split", help="split (default val)")
    aggregations.add_argument("--methods", help="comma-separated: attn-mean, attn-minent, attn-center, "
                              "guide:MODEL[@CHECKPOINT], abmilp:RUN[#KEY] (RUN: a beyond-cls probe --out folder, "
                              "KEY: one of its heads)")
    aggregations.add_argument("--out", help="output directory")
    aggregations.add_argument("--examples", type=_non_negative_int, help="images in examples.png (default 4)")
    _add_run_args(aggregations)

    localize = sub.add_parser(
        "localize", help="MaxBoxAccV2 of [cls] attention and AbMILP maps (paper Tab. 7/8, Fig. 8)",
        description="Resize images to --img-size squared (no crop, the WSOL protocol), read ground-truth boxes "
        "from --boxes/<image stem>.xml (Pascal VOC), score each --map with MaxBoxAccV2; write localization.json "
        "and overlays (ground truth blue, [cls] red, AbMILP green) into --out.",
    )
    _add_encoder_args(localize, required=True)
    localize.add_argument("--data", help="dataset root (ImageNet: SPLIT/<wnid>/<images>)")
    localize.add_argument("--dataset", help="dataset adapter of --data (default imagefolder)")
    localize.add_argument("--split", help="split (default val)")
    localize.add_argument("--boxes", help="folder of Pascal-VOC XML annotations named like the images")
    localize.add_argument("--map", dest="maps", action="append", metavar="MAP",
                          help="cls-attn or abmilp:RUN[#KEY] (or any aggregations method); repeatable")
    localize.add_argument("--out", help="output directory")
    localize.add_argument("--overlays", type=_non_negative_int, help="images drawn as overlays (default 8)")
    _add_run_args(localize)

    shard = sub.add_parser(
        "shard", help="write an ImageFolder's train/ and val/ as WebDataset shards (read with --dataset wds)",
        description="Write DATA/train and DATA/val in ImageFolder order (classes sorted, files sorted) as "
        "OUT/NAME-train-NNNN.tar and OUT/NAME-validation-NN.tar (<key>.jpg + <key>.cls + <key>.json) plus "
        "OUT/classes.txt. Each shard is renamed into place only when complete.",
    )
    shard.add_argument("--data", required=True, help="ImageFolder root holding train/<class>/ and val/<class>/")
    shard.add_argument("--out", required=True, help="output folder for the shards")
    shard.add_argument("--name", default="shards", help="shard file-name prefix (default shards)")
    shard.add_argument("--shard-size", default="1GB", help="per shard: a size such as 500MB or 1GB (decimal; "
                       "KiB/MiB/GiB binary), or a plain number of samples (default 1GB)")

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

    bench_probe = bench.add_parser(
        "probe", help="images/s of the probe's loader, encoder and head bank vs a per-head baseline script",
        description="Loader (synthetic set unless --data), frozen encoder, head bank and the full step, then a "
        "baseline like the authors' script (unfused eager attention, one head per run, fp16, DDP with "
        "find_unused_parameters). The design target on GPU is >= 2.5x the baseline per head.",
    )
    bench_probe.add_argument("--model", help="timm ViT name (default vit_base_patch16_224)")
    bench_probe.add_argument("--checkpoint", help="encoder weights (local path)")
    bench_probe.add_argument("--heads", help="head specs as for probe (default cls,mean,abmilp,abmilp+cls)")
    bench_probe.add_argument("--lrs", help="base learning rates; the bank trains heads × lrs (default 0.1)")
    bench_probe.add_argument("--data", help="dataset root for the loader measurement (default: the synthetic set)")
    bench_probe.add_argument("--dataset", help="dataset adapter of --data (default imagefolder)")
    bench_probe.add_argument("--img-size", type=_positive_int, help="input resolution (default 224)")
    bench_probe.add_argument("--batch-size", type=_positive_int, help="images per batch (default 64)")
    bench_probe.add_argument("--steps", type=_positive_int, help="timed batches per measurement (default 10)")
    bench_probe.add_argument("--warmup", type=_non_negative_int, help="untimed batches first (default 3)")
    bench_probe.add_argument("--num-workers", type=_non_negative_int, help="loader workers (default 8)")
    bench_probe.add_argument("--decode", choices=["cpu", "gpu"], help="loader decoding (default cpu)")
    bench_probe.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    bench_probe.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], help="autocast (default auto)")
    bench_probe.add_argument("--no-baseline", dest="baseline", action="store_const", const=False,
                             help="skip the baseline runs")
    return parser


def _run_analyze(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.analyze import AnalyzeConfig, analyze

    analyze(load_config(AnalyzeConfig, args.config, **_overrides(args)))


def _run_probe(args: argparse.Namespace) -> None:
    from beyond_cls.probe import ProbeConfig, run

    run(load_config(ProbeConfig, args.config, **_overrides(args)))


def _run_compare(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.compare import compare

    families = {}
    for item in args.family:
        name, sep, family = item.partition("=")
        if not sep or not name or not family:
            raise ValueError(f"--family expects NAME=FAMILY, got {item!r}")
        families[name] = family
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    result = compare(args.inputs, args.out, names=names, families=families or None)
    for warning in result["warnings"]:
        print(f"note: {warning}")
    print(f"wrote {result['files']['report']}")


def _run_zoo(args: argparse.Namespace) -> None:
    from beyond_cls.models.zoo_table import zoo_rows
    from beyond_cls.probe.logs import format_table

    rows = zoo_rows(args.weights_dir, check=args.check)
    columns = ["name", "family", "architecture", "params (M)", "file", "present"] + (["check"] if args.check else [])
    print(format_table(rows, columns))
    print()
    for row in rows:
        print(f"{row['name']}: {row['get it from']}")
    failed = [row for row in rows if "error" in row]
    for row in failed:  # below the table, so its cells stay one line each
        print(f"\ncheck failed: {row['name']}:\n  " + row["error"].replace("\n", "\n  "))
    if failed:
        raise ValueError(f"{len(failed)} zoo check(s) failed: {', '.join(r['name'] for r in failed)} (details above)")


def _run_demo(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.analyze import AnalyzeConfig, analyze
    from beyond_cls.data import make_synthetic_dataset
    from beyond_cls.probe import ProbeConfig, run

    root = make_synthetic_dataset()
    overrides = _overrides(args)
    overrides["model"] = overrides["model"] or DEMO_MODEL
    analyze(load_config(AnalyzeConfig, None, data=str(root), **overrides))
    probe = {k: overrides[k] for k in ("model", "checkpoint", "checkpoint_format", "arch", "source", "weights_dir",
                                      "img_size", "num_workers",
                                      "device", "progress") if overrides.get(k) is not None}
    out = Path(overrides["out"])
    run(ProbeConfig(data=str(root), out=str(out / "probe"), cache=str(out / "cache"), amp=args.precision or "auto",
                    **{**DEMO_PROBE, **probe}))


def _run_probe_report(args: argparse.Namespace) -> None:
    from beyond_cls.probe.layers_report import probe_report

    files = probe_report(args.run, args.out, analyze=args.analyze)
    print(f"wrote {files['figure']} and {files['csv']}")


def _run_bench(args: argparse.Namespace) -> None:
    if args.bench == "probe":
        from beyond_cls.probe.bench import BenchProbeConfig, bench_probe

        bench_probe(load_config(BenchProbeConfig, None, **_overrides(args)))
        return
    from beyond_cls.analysis.bench import BenchAnalyzeConfig, bench_analyze

    bench_analyze(load_config(BenchAnalyzeConfig, None, **_overrides(args)))


def _run_aggregations(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.aggregations import AggregationsConfig, aggregations

    aggregations(load_config(AggregationsConfig, None, **_overrides(args)))


def _run_localize(args: argparse.Namespace) -> None:
    from beyond_cls.analysis.localize import LocalizeConfig, localize

    localize(load_config(LocalizeConfig, None, **_overrides(args)))


def _run_shard(args: argparse.Namespace) -> None:
    from beyond_cls.data.shard_writer import write_shards

    written = write_shards(args.data, args.out, name=args.name, shard_size=args.shard_size)
    for split, files in written.items():
        print(f"{split}: {len(files)} shard(s) in {args.out}")


def _overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "bench")}


COMMANDS = {
    "analyze": _run_analyze, "probe": _run_probe, "compare": _run_compare, "zoo": _run_zoo, "demo": _run_demo,
    "bench": _run_bench, "aggregations": _run_aggregations, "localize": _run_localize, "shard": _run_shard,
    "probe-report": _run_probe_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``beyond-cls``; returns the exit code (2 for bad input)."""
    args = build_parser().parse_args(argv)
    from beyond_cls.probe.trainer import Preempted

    try:
        COMMANDS[args.command](args)
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
