"""Numeric rules and limits shared by the reference, the kernels, the ops and the heads: defined once.

A leaf module: it imports nothing of the package, so anything may import it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_KEPT_ROWS = 8  # full softmax rows one attention call may keep (csrc/attention_stats.h: kMaxKeptRows)
MAX_BRANCHES = 16  # AbMILP score branches K the fused pooling kernels hold in registers


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype statistics and pooled outputs are computed in: float64 stays float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Exact Shannon entropy (natural log, 0 log 0 = 0) of probability vectors along ``dim``."""
    return -torch.special.xlogy(p, p).sum(dim)


def max_entropy(num_patches: int) -> float:
    """Entropy of the uniform distribution over ``num_patches`` (mean pooling): log P, 5.28 for 196."""
    return math.log(num_patches)
