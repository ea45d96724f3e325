"""Are the low-MOI results of two package trees the same, bit for bit?

Runs ``tl.lfc`` with fixed settings on three bundled screens (Schraivogel CI at r = 1,
Hill at r = 1, Papalexi at r = 2 with ``bio_rep``) once per tree, each in its own
process with that tree's ``src`` first on ``sys.path``, and compares the result tables
with ``DataFrame.equals`` on the columns both have (a column one tree adds, such as
``df`` on 2026-12-07, is listed).  Used to show that a change meant for another design (high
MOI, case-control) leaves low-MOI screens untouched::

    .venv/bin/python benchmarks/lowmoi_equal.py OLD_SRC NEW_SRC
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = (("schraivogel2020_ci", 1, {}), ("hill2018", 1, {}),
        ("papalexi2021", 2, {"covariates": ["bio_rep"]}))

CHILD = """
import json
import sys
sys.path.insert(0, sys.argv[1])
import causarray as ca
from causarray.datasets import load_dataset
name, r, kw, out = sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
a = load_dataset(name)
ca.tl.lfc(a, r=r, verbose=False, drop_empty_cells=True, **kw)
a.uns["causarray"]["results"].to_parquet(out)
"""


def main() -> None:
    import pandas as pd

    old, new = sys.argv[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        for name, r, kw in RUNS:
            tables = []
            for tag, src in (("old", old), ("new", new)):
                out = str(Path(tmp) / f"{tag}_{name}.parquet")
                subprocess.run([sys.executable, "-c", CHILD, src, name, str(r), json.dumps(kw), out],
                               check=True, capture_output=True)
                tables.append(pd.read_parquet(out))
            common = [c for c in tables[0].columns if c in tables[1].columns]
            added = [c for c in tables[1].columns if c not in common]
            same = tables[0][common].equals(tables[1][common])
            calls = [int((t["padj"] < 0.05).sum()) for t in tables]
            print(f"{name}: identical {same} on {len(common)} common columns (new only: "
                  f"{added or 'none'}); calls at padj < 0.05 {calls[0]} -> {calls[1]}")


if __name__ == "__main__":
    main()
