"""Where GCATE's early stopping stops when ``r`` exceeds the data's rank.

The seed call's first batch on the tutorial-shape screen (its 2,000 controls and 2,000 of
the treated cells of the first 15 perturbations, 8,563 genes, 10 true factors; simulated by
``benchmarks/batch.py --config full --generate-only``):

1. ``fit_gcate`` at r = 10 and r = 30, each with the tutorial's stopping
   (``rel_tol=2e-4, max_iters=30``, default ``patience`` 5) and with 30 epochs (a
   patience that never fires): the objective's relative drop per epoch, and the
   squared canonical correlations between the two fits' factor spans (1 = a direction
   both share; the count of those ≥ 0.99 is ``shared_directions``);
2. ``gcate_lfc_batch`` on the same batch at r = 30 with ``patience`` 1, 2, 5 and
   "never" (30 epochs): the tables' ``stat`` correlation with the default's and the
   discoveries at padj < 0.05.

::

    python benchmarks/batch.py --config full --data /tmp/screen_full.npz --generate-only
    python benchmarks/gcate_plateau.py --data /tmp/screen_full.npz

Writes ``benchmarks/results/gcate_plateau.{json,md}`` (part 1) and
``gcate_plateau_tables.{json,md}`` (part 2; ``--name`` to change the stem); about
4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TUTORIAL_ES = dict(rel_tol=2e-4, max_iters=30)
NEVER = 10_000                       # a patience that never fires within max_iters


def seed_batch(path: str):
    """(Y csr, X, A) of the seed call's first batch (``plan_batches`` with the tutorial's
    ``batch_size=15, max_cells=2000, n_ctrl=2000``)."""
    from _common import load_npz_problem

    from causarray.batch import plan_batches

    prob = load_npz_problem(path, dense=False)
    plan = plan_batches(prob["A"], batch_size=15, max_cells=2000, n_ctrl=2000)[0]
    return (prob["Y"][plan.cell_idx], prob["X"][plan.cell_idx],
            prob["A"][plan.cell_idx][:, plan.trt_idx])


def canonical_r2(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """Squared canonical correlations of the column spans of ``U`` and ``V`` (sorted):
    1 for a direction the two share, whatever the rotation of either basis."""
    Qu, _ = np.linalg.qr(U - U.mean(axis=0))
    Qv, _ = np.linalg.qr(V - V.mean(axis=0))
    return np.sort(np.linalg.svd(Qu.T @ Qv, compute_uv=False) ** 2)


def stopping_rows(Y, X, A) -> list[dict]:
    """fit_gcate at r = 10 and 30, stopped by the tutorial's rule and after 30 epochs."""
    from causarray import fit_gcate

    rows = []
    for r in (10, 30):
        fits = {}
        for label, patience in (("default", 5), ("30 epochs", NEVER)):
            t0 = time.perf_counter()
            res_1, _ = fit_gcate(Y, X, A, r, family="nb", random_state=0,
                                 kwargs_es_1=dict(TUTORIAL_ES, patience=patience),
                                 kwargs_es_2=TUTORIAL_ES)
            hist = np.asarray(res_1["hist"][:-1])
            fits[label] = res_1["U"]
            rows.append(dict(r=r, stopping=label, epochs=int(res_1["n_iter"]) + 1,
                             seconds=round(time.perf_counter() - t0, 1),
                             rel_drop_per_epoch=" ".join(f"{v:.0e}" for v in
                                                         -np.diff(hist) / hist[1:])))
        r2 = canonical_r2(fits["default"], fits["30 epochs"])
        rows[-1].update(shared_directions=int((r2 >= 0.99).sum()),
                        canonical_r2=" ".join(f"{v:.2f}" for v in r2))
    return rows


def table_rows(Y, X, A) -> list[dict]:
    """gcate_lfc_batch at r = 30 with patience 1, 2, 5, never; tables against patience 5."""
    import pandas as pd

    from causarray import gcate_lfc_batch

    Yd = pd.DataFrame(Y.toarray(), columns=[f"g{j}" for j in range(Y.shape[1])])
    Ad = pd.DataFrame(A, columns=[f"P{k:03d}" for k in range(A.shape[1])])
    ref, rows = None, []
    for patience in (5, 1, 2, NEVER):                  # the default first: the reference
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t0 = time.perf_counter()
            df = gcate_lfc_batch(Yd, X, Ad, 30, batch_size=A.shape[1], family="nb",
                                 max_cells=None, n_ctrl=None, random_state=0,
                                 cache_path=os.path.join(tmp, "c.h5"), verbose=False,
                                 gcate_kwargs=dict(kwargs_es_1=dict(TUTORIAL_ES,
                                                                    patience=patience),
                                                   kwargs_es_2=TUTORIAL_ES))
            wall = time.perf_counter() - t0
        ref = df if ref is None else ref
        ok = np.isfinite(ref["stat"].to_numpy()) & np.isfinite(df["stat"].to_numpy())
        rows.append(dict(patience="never (30 epochs)" if patience == NEVER else patience,
                         seconds=round(wall, 1),
                         discoveries=int((df["padj"].fillna(1.0) < 0.05).sum()),
                         stat_corr_with_patience_5=round(float(np.corrcoef(
                             ref["stat"].to_numpy()[ok], df["stat"].to_numpy()[ok])[0, 1]), 5)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help=".npz of the screen (see the module doc)")
    ap.add_argument("--name", default="gcate_plateau")
    args = ap.parse_args(argv)
    from _common import code_version, write_result

    load0 = [round(x, 2) for x in os.getloadavg()]
    Y, X, A = seed_batch(args.data)
    info = dict(data=args.data, n_cells=Y.shape[0], n_genes=Y.shape[1], n_perts=A.shape[1],
                code=code_version(), loadavg_before=load0)
    stopping = stopping_rows(Y, X, A)
    print(write_result(args.name, dict(info, rows=stopping)), flush=True)
    tables = table_rows(Y, X, A)
    print(write_result(f"{args.name}_tables", dict(
        info, loadavg_after=[round(x, 2) for x in os.getloadavg()], rows=tables)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
