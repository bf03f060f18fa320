"""Deprecation aliases for names and modules that moved (see `docs/contributing.md`, "Moved names").

An alias resolves lazily, by module name, on first use and warns with a `FutureWarning` naming the new home. Keeping
the resolution by name (not an import statement) is what lets a lower module keep an old name of something that now
lives above it without an import circle.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old name will be removed in a future release.", FutureWarning, 3)


def moved_attributes(module_name: str, moves: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` resolving the names in `moves` with a `FutureWarning`.

    `moves` maps an old name to its new module (`"pkg.mod"`, same name there) or to `"pkg.mod:new_name"`.
    """

    def __getattr__(name: str) -> Any:
        if name not in moves:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        target, _, new_name = moves[name].partition(":")
        new_name = new_name or name
        _warn(f"{module_name}.{name}", f"{target}.{new_name}")
        return getattr(importlib.import_module(target), new_name)

    return __getattr__


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str, warn: bool) -> None:
        self.target = target
        self.warn = warn

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if self.warn:
            _warn(f"module {spec.name}", self.target)
        module = importlib.import_module(self.target)
        self._own_spec = module.__spec__  # the import system sets __spec__ to the alias' spec; put it back below
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module is the already imported target); restore its own `__spec__`."""
        module.__spec__ = self._own_spec


class ModuleAliases(importlib.abc.MetaPathFinder):
    """Make `import old.name` return the module `new.name` (`aliases` maps old -> (new, warn))."""

    def __init__(self, aliases: Mapping[str, tuple[str, bool]]) -> None:
        self.aliases = dict(aliases)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.aliases:
            return None
        new, warn = self.aliases[fullname]
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new, warn))


def install_module_aliases(aliases: Mapping[str, tuple[str, bool]]) -> None:
    """Install (once) a finder resolving the old module names of `aliases`."""
    for finder in sys.meta_path:
        if isinstance(finder, ModuleAliases):
            finder.aliases.update(aliases)
            return
    sys.meta_path.append(ModuleAliases(aliases))
