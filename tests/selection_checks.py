"""Shared by the selection tests: small ViTs with peaked attention, and selections from materialized attention."""

from __future__ import annotations

import timm
import torch

from beyond_cls.data import IMAGENET_MEAN, IMAGENET_STD

MODELS = {
    "cls_even": ({}, 64),  # [cls], 4 x 4 grid
    "reg4_odd": ({"reg_tokens": 4}, 48),  # [cls] + 4 registers, 3 x 3 grid
}


def make_model(kwargs: dict, img_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2, img_size=img_size,
                              **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.weight"):
                p.mul_(6.0)  # peaked attention, so the methods differ
    return model.eval()


def last_block_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, H, N, N] attention of the last block from timm's unfused path, caught after the softmax."""
    attn = model.blocks[-1].attn
    caught = []
    hook = attn.attn_drop.register_forward_hook(lambda _m, _i, out: caught.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model.forward_features(images)
    finally:
        hook.remove()
        attn.fused_attn = fused
    return caught[0].double()


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def direct(a: torch.Tensor, prefix: int, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    cls_rows = a[:, :, 0, prefix:]
    per_head = cls_rows / cls_rows.sum(-1, keepdim=True)
    ent = -(per_head * per_head.log()).sum(-1)  # [B, H]
    best = ent.argmin(1)
    centre = prefix + (grid[0] // 2) * grid[1] + grid[1] // 2
    mean = cls_rows.mean(1)
    centre_rows = a[:, :, centre, prefix:].mean(1)
    return {
        "attn-mean": mean / mean.sum(-1, keepdim=True),
        "attn-minent": torch.stack([per_head[i, best[i]] for i in range(a.shape[0])]),
        "attn-center": centre_rows / centre_rows.sum(-1, keepdim=True),
    }
