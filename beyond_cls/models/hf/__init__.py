"""Hugging Face ``transformers`` ViTs as encoders: ``--model hf:PATH`` (a ``save_pretrained`` folder or a hub id in
the local cache). ``transformers`` is optional: only loading an ``hf:`` model imports it (to read the config).

``load_encoder("hf:PATH")`` (:mod:`beyond_cls.models.loader`) is the entry point; it calls
:func:`beyond_cls.models.hf.load.load_hf_encoder`, which this package does not import (the loader imports it).
"""

from __future__ import annotations

from beyond_cls.models.hf.families import HF_FAMILIES, HFFamily
from beyond_cls.models.hf.source import HF_PREFIX, INSTALL_HINT, hub_cache_dir, require_transformers

__all__ = ["HF_FAMILIES", "HF_PREFIX", "INSTALL_HINT", "HFFamily", "hub_cache_dir", "require_transformers"]
