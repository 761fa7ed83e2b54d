"""The ``--dataset`` layouts: one module each, registering itself in :mod:`beyond_cls.data.registry`.

The layouts below import first, in the order their names are listed (help, table, errors); every other module
of this package imports after them, so a new layout is one new module.
"""

from __future__ import annotations

import importlib
import pkgutil

_FIRST = ("imagefolder", "synthetic", "imagenet1pct", "cub", "food101", "cars", "pets", "coco", "nuswide", "wds")

for _name in (*_FIRST, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _FIRST)):
    importlib.import_module(f"{__name__}.{_name}")
