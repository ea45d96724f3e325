"""Every reference to the documentation resolves inside the repository.

Code and tests cite the reasoning they rely on as ``docs/<file>.md#<section>``; the
documents link each other as ``[text](<file>.md#<section>)``.  Each file must exist and
each section must be a heading of it (GitHub's anchor rule).  Nothing may cite the
out-of-repository specification any more.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("src", "tests", "benchmarks", "examples") for p in sorted((ROOT / d).rglob("*"))
        if p.suffix in (".py", ".md") and ".venv" not in p.parts and "scratch" not in p.parts]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]

CODE_REF = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of the markdown headings of ``path``: lower case, punctuation
    other than '-' and '_' removed, spaces to '-', repeats suffixed -1, -2, ..."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_heading_anchor_rule(tmp_path):
    path = tmp_path / "probe.md"
    path.write_text("# Title\n## Schur complement: one-hot (fast)\n```\n# not a heading\n```\n"
                    "## Title\n", encoding="utf-8")
    assert heading_anchors(path) == {"title", "schur-complement-one-hot-fast", "title-1"}


def _code_refs():
    for path in CODE:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CODE_REF.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            yield f"{path.relative_to(ROOT)}:{line}", m.group(1), m.group(2)


def test_code_references_to_docs_resolve():
    refs = list(_code_refs())
    assert any(anchor for _, _, anchor in refs), "no docs/<file>.md#<section> reference found"
    bad = []
    for where, name, anchor in refs:
        target = ROOT / "docs" / name
        if not target.is_file():
            bad.append(f"{where}: docs/{name} does not exist")
        elif anchor and anchor not in heading_anchors(target):
            bad.append(f"{where}: docs/{name} has no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_links_between_documents_resolve():
    bad = []
    for doc in DOCS:
        for m in MD_LINK.finditer(doc.read_text(encoding="utf-8")):
            target = m.group(1)
            if re.match(r"^[a-z]+:", target):      # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not path.exists():
                bad.append(f"{where}: {file_part} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
                bad.append(f"{where}: no heading with anchor #{anchor}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["src", "tests", "benchmarks", "examples", "docs"])
def test_no_citation_of_the_external_specification(folder):
    marker = "SPEC" + " §"    # split so that this file does not match itself
    hits = [f"{p.relative_to(ROOT)}:{i}"
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in (".py", ".md", ".json", ".txt")
            for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace")
                                     .splitlines(), 1)
            if marker in line]
    assert not hits, f"cite docs/math.md#<section> instead of the specification: {hits}"
