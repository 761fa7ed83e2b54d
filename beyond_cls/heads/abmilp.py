"""The AbMILP family (the paper's Selective Aggregation): AbMILP and SA-AbMILP, over the patches or [cls] + patches.

Specs: ``abmilp``, ``abmilp+cls``, ``saabmilp`` and ``saabmilp+cls`` with ``-``-separated options
(``abmilp-k4-mlp2-gelu-pos``, ``saabmilp-h4-map``); ``abmilp:RUN`` (a trained run's scores) is a selection method
(:mod:`beyond_cls.selection`), not a head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.layers import Attention
from torch import Tensor, nn

from beyond_cls import ops
from beyond_cls.config import ConfigError
from beyond_cls.heads.checks import check_num_heads, check_prefix, check_tokens
from beyond_cls.heads.registry import Aggregation, register
from beyond_cls.numerics import MAX_BRANCHES

__all__ = ["AbMILP", "SelfAttentionAbMILP", "sincos_pos_embed_2d"]

_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
_CONTENTS = ("patch", "patch+cls")
_APPLY_TO = ("map", "both")


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    rows, cols = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"the patch grid must be at least 1x1, got {grid!r}")
    return rows, cols


def sincos_pos_embed_2d(
    grid: int | tuple[int, int], dim: int, device: Any = None, column_first: bool = True
) -> Tensor:
    """Fixed 2-D sin-cos embedding [rows·cols, dim] of a row-major patch grid (float32); ``grid``: side or
    (rows, cols).

    With ``column_first`` (MAE's ``get_2d_sincos_pos_embed``, the authors' ``-pos`` scorer) the first dim/2
    channels encode the column and the last dim/2 the row; without it (beyond-cls 0.1) the reverse.
    Each half is ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 1/10000^(2i/(dim/2))``.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    rows, cols = _grid(grid)
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)

    def axis(n: int) -> Tensor:  # [n, dim/2]
        angles = torch.arange(n, dtype=torch.float64, device=device)[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    row = axis(rows)[:, None, :].expand(rows, cols, dim // 2)
    col = axis(cols)[None, :, :].expand(rows, cols, dim // 2)
    halves = [col, row] if column_first else [row, col]
    return torch.cat(halves, dim=-1).reshape(rows * cols, dim).float()


class AbMILP(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018; the paper's Eq. 5): ``Σ_i softmax_i(t(z_i)) z_i``.

    ``t`` is ``Linear(dim, branches)`` for depth 1, else ``(Linear(dim, dim) + act) × (depth-1)``
    followed by ``Linear(dim, branches)``; layers use PyTorch's default init, so construction is
    deterministic given torch's RNG. ``branches=K`` (1..16) pools K vectors, flattened: out_dim = K·dim.
    ``content`` picks the pooled tokens: ``"patch"`` or ``"patch+cls"`` (token 0 then patches;
    registers excluded). ``pos_cond`` adds a positional embedding to the scorer's input only: as the authors',
    a trainable ``pos_embed`` [N', dim] initialized to the 2-D sin-cos embedding (column channels first) of the
    ``grid`` (rows, cols) of patches, with a zero [cls] row first for ``"patch+cls"``. ``fixed_pos``: the
    embedding of beyond-cls 0.1 instead: a fixed (row, column) buffer of any square grid, made at
    first use and not saved. Depth 1 without ``pos_cond`` runs the fused ``ops.abmilp_pool``; the other
    variants compute logits and pool with the fused ``ops.softmax_pool``.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 1,
        act: str = "relu",
        branches: int = 1,
        content: str = "patch",
        pos_cond: bool = False,
        num_prefix_tokens: int = 1,
        grid: int | tuple[int, int] | None = None,
        fixed_pos: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or not 1 <= depth <= 4:
            raise ValueError(f"depth must be an int in 1..4, got {depth!r}")
        if act not in _ACTS:
            raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
        if not isinstance(branches, int) or not 1 <= branches <= MAX_BRANCHES:
            raise ValueError(f"branches (k) must be an int in 1..{MAX_BRANCHES}, got {branches!r}")
        if content not in _CONTENTS:
            raise ValueError(f"content must be one of {_CONTENTS}, got {content!r}")
        check_prefix(num_prefix_tokens)
        if content == "patch+cls" and num_prefix_tokens < 1:
            raise ValueError("content='patch+cls' needs a [cls] token, i.e. num_prefix_tokens >= 1")
        if pos_cond and dim % 4 != 0:
            raise ValueError(f"pos_cond=True needs dim to be a multiple of 4, got dim={dim}")
        learned = pos_cond and not fixed_pos
        if learned and grid is None:
            raise ValueError("pos_cond=True needs the encoder's patch grid (grid=(rows, cols)) for its trainable "
                             "positional embedding")
        self.dim = dim
        self.depth = depth
        self.act = act
        self.branches = branches
        self.content = content
        self.pos_cond = pos_cond
        self.fixed_pos = bool(fixed_pos)
        self.grid = _grid(grid) if learned else None
        self.num_prefix_tokens = num_prefix_tokens
        self.out_dim = branches * dim
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, dim), _ACTS[act]()]
        layers.append(nn.Linear(dim, branches))
        self.scorer = nn.Sequential(*layers)
        if learned:
            table = sincos_pos_embed_2d(self.grid, dim)
            if content == "patch+cls":
                table = torch.cat([table.new_zeros(1, dim), table], dim=0)
            self.pos_embed = nn.Parameter(table)
        else:  # fixed_pos: built at first use from the number of patches; not part of the state_dict
            self.register_buffer("pos_embed", None, persistent=False)

    def select(self, tokens: Tensor) -> Tensor:
        """The pooled content tokens [B, N', D]: the patches, or [cls] followed by the patches."""
        check_tokens(tokens, self.dim, self.num_prefix_tokens)
        p = self.num_prefix_tokens
        if self.content == "patch":
            return tokens[:, p:]
        if p == 1:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, p:]], dim=1)

    def _positions(self, num_content: int, device: torch.device) -> Tensor:
        """Positional embedding [N', D] of the content tokens (zero row for [cls] when fixed)."""
        num_patches = num_content - (self.content == "patch+cls")
        if self.grid is not None:
            if self.pos_embed.shape[0] != num_content:
                rows, cols = self.grid
                raise ValueError(f"AbMILP with pos_cond was built for a {rows}x{cols} patch grid ({rows * cols} "
                                 f"patches), got {num_patches} patch tokens")
            return self.pos_embed
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"pos_cond needs a square patch grid, got {num_patches} patch tokens")
        cached = self.pos_embed
        if cached is None or cached.shape[0] != num_content or cached.device != device:
            with torch.no_grad(), torch.inference_mode(False):
                pe = sincos_pos_embed_2d(grid, self.dim, device=device, column_first=False)
                if self.content == "patch+cls":
                    pe = torch.cat([pe.new_zeros(1, self.dim), pe], dim=0)
            self.pos_embed = pe
        return self.pos_embed

    def pool(self, content: Tensor, score_input: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool ``content`` [B, N', D] with scores computed from ``score_input`` (default: content).

        Returns (pooled [B, K, D], scores [B, K, N']).
        """
        if score_input is None and self.depth == 1 and not self.pos_cond:
            last = self.scorer[-1]
            return ops.abmilp_pool(content, last.weight, last.bias)
        x = content if score_input is None else score_input
        if self.pos_cond:
            x = x + self._positions(x.shape[1], x.device).to(x.dtype)
        return ops.softmax_pool(content, self.scorer(x).transpose(1, 2))  # logits [B, K, N']

    def forward_with_scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled [B, K, D], scores [B, K, N']) with N' the number of pooled tokens."""
        return self.pool(self.select(tokens))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_with_scores(tokens)[0].flatten(1)


class SelfAttentionAbMILP(nn.Module):
    """SA-AbMILP (Rymarczyk et al. 2021): one trainable self-attention layer before AbMILP scoring.

    ``apply_to="map"`` scores the self-attention output but pools the original tokens; ``"both"``
    scores and pools the self-attention output. The query/key/value projection has no bias, as the authors'
    (``qkv_bias=True``: beyond-cls 0.1). Remaining kwargs configure the inner :class:`AbMILP`.
    """

    def __init__(
        self, dim: int, num_heads: int = 1, apply_to: str = "both", qkv_bias: bool = False, **abmilp_kwargs: Any
    ) -> None:
        super().__init__()
        if apply_to not in _APPLY_TO:
            raise ValueError(f"apply_to must be one of {_APPLY_TO}, got {apply_to!r}")
        check_num_heads(num_heads, dim)
        self.apply_to = apply_to
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.abmilp = AbMILP(dim, **abmilp_kwargs)
        self.dim = dim
        self.out_dim = self.abmilp.out_dim

    def forward_with_scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled [B, K, D], scores [B, K, N']) as in :meth:`AbMILP.forward_with_scores`."""
        content = self.abmilp.select(tokens)
        mixed = self.attn(content)
        if self.apply_to == "map":
            return self.abmilp.pool(content, score_input=mixed)
        return self.abmilp.pool(mixed)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_with_scores(tokens)[0].flatten(1)


def _abmilp_kwargs(spec: str, options: list[str]) -> dict:
    """AbMILP keyword arguments of ``-``-separated spec options."""
    kwargs: dict = {}
    for opt in options:
        if opt.startswith("k") and opt[1:].isdigit():
            kwargs["branches"] = int(opt[1:])
        elif opt.startswith("mlp") and opt[3:].isdigit():
            kwargs["depth"] = int(opt[3:])
        elif opt in _ACTS:
            kwargs["act"] = opt
        elif opt == "pos":
            kwargs["pos_cond"] = True
        else:
            raise ConfigError(
                f"head {spec!r}: unknown option {opt!r}; AbMILP options are k<branches>, mlp<depth>, "
                f"{', '.join(_ACTS)}, pos"
            )
    return kwargs


def _abmilp(spec: str, dim: int, num_prefix_tokens: int, *, grid: tuple[int, int] | None = None,
            legacy: bool = False) -> AbMILP:
    if ":" in spec:
        raise ConfigError(f"head {spec!r}: a trained run's AbMILP is not a probe head; train it with abmilp")
    base, *options = spec.split("-")
    content = "patch+cls" if base.endswith("+cls") else "patch"
    return AbMILP(dim, content=content, num_prefix_tokens=num_prefix_tokens, grid=grid, fixed_pos=legacy,
                  **_abmilp_kwargs(spec, options))


def _saabmilp(spec: str, dim: int, num_prefix_tokens: int, *, grid: tuple[int, int] | None = None,
              legacy: bool = False) -> SelfAttentionAbMILP:
    base, *options = spec.split("-")
    heads = [o for o in options if o.startswith("h") and o[1:].isdigit()]
    apply_to = [o for o in options if o in _APPLY_TO]
    rest = [o for o in options if o not in heads and o not in apply_to]
    return SelfAttentionAbMILP(
        dim,
        num_heads=int(heads[-1][1:]) if heads else 1,
        apply_to=apply_to[-1] if apply_to else "both",
        qkv_bias=legacy,
        grid=grid,
        fixed_pos=legacy,
        content="patch+cls" if base.endswith("+cls") else "patch",
        num_prefix_tokens=num_prefix_tokens,
        **_abmilp_kwargs(spec, rest),
    )


_OPTIONS = "[-k<K>][-mlp<depth>][-relu/gelu/tanh][-pos]"
register(Aggregation(
    "abmilp", f"abmilp{_OPTIONS}",
    f"AbMILP over the patches (fused kernels); options: `k<K>` score branches (1–{MAX_BRANCHES}), `mlp<depth>` MLP "
    "scorer (depth 2–4) and its activation, `pos` a trainable positional embedding (sin-cos init) added to the "
    "scorer's input",
    r"abmilp(-.*|:.*)?", _abmilp, examples=("abmilp", "abmilp-k4-mlp2-gelu-pos"), trainable=True,
    layout_options=True,
))
register(Aggregation(
    "abmilp+cls", f"abmilp+cls{_OPTIONS}", "AbMILP over [cls] and the patches (same options)",
    r"abmilp\+cls(-.*)?", _abmilp, examples=("abmilp+cls", "abmilp+cls-k2"), trainable=True, needs_cls=True,
    layout_options=True,
))
register(Aggregation(
    "saabmilp", "saabmilp[-h<heads>][-map/both][AbMILP options]",
    "SA-AbMILP: one self-attention layer before scoring; `map` scores its output and pools the tokens, `both` "
    "(default) pools its output",
    r"saabmilp(-.*)?", _saabmilp, examples=("saabmilp", "saabmilp-h2-map-k2"), trainable=True,
    layout_options=True,
))
register(Aggregation(
    "saabmilp+cls", "saabmilp+cls[-h<heads>][-map/both][AbMILP options]",
    "SA-AbMILP over [cls] and the patches", r"saabmilp\+cls(-.*)?", _saabmilp, examples=("saabmilp+cls",),
    trainable=True, needs_cls=True, layout_options=True,
))
