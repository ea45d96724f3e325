"""Screen-scale pipeline: GCATE and doubly robust LFC over batches of perturbations
(docs/math.md#batch-pipeline).

A screen with hundreds of perturbations is split into batches of perturbations
(``numpy.array_split`` semantics).  Every batch is analysed on the cells of its
perturbations (at most ``max_cells`` of them) plus one control subsample of
``n_ctrl`` cells shared by all batches, so memory and time per batch do not depend on
the number of batches.  Per batch, :func:`causarray.fit_gcate` estimates the latent
confounders ``U_b`` and :func:`causarray.LFC` the doubly robust log fold changes with
``W_b = [X_b | U_b]``, ``W_A,b = [W_A[cells] | U_b]`` and the batch's GCATE size
factors as offset.  The NB dispersion is estimated once, on the control pool.

Our changes to the original's batch mode: GCATE and LFC are interleaved per batch
and each finished batch is committed to a crash-safe cache (:mod:`causarray.cache`)
whose fingerprint covers the data and every setting; a gene without counts in one
batch's cells is reported as non-estimable for that batch instead of aborting; the
result always has a ``trt`` column; sparse counts stay sparse outside the batch being
fitted; batches can run in parallel on any :class:`concurrent.futures.Executor`
(e.g. a Dask cluster), results being gathered and cached by the calling process;
LFC's outcome GLM starts from the batch's GCATE coefficients (same cells, design and
offsets), which saves Newton steps.

Running on a multi-machine Dask cluster
---------------------------------------
Install the same causarray version (with the ``dask`` extra) on every machine, then::

    # scheduler machine                 # each worker machine
    $ dask scheduler                    $ dask worker tcp://SCHEDULER:8786 --nthreads 4

    >>> from dask.distributed import Client
    >>> client = Client("tcp://SCHEDULER:8786")
    >>> df = gcate_lfc_batch(Y, X, A, r, W_A=X_A, batch_size=15, client=client,
    ...                      cache_path="results.h5")

With in-memory input the calling process keeps the input, sends each batch's rows
(sparse stays sparse in transit) to a worker, and commits every returned batch to
``cache_path`` itself, so the cache lives on the caller's file system and no worker
needs shared storage.  With a file as input
(``gcate_lfc_batch('/path/to/shared/screen.h5ad', r=..., client=client)``) the caller
holds no counts: each job carries the file path, the batch's row numbers and the
settings (:class:`causarray.ondisk.RowRef`), and the worker reads its rows itself, so
the file must be readable at the same path on every worker (shared file system or a
local copy per machine); a relative path is made absolute before any job is shipped.
At most (number of worker threads + 1) batches are in flight; a worker needs memory
for one batch.  Killing the caller and rerunning with the same arguments resumes.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    GCATE_COMPAT_KEYWORDS,
    LFC_COMPAT_KEYWORDS,
    as_count_matrix,
    check_assignment,
    check_control,
    check_control_pool,
    check_no_mask_with_complement,
    check_control_size_factors,
    check_covariates,
    check_design_columns,
    check_design_given,
    check_executor_client,
    check_factor_fit,
    check_family,
    check_keywords,
    check_lfc_kwargs,
    check_nb_size,
    check_no_design_with_file,
    check_positive_int,
    check_r,
    check_results_path,
    check_targets,
    check_treatment,
    check_unique_treatment_names,
    check_warm_start,
    parameter_names,
    parse_memory,
)
from ._version import __version__
from .cache import BatchCache, BatchRecord, canonical, content_digest, fingerprint
from .engine.threads import blas_threads as process_blas_threads
from .engine.threads import chunk_threads, one_thread_blas, pass_threads
from .inference import adjust_target_families, bh_adjust, on_target_pairs

logger = logging.getLogger("causarray")

#: What each assignment model makes of a perturbation's shift of the latent state.
DESIGN_READING = {
    "randomized": "a shift of the cells' latent state beyond chance is the perturbation's "
                  "effect and is kept",
    "observational": "the whole shift of the latent state is confounding and is removed",
}

# columns of a non-estimable row (genes without counts, treatments without cells)
_NON_ESTIMABLE = {"tau": np.nan, "std": np.nan, "log2fc": np.nan, "log2fc_se": np.nan,
                  "std_raw": np.nan}
_TEMPLATE_DTYPES = {"rej": np.dtype(np.int64), "estimable": np.dtype(bool),
                    "tested": np.dtype(bool), "n_treated": np.dtype(np.int64),
                    "n_control": np.dtype(np.int64), "var_floored": np.dtype(bool)}
_LFC_RESERVED = ("Y_hat", "pi_hat", "offset", "W", "W_A", "A", "Y")


# ----------------------------------------------------------------------------------
# batch layout
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """Cells and treatments of one batch.

    Attributes
    ----------
    batch : int
        Batch index (0-based).
    trt_idx : ndarray of int
        Treatment columns of ``A`` in this batch (a contiguous chunk).
    ctrl_idx : ndarray of int
        The shared control rows (identical in every batch).
    treated_idx : ndarray of int
        Selected treated rows (at most ``max_cells``), sorted.
    cell_idx : ndarray of int
        Sorted union of ``ctrl_idx`` and ``treated_idx``: the batch's cells.
    n_treated_total : int
        Treated rows of the chunk before the ``max_cells`` cap.
    """

    batch: int
    trt_idx: np.ndarray
    ctrl_idx: np.ndarray
    treated_idx: np.ndarray
    cell_idx: np.ndarray
    n_treated_total: int


def _as_treatments(A):
    """``A`` as an ndarray, or kept as a CSC matrix when sparse (a screen's one-hot A)."""
    if sp.issparse(A):
        return A if A.format == "csc" else sp.csc_matrix(A)
    return np.asarray(A)


def _row_totals(A) -> np.ndarray:
    """Per-cell number of perturbations (dense or sparse A)."""
    return np.asarray(A.sum(axis=1)).ravel()


def number_of_batches(a: int, batch_size: int = 10, n_batches: int | None = None) -> int:
    """B = ceil(a / batch_size) unless ``n_batches`` is given, clamped to [1, a]."""
    batch_size = check_positive_int("batch_size", batch_size, allow_none=False)
    n_batches = check_positive_int("n_batches", n_batches, allow_none=True)
    B = math.ceil(a / batch_size) if n_batches is None else n_batches
    return int(min(max(B, 1), a))


def pool_candidates(A, control: str = "non-targeting") -> np.ndarray:
    """Rows the shared control pool is drawn from: the cells without any perturbation
    (``'non-targeting'``), or every cell (``'complement'``: in a high-MOI screen a
    perturbation's controls are the cells that do not carry it, a random subsample of
    which is shared by all batches)."""
    A = _as_treatments(A)
    if control == "complement":
        return np.arange(A.shape[0])
    return np.flatnonzero(_row_totals(A) == 0)


def control_pool(A: np.ndarray, n_ctrl: int | None = 2000, random_state: int = 0,
                 control: str = "non-targeting") -> np.ndarray:
    """The shared control subsample: rows of :func:`pool_candidates` (the all-zero rows of
    ``A``, or every row with ``control='complement'``), at most ``n_ctrl`` of them.

    Drawn without replacement with ``numpy.random.default_rng(random_state)`` and sorted.
    """
    n_ctrl = check_positive_int("n_ctrl", n_ctrl, allow_none=True)
    ctrl = pool_candidates(A, control)
    check_control_pool(ctrl.size)
    if n_ctrl is not None and ctrl.size > n_ctrl:
        rng = np.random.default_rng(random_state)
        ctrl = np.sort(rng.choice(ctrl, size=n_ctrl, replace=False))
    return ctrl


def plan_batches(A, batch_size: int = 10, n_batches: int | None = None,
                 max_cells: int | None = 2000, n_ctrl: int | None = 2000,
                 random_state: int = 0, control: str = "non-targeting") -> list[BatchPlan]:
    """Split the treatments into batches and choose each batch's cells
    (docs/math.md#batch-pipeline).

    Parameters
    ----------
    A : (n, a) 0/1 treatment matrix (controls are all-zero rows).
    batch_size : target number of treatments per batch; B = ceil(a / batch_size).
    n_batches : number of batches (overrides ``batch_size``); B is clamped to [1, a].
    max_cells : cap on the *treated* cells of a batch (drawn with seed
        ``random_state + b``); the control pool comes on top.  None: no cap.
    n_ctrl : size of the control pool shared by all batches (seed ``random_state``).
    random_state : seed of the subsampling.
    control : 'non-targeting' (the pool is drawn from the cells without any
        perturbation) or 'complement' (from every cell; a perturbation is then compared
        with the pool's cells that do not carry it, see :func:`complement_mask`).

    Returns
    -------
    list of BatchPlan
        Treatment chunks with ``numpy.array_split`` sizes (the first ``a mod B`` chunks
        one larger).
    """
    A = _as_treatments(A)
    a = A.shape[1]
    max_cells = check_positive_int("max_cells", max_cells, allow_none=True)
    B = number_of_batches(a, batch_size, n_batches)
    ctrl = control_pool(A, n_ctrl, random_state, control)
    plans = []
    for b, chunk in enumerate(np.array_split(np.arange(a), B)):
        treated = np.flatnonzero(_row_totals(A[:, chunk]) > 0)
        n_total = treated.size
        if max_cells is not None and treated.size > max_cells:
            rng = np.random.default_rng(random_state + b)
            treated = np.sort(rng.choice(treated, size=max_cells, replace=False))
        cells = np.union1d(ctrl, treated)
        plans.append(BatchPlan(b, chunk, ctrl, treated, cells, int(n_total)))
    return plans


#: Estimated peak bytes per (cell x gene) entry of a batch being fitted: the float64
#: counts plus about five float64 working arrays of GCATE and LFC (measured: one batch of
#: 4,000 cells x 8,563 genes peaks 1.1 GB above its input, about 32 bytes per entry).
BYTES_PER_ENTRY = 48



def layout_for_budget(A, n_genes: int, memory_budget: Any = "2GB", batch_size: int = 15,
                      bytes_per_entry: int = BYTES_PER_ENTRY,
                      control: str = "non-targeting") -> dict:
    """Batch layout that uses every cell while each batch fits a memory budget.

    A batch holds all control cells and every treated cell of its perturbations; its
    footprint is estimated as ``cells x n_genes x bytes_per_entry``.  The number of
    perturbations per batch is the largest value up to ``batch_size`` for which every
    batch fits.  Only when one perturbation with all the controls does not fit are cells
    left out: the control pool is cut to what fits (and, if needed, the treated cells).

    Parameters
    ----------
    A : (n, a) 0/1 treatment matrix (controls are all-zero rows).
    n_genes : int
    memory_budget : bytes or a string such as ``'2GB'``
    batch_size : int
        Largest number of perturbations per batch.
    bytes_per_entry : int
    control : 'non-targeting' or 'complement' (the pool is drawn from every cell; a
        batch's cells are the pool plus its perturbations' carriers).

    Returns
    -------
    dict
        ``batch_size``, ``n_ctrl`` and ``max_cells`` for :func:`plan_batches` (``None``:
        every cell), and ``cells_per_batch``, the largest batch's cell count.
    """
    budget = parse_memory(memory_budget)
    batch_size = check_positive_int("batch_size", batch_size, allow_none=False)
    A = _as_treatments(A)
    a = A.shape[1]
    n_ctrl_all = int(pool_candidates(A, control).size)
    per_pert = np.asarray(A.sum(axis=0)).ravel()
    cap_cells = max(1, budget // max(1, int(n_genes) * int(bytes_per_entry)))
    if control == "complement":
        return _complement_layout(A, cap_cells, batch_size, memory_budget)
    for b in range(min(batch_size, a), 0, -1):
        chunks = np.array_split(np.arange(a), number_of_batches(a, b))
        largest = max(int(np.count_nonzero(_row_totals(A[:, c]) > 0)) for c in chunks)
        if n_ctrl_all + largest <= cap_cells:
            return dict(batch_size=b, n_ctrl=None, max_cells=None,
                        cells_per_batch=n_ctrl_all + largest)
    largest = int(per_pert.max()) if a else 0
    n_ctrl = max(1, min(n_ctrl_all, cap_cells - largest, cap_cells // 2))
    max_cells = None if largest <= cap_cells - n_ctrl else max(1, cap_cells - n_ctrl)
    logger.warning("memory_budget=%s: one perturbation with all %d control cells does not fit "
                   "(about %d cells x %d genes fit); using %d control cells%s", memory_budget,
                   n_ctrl_all, cap_cells, n_genes, n_ctrl,
                   "" if max_cells is None else f" and at most {max_cells} treated cells")
    return dict(batch_size=1, n_ctrl=int(n_ctrl), max_cells=max_cells,
                cells_per_batch=int(n_ctrl + min(largest, max_cells or largest)))


def _complement_layout(A, cap_cells: int, batch_size: int, memory_budget: Any) -> dict:
    """:func:`layout_for_budget` for ``control='complement'`` (the pool is drawn from every
    cell).  When every cell fits, each batch is the whole screen; otherwise the pool is
    half of what fits and the rest holds the batch's carriers, with as many
    perturbations per batch (at most ``batch_size``) as fit."""
    n, a = A.shape
    if n <= cap_cells:
        return dict(batch_size=min(batch_size, a), n_ctrl=None, max_cells=None,
                    cells_per_batch=int(n))
    n_pool = max(1, cap_cells // 2)
    room = cap_cells - n_pool
    for b in range(min(batch_size, a), 0, -1):
        chunks = np.array_split(np.arange(a), number_of_batches(a, b))
        largest = max(int(np.count_nonzero(_row_totals(A[:, c]) > 0)) for c in chunks)
        if largest <= room or b == 1:
            break
    max_cells = None if largest <= room else int(room)
    logger.warning("memory_budget=%s: the %d cells do not fit one batch (about %d do); each "
                   "batch compares its perturbations' carriers with a shared random pool of "
                   "%d cells%s", memory_budget, n, cap_cells, n_pool,
                   "" if max_cells is None else f" and at most {max_cells} carriers")
    return dict(batch_size=int(b), n_ctrl=int(n_pool), max_cells=max_cells,
                cells_per_batch=int(n_pool + min(largest, room)))


def log_cells_left_out(A, plans: list[BatchPlan], n_ctrl, max_cells,
                       control: str = "non-targeting") -> tuple[int, int]:
    """Log (warning) how many control and treated cells the caps leave out.

    Returns
    -------
    (controls left out, treated cells left out)
    """
    A = _as_treatments(A)
    n_ctrl_all = int(pool_candidates(A, control).size)
    ctrl_out = n_ctrl_all - int(plans[0].ctrl_idx.size) if plans else 0
    trt_total = sum(pl.n_treated_total for pl in plans)
    trt_out = trt_total - sum(int(pl.treated_idx.size) for pl in plans)
    if ctrl_out or trt_out:
        logger.warning("the caps n_ctrl=%s and max_cells=%s leave out %d of %d control cells "
                       "and %d of %d treated cells; pass n_ctrl=None, max_cells=None to use "
                       "every cell", n_ctrl, max_cells, ctrl_out, n_ctrl_all, trt_out,
                       trt_total)
    return ctrl_out, trt_out


def _layout_digest(plans: list[BatchPlan]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for pl in plans:
        h.update(np.asarray(pl.trt_idx, np.int64).tobytes() + b"|")
        h.update(np.asarray(pl.cell_idx, np.int64).tobytes() + b"#")
    return h.hexdigest()


# ----------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------
@dataclass
class _Inputs:
    Y: Any                 # ndarray or csr_matrix (never densified as a whole)
    X: np.ndarray
    A: np.ndarray
    W_A: np.ndarray | None
    gene_names: np.ndarray
    trt_names: list


def _prepare_inputs(Y, X, A, W_A=None) -> _Inputs:
    from .ondisk import H5Counts

    check_design_given(X, A)
    if isinstance(Y, H5Counts):          # validated by its streamed pass (ondisk.open_screen)
        Yv, genes = Y, Y.gene_names
    else:
        Yv, genes = as_count_matrix(Y, "Y")
    p = Yv.shape[1]
    Av, trt = check_treatment(A, Yv.shape, keep_sparse=True)
    Xv, _ = check_covariates(X, Yv.shape, "X")
    check_design_columns(Xv)
    W_Av = None if W_A is None else check_covariates(W_A, Yv.shape, "W_A")[0]
    genes = np.asarray([str(g) for g in genes] if genes is not None
                       else [f"gene_{j}" for j in range(p)], dtype=object)
    trt = [str(t) for t in trt] if trt is not None else [str(k) for k in range(Av.shape[1])]
    check_unique_treatment_names(trt)
    return _Inputs(Yv, Xv, Av, W_Av, genes, trt)


def _warn_multi_perturbation(A: np.ndarray, control: str = "non-targeting") -> None:
    if control == "complement":      # several perturbations per cell is the design
        return
    m = int(np.count_nonzero(_row_totals(A) > 1))
    if m:
        warnings.warn(
            f"{m} cell(s) carry more than one perturbation; inside a batch such a cell is "
            "analysed as if it carried only that batch's perturbation(s), which contaminates "
            "the within-batch comparison. Remove those cells or use n_batches=1.",
            RuntimeWarning, stacklevel=3)


def _digest_counts(Y) -> str:
    """Cache digest of the counts (streamed for on-disk counts)."""
    if hasattr(Y, "content_digest"):
        return Y.content_digest()
    return content_digest(Y)


def _dense_rows(Y, rows: np.ndarray) -> np.ndarray:
    """Rows of Y as a dense float64 block (sparse input is densified only here)."""
    block = Y[rows]
    if sp.issparse(block):
        return block.toarray().astype(np.float64, copy=False)
    return np.asarray(block, dtype=np.float64)


def _subset_offset(offset, rows: np.ndarray):
    if offset is True or offset is False or offset is None:
        return offset
    return np.asarray(offset, dtype=float).ravel()[rows]


def shared_dispersion(Y, X: np.ndarray, ctrl_idx: np.ndarray, offset=True,
                      pool_counts: np.ndarray | None = None) -> np.ndarray:
    """NB size per gene estimated once on the control pool (design X,
    docs/math.md#which-cells-estimate-the-dispersion).

    Parameters
    ----------
    Y : (n, p) counts (dense or sparse; only the control rows are densified).
    X : (n, d) covariates including the intercept.
    ctrl_idx : rows of the control pool.
    offset : True (log ``comp_size_factor`` of the control rows), False/None (none) or
        an (n,) array of log size factors (subset to the controls).
    pool_counts : the control rows of Y, dense, when the caller has read them already.

    Returns
    -------
    ndarray, shape (p,)
    """
    from .glm import estimate_dispersion
    from .preprocessing import comp_size_factor

    Yc = _dense_rows(Y, ctrl_idx) if pool_counts is None else pool_counts
    if offset is True:
        s = np.asarray(comp_size_factor(Yc), dtype=float)
        check_control_size_factors(s)
        off = np.log(s)
    elif offset is False or offset is None:
        off = None
    else:
        off = _subset_offset(offset, ctrl_idx)
    return np.asarray(estimate_dispersion(Yc, np.asarray(X)[ctrl_idx], offset=off), dtype=float)


# ----------------------------------------------------------------------------------
# one batch (runs in the calling process or on an executor's worker)
# ----------------------------------------------------------------------------------
@dataclass
class _BatchJob:
    batch: int
    Y: Any                       # the batch's rows, all genes (dense or CSR)
    X: np.ndarray
    A: np.ndarray                # the chunk's columns
    W_A: np.ndarray | None
    offset: Any
    disp: np.ndarray | None
    gene_names: np.ndarray
    trt_names: list
    r: int
    family: str
    gcate_kwargs: dict
    lfc_kwargs: dict | None      # None: GCATE only
    U_init: np.ndarray | None
    ctrl_pos: np.ndarray         # positions of the shared controls among the batch rows
    keep_fits: bool
    blas_threads: int | None = None   # chunk threads of the batch, whichever process runs it
    save_nuisances: bool = False  # return LFC's nuisances (gcate_lfc_batch(save_nuisances))
    pool_pos: np.ndarray | None = None   # fit='screen': the controls' positions in the pool


def _check_blas_threads(value) -> int | None:
    if value is None:
        return process_blas_threads()
    return check_positive_int("blas_threads", value, allow_none=True)


def _lfc_kwargs_rows(lk: dict, rows: np.ndarray, trt_idx: np.ndarray) -> dict:
    """LFC keyword arguments restricted to a batch's cells and treatments."""
    out = dict(lk)
    if out.get("mask") is not None:
        out["mask"] = np.asarray(out["mask"], bool)[rows][:, trt_idx]
    return out


def _lfc_kwargs_fit(lk: dict, expressed: np.ndarray, fitted: np.ndarray) -> dict:
    """... and to the genes with counts and the treatments with cells."""
    out = dict(lk)
    if out.get("disp_glm") is not None and np.ndim(out["disp_glm"]) == 1:
        out["disp_glm"] = np.asarray(out["disp_glm"], float)[expressed]
    if out.get("mask") is not None:
        out["mask"] = np.asarray(out["mask"], bool)[:, fitted]
    return out


def batch_frame(df_fit: pd.DataFrame | None, gene_names: np.ndarray, trt_names: list,
                expressed: np.ndarray, fitted: np.ndarray, batch: int) -> pd.DataFrame:
    """Result rows of one batch over all genes and all of its treatments.

    Rows of ``df_fit`` (LFC on the expressed genes and the treatments with cells,
    treatment-major) are placed in the full (treatment x gene) grid; the other rows are
    non-estimable: ``tau``, ``std``, ``std_raw``, ``log2fc``, ``log2fc_se``, ``stat`` and
    p-values NaN, ``estimable``, ``tested`` and ``var_floored`` False, arm means and
    count sums 0 for genes without counts (arm sizes those of the treatment) and NaN for
    treatments without cells (arm sizes 0).
    """
    from .dr import RESULT_COLUMNS

    p, a_b = len(gene_names), len(trt_names)
    n_expr, n_fit = int(expressed.sum()), int(fitted.sum())
    cols = list(df_fit.columns) if df_fit is not None else list(RESULT_COLUMNS)
    cols = [c for c in cols if c not in ("trt", "batch")]
    if df_fit is not None:
        if len(df_fit) != n_fit * n_expr:
            raise RuntimeError(f"LFC returned {len(df_fit)} rows for {n_fit} treatments x "
                               f"{n_expr} genes")
        if "gene_names" in df_fit and n_expr and \
                not np.array_equal(df_fit["gene_names"].to_numpy()[:n_expr],
                                   gene_names[expressed]):
            raise RuntimeError("LFC returned genes in an unexpected order")
    out = {}
    for c in cols:
        if c == "gene_names":
            out[c] = np.tile(gene_names, a_b)
            continue
        v = df_fit[c].to_numpy() if df_fit is not None else None
        dtype = v.dtype if v is not None else _TEMPLATE_DTYPES.get(c, np.dtype(np.float64))
        if c in _NON_ESTIMABLE:
            fill = _NON_ESTIMABLE[c]
        elif dtype == np.dtype(bool):
            fill = False
        elif np.issubdtype(dtype, np.integer):
            fill = 0
        elif np.issubdtype(dtype, np.floating):
            fill = np.nan
        else:
            dtype, fill = np.dtype(object), None
        full = np.full((a_b, p), fill, dtype=dtype)
        if v is not None:
            full[np.ix_(fitted, expressed)] = v.reshape(n_fit, n_expr)
        if c in ("mean_control", "mean_treated", "count_treated", "count_control"):
            full[np.ix_(fitted, ~expressed)] = 0.0
        if c in ("n_treated", "n_control") and v is not None and n_expr:
            # arm sizes do not depend on the gene: copy them to the genes without counts
            full[np.ix_(fitted, ~expressed)] = v.reshape(n_fit, n_expr)[:, :1]
        out[c] = full.ravel()
    out["trt"] = np.repeat(np.asarray(trt_names, dtype=object), p)
    out["batch"] = np.full(a_b * p, batch, dtype=np.int64)
    return pd.DataFrame(out, columns=cols + ["trt", "batch"])


def _lfc_from_gcate(kw: dict, res_2: dict, X: np.ndarray, a: int) -> None:
    """LFC's keywords that come from the batch's GCATE fit, unless the caller gave them:
    per-gene-fold designs, the genes to re-centre on, the shift's variance and the
    outcome GLM's start (GCATE's NB fit, whose means also give the MoM sizes)."""
    if "W_gene_folds" not in kw and "U_gene_folds" in res_2:
        kw["W_gene_folds"] = (res_2["gene_fold"],
                              [np.hstack([X, U_f]) for U_f in res_2["U_gene_folds"]])
    if "recenter_genes" not in kw and "unaffected" in res_2:
        kw["recenter_genes"] = np.asarray(res_2["unaffected"], dtype=bool)
    if "shift_variance" not in kw and "shift_var" in res_2:
        kw["shift_variance"] = res_2["shift_var"]
    if "outcome_init" not in kw:
        kw["outcome_init"] = outcome_start(res_2, X.shape[1], a)
        kw.setdefault("outcome_size_at_init", True)


def shift_summary(res_2: dict, d: int) -> dict:
    """Per perturbation of a batch: what GCATE's stage 2 made of its latent shift.

    ``d2`` and ``pvalue``: the chance-imbalance statistic and its p-value (NaN under
    ``'observational'``); ``adjusted``: the shift was removed as confounding;
    ``tau_change``: the median over genes of ``|gamma_j' alpha_k|``, how far the
    adjustment moved the LFCs (0 when nothing was adjusted); ``agreement``: the cosine
    between the perturbation's raw shift and the batch's mean shift (factors are
    comparable only within a batch), for :func:`design_warning`.  Not called for a fit
    without factors (r = 0: no shift).
    """
    alpha = np.asarray(res_2["alpha"], float)
    a, r = alpha.shape
    Gamma = np.asarray(res_2["B_Gamma"], float)[:, d + a:]
    raw = np.asarray(res_2["alpha_hat"], float)
    mean = raw.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        agree = raw @ mean / (np.linalg.norm(raw, axis=1) * np.linalg.norm(mean))
    return dict(d2=np.asarray(res_2["shift_stat"], float),
                pvalue=np.asarray(res_2["shift_pvalue"], float),
                adjusted=np.asarray(res_2["shift_adjusted"], bool),
                tau_change=np.median(np.abs(Gamma @ alpha.T), axis=0) if r else np.zeros(a),
                agreement=np.nan_to_num(agree) if r else np.zeros(a))


#: A randomized screen is flagged when more than this share of perturbations shift the
#: latent state beyond chance (1 % expected): see design_warning.
DESIGN_WARNING_SHARE = 0.5


def shift_table(plans: list[BatchPlan], records: dict, trt_names: list) -> pd.DataFrame:
    """One row per perturbation: ``trt, batch, d2, pvalue, adjusted, tau_change,
    agreement`` from the batches' stored shift summaries (rows of perturbations without
    cells, or of batches fitted without factors, are NaN / False)."""
    rows = []
    for pl in plans:
        arr = records[pl.batch].arrays if pl.batch in records else {}
        fitted = np.asarray(arr.get("shift_trt", np.zeros(0, int)), int)
        pos = {int(j): i for i, j in enumerate(fitted)}      # position within the batch
        for j, k in enumerate(pl.trt_idx):
            i = pos.get(j)
            rows.append(dict(
                trt=trt_names[k], batch=pl.batch,
                **{c: (arr[f"shift_{c}"][i] if i is not None else np.nan)
                   for c in ("d2", "pvalue", "tau_change", "agreement")},
                adjusted=bool(arr["shift_adjusted"][i]) if i is not None else False))
    return pd.DataFrame(rows, columns=["trt", "batch", "d2", "pvalue", "adjusted",
                                       "tau_change", "agreement"])


def design_warning(shift: pd.DataFrame, assignment: str, level: float = 0.01) -> str | None:
    """The warning of a randomized run whose perturbations mostly shift the latent state
    beyond chance: under random assignment 1 % would, so most of them means selection on
    cell state, or controls that differ from every perturbed cell (then the shifts share
    a direction, which the message says).  None when the screen looks randomized."""
    if assignment != "randomized" or shift.empty or shift["pvalue"].isna().all():
        return None
    beyond = shift["pvalue"] < level
    if float(beyond.mean()) <= DESIGN_WARNING_SHARE:
        return None
    agree = float(shift.loc[beyond, "agreement"].median())
    how = "in a common direction" if agree > DESIGN_WARNING_SHARE else "each its own way"
    return (f"{int(beyond.sum())} of {len(shift)} perturbations shift the cells' latent state "
            f"beyond chance (p < {level:g}; {level:.0%} expected under random assignment), "
            f"{how} (median agreement {agree:.2f}): under assignment='randomized' these "
            "shifts are kept as effects. If the perturbed cells were selected on their "
            "state, or the controls differ from every perturbed cell (unassigned cells "
            "rather than non-targeting ones), rerun with assignment='observational' "
            "(--assignment observational)")


def outcome_start(res_2: dict, d: int, a: int) -> np.ndarray | None:
    """GCATE's coefficients as a warm start of LFC's outcome GLM on ``[X | U | A]``.

    ``res_2['B_Gamma']`` holds ``[B_X | B_A | Gamma]`` for the design ``[X | A | U]`` with
    ``U = res_2['U']`` and the offsets of ``res_2['kwargs_glm']['size_factor']``: the GLM
    that LFC fits on ``W = [X | U]`` with treatments ``A`` (at GCATE's shared dispersion
    instead of LFC's own).  Returns the columns reordered to ``[B_X | Gamma | B_A]``, or
    None when they are not usable (wrong shape, non-finite).
    """
    B = np.asarray(res_2.get("B_Gamma"), dtype=float)
    r = np.shape(res_2.get("U"))[1] if np.ndim(res_2.get("U")) == 2 else -1
    if B.ndim != 2 or B.shape[1] != d + a + r or not np.all(np.isfinite(B)):
        return None
    return np.hstack([B[:, :d], B[:, d + a:], B[:, d:d + a]])


def propensity_design(X: np.ndarray, W_A: np.ndarray | None, U: np.ndarray,
                      assignment: str) -> np.ndarray:
    """Covariates of the propensity models of one batch.

    ``'randomized'`` (CRISPR screens): the assignment probability depends only on the
    design, i.e. on the observed pre-treatment covariates ``X``.  Library size and the
    expression-derived factors ``U`` are measured after the perturbation and can be
    moved by it (HS2 → HBE1 on the Schraivogel panel lowers the panel's library size);
    a propensity model on such a mediator reweights the treated cells by their
    response, biasing the AIPW estimate towards 0 and inflating its variance
    (``docs/dr.md``).  ``'observational'``: ``[W_A | U]`` (or ``[X | U]``), the
    confounders of the assignment.
    """
    if assignment == "randomized":
        return X
    return np.hstack([W_A, U]) if W_A is not None else np.hstack([X, U])


def _run_batch(job: _BatchJob, screen=None) -> dict:
    """:func:`_fit_batch` on the job's threads, with a one-thread BLAS.

    The summation order inside BLAS depends on its thread count, and the iterative fits
    carry such rounding differences on.  A batch therefore runs its BLAS on one thread and
    spends its ``blas_threads`` on the gene chunks of its passes
    (:mod:`causarray.engine.threads`), which also puts their elementwise work on every
    core.  Its result is the same whether it runs serially, on threads, in worker
    processes or on Dask (whose workers start with one BLAS thread), and on any number
    of threads.
    """
    if job.blas_threads is None:
        return _fit_batch(job, screen)
    with one_thread_blas(), chunk_threads(job.blas_threads):
        return _fit_batch(job, screen)


def _batch_gcate(job: _BatchJob, Y_fit: np.ndarray, A_fit: np.ndarray, expressed: np.ndarray,
                 screen) -> tuple[dict, dict]:
    """The batch's GCATE fit: per batch (``fit_gcate``), or at the screen stage's
    loadings (:func:`causarray.screen_stage.fit_gcate_at_loadings`) when ``screen``
    is given."""
    from .gcate import fit_gcate

    kw = dict(verbose=False, disp_family="poisson")
    kw.update(job.gcate_kwargs)
    if screen is not None:
        from .screen_stage import fit_gcate_at_loadings, stage2_options

        return fit_gcate_at_loadings(Y_fit, job.X, A_fit, screen, job.ctrl_pos, job.pool_pos,
                                     offset=job.offset, opts=stage2_options(job.family, kw),
                                     es=kw.get("kwargs_es_1"), ls=kw.get("kwargs_ls_2"))
    kw.update(family=job.family, offset=job.offset,
              disp_glm=None if job.disp is None else job.disp[expressed])
    if job.U_init is not None:
        kw["A_init"] = np.hstack([job.X, A_fit, job.U_init])
    return fit_gcate(Y_fit, job.X, A_fit, job.r, **kw)


def _fit_batch(job: _BatchJob, screen=None) -> dict:
    """GCATE (and LFC unless ``job.lfc_kwargs`` is None) on one batch; ``screen``: the
    screen stage whose loadings the batch's GCATE keeps (``fit='screen'``)."""
    from .dr import LFC

    t0 = time.perf_counter()
    n_cells = int(job.Y.shape[0])
    if hasattr(job.Y, "read"):                     # on-disk input: this process reads it
        job.Y = job.Y.read()
    t_read = time.perf_counter() - t0
    Yb = job.Y.toarray() if sp.issparse(job.Y) else job.Y
    Yb = np.asarray(Yb, dtype=np.float64)
    job.Y = None                                   # the only dense copy is Yb from here on
    # with a screen stage, genes without counts in the pool have no control mean
    expressed = (np.asarray(Yb.sum(axis=0) > 0) if screen is None
                 else np.asarray(screen.genes, bool).copy())
    fitted = np.asarray(job.A.sum(axis=0) > 0)
    if not fitted.all():
        missing = [job.trt_names[k] for k in np.flatnonzero(~fitted)]
        warnings.warn(f"batch {job.batch}: treatment(s) {missing[:5]} have no cells; "
                      "they are reported as non-estimable", RuntimeWarning, stacklevel=2)
    if not expressed.all():
        logger.info("batch %d: %d gene(s) without counts in the batch's cells are reported "
                    "as non-estimable", job.batch, int((~expressed).sum()))
    Y_fit = Yb if expressed.all() else Yb[:, expressed]
    del Yb
    A_fit = job.A[:, fitted]
    names_fit = [job.trt_names[k] for k in np.flatnonzero(fitted)]
    res_1 = res_2 = None
    if fitted.any() and expressed.any():
        res_1, res_2 = _batch_gcate(job, Y_fit, A_fit, expressed, screen)
    t_gcate = time.perf_counter() - t0

    frame = nuisances = None
    if job.lfc_kwargs is not None:
        df_fit = None
        if res_2 is not None:
            U = np.array(res_2["U"], dtype=float)
            log_s = np.log(np.asarray(res_2["kwargs_glm"]["size_factor"], dtype=float))
            W = np.hstack([job.X, U])
            W_A = propensity_design(job.X, job.W_A, U, res_2.get("assignment", "randomized"))
            kw = dict(verbose=False)
            kw.update(_lfc_kwargs_fit(job.lfc_kwargs, expressed, fitted))
            kw.update(family=job.family, offset=log_s)
            _lfc_from_gcate(kw, res_2, job.X, A_fit.shape[1])
            Y_df = pd.DataFrame(Y_fit, columns=list(job.gene_names[expressed]), copy=False)
            A_df = pd.DataFrame(A_fit, columns=names_fit)
            df_fit, est = LFC(Y_df, W, A_df, W_A, **kw)
            del Y_df
            if job.save_nuisances:
                y_hat = est["Y_hat"]
                nuisances = dict(
                    Y_hat=(y_hat.to_array() if hasattr(y_hat, "to_array")
                           else np.asarray(y_hat)).astype(np.float32),
                    pi_hat=est["pi_hat"], pi_hat_raw=est["pi_hat_raw"], offset=log_s, U=U,
                    pert_names=names_fit, gene_names=list(job.gene_names[expressed]),
                    shift_variance=kw.get("shift_variance"),
                    recenter_genes=kw.get("recenter_genes"))
            del est
        frame = batch_frame(df_fit, job.gene_names, job.trt_names, expressed, fitted,
                            job.batch)
    U = None if res_2 is None else np.array(res_2["U"], dtype=float)
    out = dict(batch=job.batch, frame=frame, expressed=np.flatnonzero(expressed),
               fitted=np.flatnonzero(fitted), U=U,
               U_ctrl=None if U is None else U[job.ctrl_pos], n_cells=n_cells,
               n_perts=int(job.A.shape[1]), t_gcate=t_gcate, t_read=t_read,
               t_batch=time.perf_counter() - t0,
               shift=None if res_2 is None or "alpha_hat" not in res_2
               else shift_summary(res_2, job.X.shape[1]))
    if nuisances is not None:
        out["nuisances"] = nuisances
    if job.keep_fits:
        out.update(res_1=res_1, res_2=res_2)
    return out


def complement_mask(A_b: np.ndarray, in_pool: np.ndarray) -> np.ndarray:
    """Each perturbation's comparison cells in a ``control='complement'`` batch
    (docs/math.md#high-moi): its carriers and the shared pool's cells without it.

    The batch also holds the carriers of its other perturbations; they serve the factor
    model and the outcome GLM, but they are not a random sample of the cells without
    perturbation k (each was drawn for carrying another guide), so they stay out of
    k's control arm.  With the whole screen as pool every cell is in every comparison.
    """
    return in_pool[:, None] | (np.asarray(A_b) != 0)


def _make_job(data: _Inputs, plan: BatchPlan, *, r, family, offset, disp, gcate_kwargs,
              lfc_kwargs, U_ctrl_prev, keep_fits, blas_threads=None,
              save_nuisances=False, control: str = "non-targeting",
              pool: np.ndarray | None = None) -> _BatchJob:
    rows = plan.cell_idx
    ctrl_pos = np.searchsorted(rows, plan.ctrl_idx)
    U_init = None
    if U_ctrl_prev is not None:
        U_init = np.zeros((rows.size, U_ctrl_prev.shape[1]))
        U_init[ctrl_pos] = U_ctrl_prev
    if sp.issparse(data.A):      # CSC: the chunk's columns, then the batch's rows
        A_b = data.A[:, plan.trt_idx][rows].toarray()
    else:
        A_b = data.A[np.ix_(rows, plan.trt_idx)]
    lk = None if lfc_kwargs is None else _lfc_kwargs_rows(lfc_kwargs, rows, plan.trt_idx)
    if lk is not None and control == "complement":
        in_pool = np.zeros(rows.size, bool)
        in_pool[ctrl_pos] = True
        lk["mask"] = complement_mask(A_b, in_pool)
    Y_b = data.Y.ref(rows) if hasattr(data.Y, "ref") else data.Y[rows]
    return _BatchJob(
        batch=plan.batch, Y=Y_b, X=data.X[rows], A=A_b,
        W_A=None if data.W_A is None else data.W_A[rows], offset=_subset_offset(offset, rows),
        disp=disp, gene_names=data.gene_names, trt_names=[data.trt_names[k] for k in plan.trt_idx],
        r=r, family=family, gcate_kwargs=gcate_kwargs, lfc_kwargs=lk, U_init=U_init,
        ctrl_pos=ctrl_pos, keep_fits=keep_fits, blas_threads=blas_threads,
        save_nuisances=save_nuisances,
        pool_pos=None if pool is None else np.searchsorted(pool, plan.ctrl_idx))


# ----------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------
def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class _Progress:
    """One tqdm bar over the whole screen.

    The bar counts batches (restored ones count as done from the start); its postfix
    shows the cells per second of this run (cells of the finished batches over the
    wall time since the bar started, so parallel batches add up), the last batch's
    time, the running average per batch and the ETA of the remaining batches.
    """

    def __init__(self, total: int, done: int, verbose: bool, desc: str, width: int = 1):
        from tqdm.auto import tqdm

        self.total, self.done, self.width = total, done, max(1, width)
        self.times: list[float] = []
        self.cells = 0
        self.t_start = time.perf_counter()
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="batch", disable=not verbose)

    def rate(self) -> float:
        """Cells per second of the batches finished by this run."""
        wall = time.perf_counter() - self.t_start
        return self.cells / wall if wall > 0 else 0.0

    def update(self, batch: int, n_perts: int, n_cells: int, t: float) -> None:
        self.times.append(t)
        self.done += 1
        self.cells += int(n_cells)
        wall = time.perf_counter() - self.t_start
        avg = float(np.mean(self.times))
        # wall time per batch of this run already includes the parallel width
        per_batch = wall / len(self.times) if len(self.times) >= self.width and wall > 0 \
            else avg / self.width
        eta = _fmt_duration(per_batch * (self.total - self.done))
        rate = self.rate()
        self.bar.set_postfix_str(f"{rate:,.0f} cells/s, last {t:.1f}s, avg {avg:.1f}s/batch, "
                                 f"ETA {eta}")
        self.bar.update(1)
        logger.info("Batch %d/%d: %d perts, %d cells, %.1fs (%.0f cells/s, avg %.1fs/batch, "
                    "ETA %s)", batch + 1, self.total, n_perts, n_cells, t, rate, avg, eta)

    def skip(self) -> None:
        self.done += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------
# the screen stage (fit='screen')
# ----------------------------------------------------------------------------------
def screen_fit_obstacles(r: int, control: str, plans: list[BatchPlan], A) -> list[str]:
    """Why the screen-level estimator (``fit='screen'``) does not apply to a run, as
    phrases (empty when it does): it needs factors, one shared pool of cells without
    perturbation, and at most one perturbation per cell (one-hot treatments)."""
    reasons = []
    if r == 0:
        reasons.append("r > 0")
    if control != "non-targeting":
        reasons.append("control='non-targeting'")
    elif any(not np.array_equal(pl.ctrl_idx, plans[0].ctrl_idx) for pl in plans[1:]):
        reasons.append("one control pool shared by every batch")
    if np.any(_row_totals(A) > 1):
        reasons.append("one perturbation per cell")
    return reasons


#: fewest genes for which fit='auto' fits the control pool once per screen (a
#: transcriptome-scale panel; see resolve_factor_fit)
SCREEN_STAGE_MIN_GENES = 1000


def resolve_factor_fit(fit: str, obstacles: list[str], assignment: str, p: int, r: int,
                       lk: dict | None = None) -> str:
    """``'screen'`` or ``'per_batch'`` for ``gcate_lfc_batch(fit=)``, logged; with
    ``'screen'`` the LFC keywords ``lk`` get ``outcome_steps=1`` unless they set it.

    ``'auto'`` takes the screen-level estimator where it applies (no ``obstacles``),
    the design is ``'randomized'`` and the panel is a transcriptome-scale one
    (``p >= SCREEN_STAGE_MIN_GENES`` and ``p >= 100 r``, the gene-fold boundary of
    :func:`causarray.gcate.resolve_gene_folds`), and the original per-batch fit
    otherwise: on the confounded simulations under ``'observational'`` the screen-level
    fit's FDR was higher (0.043-0.078 against 0.036-0.050), and on targeted panels,
    whose genes are chosen around the perturbations, its calls were slightly weaker
    (Schraivogel, 72 genes, r = 3: effect / naive 0.81 against 0.89; Papalexi, 299
    genes, r = 1: 547 discoveries against 553, fake type-I 0.049 against 0.047) while
    the per-batch fit costs little there (``docs/math.md#screen-stage``).
    """
    from .gcate import GENE_FOLD_PANEL

    check_factor_fit(fit, obstacles)
    if fit == "auto":
        large = p >= max(SCREEN_STAGE_MIN_GENES, GENE_FOLD_PANEL * r)
        fit = "screen" if not obstacles and assignment == "randomized" and large \
            else "per_batch"
    logger.info("factor model: fit=%r%s", fit, f" ({', '.join(obstacles)} not met)"
                if obstacles and fit == "per_batch" else "")
    if fit == "screen" and lk is not None:
        lk.setdefault("outcome_steps", 1)
    return fit


def _screen_store(cache_path) -> Path | None:
    """The screen stage's file beside a batch cache (``<cache>.screen.npz``)."""
    return None if cache_path is None else Path(f"{cache_path}.screen.npz")


def _remove_screen_store(cache_path) -> None:
    """Delete the screen stage's file, and temporaries of killed writes, beside a cache."""
    path = _screen_store(cache_path)
    for f in path.parent.glob(f"{path.name}*"):
        f.unlink(missing_ok=True)


def _load_screen_stage(path: Path | None, fp: str):
    """The stored screen stage of this run (same fingerprint), or None."""
    from .screen_stage import ScreenStage

    if path is None or not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fp:
                return None
            return ScreenStage(**{k: z[k] for k in ScreenStage.__dataclass_fields__})
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"screen stage {path} is unreadable ({err}); it is refitted",
                      RuntimeWarning, stacklevel=3)
        return None


def _save_screen_stage(path: Path | None, fp: str, stage) -> None:
    """Write the screen stage atomically (temporary file, then ``os.replace``)."""
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.npz")
    with open(tmp, "wb") as f:
        np.savez(f, fingerprint=np.asarray(fp), **stage.arrays())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def screen_stage(data: _Inputs, pool: np.ndarray, r: int, family: str, disp, offset,
                 gk: dict, cache_path=None, fp: str = "", pool_counts=None):
    """The run's :class:`causarray.screen_stage.ScreenStage`: read from beside the cache
    when an earlier (killed) run of the same fingerprint stored it, else fitted on the
    pool's counts (read once, dense; ``pool_counts`` when the caller has them) and
    stored there."""
    from .screen_stage import fit_screen_stage

    path = _screen_store(cache_path)
    stage = _load_screen_stage(path, fp)
    if stage is not None:
        logger.info("screen stage restored from %s", path)
        return stage
    t0 = time.perf_counter()
    threads = pass_threads()
    with one_thread_blas(), chunk_threads(threads):
        Y_pool = _dense_rows(data.Y, pool) if pool_counts is None else pool_counts
        stage = fit_screen_stage(Y_pool, data.X[pool], pool, r,
                                 family=family, disp=disp, offset=_subset_offset(offset, pool),
                                 gcate_kwargs=gk)
    logger.info("screen stage: GCATE on the %d pool cells, %.1fs", len(pool),
                time.perf_counter() - t0)
    _save_screen_stage(path, fp, stage)
    return stage


# ----------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------
def _resolve_dispersion(data: _Inputs, ctrl_idx, family, disp_glm, offset, pool_counts=None):
    check_family(family)
    if family == "poisson":
        return None
    p = data.Y.shape[1]
    if disp_glm is not None:
        disp = np.broadcast_to(np.asarray(disp_glm, dtype=float), (p,)).copy()
        check_nb_size(disp)
        return disp
    logger.info("Pre-estimating dispersion on %d control cells", len(ctrl_idx))
    threads = pass_threads()          # like a batch: one-thread BLAS, chunks on threads
    with one_thread_blas(), chunk_threads(threads):
        return shared_dispersion(data.Y, data.X, ctrl_idx, offset, pool_counts)



def check_batch_keywords(func_name: str, kwargs, gcate_kwargs, lfc_kwargs,
                         extra: frozenset = frozenset()) -> tuple[frozenset, frozenset]:
    """Raise ``TypeError`` for a keyword neither fit_gcate nor LFC accepts.

    ``kwargs`` may hold names of either (or ``extra``); ``gcate_kwargs`` only those of
    :func:`causarray.fit_gcate`, ``lfc_kwargs`` only those of :func:`causarray.LFC`
    (including :data:`causarray._validation.LFC_COMPAT_KEYWORDS`).

    Returns
    -------
    (fit_gcate's names, LFC's names)
    """
    g_names, l_names = _gcate_names(), _lfc_names()
    check_keywords(func_name, kwargs, g_names | l_names | extra)
    check_keywords(f"{func_name}(gcate_kwargs=...)", gcate_kwargs, g_names)
    check_keywords(f"{func_name}(lfc_kwargs=...)", lfc_kwargs, l_names)
    return g_names, l_names


def _gcate_names() -> frozenset:
    from .gcate import fit_gcate

    return parameter_names(fit_gcate) | GCATE_COMPAT_KEYWORDS


def _lfc_names() -> frozenset:
    from .dr import LFC

    return parameter_names(LFC) | LFC_COMPAT_KEYWORDS


def fit_gcate_batch(Y, X, A, r: int, batch_size: int = 10, n_batches: int | None = None,
                    max_cells: int | None = 2000, n_ctrl: int | None = 2000,
                    family: str = "nb", disp_glm=None, disp_family=None, offset=True,
                    warm_start_U: bool = False, skip_batches=None, random_state: int = 0,
                    verbose: bool = False, **kwargs) -> list[dict]:
    """Fit GCATE on batches of perturbations sharing one control pool
    (docs/math.md#batch-pipeline).

    Parameters
    ----------
    Y : (n, p) counts (array, DataFrame or scipy.sparse; sparse stays sparse outside
        the batch being fitted).
    X : (n, d) covariates including the intercept.
    A : (n, a) 0/1 treatments (DataFrame columns give the names).
    r : number of latent factors.
    batch_size, n_batches, max_cells, n_ctrl, random_state : batch layout, see
        :func:`plan_batches`.
    family : 'nb' or 'poisson'.
    disp_glm : NB size per gene; estimated once on the control pool when None.
    disp_family : passed to :func:`causarray.fit_gcate` ('poisson' when None).
    offset : True (per-batch median-of-ratios size factors), False, or (n,) log size
        factors.
    warm_start_U : seed each batch's control rows of U with the previous batch's.
    skip_batches : batch indices to skip (placeholder entries with ``skipped=True``).
    verbose : tqdm bar over batches with per-batch time, average and ETA (pass
        ``verbose=True`` in ``**kwargs`` for fit_gcate's own progress bars).
    **kwargs : passed to :func:`causarray.fit_gcate` (e.g. ``kwargs_es_1``).

    Returns
    -------
    list of dict, one per batch
        ``batch_i``, ``pert_names``, ``trt_idx`` (treatment columns), ``ctrl_idx``,
        ``pert_idx`` (treated rows), ``cell_idx``, ``genes`` (genes with counts in the
        batch, the columns GCATE was fitted on), ``res_1``, ``res_2``, ``disp_glm``
        (the shared dispersion, all genes), ``t_batch``, ``skipped``.
    """
    r = check_r(r)
    check_keywords("fit_gcate_batch", kwargs, _gcate_names())
    data = _prepare_inputs(Y, X, A)
    plans = plan_batches(data.A, batch_size, n_batches, max_cells, n_ctrl, random_state)
    log_cells_left_out(data.A, plans, n_ctrl, max_cells)
    _warn_multi_perturbation(data.A)
    skip = {int(b) for b in (skip_batches or ())}
    disp = None
    if any(pl.batch not in skip for pl in plans):
        disp = _resolve_dispersion(data, plans[0].ctrl_idx, family, disp_glm, offset)
    gk = dict(kwargs)
    if disp_family is not None:
        gk["disp_family"] = disp_family
    out: list[dict] = []
    prog = _Progress(len(plans), 0, verbose, "GCATE batches")
    U_prev = None
    try:
        for pl in plans:
            names = [data.trt_names[k] for k in pl.trt_idx]
            if pl.batch in skip:
                out.append(dict(batch_i=pl.batch, pert_names=names, trt_idx=pl.trt_idx,
                                ctrl_idx=pl.ctrl_idx, pert_idx=None, cell_idx=None, genes=None,
                                res_1=None, res_2=None, disp_glm=disp, t_batch=0.0,
                                skipped=True))
                prog.skip()
                continue
            job = _make_job(data, pl, r=r, family=family, offset=offset, disp=disp,
                            gcate_kwargs=gk, lfc_kwargs=None,
                            U_ctrl_prev=U_prev if warm_start_U else None, keep_fits=True)
            res = _run_batch(job)
            if res["U_ctrl"] is not None:
                U_prev = res["U_ctrl"]
            out.append(dict(batch_i=pl.batch, pert_names=names, trt_idx=pl.trt_idx,
                            ctrl_idx=pl.ctrl_idx, pert_idx=pl.treated_idx,
                            cell_idx=pl.cell_idx, genes=res["expressed"], res_1=res["res_1"],
                            res_2=res["res_2"], disp_glm=disp, t_batch=res["t_batch"],
                            skipped=False))
            prog.update(pl.batch, res["n_perts"], res["n_cells"], res["t_batch"])
    finally:
        prog.close()
    return out


def _executor_width(executor) -> int:
    n = getattr(executor, "_max_workers", None)
    if n:
        return int(n)
    client = getattr(executor, "_client", None)
    if client is not None:
        try:
            workers = client.scheduler_info()["workers"]
            return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
        except Exception:  # noqa: BLE001 - fall back to the local core count
            pass
    return os.cpu_count() or 2


def _route_keywords(kwargs: dict, gcate_kwargs: dict | None, lfc_kwargs: dict | None,
                    assignment: str) -> tuple[dict, dict, Any]:
    """``gcate_lfc_batch``'s keywords for ``fit_gcate`` and for ``LFC``, and ``disp_glm``.

    A keyword of ``**kwargs`` goes to whichever of the two accepts it (or both);
    ``gcate_kwargs`` / ``lfc_kwargs`` win.  ``family`` is the run's own, ``disp_glm`` is
    resolved once for the screen, and LFC-only options given to both stages stay with
    LFC.  Unknown or reserved keywords raise (as :func:`check_batch_keywords`).
    """
    g_names, l_names = check_batch_keywords("gcate_lfc_batch", kwargs, gcate_kwargs,
                                            lfc_kwargs)
    gk = {**{k: v for k, v in kwargs.items() if k in g_names}, **(gcate_kwargs or {})}
    lk = {**{k: v for k, v in kwargs.items() if k in l_names}, **(lfc_kwargs or {})}
    gk.setdefault("assignment", assignment)
    check_assignment(gk["assignment"])
    disp_glm = gk.pop("disp_glm", None)
    check_lfc_kwargs(lk, _LFC_RESERVED)
    lk.pop("family", None)
    gk.pop("family", None)
    for key in ("ps_model", "eps_var", "ps_clip", "ps_class_weight", "usevar"):
        if key in kwargs and key not in (gcate_kwargs or {}):
            gk.pop(key, None)                      # LFC-only options given to both stages
    return gk, lk, disp_glm


def _design(gk: dict, lk: dict, control: str, W_A) -> str:
    """The run's design: ``control`` checked and handed to ``fit_gcate`` (in ``gk``),
    no user mask beside ``'complement'``, and the propensity covariates it implies
    logged."""
    gk.setdefault("control", check_control(control))
    control = check_control(gk["control"])
    if control == "complement":
        check_no_mask_with_complement(lk.get("mask"))
    logger.info("design: assignment=%r (%s); each perturbation against %s", gk["assignment"],
                DESIGN_READING[gk["assignment"]],
                "the cells without it" if control == "complement"
                else "the cells without any perturbation")
    if gk["assignment"] == "randomized" and W_A is not None:
        logger.info("assignment='randomized': the propensity models use the observed "
                    "covariates X only (W_A, e.g. library size, is measured after the "
                    "perturbation); pass assignment='observational' to use W_A")
    return control


def _run_fingerprint(data: _Inputs, plans: list[BatchPlan], settings: dict, gk: dict,
                     lk: dict):
    """The cache fingerprint of a ``gcate_lfc_batch`` run: the package version, digests
    of the inputs and of the batch layout, the run's ``settings``, both stages'
    keywords (``verbose`` left out: it changes no result) and the result columns."""
    from .dr import RESULT_COLUMNS

    return fingerprint(dict(
        causarray_version=__version__, Y=_digest_counts(data.Y),
        Y_shape=list(data.Y.shape), gene_names=content_digest(data.gene_names),
        A=content_digest(data.A), trt_names=content_digest(np.asarray(data.trt_names, object)),
        X=content_digest(data.X), W_A=content_digest(data.W_A), r=settings["r"],
        family=settings["family"], offset=settings["offset"],
        batch_size=settings["batch_size"], n_batches=settings["n_batches"],
        max_cells=settings["max_cells"], n_ctrl=settings["n_ctrl"],
        random_state=settings["random_state"], warm_start_U=settings["warm_start_U"],
        fit=settings["fit"],
        layout=_layout_digest(plans), disp_glm=settings["disp_glm"], outcome_start="gcate",
        outcome_size="mom_at_start",
        result_columns=list(RESULT_COLUMNS),     # a cache of another table layout is stale
        gcate_kwargs={k: v for k, v in gk.items() if k != "verbose"},
        lfc_kwargs={k: v for k, v in lk.items() if k != "verbose"}))


def _open_cache(cache_path, data: _Inputs, plans: list[BatchPlan], settings: dict, gk: dict,
                lk: dict):
    """``(cache, fingerprint, records)`` of a run: its :class:`BatchCache` and the batches
    already stored there (``(None, "", {})`` without ``cache_path``)."""
    if cache_path is None:
        return None, "", {}
    fp, items = _run_fingerprint(data, plans, settings, gk, lk)
    cache = BatchCache(cache_path, fp, items)
    records = {b: rec for b, rec in cache.load(frames=False).items() if b < len(plans)}
    return cache, fp, records


def _warn_missing_nuisances(nuis_path, n_batches: int) -> None:
    """Warn about batches restored from the cache without stored nuisances."""
    from .nuisances import stored_batches

    missing = sorted(set(range(n_batches)) - set(stored_batches(nuis_path)))
    if missing:
        warnings.warn(f"save_nuisances: batches {missing[:10]} were restored from the "
                      f"cache and have no nuisances in {nuis_path!r}; rerun with a fresh "
                      "cache_path to store them", RuntimeWarning, stacklevel=3)


def _batch_record(res: dict, warm_start_U: bool, keep_factors: bool = False) -> BatchRecord:
    """The cache record of one finished batch: its result rows, its control rows of U
    when the next batch warm-starts from them, all its cells' U with ``keep_factors``
    (the one batch of a screen), and its sizes and timings."""
    arrays = {"U_ctrl": res["U_ctrl"]} if warm_start_U and res["U_ctrl"] is not None \
        else {}
    if keep_factors and res["U"] is not None:
        arrays["U"] = res["U"]
    if res.get("shift") is not None:
        arrays.update({f"shift_{k}": np.asarray(v) for k, v in res["shift"].items()})
        arrays["shift_trt"] = np.asarray(res["fitted"], np.int64)
    return BatchRecord(frame=res["frame"], arrays=arrays,
                       info=dict(n_cells=res["n_cells"], n_perts=res["n_perts"],
                                 t_gcate=round(res["t_gcate"], 3),
                                 t_read=round(res.get("t_read", 0.0), 3),
                                 t_batch=round(res["t_batch"], 3)))


def gcate_lfc_batch(Y, X=None, A=None, r: int | None = None, W_A=None, batch_size: int = 10,
                    n_batches: int | None = None, max_cells: int | None = 2000,
                    n_ctrl: int | None = 2000, family: str = "nb", offset=True,
                    warm_start_U: bool = False, cache_path=None, random_state: int = 0,
                    verbose: bool = False, gcate_kwargs: dict | None = None,
                    lfc_kwargs: dict | None = None, executor=None, client=None,
                    blas_threads: int | None = None, assignment: str = "randomized",
                    save_nuisances: bool = False, pert_col: str | None = None,
                    ctrl_label=None, covariates=(), layer: str | None = None,
                    drop_empty_cells: bool = False, results_path=None,
                    control: str = "non-targeting", return_shift: bool = False,
                    return_factors: bool = False, fit: str = "auto", **kwargs):
    """GCATE + doubly robust LFC for every perturbation of a screen, batch by batch.

    Each batch is GCATE-fitted and then tested with :func:`causarray.LFC` on
    ``W_b = [X_b | U_b]``, ``W_A,b = [W_A[cells] | U_b]`` (or ``W_b``) and the offset
    ``log`` of the batch's GCATE size factors, before the next batch starts.  LFC's
    outcome GLM (the same design) starts from GCATE's coefficients (see
    :func:`outcome_start`; ``lfc_kwargs=dict(outcome_init=None)`` starts it cold).

    Parameters
    ----------
    Y, X, A, r : counts (dense, DataFrame, sparse, or an on-disk
        :class:`causarray.ondisk.H5Counts`), covariates with intercept, 0/1 treatments
        (DataFrame columns give the names), number of latent factors.  ``Y`` may also be
        the path of an ``.h5ad`` file or an AnnData opened with ``backed='r'``; then
        ``X`` and ``A`` are left out and built from the file with ``pert_col``,
        ``ctrl_label``, ``covariates``, ``layer`` and ``drop_empty_cells`` (as
        :func:`causarray.preprocessing.from_anndata` and ``prep_causarray_data``;
        ``W_A`` defaults to ``X_A``), and the counts stay on disk: whole-screen
        statistics come from streamed row-block passes and each batch reads only its
        own rows (sparse stays sparse), in whichever process fits it
        (:func:`causarray.ondisk.open_screen`).  Results are identical to the same
        screen read into memory.
    W_A : (n, d_A) propensity covariates (e.g. ``X_A`` of ``prep_causarray_data``).
    batch_size, n_batches, max_cells, n_ctrl, random_state : batch layout
        (:func:`plan_batches`); ``random_state`` seeds the subsampling only.
    family : 'nb' or 'poisson'.
    offset : True (size factors per batch), False, or (n,) log size factors for GCATE.
    warm_start_U : seed each batch's control rows of U with the previous batch's
        (serial only).
    cache_path : file (e.g. ``'results.h5'``) of a crash-safe cache: every finished
        batch is committed atomically, a rerun with the same arguments recomputes only
        the missing batches and returns exactly the uninterrupted result; a cache of
        different data or settings raises ``ValueError``; corrupt batches are
        recomputed with a ``RuntimeWarning``.  See :mod:`causarray.cache`.
    verbose : one tqdm bar over the whole screen (batches done, cells per second,
        per-batch time, ETA); quiet otherwise.  ``verbose=True`` inside ``gcate_kwargs`` / ``lfc_kwargs`` also shows
        the per-stage bars of fit_gcate / LFC (serial runs).
    gcate_kwargs, lfc_kwargs : keyword arguments of :func:`causarray.fit_gcate` /
        :func:`causarray.LFC`; they override ``**kwargs``, each of which goes to the
        function(s) accepting it.  An unknown name raises ``TypeError``.
        ``gcate_kwargs`` may hold ``disp_glm`` (skips the dispersion estimate).
    assignment : 'randomized' (default: CRISPR screens, guides assigned at random) or
        'observational' (case-control studies, selection on cell state).  Randomized:
        GCATE adjusts only a confounder shift within chance imbalance (a larger shift
        along the factors is the perturbation's effect) and the propensity models use
        ``X`` only; observational: the whole shift is adjusted and the propensity models
        use ``[W_A | U]``.  See ``docs/gcate.md``.
    control : the cells each perturbation is compared with.  ``'non-targeting'``
        (default): the cells without any perturbation (all-zero rows of ``A``), the
        shared pool is drawn from them.  ``'complement'`` (high-MOI screens, where a
        cell carries many guides and ``A`` has several ones per row): every cell that
        does not carry the perturbation; the pool is a random sample of all cells
        (``n_ctrl``; None: every cell) and perturbation k is compared on its carriers
        and the pool's cells without it (:func:`complement_mask`).  The number of
        guides per cell belongs in ``X`` then (``docs/math.md#high-moi``).
    executor : a :class:`concurrent.futures.Executor` running batches in parallel
        (process pools, ``dask.distributed.Client.get_executor()``, ...).
    client : a ``dask.distributed.Client``; shorthand for
        ``executor=client.get_executor(pure=False)``.
    blas_threads : threads of every batch, in whichever process runs it (default: this
        process's BLAS thread count at the call).  A batch runs its BLAS on one thread and
        its passes' gene chunks on these threads (:mod:`causarray.engine.threads`), so
        serial, threaded, process and Dask runs give identical results with any value;
        pass 1 on a Dask cluster of single-threaded workers to avoid oversubscription.
    pert_col, ctrl_label, covariates, layer, drop_empty_cells : how to read a screen
        given as a file (see ``Y``); ignored for matrix input.
    fit : how the factor model is fitted.  ``'screen'``: the shared control pool once
        per screen (its loadings, covariate coefficients, factors and size factors),
        then per batch only the treated cells' factors and the perturbations'
        coefficients at those loadings (:mod:`causarray.screen_stage`,
        ``docs/math.md#screen-stage``); stored beside ``cache_path`` as soon as it is
        fitted, and sent once to each Dask worker with ``client``.  ``'per_batch'``:
        the original's estimator, every batch's GCATE fitted on its own cells.
        ``'auto'`` (default): ``'screen'`` where it applies (r > 0, one shared pool of
        cells without perturbation, one perturbation per cell), else ``'per_batch'``.
    save_nuisances : also write each computed batch's nuisances (outcome-model means
        ``Y_hat``, propensity scores, U, offsets, cell rows) to
        ``<cache_path stem>.nuisances.h5`` (:mod:`causarray.nuisances`), so that LFC can
        be re-run with other propensity scores without refitting; requires
        ``cache_path``.  Batches restored from the cache are not recomputed, so their
        nuisances are written only if an earlier run saved them (a warning lists the
        missing ones).
    results_path : a ``.parquet`` file: the table is written there one batch at a time
        (:func:`write_screen_table`) instead of being returned, so the memory of a
        run does not grow with the screen (the essential screen's table is 2.6 GiB, a
        genome-wide screen's about 13 GB).  Read it with ``pd.read_parquet`` (its
        ``filters=[("trt", "in", [...])]`` reads chosen perturbations only); the
        per-perturbation shift table (see Returns) goes to ``<results_path stem>.shift.csv``.

    Returns
    -------
    DataFrame, or pathlib.Path with ``results_path``
        With ``return_shift``, a pair ``(table, shift)``: one row per perturbation
        (:func:`shift_table`: the chance-imbalance statistic of its latent shift, its
        p-value, whether it was adjusted, how far that moved the LFCs); ``shift.attrs
        ['fit']`` is the factor model used (``'screen'`` or ``'per_batch'``).  The message of
        :func:`design_warning` is logged when the design looks wrong.
        With ``return_factors``, a triple ``(table, shift, factors)``: ``factors`` is
        the cells' latent factors U (n x r, NaN for cells no batch fitted) when one
        batch fitted the whole screen, else None (several batches fit several factor
        models, and the shared controls have one U in each); a batch restored from a
        cache written without them also gives None.
        One row per (treatment, gene): the columns of :func:`causarray.LFC`, then
        ``trt`` and ``batch``; batches in order, index reset.  Genes without counts in
        a batch's cells are non-estimable rows (``tau``, ``std``, ``stat``, p-values
        NaN, ``estimable`` False).  With ``results_path`` the same table is in that
        file, and its path is returned.
    """
    r = check_r(r)
    check_family(family)
    results_path = check_results_path(results_path, cache_path)
    nuis_path = _nuisance_store(cache_path) if save_nuisances else None
    check_executor_client(executor, client)
    gk, lk, disp_glm = _route_keywords(kwargs, gcate_kwargs, lfc_kwargs, assignment)
    control = _design(gk, lk, control, W_A)
    blas_threads = _check_blas_threads(blas_threads)
    targets = check_targets(lk.get("targets", "auto"))
    Y, X, A, W_A = _file_inputs(Y, X, A, W_A, pert_col, ctrl_label, covariates, layer,
                                drop_empty_cells)
    data = _prepare_inputs(Y, X, A, W_A)
    plans = plan_batches(data.A, batch_size, n_batches, max_cells, n_ctrl, random_state,
                         control)
    fit = resolve_factor_fit(fit, screen_fit_obstacles(r, control, plans, data.A),
                             gk["assignment"], data.Y.shape[1], r, lk)
    log_cells_left_out(data.A, plans, n_ctrl, max_cells, control)
    _warn_multi_perturbation(data.A, control)
    if client is not None:
        executor = client.get_executor(pure=False)
    check_warm_start(warm_start_U, executor)

    cache, fp, records = _open_cache(cache_path, data, plans, {
        "fit": fit, "r": r, "family": family, "offset": canonical(offset),
        "batch_size": batch_size, "n_batches": n_batches, "max_cells": max_cells,
        "n_ctrl": n_ctrl, "random_state": random_state, "warm_start_U": warm_start_U,
        "disp_glm": canonical(disp_glm)}, gk, lk)
    todo = [pl for pl in plans if pl.batch not in records]

    if todo:
        pool = plans[0].ctrl_idx          # read once for the dispersion and the screen stage
        pool_counts = None if fit == "per_batch" else _dense_rows(data.Y, pool)
        disp = _resolve_dispersion(data, pool, family, disp_glm, offset, pool_counts)
        screen = None if fit == "per_batch" else screen_stage(
            data, pool, r, family, disp, offset, gk, cache_path, fp, pool_counts)
        del pool_counts
        common = dict(r=r, family=family, offset=offset, disp=disp, gcate_kwargs=gk,
                      lfc_kwargs=lk, keep_fits=False, blas_threads=blas_threads,
                      save_nuisances=bool(save_nuisances), control=control,
                      pool=None if screen is None else screen.pool)
        width = 1 if executor is None else _executor_width(executor)
        prog = _Progress(len(plans), len(plans) - len(todo), verbose, "GCATE+LFC batches",
                         width)

        def finish(res: dict) -> None:
            rec = _batch_record(res, warm_start_U, return_factors and len(plans) == 1)
            if nuis_path is not None and "nuisances" in res:
                from .nuisances import save_batch_nuisances

                nuis = dict(res["nuisances"], cell_idx=plans[res["batch"]].cell_idx)
                save_batch_nuisances(nuis_path, res["batch"], nuis)
            if cache is not None:     # stored: keep only its info, read back at the end
                cache.commit(res["batch"], rec)
                rec = BatchRecord(frame=None, arrays=rec.arrays, info=rec.info)
            records[res["batch"]] = rec
            prog.update(res["batch"], res["n_perts"], res["n_cells"], res["t_batch"])
            release_freed_memory()

        try:
            _run_batches(todo, data, common, screen, executor, client, width, finish,
                         records if warm_start_U else None)
        finally:
            prog.close()

    if cache is not None and (todo or cache.needs_finalize(range(len(plans)))):
        cache.finalize(records)
        _remove_screen_store(cache_path)       # a finished cache needs no screen stage
    if nuis_path is not None:
        _warn_missing_nuisances(nuis_path, len(plans))
    out, shift = _finish_screen(plans, records, cache, data, gk["assignment"], targets,
                                results_path)
    shift.attrs["fit"] = fit                    # the factor model used, for the settings
    factors = (_cells_factors(plans, records, data.Y.shape[0]),) if return_factors else ()
    return (out, shift, *factors) if return_shift or return_factors else out


def _cells_factors(plans: list[BatchPlan], records: dict, n_cells: int) -> np.ndarray | None:
    """The cells' U (n x r, NaN for cells left out) of a screen fitted in one batch;
    None with several batches or when the batch's record has no U."""
    if len(plans) != 1 or "U" not in records[plans[0].batch].arrays:
        return None
    U = np.asarray(records[plans[0].batch].arrays["U"], dtype=float)
    out = np.full((n_cells, U.shape[1]), np.nan)
    out[plans[0].cell_idx] = U
    return out


def _run_batches(todo: list[BatchPlan], data: _Inputs, common: dict, screen, executor, client,
                 width: int, finish, warm_from: dict | None) -> None:
    """Fit the batches ``todo``: serially (each warm-started from the previous batch's
    record in ``warm_from``, when given) or on ``executor`` with ``width + 1`` in flight.
    The screen stage goes once to each Dask worker (``client.scatter``), not per job.
    BLAS is set to one thread here: batches on threads of this process share it."""
    with one_thread_blas():
        if executor is None:
            for pl in todo:
                prev = None if warm_from is None else warm_from.get(pl.batch - 1)
                U_prev = None if prev is None else prev.arrays.get("U_ctrl")
                finish(_run_batch(_make_job(data, pl, U_ctrl_prev=U_prev, **common), screen))
            return
        shared = screen if client is None or screen is None else \
            client.scatter(screen, broadcast=True)
        _run_parallel(executor, todo, width + 1, finish,
                      lambda pl: _make_job(data, pl, U_ctrl_prev=None, **common), shared)


def _finish_screen(plans, records: dict, cache, data: _Inputs, assignment: str, targets,
                   results_path):
    """The screen's table (or its Parquet path, with the shift table beside it as
    ``.shift.csv``) and the shift table; the design warning is logged."""
    shift = shift_table(plans, records, data.trt_names)
    message = design_warning(shift, assignment)
    if message:
        logger.warning(message)
    out = _screen_table(plans, records, cache, data.Y.shape[1], targets, results_path)
    if results_path is not None:
        shift.to_csv(Path(results_path).with_suffix(".shift.csv"), index=False)
    return out, shift


def _nuisance_store(cache_path):
    """The nuisance store beside ``cache_path`` (``ValueError`` without one)."""
    from .nuisances import nuisance_path

    return nuisance_path(cache_path)


def _screen_table(plans, records: dict, cache, n_genes: int, targets, results_path=None):
    """The screen's result table, assembled one stored batch at a time, with the
    on-target family adjusted over all batches (written to ``results_path`` if given).

    A perturbation's other pairs all come from its own batch, whose ``LFC`` adjusted
    them per perturbation already; only the on-target family spans the batches.
    """
    if results_path is not None:
        return write_screen_table(plans, records, cache, targets, results_path)
    release_freed_memory()
    n_rows = sum(len(pl.trt_idx) for pl in plans) * n_genes
    table = concat_batches(_stored_frames(plans, records, cache), n_rows)
    return adjust_target_families(table, targets, trans_adjusted=True)


def write_screen_table(plans, records: dict, cache, targets, path) -> Path:
    """Write the screen's result table to a Parquet file, one stored batch at a time.

    The rows, columns and values are those :func:`gcate_lfc_batch` returns without
    ``results_path``; the process holds one batch frame, never the table.

    1. the on-target pairs of every batch and their p-values (one or a few per
       perturbation) are collected, and BH-adjusted as one family
       (:func:`causarray.inference.family_bh`; the other pairs were adjusted per
       perturbation inside their batch);
    2. each batch is written with its on-target flags and adjusted p-values, as one
       row group, to a temporary file that replaces ``path`` only when complete.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    release_freed_memory()

    def flags(frame):
        return on_target_pairs(frame["trt"].to_numpy(), frame["gene_names"].to_numpy(),
                               targets)

    # 1. the on-target family over all batches
    p_on = [frame["pvalue"].to_numpy()[flags(frame)]
            for frame in _stored_frames(plans, records, cache, release=False)]
    padj_on = bh_adjust(np.concatenate(p_on)) if p_on else np.zeros(0)
    # 2. one row group per batch
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer, k = None, 0
    try:
        for frame in _stored_frames(plans, records, cache):
            on = flags(frame)
            padj = frame["padj"].to_numpy(dtype=float, copy=True)
            padj[on] = padj_on[k:k + int(on.sum())]
            k += int(on.sum())
            frame["on_target"], frame["padj"] = on, padj
            if writer is None:
                table = pa.Table.from_pandas(frame, preserve_index=False)
                writer = pq.ParquetWriter(tmp, table.schema)
            else:
                table = pa.Table.from_pandas(frame, schema=writer.schema, preserve_index=False)
            writer.write_table(table)
            del frame, table
        if writer is None:
            from .dr import RESULT_COLUMNS

            pd.DataFrame(columns=RESULT_COLUMNS + ["trt", "batch"]).to_parquet(tmp)
        else:
            writer.close()
            writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return path


def release_freed_memory() -> bool:
    """Hand memory that Python has freed back to the operating system (glibc's
    ``malloc_trim``); False where the C library has no such call.

    After a batch, most of its arrays are freed, but the C allocator keeps the pages of
    the smaller ones for reuse: the resident size stays at the batch's peak, and the
    screen's table is then assembled on top of it.  Dask's workers trim the same way.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):
        return False


def _stored_frames(plans, records: dict, cache, release: bool = True):
    """The batches' frames in plan order, each read back from the cache if it was not
    kept in memory, and (``release``) released from ``records`` as it is handed on."""
    for pl in plans:
        rec = records[pl.batch]
        frame = rec.frame if rec.frame is not None else cache.read_batch(pl.batch).frame
        if release:
            rec.frame = None
        yield frame


def concat_batches(frames, n_rows: int | None = None) -> pd.DataFrame:
    """``pd.concat(frames, ignore_index=True)`` holding one batch frame at a time.

    A whole screen's table (the essential screen: 17 million rows, 2.6 GiB) is several
    GB; concatenating a list of frames holds it twice, and the frames read back from the
    cache make one Python string per row of each text column.  Here the frames are
    consumed one by one and the text columns (``gene_names``, ``trt``) hold one shared
    string object per distinct value.  The result equals ``pd.concat`` (same columns,
    dtypes, values and a RangeIndex).

    ``n_rows`` (the total, known from the batch plans) lets every column be allocated
    once and filled in place: the process then holds the table plus one frame.  Without
    it each column's parts are kept until the end and joined one column at a time; the
    parts are freed, but the C allocator keeps most of that memory (measured with 135
    copies of one essential-screen batch frame, 17.3 million rows, 2.6 GiB: peak RSS
    5.6 GB joining parts, 2.9 GB filled in place).
    """
    columns: dict = {}
    order: list[str] | None = None
    interned: dict = {}
    pos = 0
    for frame in frames:
        if order is None:
            order = list(frame.columns)
        elif list(frame.columns) != order:       # as pd.concat would align them
            raise RuntimeError("batch frames have different columns")
        m = len(frame)
        if n_rows is not None and pos + m > n_rows:
            raise RuntimeError(f"batch frames hold more than the {n_rows} rows planned")
        for c in order:
            v = _shared_text(frame[c].to_numpy(), interned)
            if n_rows is None:
                if v.base is not None:            # a view into the frame's 2-D block: own
                    v = v.copy()                  # copy, so each column's parts free alone
                columns.setdefault(c, []).append(v)
                continue
            if c not in columns:
                columns[c] = np.empty(n_rows, dtype=v.dtype)
            elif v.dtype != columns[c].dtype:     # pandas' own rule for mixed dtypes
                to = pd.concat([pd.Series(columns[c][:1]), pd.Series(v[:1])]).dtype
                columns[c] = columns[c].astype(to, copy=False)
            columns[c][pos:pos + m] = v
        pos += m
        del frame
    if order is None:
        return pd.DataFrame()
    if n_rows is not None:
        if pos != n_rows:
            raise RuntimeError(f"batch frames hold {pos} rows, {n_rows} were planned")
        return pd.DataFrame(columns, columns=order, copy=False)
    out = {}
    for c in order:                              # one column at a time: its parts freed
        parts = columns.pop(c)
        out[c] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        del parts
    return pd.DataFrame(out, columns=order, copy=False)


def _shared_text(v: np.ndarray, interned: dict) -> np.ndarray:
    """An object column with one string object per distinct value (across all calls
    sharing ``interned``); other columns are returned as they are."""
    if v.dtype != object:
        return v
    codes, uniq = pd.factorize(v, use_na_sentinel=True)
    levels = np.array([interned.setdefault(u, u) for u in uniq] + [None], dtype=object)
    return levels[codes]


def _file_inputs(Y, X, A, W_A, pert_col, ctrl_label, covariates, layer, drop_empty_cells):
    """``(Y, X, A, W_A)`` with a file / backed AnnData ``Y`` opened on disk."""
    from .ondisk import is_file_input, open_screen

    if not is_file_input(Y):
        return Y, X, A, W_A
    check_no_design_with_file(X, A)
    Y, A, X, X_A = open_screen(Y, pert_col, ctrl_label, covariates, layer,
                               drop_empty_cells=drop_empty_cells, sparse_treatments=True)
    return Y, X, A, X_A if W_A is None else W_A


def _run_parallel(executor, plans: list[BatchPlan], window: int, finish, make_job,
                  shared=None) -> None:
    """Keep at most ``window`` batches in flight; ``finish`` runs in this process;
    ``shared`` (the screen stage, or its Dask future) goes with every job."""
    queue = list(plans)
    pending: dict = {}

    def submit_next() -> None:
        if queue:
            pl = queue.pop(0)
            pending[executor.submit(_run_batch, make_job(pl), shared)] = pl.batch

    for _ in range(max(1, window)):
        submit_next()
    try:
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in done:
                pending.pop(fut)
                finish(fut.result())
                submit_next()
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise


def LFC_batch(*args, **kwargs) -> pd.DataFrame:
    """Deprecated alias of :func:`gcate_lfc_batch`."""
    warnings.warn("LFC_batch is deprecated; use gcate_lfc_batch", DeprecationWarning,
                  stacklevel=2)
    return gcate_lfc_batch(*args, **kwargs)
