"""The dataset registry: every ``--dataset`` layout declares itself here, once.

A layout module of :mod:`beyond_cls.data.layouts` calls :func:`register` with a :class:`DatasetLayout`;
:func:`build_dataset`, :data:`DATASETS`, :func:`datasets_help` (the CLI's ``--dataset`` help) and
:func:`datasets_table_markdown` (the table in docs/reference.md) read the registry, so adding a layout is one module.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

from beyond_cls.data.folder import DataError
from beyond_cls.data.labeled import LabeledImages, check_split

__all__ = [
    "DATASETS",
    "LAYOUTS",
    "METRICS",
    "DatasetLayout",
    "build_dataset",
    "dataset_names",
    "datasets_help",
    "datasets_table_markdown",
    "register",
]

#: How a layout's probe is scored, and how the docs' table shows it.
METRICS = {"top1": "top-1/5", "map": "mAP (BCE loss)"}


@dataclass(frozen=True)
class DatasetLayout:
    """One ``--dataset`` name.

    ``build(root, split, transform, **options)``: the split (``"train"`` or ``"val"``, the set's official test or
    validation split) as a LabeledImages (or ImageFolderDataset); its keyword options are the layout's
    ``build_dataset`` options. ``description``: one line; ``layout``: the files under ``--data``;
    ``splits``: what ``train`` and ``val`` read; ``classes``: where the class names and their order come from;
    ``metric``: a key of :data:`METRICS`.
    """

    name: str
    description: str
    layout: str
    splits: str
    classes: str
    metric: str
    build: Callable[..., LabeledImages]

    def options(self) -> list[str]:
        """The keyword options ``build`` takes besides root, split and transform."""
        return [p for p in inspect.signature(self.build).parameters if p not in ("root", "split", "transform")]


#: The registered layouts by name, in registration order.
LAYOUTS: dict[str, DatasetLayout] = {}
#: name -> adapter ``(root, split, transform, **options)``; kept in step with :data:`LAYOUTS` by :func:`register`.
DATASETS: dict[str, Callable[..., LabeledImages]] = {}


def register(layout: DatasetLayout) -> DatasetLayout:
    """Add ``layout``; a name registered twice, a name not in lower case or an unknown metric is an error."""
    if layout.name in LAYOUTS:
        raise ValueError(f"dataset layout {layout.name!r} is registered twice")
    if layout.name != layout.name.lower() or not layout.name.strip():
        raise ValueError(f"dataset layout {layout.name!r}: the name must be lower case and not empty")
    if layout.metric not in METRICS:
        raise ValueError(f"dataset layout {layout.name!r}: metric must be one of {sorted(METRICS)}")
    LAYOUTS[layout.name] = layout
    DATASETS[layout.name] = layout.build
    return layout


class Names(tuple):
    """Dataset names that match in any case, as :func:`build_dataset` reads them (``--dataset CUB`` is ``cub``)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and tuple.__contains__(self, name.lower())


def dataset_names() -> Names:
    """The registered ``--dataset`` names, in registration order (the CLI's choices)."""
    return Names(LAYOUTS)


def build_dataset(
    name: str, root: str | os.PathLike, split: str, transform: Callable | None = None, **options
) -> LabeledImages:
    """The ``split`` ("train" or "val") of dataset ``name`` under ``root``; ``options`` go to its adapter."""
    layout = LAYOUTS.get(name.lower())
    if layout is None:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(LAYOUTS)}")
    check_split(split)
    accepted = layout.options()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; "
                        f"valid options: {', '.join(accepted) or 'none'}")
    return layout.build(root, split, transform, **options)


def datasets_help() -> str:
    """The CLI's ``--dataset`` help: the registered names."""
    return f"dataset layout of --data: {', '.join(LAYOUTS)} (docs/reference.md: the datasets table)"


def datasets_table_markdown() -> str:
    """The docs' table of ``--dataset`` layouts (docs/reference.md), one row per registered name."""
    rows = ["| dataset (`--dataset`) | what | layout under `--data` | splits (train / val) | classes | metric |",
            "|---|---|---|---|---|---|"]
    rows += [f"| `{d.name}` | {d.description} | {d.layout} | {d.splits} | {d.classes} | {METRICS[d.metric]} |"
             for d in LAYOUTS.values()]
    return "\n".join(rows) + "\n"
