"""Whether Triton kernels run compiled or in Triton's CPU interpreter: the one switch, a leaf module.

``TRITON_INTERPRET=1`` makes Triton run kernels on CPU tensors (how they are tested without a GPU); it must be set
before a kernel is decorated. Only this module reads it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def as_if_compiled() -> Iterator[None]:
    """Within: :func:`interpreting` is False even under ``TRITON_INTERPRET=1`` (restored after), so host code picks
    the flags of a GPU launch; ``beyond_cls.kernels.aot`` captures launches this way."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
