"""Plain-PyTorch definitions of every fused op: the ground truth for the kernels.

Readable in a minute and exact in float64. Kernels in ``kernels/`` (Triton) and
``csrc/`` (C++) must agree with these functions; tests and benchmarks import them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from beyond_cls.numerics import MAX_KEPT_ROWS, accumulation_dtype, entropy, max_entropy
from beyond_cls.statistics import ROW_STATISTICS, present_rows, row_index

__all__ = [
    "ROW_DEFINITIONS",
    "AttentionRows",
    "abmilp_pool",
    "attention_logits",
    "attention_with_stats",
    "entropy",
    "keep_row_indices",
    "lars_step",
    "max_entropy",
    "row_planes",
    "softmax_pool",
]


class AttentionRows(Mapping[str, Tensor]):
    """The per-query statistics of one attention call: a view over the stacked [S, B, H, N] tensor
    :attr:`stacked`, one plane per :data:`~beyond_cls.statistics.ROW_STATISTICS` entry, in that order.

    ``rows.self_attn`` etc. (by row-statistic name) are the [B, H, N] planes; ``cls_attn`` (a row that
    needs prefix tokens) is ``None`` when ``has_prefix`` is false, although its plane exists. As a mapping
    it holds the present rows by name, what :attr:`beyond_cls.statistics.Statistic.value` reads.
    """

    __slots__ = ("stacked", "has_prefix")

    def __init__(self, stacked: Tensor, has_prefix: bool = True) -> None:
        if stacked.dim() != 4 or stacked.shape[0] != len(ROW_STATISTICS):
            raise ValueError(f"AttentionRows: stacked must be [{len(ROW_STATISTICS)}, B, H, N] "
                             f"({', '.join(r.name for r in ROW_STATISTICS)}), got {tuple(stacked.shape)}")
        self.stacked = stacked
        self.has_prefix = bool(has_prefix)

    @classmethod
    def from_planes(cls, planes: Mapping[str, Tensor | None], has_prefix: bool = True) -> AttentionRows:
        """Stack [B, H, N] planes given by name (a row absent without prefix tokens may be None: zeros)."""
        names = [r.name for r in ROW_STATISTICS]
        if set(planes) != set(names):
            raise ValueError(f"AttentionRows: need the planes {names}, got {sorted(planes)}")
        like = next(t for t in planes.values() if t is not None)
        return cls(torch.stack([like.new_zeros(like.shape) if planes[n] is None else planes[n] for n in names]),
                   has_prefix)

    def _plane(self, name: str) -> Tensor | None:
        """Row ``name``'s plane, None where it needs prefix tokens that are absent (KeyError if not a row)."""
        index = row_index(name)
        return None if ROW_STATISTICS[index].needs_prefix and not self.has_prefix else self.stacked[index]

    def __getattr__(self, name: str) -> Tensor | None:
        try:
            return self._plane(name)
        except KeyError:
            raise AttributeError(f"AttentionRows has no row statistic {name!r}") from None

    def __getitem__(self, name: str) -> Tensor:
        value = self._plane(name) if isinstance(name, str) else None
        if value is None:
            raise KeyError(f"no row statistic {name!r} here; present: {', '.join(self)}")
        return value

    def __iter__(self) -> Iterator[str]:
        return (row.name for row in present_rows(self.has_prefix))

    def __len__(self) -> int:
        return len(present_rows(self.has_prefix))

    def __repr__(self) -> str:
        return f"AttentionRows({', '.join(self)}; {tuple(self.stacked.shape[1:])} {self.stacked.dtype})"

    def apply(self, fn: Callable[[Tensor], Tensor]) -> AttentionRows:
        """The rows with ``fn`` applied to the stacked tensor (e.g. ``rows.apply(Tensor.double)``)."""
        return AttentionRows(fn(self.stacked), self.has_prefix)


