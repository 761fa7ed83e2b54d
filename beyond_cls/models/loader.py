"""Build a frozen timm ViT encoder and load a checkpoint into it strictly."""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path

import timm
from torch import nn

from beyond_cls.models.arch import check_block, check_img_size, parse_arch
from beyond_cls.models.architectures.registry import ARCHITECTURES, architecture_of, builder_for
from beyond_cls.models.checkpoint import AdaptedCheckpoint, prepare_checkpoint, wrong_format_hint
from beyond_cls.models.errors import CheckpointError
from beyond_cls.models.fit import check_fit, check_values, size_hint
from beyond_cls.models.formats.registry import CheckpointFormat
from beyond_cls.models.hf.source import HF_PREFIX
from beyond_cls.models.info import EncoderInfo, encoder_info
from beyond_cls.models.positions import resize_position_tables
from beyond_cls.models.zoo import find_weights, zoo_entry

__all__ = [
    "EncoderInfo",
    "create_encoder",
    "encoder_info",
    "load_encoder",
    "load_encoder_checkpoint",
    "resize_position_tables",
]

# Arguments load_encoder sets itself; passing them through **model_kwargs would download or add a head.
_RESERVED_KWARGS = ("pretrained", "checkpoint_path", "num_classes")


def create_encoder(name: str, img_size: int | tuple[int, int] | None = None, **model_kwargs) -> nn.Module:
    """The encoder architecture ``name`` without weights or classifier, with readable errors.

    A name a registered architecture builds itself (e.g. ``capi``) goes to its builder; any other to
    ``timm.create_model(name, pretrained=False, num_classes=0, ...)``.
    """
    _check_reserved(model_kwargs)
    return _create(name, img_size, 0, model_kwargs)


def _check_reserved(model_kwargs: dict) -> None:
    reserved = [k for k in _RESERVED_KWARGS if k in model_kwargs]
    if reserved:
        raise ValueError(
            f"load_encoder sets {reserved} itself (no downloads, no classifier head); "
            "pass weights with checkpoint=<file>"
        )


def _create(name: str, img_size: int | tuple[int, int] | None, num_classes: int, kwargs: dict) -> nn.Module:
    builder = builder_for(name)
    if builder is not None:
        return builder(img_size=img_size, num_classes=num_classes, **kwargs)
    if not timm.is_model(name):
        own = [n for a in ARCHITECTURES.values() for n in a.builders]
        close = difflib.get_close_matches(name, [*own, *timm.list_models()], n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown timm model {name!r}{hint}. List candidates with timm.list_models('*vit*'), "
            "timm.list_models('beit*') or timm.list_models('eva*')"
        )
    problem = _not_a_vit(name)
    if problem:
        raise ValueError(problem)
    if img_size is not None:
        kwargs = {**kwargs, "img_size": img_size}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


#: What ``--model`` / ``--arch`` can build, for errors.
SUPPORTED_ARCHITECTURES = ("timm ViT/DeiT (vit_*, deit*), BEiT (beit*, beitv2*), EVA-02 (eva02*), capi, the zoo names "
                           "(beyond-cls zoo) and hf:PATH (Hugging Face ViT, DINOv2, BEiT... folders)")
_VIT_FAMILY_WORDS = ("vit", "vision_transformer", "deit", "beit", "eva")


def _not_a_vit(name: str) -> str:
    """Why timm model ``name`` is not an encoder we can use ("" when its timm family is a ViT one)."""
    try:
        module = timm.models.model_entrypoint(name).__module__
    except (RuntimeError, KeyError, AttributeError):
        return ""
    family = module.rsplit(".", 1)[-1]
    ours = {c.__module__ for a in ARCHITECTURES.values() for c in a.models}
    if module in ours or any(word in family for word in _VIT_FAMILY_WORDS):
        return ""
    return f"{name} is not a Vision Transformer (timm's {family} models); supported architectures: " + \
        SUPPORTED_ARCHITECTURES


def _fit_hints(ckpt: AdaptedCheckpoint, model: nn.Module, name: str) -> tuple[str, ...]:
    hints = [wrong_format_hint(ckpt.format, ckpt.detected),
             size_hint(ckpt.state_dict, model, name, ckpt.format.name, ckpt.model_kwargs)]
    if ckpt.model_kwargs:
        args = ", ".join(f"{k}={v!r}" for k, v in ckpt.model_kwargs.items())
        hints.append(f"this checkpoint needs a model created with {args}")
    head = getattr(model, "head", None)
    if not ckpt.keep_head and isinstance(head, nn.Linear):
        hints.append("the model has a classifier head: pass keep_head=True to load the checkpoint's head.* "
                     "(or build the model with num_classes=0)")
    return tuple(hints)


