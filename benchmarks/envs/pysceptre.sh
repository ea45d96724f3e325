#!/usr/bin/env bash
# Benchmark-only environment for the pysceptre peer (never a causarray dependency).
#
# README: bash benchmarks/envs/pysceptre.sh SRC_DIR [VENV_DIR]  -- creates VENV_DIR
#   (default /tmp/peers/venv-pysceptre), installs pysceptre from the source tree SRC_DIR
#   (a `git archive` export of github.com/broadinstitute/pysceptre, or the unpacked PyPI
#   sdist) with its `fast` extra (numba) and the runner's deps (statsmodels) from PyPI,
#   then prints pysceptre's version. Use it with
#   VENV_DIR/bin/python benchmarks/highmoi_peers.py pysceptre DATA_DIR OUT.csv
#
# Recorded (2026-12-06): the `fetch` snapshot of broadinstitute/pysceptre was unavailable, so
#   SRC_DIR was the PyPI sdist pysceptre-0.6.0.tar.gz (sha256 604d641f056227b5d1749b6a0c7314aa
#   5951aab0a86fa230220aa0a2769c076f) unpacked to /tmp/peers/pysceptre-src; the sdist carries no
#   git commit. Resulting env: python 3.11.7, pysceptre 0.6.0, numpy 2.4.6, scipy 1.17.1,
#   pandas 3.1.1, numba 0.68.1, statsmodels 0.15.0, threadpoolctl 3.8.0.
#   A tree with a `.git-commit` file (e.g. written next to a `git archive` export) has it printed.
#
# SRC_DIR may also be the literal `pypi`, which installs pysceptre==$PYSCEPTRE_VERSION
# (default 0.6.0) straight from PyPI instead of from a local tree.
#
# Environment: PYTHON (default python3, needs >= 3.10), PYSCEPTRE_VERSION.
set -euo pipefail

SRC="${1:-}"
VENV="${2:-/tmp/peers/venv-pysceptre}"
PYTHON="${PYTHON:-python3}"
PYSCEPTRE_VERSION="${PYSCEPTRE_VERSION:-0.6.0}"

if [[ -z "$SRC" ]]; then
    echo "usage: $0 SRC_DIR|pypi [VENV_DIR]" >&2
    exit 2
fi
if [[ "$SRC" != "pypi" ]]; then
    if [[ ! -f "$SRC/pyproject.toml" || ! -d "$SRC/src/pysceptre" ]]; then
        echo "error: $SRC does not look like a pysceptre source tree (no pyproject.toml / src/pysceptre)" >&2
        exit 2
    fi
    SRC="$(cd "$SRC" && pwd)"
fi

"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# The runner's own imports (numpy/scipy/pandas/statsmodels; anndata is optional there).
"$PY" -m pip install --quiet "numpy>=1.24" "scipy>=1.10" "pandas>=2.0" "threadpoolctl>=3.0" \
    "statsmodels>=0.14" "numba>=0.58"

if [[ "$SRC" == "pypi" ]]; then
    "$PY" -m pip install --quiet "pysceptre[fast]==${PYSCEPTRE_VERSION}"
    echo "source: PyPI pysceptre==${PYSCEPTRE_VERSION}"
else
    # Not editable: the venv keeps working if the exported tree is removed.
    "$PY" -m pip install --quiet "${SRC}[fast]"
    echo "source: $SRC"
    if [[ -f "$SRC/.git-commit" ]]; then
        echo "commit: $(cat "$SRC/.git-commit")"
    fi
fi

"$PY" - <<'EOF'
import importlib.metadata as md
import sys

import pysceptre

print("python", sys.version.split()[0])
print("pysceptre", pysceptre.__version__, pysceptre.__file__)
for dist in ("numpy", "scipy", "pandas", "numba", "statsmodels", "threadpoolctl"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
EOF