def row_planes(stacked: Tensor, has_prefix: bool) -> dict[str, Tensor]:
    """The present rows of a stacked [S, B, H, Q] tensor by name: :class:`AttentionRows` as a plain dict
    (what compiled code traces best)."""
    planes = stacked.unbind(0)
    return {row.name: planes[i] for i, row in enumerate(ROW_STATISTICS) if has_prefix or not row.needs_prefix}


def attention_logits(
    q: Tensor, k: Tensor, scale: float | None = None, bias: Tensor | None = None
) -> Tensor:
    """Scores ``q·kᵀ·scale + bias`` of shape [B, H, N, N], computed in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    return logits


def keep_row_indices(keep_rows: Sequence[int], n: int) -> tuple[int, ...]:
    """``keep_rows`` as non-negative query indices in [0, n), in the order given.

    Negative indices count from the end (Python style). Raises a ValueError unless there are 1 to
    ``MAX_KEPT_ROWS`` distinct indices in [-n, n), a TypeError unless it is a sequence of integers.
    """
    if isinstance(keep_rows, (str, bytes)) or not isinstance(keep_rows, Sequence):
        raise TypeError(f"keep_rows must be a sequence of query indices, got {type(keep_rows).__name__}")
    try:
        indices = tuple(operator.index(i) for i in keep_rows)
    except TypeError:
        raise TypeError(f"keep_rows must hold integers, got {list(keep_rows)!r}") from None
    if not 1 <= len(indices) <= MAX_KEPT_ROWS:
        raise ValueError(f"keep_rows must hold 1 to {MAX_KEPT_ROWS} query indices, got {len(indices)}")
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"keep_rows {list(indices)}: indices {bad} are outside [-{n}, {n}) for N={n} tokens")
    normalized = tuple(i % n for i in indices)
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"keep_rows {list(indices)} name the same query twice (N={n})")
    return normalized


def attention_with_stats(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_prefix_tokens: int = 1,
    scale: float | None = None,
    bias: Tensor | None = None,
    keep_rows: Sequence[int] | None = None,
) -> tuple[Tensor, AttentionRows] | tuple[Tensor, AttentionRows, Tensor]:
    """Softmax attention and the row statistics of every query, materialized.

    q, k, v: [B, H, N, d]; bias broadcastable to [B, H, N, N]. Returns ``out`` [B, H, N, d]
    in v's dtype and :class:`AttentionRows` (rows by :data:`ROW_DEFINITIONS`) in float32 (float64 for float64
    inputs).
    Tokens ``0..num_prefix_tokens-1`` are prefix tokens; the rest are patches.
    With ``keep_rows`` (R distinct query indices, negative from the end) it also returns
    ``kept`` [B, H, R, N]: the full attention rows a_i of those queries over all keys, in the
    order given, in the statistics' dtype.
    """
    n = q.shape[-2]
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, {n - 1}], got {num_prefix_tokens}")
    kept_index = None if keep_rows is None else keep_row_indices(keep_rows, n)
    dtype = accumulation_dtype(q.dtype, k.dtype, v.dtype)
    logits = attention_logits(q.to(dtype), k.to(dtype), scale, bias)
    attn = logits.softmax(dim=-1)
    out = torch.matmul(attn, v.to(dtype)).to(v.dtype)

    stacked = torch.stack([ROW_DEFINITIONS[r.name](attn, logits, num_prefix_tokens) for r in ROW_STATISTICS])
    rows = AttentionRows(stacked, has_prefix=num_prefix_tokens > 0)
    if kept_index is None:
        return out, rows
    return out, rows, attn[..., list(kept_index), :]


def _patch_entropy(logits: Tensor, num_prefix_tokens: int) -> Tensor:
    """Exact Shannon entropy of the attention renormalized over the patches, 0·log 0 = 0, from log-probabilities."""
    log_p = logits[..., num_prefix_tokens:].log_softmax(dim=-1)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


#: Each row statistic of :data:`~beyond_cls.statistics.ROW_STATISTICS`, by name, as a function of the attention
#: probabilities and logits [B, H, N, N] and the number of prefix tokens P: a [B, H, N] tensor.
ROW_DEFINITIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "self_attn": lambda attn, logits, prefix: attn.diagonal(dim1=-2, dim2=-1),
    "cls_attn": lambda attn, logits, prefix: attn[..., 0],
    "patch_mass": lambda attn, logits, prefix: attn[..., prefix:].sum(-1),
    "patch_entropy": lambda attn, logits, prefix: _patch_entropy(logits, prefix),
}
if set(ROW_DEFINITIONS) != {r.name for r in ROW_STATISTICS}:  # checked once, on import: a row added half-way
    raise ImportError(f"beyond_cls.reference.ROW_DEFINITIONS defines {sorted(ROW_DEFINITIONS)}, but "
                      f"beyond_cls.statistics.ROW_STATISTICS lists {[r.name for r in ROW_STATISTICS]}: "
                      "define each row once")


def softmax_pool(tokens: Tensor, logits: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax-weighted pooling with given logits: ``s = softmax_n(logits)``, ``pooled = Σ_n s_n z_n``.

    tokens [B, N, D]; logits [B, K, N] → (pooled [B, K, D], scores [B, K, N]), or logits [B, N] →
    ([B, D], [B, N]). ``mask`` [B, N] bool (True = keep): masked tokens get zero weight. A row
    with every token masked gives NaN, like softmax over all −inf.
    """
    if logits.dim() == 2:
        pooled, scores = softmax_pool(tokens, logits[:, None], mask)
        return pooled[:, 0], scores[:, 0]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    scores = logits.softmax(dim=-1)
    pooled = torch.einsum("bkn,bnd->bkd", scores.to(tokens.dtype), tokens)
    return pooled, scores


