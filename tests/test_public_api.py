"""The package's public names: one list (``causarray/__init__.pyi``), lazily imported."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

import causarray as ca

STUB = Path(ca.__file__).with_suffix(".pyi")


def test_all_is_the_stub_mapping_without_duplicates():
    assert len(ca.__all__) == len(set(ca.__all__))
    assert set(ca.__all__) == set(ca._EXPORTS) | set(ca._PUBLIC_SUBMODULES)
    # the stub lists each name once, and every line of it is a re-export
    names = [a.asname for node in ast.parse(STUB.read_text()).body for a in node.names]
    assert sorted(names) == sorted(ca.__all__)


@pytest.mark.parametrize("name", sorted(ca._EXPORTS))
def test_every_exported_name_imports_from_its_module(name):
    value = getattr(ca, name)
    module = importlib.import_module(f"causarray.{ca._EXPORTS[name]}")
    assert value is getattr(module, name)
    exec(f"from causarray import {name}", {})  # noqa: S102 - the statement users write


@pytest.mark.parametrize("name", ca._PUBLIC_SUBMODULES)
def test_public_submodules_are_modules(name):
    assert isinstance(getattr(ca, name), types.ModuleType)
    assert getattr(ca, name).__name__ == f"causarray.{name}"


def test_dir_lists_every_public_name_and_unknown_names_fail():
    listed = dir(ca)
    assert set(ca.__all__) <= set(listed)
    assert {"glm", "gcate", "dr", "ondisk"} <= set(listed)  # reachable, not in __all__
    with pytest.raises(AttributeError, match="module 'causarray' has no attribute 'no_such'"):
        ca.no_such  # noqa: B018


def test_import_stays_lazy_and_star_import_gives_all():
    code = ("import sys, causarray\n"
            "heavy = [m for m in ('sklearn', 'matplotlib', 'dask') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "ns = {}\n"
            "exec('from causarray import *', ns)\n"
            "assert set(causarray.__all__) <= set(ns), set(causarray.__all__) - set(ns)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr


def test_a_malformed_stub_line_is_rejected(tmp_path):
    bad = tmp_path / "stub.pyi"
    bad.write_text("from .dr import LFC\n")
    with pytest.raises(ValueError, match="write 'LFC' as 'LFC as LFC'"):
        ca._read_exports(bad)
    bad.write_text("__all__ = ['LFC']\n")
    with pytest.raises(ValueError, match="only 'from .module import name as name' lines"):
        ca._read_exports(bad)
