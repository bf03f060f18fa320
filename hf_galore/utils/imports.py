"""Lazy checks for optional dependencies, with errors that say exactly what to install."""

from __future__ import annotations

import importlib.util
from functools import lru_cache

from ..errors import MissingDependencyError


@lru_cache
def is_bitsandbytes_available() -> bool:
    """Whether `bitsandbytes` can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes(feature: str) -> None:
    """Raise [`MissingDependencyError`] naming `feature` and the pip extra when bitsandbytes is missing."""
    if not is_bitsandbytes_available():
        raise MissingDependencyError(
            f"{feature} stores its optimizer states in 8 bits through bitsandbytes, which is not installed. "
            'Install it with `pip install "hf_galore[bnb]"` (or `pip install bitsandbytes`), '
            "or pick the 32-bit variant (e.g. `galore_adamw`)."
        )
