"""Shared by the head tests: the feature size and token layouts they use."""

from __future__ import annotations

import torch

D = 48  # not a multiple of 64 on purpose
F64 = torch.float64
LAYOUTS = [(197, 1), (201, 5)]  # (N, P): [cls] + 196 patches; [cls] + 4 registers + 196 patches


def tokens(n: int, batch: int = 3, dim: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random tokens [batch, n, dim]."""
    return torch.randn(batch, n, dim, dtype=dtype)
