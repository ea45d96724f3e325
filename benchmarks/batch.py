"""Benchmark of the batch pipeline: memory flat in the number of batches, serial vs Dask,
and the full-size tutorial screen.

Configurations
--------------
``small``, ``tutorial``
    For each number of batches B (``--batches``, default 4 8 16) a screen with
    B x ``perts_per_batch`` perturbations of the same size is generated (every batch has
    the same shape, only the number of batches grows).  ``tutorial`` has the tutorial's
    batch shape: 15 perts x (2,000 treated + 2,000 controls) x 8,563 genes.
``full``
    The seed tutorial's whole screen: 79,865 cells (2,000 controls + 77,865 cells in
    200 perturbations of 389-390 cells) x 8,563 genes, 10 true latent factors, analysed
    exactly as the seed does: ``gcate_lfc_batch(Y, X, A, 30, W_A=X_A, batch_size=15,
    max_cells=2000, n_ctrl=2000, family='nb', cache_path=..., random_state=0,
    verbose=True, gcate_kwargs=dict(kwargs_es_1=dict(rel_tol=2e-4, max_iters=30),
    kwargs_es_2=...))``, i.e. 14 batches of 14-15 perturbations x 4,000 cells.
    ``Y`` is passed as a sparse CSR matrix, the memory-lean input (the seed passes a
    dense DataFrame: 2.7 GB as int32 or float32, 5.5 GB as float64).

``essential``
    The Replogle K562 essential screen's shape: 309,915 cells (10,691 controls) x 8,563
    genes x 2,021 perturbations (~148 cells each; ``--cells N`` scales the cells and
    the perturbations, keeping the batch shape),
    written chunk by chunk into a CSR ``.h5ad`` with h5py (``write_screen_h5ad``; never
    dense, counts int32) at ``--data`` (default ``/tmp/causarray_essential.h5ad``,
    reused when it exists), then analysed *from the file* by
    ``gcate_lfc_batch(path, r=30, batch_size=15, n_ctrl=2000, max_cells=None, ...)``
    (every treated cell, a 2,000-cell control pool; 135 batches) with a batch cache that
    is kept (``--cache``; a rerun resumes).  ``--max-batches K`` runs the first K
    batches of the full plan.  ``--results FILE.parquet`` passes ``results_path``: the
    table is written one batch at a time instead of being returned (rerun on a finished
    cache, this measures the assembly alone).  Reports wall time, time per batch, the
    peak RSS (``VmHWM``) of the caller and (``--dask``) of each worker, and the file size.

The counts are simulated chunk by chunk (``_common.simulate_sparse_counts``), so no
configuration ever holds a dense cells x genes matrix; they are capped by
``prep_causarray_data`` and saved as an uncompressed ``.npz``.  Every run happens in a
fresh subprocess, serially and (``--dask``) on a local Dask cluster of 2 worker
processes (1 thread each), and reports wall time, per-batch times (GCATE and total, from
the batch cache), the peak RSS of the calling process and its increase over the RSS
right after loading the input, the workers' peak RSS, and the result's row count.

``--max-batches K`` (``full`` only) runs the first K of the 14 batches: the screen is cut
to their perturbations and to the cells of those perturbations plus the controls, which
gives exactly the same batches (checked against the full plan).  The full run's time is
then *extrapolated* as overhead + (wall - overhead) x 14 / K and labelled as such.

``--upstream`` also analyses the first batch's cells with causarray 0.1.1
(``benchmarks/upstream.py``, its own venv) and with our ``gcate_lfc_batch`` (one batch),
side by side: 0.1.1's ``fit_gcate`` (with a timeout), then its ``LFC`` on that U under an
address-space cap (``--upstream-mem-cap-gb``, default 12) and a timeout, so an
out-of-memory LFC is reported ("LFC memory_error under the 12 GiB address-space cap")
instead of exhausting the machine.  0.1.1 compiles its numba kernels in every process
(no on-disk cache); a fit on a 300 x 200 slice estimates that compile time, and the
GCATE ratio is also given without it.

Usage::

    python benchmarks/batch.py                         # small configuration (minutes)
    python benchmarks/batch.py --config tutorial       # tutorial batch shape
    python benchmarks/batch.py --batches 4 8 --no-dask --upstream
    python benchmarks/batch.py --config full --data /tmp/screen_full.npz --generate-only
    python benchmarks/batch.py --config full --data /tmp/screen_full.npz --max-batches 1
    python benchmarks/batch.py --config full --data /tmp/screen_full.npz --dask --upstream
    python benchmarks/batch.py --config essential --max-batches 2      # writes the .h5ad once
    python benchmarks/batch.py --config essential --max-batches 2 --dask --skip-serial

``--data FILE`` keeps the generated screen (and reuses it when it exists).
Results: ``benchmarks/results/<name>.json`` (+ ``.md``); the name defaults to ``batch``
(small), ``batch_tutorial``, ``batch_full`` or ``batch_full_k<K>``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    current_rss_mb,
    load_npz_problem,
    measure,
    save_csr_problem,
    save_npz_problem,
    simulate_sparse_counts,
    split_cells,
    write_result,
)

CONFIGS = {
    # per batch: perts_per_batch perturbations x cells_per_pert cells + n_ctrl controls
    "small": dict(perts_per_batch=5, cells_per_pert=60, n_ctrl=300, n_genes=400, r=3,
                  max_iters=5, max_cells=2000),
    "tutorial": dict(perts_per_batch=15, cells_per_pert=134, n_ctrl=2000, n_genes=8563, r=30,
                     max_iters=30, max_cells=2000),
    # the seed tutorial's screen: 200 perturbations, batch_size 15 -> 14 batches
    "full": dict(perts_per_batch=15, n_perts=200, n_cells=79865, n_ctrl=2000, n_genes=8563,
                 r=30, r_true=10, max_iters=30, max_cells=2000),
    # the Replogle K562 essential screen's shape, written to and analysed from an .h5ad:
    # 309,915 cells (10,691 non-targeting) x 8,563 genes, 2,021 perturbations of ~148
    # cells; every treated cell (max_cells=None), a shared pool of n_ctrl controls
    "essential": dict(perts_per_batch=15, n_perts=2021, n_cells=309915, ctrl_cells=10691,
                      n_ctrl=2000, n_genes=8563, r=30, r_true=10, max_iters=30,
                      max_cells=None),
}
ESSENTIAL_PERT_COL, ESSENTIAL_CTRL = "perturbation", "non-targeting"
SEED_TIME_S = 149.2 * 60          # the seed's reported total on its hardware


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------
def simulate_sparse_screen(n_ctrl: int, n_perts: int, cells_per_pert, n_genes: int,
                           r: int, random_state: int = 0, chunk: int = 2000):
    """NB counts with r latent confounders, generated in cell chunks (CSR, int32).

    ``cells_per_pert`` is an int or one count per perturbation.

    Returns (Y csr, A dense 0/1 n x a).
    """
    Y, group = simulate_sparse_counts(n_ctrl, cells_per_pert, n_genes, r, n_perts=n_perts,
                                      random_state=random_state, chunk=chunk)
    A = np.zeros((Y.shape[0], n_perts))
    A[group >= 0, group[group >= 0]] = 1.0
    return Y, A


def _csr_mb(Y) -> float:
    return round((Y.data.nbytes + Y.indices.nbytes + Y.indptr.nbytes) / 2**20, 1)


def make_problem(path: Path, cfg: dict, n_batches: int | None) -> dict:
    """Simulate, cap with ``prep_causarray_data`` and save a screen; return its description.

    ``n_batches`` sets the number of perturbations (``n_batches x perts_per_batch``);
    None for the ``full`` configuration, whose layout is fixed.
    """
    import causarray

    t0 = time.perf_counter()
    r_true = cfg.get("r_true", cfg["r"])
    if n_batches is None:
        n_perts = cfg["n_perts"]
        cells = split_cells(cfg["n_cells"] - cfg["n_ctrl"], n_perts)
    else:
        n_perts = n_batches * cfg["perts_per_batch"]
        cells = cfg["cells_per_pert"]
    Y, A = simulate_sparse_screen(cfg["n_ctrl"], n_perts, cells, cfg["n_genes"], r_true)
    t_sim = time.perf_counter() - t0
    raw_mb = _csr_mb(Y)
    Y, A, X, X_A = causarray.prep_causarray_data(Y, A)
    t_prep = time.perf_counter() - t0 - t_sim
    Y.sum_duplicates()                              # canonical already: a no-op
    path = save_csr_problem(path, Y, X, np.asarray(A), X_A)
    info = dict(n_cells=Y.shape[0], n_genes=Y.shape[1], n_perts=A.shape[1], r_true=r_true,
                nnz=int(Y.nnz), density=round(Y.nnz / (Y.shape[0] * Y.shape[1]), 4),
                input_raw_int32_mb=raw_mb, input_mb=_csr_mb(Y),
                input_float64_csr_mb=round((Y.nnz * 12 + (Y.shape[0] + 1) * 8) / 2**20, 1),
                file_mb=round(path.stat().st_size / 2**20, 1),
                t_simulate_s=round(t_sim, 1), t_prep_s=round(t_prep, 1),
                t_generate_total_s=round(time.perf_counter() - t0, 1))
    return info


def write_screen_h5ad(path: Path, cfg: dict, n_cells: int | None = None,
                     chunk: int = 2000) -> dict:
    """Simulate a screen chunk by chunk straight into a sparse (CSR) ``.h5ad`` file.

    ``obs`` (perturbation labels), ``var`` and ``uns`` are written by anndata; the
    counts are then appended to ``X/data``, ``X/indices`` and ``X/indptr`` with h5py,
    one chunk of ``chunk`` cells at a time (the only dense block), so the peak memory
    does not depend on the number of cells.  ``n_cells`` scales the screen (controls
    and perturbations in proportion, ~148 cells per perturbation kept, so batches keep
    their shape).  Counts are int32, not capped (the pipeline
    caps them when reading).
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from _common import iter_sparse_count_chunks

    t0 = time.perf_counter()
    n_cells = int(n_cells or cfg["n_cells"])
    scale = n_cells / cfg["n_cells"]
    ctrl = int(round(cfg["ctrl_cells"] * scale))
    # same batch shape at any size: the perturbations scale, their cells do not
    sizes = split_cells(n_cells - ctrl, max(1, int(round(cfg["n_perts"] * scale))))
    p = int(cfg["n_genes"])
    group = np.repeat(np.arange(-1, sizes.size), np.concatenate([[ctrl], sizes]))
    perts = np.asarray([f"P{k:04d}" for k in range(sizes.size)], dtype=object)
    labels = np.where(group < 0, ESSENTIAL_CTRL, perts[np.maximum(group, 0)])
    obs = pd.DataFrame({ESSENTIAL_PERT_COL: pd.Categorical(labels)},
                       index=pd.Index([f"cell{i:07d}" for i in range(n_cells)]))
    var = pd.DataFrame(index=pd.Index([f"GENE{j:05d}" for j in range(p)]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ad.AnnData(obs=obs, var=var, uns=dict(pert_col=ESSENTIAL_PERT_COL,
                                          ctrl_label=ESSENTIAL_CTRL)).write_h5ad(path)
    del obs
    nnz = 0
    with h5py.File(path, "r+") as f:
        if "X" in f:
            del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, p], dtype=np.int64)
        d = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32,
                             chunks=(1 << 18,))
        ind = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32,
                               chunks=(1 << 18,))
        ip = g.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)
        ip[0] = 0
        row = 0
        for vals, cols, row_nnz, _ in iter_sparse_count_chunks(
                ctrl, sizes, p, cfg.get("r_true", cfg["r"]), random_state=0, chunk=chunk):
            k = vals.size
            d.resize((nnz + k,))
            ind.resize((nnz + k,))
            d[nnz:nnz + k] = vals
            ind[nnz:nnz + k] = cols
            ip[row + 1:row + 1 + row_nnz.size] = nnz + np.cumsum(row_nnz)
            nnz += k
            row += row_nnz.size
    return dict(n_cells=n_cells, n_genes=p, n_perts=int(sizes.size), n_control_cells=ctrl,
                cells_per_pert_min=int(sizes.min()), cells_per_pert_max=int(sizes.max()),
                nnz=int(nnz), density=round(nnz / (n_cells * p), 4),
                file_mb=round(path.stat().st_size / 2**20, 1),
                float64_csr_in_memory_mb=round((nnz * 12 + (n_cells + 1) * 8) / 2**20, 1),
                t_write_s=round(time.perf_counter() - t0, 1))