def load_encoder_checkpoint(
    model: nn.Module,
    checkpoint: str | Path | AdaptedCheckpoint,
    checkpoint_format: str | CheckpointFormat = "auto",
    key: str | None = None,
    name: str | None = None,
    *,
    source: str | None = None,
    keep_head: bool = False,
) -> CheckpointFormat:
    """Read ``checkpoint``, adapt it to timm layout and load it into ``model`` strictly.

    ``checkpoint`` is a file, or an :class:`AdaptedCheckpoint` from
    :func:`~beyond_cls.models.checkpoint.prepare_checkpoint` (then the format arguments were given
    there). ``source`` picks a sub-model of a training checkpoint (I-JEPA ``"target_encoder"``/
    ``"encoder"``, DINO/iBOT ``"teacher"``/``"student"``, MoCo-v3 ``"base_encoder"``/
    ``"momentum_encoder"``); ``keep_head=True`` also loads a fine-tuned classifier ``head.*`` (build the
    model with ``num_classes``). Position tables are resampled to the model's grid (with the format's
    own interpolation where it has one), and the model's architecture may adapt the weights last (a
    shared BEiT bias table is copied into per-block tables if the model has those). Non-persistent
    buffers in the file (e.g. ``relative_position_index``) are ignored since the model rebuilds them;
    every other leftover or missing key, wrong shape, NaN/Inf value or integer tensor for a float
    parameter raises one :class:`CheckpointError`. Returns the format used.
    """
    if isinstance(checkpoint, AdaptedCheckpoint):
        ckpt = checkpoint
        same_format = checkpoint_format in ("auto", ckpt.format, ckpt.format.name)
        if not same_format or key is not None or source is not None or keep_head:
            raise ValueError("pass checkpoint_format/key/source/keep_head to prepare_checkpoint, not here")
    else:
        ckpt = prepare_checkpoint(checkpoint, checkpoint_format, key=key, source=source, keep_head=keep_head)
    fmt, path = ckpt.format, ckpt.path
    non_persistent = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    sd = {k: v for k, v in ckpt.state_dict.items() if k not in non_persistent}
    arch = architecture_of(model)
    if arch is not None and arch.prepare_state_dict is not None:
        sd = arch.prepare_state_dict(sd, model)
    check_values(sd, model, path)
    sd = resize_position_tables(sd, model, path, resample_pos_embed=fmt.resample_pos_embed)
    name = name or type(model).__name__
    check_fit(sd, model, name, fmt.name, path, _fit_hints(ckpt, model, name))
    model.load_state_dict(sd, strict=True)
    return fmt


def _build(arch: str, img_size: int | tuple[int, int] | None, num_classes: int, kwargs: dict) -> nn.Module:
    """The model, with a readable error for heads that do not divide the width or a bad input size."""
    _check_reserved(kwargs)
    try:
        model = _create(arch, img_size, num_classes, kwargs)
    except AssertionError as exc:  # timm asserts e.g. dim % num_heads == 0
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k == "num_heads")
        raise ValueError(f"cannot build {arch}" + (f" with {given}" if given else "") + f": {exc}") from None
    check_img_size(model, arch)
    return model


def _format_mismatch(ckpt: AdaptedCheckpoint, architecture: str, exc: TypeError) -> CheckpointError:
    """The error for a checkpoint format whose model arguments ``architecture`` does not take."""
    fmt, detected = ckpt.format.name, ckpt.detected
    looks = f"the file looks like checkpoint_format {detected!r}, not {fmt!r}" if detected and detected != fmt else \
        f"checkpoint_format {fmt!r} does not fit {architecture}"
    arg = next((k for k in ckpt.model_kwargs if repr(k) in str(exc)), None)
    why = f" ({fmt!r} builds its model with {arg}=..., which {architecture} does not take)" if arg else ""
    fix = f"; pass --checkpoint-format {detected} or auto" if detected and detected != fmt else ""
    return CheckpointError(ckpt.path, looks + why + fix)


def _load_hf(name: str, img_size, block, final_norm, **unused) -> nn.Module:
    bad = [k.replace("_", "-") for k, v in unused.items() if v]
    if bad:
        raise ValueError(f"{name} brings its own weights and architecture: drop --{', --'.join(bad)}")
    from beyond_cls.models.hf.load import load_hf_encoder  # transformers only on this path

    return load_hf_encoder(name, img_size=img_size, block=block, final_norm=final_norm)


