"""causarray's own imports form no circle, and each one points down the documented order.

The graph is read from the source with ``ast``: every ``import`` statement of every
module under ``src/causarray`` — at module level, inside functions, under
``if TYPE_CHECKING`` alike — as ``import causarray.x``, ``from causarray.x import y``,
``from causarray import x``, ``from . import x``, ``from .x import y`` and the relative
imports of the subpackages (``from ..glm import y``).  A node is a module
(``gcate``, ``engine.irls``; ``causarray`` is the package's ``__init__``).  The
package's ``__getattr__`` imports by computed name (``importlib.import_module``); that
top-level map is the one dynamic import and sits above everything.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "causarray"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _module_name(path: Path, pkg: Path) -> str:
    parts = list(path.relative_to(pkg).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([pkg.name, *parts])


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """``module -> modules it imports`` (full dotted names) among the modules of ``pkg``."""
    files = {_module_name(f, pkg): f for f in sorted(pkg.rglob("*.py"))}
    graph = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            graph[name].update(_targets(node, package, files))
        graph[name].discard(name)
    return graph


def _targets(node: ast.AST, package: str, modules) -> list[str]:
    """The modules of ``modules`` that one import statement loads."""
    if isinstance(node, ast.Import):
        return [_owner(a.name, modules) for a in node.names if _owner(a.name, modules)]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in modules:                          # from . import pl
            out.append(sub)
        elif _owner(source, modules):               # from .gcate import fit_gcate
            out.append(_owner(source, modules))
    return out


def _owner(dotted: str, modules) -> str | None:
    """The deepest module of ``modules`` that ``dotted`` names or lies in."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]``, or None when the graph has none."""
    state: dict[str, int] = {}          # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _short(name: str) -> str:
    return name.removeprefix("causarray.") if name != "causarray" else "causarray"


def test_the_graph_sees_what_the_modules_import():
    graph = import_graph()
    assert "causarray.engine.irls" in graph["causarray.engine"]       # subpackage, relative
    assert "causarray.glm" in graph["causarray.gcate"]               # module level
    assert "causarray.batch" in graph["causarray.tl"]                # inside a function
    assert "causarray.pl" in graph["causarray.report"]               # from . import pl
    assert "causarray._aliases" in graph["causarray"]                # the package itself


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(_short(m) for m in cycle)


def test_an_upward_import_is_reported_as_a_circle(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import numpy\n")
    (pkg / "mid.py").write_text("from .low import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import y\n")
    (pkg / "sub" / "leaf.py").write_text("from ..mid import z\n")
    graph = import_graph(pkg)
    assert graph["toy.sub.leaf"] == {"toy.mid"} and graph["toy.sub"] == {"toy.sub.leaf"}
    assert find_cycle(graph) is None
    (pkg / "low.py").write_text("def f():\n    from toy.sub import leaf\n")      # upward, lazy
    assert find_cycle(import_graph(pkg)) == ["toy.low", "toy.sub.leaf", "toy.mid", "toy.low"]


def documented_order() -> list[list[str]]:
    """The layers of docs/ARCHITECTURE.md#import-order, top (imports most) first."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Import order\n"):]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [re.findall(r"[\w.]+", line.split("#")[0]) for line in block.splitlines()
            if line.split("#")[0].strip()]


def _unit(name: str) -> str:
    """A module, or its subpackage (``engine.irls`` -> ``engine``)."""
    parts = _short(name).split(".")
    return parts[0]


def test_every_import_points_down_the_documented_order():
    layers = documented_order()
    rank = {m: len(layers) - i for i, layer in enumerate(layers) for m in layer}
    units = {_unit(m) for m in import_graph()}
    assert units == set(rank), (f"docs/ARCHITECTURE.md#import-order lacks "
                                f"{sorted(units - set(rank))}, names {sorted(set(rank) - units)}")
    upward = sorted(f"{_short(a)} -> {_short(b)}" for a, targets in import_graph().items()
                    for b in targets
                    if _unit(a) != _unit(b) and rank[_unit(b)] >= rank[_unit(a)])
    assert not upward, f"imports not below the importing module: {upward}"


@pytest.mark.parametrize("module,name", [("gcate", "fit_gcate_batch"), ("gcate", "plot_r"),
                                         ("diagnostics", "plot_propensity_scores"),
                                         ("diagnostics", "plot_treatment_associations")])
def test_moved_names_resolve_at_their_0_1_1_address(module, name):
    import importlib

    import causarray as ca

    assert getattr(importlib.import_module(f"causarray.{module}"), name) is getattr(ca, name)
    with pytest.raises(AttributeError, match=f"module 'causarray.{module}' has no "
                                             "attribute 'no_such_name'"):
        getattr(importlib.import_module(f"causarray.{module}"), "no_such_name")


def test_the_old_addresses_load_nothing_until_used():
    """``import causarray.gcate`` loads neither the batch driver nor the figures."""
    import subprocess
    import sys

    code = ("import sys, causarray.gcate as g\n"
            "before = [m for m in ('causarray.batch', 'causarray.pl') if m in sys.modules]\n"
            "g.plot_r\n"
            "print(before, 'causarray.pl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[] True"
