"""Tokens plus the selection weights of the bank's non-trainable heads, from one encoder pass per batch.

``attn-mean``, ``attn-minent`` and ``attn-center`` read the attention of the token block (the last block that
runs: the encoder's last, or ``--block``'s), so the pooled tokens and the weights come from the same block; the
[cls] and central-patch rows come out of that block's fused attention pass (:class:`RowCapture`, installed for
the run). ``guide:MODEL[@CKPT]`` runs that encoder, frozen, on the same images (re-normalized with its own
mean/std) and weights the patches with its last block's [cls] attention averaged over heads (its ``attn-mean``).
Definitions: :mod:`beyond_cls.selection`. In a layer-wise run (``--blocks``) a name ``b5/attn-mean`` reads
block 5's attention (one :class:`RowCapture` per listed block, all from the same pass).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beyond_cls.capture import RowCapture
from beyond_cls.config import ConfigError
from beyond_cls.models.loader import encoder_info
from beyond_cls.probe.bank import split_selection_name
from beyond_cls.selection import Method, attention_queries, attention_selection, encoder_norm, parse_method

__all__ = ["SelectionSource"]


def _norm(values: Sequence[float], device: torch.device) -> Tensor:
    return torch.tensor(tuple(values), dtype=torch.float32, device=device).view(1, 3, 1, 1)


@dataclass
class _Guide:
    model: nn.Module
    capture: RowCapture
    mean: Tensor
    std: Tensor
    same_norm: bool  # normalized like the probed encoder's images: no conversion


class SelectionSource(nn.Module):
    """``forward(images) -> (tokens [B, N, D], selections [B, M, num_patches] float32, or None without specs)``.

    ``source`` is the probe's :class:`~beyond_cls.probe.features.TokenSource` (possibly ``torch.compile``\\ d);
    ``specs`` the non-trainable head specs in :attr:`HeadBank.selections` order; ``mean``/``std`` the
    normalization of the images it is given. Guides load like :func:`load_encoder` does (``weights_dir``; a
    guide without weights gets seed-0 random weights, as ``beyond-cls aggregations`` builds it).
    """

    def __init__(
        self,
        source: nn.Module,
        specs: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        img_size: int = 224,
        weights_dir: str | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.source = source
        self.blocks: list[int] = []  # per spec: the attention block its rows come from (-1: the token block)
        self.methods: list[Method] = []
        for name in specs:
            block, spec = split_selection_name(name)
            self.methods.append(parse_method(spec))
            self.blocks.append(-1 if block is None else block)
        device = torch.device(device)
        encoder = getattr(source, "_orig_mod", source).encoder
        info = getattr(encoder, "beyond_cls_info", None) or encoder_info(encoder)
        self.num_prefix_tokens = info.num_prefix_tokens
        self.grid_size = tuple(info.grid_size)
        self._norm_values = encoder_norm(info, mean, std)
        self.mean, self.std = (_norm(v, device) for v in self._norm_values)
        self.captures: dict[int, RowCapture] = {}
        queries = attention_queries(info)
        for m, block in zip(self.methods, self.blocks):
            if m.kind != "guide" and block not in self.captures:
                self.captures[block] = RowCapture(encoder, queries, block=block,
                                                  num_prefix_tokens=info.num_prefix_tokens).install()
        self.guides: dict[str, _Guide] = {}
        for m in self.methods:
            if m.kind == "guide":
                self.guides[m.name] = self._load_guide(m, img_size, weights_dir, device)

    def _load_guide(self, method: Method, img_size: int, weights_dir: str | None, device: torch.device) -> _Guide:
        from beyond_cls.models import load_encoder

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = load_encoder(method.model, method.checkpoint, img_size=img_size, weights_dir=weights_dir)
        model = model.to(device).eval().requires_grad_(False)
        info = model.beyond_cls_info
        if not info.has_class_token:
            raise ConfigError(f"head {method.name}: guide {info.name} has no [cls] token to guide with")
        if tuple(info.grid_size) != self.grid_size:
            raise ConfigError(f"head {method.name}: the guide sees a {tuple(info.grid_size)} patch grid, the probed "
                              f"encoder {self.grid_size}; use a guide with the same patch and image size")
        capture = RowCapture(model, (0,), num_prefix_tokens=info.num_prefix_tokens).install()
        mean, std = encoder_norm(info)
        return _Guide(model, capture, _norm(mean, device), _norm(std, device), (mean, std) == self._norm_values)

    def train(self, mode: bool = True) -> SelectionSource:
        """Frozen: every encoder stays in eval mode."""
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        tokens = self.source(images)
        if not self.methods:
            return tokens, None
        b, p = images.shape[0], self.grid_size[0] * self.grid_size[1]
        if b == 0:
            return tokens, tokens.new_zeros(0, len(self.methods), p, dtype=torch.float32)
        rows = {block: capture.take() for block, capture in self.captures.items()}
        out = []
        with torch.no_grad():
            for m, block in zip(self.methods, self.blocks):
                if m.kind == "guide":
                    out.append(self._guide_selection(self.guides[m.name], images))
                else:
                    out.append(attention_selection(m.kind, rows[block], self.num_prefix_tokens))
        return tokens, torch.stack(out, 1).float()

    def _guide_selection(self, guide: _Guide, images: Tensor) -> Tensor:
        x = images if guide.same_norm else (images * self.std + self.mean - guide.mean) / guide.std
        guide.model.forward_features(x)
        info = guide.model.beyond_cls_info
        return attention_selection("guide", guide.capture.take(), info.num_prefix_tokens)
