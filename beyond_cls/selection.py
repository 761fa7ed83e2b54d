"""Selection vectors of non-trainable and trained token aggregations (paper App. C: Tab. 5, Figs. 7-9).

A selection vector is the weight each patch token gets when an aggregation pools an image: ``[B, num_patches]``,
non-negative, summing to 1 per image, patches row-major. Methods (``--methods``, comma-separated):

| method | selection |
|---|---|
| ``attn-mean`` | [cls]->patch attention of the last block, averaged over heads, renormalized over the patches |
| ``attn-minent`` | per image, the head whose renormalized [cls]->patch attention has the lowest entropy |
| ``attn-center`` | the central patch's attention to the patches, averaged over heads, renormalized |
| ``guide:MODEL[@CKPT]`` | ``attn-mean`` of another encoder on the same images |
| ``abmilp:RUN[#KEY]`` | AbMILP scores of a trained probe head (``beyond-cls probe --out RUN``), mean over branches |

For ``abmilp+cls`` heads the [cls] score is dropped and the patch scores renormalized. ``KEY`` is a head key as in
the run's ``results.json`` (``abmilp@blr0p1``) or a spec (``abmilp+cls``) naming one head; without it the run must
have exactly one AbMILP head, else a one-line error lists the keys. The weights are the first seed's that has a
checkpoint. (``abmilp:RUN@KEY`` is accepted too.)

The central patch of a ``gh x gw`` grid is row ``gh // 2``, column ``gw // 2``, i.e. patch index
``(gh // 2) * gw + gw // 2``: the exact centre for odd sizes, the patch below and right of it for even ones
(14 x 14: row 7, column 7, index 105). All attention rows come from one fused pass per encoder and batch under
:class:`~beyond_cls.analysis.row_capture.RowCapture` of ``(0, centre)`` on the last block (no N x N matrix).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from torch import Tensor, nn

from beyond_cls.analysis.row_capture import RowCapture
from beyond_cls.config import ConfigError
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from beyond_cls.runtime import autocast

if TYPE_CHECKING:
    from beyond_cls.probe.bank import HeadEntry
    from beyond_cls.probe.config import ProbeConfig

__all__ = [
    "ATTENTION_METHODS",
    "KL_EPS",
    "Method",
    "ProbeHead",
    "SelectionRunner",
    "attention_queries",
    "attention_selection",
    "center_patch",
    "entropy",
    "kl",
    "load_probe_head",
    "parse_method",
    "parse_methods",
    "read_run_config",
    "renormalize",
    "scores_selection",
]

ATTENTION_METHODS = ("attn-mean", "attn-minent", "attn-center")
KL_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# Method names


@dataclass(frozen=True)
class Method:
    """One parsed method: ``kind`` is an attention method, ``guide`` or ``abmilp``."""

    name: str
    kind: str
    model: str | None = None  # guide: the other encoder
    checkpoint: str | None = None  # guide: its weights
    run: str | None = None  # abmilp: the probe run folder
    head: str | None = None  # abmilp: head key or spec (None: the run's only AbMILP head)


def _split_run(text: str) -> tuple[str, str | None]:
    """``RUN[#KEY]``, or ``RUN[@KEY]``: the first prefix before an ``@`` that is a folder, else split at the first
    ``@`` (a head key such as ``abmilp@blr0p1`` contains ``@`` itself)."""
    if Path(text).is_dir():
        return text, None
    if "#" in text:
        run, _, head = text.rpartition("#")
        return run, head or None
    if "@" not in text:
        return text, None
    cuts = [i for i, c in enumerate(text) if c == "@"]
    for i in cuts:
        if Path(text[:i]).is_dir():
            return text[:i], text[i + 1:] or None
    return text[: cuts[0]], text[cuts[0] + 1:] or None


def parse_method(text: str) -> Method:
    """Parse one method name (see the module docstring); a ValueError names the accepted forms."""
    name = text.strip()
    if name in ATTENTION_METHODS:
        return Method(name, name)
    kind, sep, rest = name.partition(":")
    if sep and rest and kind == "guide":
        model, _, ckpt = rest.partition("@")
        if not model:
            raise ConfigError(f"method {text!r}: expected guide:MODEL[@CHECKPOINT]")
        return Method(name, "guide", model=model, checkpoint=ckpt or None)
    if sep and rest and kind == "abmilp":
        run, head = _split_run(rest)
        return Method(name, "abmilp", run=run, head=head)
    raise ConfigError(
        f"unknown aggregation method {text!r}; expected one of {', '.join(ATTENTION_METHODS)}, "
        "guide:MODEL[@CHECKPOINT] or abmilp:RUN[#KEY]"
    )


def parse_methods(text: str | Sequence[str]) -> list[Method]:
    """Comma-separated (or listed) method names, parsed; duplicates and an empty list are errors."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise ConfigError(f"methods: expected a comma-separated list such as attn-mean,attn-minent; got {text!r}")
    if len(set(items)) != len(items):
        raise ConfigError(f"methods: {text!r} lists a method twice")
    return [parse_method(t) for t in items]


# ----------------------------------------------------------------------------------------------------------------
# Selection vectors, entropy and KL


def renormalize(weights: Tensor) -> Tensor:
    """``weights / weights.sum(-1)`` (non-negative weights over the last dim)."""
    return weights / weights.sum(-1, keepdim=True)


def center_patch(grid_size: tuple[int, int]) -> int:
    """Index of the central patch among the patches: ``(gh // 2) * gw + gw // 2`` (see the module docstring)."""
    gh, gw = grid_size
    return (gh // 2) * gw + gw // 2


def attention_queries(info) -> tuple[int, ...]:
    """Token indices whose last-block attention rows the attention methods read: [cls] (when the encoder has
    one) and the central patch, in the order :func:`attention_selection` expects; ``info`` an EncoderInfo."""
    centre = info.num_prefix_tokens + center_patch(tuple(info.grid_size))
    return (0, centre) if info.has_class_token else (centre,)


def entropy(sel: Tensor) -> Tensor:
    """Entropy in nats of each selection vector over the last dim (0 log 0 = 0, exact); shape ``sel.shape[:-1]``."""
    return -torch.special.xlogy(sel, sel).sum(-1)


def kl(p: Tensor, q: Tensor, reduction: str = "mean") -> Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) over the last dim, in nats; ``reduction`` ``mean`` (over the
    leading dims, e.g. images) or ``none``.

    Terms with p_i = 0 are 0 exactly. Only where q_i = 0 and p_i > 0 (which would make KL infinite) is q_i
    replaced by ``KL_EPS = 1e-12``; every other term is exact. Selection vectors from softmaxes are strictly
    positive, so the epsilon only matters for hand-made or underflowed inputs.
    """
    if p.shape != q.shape:
        raise ValueError(f"kl: p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    q_safe = torch.where(q > 0, q, torch.full_like(q, KL_EPS))
    terms = torch.special.xlogy(p, p) - torch.special.xlogy(p, q_safe)
    out = terms.sum(-1)
    if reduction == "none":
        return out
    if reduction == "mean":
        return out.mean()
    raise ValueError(f"kl: reduction must be 'mean' or 'none', got {reduction!r}")


def attention_selection(method: str, rows: Tensor, num_prefix_tokens: int) -> Tensor:
    """Selection ``[B, num_patches]`` of an attention method from last-block kept rows ``[B, H, R, N]``.

    Row 0 must be [cls]'s (``attn-mean``, ``attn-minent``) and the last row the central patch's
    (``attn-center``), as :class:`SelectionRunner` keeps them. Computed in float64.
    """
    rows = rows.double()
    patches = rows[..., num_prefix_tokens:]  # [B, H, R, P]
    if method == "attn-mean":
        return renormalize(patches[:, :, 0].mean(1))
    if method == "attn-center":
        return renormalize(patches[:, :, -1].mean(1))
    if method == "attn-minent":
        per_head = renormalize(patches[:, :, 0])  # [B, H, P]
        best = entropy(per_head).argmin(1)  # [B]
        return per_head[torch.arange(per_head.shape[0], device=per_head.device), best]
    raise ValueError(f"unknown attention method {method!r}; expected one of {ATTENTION_METHODS}")


def scores_selection(scores: Tensor, with_cls: bool) -> Tensor:
    """Selection ``[B, num_patches]`` from AbMILP scores ``[B, K, N']``: mean over branches, the [cls] score
    (first, when ``with_cls``) dropped and the rest renormalized."""
    s = scores.double().mean(1)
    return renormalize(s[:, 1:]) if with_cls else s


# ----------------------------------------------------------------------------------------------------------------
# Trained probe heads


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
    from beyond_cls.probe.config import ProbeConfig

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
    return raw, ProbeConfig(**{k: v for k, v in raw.items() if k in fields})


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
    from beyond_cls.probe.bank import HeadBank, parse_heads
    from beyond_cls.probe.state import STATE_FILE, load_state

    root = Path(run)
    raw, cfg = read_run_config(root)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if encoder_info is not None:
        prefix, has_cls, dim = encoder_info.num_prefix_tokens, encoder_info.has_class_token, encoder_info.embed_dim
    elif "encoder" in results:
        enc = results["encoder"]
        prefix, has_cls, dim = enc["num_prefix_tokens"], enc["has_class_token"], enc["embed_dim"]
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
    bank = HeadBank(specs, lrs, dim, int(weights[0].shape[0]), prefix, has_cls, blocks=blocks or None)
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


# ----------------------------------------------------------------------------------------------------------------
# The runner


@dataclass
class _Encoder:
    """One loaded encoder, what each batch needs from it, and the methods it serves."""

    model: nn.Module
    mean: Tensor
    std: Tensor
    attention: list[Method]  # methods read off its kept rows (attn-*, guide)
    heads: list[tuple[Method, ProbeHead]]  # AbMILP heads on its tokens


class SelectionRunner:
    """Selection vectors of several methods for batches of images, each encoder run once per batch.

    ``model`` is the encoder of the ``attn-*`` methods: a name (loaded with ``checkpoint`` etc. as by
    :func:`load_encoder`) or a loaded encoder. ``guide:`` methods and ``abmilp:`` runs bring their own encoders,
    each loaded once; a run whose encoder settings equal ``model``'s (name, weights, normalization) shares it.
    Encoders without a checkpoint get random weights seeded like ``beyond-cls probe`` does (its first seed; 0
    for guides), so a run on a random encoder is reproduced. Call with images ``[B, 3, H, W]`` in [0, 1] (not
    normalized: each encoder applies its own mean/std); returns ``{method name: [B, num_patches] float64}``.
    All methods must see the same patch grid so that their vectors are comparable.
    """

    def __init__(
        self,
        methods: str | Sequence[str | Method],
        model: str | nn.Module | None = None,
        checkpoint: str | None = None,
        *,
        checkpoint_format: str = "auto",
        arch: str | None = None,
        source: str | None = None,
        weights_dir: str | None = None,
        img_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        if isinstance(methods, str):
            self.methods = parse_methods(methods)
        else:
            self.methods = [m if isinstance(m, Method) else parse_method(m) for m in methods]
        self.device = torch.device(device)
        self.precision = precision
        self.img_size = img_size
        self.weights_dir = weights_dir
        self._encoders: dict[tuple, _Encoder] = {}
        main_norm = (tuple(mean) if mean else None, tuple(std) if std else None)
        if isinstance(model, nn.Module):
            main_key: tuple = ("given", id(model))
            self._add_encoder(main_key, model, main_norm)
        else:
            main_kwargs = dict(name=model, checkpoint=checkpoint, checkpoint_format=checkpoint_format, arch=arch,
                               source=source, weights_dir=weights_dir, img_size=img_size)
            main_key = _key(main_kwargs, main_norm)
        for method in self.methods:
            if method.kind in ATTENTION_METHODS:
                if main_key not in self._encoders:
                    if model is None:
                        raise ConfigError(f"method {method.name} needs --model")
                    self._load(main_key, main_kwargs, main_norm, seed=0)
                self._encoders[main_key].attention.append(method)
            elif method.kind == "guide":
                kw = dict(name=method.model, checkpoint=method.checkpoint, weights_dir=weights_dir, img_size=img_size)
                key = _key(kw, (None, None))
                self._load(key, kw, (None, None), seed=0).attention.append(method)
            else:
                self._add_head(method)
        for enc in self._encoders.values():
            info = enc.model.beyond_cls_info
            needs_cls = [m.name for m in enc.attention if m.kind in ("attn-mean", "attn-minent", "guide")]
            if needs_cls and not info.has_class_token:
                raise ConfigError(f"{', '.join(needs_cls)}: encoder {info.name} has no [cls] token "
                                  "(use attn-center or abmilp:RUN)")
        grids = {tuple(e.model.beyond_cls_info.grid_size) for e in self._encoders.values()}
        if len(grids) > 1:
            raise ConfigError(f"methods {', '.join(m.name for m in self.methods)} see different patch grids "
                              f"{sorted(grids)}; use encoders with the same patch size and image size")
        self.grid_size: tuple[int, int] = grids.pop()
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def _add_encoder(self, key: tuple, model: nn.Module, norm: tuple) -> _Encoder:
        from beyond_cls.models.loader import encoder_info

        if not hasattr(model, "beyond_cls_info"):
            model.beyond_cls_info = encoder_info(model)
        model = model.to(self.device).eval()
        info = model.beyond_cls_info
        m = torch.tensor(norm[0] or info.mean or IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        s = torch.tensor(norm[1] or info.std or IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._encoders[key] = _Encoder(model, m, s, [], [])
        return self._encoders[key]

    def _load(self, key: tuple, kwargs: dict, norm: tuple, seed: int) -> _Encoder:
        from beyond_cls.models import load_encoder

        if key not in self._encoders:
            kwargs = dict(kwargs)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # a random encoder (no checkpoint) as beyond-cls probe builds it
                self._add_encoder(key, load_encoder(kwargs.pop("name"), **kwargs), norm)
        return self._encoders[key]

    def _add_head(self, method: Method) -> None:
        root = Path(method.run)
        _, cfg = read_run_config(root)
        if cfg.img_size != self.img_size:
            raise ConfigError(f"method {method.name}: the run used img_size {cfg.img_size}, this job {self.img_size}")
        kw = dict(name=cfg.model, checkpoint=cfg.checkpoint, checkpoint_format=cfg.checkpoint_format, arch=cfg.arch,
                  source=cfg.source, weights_dir=cfg.weights_dir or self.weights_dir, img_size=cfg.img_size)
        norm = cfg.normalization()
        key = _key(kw, norm)
        # random encoders of runs with different first seeds differ
        key = key + (("seed", cfg.seed_list()[0]),) if cfg.checkpoint is None else key
        enc = self._load(key, kw, norm, seed=cfg.seed_list()[0])
        head = load_probe_head(root, method.head, enc.model.beyond_cls_info)
        head.aggregation.to(self.device)
        enc.heads.append((method, head))

    def encoder_for(self, method: str) -> nn.Module:
        """The encoder that computes ``method``'s selection."""
        for enc in self._encoders.values():
            if any(m.name == method for m in enc.attention) or any(m.name == method for m, _ in enc.heads):
                return enc.model
        raise KeyError(f"no method {method!r}; methods: {[m.name for m in self.methods]}")

    def heads_used(self) -> dict[str, dict]:
        """``{abmilp method name: ProbeHead.describe()}``: which trained head each ``abmilp:`` method uses."""
        used = {m.name: h.describe() for enc in self._encoders.values() for m, h in enc.heads}
        return {m.name: used[m.name] for m in self.methods if m.name in used}

    @property
    def encoders(self) -> list[nn.Module]:
        return [e.model for e in self._encoders.values()]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        images = images.to(self.device, non_blocking=True)
        out: dict[str, Tensor] = {}
        for enc in self._encoders.values():
            out.update(self._run(enc, images))
        return {m.name: out[m.name] for m in self.methods}

    def _run(self, enc: _Encoder, images: Tensor) -> dict[str, Tensor]:
        model, info = enc.model, enc.model.beyond_cls_info
        x = (images - enc.mean) / enc.std
        keep = attention_queries(info)
        captured: dict[int, Tensor] = {}
        hooks = []
        blocks = {len(model.blocks) - 1 if h.block in (None, -1) else h.block for _, h in enc.heads}
        for b in blocks:
            hooks.append(model.blocks[b].register_forward_hook(
                lambda _m, _i, out, b=b: captured.__setitem__(b, out)))
        try:
            with torch.inference_mode(), autocast(self.precision, self.device):
                if enc.attention:
                    with RowCapture(model, keep) as capture:
                        model.forward_features(x)
                else:
                    model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        result: dict[str, Tensor] = {}
        if enc.attention:
            rows = capture.take()
            for m in enc.attention:
                result[m.name] = attention_selection("attn-mean" if m.kind == "guide" else m.kind, rows,
                                                     info.num_prefix_tokens)
        for m, head in enc.heads:
            block = len(model.blocks) - 1 if head.block in (None, -1) else head.block
            tokens = captured[block]
            with torch.inference_mode():
                if head.final_norm:
                    tokens = model.norm(tokens)
                _, scores = head.aggregation.forward_with_scores(tokens.float())
            result[m.name] = scores_selection(scores, head.with_cls)
        return result


def _key(kwargs: dict, norm: tuple) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in kwargs.items())) + (("norm", str(norm)),)


def max_entropy(num_patches: int) -> float:
    """Entropy of the uniform selection (mean pooling): log(num_patches)."""
    return math.log(num_patches)