def load_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    checkpoint_format: str = "auto",
    arch: str | None = None,
    img_size: int | tuple[int, int] | None = 224,
    block: int | None = None,
    final_norm: bool | None = None,
    source: str | None = None,
    weights_dir: str | Path | None = None,
    keep_head: bool = False,
    checkpoint_key: str | None = None,
    **model_kwargs,
) -> nn.Module:
    """Build encoder ``name`` (a zoo name or any timm ViT/Beit/Eva name), load ``checkpoint``, freeze it.

    A zoo name (``beyond_cls.models.ZOO``) brings its architecture, checkpoint format, sub-model
    (``source``), normalization and token source; ``checkpoint=None`` then means its official file under
    ``weights_dir`` / ``$BEYOND_CLS_WEIGHTS`` (an error names the file and where to get it; nothing is
    downloaded). ``arch`` overrides the architecture (e.g. a DINO ViT-S/16: ``load_encoder("dino_vit_base_patch16",
    path, arch="vit_small_patch16_224")``); ``NAME:heads=N`` states a head count the weights cannot tell
    (MoCo-v3's ViT-S: ``vit_small_patch16_224:heads=12``). ``checkpoint_format`` is ``"auto"`` (detected from
    the keys) or a registered format; ``source`` picks a sub-model of a training checkpoint (I-JEPA ``target_encoder`` /
    ``encoder``, DINO/iBOT ``teacher`` / ``student``); ``keep_head`` keeps a fine-tuned classifier.
    ``model_kwargs`` go to ``timm.create_model`` after what the file needs (e.g. ``fc_norm`` of a
    fine-tuned MAE). ``block`` / ``final_norm`` set the default token source recorded in the returned
    model's :class:`EncoderInfo` (``model.beyond_cls_info``): the zoo's, else the last block without the
    final norm (the paper's features). The model is in eval mode with ``requires_grad=False``.
    ``hf:PATH`` is a Hugging Face ``transformers`` ViT (a ``save_pretrained`` folder or a hub id in the local hub
    cache; needs ``pip install 'beyond-cls[hf]'``): it brings its architecture, weights and normalization.
    """
    if name.startswith(HF_PREFIX):
        return _load_hf(name, img_size, block, final_norm, checkpoint=checkpoint, checkpoint_format=checkpoint_format
                        != "auto", arch=arch, source=source, keep_head=keep_head, checkpoint_key=checkpoint_key,
                        model_kwargs=model_kwargs)
    entry = zoo_entry(name)
    kwargs: dict = {}
    if entry is not None:
        kwargs.update(entry.kwargs())
        if checkpoint_format == "auto":
            checkpoint_format = entry.checkpoint_format
        source = source if source is not None else entry.source
        if checkpoint is None:
            try:
                checkpoint = find_weights(entry, weights_dir)
            except FileNotFoundError as exc:
                raise CheckpointError(None, str(exc)) from None
    ckpt = None
    if checkpoint is not None:
        ckpt = prepare_checkpoint(checkpoint, checkpoint_format, key=checkpoint_key, source=source,
                                  keep_head=keep_head)
        kwargs.update(ckpt.model_kwargs)
    architecture, arch_kwargs = parse_arch(arch or (entry.arch if entry is not None else name))
    kwargs.update(arch_kwargs)  # what the user states about the architecture wins over what the file implies
    kwargs.update(model_kwargs)
    try:
        model = _build(architecture, img_size, ckpt.num_classes if ckpt is not None else 0, kwargs)
    except TypeError as exc:  # a format's model arguments the architecture does not take
        if ckpt is None or not ckpt.model_kwargs:
            raise
        raise _format_mismatch(ckpt, architecture, exc) from None
    try:
        info = encoder_info(model, name=name, checkpoint=checkpoint)  # fails early for non-ViT models
    except TypeError as exc:
        raise ValueError(f"{exc}; supported architectures: {SUPPORTED_ARCHITECTURES}") from None
    check_block(block, info.depth, name)
    if ckpt is not None:
        load_encoder_checkpoint(model, ckpt, name=name)
    model.eval()
    model.requires_grad_(False)
    model.beyond_cls_info = replace(
        info,
        block=block if block is not None else (entry.block if entry is not None else None),
        final_norm=final_norm if final_norm is not None else (entry.final_norm if entry is not None else False),
        source=source if ckpt is not None else None,
        checkpoint_format=ckpt.format.name if ckpt is not None else None,
        mean=tuple(entry.mean) if entry is not None else None,
        std=tuple(entry.std) if entry is not None else None,
    )
    return model
