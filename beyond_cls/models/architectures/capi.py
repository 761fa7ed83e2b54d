"""CAPI's encoder as a timm-style ViT whose state dict has the released weights' key names.

CAPI (Darcet et al., facebookresearch/capi ``model.py: EncoderDecoder``) is a ViT-L/14 with no [cls]
token, 16 registers in front of the patches, RMSNorm, bias-free projections and a 2-D RoPE in every
attention whose frequencies are stored per layer (``rope.freqs``). No timm class reproduces it, so
this is a small inference port of the encoder half: the pretraining decoder and mask token are not
built, and drop path is left out. Module names follow the official ones (``encoder.blocks.N.
residual1.fn.q_proj``, ...) so a released file adapted by the ``capi`` checkpoint format
(``beyond_cls.models.formats.capi``) loads with ``strict=True``;
``blocks``, ``attn``, ``norm`` and ``patch_embed.grid_size`` give the timm view the package reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from torch import Tensor, nn

from beyond_cls.models.architectures.attention import AttentionAdapter, Projected
from beyond_cls.models.architectures.registry import Architecture, register_architecture

__all__ = [
    "CapiAttention",
    "CapiBlock",
    "CapiEncoder",
    "CapiMlp",
    "CapiPatchEmbed",
    "CapiResidual",
    "CapiRope",
    "CapiVisionTransformer",
    "capi_rope_coordinates",
    "capi_vit_large_patch14",
    "project_capi",
]


# ------------------------------------------------------------------------------------------ RoPE


def _edge_coordinates(n: int, dtype: torch.dtype, device: torch.device | None) -> Tensor:
    """CAPI's "edge" register positions: n/4 per side of the unit square, walking its border.

    Side by side: (t, 0), (1, t), (1 - t, 1), (0, 1 - t) for t = 0, 1/s, ..., (s-1)/s with s = n/4.
    """
    side = n // 4
    t = torch.arange(side, dtype=dtype, device=device) / side
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    return torch.cat(
        [
            torch.stack([t, zero], dim=-1),
            torch.stack([one, t], dim=-1),
            torch.stack([1 - t, one], dim=-1),
            torch.stack([zero, 1 - t], dim=-1),
        ]
    )


def capi_rope_coordinates(
    grid_size: tuple[int, int],
    num_registers: int,
    *,
    register_coordinates: str = "edge",
    scale_reg_to_visible: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """RoPE positions [num_registers + rows*cols, 2] of CAPI's full (unmasked) token sequence.

    Patches sit at ``(linspace(0, 1, rows)[i], linspace(0, 1, cols)[j])`` in row-major order (first
    coordinate along the image height); registers sit on the border ("edge") or at the origin
    ("zeros"), mapped into the patches' bounding box when ``scale_reg_to_visible``.
    """
    rows, cols = grid_size
    grid = torch.meshgrid(
        torch.linspace(0, 1, rows, dtype=dtype, device=device),
        torch.linspace(0, 1, cols, dtype=dtype, device=device),
        indexing="ij",
    )
    patches = torch.stack(grid, dim=-1).reshape(rows * cols, 2)
    if register_coordinates == "edge":
        regs = _edge_coordinates(num_registers, dtype, patches.device)
    elif register_coordinates == "zeros":
        regs = patches.new_zeros(num_registers, 2)
    else:
        raise ValueError(f"register_coordinates must be 'edge' or 'zeros', got {register_coordinates!r}")
    if scale_reg_to_visible:
        lo, hi = patches.amin(dim=0), patches.amax(dim=0)
        regs = lo + regs * (hi - lo)
    return torch.cat([regs, patches])


def _rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class CapiRope(nn.Module):
    """2-D RoPE with stored angular frequencies ``freqs`` [2, head_dim]: θ = coords @ freqs.

    The rotation pairs channel c with c + head_dim/2 (``x cos θ + rotate_half(x) sin θ``). Angles and
    the rotation run in at least float32, also under autocast, and the result has x's dtype.
    """

    def __init__(self, dim: int, max_freq: float = 7.0, min_freq: float = 7e-4) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"CAPI RoPE needs a head dim divisible by 4, got {dim}")
        self.dim = dim
        self.max_freq = max_freq
        self.min_freq = min_freq
        self.freqs = nn.Parameter(torch.empty(2, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CAPI's initial frequencies: geometric from max_freq to min_freq (cycles per unit), x on the
        first half of the channels, y on the second, as angular frequencies."""
        quarter = self.dim // 4
        base = self.max_freq * (self.max_freq / self.min_freq) ** torch.linspace(0, -1, quarter)
        half = torch.cat([base, base]) * (2 * torch.pi)
        freqs = torch.zeros(2, self.dim)
        freqs[0, : self.dim // 2] = half
        freqs[1, self.dim // 2 :] = half
        self.freqs.copy_(freqs.to(self.freqs.device, self.freqs.dtype))

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        """Rotate x [..., N, head_dim] at positions coords [N, 2] (or broadcastable to [..., N, 2])."""
        compute = torch.promote_types(x.dtype, torch.float32)
        coords = coords.to(compute)
        freqs = self.freqs.to(compute)
        # coords @ freqs written as a sum of two products so autocast cannot lower it to bf16
        angle = coords[..., 0:1] * freqs[0] + coords[..., 1:2] * freqs[1]
        xc = x.to(compute)
        return (xc * angle.cos() + _rotate_half(xc) * angle.sin()).to(x.dtype)


# ------------------------------------------------------------------------------------- modules


class CapiAttention(nn.Module):
    """Bias-free multi-head self-attention with CAPI's RoPE on q and k of every token (registers too)."""

    def __init__(self, dim: int, num_heads: int, rope_max_freq: float = 7.0, rope_min_freq: float = 7e-4) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5  # SDPA's default, which CAPI uses
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rope = CapiRope(self.head_dim, max_freq=rope_max_freq, min_freq=rope_min_freq)

    def project(self, x: Tensor, coords: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, N, head_dim] as the attention sees them: q and k already rotated."""
        b, n, _ = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q = self.rope(heads(self.q_proj(x)), coords)
        k = self.rope(heads(self.k_proj(x)), coords)
        return q, k, heads(self.v_proj(x))

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        q, k, v = self.project(x, coords)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class CapiMlp(nn.Module):
    """fc1 -> exact GELU -> fc2, no biases."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CapiResidual(nn.Module):
    """``x + fn(norm(x), *args)``: CAPI's pre-norm residual branch (named ``norm`` and ``fn``)."""

    def __init__(self, norm: nn.Module, fn: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.fn = fn

    def forward(self, x: Tensor, *args: Tensor) -> Tensor:
        return x + self.fn(self.norm(x), *args)


class CapiBlock(nn.Module):
    """RMSNorm + attention, RMSNorm + MLP; ``attn``, ``norm1``, ``mlp``, ``norm2`` are timm-style aliases."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        rope_max_freq: float = 7.0,
        rope_min_freq: float = 7e-4,
    ) -> None:
        super().__init__()
        self.residual1 = CapiResidual(
            nn.RMSNorm(dim, eps=norm_eps), CapiAttention(dim, num_heads, rope_max_freq, rope_min_freq)
        )
        self.residual2 = CapiResidual(nn.RMSNorm(dim, eps=norm_eps), CapiMlp(dim, int(dim * mlp_ratio)))

    @property
    def attn(self) -> CapiAttention:
        return self.residual1.fn

    @property
    def norm1(self) -> nn.Module:
        return self.residual1.norm

    @property
    def mlp(self) -> CapiMlp:
        return self.residual2.fn

    @property
    def norm2(self) -> nn.Module:
        return self.residual2.norm

    def forward(self, x: Tensor, coords: Tensor) -> Tensor:
        return self.residual2(self.residual1(x, coords))


class CapiEncoder(nn.Module):
    """Holds ``blocks`` under the official ``encoder.`` prefix."""

    def __init__(self, blocks: list[CapiBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


class CapiPatchEmbed(nn.Conv2d):
    """CAPI's patch conv (stored as ``patch_embed.weight/bias``) returning tokens [B, N, D] like timm's
    PatchEmbed, with timm's ``img_size``, ``patch_size``, ``grid_size`` and ``num_patches``."""

    def __init__(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)


class CapiVisionTransformer(nn.Module):
    """CAPI's encoder: tokens [16 registers, patches (row-major)] -> blocks with 2-D RoPE -> RMSNorm.

    ``forward_features(images)`` returns the normed tokens [B, num_registers + N, D] (CAPI's encoder
    output, ``enc_norm`` applied); ``forward_head`` pools them (``global_pool='avg'``: mean of the
    patch tokens, ``''``: tokens unchanged). There is no classifier and no [cls] token.
    With ``dynamic_img_size`` any input of at least one patch is accepted (pixels beyond the last full
    patch are ignored, as the official conv does); otherwise the input must be ``img_size``.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_registers: int = 16,
        norm_eps: float = 1e-5,
        rope_max_freq: float = 7.0,
        rope_min_freq: float = 7e-4,
        register_coordinates: str = "edge",
        scale_reg_to_visible: bool = True,
        global_pool: str = "avg",
        dynamic_img_size: bool = False,
        num_classes: int = 0,
        architecture: str = "capi_vit",
    ) -> None:
        super().__init__()
        if num_classes:
            raise ValueError(f"the CAPI port has no classifier head; num_classes must be 0, got {num_classes}")
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be '' (tokens) or 'avg' (mean of patches), got {global_pool!r}")
        if register_coordinates not in ("edge", "zeros"):
            raise ValueError(f"register_coordinates must be 'edge' or 'zeros', got {register_coordinates!r}")
        if register_coordinates == "edge" and num_registers % 4:
            raise ValueError(f"'edge' register coordinates need a multiple of 4 registers, got {num_registers}")
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = 0
        self.global_pool = global_pool
        self.num_prefix_tokens = self.num_reg_tokens = num_registers
        self.has_class_token = False
        self.cls_token = None
        self.register_coordinates = register_coordinates
        self.scale_reg_to_visible = scale_reg_to_visible
        self.dynamic_img_size = dynamic_img_size
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": architecture,
            "input_size": (in_chans, *to_2tuple(img_size)),
            "interpolation": "bicubic",
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "num_classes": 0,
        }

        self.registers = nn.Parameter(torch.empty(1, num_registers, embed_dim))
        self.patch_embed = CapiPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.encoder = CapiEncoder(
            [CapiBlock(embed_dim, num_heads, mlp_ratio, norm_eps, rope_max_freq, rope_min_freq) for _ in range(depth)]
        )
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps, elementwise_affine=False)  # CAPI's enc_norm
        self.head = nn.Identity()
        self.init_weights()

    # -- timm view ----------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        """``encoder.blocks`` (the state dict keeps the official ``encoder.`` prefix)."""
        return self.encoder.blocks

    def __setattr__(self, name: str, value: Any) -> None:
        # ``model.blocks = model.blocks[:k]`` (TokenSource) must replace encoder.blocks; nn.Module would
        # otherwise register a second child named "blocks" behind the property's back.
        if name == "blocks":
            self.encoder.blocks = value
            return
        super().__setattr__(name, value)

    @torch.no_grad()
    def init_weights(self) -> CapiVisionTransformer:
        """CAPI's initialization: xavier-uniform linears and patch conv, registers N(0, 0.02), RoPE
        frequencies from their formula. Loading a checkpoint overwrites all of it."""
        self.patch_embed.reset_parameters()
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.normal_(self.registers, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.RMSNorm) and module.weight is not None:
                nn.init.ones_(module.weight)
            elif isinstance(module, CapiRope):
                module.reset_parameters()
        return self

    # -- forward ------------------------------------------------------------------------------
    def _grid(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_embed.patch_size
        if not self.dynamic_img_size:
            if (height, width) != tuple(self.patch_embed.img_size):
                raise ValueError(
                    f"input is {height}x{width} but the model was built for "
                    f"{self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]}; "
                    "build it with that img_size or dynamic_img_size=True"
                )
            return self.patch_embed.grid_size
        if height < ph or width < pw:
            raise ValueError(f"input {height}x{width} is smaller than one {ph}x{pw} patch")
        return height // ph, width // pw

    def rope_coordinates(self, grid_size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Positions [num_registers + N, 2] of this model's tokens for a patch grid (see
        :func:`capi_rope_coordinates`), in at least float32."""
        return capi_rope_coordinates(
            grid_size,
            self.num_prefix_tokens,
            register_coordinates=self.register_coordinates,
            scale_reg_to_visible=self.scale_reg_to_visible,
            dtype=torch.promote_types(dtype, torch.float32),
            device=device,
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> normed tokens [B, num_registers + N, D], registers first."""
        grid = self._grid(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        x = torch.cat([self.registers.expand(x.shape[0], -1, -1), x], dim=1)
        coords = self.rope_coordinates(grid, x.dtype, x.device)
        for block in self.blocks:
            x = block(x, coords)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool tokens from :meth:`forward_features`: mean of the patch tokens, or the tokens as is."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def capi_vit_large_patch14(img_size: int | tuple[int, int] = 224, pretrained: bool = False, **kwargs) -> nn.Module:
    """The paper's CAPI ViT-L/14: dim 1024, 24 blocks, 16 heads, MLP 4096, 16 registers (302.66 M params).

    Weights come from a checkpoint file (``capi_vitl14_in1k.pth``) through the ``capi`` checkpoint format;
    nothing is downloaded. ``kwargs`` go to :class:`CapiVisionTransformer` (e.g. ``global_pool``).
    """
    if pretrained:
        raise ValueError("capi_vit_large_patch14 downloads nothing; load capi_vitl14_*.pth as a checkpoint")
    args: dict[str, Any] = dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, num_registers=16, architecture="capi_vit_large_patch14"
    )
    return CapiVisionTransformer(img_size=img_size, **(args | kwargs))


def _build(img_size: int | tuple[int, int] | None = None, **kwargs: Any) -> nn.Module:
    return capi_vit_large_patch14(img_size=img_size or 224, **kwargs)


def project_capi(module: CapiAttention, x: Tensor, coords: Tensor) -> Projected:
    """CAPI: the module's own projection, so q and k come rotated by its stored-frequency RoPE."""
    return Projected(*module.project(x, coords))


register_architecture(
    Architecture(
        "capi",
        models=(CapiVisionTransformer,),
        attention={CapiAttention: AttentionAdapter(project_capi)},
        builders={"capi": _build},
    )
)
