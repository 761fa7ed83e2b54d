"""The start of a probe run: its resolved settings printed once (main process) as the settings block and written
with the resolved config into ``config.yaml``, and the clock of the whole run's ETA."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import yaml

from beyond_cls.probe.inputs import RunInputs
from beyond_cls.probe.run_cache import RunCache
from beyond_cls.run_summary import RunClock, format_settings, probe_rows, probe_units, settings_dict
from beyond_cls.runtime import autocast_dtype

__all__ = ["announce", "whole_run_clock"]


def announce(inputs: RunInputs, heads: int, cache: RunCache | None) -> None:
    """On the main process: print the settings block (``heads``: the bank's size; ``cache``: its state for the
    first seed) and write ``config.yaml`` (the config, the batch accounting and those settings)."""
    cfg, env = inputs.cfg, inputs.env
    if not env.is_main:
        return
    seed = cfg.seed_list()[0]
    sampler, val_sampler = inputs.samplers(seed)
    rows = probe_rows(
        cfg, inputs.info, device=env.device, dtype=autocast_dtype(cfg.precision, env.device),
        world_size=env.world_size, accum=inputs.accum, effective=inputs.effective,
        train=(len(inputs.train_set), inputs.train_set.num_classes),
        val=(len(inputs.val_set), inputs.val_set.num_classes), micro_per_epoch=sampler.micro_per_epoch,
        steps_per_epoch=sampler.steps_per_epoch, eval_batches=len(val_sampler), block=inputs.block,
        blocks=inputs.blocks, heads=heads, cache=None if cache is None else cache.state(seed),
    )
    print(format_settings(rows, f"probe {cfg.model} -> {cfg.out}"), flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {**asdict(cfg), "world_size": env.world_size, "accum_iter": inputs.accum,
                "effective_batch": inputs.effective, "settings": settings_dict(rows)}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))


def whole_run_clock(inputs: RunInputs) -> RunClock:
    """The clock of the whole run's ETA: every seed's micro-batches and evaluations."""
    cfg = inputs.cfg
    sampler, val_sampler = inputs.samplers(cfg.seed_list()[0])
    units = probe_units(cfg.epochs, cfg.eval_every, sampler.micro_per_epoch, len(val_sampler))
    return RunClock(len(cfg.seed_list()) * units)
