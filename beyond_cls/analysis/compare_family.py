"""The encoders of a comparison and their family (MIM, JEA or other).

The family comes from ``families`` given by the user, else from the zoo entry of the model the summary or its
run's ``analyze_config.json`` names, else from a name the user gave: never from a folder or file name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from beyond_cls.analysis.compare_inputs import load_inputs
from beyond_cls.analysis.plots import statistic_values
from beyond_cls.analysis.style import data_label, infer_family, zoo_of
from beyond_cls.analysis.summary import AttentionSummary

__all__ = ["FAMILY_ORDER", "ComparedModel", "compared_models", "family_of", "family_order"]

#: Table 3 lists MIM encoders first, then JEA, then any other.
FAMILY_ORDER = {"MIM": 0, "JEA": 1}


@dataclass
class ComparedModel:
    """One encoder of a comparison: display name, family, source file and summary, with what the zoo and the
    run's config say (the paper's Table 3 entropy, the encoder's name, the images)."""

    name: str
    family: str
    source: Path
    summary: AttentionSummary
    paper_entropy: float | None
    model: str = ""  # the encoder's name from the summary or the run's config ("" when neither says)
    data: str | None = None  # the images, from the run's config

    @property
    def depth(self) -> int:
        return self.summary.num_blocks

    def field(self, name: str) -> Tensor | None:
        """The [blocks, heads] statistic, or None when absent (no [cls]) or all NaN."""
        return statistic_values(self.summary, name)

    @property
    def has_cls(self) -> bool:
        return self.field("cls_patch_entropy") is not None


def family_order(family: str) -> int:
    """Sort key of a family in Table 3."""
    return FAMILY_ORDER.get(family, len(FAMILY_ORDER))


def family_of(name: str, model: str, given_name: str, families: Mapping[str, str], summary_model: str = "") -> str:
    """The family of the encoder displayed as ``name``: ``families[name]`` (or of the summary's model name),
    else the zoo's family of ``model``, else that of ``given_name`` (a name the user gave), else "other"."""
    family = families.get(name, families.get(summary_model)) if families else None
    if family is not None:
        return family.upper() if family.upper() in FAMILY_ORDER else family
    family = infer_family(model) if model else "other"
    if family == "other" and given_name:
        family = infer_family(given_name)
    return family


def compared_models(inputs: str | os.PathLike | Sequence[str | os.PathLike], names: Sequence[str] | None = None,
                    families: Mapping[str, str] | None = None) -> list[ComparedModel]:
    """Load ``inputs`` (see :func:`~beyond_cls.analysis.compare_inputs.load_inputs`) and give each its family;
    ValueError when ``families`` names a model that is not compared."""
    display, loaded = load_inputs(inputs, names)
    families = dict(families or {})
    known = set(display) | {s.model for s, _, _ in loaded}
    unknown = sorted(k for k in families if k not in known)
    if unknown:
        raise ValueError(f"families has unknown model names {unknown}; the models are {display}")
    models = []
    for i, (name, (summary, file, config)) in enumerate(zip(display, loaded)):
        model = summary.model or (config.get("model") if isinstance(config.get("model"), str) else "")
        given = names[i] if names is not None else ""
        family = family_of(name, model, given, families, summary.model)
        entry = zoo_of(model) if model else None
        models.append(ComparedModel(name, family, file, summary, entry.paper_entropy if entry is not None else None,
                                    model, data_label(config)))
    return models
