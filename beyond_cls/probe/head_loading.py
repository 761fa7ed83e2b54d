"""Trained AbMILP heads of a finished (or running) probe run, rebuilt from its config and first checkpoint.

Used by the ``abmilp:RUN[#KEY]`` selection method (:mod:`beyond_cls.selection`) of the aggregations and
localization jobs. A checkpoint written by beyond-cls 0.1 (SA-AbMILP with a qkv bias, ``-pos`` with a fixed
embedding that the state dict lacks) is told by its keys and rebuilt the way it was trained
(:func:`legacy_bank_state`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from beyond_cls.config import ConfigError, current_names
from beyond_cls.heads.registry import parse_heads
from beyond_cls.probe.bank import HeadBank, HeadEntry, legacy_bank_state
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.state import STATE_FILE, load_state

__all__ = ["ProbeHead", "legacy_bank_state", "load_probe_head", "read_run_config"]


@dataclass
class ProbeHead:
    """A trained AbMILP head of a probe run and the encoder settings its tokens need."""

    key: str
    spec: str
    aggregation: nn.Module
    with_cls: bool
    config: dict  # the run's resolved config.yaml
    block: int | None  # token source: block index (None: the last) and final norm
    final_norm: bool
    seed: int = 0  # the seed whose checkpoint gave the weights
    run: str = ""  # the probe run folder

    def describe(self) -> dict:
        """What a job records about the head it used: run, key, spec, seed and token block."""
        return {"run": self.run, "head": self.key, "spec": self.spec, "seed": self.seed, "block": self.block,
                "final_norm": self.final_norm}


def _content(agg: nn.Module) -> str | None:
    inner = getattr(agg, "abmilp", agg)  # SA-AbMILP wraps an AbMILP
    return getattr(inner, "content", None) if hasattr(agg, "forward_with_scores") else None


def read_run_config(run: str | os.PathLike) -> tuple[dict, ProbeConfig]:
    """``(raw dict, ProbeConfig)`` of a probe run's ``config.yaml``, read with ``yaml.safe_load``; a file that is not
    plain YAML (e.g. Python tags) or not a mapping is a one-line ConfigError naming it."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"probe run {Path(run)} not found (no {path}; expected a beyond-cls probe --out)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"probe run config {path}{where} is not plain YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"probe run config {path} must be a mapping of probe settings, got {type(raw).__name__}")
    fields = set(ProbeConfig.__dataclass_fields__)
    values = current_names(ProbeConfig, raw, f"probe run config {path}")  # e.g. an older run's amp: precision
    return raw, ProbeConfig(**{k: v for k, v in values.items() if k in fields})


def _choose_head(root: Path, scored: list[HeadEntry], head: str | None) -> HeadEntry:
    """The bank entry ``head`` names (key, else spec) among the AbMILP entries; ambiguity is an error."""
    keys = ", ".join(e.key for e in scored)
    if head is None:
        if len(scored) == 1:
            return scored[0]
        raise ConfigError(f"probe run {root} has {len(scored)} AbMILP heads; choose one with abmilp:{root}#KEY, "
                          f"KEY one of: {keys}")
    found = [e for e in scored if e.key == head] or [e for e in scored if e.spec == head]
    if not found:
        raise ConfigError(f"probe run {root} has no AbMILP head {head!r}; its AbMILP heads: {keys}")
    if len(found) > 1:
        raise ConfigError(f"probe run {root}: {head!r} matches {len(found)} AbMILP heads; choose one with "
                          f"abmilp:{root}#KEY, KEY one of: {', '.join(e.key for e in found)}")
    return found[0]


def load_probe_head(run: str | os.PathLike, head: str | None = None, encoder_info=None) -> ProbeHead:
    """Rebuild head ``head`` (a key like ``abmilp@blr0p1``, ``b5/abmilp@blr0p1`` in a ``--blocks`` run, or a spec
    like ``abmilp`` naming one head; None: the run's only AbMILP head) of the probe run in ``run`` from its first
    seed's checkpoint. ``encoder_info`` (the run's encoder's :class:`EncoderInfo`) gives the token layout; without
    it the run's ``results.json`` is read."""
    root = Path(run)
    raw, cfg = read_run_config(root)
    if (cfg.n_last_blocks or 1) > 1:
        raise ConfigError(f"probe run {root} concatenates the last {cfg.n_last_blocks} blocks' tokens "
                          "(--n-last-blocks); its heads read tokens that abmilp:RUN does not give")
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if encoder_info is not None:
        prefix, has_cls, dim = encoder_info.num_prefix_tokens, encoder_info.has_class_token, encoder_info.embed_dim
        grid = tuple(encoder_info.grid_size)
    elif "encoder" in results:
        enc = results["encoder"]
        prefix, has_cls, dim = enc["num_prefix_tokens"], enc["has_class_token"], enc["embed_dim"]
        grid = tuple(enc["grid_size"])
    else:
        raise FileNotFoundError(f"probe run {root}: no results.json (is the run finished?)")
    seed = next((s for s in cfg.seed_list() if (root / f"seed{s}" / STATE_FILE).is_file()), None)
    if seed is None:
        raise FileNotFoundError(f"probe run {root}: no seed<k>/{STATE_FILE} for seeds {cfg.seed_list()}")
    state = load_state(root / f"seed{seed}" / STATE_FILE)["bank"]
    specs, lrs = parse_heads(cfg.heads), cfg.base_lrs()
    weights = [v for k, v in state.items() if k.endswith(".head.1.weight")]
    source = results.get("token_source", {})
    # a layer-wise run (probe --blocks): keys b<k>/..., one head per block; the keys tell when results.json
    # is not written yet (an unfinished or killed run)
    blocks = source.get("blocks") or sorted({int(m[1]) for k in state if (m := re.match(r"heads\.b(\d+)/", k))})
    args = (specs, lrs, dim, int(weights[0].shape[0]), prefix, has_cls)
    bank = HeadBank(*args, blocks=blocks or None, grid=grid)
    if legacy_bank_state(state, bank.state_dict()):  # written by beyond-cls 0.1: build its heads as they were then
        bank = HeadBank(*args, blocks=blocks or None, grid=grid, legacy=True)
    bank.load_state_dict(state)
    scored = [e for e in bank.entries if _content(bank.heads[e.key].aggregation) is not None]
    if not scored:
        raise ConfigError(f"probe run {root} has no AbMILP head (heads: {cfg.heads})")
    entry = _choose_head(root, scored, head)
    agg = bank.heads[entry.key].aggregation.eval()
    block = entry.block if entry.block is not None else source.get("block", cfg.block)
    final_norm = source.get("final_norm", cfg.final_norm)
    return ProbeHead(entry.key, entry.spec, agg, _content(agg) == "patch+cls", raw, block, bool(final_norm), seed,
                     str(root))
