"""0.1.1's names at their old addresses: the one place that knows where they moved.

causarray 0.1.1 defined the batch driver and the JIC figure in ``causarray.gcate`` and
the propensity figures in ``causarray.diagnostics``.  Their code now lives above those
modules in the data flow (``batch``, ``pl``; docs/ARCHITECTURE.md#data-flow), and a
module never imports a module above it.  So the old addresses are kept here, at the top
(only ``causarray/__init__.py`` imports this module):

* :data:`MOVED` maps ``module -> {0.1.1 name: resolver}``; a resolver imports the
  defining module (downward from here) on first use;
* :func:`install` puts a finder in front of ``sys.meta_path`` that, when one of those
  modules is imported, runs its usual loader and then gives the module a PEP 562
  ``__getattr__`` for the moved names.  ``from causarray.gcate import plot_r`` works
  and is ``causarray.pl.plot_r``; ``import causarray.gcate`` alone loads neither the
  batch machinery nor matplotlib.

The top-level names (``causarray.plot_r``, ...) are in ``__init__.pyi``; the renamed
keywords and options are in :mod:`causarray._compat`; ``docs/migrating.md`` lists them all.
"""
from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from typing import Any


def _from_batch(name: str) -> Any:
    from . import batch

    return getattr(batch, name)


def _from_pl(name: str) -> Any:
    from . import pl

    return getattr(pl, name)


#: module -> {0.1.1 name: resolver(name) -> the object}
MOVED: dict[str, dict[str, Callable[[str], Any]]] = {
    "gcate": {"fit_gcate_batch": _from_batch, "plot_r": _from_pl},
    "diagnostics": {"plot_propensity_scores": _from_pl,
                    "plot_treatment_associations": _from_pl},
}


def attach(module: Any, moved: dict[str, Callable[[str], Any]]) -> None:
    """Give ``module`` a PEP 562 ``__getattr__`` that resolves the names of ``moved``."""
    def __getattr__(name: str) -> Any:
        if name in moved:
            return moved[name](name)
        raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}")

    module.__getattr__ = __getattr__


class _AliasLoader(importlib.abc.Loader):
    """The module's own loader, then :func:`attach`."""

    def __init__(self, loader: Any, moved: dict[str, Callable[[str], Any]]):
        self._loader, self._moved = loader, moved

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader   # as if loaded plainly
        self._loader.exec_module(module)
        attach(module, self._moved)


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`MOVED` with the other finders, wrapping their loader."""

    causarray_aliases = True

    def __init__(self, package: str):
        self._names = {f"{package}.{m}": moved for m, moved in MOVED.items()}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self._names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _AliasLoader(spec.loader, self._names[fullname])
                return spec
        return None


def install(package: str) -> None:
    """Put the finder in front of ``sys.meta_path`` (replacing one of an earlier import)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "causarray_aliases", False)]
    sys.meta_path.insert(0, _AliasFinder(package))
    for name, moved in MOVED.items():        # imported before this package was (re)loaded
        module = sys.modules.get(f"{package}.{name}")
        if module is not None:
            attach(module, moved)
