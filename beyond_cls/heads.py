"""Aggregation heads for linear probing on a frozen ViT: [cls], mean, AbMILP family, attentive probe, and
pooling with given (non-trainable) selection weights.

Every aggregation takes ``tokens`` [B, N, D], the final-normed tokens of a timm ViT
(``model.forward_features(x)``): tokens ``0..P-1`` are prefix tokens ([cls] at 0, then registers)
and ``P..N-1`` are patches. Each has ``out_dim`` and returns [B, out_dim]. :class:`LinearProbe`
puts the MAE linear-probe head (BatchNorm without affine + Linear) on top of one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from beyond_cls import ops

__all__ = [
    "AbMILP",
    "AttentivePool",
    "ClsToken",
    "LinearProbe",
    "MeanPatch",
    "SelectionPool",
    "SelfAttentionAbMILP",
    "sincos_pos_embed_2d",
]

_ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
_CONTENTS = ("patch", "patch+cls")
_APPLY_TO = ("map", "both")
#: Most AbMILP score branches (K): the fused Triton kernels hold up to 16 in registers.
MAX_BRANCHES = 16


def _check_prefix(num_prefix_tokens: int) -> None:
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")


def _check_tokens(tokens: Tensor, dim: int, num_prefix_tokens: int) -> None:
    """Shape check with a message naming what is wrong (Python ints only, no device sync)."""
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"tokens must be [B, N, {dim}], got {tuple(tokens.shape)}")
    if tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"tokens has N={tokens.shape[1]} tokens but num_prefix_tokens={num_prefix_tokens}: no patches"
        )


def sincos_pos_embed_2d(grid_size: int, dim: int, device: Any = None) -> Tensor:
    """Fixed 2-D sin-cos embedding [grid_size², dim] of a row-major square patch grid (float32).

    The first dim/2 channels encode the row, the last dim/2 the column; each half is
    ``[sin(pos·ω), cos(pos·ω)]`` with ``ω_i = 1/10000^(2i/(dim/2))``.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    pos = torch.arange(grid_size, dtype=torch.float64, device=device)
    angles = pos[:, None] * omega[None]  # [G, dim/4]
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # [G, dim/2]
    rows = axis[:, None, :].expand(grid_size, grid_size, dim // 2)
    cols = axis[None, :, :].expand(grid_size, grid_size, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, dim).float()


class ClsToken(nn.Module):
    """The [cls] token (token 0) as the global representation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = self.out_dim = dim

    def forward(self, tokens: Tensor) -> Tensor:
        _check_tokens(tokens, self.dim, 0)
        return tokens[:, 0]


class MeanPatch(nn.Module):
    """Average of the patch tokens (prefix tokens excluded)."""

    def __init__(self, dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        _check_prefix(num_prefix_tokens)
        self.dim = self.out_dim = dim
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor) -> Tensor:
        _check_tokens(tokens, self.dim, self.num_prefix_tokens)
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)


class SelectionPool(nn.Module):
    """Patch tokens pooled with given selection weights: ``Σ_i s_i z_i`` (no parameters).

    The weights come from outside the head, e.g. an encoder's [cls] attention (``attn-mean``) or another
    encoder's (``guide:``): ``forward(tokens [B, N, D], selection [B, num_patches])``, computed in float32
    (float64 for float64 tokens) whatever the autocast, like the fused AbMILP pooling.
    """

    def __init__(self, dim: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        _check_prefix(num_prefix_tokens)
        self.dim = self.out_dim = dim
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: Tensor, selection: Tensor) -> Tensor:
        _check_tokens(tokens, self.dim, self.num_prefix_tokens)
        return self.pool_many(tokens, selection[:, None])[:, 0]

    def pool_many(self, tokens: Tensor, selections: Tensor) -> Tensor:
        """Several selections at once: [B, M, num_patches] -> [B, M, D], one pass over the tokens."""
        patches = tokens[:, self.num_prefix_tokens :]
        b, p = patches.shape[:2]
        if selections.dim() != 3 or selections.shape[0] != b or selections.shape[2] != p:
            raise ValueError(f"selections must be [{b}, M, {p}] for tokens {tuple(tokens.shape)}, "
                             f"got {tuple(selections.shape)}")
        dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        with torch.autocast(tokens.device.type, enabled=False):
            return torch.bmm(selections.to(dtype), patches.to(dtype))


class AbMILP(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018; the paper's Eq. 5): ``Σ_i softmax_i(t(z_i)) z_i``.

    ``t`` is ``Linear(dim, branches)`` for depth 1, else ``(Linear(dim, dim) + act) × (depth-1)``
    followed by ``Linear(dim, branches)``; layers use PyTorch's default init, so construction is
    deterministic given torch's RNG. ``branches=K`` (1..16) pools K vectors, flattened: out_dim = K·dim.
    ``content`` picks the pooled tokens: ``"patch"`` or ``"patch+cls"`` (token 0 then patches;
    registers excluded). ``pos_cond`` adds a fixed 2-D sin-cos embedding of the (square) patch grid
    to the scorer's input only. Depth 1 without ``pos_cond`` runs the fused ``ops.abmilp_pool``; the
    other variants compute logits and pool with the fused ``ops.softmax_pool``.
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
        _check_prefix(num_prefix_tokens)
        if content == "patch+cls" and num_prefix_tokens < 1:
            raise ValueError("content='patch+cls' needs a [cls] token, i.e. num_prefix_tokens >= 1")
        if pos_cond and dim % 4 != 0:
            raise ValueError(f"pos_cond=True needs dim to be a multiple of 4, got dim={dim}")
        self.dim = dim
        self.depth = depth
        self.act = act
        self.branches = branches
        self.content = content
        self.pos_cond = pos_cond
        self.num_prefix_tokens = num_prefix_tokens
        self.out_dim = branches * dim
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.Linear(dim, dim), _ACTS[act]()]
        layers.append(nn.Linear(dim, branches))
        self.scorer = nn.Sequential(*layers)
        # built at first use from the number of patches; fixed, so not part of the state_dict
        self.register_buffer("pos_embed", None, persistent=False)

    def select(self, tokens: Tensor) -> Tensor:
        """The pooled content tokens [B, N', D]: the patches, or [cls] followed by the patches."""
        _check_tokens(tokens, self.dim, self.num_prefix_tokens)
        p = self.num_prefix_tokens
        if self.content == "patch":
            return tokens[:, p:]
        if p == 1:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, p:]], dim=1)

    def _positions(self, num_content: int, device: torch.device) -> Tensor:
        """Positional embedding [N', D] of the content tokens (zero row for [cls]); cached."""
        num_patches = num_content - (self.content == "patch+cls")
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches:
            raise ValueError(f"pos_cond needs a square patch grid, got {num_patches} patch tokens")
        cached = self.pos_embed
        if cached is None or cached.shape[0] != num_content or cached.device != device:
            with torch.no_grad(), torch.inference_mode(False):
                pe = sincos_pos_embed_2d(grid, self.dim, device=device)
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
    scores and pools the self-attention output. Remaining kwargs configure the inner :class:`AbMILP`.
    """

    def __init__(self, dim: int, num_heads: int = 1, apply_to: str = "both", **abmilp_kwargs: Any) -> None:
        super().__init__()
        if apply_to not in _APPLY_TO:
            raise ValueError(f"apply_to must be one of {_APPLY_TO}, got {apply_to!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads must be an int >= 1 dividing dim={dim}, got {num_heads!r}")
        self.apply_to = apply_to
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
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


class AttentivePool(nn.Module):
    """Attentive probing: cross-attention from one learned query token to the patch tokens."""

    def __init__(self, dim: int, num_heads: int = 1, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads must be an int >= 1 dividing dim={dim}, got {num_heads!r}")
        _check_prefix(num_prefix_tokens)
        self.dim = self.out_dim = dim
        self.num_heads = num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, 1, d], k and v [B, H, N', d] from the learned query and the patch tokens."""
        _check_tokens(tokens, self.dim, self.num_prefix_tokens)
        x = tokens[:, self.num_prefix_tokens :]
        b, n, _ = x.shape
        h, hd = self.num_heads, self.dim // self.num_heads
        q = self.q(self.query).reshape(1, 1, h, hd).transpose(1, 2).expand(b, h, 1, hd)
        k, v = self.kv(x).reshape(b, n, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        return q.to(k.dtype), k, v

    def _out(self, attended: Tensor) -> Tensor:
        return self.proj(attended.transpose(1, 2).reshape(attended.shape[0], self.dim))

    def forward_with_scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(pooled [B, D], attention weights [B, heads, N']), materializing the attention."""
        q, k, v = self._qkv(tokens)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, H, 1, N']
        return self._out(attn @ v), attn[:, :, 0]

    def forward(self, tokens: Tensor) -> Tensor:
        q, k, v = self._qkv(tokens)
        return self._out(F.scaled_dot_product_attention(q, k, v))


class LinearProbe(nn.Module):
    """aggregation → BatchNorm1d(affine=False, eps=1e-6) → Linear: the MAE linear-probe head.

    ``head`` is ``Sequential(BatchNorm1d, Linear)`` as in the MAE codebase (keys ``head.0.*``,
    ``head.1.*``); the Linear is trunc-normal(std=0.01) with zero bias.
    """

    def __init__(self, aggregation: nn.Module, dim: int, num_classes: int) -> None:
        super().__init__()
        out_dim = getattr(aggregation, "out_dim", None)
        if out_dim != dim:
            raise ValueError(f"aggregation.out_dim ({out_dim}) must equal dim ({dim})")
        self.aggregation = aggregation
        linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.aggregation(tokens))
