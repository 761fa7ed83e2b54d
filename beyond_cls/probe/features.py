"""The frozen encoder as a token source: tokens of block ``k`` (default the last), of several blocks from one
pass (``blocks``), or of the last ``n`` blocks concatenated along the channels (``n_last``, DINO's linear eval),
final norm or not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from beyond_cls.config import ConfigError

__all__ = ["MAX_BLOCK_TOKEN_BYTES", "TokenSource", "check_block_token_bytes"]

# Bound on the float32 tokens one micro-batch keeps with --blocks: B x K x N x D x 4 bytes (K listed blocks).
MAX_BLOCK_TOKEN_BYTES = 4 << 30


def check_block_token_bytes(batch_size: int, blocks: int, num_tokens: int, dim: int,
                            limit: int = MAX_BLOCK_TOKEN_BYTES) -> None:
    """ConfigError when ``blocks`` blocks' float32 tokens of one micro-batch exceed ``limit`` bytes."""
    size = batch_size * blocks * num_tokens * dim * 4
    if size > limit:
        raise ConfigError(
            f"--blocks keeps {blocks} blocks x {batch_size} images x {num_tokens} tokens x {dim} dims = "
            f"{size / 2**30:.1f} GiB of float32 tokens per micro-batch, above the {limit / 2**30:.1f} GiB bound; "
            "lower --batch-size (and raise --accum-iter) or list fewer blocks"
        )


class TokenSource(nn.Module):
    """``forward(images) -> tokens [B, N, D]`` of a timm ViT / Beit / Eva encoder, without gradients.

    ``block=k`` keeps blocks ``0..k`` only (the later ones never run); ``final_norm=False`` skips the
    encoder's final norm. The encoder is shared, not copied: building a TokenSource truncates it.
    ``blocks=[k1, k2, ...]`` (ascending, distinct; replaces ``block``): tokens [B, K, N, D] of each listed
    block from one pass up to the deepest, each through the final norm exactly as ``block=k`` alone would give.
    ``n_last=n`` (with ``block``, not ``blocks``): tokens [B, N, n·D], the channel-wise concatenation of blocks
    ``block-n+1 .. block`` (the token block's last), each through the final norm: DINO/DINOv2's
    ``get_intermediate_layers(n)``, whose [cls] tokens their linear eval concatenates.
    """

    def __init__(self, encoder: nn.Module, block: int | None = None, final_norm: bool = True,
                 blocks: Sequence[int] | None = None, n_last: int = 1) -> None:
        super().__init__()
        depth = len(encoder.blocks)
        if not isinstance(n_last, int) or n_last < 1:
            raise ConfigError(f"n_last_blocks must be an integer >= 1, got {n_last!r}")
        if n_last > 1 and blocks is not None:
            raise ConfigError("--n-last-blocks concatenates blocks into one token source; it does not combine with "
                              "--blocks (layer-wise probing): give one of them")
        if blocks is not None:
            blocks = list(blocks)
            bad = [k for k in blocks if not 0 <= k < depth]
            if bad or not blocks:
                raise ConfigError(f"blocks {bad or blocks} do not exist: the encoder has blocks 0..{depth - 1}")
            if blocks != sorted(set(blocks)):
                raise ConfigError(f"blocks must be distinct and ascending, got {blocks}")
            block = blocks[-1]
        if block is not None and block != -1:
            if not 0 <= block < depth:
                raise ConfigError(f"block {block} does not exist: the encoder has blocks 0..{depth - 1}")
            encoder.blocks = encoder.blocks[: block + 1]
        if not final_norm:
            encoder.norm = nn.Identity()
        self.block = depth - 1 if block in (None, -1) else block
        if n_last > self.block + 1:
            raise ConfigError(f"--n-last-blocks {n_last}: the token block {self.block} has only {self.block + 1} "
                              "blocks up to it")
        self.blocks = blocks
        self.n_last = n_last
        self.final_norm = final_norm
        self.encoder = encoder.eval().requires_grad_(False)
        self._kept: dict[int, Tensor] = {}
        self._concat = list(range(self.block - n_last + 1, self.block)) if n_last > 1 else []
        for k in (blocks[:-1] if blocks is not None else self._concat):
            encoder.blocks[k].register_forward_hook(self._keeper(k))

    def _keeper(self, k: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self._kept[k] = output
        return hook

    def train(self, mode: bool = True) -> TokenSource:
        """The encoder stays in eval mode whatever the caller asks."""
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            if self.blocks is None and not self._concat:
                return self.encoder.forward_features(images)
            try:  # the hooks' tokens are dropped whatever happens (a failed pass must not hold them)
                last = self.encoder.forward_features(images)
                kept = self.blocks[:-1] if self.blocks is not None else self._concat
                parts = [self.encoder.norm(self._kept[k]) for k in kept]
            finally:
                self._kept.clear()
            return torch.stack([*parts, last], 1) if self.blocks is not None else torch.cat([*parts, last], -1)


def source_block(source: Any) -> int:
    """The block a token source (or its compiled wrapper) reads."""
    return getattr(source, "_orig_mod", source).block
