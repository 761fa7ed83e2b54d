"""Selection vectors of several methods for batches of images, each encoder run once per batch.

The methods and their definitions: :mod:`beyond_cls.selection`; the aggregations and localization jobs use this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from beyond_cls.capture import RowCapture
from beyond_cls.config import ConfigError
from beyond_cls.models import load_encoder
from beyond_cls.models.loader import encoder_info
from beyond_cls.probe.head_loading import ProbeHead, load_probe_head, read_run_config
from beyond_cls.runtime import autocast
from beyond_cls.selection import (
    ATTENTION_METHODS,
    Method,
    attention_queries,
    attention_selection,
    encoder_norm,
    parse_method,
    parse_methods,
    scores_selection,
)

__all__ = ["SelectionRunner"]


@dataclass
class _Encoder:
    """One loaded encoder, what each batch needs from it, and the methods it serves."""

    model: nn.Module
    mean: Tensor
    std: Tensor
    attention: list[Method]  # methods read off its kept rows (attn-*, guide)
    heads: list[tuple[Method, ProbeHead]]  # AbMILP heads on its tokens


class SelectionRunner:
    """Selection vectors of several methods for batches of images, each encoder run once per batch.

    ``model`` is the encoder of the ``attn-*`` methods: a name (loaded with ``checkpoint`` etc. as by
    :func:`load_encoder`) or a loaded encoder. ``guide:`` methods and ``abmilp:`` runs bring their own encoders,
    each loaded once; a run whose encoder settings equal ``model``'s (name, weights, normalization) shares it.
    Encoders without a checkpoint get random weights seeded like ``beyond-cls probe`` does (its first seed; 0
    for guides), so a run on a random encoder is reproduced. Call with images ``[B, 3, H, W]`` in [0, 1] (not
    normalized: each encoder applies its own mean/std); returns ``{method name: [B, num_patches] float64}``.
    All methods must see the same patch grid so that their vectors are comparable.
    """

    def __init__(
        self,
        methods: str | Sequence[str | Method],
        model: str | nn.Module | None = None,
        checkpoint: str | None = None,
        *,
        checkpoint_format: str = "auto",
        arch: str | None = None,
        source: str | None = None,
        weights_dir: str | None = None,
        img_size: int = 224,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
    ) -> None:
        if isinstance(methods, str):
            self.methods = parse_methods(methods)
        else:
            self.methods = [m if isinstance(m, Method) else parse_method(m) for m in methods]
        self.device = torch.device(device)
        self.precision = precision
        self.img_size = img_size
        self.weights_dir = weights_dir
        self._encoders: dict[tuple, _Encoder] = {}
        main_norm = (tuple(mean) if mean else None, tuple(std) if std else None)
        if isinstance(model, nn.Module):
            main_key: tuple = ("given", id(model))
            self._add_encoder(main_key, model, main_norm)
        else:
            main_kwargs = dict(name=model, checkpoint=checkpoint, checkpoint_format=checkpoint_format, arch=arch,
                               source=source, weights_dir=weights_dir, img_size=img_size)
            main_key = _key(main_kwargs, main_norm)
        for method in self.methods:
            if method.kind in ATTENTION_METHODS:
                if main_key not in self._encoders:
                    if model is None:
                        raise ConfigError(f"method {method.name} needs --model")
                    self._load(main_key, main_kwargs, main_norm, seed=0)
                self._encoders[main_key].attention.append(method)
            elif method.kind == "guide":
                kw = dict(name=method.model, checkpoint=method.checkpoint, weights_dir=weights_dir, img_size=img_size)
                key = _key(kw, (None, None))
                self._load(key, kw, (None, None), seed=0).attention.append(method)
            else:
                self._add_head(method)
        for enc in self._encoders.values():
            info = enc.model.beyond_cls_info
            needs_cls = [m.name for m in enc.attention if m.kind in ("attn-mean", "attn-minent", "guide")]
            if needs_cls and not info.has_class_token:
                raise ConfigError(f"{', '.join(needs_cls)}: encoder {info.name} has no [cls] token "
                                  "(use attn-center or abmilp:RUN)")
        grids = {tuple(e.model.beyond_cls_info.grid_size) for e in self._encoders.values()}
        if len(grids) > 1:
            raise ConfigError(f"methods {', '.join(m.name for m in self.methods)} see different patch grids "
                              f"{sorted(grids)}; use encoders with the same patch size and image size")
        self.grid_size: tuple[int, int] = grids.pop()
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def _add_encoder(self, key: tuple, model: nn.Module, norm: tuple) -> _Encoder:
        if not hasattr(model, "beyond_cls_info"):
            model.beyond_cls_info = encoder_info(model)
        model = model.to(self.device).eval()
        info = model.beyond_cls_info
        mean, std = encoder_norm(info, *norm)
        m = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self._encoders[key] = _Encoder(model, m, s, [], [])
        return self._encoders[key]

    def _load(self, key: tuple, kwargs: dict, norm: tuple, seed: int) -> _Encoder:
        if key not in self._encoders:
            kwargs = dict(kwargs)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # a random encoder (no checkpoint) as beyond-cls probe builds it
                self._add_encoder(key, load_encoder(kwargs.pop("name"), **kwargs), norm)
        return self._encoders[key]

    def _add_head(self, method: Method) -> None:
        root = Path(method.run)
        _, cfg = read_run_config(root)
        if cfg.img_size != self.img_size:
            raise ConfigError(f"method {method.name}: the run used img_size {cfg.img_size}, this job {self.img_size}")
        kw = dict(name=cfg.model, checkpoint=cfg.checkpoint, checkpoint_format=cfg.checkpoint_format, arch=cfg.arch,
                  source=cfg.source, weights_dir=cfg.weights_dir or self.weights_dir, img_size=cfg.img_size)
        norm = cfg.normalization()
        key = _key(kw, norm)
        # random encoders of runs with different first seeds differ
        key = key + (("seed", cfg.seed_list()[0]),) if cfg.checkpoint is None else key
        enc = self._load(key, kw, norm, seed=cfg.seed_list()[0])
        head = load_probe_head(root, method.head, enc.model.beyond_cls_info)
        head.aggregation.to(self.device)
        enc.heads.append((method, head))

    def encoder_for(self, method: str) -> nn.Module:
        """The encoder that computes ``method``'s selection."""
        for enc in self._encoders.values():
            if any(m.name == method for m in enc.attention) or any(m.name == method for m, _ in enc.heads):
                return enc.model
        raise KeyError(f"no method {method!r}; methods: {[m.name for m in self.methods]}")

    def heads_used(self) -> dict[str, dict]:
        """``{abmilp method name: ProbeHead.describe()}``: which trained head each ``abmilp:`` method uses."""
        used = {m.name: h.describe() for enc in self._encoders.values() for m, h in enc.heads}
        return {m.name: used[m.name] for m in self.methods if m.name in used}

    @property
    def encoders(self) -> list[nn.Module]:
        return [e.model for e in self._encoders.values()]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        images = images.to(self.device, non_blocking=True)
        out: dict[str, Tensor] = {}
        for enc in self._encoders.values():
            out.update(self._run(enc, images))
        return {m.name: out[m.name] for m in self.methods}

    def _run(self, enc: _Encoder, images: Tensor) -> dict[str, Tensor]:
        model, info = enc.model, enc.model.beyond_cls_info
        x = (images - enc.mean) / enc.std
        keep = attention_queries(info)
        captured: dict[int, Tensor] = {}
        hooks = []
        blocks = {len(model.blocks) - 1 if h.block in (None, -1) else h.block for _, h in enc.heads}
        for b in blocks:
            hooks.append(model.blocks[b].register_forward_hook(
                lambda _m, _i, out, b=b: captured.__setitem__(b, out)))
        try:
            with torch.inference_mode(), autocast(self.precision, self.device):
                if enc.attention:
                    with RowCapture(model, keep) as capture:
                        model.forward_features(x)
                else:
                    model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        result: dict[str, Tensor] = {}
        if enc.attention:
            rows = capture.take()
            for m in enc.attention:
                result[m.name] = attention_selection(m.kind, rows, info.num_prefix_tokens)
        for m, head in enc.heads:
            block = len(model.blocks) - 1 if head.block in (None, -1) else head.block
            tokens = captured[block]
            with torch.inference_mode():
                if head.final_norm:
                    tokens = model.norm(tokens)
                _, scores = head.aggregation.forward_with_scores(tokens.float())
            result[m.name] = scores_selection(scores, head.with_cls)
        return result


def _key(kwargs: dict, norm: tuple) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in kwargs.items())) + (("norm", str(norm)),)
