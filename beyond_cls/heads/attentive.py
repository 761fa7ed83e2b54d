"""Attentive probing (``ap<heads>``): cross-attention from one learned query token to the patch tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beyond_cls.config import ConfigError
from beyond_cls.heads.checks import check_num_heads, check_prefix, check_tokens, no_options
from beyond_cls.heads.registry import Aggregation, register

__all__ = ["AttentivePool"]


class AttentivePool(nn.Module):
    """Attentive probing: cross-attention from one learned query token to the patch tokens."""

    def __init__(self, dim: int, num_heads: int = 1, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        check_num_heads(num_heads, dim)
        check_prefix(num_prefix_tokens)
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
        check_tokens(tokens, self.dim, self.num_prefix_tokens)
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


def _attentive(spec: str, dim: int, num_prefix_tokens: int) -> AttentivePool:
    no_options(spec)
    if not spec[2:].isdigit():
        raise ConfigError(f"head {spec!r}: attentive probing is ap<heads>, e.g. ap1 or ap12")
    return AttentivePool(dim, num_heads=int(spec[2:]), num_prefix_tokens=num_prefix_tokens)


register(Aggregation("ap", "ap<heads>", "attentive probing: one learned query attends to the patches (`ap1`, `ap12`)",
                     r"ap\d*(-.*)?", _attentive, examples=("ap1", "ap12"), trainable=True))
