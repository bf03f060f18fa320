"""The supported transformers range, read from hf_galore's installed metadata (declared once, in `setup.cfg`)."""

from __future__ import annotations

import importlib.metadata
import re
from functools import lru_cache

#: `name[extras] specifier ; marker` of one `Requires-Dist` line.
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;)]*)\)?\s*(;.*)?$")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_specifier(requires: list[str] | None, package: str) -> str | None:
    """The version specifier of the unconditional requirement on `package` among `requires` (`None` if absent).

    Lower bounds come first (`">=4.57,<6"`), whatever order the metadata lists them in.
    """
    for line in requires or ():
        match = _REQUIREMENT.match(line)
        if match is None or match.group(3) or _normalize(match.group(1)) != _normalize(package):
            continue  # an extra's requirement (`; extra == "test"`) is not a supported range
        parts = [p.strip() for p in match.group(2).split(",") if p.strip()]
        return ",".join(sorted(parts, key=lambda p: not p.startswith(">")))
    return None


@lru_cache
def supported_transformers() -> str | None:
    """The transformers range hf_galore declares in its `install_requires` (e.g. `">=4.57,<6"`).

    Read from the installed distribution's metadata, so `setup.cfg` is the only place that writes it. `None` when
    hf_galore is imported from a source tree that was never installed (`pip install -e .` records the metadata).
    """
    try:
        requires = importlib.metadata.requires("hf_galore")
    except importlib.metadata.PackageNotFoundError:
        return None
    return _requirement_specifier(requires, "transformers")


def transformers_install_hint() -> str:
    """The command that installs a supported transformers, for error messages."""
    supported = supported_transformers()
    if supported is None:
        return "pip install -e .  (in the hf_galore clone; it installs the transformers range setup.cfg declares)"
    return f'pip install "transformers{supported}"'
