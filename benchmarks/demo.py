"""Benchmark: wall time of ``causarray demo`` (the ``make demo`` target's work).

The test suite only checks what the demo writes; how long it takes on a given machine is
measured here instead (``make demo`` is meant to finish in under two minutes on a
2-core machine).  Writes ``benchmarks/results/demo.json`` and ``demo.md``.

Usage::

    PYTHONPATH=src python benchmarks/demo.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _common import write_result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="demo output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "demo")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "causarray.cli", "demo", "--out", out,
                               "-q"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    row = dict(command="causarray demo", wall_s=round(wall, 1), target_s=120,
               within_target=bool(wall < 120))
    print(f"causarray demo: {wall:.1f} s (target < 120 s)")
    write_result("demo", dict(rows=[row]))


if __name__ == "__main__":
    main()
