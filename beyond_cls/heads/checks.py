"""Argument, shape and spec checks shared by the heads."""

from __future__ import annotations

from torch import Tensor

from beyond_cls.config import ConfigError


def check_prefix(num_prefix_tokens: int) -> None:
    """``num_prefix_tokens`` must be an int >= 0."""
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")


def check_tokens(tokens: Tensor, dim: int, num_prefix_tokens: int) -> None:
    """Shape check with a message naming what is wrong (Python ints only, no device sync)."""
    if tokens.dim() != 3 or tokens.shape[-1] != dim:
        raise ValueError(f"tokens must be [B, N, {dim}], got {tuple(tokens.shape)}")
    if tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"tokens has N={tokens.shape[1]} tokens but num_prefix_tokens={num_prefix_tokens}: no patches"
        )


def check_num_heads(num_heads: int, dim: int) -> None:
    """``num_heads`` must be an int >= 1 dividing ``dim``."""
    if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"num_heads must be an int >= 1 dividing dim={dim}, got {num_heads!r}")


def no_options(spec: str) -> None:
    """Heads that take no ``-option``: one is an error."""
    base, *options = spec.split("-")
    if options:
        raise ConfigError(f"head {spec!r}: {base!r} takes no options")
