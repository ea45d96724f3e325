"""Child process for the crash-resume tests of ``gcate_lfc_batch`` (run via subprocess).

Usage: ``python _batch_child.py CACHE_PATH MARKER_PATH MODE``

MODE
    ``hold``: after batch 0 is committed, write MARKER_PATH; the next commit blocks
        (sleeps) so the parent can SIGKILL the process while the run is unfinished.
    ``die-in-write``: after batch 0 is committed, write MARKER_PATH; while writing the
        next batch's file the process SIGKILLs itself half-way through the HDF5 write.
    ``screen-hold``: ``hold`` with ``fit='screen'`` (the screen stage is stored first).
    ``screen-die-in-save``: ``fit='screen'``; write MARKER_PATH, then SIGKILL itself
        half-way through writing the screen stage's file, before any batch.

Also imported by the tests for :func:`make_problem` and :data:`RUN_KW`, so parent and
child analyse exactly the same screen with the same settings.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pandas as pd

RUN_KW = dict(batch_size=2, n_ctrl=150, max_cells=100, random_state=0,
              gcate_kwargs=dict(kwargs_es_1=dict(max_iters=3), kwargs_es_2=dict(max_iters=3)))
R = 2


def make_problem(random_state: int = 0):
    """(Y sparse CSR, X, A DataFrame, X_A) of a small simulated screen (6 perturbations)."""
    import causarray as ca

    adata = ca.simulate_screen(n_ctrl=200, n_perts=6, cells_per_pert=60, n_genes=150, r=2,
                               random_state=random_state)
    labels = adata.obs[adata.uns["pert_col"]].astype(str)
    A = pd.get_dummies(labels).drop(columns=[adata.uns["ctrl_label"]]).astype(float)
    Y, A, X, X_A = ca.prep_causarray_data(adata.X, A)
    return Y, X, A, X_A


def _die_in_screen_save(marker: str):
    """A stand-in for ``batch._save_screen_stage`` that dies half-way through its file."""
    from pathlib import Path

    def save(path, fp, stage):
        tmp = Path(path).with_name(f"{Path(path).name}.tmp-{os.getpid()}.npz")
        with open(tmp, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
            fh.flush()
        with open(marker, "w") as fh:
            fh.write("screen")
        os.kill(os.getpid(), signal.SIGKILL)

    return save


def main(cache_path: str, marker: str, mode: str) -> None:
    import causarray.batch as batch_mod
    import causarray.cache as cache_mod
    from causarray.batch import gcate_lfc_batch

    fit = "screen" if mode.startswith("screen-") else "auto"
    mode = mode.removeprefix("screen-")
    if mode == "die-in-save":
        batch_mod._save_screen_stage = _die_in_screen_save(marker)

    state = {"commits": 0}
    orig_commit = cache_mod.BatchCache.commit
    orig_write = cache_mod.write_record

    def dying_write(group, batch, rec):
        g = group.create_group(f"batch_{batch:04d}")
        g.create_dataset("partial", data=np.arange(1000.0))
        group.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def commit(self, batch, record):
        if state["commits"] >= 1:
            if mode == "hold":
                time.sleep(600)
            elif mode == "die-in-write":
                cache_mod.write_record = dying_write
        orig_commit(self, batch, record)
        cache_mod.write_record = orig_write
        state["commits"] += 1
        if state["commits"] == 1:
            with open(marker, "w") as fh:
                fh.write(str(batch))

    cache_mod.BatchCache.commit = commit
    Y, X, A, X_A = make_problem()
    gcate_lfc_batch(Y, X, A, R, W_A=X_A, cache_path=cache_path, fit=fit, **RUN_KW)


if __name__ == "__main__":
    main(*sys.argv[1:4])
