"""``transformers`` weight names (the layout ``save_pretrained`` writes and the hub holds) -> our timm encoder's.

Separate ``query``/``key``/``value`` Linears are fused into timm's ``qkv``; BEiT-style attention (no key bias)
keeps its biases as ``q_bias``/``v_bias``. What is not part of the encoder is dropped with a note: the task head
outside the base model (classifier, MAE decoder, BEiT's lm_head...), the mask token and the ViT/DeiT pooler
(a Linear + tanh on [cls] that the paper never uses). Everything else must map exactly: a key this module does not
know is left under its own name, and the strict load reports it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from beyond_cls.models.hf.families import HFFamily

__all__ = ["map_hf_state_dict"]

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.*)$")
_QKV = re.compile(r"^attention\.attention\.(query|key|value)\.(weight|bias)$")
# inside encoder.layer.<i>. -> inside blocks.<i>. (first match wins)
_IN_LAYER = (
    ("attention.output.dense.", "attn.proj."),
    ("attention.attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.fc1."),  # DINOv2 SwiGLU: [gate; up] packed as timm's SwiGLUPacked fc1
    ("mlp.weights_out.", "mlp.fc2."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("lambda_1", "gamma_1"),
    ("lambda_2", "gamma_2"),
)
_TOP = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("embeddings.distillation_token", "reg_token"),
    ("embeddings.register_tokens", "reg_token"),
    ("encoder.relative_position_bias.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
    ("pooler.layernorm.", "fc_norm."),
    ("layernorm.", "norm."),
)
_DROPPED = {"embeddings.mask_token": "mask token", "pooler.dense.weight": "pooler", "pooler.dense.bias": "pooler"}


def _rename(key: str, table: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in table:
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def _base_model(sd: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """The base model's weights (``<prefix>.`` stripped when the file is a task model) and the head's top names."""
    dot = prefix + "."
    if not any(k.startswith(dot) for k in sd):
        return dict(sd), []
    heads = sorted({k.split(".", 1)[0] for k in sd if not k.startswith(dot)})
    return {k[len(dot):]: v for k, v in sd.items() if k.startswith(dot)}, heads


def map_hf_state_dict(sd: dict[str, Tensor], family: HFFamily) -> tuple[dict[str, Tensor], list[str]]:
    """``sd`` in our encoder's names, and notes on what was dropped or folded (for the run's metadata)."""
    base, heads = _base_model(sd, family.prefix)
    notes = [f"task head dropped: {', '.join(h + '.*' for h in heads)}"] if heads else []
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    dropped: set[str] = set()
    for key, value in base.items():
        if key in _DROPPED:
            dropped.add(_DROPPED[key])
            continue
        if key.endswith("relative_position_index"):
            continue  # a buffer both sides rebuild
        layer = _LAYER.match(key)
        if layer is not None:
            index, rest = int(layer.group(1)), layer.group(2)
            part = _QKV.match(rest)
            if part is not None:
                qkv.setdefault((index, part.group(2)), {})[part.group(1)] = value
                continue
            new = _rename(rest, _IN_LAYER)
            out[f"blocks.{index}.{new}" if new is not None else key] = value
            continue
        new = _rename(key, _TOP)
        out[new if new is not None else key] = value
    for (index, kind), parts in qkv.items():
        _fuse(out, parts, f"encoder.layer.{index}.attention.attention", f"blocks.{index}.attn", kind, family.layout)
    if family.extra_tokens == "register_tokens" and "pos_embed" in out and "cls_token" in out:
        # DINOv2 with registers: pos row 0 belongs to [cls] only, registers have none (timm's no_embed_class layout)
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    notes += [f"{what} dropped (not used by the encoder)" for what in sorted(dropped)]
    return out, notes


def _fuse(out: dict[str, Tensor], parts: dict[str, Tensor], hf: str, ours: str, kind: str, layout: str) -> None:
    """Fuse one layer's query/key/value weights (or biases) into ``qkv``; BEiT keeps q/v biases apart."""
    if kind == "bias" and layout == "beit" and "key" not in parts:
        for name, short in (("query", "q"), ("value", "v")):
            if name in parts:
                out[f"{ours}.{short}_bias"] = parts[name]
        return
    if set(parts) == {"query", "key", "value"}:
        out[f"{ours}.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        return
    for name, value in parts.items():  # incomplete: left under the file's names, reported by the strict load
        out[f"{hf}.{name}.{kind}"] = value
