"""Old import paths that keep working for one release, with a ``DeprecationWarning`` naming the new one.

:func:`alias_modules` makes ``import old.name`` load ``new.name`` (the same module object, so a
monkeypatch through either name reaches the other); :func:`moved_attributes` gives a package the
module ``__getattr__`` that resolves a renamed attribute (``moshi_ttt.InPlaceTTT``). The tables that
use them (in ``moshi_ttt/__init__.py`` and ``finetune/__init__.py``) are the changelog of what moved.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

REMOVAL = "the next release"


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new}; the old name goes away in {REMOVAL}", DeprecationWarning, stacklevel=3
    )


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # a placeholder module; exec_module puts the real one in its place

    def exec_module(self, module: Any) -> None:
        _warn(module.__name__, self.new)
        # The import system returns whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module(self.new)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, table: Mapping[str, str]) -> None:
        self.table = dict(table)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        new = self.table.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def alias_modules(table: Mapping[str, str]) -> None:
    """Let each old dotted module name in ``table`` import its new module (with a DeprecationWarning).
    The finder goes first on ``sys.meta_path``: it answers for these exact names only, and a stale
    copy of an old file elsewhere on the path must not win."""
    if not any(isinstance(f, _AliasFinder) and f.table == dict(table) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder(table))


def moved_attributes(package: str, table: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``table`` maps an old attribute name to the new
    ``module:attribute`` (or ``module`` for a moved submodule), resolved with a DeprecationWarning."""

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        new = f"{module}.{attr}" if attr else module
        _warn(f"{package}.{name}", new)
        obj = importlib.import_module(module)
        return getattr(obj, attr) if attr else obj

    return __getattr__
