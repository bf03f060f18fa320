"""Lazy checks for optional dependencies, with errors that say exactly what to install."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from functools import lru_cache

from ..errors import MissingDependencyError

#: How to install bitsandbytes, the optional dependency of the 8-bit optimizers. `pip install "hf_galore[bnb]"`
#: works only where an index serves hf_galore; from a clone the extra is `pip install -e ".[bnb]"`.
BNB_INSTALL = 'pip install bitsandbytes  (from a clone of hf_galore: pip install -e ".[bnb]")'


@lru_cache
def is_bitsandbytes_available() -> bool:
    """Whether `bitsandbytes` is installed (checked once, without importing it; see [`require_bitsandbytes`])."""
    return importlib.util.find_spec("bitsandbytes") is not None


@lru_cache
def bitsandbytes_import_error() -> str | None:
    """Why an installed bitsandbytes fails to import (`"ImportError: ..."`), or `None` when it imports (checked once).

    A broken install (a build for another torch or CUDA, a missing native library) raises more than `ImportError`
    (`OSError` from the loader, `RuntimeError` from its own checks), hence the broad catch.
    """
    try:
        importlib.import_module("bitsandbytes")
        importlib.import_module("bitsandbytes.functional")
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is reported, with its type
        return f"{type(exc).__name__}: {exc}"
    return None


def _installed_version() -> str:
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def require_bitsandbytes(feature: str) -> None:
    """Raise [`MissingDependencyError`] naming `feature` and the fix when bitsandbytes is missing or broken.

    Both cases are checked before anything is built: a missing package gets the install command, an installed one
    that fails to import gets the underlying error and the reinstall command.
    """
    fallback = "or pick the 32-bit variant (e.g. `galore_adamw`)."
    if not is_bitsandbytes_available():
        raise MissingDependencyError(
            f"{feature} stores its optimizer states in 8 bits through bitsandbytes, which is not installed. "
            f"Install it with `{BNB_INSTALL}`, {fallback}"
        )
    error = bitsandbytes_import_error()
    if error is not None:
        raise MissingDependencyError(
            f"{feature} stores its optimizer states in 8 bits through bitsandbytes, which is installed "
            f"({_installed_version()}) but fails to import: {error}. Reinstall a build that matches your torch "
            f"(`pip install --force-reinstall bitsandbytes`), {fallback}"
        )