def essential_child(args) -> int:
    """Analyse the ``.h5ad`` screen from the file (first ``--max-batches`` batches)."""
    import causarray.batch as bm
    from _common import hwm_rss_mb

    cfg = json.loads(args.cfg)
    out = dict(mode=args.mode)
    if args.max_batches:
        full_plan = bm.plan_batches
        k = int(args.max_batches)
        bm.plan_batches = lambda *a, **kw: full_plan(*a, **kw)[:k]     # first K of the plan
    kw = dict(r=cfg["r"], pert_col=ESSENTIAL_PERT_COL, ctrl_label=ESSENTIAL_CTRL,
              batch_size=cfg["perts_per_batch"], n_ctrl=cfg["n_ctrl"],
              max_cells=cfg["max_cells"], family="nb", random_state=0, verbose=args.verbose,
              gcate_kwargs=_gcate_kwargs(cfg), cache_path=args.cache, blas_threads=1)
    out["rss_before_mb"] = round(current_rss_mb(), 1)
    if args.results:
        kw["results_path"] = args.results
        out["results"] = args.results
    if args.mode == "serial":
        with measure() as m:
            df = bm.gcate_lfc_batch(args.data, **kw)
    else:
        from dask.distributed import Client, LocalCluster

        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            client.run(sys.path.insert, 0, str(Path(__file__).resolve().parent))
            with measure() as m:
                df = bm.gcate_lfc_batch(args.data, client=client, **kw)
            peaks = client.run(_worker_peak_mb)
            out["worker_peaks_rss_mb"] = [round(v, 1) for v in peaks.values()]
    out["caller_vmhwm_mb"] = round(hwm_rss_mb(), 1)
    if args.results:                 # the table is in the file (one row group per batch)
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(df).metadata
        n_rows, n_batches = meta.num_rows, meta.num_row_groups
        out["results_mb"] = round(os.path.getsize(args.results) / 2**20, 1)
    else:
        n_rows, n_batches = len(df), int(df["batch"].nunique())
    del df
    batches = _cache_batch_info(args.cache)
    t_b = [b["t_batch"] for b in batches]
    out.update(wall_s=round(m.wall_s, 2), peak_rss_mb=round(m.peak_rss_mb, 1),
               n_batches=n_batches, batch_s=t_b,
               batch_gcate_s=[b["t_gcate"] for b in batches],
               batch_read_s=[b.get("t_read") for b in batches],
               batch_cells=[b["n_cells"] for b in batches],
               mean_batch_s=round(float(np.mean(t_b)), 2) if t_b else None,
               result_rows=n_rows, cache_mb=round(os.path.getsize(args.cache) / 2**20, 2))
    if args.mode == "serial":
        out["outside_batches_s"] = round(m.wall_s - sum(t_b), 2)
    Path(args.out).write_text(json.dumps(out))
    return 0


