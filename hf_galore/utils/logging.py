"""Logging helpers."""

from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a `UserWarning` the first time `key` is seen in this process."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, UserWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which one-time warnings were emitted (used by tests)."""
    _WARNED.clear()
