"""HFAttentionRecorder: the AttentionRecorder for a Hugging Face ``transformers`` ViT, recorded in place.

The model's own forward runs; only its attention is the fused :func:`beyond_cls.ops.attention_with_stats`
(no N×N matrix). Families whose attention goes through ``transformers``' ``AttentionInterface`` are switched
to the registered implementation ``"beyond_cls"`` for the duration of the context and switched back after;
Data2Vec-vision, whose self-attention classes are hard-coded eager/SDPA in ``transformers`` 5, gets the
forward of each self-attention module instance replaced instead (as the timm recorder does).
``transformers`` is optional and imported only when a recorder is built.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from beyond_cls.analysis.recorder import AttentionRecorder
from beyond_cls.capture import restore_forward, swap_forward

__all__ = ["FAMILIES", "IMPLEMENTATION", "HFAttentionRecorder", "prefix_layout", "require_transformers"]

IMPLEMENTATION = "beyond_cls"  # the name the fused attention is registered under in AttentionInterface
INSTALL_HINT = "recording a transformers model needs transformers: pip install 'beyond-cls[hf]'"
NO_WEIGHTS = ("HFAttentionRecorder: the fused attention does not produce attention weights; "
              "run the model without output_attentions=True while recording")


@dataclass(frozen=True)
class Family:
    """How a ``transformers`` model type is recorded: its per-block attention class, and whether that class
    calls ``AttentionInterface`` (else its instances' forward is replaced)."""

    attention: str
    interface: bool


FAMILIES: dict[str, Family] = {  # config.model_type -> Family
    "vit": Family("ViTAttention", True),
    "deit": Family("DeiTAttention", True),
    "vit_mae": Family("ViTMAEAttention", True),
    "dinov2": Family("Dinov2Attention", True),
    "dinov2_with_registers": Family("Dinov2WithRegistersAttention", True),
    "ijepa": Family("IJepaAttention", True),
    "beit": Family("BeitAttention", True),
    "data2vec-vision": Family("Data2VecVisionSelfAttention", False),
}

# Prefix tokens, in sequence order after the embeddings of every family above: [cls], DeiT's distillation token,
# DINOv2's registers (I-JEPA has none).
_PREFIX_PARAMETERS = ("cls_token", "distillation_token", "register_tokens")

# Attention module -> (recorder, block index), for the modules of every active recorder.
_ACTIVE: dict[nn.Module, tuple[HFAttentionRecorder, int]] = {}


def require_transformers():
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return transformers


@functools.cache
def _register() -> None:
    """The fused attention, and eager's additive float masks for it (a model given an ``attention_mask``)."""
    transformers = require_transformers()
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    transformers.AttentionInterface.register(IMPLEMENTATION, fused_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


def prefix_layout(model: nn.Module) -> tuple[int, bool]:
    """(number of prefix tokens, has a [cls] token) of a supported ``transformers`` model, read off its embeddings."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is None:
        raise TypeError(f"{type(model).__name__} has no embeddings module to read its prefix tokens from")
    params = {name: getattr(embeddings, name, None) for name in _PREFIX_PARAMETERS}
    count = sum(int(p.shape[1]) for p in params.values() if p is not None)  # each [1, tokens, D]
    return count, params["cls_token"] is not None


def _check_eval(module: nn.Module, dropout: float) -> None:
    if module.training and dropout > 0:
        raise RuntimeError("HFAttentionRecorder needs eval mode: attention dropout is active")


def fused_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            **kwargs) -> tuple[Tensor, None]:
    """The ``"beyond_cls"`` AttentionInterface function: q, k, v [B, H, N, d] -> (out [B, N, H, d], None).

    ``attention_mask`` is an additive bias (BEiT's relative position bias arrives here) or a boolean keep-mask.
    It records into the recorder that holds ``module``; attention weights are never produced.
    """
    entry = _ACTIVE.get(module)
    if entry is None:
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} runs only inside HFAttentionRecorder; "
                           f"this {type(module).__name__} is not being recorded")
    if kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False):
        raise ValueError(NO_WEIGHTS)
    _check_eval(module, dropout)
    recorder, index = entry
    bias = attention_mask
    if bias is not None and bias.dtype == bool:
        bias = query.new_zeros(bias.shape).masked_fill_(~bias, -math.inf)
    out = recorder._attend(index, query, key, value, scaling, bias)
    return out.to(value.dtype).transpose(1, 2), None


def _data2vec_forward(index: int):
    """A forward for one Data2VecVisionSelfAttention (eager or SDPA class) that runs the fused op."""

    def forward(module: nn.Module, hidden_states: Tensor, output_attentions: bool = False,
                relative_position_bias: Tensor | None = None, interpolate_pos_encoding: bool = False,
                resolution: tuple[int, int] | None = None) -> tuple[Tensor]:
        if output_attentions:
            raise ValueError(NO_WEIGHTS)
        _check_eval(module, module.dropout.p)
        recorder = _ACTIVE[module][0]
        shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (module.query, module.key, module.value))
        bias = None
        if module.has_relative_position_bias:
            height, width = resolution
            window = (height // module.config.patch_size, width // module.config.patch_size)
            bias = module.relative_position_bias(window, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
        if relative_position_bias is not None:  # the encoder's shared bias
            bias = relative_position_bias if bias is None else bias + relative_position_bias
        out = recorder._attend(index, q, k, v, 1 / math.sqrt(module.attention_head_size), bias)
        return (out.to(v.dtype).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1),)

    return forward


def _configs(model: nn.Module) -> list:
    """Every ``transformers`` config object the model's modules hold (sub-configs included), once each."""
    found: dict[int, object] = {}
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation_internal"):
            continue
        found[id(config)] = config
        stack += [getattr(config, key, None) for key in getattr(config, "sub_configs", {})]
    return list(found.values())


class HFAttentionRecorder(AttentionRecorder):
    """:class:`AttentionRecorder` (same fields, ``summary``, ``keep_rows``, ``reset``) for a ``transformers`` model of
    a family in :data:`FAMILIES`: ``with HFAttentionRecorder(model) as rec: model(pixel_values=x)``.

    Records the attention blocks of ``model.base_model`` (the encoder: e.g. not ViT-MAE's decoder). The prefix
    layout is read off the embeddings (:func:`prefix_layout`); ``name`` defaults to the config's ``_name_or_path``.
    On exit the model's attention implementation (every config it holds) and its forwards are exactly restored.
    """

    def __init__(
        self,
        model: nn.Module,
        num_prefix_tokens: int | None = None,
        has_class_token: bool | None = None,
        name: str = "",
        keep_rows: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
    ) -> None:
        transformers = require_transformers()
        if not isinstance(model, transformers.PreTrainedModel):
            raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
        model_type = model.config.model_type
        if model_type not in FAMILIES:
            raise TypeError(f"transformers model type {model_type!r} is not supported; "
                            f"supported: {', '.join(FAMILIES)}")
        self.family = FAMILIES[model_type]
        modules = [(n, m) for n, m in model.base_model.named_modules()
                   if any(c.__name__ == self.family.attention for c in type(m).__mro__)]
        if not modules:
            raise TypeError(f"{type(model).__name__} has no {self.family.attention} module to record")
        prefix, has_cls = prefix_layout(model)
        num_prefix_tokens = prefix if num_prefix_tokens is None else num_prefix_tokens
        has_class_token = has_cls if has_class_token is None else has_class_token
        name = name or getattr(model.config, "_name_or_path", "") or model_type
        self._setup(model, modules, num_prefix_tokens, has_class_token, name, keep_rows)
        self._saved_configs: list[tuple[object, object]] = []
        self._active = False
        _register()

    def __enter__(self) -> HFAttentionRecorder:
        if self._active:
            raise RuntimeError("HFAttentionRecorder is already active")
        if getattr(self.model.config, "output_attentions", False):
            raise ValueError(NO_WEIGHTS + " (the model's config sets it)")
        if getattr(self.model.config, "mask_ratio", 0.0) > 0:  # ViT-MAE drops that share of patches at random
            raise ValueError(f"{type(self.model).__name__} masks {self.model.config.mask_ratio:g} of the patches at "
                             "random: set model.config.mask_ratio = 0.0 to record whole images")
        busy = [name for name, module in self.modules if module in _ACTIVE]
        if busy:
            raise RuntimeError(f"attention modules {busy} are already being recorded by another recorder")
        self._active = True
        try:
            for index, (_, module) in enumerate(self.modules):
                _ACTIVE[module] = (self, index)
            if self.family.interface:
                self._saved_configs = [(c, c._attn_implementation_internal) for c in _configs(self.model)]
                self.model.set_attn_implementation(IMPLEMENTATION)
                wrong = sorted({m.config._attn_implementation for _, m in self.modules} - {IMPLEMENTATION})
                if wrong:
                    raise RuntimeError(f"could not switch {type(self.model).__name__} to attention "
                                       f"{IMPLEMENTATION!r} (still {wrong})")
            else:
                for index, (_, module) in enumerate(self.modules):
                    self._saved.append(swap_forward(module, _data2vec_forward(index)))
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        """Give the model its attention implementation and forwards back (idempotent)."""
        for config, implementation in self._saved_configs:
            config._attn_implementation_internal = implementation
        self._saved_configs = []
        for (_, module), saved in zip(self.modules, self._saved):
            restore_forward(module, saved)
        self._saved = []
        for _, module in self.modules:
            if _ACTIVE.get(module, (None,))[0] is self:
                del _ACTIVE[module]
        self._active = False