def run_essential(args, cfg: dict) -> int:
    """``--config essential``: write the .h5ad once (if missing), then run from it."""
    data = Path(args.data or "/tmp/causarray_essential.h5ad")
    generation = None
    if not data.exists():
        with measure() as m:
            generation = write_screen_h5ad(data, cfg, args.cells)
        generation.update(generate_wall_s=round(m.wall_s, 1),
                          generate_peak_rss_mb=round(m.peak_rss_mb, 1))
        print(json.dumps(dict(generated=str(data), **generation)), flush=True)
    if args.generate_only:
        write_result(_result_name(args) + "_generate", dict(config=args.config, settings=cfg,
                                                            rows=[generation or {}]))
        return 0
    rows = []
    modes = ([] if args.skip_serial else ["serial"]) + (["dask"] if args.dask else [])
    for mode in modes:
        cache = Path(args.cache or f"{data}.{mode}.k{args.max_batches or 'all'}.cache.h5")
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            out = fh.name
        cmd = [sys.executable, __file__, "_essential", "--data", str(data), "--mode", mode,
               "--workers", str(args.workers), "--cfg", json.dumps(cfg), "--out", out,
               "--cache", str(cache)]
        if args.max_batches:
            cmd += ["--max-batches", str(args.max_batches)]
        if args.results:
            cmd += ["--results", str(args.results)]
        if not args.quiet:
            cmd += ["--verbose"]
        with measure() as m:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=args.timeout)
        if proc.returncode != 0:
            rows.append(dict(mode=mode, status="failed", returncode=proc.returncode))
            continue
        res = json.loads(Path(out).read_text())
        os.unlink(out)
        res.update(process_wall_s=round(m.wall_s, 1), file_mb=round(data.stat().st_size / 2**20, 1),
                   cache=str(cache))
        rows.append(res)
        print(json.dumps(res), flush=True)
    write_result(_result_name(args), dict(config=args.config, settings=cfg, data=str(data),
                                          rows=rows, generation=generation))
    return 0


