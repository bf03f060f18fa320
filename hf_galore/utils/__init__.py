"""Small shared helpers (optional-dependency checks, one-time warnings)."""

from .imports import is_bitsandbytes_available, require_bitsandbytes
from .logging import warn_once

__all__ = ["is_bitsandbytes_available", "require_bitsandbytes", "warn_once"]
