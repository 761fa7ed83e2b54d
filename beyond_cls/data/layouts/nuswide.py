"""``nuswide``: NUS-WIDE's 81 concepts as multi-label classification (:class:`NUSWIDE`)."""

from __future__ import annotations

from beyond_cls.data.multilabel import NUSWIDE
from beyond_cls.data.registry import DatasetLayout, register

register(DatasetLayout(
    "nuswide", "NUS-WIDE, multi-label", "`Concepts81.txt`, `ImageList/`, `Groundtruth/TrainTestLabels/`, `Flickr/`",
    "`ImageList/TrainImagelist.txt` / `TestImagelist.txt`", "`Concepts81.txt`, in file order", "map", NUSWIDE,
))