def problem_info(path: Path) -> dict:
    """Shape of a saved problem without loading the counts."""
    with np.load(path) as z:
        n, p = (int(s) for s in z["Y_shape"])
        nnz = int(z["Y_indptr"][-1])
        a = int(z["A"].shape[1])
    return dict(n_cells=n, n_genes=p, n_perts=a, nnz=nnz, density=round(nnz / (n * p), 4),
                input_float64_csr_mb=round((nnz * 12 + (n + 1) * 8) / 2**20, 1),
                file_mb=round(path.stat().st_size / 2**20, 1), reused=True)


# ----------------------------------------------------------------------------------
# one measured run (child process)
# ----------------------------------------------------------------------------------
def _worker_peak_mb() -> float:
    # VmHWM, not ru_maxrss: a worker process inherits its parent's ru_maxrss at the fork
    from _common import hwm_rss_mb

    return hwm_rss_mb()


def _worker_rss_mb() -> float:
    from _common import current_rss_mb

    return current_rss_mb()


def _gcate_kwargs(cfg: dict) -> dict:
    es = dict(rel_tol=2e-4, max_iters=cfg["max_iters"])
    return dict(kwargs_es_1=dict(es), kwargs_es_2=dict(es))


def _plan(A, cfg: dict):
    from causarray.batch import plan_batches

    return plan_batches(A, batch_size=cfg["perts_per_batch"], max_cells=cfg["max_cells"],
                        n_ctrl=cfg["n_ctrl"], random_state=0)


def first_batches(prob: dict, cfg: dict, k: int) -> tuple[dict, dict]:
    """The cells and perturbations of the first ``k`` batches of the full plan.

    Keeps all control cells and the cells of the first ``k`` batches' perturbations;
    checks that the cut screen is planned into exactly those ``k`` batches (same
    perturbations, same subsampled cells).
    """
    A = prob["A"]
    full = _plan(A, cfg)
    if not 1 <= k <= len(full):
        raise ValueError(f"--max-batches must be in 1..{len(full)}, got {k}")
    cols = np.concatenate([pl.trt_idx for pl in full[:k]])
    rows = np.flatnonzero((A.sum(axis=1) == 0) | (A[:, cols].sum(axis=1) > 0))
    sub = dict(Y=prob["Y"][rows], X=prob["X"][rows], A=A[np.ix_(rows, cols)],
               X_A=prob["X_A"][rows])
    plans = _plan(sub["A"], cfg)
    same = len(plans) == k and all(
        np.array_equal(cols[p.trt_idx], q.trt_idx) and np.array_equal(rows[p.cell_idx], q.cell_idx)
        for p, q in zip(plans, full[:k]))
    if not same:
        raise RuntimeError("the cut screen is not planned into the full plan's first batches")
    info = dict(max_batches=k, n_batches_full=len(full), n_perts_run=int(cols.size),
                n_cells_run=int(rows.size), subset_matches_full_plan=same)
    return sub, info


