"""Selection vectors of non-trainable and trained token aggregations (paper App. C: Tab. 5, Figs. 7-9): the math.

A selection vector is the weight each patch token gets when an aggregation pools an image: ``[B, num_patches]``,
non-negative, summing to 1 per image, patches row-major. Methods (``--heads``, comma-separated):

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
(14 x 14: row 7, column 7, index 105). The attention rows come from one fused pass per encoder and batch
(:class:`~beyond_cls.capture.RowCapture`); :class:`~beyond_cls.analysis.selection_runner.SelectionRunner`
computes the vectors of several methods, :func:`~beyond_cls.probe.head_loading.load_probe_head` loads trained heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from beyond_cls.config import ConfigError
from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from beyond_cls.numerics import entropy

__all__ = [
    "ATTENTION_METHODS",
    "KL_EPS",
    "Method",
    "attention_queries",
    "attention_selection",
    "center_patch",
    "encoder_norm",
    "kl",
    "parse_method",
    "parse_methods",
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


def encoder_norm(info, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std an encoder's images are normalized with: the given ones, else the encoder's own
    (``info`` an EncoderInfo), else ImageNet's. One rule for probed encoders and guides (a guide's: its own)."""
    return tuple(mean or info.mean or IMAGENET_MEAN), tuple(std or info.std or IMAGENET_STD)


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

    Row 0 must be [cls]'s (``attn-mean``, ``attn-minent``, ``guide``: a guide's selection is its ``attn-mean``)
    and the last row the central patch's (``attn-center``), as :func:`attention_queries` orders them. Computed
    in float64.
    """
    rows = rows.double()
    patches = rows[..., num_prefix_tokens:]  # [B, H, R, P]
    if method in ("attn-mean", "guide"):
        return renormalize(patches[:, :, 0].mean(1))
    if method == "attn-center":
        return renormalize(patches[:, :, -1].mean(1))
    if method == "attn-minent":
        per_head = renormalize(patches[:, :, 0])  # [B, H, P]
        best = entropy(per_head).argmin(1)  # [B]
        return per_head[torch.arange(per_head.shape[0], device=per_head.device), best]
    raise ValueError(f"unknown attention method {method!r}; expected one of {(*ATTENTION_METHODS, 'guide')}")


def scores_selection(scores: Tensor, with_cls: bool) -> Tensor:
    """Selection ``[B, num_patches]`` from AbMILP scores ``[B, K, N']``: mean over branches, the [cls] score
    (first, when ``with_cls``) dropped and the rest renormalized."""
    s = scores.double().mean(1)
    return renormalize(s[:, 1:]) if with_cls else s
