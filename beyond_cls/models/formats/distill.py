"""Official layouts of the self-distillation ViTs, DINO and iBOT (teacher/student checkpoints).

Both release a backbone-only file (DINO: a flat timm-named dict; iBOT: ``{'state_dict': ...}``
written by ``extract_backbone_weights.py``) and full training checkpoints holding ``student`` and
``teacher`` (``backbone.*`` plus a projection ``head.*``; the student also carries DDP's ``module.``
and, in iBOT, ``masked_embed``). ``source`` picks ``"teacher"`` (default, the evaluated model) or
``"student"``. Projection heads are always dropped. Facts: docs/models.md.

The backbone-only files are already timm state dicts, so ``"auto"`` cannot tell them from any other
ViT file and loads them as ``"timm"`` — with the same result. Full checkpoints are recognised by
their loss state (``dino_loss`` / ``ibot_loss``); iBOT files that still carry ``backbone.`` prefixes
under ``state_dict`` are recognised too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from beyond_cls.models.formats.common import entry_keys, submodel_state_dict, vit_model_kwargs
from beyond_cls.models.formats.registry import CheckpointFormat, register_checkpoint_format

_SOURCES = ("teacher", "student")


def _teacher_student_extract(
    obj: Any, key: str | None, source: str | None, path: str | Path | None
) -> dict[str, Tensor]:
    return submodel_state_dict(obj, key, source, path, _SOURCES)


def _looks_like_dino(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "dino_loss" in obj and any(s in obj for s in _SOURCES)


def _looks_like_ibot(obj: Any) -> bool:
    if not isinstance(obj, Mapping):
        return False
    if "ibot_loss" in obj and any(s in obj for s in _SOURCES):
        return True
    return any(k.startswith(("backbone.", "module.backbone.")) for k in entry_keys(obj, "state_dict"))


register_checkpoint_format(
    CheckpointFormat(
        "dino",
        "facebookresearch/dino: backbone file (flat, timm names) or full checkpoint {'student', 'teacher', "
        "'dino_loss', ...}; source='teacher' (default) or 'student'; backbone. stripped, DINOHead head.* dropped",
        rename=(("backbone.", ""),),
        drop=("head.*",),
        sources=_SOURCES,
        extract=_teacher_student_extract,
        detect=_looks_like_dino,
        model_kwargs=vit_model_kwargs,
    )
)

register_checkpoint_format(
    CheckpointFormat(
        "ibot",
        "bytedance/ibot: {'state_dict': teacher backbone} (checkpoint_teacher.pth, vitb_16 and vitb_16_rand_mask) "
        "or full checkpoint {'student', 'teacher', 'ibot_loss', ...}; source='teacher' (default) or 'student'; "
        "module./backbone. stripped, iBOTHead head.* and the student's masked_embed dropped",
        rename=(("module.", ""), ("backbone.", "")),
        drop=("head.*", "masked_embed"),
        sources=_SOURCES,
        extract=_teacher_student_extract,
        detect=_looks_like_ibot,
        model_kwargs=vit_model_kwargs,
    )
)