def _cache_batch_info(path: str) -> list[dict]:
    """Per-batch ``info`` (t_gcate, t_batch, n_cells, n_perts) from a finished cache."""
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        for name in sorted(k for k in f if k.startswith("batch_")):
            out.append(dict(batch=int(name.split("_")[1]), **json.loads(f[name].attrs["info"])))
    return out


def child(args) -> int:
    import pandas as pd

    from causarray.batch import gcate_lfc_batch

    cfg = json.loads(args.cfg)
    prob = load_npz_problem(args.data, dense=False)
    out = dict(mode=args.mode)
    full_input = None
    if args.max_batches:
        sub, sub_info = first_batches(prob, cfg, args.max_batches)
        out.update(sub_info)
        full_input = prob    # stays referenced: the input's memory is that of a full run
        prob = sub
        out["input_kept_n_cells"] = int(full_input["Y"].shape[0])
    Y, X, A, X_A = prob["Y"], prob["X"], prob["A"], prob["X_A"]
    A = pd.DataFrame(A, columns=[f"P{k:04d}" for k in range(A.shape[1])])
    rss_loaded = current_rss_mb()
    kw = dict(W_A=X_A, batch_size=cfg["perts_per_batch"], n_ctrl=cfg["n_ctrl"],
              max_cells=cfg["max_cells"], family="nb", random_state=0, verbose=args.verbose,
              gcate_kwargs=_gcate_kwargs(cfg))
    out["rss_after_load_mb"] = round(rss_loaded, 1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "results.h5")
        if args.mode == "serial":
            with measure() as m:
                df = gcate_lfc_batch(Y, X, A, cfg["r"], cache_path=cache, **kw)
        else:
            from dask.distributed import Client, LocalCluster

            with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster) as client:
                client.run(sys.path.insert, 0, str(Path(__file__).resolve().parent))
                idle = client.run(_worker_rss_mb)            # workers up before timing
                out["worker_rss_before_mb"] = [round(v, 1) for v in idle.values()]
                with measure() as m:
                    df = gcate_lfc_batch(Y, X, A, cfg["r"], cache_path=cache, client=client,
                                         **kw)
                peaks = client.run(_worker_peak_mb)
                out["worker_peak_rss_mb"] = round(max(peaks.values()), 1)
                out["worker_peaks_rss_mb"] = [round(v, 1) for v in peaks.values()]
        out["cache_mb"] = round(os.path.getsize(cache) / 2**20, 2)
        try:
            batches = _cache_batch_info(cache)
        except Exception as exc:  # noqa: BLE001 - timing detail only
            batches, out["batch_info_error"] = [], repr(exc)
    n_b = int(df["batch"].nunique())
    out.update(wall_s=round(m.wall_s, 2), n_batches=n_b, per_batch_s=round(m.wall_s / n_b, 2),
               peak_rss_mb=round(m.peak_rss_mb, 1),
               peak_over_input_mb=round(m.peak_rss_mb - rss_loaded, 1),
               result_rows=len(df), result_rows_expected=int(A.shape[1] * Y.shape[1]),
               result_columns=len(df.columns))
    if batches:
        t_b = [b["t_batch"] for b in batches]
        out.update(batch_s=t_b, batch_gcate_s=[b["t_gcate"] for b in batches],
                   batch_cells=[b["n_cells"] for b in batches],
                   mean_batch_s=round(float(np.mean(t_b)), 2))
        if args.mode == "serial":       # time outside the batches (dispersion, cache, concat)
            out["overhead_s"] = round(m.wall_s - sum(t_b), 2)
    if args.max_batches:
        # serial: outside-the-batches time measured exactly; dask: batches overlap, so
        # the overhead is not separable and the whole wall time is scaled
        ov = out.get("overhead_s", 0.0) if args.mode == "serial" else 0.0
        B, k = out["n_batches_full"], args.max_batches
        out["EXTRAPOLATED_total_s"] = round(ov + (m.wall_s - ov) * B / k, 1)
        out["extrapolation"] = (f"measured {k} of {B} batches; total = overhead + "
                                f"(wall - overhead) x {B}/{k}")
    Path(args.out).write_text(json.dumps(out))
    return 0


def _pump(src, echo: bool, tail: collections.deque) -> None:
    """Keep the last few KB of a child's stderr; copy it to ours as it comes if ``echo``."""
    while True:
        chunk = os.read(src.fileno(), 4096)
        if not chunk:
            break
        if echo:
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
        tail.append(chunk)


