"""The frozen encoder as a token source: tokens of block ``k`` (default the last), final norm or not."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from beyond_cls.config import ConfigError

__all__ = ["TokenSource"]


class TokenSource(nn.Module):
    """``forward(images) -> tokens [B, N, D]`` of a timm ViT / Beit / Eva encoder, without gradients.

    ``block=k`` keeps blocks ``0..k`` only (the later ones never run); ``final_norm=False`` skips the
    encoder's final norm. The encoder is shared, not copied: building a TokenSource truncates it.
    """

    def __init__(self, encoder: nn.Module, block: int | None = None, final_norm: bool = True) -> None:
        super().__init__()
        depth = len(encoder.blocks)
        if block is not None and block != -1:
            if not 0 <= block < depth:
                raise ConfigError(f"block {block} does not exist: the encoder has blocks 0..{depth - 1}")
            encoder.blocks = encoder.blocks[: block + 1]
        if not final_norm:
            encoder.norm = nn.Identity()
        self.block = depth - 1 if block in (None, -1) else block
        self.final_norm = final_norm
        self.encoder = encoder.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> TokenSource:
        """The encoder stays in eval mode whatever the caller asks."""
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder.forward_features(images)
