"""One tutorial batch with the default GCATE options and without the randomized-screen extras.

The seed's batch shape (the first 15 perturbations' cells, at most 2,000, plus 2,000
controls, 8,563 genes, r = 30, ``rel_tol=2e-4, max_iters=30``) through
``gcate_lfc_batch`` twice, alternating in one process:

``defaults``
    ``fit_gcate``'s defaults (pre-treatment factors, ``gene_folds='auto'``).
``no_pretreatment_no_folds``
    ``pretreatment_u=False, gene_folds=0``.

::

    python benchmarks/batch.py --config full --data /tmp/screen_full.npz --generate-only
    python benchmarks/one_batch_defaults.py --data /tmp/screen_full.npz --rounds 1

Prints one JSON line per run (seconds and the 1-minute load average) and writes
``benchmarks/results/one_batch_defaults.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ES = dict(rel_tol=2e-4, max_iters=30)
VARIANTS = {"defaults": {},
            "no_pretreatment_no_folds": dict(pretreatment_u=False, gene_folds=0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _common import code_version, load_npz_problem, write_result

    from causarray import gcate_lfc_batch

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    prob = load_npz_problem(args.data, dense=False)
    A = prob["A"]
    pert = np.flatnonzero(A[:, :15].sum(axis=1) > 0)
    ctrl = np.flatnonzero(A.sum(axis=1) == 0)
    rng = np.random.default_rng(0)
    rows = np.sort(np.concatenate([rng.choice(pert, min(2000, pert.size), replace=False),
                                   ctrl[:2000]]))
    Y, X, Ab, X_A = prob["Y"][rows], prob["X"][rows], A[rows][:, :15], prob["X_A"][rows]
    del prob
    out = []
    for _ in range(args.rounds):
        for name, extra in VARIANTS.items():
            t = time.perf_counter()
            gcate_lfc_batch(Y, X, Ab, 30, W_A=X_A, batch_size=15, max_cells=None, n_ctrl=None,
                            gcate_kwargs=dict(kwargs_es_1=ES, kwargs_es_2=ES, **extra))
            row = dict(variant=name, wall_s=round(time.perf_counter() - t, 1),
                       load_1min=round(os.getloadavg()[0], 2), n_cells=int(Y.shape[0]))
            print(row, flush=True)
            out.append(row)
    write_result("one_batch_defaults", dict(data=args.data, code=code_version(), rows=out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