def run_child(data: Path, cfg: dict, mode: str, workers: int, timeout: float,
              max_batches: int | None = None, verbose: bool = False,
              echo: bool = False) -> dict:
    """Run :func:`child` in a fresh interpreter; its stderr is echoed live if ``echo``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, __file__, "_child", "--data", str(data), "--mode", mode,
           "--workers", str(workers), "--cfg", json.dumps(cfg), "--out", out]
    if max_batches:
        cmd += ["--max-batches", str(max_batches)]
    if verbose:
        cmd += ["--verbose"]
    tail: collections.deque = collections.deque(maxlen=16)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pump = threading.Thread(target=_pump, args=(proc.stderr, echo, tail), daemon=True)
    pump.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    pump.join(timeout=10)
    stderr = b"".join(tail).decode(errors="replace")[-2000:]
    if rc != 0:
        return dict(mode=mode, status="timeout" if rc is None else "failed",
                    returncode=rc, stderr=stderr)
    res = json.loads(Path(out).read_text())
    os.unlink(out)
    res["process_wall_s"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------------
# side by side with causarray 0.1.1 on one batch
# ----------------------------------------------------------------------------------
def _upstream_jit_estimate(one: dict, workdir: Path, r: int, timeout: float) -> dict:
    """0.1.1's ``fit_gcate`` on a tiny slice of the batch: about its numba compile time.

    0.1.1's kernels are ``@njit`` without ``cache=True``, so every fresh process
    compiles them inside ``fit_gcate``; fitting 300 cells x 200 genes takes little
    else, so this time is an (upper) estimate of the compile time in the real fit.
    """
    from upstream import run_upstream

    A = one["A"]
    ctrl = np.flatnonzero(A.sum(axis=1) == 0)[:150]
    trt = np.flatnonzero(A.sum(axis=1) > 0)[:150]
    rows = np.sort(np.concatenate([ctrl, trt]))
    cols = np.flatnonzero(A[rows].sum(axis=0) > 0)
    genes = np.sort(np.argsort(-np.asarray(one["Y"].sum(axis=0)).ravel())[:200])
    path = save_npz_problem(workdir / "jit_probe.npz", one["Y"][rows][:, genes], one["X"][rows],
                            A[np.ix_(rows, cols)], one["X_A"][rows], compress=False)
    res = run_upstream(path, "gcate", min(r, 2), max_iters=2, rel_tol=2e-4, timeout=timeout,
                       n_threads=os.cpu_count())
    return dict(status=res.get("status"), jit_estimate_s=res.get("t_gcate_s"))


def one_batch_vs_upstream(data: Path, cfg: dict, workdir: Path, timeout: float,
                          mem_cap_gb: float, upstream_timeout: float) -> dict:
    """The first batch's cells analysed by upstream 0.1.1 and by us (one batch each).

    0.1.1 runs in three subprocesses: a tiny fit estimating its numba compile time
    (:func:`_upstream_jit_estimate`), ``fit_gcate`` (timeout only), and ``LFC`` with
    that fit's U and size factors under an ``RLIMIT_AS`` cap of ``mem_cap_gb`` GiB (plus
    the timeout), so that an out-of-memory LFC comes back as a status and as the memory
    it reached.  Times are those of the calls themselves (``t_gcate_s``, ``t_lfc_s``;
    0.1.1's include its JIT compilation), ours are ``gcate_lfc_batch`` with one batch.
    """
    from upstream import run_upstream

    prob = load_npz_problem(data, dense=False)
    plan = _plan(prob["A"], cfg)[0]
    rows, cols = plan.cell_idx, plan.trt_idx
    one = dict(Y=prob["Y"][rows], X=prob["X"][rows], A=prob["A"][np.ix_(rows, cols)],
               X_A=prob["X_A"][rows])
    del prob
    npz = save_npz_problem(workdir / "one_batch.npz", one["Y"], one["X"], one["A"],
                           one["X_A"], compress=False)
    one_cfg = dict(cfg, n_ctrl=None, max_cells=None)
    ours = run_child(npz, one_cfg, "serial", 1, timeout)
    res = dict(n_cells=int(rows.size), n_perts=int(cols.size), r=cfg["r"],
               ours_status=ours.get("status", "ok"), ours_fit_s=ours.get("wall_s"),
               ours_gcate_s=(ours.get("batch_gcate_s") or [None])[0],
               ours_process_wall_s=ours.get("process_wall_s"),
               ours_peak_rss_mb=ours.get("peak_rss_mb"))
    jit = _upstream_jit_estimate(one, workdir, cfg["r"], upstream_timeout)
    res["upstream_jit_estimate_s"] = jit["jit_estimate_s"]

    up_g = run_upstream(npz, "gcate", cfg["r"], max_iters=cfg["max_iters"], rel_tol=2e-4,
                        timeout=upstream_timeout, n_threads=os.cpu_count())
    res.update(upstream_gcate_status=up_g.get("status"), upstream_gcate_s=up_g.get("t_gcate_s"),
               upstream_gcate_peak_rss_mb=up_g.get("peak_rss_mb_wait4"))
    lfc_summary = "not run (GCATE failed)"
    if up_g.get("status") == "ok":
        U = np.load(up_g["U_path"])
        sf = np.load(up_g["size_factor_path"])
        npz_u = save_npz_problem(workdir / "one_batch_U.npz", one["Y"], one["X"], one["A"],
                                 one["X_A"], compress=False, U=U, size_factor=sf)
        cap_mb = mem_cap_gb * 1024.0
        up_l = run_upstream(npz_u, "lfc", cfg["r"], timeout=upstream_timeout,
                            rlimit_as_mb=cap_mb, n_threads=os.cpu_count())
        res.update(upstream_lfc_status=up_l.get("status"), upstream_lfc_s=up_l.get("t_lfc_s"),
                   upstream_lfc_peak_rss_mb=up_l.get("peak_rss_mb_wait4"),
                   upstream_lfc_process_wall_s=up_l.get("outer_wall_s"),
                   upstream_lfc_cap_mb=cap_mb,
                   upstream_lfc_vm_at_cap_mb=up_l.get("vm_size_at_cap_mb"),
                   upstream_lfc_error=up_l.get("error"))
        peak_gb = (up_l.get("peak_rss_mb_wait4") or 0.0) / 1024.0
        if up_l.get("status") == "ok":
            lfc_summary = f"LFC {up_l['t_lfc_s']:.0f} s (peak RSS {peak_gb:.1f} GiB)"
        elif up_l.get("status") == "timeout":
            lfc_summary = (f"LFC killed after the {upstream_timeout:g} s timeout "
                           f"(peak RSS {peak_gb:.1f} GiB)")
        else:
            lfc_summary = (f"LFC {up_l.get('status')} under the {mem_cap_gb:g} GiB "
                           f"address-space cap after {up_l.get('outer_wall_s', 0):.0f} s "
                           f"(peak RSS {peak_gb:.1f} GiB)")
    g = res.get("upstream_gcate_s")
    res["upstream_summary"] = (f"0.1.1: GCATE {g:.0f} s; {lfc_summary}" if g is not None
                               else f"0.1.1: GCATE {up_g.get('status')}")
    if g and res["ours_gcate_s"]:
        res["gcate_time_ratio_upstream_over_ours"] = round(g / res["ours_gcate_s"], 2)
        if jit["jit_estimate_s"] and g > jit["jit_estimate_s"]:
            res["gcate_time_ratio_excl_upstream_jit"] = round(
                (g - jit["jit_estimate_s"]) / res["ours_gcate_s"], 2)
    if g and res.get("upstream_lfc_s") and res["ours_fit_s"]:
        res["fit_time_ratio_upstream_over_ours"] = round(
            (g + res["upstream_lfc_s"]) / res["ours_fit_s"], 2)
    return res


# ----------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    ch = sub.add_parser("_child")
    ch.add_argument("--data", required=True)
    ch.add_argument("--mode", choices=("serial", "dask"), required=True)
    ch.add_argument("--workers", type=int, default=2)
    ch.add_argument("--cfg", required=True)
    ch.add_argument("--out", required=True)
    ch.add_argument("--max-batches", type=int, default=None)
    ch.add_argument("--verbose", action="store_true")
    es = sub.add_parser("_essential")
    for name in ("--data", "--mode", "--cfg", "--out", "--cache"):
        es.add_argument(name, required=True)
    es.add_argument("--workers", type=int, default=2)
    es.add_argument("--max-batches", type=int, default=None)
    es.add_argument("--verbose", action="store_true")
    es.add_argument("--results", default=None)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16],
                    help="numbers of batches (small / tutorial; full has 14)")
    ap.add_argument("--workers", type=int, default=2)
    dk = ap.add_mutually_exclusive_group()
    dk.add_argument("--dask", action="store_true",
                    help="also run on a local Dask cluster (default for small / tutorial)")
    dk.add_argument("--no-dask", action="store_true", help="serial runs only")
    ap.add_argument("--skip-serial", action="store_true", help="with --dask: Dask runs only")
    ap.add_argument("--max-batches", type=int, default=None,
                    help="full / essential: run only the first K batches of the plan")
    ap.add_argument("--cells", type=int, default=None,
                    help="essential: total cells of the written screen (default 309,915)")
    ap.add_argument("--cache", default=None,
                    help="essential: batch cache (kept: a rerun resumes from it)")
    ap.add_argument("--results", default=None,
                    help="essential: write the table to this .parquet file one batch at a "
                         "time (gcate_lfc_batch(results_path=...)) instead of returning it")
    ap.add_argument("--data", default=None,
                    help="full: .npz of the screen; essential: .h5ad (default "
                         "/tmp/causarray_essential.h5ad); generated there if missing")
    ap.add_argument("--generate-only", action="store_true",
                    help="full: generate and save the screen, report time and peak RSS")
    ap.add_argument("--upstream", action="store_true",
                    help="also time one batch with causarray 0.1.1 (benchmarks/upstream.py)")
    ap.add_argument("--upstream-mem-cap-gb", type=float, default=12.0,
                    help="address-space cap of 0.1.1's LFC subprocess (GiB)")
    ap.add_argument("--upstream-timeout", type=float, default=3600.0)
    ap.add_argument("--timeout", type=float, default=6 * 3600)
    ap.add_argument("--quiet", action="store_true",
                    help="do not echo the children's progress bars")
    ap.add_argument("--name", default=None, help="result file stem")
    return ap


def _result_name(args) -> str:
    if args.name:
        return args.name
    name = "batch" if args.config == "small" else f"batch_{args.config}"
    if getattr(args, "cells", None):
        name += f"_n{args.cells}"
    return name + (f"_k{args.max_batches}" if args.max_batches else "")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "_child":
        return child(args)
    if args.cmd == "_essential":
        return essential_child(args)
    if args.config == "essential":
        return run_essential(args, CONFIGS["essential"])
    full = args.config == "full"
    if not full and (args.max_batches or args.data or args.generate_only):
        raise SystemExit("--max-batches, --data and --generate-only apply to --config full")
    cfg = CONFIGS[args.config]
    use_dask = args.dask or not (full or args.no_dask)
    if args.skip_serial and not use_dask:
        raise SystemExit("--skip-serial leaves nothing to run without Dask")
    modes = ([] if args.skip_serial else ["serial"]) + (["dask"] if use_dask else [])
    rows, upstream, generation = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for B in ([None] if full else args.batches):
            data = Path(args.data) if args.data else tmp / f"screen_{B or 'full'}.npz"
            if data.exists():
                info = problem_info(data)
            else:
                with measure() as m:
                    info = make_problem(data, cfg, B)
                generation = dict(info, generate_wall_s=round(m.wall_s, 1),
                                  generate_peak_rss_mb=round(m.peak_rss_mb, 1),
                                  rss_after_generate_mb=round(current_rss_mb(), 1))
                print(json.dumps(dict(generated=str(data), **generation)), flush=True)
            if args.generate_only:
                break
            for mode in modes:
                res = run_child(data, cfg, mode, args.workers, args.timeout,
                                max_batches=args.max_batches, verbose=full,
                                echo=full and not args.quiet)
                row = dict(n_batches_requested=B or 14, **{k: v for k, v in info.items()
                                                          if not k.startswith("t_")}, **res)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.upstream and upstream is None:
                upstream = one_batch_vs_upstream(data, cfg, tmp, args.timeout,
                                                 args.upstream_mem_cap_gb,
                                                 args.upstream_timeout)
                print(json.dumps(upstream), flush=True)
    if args.generate_only:
        if generation is None:
            raise SystemExit(f"{data} exists; --generate-only measures a new generation")
        write_result(_result_name(args) + "_generate", dict(config=args.config, settings=cfg,
                                                            rows=[generation]))
        return 0
    summary = {}
    serial = [r for r in rows if r["mode"] == "serial" and "peak_over_input_mb" in r]
    if not full and len(serial) >= 2:
        lo, hi = serial[0], serial[-1]
        d_lo, d_hi = lo["peak_over_input_mb"], hi["peak_over_input_mb"]
        summary = dict(peak_over_input_growth_mb=round(d_hi - d_lo, 1),
                       peak_over_input_ratio=round(d_hi / max(d_lo, 1e-9), 2),
                       batches_ratio=round(hi["n_batches"] / lo["n_batches"], 2))
    if full:
        for r in rows:
            if "wall_s" not in r:
                continue
            total = r.get("EXTRAPOLATED_total_s", r["wall_s"])
            key = "extrapolated" if "EXTRAPOLATED_total_s" in r else "measured"
            peak_sum = r["peak_rss_mb"] + sum(r.get("worker_peaks_rss_mb", []))
            summary[r["mode"]] = dict(
                total_s=total, total_is=key, total_min=round(total / 60, 1),
                target_15_min_met=total <= 15 * 60,
                speedup_vs_seed_149min=round(SEED_TIME_S / total, 1),
                peak_rss_gb=round(r["peak_rss_mb"] / 1024, 2),
                worker_peak_rss_gb=(round(r["worker_peak_rss_mb"] / 1024, 2)
                                    if "worker_peak_rss_mb" in r else None),
                # main + every worker's peak: an upper bound of the machine-wide peak
                peak_rss_sum_gb=round(peak_sum / 1024, 2),
                target_8_gb_met=peak_sum <= 8192,
                result_rows_ok=r["result_rows"] == r["result_rows_expected"])
    write_result(_result_name(args), dict(config=args.config, settings=cfg, rows=rows,
                                          summary=summary, generation=generation,
                                          one_batch_vs_upstream=upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
