"""``probe --eval``: evaluate the heads of a probe run's checkpoints on the eval split, training state untouched.

Each seed's checkpoint (finished, or the latest of an unfinished run) is loaded into the head bank its settings
build; the encoder runs on the eval split (no feature cache) and :meth:`ProbeTrainer.evaluate` scores the heads
exactly as training's final evaluation does. ``eval.json`` and ``eval.csv`` are written beside the run's results;
nothing else in the folder changes. The settings that decide what is evaluated (encoder, token source, data,
normalization, heads and lrs) must be the run's; the eval view (``--crop-pct``, ``--interpolation``) may differ, and
training-only settings (schedule, optimizer, train crop, cache) are not read.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from beyond_cls.config import ConfigError
from beyond_cls.probe.bank import HeadBank, head_key, legacy_bank_state
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv
from beyond_cls.probe.inputs import load_inputs
from beyond_cls.probe.logs import write_csv, write_json_atomic
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.state import STATE_FILE, load_state
from beyond_cls.probe.streams import EncoderStream
from beyond_cls.probe.summary import summarize
from beyond_cls.probe.trainer import ProbeTrainer, _trained
from beyond_cls.runlock import claim_output
from beyond_cls.tables import format_table

__all__ = ["EVAL_FILE", "EVALUATED_KEYS", "check_evaluable", "evaluate_run"]

EVAL_FILE = "eval.json"
#: Settings a checkpoint's heads were trained on that ``--eval`` must repeat (resume keys less the training-only
#: ones and the eval view's crop_pct / interpolation).
EVALUATED_KEYS = ("model", "checkpoint", "checkpoint_format", "arch", "source", "dataset", "data", "subset_file",
                  "img_size", "block", "blocks", "n_last_blocks", "final_norm", "mean", "std")


def check_evaluable(path: Path, state: dict[str, Any], cfg: ProbeConfig, keys: list[str]) -> None:
    """One-line ConfigError naming each :data:`EVALUATED_KEYS` setting (saved → given) in which ``cfg`` differs from
    the run that wrote ``state`` (read from ``path``), or the head keys when ``keys`` are not the checkpoint's."""
    saved, given = _trained(state["config"]), _trained(asdict(cfg))
    diffs = [f"{k}: {saved[k]!r} → {given[k]!r}" for k in EVALUATED_KEYS if saved[k] != given[k]]
    if diffs:
        raise ConfigError(f"--eval: {path} was trained with other model/data settings ({', '.join(diffs)}); give the "
                          "run's settings (its config.yaml)")
    if list(state["heads"]) != list(keys):
        raise ConfigError(f"--eval: {path} holds heads {', '.join(state['heads'])}; these --heads / --lrs make "
                          f"{', '.join(keys)}; give the run's --heads and --lrs (or --blr)")


