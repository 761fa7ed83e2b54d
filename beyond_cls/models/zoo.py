"""The encoder zoo: every encoder of the paper, by name, with its official file and the paper's numbers.

One :class:`ZooEntry` per encoder (timm-style registry): the architecture to build, the checkpoint
format that adapts the official file, where to download that file (nothing is downloaded here), the
input normalization, the token layout, the token source the paper probes (block, final norm), and
the paper's reference numbers (Table 1 top-1 per aggregation; appendix Table 3 aggregation entropy).
Facts: docs/models.md (official files, architectures).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from beyond_cls.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["WEIGHTS_ENV", "ZOO", "ZooEntry", "find_weights", "weights_dir", "zoo_entry"]

WEIGHTS_ENV = "BEYOND_CLS_WEIGHTS"

_VIT_CLS = MappingProxyType({"global_pool": "token"})
_VIT_NO_CLS = MappingProxyType({"class_token": False, "global_pool": "avg", "fc_norm": False})
_BEIT_SHARED = MappingProxyType(
    {"use_abs_pos_emb": False, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": True, "init_values": 0.1,
     "global_pool": "token"}
)


@dataclass(frozen=True)
class ZooEntry:
    """One encoder of the paper: how to build it, load its official file, and read its tokens."""

    name: str
    method: str
    family: str  # "MIM" or "JEA"
    arch: str  # a timm architecture, or a name a registered architecture builds ("capi": the CAPI port)
    checkpoint_format: str
    file: str | None  # the official file name, looked up under the weights folder
    url: str | None  # where to get it (None: not public)
    where: str  # how to get it, in words
    model_kwargs: MappingProxyType = field(default_factory=lambda: _VIT_CLS)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_prefix_tokens: int = 1
    has_class_token: bool = True
    block: int | None = None  # token source: None = the last block
    final_norm: bool = False  # the paper's features are pre-norm (the authors never apply the final norm)
    source: str | None = None  # sub-model of the file (I-JEPA: target_encoder or encoder)
    paper_top1: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    paper_entropy: float | None = None  # appendix Table 3: [cls]-patch entropy averaged over blocks
    notes: str = ""

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_kwargs)


def _top1(mean: float | None, cls: float | None, abmilp: float | None, abmilp_cls: float | None) -> MappingProxyType:
    """Table 1 row: avg. pooling of patches, [cls], Selective (patches), Selective (patches + [cls])."""
    values = {"mean": mean, "cls": cls, "abmilp": abmilp, "abmilp+cls": abmilp_cls}
    return MappingProxyType({k: v for k, v in values.items() if v is not None})


_MAE = "https://dl.fbaipublicfiles.com/mae/pretrain/"
_ENTRIES = [
    ZooEntry("mae_vit_small_patch16", "MAE", "MIM", "vit_small_patch16_224", "mae", "mae_pretrain_vit_small.pth",
             None, "no public weights: train with facebookresearch/mae main_pretrain.py (the paper did)",
             paper_top1=_top1(47.1, 47.4, 54.4, 54.6)),
    ZooEntry("mae_vit_base_patch16", "MAE", "MIM", "vit_base_patch16_224", "mae", "mae_pretrain_vit_base.pth",
             _MAE + "mae_pretrain_vit_base.pth", "facebookresearch/mae README",
             paper_top1=_top1(65.8, 67.8, 71.6, 71.5), paper_entropy=5.03),
    ZooEntry("mae_vit_large_patch16", "MAE", "MIM", "vit_large_patch16_224", "mae", "mae_pretrain_vit_large.pth",
             _MAE + "mae_pretrain_vit_large.pth", "facebookresearch/mae README",
             paper_top1=_top1(73.0, 75.8, 77.4, 77.4)),
    ZooEntry("mae_vit_huge_patch14", "MAE", "MIM", "vit_huge_patch14_224", "mae", "mae_pretrain_vit_huge.pth",
             _MAE + "mae_pretrain_vit_huge.pth", "facebookresearch/mae README",
             paper_top1=_top1(73.8, 77.0, 78.1, 78.0)),
    ZooEntry("simmim_vit_base_patch16", "SimMIM", "MIM", "beitv2_base_patch16_224", "simmim",
             "simmim_pretrain__vit_base__img224__800ep.pth", None,
             "microsoft/SimMIM README (Google Drive link, download by hand)", model_kwargs=_BEIT_SHARED, block=7,
             paper_top1=_top1(54.3, 51.5, 62.8, 62.0), paper_entropy=4.96,
             notes="tokens of the 8th block (index 7), as the SimMIM authors recommend"),
    ZooEntry("maskfeat_vit_base_patch16", "MaskFeat", "MIM", "vit_base_patch16_224", "maskfeat",
             "in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth",
             "https://dl.fbaipublicfiles.com/pyslowfast/masked_models/in1k_VIT_B_MaskFeat_PT_epoch_01600.pyth",
             "facebookresearch/SlowFast projects/maskfeat README", paper_top1=_top1(56.9, 62.9, 66.6, 65.8)),
    ZooEntry("beitv2_vit_base_patch16", "BEiT-v2", "MIM", "beitv2_base_patch16_224", "beitv2",
             "beitv2_base_patch16_224_pt1k.pth",
             "https://github.com/addf400/files/releases/download/BEiT-v2/beitv2_base_patch16_224_pt1k.pth",
             "microsoft/unilm beit2 README (pretrained on ImageNet-1k, no 21k fine-tuning)",
             model_kwargs=_BEIT_SHARED, paper_top1=_top1(78.5, 78.9, 80.9, 81.0), paper_entropy=4.89),
    ZooEntry("ijepa_vit_huge_patch14", "I-JEPA", "MIM", "vit_huge_patch14_gap_224", "ijepa",
             "IN1K-vit.h.14-300e.pth.tar", "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar",
             "facebookresearch/ijepa README (full checkpoint)", model_kwargs=_VIT_NO_CLS, num_prefix_tokens=0,
             has_class_token=False, source="target_encoder", paper_top1=_top1(77.7, None, 79.2, None),
             paper_entropy=5.28, notes="no [cls]: effective aggregation uniform; target encoder by default"),
    ZooEntry("capi_vit_large_patch14", "CAPI", "MIM", "capi", "capi", "capi_vitl14_in1k.pth",
             "https://dl.fbaipublicfiles.com/capi/capi_vitl14_in1k.pth", "facebookresearch/capi README",
             model_kwargs=MappingProxyType({}), num_prefix_tokens=16, has_class_token=False,
             paper_top1=_top1(76.2, None, 82.4, None), paper_entropy=5.28,
             notes="no [cls], 16 registers, 2-D RoPE: the package's port of CAPI's encoder"),
    ZooEntry("ibot_vit_base_patch16", "iBOT", "JEA", "vit_base_patch16_224", "ibot", "checkpoint_teacher.pth",
             "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/vitb_16/"
             "checkpoint_teacher.pth", "bytedance/ibot README, backbone (t); the vitb_16_rand_mask variant loads too",
             paper_top1=_top1(75.0, 77.8, 77.9, 78.2)),
    ZooEntry("dinov2_vit_base_patch14", "DINOv2", "JEA", "vit_base_patch14_dinov2", "dinov2",
             "dinov2_vitb14_pretrain.pth",
             "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
             "facebookresearch/dinov2 README", paper_top1=_top1(81.9, 83.2, 83.5, 83.5),
             notes="LVD-142M pretraining; position embeddings resampled to 224 px as DINOv2 does"),
    ZooEntry("dinov2_vit_base_patch14_reg4", "DINOv2", "JEA", "vit_base_patch14_reg4_dinov2", "dinov2",
             "dinov2_vitb14_reg4_pretrain.pth",
             "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
             "facebookresearch/dinov2 README", num_prefix_tokens=5, notes="[cls] then 4 registers"),
    ZooEntry("dino_vit_base_patch16", "DINO", "JEA", "vit_base_patch16_224", "dino", "dino_vitbase16_pretrain.pth",
             "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
             "facebookresearch/dino README", paper_top1=_top1(71.1, 76.6, 75.2, 76.2), paper_entropy=4.70),
    ZooEntry("mocov3_vit_base_patch16", "MoCo-v3", "JEA", "vit_base_patch16_224", "mocov3", "vit-b-300ep.pth.tar",
             "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
             "facebookresearch/moco-v3 CONFIG.md", paper_top1=_top1(71.1, 75.1, 75.1, 75.2)),
]

#: Zoo entries by name.
ZOO: MappingProxyType = MappingProxyType({e.name: e for e in _ENTRIES})


def zoo_entry(name: str) -> ZooEntry | None:
    """The entry called ``name``, or None when ``name`` is not a zoo name (e.g. a timm name)."""
    return ZOO.get(name)


def weights_dir(override: str | os.PathLike | None = None) -> Path | None:
    """The folder holding official files: ``override`` (``--weights-dir``), else ``$BEYOND_CLS_WEIGHTS``.

    FileNotFoundError when the folder named does not exist (or is not a folder).
    """
    value = override if override is not None else os.environ.get(WEIGHTS_ENV)
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        given = "--weights-dir" if override is not None else f"${WEIGHTS_ENV}"
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"weights folder {folder} ({given}) {problem}")
    return folder


def find_weights(entry: ZooEntry, directory: str | os.PathLike | None = None) -> Path:
    """The official file of ``entry`` under the weights folder; FileNotFoundError naming it and its source."""
    get = f"get it from {entry.url}" if entry.url else entry.where
    if entry.file is None:
        raise FileNotFoundError(f"{entry.name} has no official file: {entry.where}")
    folder = weights_dir(directory)
    if folder is None:
        raise FileNotFoundError(
            f"{entry.name} needs {entry.file}: pass --checkpoint FILE, or put it in a folder named by "
            f"${WEIGHTS_ENV} or --weights-dir ({get})"
        )
    path = folder / entry.file
    if not path.is_file():
        matches = sorted(folder.rglob(entry.file))  # allow the repos' sub-folders (e.g. ibot/vitb_16/)
        if matches:
            return matches[0]
        raise FileNotFoundError(f"{entry.name}: {entry.file} is not in {folder} ({get}; nothing is downloaded)")
    return path