def abmilp_pool(
    tokens: Tensor, weight: Tensor, bias: Tensor | float = 0.0, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """AbMILP pooling (Eq. 5): ``s = softmax_i(z_i·w + b)``, ``pooled = Σ_i s_i z_i``.

    tokens [B, N, D]; weight [D] → (pooled [B, D], scores [B, N]), or weight [K, D] with
    bias [K] → (pooled [B, K, D], scores [B, K, N]). ``mask`` [B, N] bool (True = keep) gives
    masked tokens zero weight. Differentiable in all inputs.
    """
    if weight.dim() == 1:
        pooled, scores = abmilp_pool(tokens, weight[None], torch.as_tensor(bias).reshape(1), mask)
        return pooled[:, 0], scores[:, 0]
    if weight.dim() != 2 or weight.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"weight must be [D] or [K, D] with D={tokens.shape[-1]}, got {tuple(weight.shape)}")
    bias = torch.as_tensor(bias, dtype=tokens.dtype, device=tokens.device)
    logits = torch.einsum("bnd,kd->bkn", tokens, weight.to(tokens.dtype)) + bias.reshape(-1, 1)
    return softmax_pool(tokens, logits, mask)


@torch.no_grad()
def lars_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> None:
    """One LARS update in place, parameter by parameter (the MAE codebase's semantics).

    For parameters with ndim > 1: ``g += wd·p``, then g is scaled by the trust ratio
    ``tc·‖p‖/‖g‖`` when both norms are positive. 1-D parameters (biases, norms) get
    neither. Then ``mu = momentum·mu + g`` and ``p -= lr·mu``.
    """
    for p, g, mu in zip(params, grads, momentum_buffers):
        d = g.clone()
        if p.ndim > 1:
            d = d.add(p, alpha=weight_decay)
            param_norm = torch.linalg.vector_norm(p)
            update_norm = torch.linalg.vector_norm(d)
            ratio = torch.where(
                (param_norm > 0) & (update_norm > 0),
                trust_coefficient * param_norm / update_norm,
                torch.ones_like(param_norm),
            )
            d = d * ratio
        mu.mul_(momentum).add_(d)
        p.add_(mu, alpha=-lr)