def _checkpoints(cfg: ProbeConfig) -> dict[int, Path]:
    """Each seed's checkpoint in ``--out``; a one-line ConfigError when one is missing."""
    out = Path(cfg.out)
    paths = {seed: out / f"seed{seed}" / STATE_FILE for seed in cfg.seed_list()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(f"--eval: {out} holds no probe checkpoint {missing[0]} (seeds {cfg.seeds}); give the "
                          "--out of a probe run that has saved one")
    return paths


def evaluate_run(cfg: ProbeConfig, env: DistEnv, specs: list[str], base_lrs: list[float]) -> dict[str, Any]:
    """Evaluate every seed's checkpoint in ``cfg.out``; return ``{"rows", "summary", ...}`` as written to
    ``eval.json`` (rows: the final-evaluation metrics of each head, its checkpoint's epoch and ``finished``)."""
    started = time.perf_counter()
    paths = _checkpoints(cfg)
    states = {seed: load_state(path) for seed, path in paths.items()}
    listed = cfg.block_list(None)  # the settings are checked before anything loads; "all" once the depth is known
    groups: list[int | None] = [None] if listed is None else listed
    if listed != []:
        for seed, state in states.items():
            check_evaluable(paths[seed], state, cfg, [head_key(s, lr, b) for b in groups for s in specs
                                                       for lr in base_lrs])
    out = Path(cfg.out)
    inputs = load_inputs(cfg, env, specs)  # as the run read them; its eval view may differ (--crop-pct, ...)
    train_set, val_set, info, blocks = inputs.train_set, inputs.val_set, inputs.info, inputs.blocks
    n_last = cfg.n_last_blocks or 1
    train_views = inputs.train_views(cfg.seed_list()[0])  # never read: the stream's train side
    val_views = inputs.val_views
    rows: list[dict[str, Any]] = []
    with claim_output(out, "probe") if env.is_main else nullcontext():  # no training run writes there meanwhile
        for seed, state in states.items():
            args = (specs, base_lrs, inputs.width, train_set.num_classes, info.num_prefix_tokens,
                    info.has_class_token)
            kwargs = dict(seed=seed, blocks=blocks, grid=info.grid_size, n_last_blocks=n_last)
            bank = HeadBank(*args, **kwargs)
            check_evaluable(paths[seed], state, cfg, [e.key for e in bank.entries])
            if legacy_bank_state(state["bank"], bank.state_dict()):  # written by beyond-cls 0.1
                bank = HeadBank(*args, **kwargs, legacy=True)
            bank.load_state_dict(state["bank"])
            sampler = TrainBatchSampler(len(train_set), cfg.batch_size, 1, env.world_size, env.rank, seed=seed)
            val_sampler = EvalBatchSampler(len(val_set), cfg.batch_size, env.world_size, env.rank)
            stream = EncoderStream(inputs.source, train_views, val_views, sampler, val_sampler, cfg.num_workers,
                                   env.device, cfg.precision, cfg.channels_last)
            trainer = ProbeTrainer(cfg, env, seed, out / f"seed{seed}", bank, stream, max(sampler.steps_per_epoch, 1),
                                   state["effective_batch"], 1, inputs.multilabel, eval_batches=len(val_sampler))
            trainer.log.enabled = False  # metrics.jsonl is the training's record
            results = trainer.evaluate()
            counts = {"eval_images": trainer.eval_images, "eval_skipped": trainer.eval_skipped}
            for entry in bank.entries:
                lr = state["config"].get("lr") or entry.blr * state["effective_batch"] / 256
                block = inputs.block if entry.block is None else entry.block
                rows.append({"seed": seed, "head": entry.key, "aggregation": entry.spec, "blr": entry.blr, "lr": lr,
                             **results[entry.key], "epoch": state["epoch"], "finished": state["final"] is not None,
                             **counts, "block": block})
            del stream, trainer
        summary = summarize(rows)
        report = {
            "rows": rows, "summary": summary, "encoder": asdict(info), "config": asdict(cfg),
            "checkpoints": {str(seed): str(path) for seed, path in paths.items()},
            "eval_view": {"crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
                          "resize_size": val_views.spec.resize_size},
            "seconds": time.perf_counter() - started,
        }
        if env.is_main:
            write_json_atomic(report, out / EVAL_FILE)
            write_csv(rows, out / "eval.csv")
            metrics = ["mAP"] if inputs.multilabel else ["top1", "top5"]
            columns = ["aggregation", "blr", "lr", *metrics, "entropy", "best"]
            print(format_table(summary, columns if blocks is None else ["block", *columns]))
            epochs = sorted({(r["epoch"], r["finished"]) for r in rows})
            print("evaluated checkpoints at epoch " + ", ".join(f"{e}{'' if f else ' (unfinished)'}" for e, f in epochs)
                  + f"; eval view: resize {val_views.spec.resize_size} ({cfg.interpolation}), crop {cfg.img_size}")
            print(f"wrote {out / EVAL_FILE} and {out / 'eval.csv'}")
    return report
