"""Committed text names no folder of the machine it was written on.

Results, docs and code name files relative to the repository (``src/causarray``,
``benchmarks/results/x.json``, ``../shared`` beside it) and data by how to make them
(docs/benchmarks.md); an absolute path is allowed only under ``/tmp`` (scratch files of
a command shown), for the system's own interfaces (``/proc``, ``/dev``, ``/usr/bin``),
as a placeholder (``/path/to/...``) or as a path that exists nowhere (``/nonexistent``,
``/no/such``: tests of missing files).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".md", ".json", ".py", ".txt", ".toml", ".cfg", ".yml", ".yaml")
#: a leading ``/`` not glued to a word (URLs, ``a/b`` and ``1/n`` are not paths), then
#: at least two components
ABS_PATH = re.compile(r"(?<![\w.~/:$-])/(?=[A-Za-z_])[\w.+@-]+(?:/[\w.+@-]*)+")
ALLOWED = ("/tmp/", "/proc/", "/dev/", "/usr/bin/", "/path/to/", "/nonexistent/",
           "/no/such/")


def machine_paths(text: str) -> list[tuple[int, str]]:
    """``(line number, path)`` of every absolute path of ``text`` outside ``ALLOWED``."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        out += [(i, m.group(0)) for m in ABS_PATH.finditer(line)
                if not (m.group(0) + "/").startswith(ALLOWED)]
    return out


def _committed_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                                text=True, check=True, timeout=60).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (git ls-files failed)")
    return [ROOT / f for f in listed if f.endswith(SUFFIXES) and (ROOT / f).is_file()]


def test_the_pattern_finds_machine_paths_and_nothing_else():
    s = "/"               # the examples are built so that this file names none itself
    text = (f"data {s}work/essential/x.h5ad\n"
            f'"src": "{s}home/me/wt/src/causarray",\n'
            "see https://github.com/a/b and docs/math.md, 1/n, and/or\n"
            f"scratch {s}tmp/x.h5ad, {s}proc/self/status, {s}path/to/screen.h5ad, {s}usr/bin\n"
            f"`{s}root/.cache/pip` $DATA/essential.h5ad ../shared/bench\n")
    assert machine_paths(text) == [(1, f"{s}work/essential/x.h5ad"),
                                   (2, f"{s}home/me/wt/src/causarray"),
                                   (5, f"{s}root/.cache/pip")]


def test_committed_text_names_no_machine_path():
    files = _committed_text_files()
    assert len(files) > 100
    found = [f"{p.relative_to(ROOT)}:{line}: {path}" for p in files
             for line, path in machine_paths(p.read_text(encoding="utf-8", errors="replace"))]
    assert not found, "absolute paths outside /tmp (write them relative to the " \
        "repository, data by how to make it):\n" + "\n".join(found)
