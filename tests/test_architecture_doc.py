"""docs/ARCHITECTURE.md names what exists: its modules, functions, files and imports."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PKG = ROOT / "src" / "causarray"
TEXT = DOC.read_text(encoding="utf-8")
TICKED = re.findall(r"`([^`\n]+)`", TEXT)
FILE_SUFFIXES = {"py", "pyi", "md", "html", "h5", "h5ad", "csv", "png", "json"}
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
SUBPACKAGES = sorted(p.name for p in PKG.iterdir() if (p / "__init__.py").exists())


def _section(title: str) -> str:
    start = TEXT.index(f"## {title}\n")
    nxt = TEXT.find("\n## ", start + 1)
    return TEXT[start:] if nxt < 0 else TEXT[start:nxt]


def _table_rows(section: str) -> list[list[str]]:
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def _qualified_names() -> list[tuple[str, str]]:
    """Every `module.name` of the document whose module is causarray or a submodule."""
    out = []
    for tok in TICKED:
        m = re.fullmatch(r"([A-Za-z_]\w*)\.([A-Za-z_]\w*)", tok)
        if not m or m.group(2) in FILE_SUFFIXES:
            continue
        mod = m.group(1)
        if mod == "causarray" or mod in MODULES or (PKG / mod).is_dir():
            out.append((mod, m.group(2)))
    return out


def test_the_document_names_functions():
    assert len(_qualified_names()) > 100


@pytest.mark.parametrize("mod,name", _qualified_names())
def test_every_qualified_name_exists(mod, name):
    module = importlib.import_module("causarray" if mod == "causarray" else f"causarray.{mod}")
    assert hasattr(module, name), f"docs/ARCHITECTURE.md names {mod}.{name}, which does not exist"


def test_every_file_named_exists():
    paths = [t.split("::")[0].split("#")[0] for t in TICKED
             if re.match(r"^(src|tests|benchmarks|docs)/\S+\.\w+", t)]
    assert paths
    missing = [p for p in paths if not (ROOT / p).is_file()]
    assert not missing, f"docs/ARCHITECTURE.md names missing files: {missing}"
    for t in TICKED:                               # tests/test_x.py::test_name
        if "::" in t:
            path, func = t.split("::")
            assert f"def {func}(" in (ROOT / path).read_text(encoding="utf-8"), t


def test_every_module_has_a_row_in_the_ownership_table():
    listed = set()
    for row in _table_rows(_section("What each module owns")):
        listed |= {m.removesuffix(".py").rstrip("/") for m in re.findall(r"`([\w/.]+)`", row[0])}
    expected = (set(MODULES) - {"_version"}) | {p.name for p in PKG.iterdir()
                                                if p.is_dir() and (p / "__init__.py").exists()}
    assert expected <= listed, f"modules without a row: {sorted(expected - listed)}"
    assert listed <= expected, f"rows for modules that do not exist: {sorted(listed - expected)}"


def _package_imports(module: str) -> tuple[set[str], set[str]]:
    """(imported at load, imported inside functions) among causarray's own modules."""
    if module in SUBPACKAGES:       # a subpackage: the imports of all its modules
        trees = [ast.parse(f.read_text(encoding="utf-8"))
                 for f in sorted((PKG / module).glob("*.py"))]
    else:
        trees = [ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))]
    top, lazy = set(), set()
    for tree in trees:
        t, lz = _imports_of(tree, module in SUBPACKAGES)
        top |= t
        lazy |= lz
    return top, lazy - top


def _imports_of(tree: ast.Module, in_subpackage: bool) -> tuple[set[str], set[str]]:
    top, lazy = set(), set()
    for node in ast.walk(tree):
        if in_subpackage and isinstance(node, ast.ImportFrom) and node.level == 1:
            continue                # the subpackage's own modules
        if in_subpackage and isinstance(node, ast.ImportFrom) and node.level == 2:
            names = {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            names = {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("causarray."):
            names = {node.module.split(".")[1]}
        else:
            continue
        (top if node in tree.body else lazy).update(names - {"_version"})
    return top, lazy


@pytest.mark.parametrize("row", _table_rows(_section("What imports what")),
                         ids=lambda row: row[0].strip("`"))
def test_import_table_matches_the_code(row):
    modules = set(MODULES) | set(SUBPACKAGES)
    names = re.findall(r"`(\w+)`", row[0])
    documented_top = {m for m in re.findall(r"`(\w+)`", row[1]) if m in modules}
    documented_lazy = {m for m in re.findall(r"`(\w+)`", row[2]) if m in modules}
    for name in names:
        top, lazy = _package_imports(name)
        assert top == documented_top, (
            f"{name} imports {sorted(top)} at load; docs/ARCHITECTURE.md says "
            f"{sorted(documented_top)}")
        assert lazy == documented_lazy, (
            f"{name} imports {sorted(lazy)} lazily; docs/ARCHITECTURE.md says "
            f"{sorted(documented_lazy)}")


def test_every_module_has_a_row_in_the_import_table():
    listed = set()
    for row in _table_rows(_section("What imports what")):
        listed |= set(re.findall(r"`(\w+)`", row[0]))
    expected = (set(MODULES) | set(SUBPACKAGES)) - {"_version"}
    assert expected <= listed, f"modules without a row in 'What imports what': " \
        f"{sorted(expected - listed)}"
