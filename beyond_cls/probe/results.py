"""A probe run's results: each seed's rows (one per head), the whole run's record (``results.json``,
``results.csv``) and its console report (the table, the legend, the image counts)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from beyond_cls.probe.bank import HeadBank
from beyond_cls.probe.inputs import RunInputs
from beyond_cls.probe.logs import format_image_counts, write_csv, write_json_atomic
from beyond_cls.probe.metrics import last_and_best
from beyond_cls.probe.summary import summarize
from beyond_cls.probe.trainer import ProbeTrainer
from beyond_cls.tables import format_table
from beyond_cls.units import units_of

__all__ = ["RESULTS_CSV", "RESULTS_FILE", "SeedResults", "run_results", "results_report", "seed_results",
           "write_results"]

RESULTS_FILE = "results.json"
RESULTS_CSV = "results.csv"


class SeedResults(NamedTuple):
    """One seed's rows (per head), its image counts (evaluated, skipped) and the images it trained now."""

    seed: int
    rows: list[dict[str, Any]]
    counts: dict[str, int]
    images_trained: int


def seed_results(inputs: RunInputs, seed: int, bank: HeadBank, trainer: ProbeTrainer,
                 final: dict[str, dict[str, Any]]) -> SeedResults:
    """The rows of ``seed``'s heads: their final evaluation ``final``, last and best accuracy (or mAP), lr, block."""
    counts = trainer.image_counts()
    metric = "mAP" if inputs.multilabel else "top1"
    rows = []
    for entry in bank.entries:
        lr = inputs.cfg.lr if inputs.cfg.lr is not None else entry.blr * inputs.effective / 256
        block = inputs.block if entry.block is None else entry.block
        rows.append({"seed": seed, "head": entry.key, "aggregation": entry.spec, "blr": entry.blr, "lr": lr,
                     **final[entry.key], **last_and_best(trainer.history, entry.key, metric), **counts,
                     "block": block})
    return SeedResults(seed, rows, counts, trainer.images_trained)


def run_results(inputs: RunInputs, seeds: list[SeedResults], seconds: float) -> dict[str, Any]:
    """The whole run's record, as written to ``results.json``: rows, summary over seeds, encoder, settings."""
    cfg, env, info = inputs.cfg, inputs.env, inputs.info
    rows = [row for s in seeds for row in s.rows]
    summary = summarize(rows)
    return {
        "rows": rows, "summary": summary, "encoder": asdict(info), "config": asdict(cfg),
        "token_source": {"block": inputs.block, "blocks": inputs.blocks, "final_norm": info.final_norm,
                         "source": info.source, "n_last_blocks": cfg.n_last_blocks},
        "world_size": env.world_size, "accum_iter": inputs.accum, "effective_batch": inputs.effective,
        "seconds": seconds, "images_trained": sum(s.images_trained for s in seeds),
        "images": {str(s.seed): s.counts for s in seeds},  # evaluated and skipped, per seed
        "units": units_of(summary[0] if summary else ()),  # accuracies in %, entropies in nats
        "normalization": {"mean": list(inputs.view_kwargs["mean"]), "std": list(inputs.view_kwargs["std"])},
    }


def write_results(results: dict[str, Any], out: Path) -> None:
    """``results.json`` (the whole record) and ``results.csv`` (its rows), both written atomically."""
    write_json_atomic(results, out / RESULTS_FILE)
    write_csv(results["rows"], out / RESULTS_CSV)


def results_report(results: dict[str, Any], inputs: RunInputs, seeds: list[SeedResults]) -> str:
    """The console report: the summary table, its legend with the run's speed, the image counts, the files."""
    metrics = ["mAP", "mAP_best"] if inputs.multilabel else ["top1", "top1_best", "top5"]
    if len(inputs.cfg.seed_list()) > 1:
        metrics = [m for name in metrics for m in (name, f"{name}_std")]
    columns = ["aggregation", "blr", "lr", *metrics, "best_epoch", "entropy", "best"]
    out = Path(inputs.cfg.out)
    return "\n".join([
        format_table(results["summary"], columns if inputs.blocks is None else ["block", *columns]),
        f"{metrics[0]}: the last epoch's; {metrics[0]}_best: the best evaluated epoch's (best_epoch, per seed; "
        f"every epoch with --eval-every 1); * the best learning rate of each aggregation; {_speed(results)}",
        format_image_counts({s.seed: s.counts for s in seeds}),
        f"wrote {out / RESULTS_FILE} and {out / RESULTS_CSV}",
    ])


def _speed(results: dict[str, Any]) -> str:
    """'12.3 min in all, 456 training images/s' (images trained by this invocation, every process)."""
    seconds, images = results["seconds"], results["images_trained"]
    if not images:
        return f"{seconds / 60:.1f} min in all (nothing left to train: a finished run)"
    rate = f", {images / seconds:.0f} training images/s"
    return f"{seconds / 60:.1f} min in all{rate}"
