"""causarray: causal differential expression for single-cell CRISPR screens.

Pipeline: counts -> :mod:`~causarray.preprocessing` -> :mod:`~causarray.glm` (count-GLM engine)
-> :mod:`~causarray.gcate` (latent confounders) -> :mod:`~causarray.dr` (doubly robust LFC)
-> :mod:`~causarray.inference` (p-values, BH, empirical null, FDX) -> results.

The public names are imported on first use (PEP 562), so ``import causarray`` stays
light: a GCATE fit never loads scikit-learn, matplotlib or the Dask machinery.

The one list of public names is the stub ``__init__.pyi`` beside this file (one
``from .module import name as name`` line per name): type checkers and IDEs read it
directly, and the lazy import map ``_EXPORTS``, ``__all__`` and ``dir(causarray)`` are
derived from it here.  Every other submodule can be reached lazily too
(``causarray.glm``, ...) but is not part of ``__all__``.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from . import _aliases
from ._version import __version__ as __version__

# 0.1.1's names at their old addresses (causarray.gcate.plot_r, ...): see _aliases.py
_aliases.install(__name__)


def _read_exports(stub: Path) -> tuple[dict[str, str], tuple[str, ...]]:
    """``(name -> defining module, public submodules)`` from the re-exports of ``stub``."""
    exports: dict[str, str] = {}
    submodules: list[str] = []
    for node in ast.parse(stub.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            raise ValueError(f"{stub.name}:{node.lineno}: only 'from .module import name as "
                             "name' lines are allowed")
        for alias in node.names:
            if alias.asname != alias.name:
                raise ValueError(f"{stub.name}:{node.lineno}: write {alias.name!r} as "
                                 f"'{alias.name} as {alias.name}' (an explicit re-export)")
            if node.module is None:
                submodules.append(alias.name)
            else:
                exports[alias.name] = node.module
    return exports, tuple(submodules)


#: public name -> module that defines it (from ``__init__.pyi``)
_EXPORTS, _PUBLIC_SUBMODULES = _read_exports(Path(__file__).with_suffix(".pyi"))
#: every submodule importable lazily as an attribute (public or not)
_SUBMODULES = frozenset(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_")) | frozenset(_PUBLIC_SUBMODULES)

__all__ = list(_EXPORTS) + list(_PUBLIC_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
