"""Small shared helpers (optional-dependency checks)."""

from .imports import is_bitsandbytes_available, require_bitsandbytes

__all__ = ["is_bitsandbytes_available", "require_bitsandbytes"]
