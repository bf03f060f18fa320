"""Small shared helpers at the bottom of the package: optional-dependency checks (`imports.py`) and the aliases of
moved names and modules (`deprecation.py`, see `docs/contributing.md`, "Moved names")."""

from .imports import is_bitsandbytes_available, require_bitsandbytes

__all__ = ["is_bitsandbytes_available", "require_bitsandbytes"]
