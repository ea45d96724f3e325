#!/usr/bin/env bash
# Benchmark-only environment for the pseudobulk PyDESeq2 peer (never a causarray dependency).
#
# README: bash benchmarks/envs/pydeseq2.sh [VENV_DIR]  -- creates VENV_DIR (default
#   /tmp/cc/venv-pydeseq2), installs pydeseq2==$PYDESEQ2_VERSION from PyPI with anndata and
#   pandas, then prints the versions. benchmarks/case_control.py runs
#   VENV_DIR/bin/python benchmarks/case_control.py --pydeseq2-worker IN_DIR OUT.csv
#   in it (the worker imports only numpy, pandas and pydeseq2).
#
# Environment: PYTHON (default python3, needs >= 3.10), PYDESEQ2_VERSION (default: the
#   newest release; set e.g. 0.5.2 to pin).
set -euo pipefail

VENV="${1:-/tmp/cc/venv-pydeseq2}"
PYTHON="${PYTHON:-python3}"
SPEC="pydeseq2"
if [[ -n "${PYDESEQ2_VERSION:-}" ]]; then
    SPEC="pydeseq2==${PYDESEQ2_VERSION}"
fi

"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "$SPEC" anndata pandas

"$PY" - <<'PYEOF'
import importlib.metadata as md
import sys

import pydeseq2

print("python", sys.version.split()[0])
print("pydeseq2", md.version("pydeseq2"), pydeseq2.__file__)
for dist in ("numpy", "scipy", "pandas", "anndata", "scikit-learn", "formulaic"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
PYEOF
