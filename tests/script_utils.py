"""Import the repository's scripts (`recipes/`, `benchmarks/` are folders of scripts, not packages) in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, module_name: str | None = None) -> ModuleType:
    """Import the script at `path` as `module_name` (default: its stem), once; later calls reuse the module.

    The script's folder goes on `sys.path` first, so its sibling imports (`import offline_assets`) resolve.
    """
    name = module_name or path.stem
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
