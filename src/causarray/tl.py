"""AnnData front door: ``causarray.tl.lfc`` runs the whole pipeline on a screen.

::

    import causarray as ca
    ca.tl.lfc(adata, pert_col="gene", ctrl_label="non-targeting")
    df = ca.get.results(adata)
    ca.pl.volcano(adata)

Steps of :func:`lfc`:

1. :func:`causarray.preprocessing.from_anndata` builds counts ``Y``, the one-hot
   treatment matrix ``A`` (controls dropped), ``X = [1 | covariates]`` and
   ``X_A = [1 | covariates | log library size]``; the counts must be raw integers.
2. ``r='auto'``: :func:`causarray.gcate.estimate_r` on a control-priority subsample
   of at most ``max_cells`` cells (2,000 when ``max_cells`` is None) over a small
   grid; ``r`` is the argmin of JIC.
3. :func:`causarray.batch.gcate_lfc_batch`: GCATE confounders (none with r = 0) and
   doubly robust log fold changes, batch by batch, cached in ``cache_path`` so a
   re-run resumes. By default every cell is used: each batch holds all control cells
   and every treated cell of its perturbations, and the number of perturbations per
   batch is chosen so that a batch fits ``memory_budget``. With a Dask ``client`` the
   batches run in parallel on the cluster.
4. Propensity scores of every perturbation against the controls on the observed
   design ``X_A`` (a diagnostic of overlap; the doubly robust step itself also uses
   the confounders), fitted one perturbation at a time on its own cells and the
   controls (:func:`causarray.diagnostics.propensity_by_label`).

No step holds a cells x perturbations array: the treatments stay a sparse one-hot
matrix (one entry per perturbed cell), ``r='auto'`` and the batch layout use the
treated-cell indicator and per-perturbation counts, and the propensity summary is
built per perturbation.  With a backed AnnData the counts stay on disk as well.

Everything is stored in ``adata.uns[key_added]`` (``results``, ``settings``,
``jic``, ``propensity``, ``propensity_coef``); the propensity design in
``adata.obsm[key_added + '_propensity_design']`` and, for screens of at most
:data:`PROPENSITY_TABLE_MAX` cells x perturbations, the scores table in
``adata.obsm[key_added + '_propensity']`` (otherwise recompute scores with
:func:`propensity_scores`).  When one batch fitted the screen (every donor run, small
screens), the cells' latent factors U are in ``adata.obsm[key_added + '_factors']``.
"""
from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    check_assignment,
    check_choice,
    check_donor_factors,
    check_donor_route,
    check_obs_column,
    check_propensity_models,
    check_treatments_known,
    check_cells_nonempty,
    check_copy_in_memory,
    check_family,
    check_has_perturbed,
    check_layer,
    check_positive_int,
    check_r,
    check_raw_counts,
)
from ._version import __version__

logger = logging.getLogger("causarray")

__all__ = ["default_r_grid", "lfc", "propensity_scores", "select_r", "validate_screen"]

#: Candidate numbers of latent factors for ``r='auto'`` (truncated by :func:`default_r_grid`).
R_CANDIDATES = (1, 2, 3, 5, 8, 10, 15, 20, 30)


# ----------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------
def _counts_of(adata: Any, layer: str | None):
    if layer is None:
        return adata.X, "adata.X"
    check_layer(layer, adata.layers.keys())
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def _empty_cells(adata: Any, covariates: Iterable[str], layer: str | None,
                 drop_empty_cells: bool) -> np.ndarray:
    """The checks of :func:`validate_screen` that do not concern labels: raw counts
    (streamed for a backed AnnData), known covariates, and empty cells (which raise
    unless ``drop_empty_cells``).  Returns the raw counts' row sums (0: an empty cell),
    which :func:`_read_screen` passes on so that the counts are summed once."""
    from .preprocessing import covariate_design

    if getattr(adata, "isbacked", False):
        # counts on disk: one streamed pass over row blocks (ondisk.scan_counts)
        from .ondisk import backed_counts, check_counts_scan, scan_counts

        name = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        scan = scan_counts(backed_counts(adata, layer))
        check_counts_scan(scan, name, non_integer="raise")
        covariate_design(adata.obs, covariates)
        totals = scan.row_sums
    else:
        from ._validation import row_sums

        counts, name = _counts_of(adata, layer)
        check_raw_counts(counts, name)
        covariate_design(adata.obs, covariates)
        totals = np.asarray(row_sums(counts)).ravel()
    if not drop_empty_cells:
        check_cells_nonempty(totals == 0, adata.obs_names, n_shown=3)
    return totals


def validate_screen(adata: Any, pert_col: str | None = None, ctrl_label: Any = None,
                    covariates: str | Iterable[str] = (), layer: str | None = None,
                    drop_empty_cells: bool = False) -> dict:
    """Check an AnnData screen before any computation.

    Parameters
    ----------
    adata : anndata.AnnData
    pert_col, ctrl_label, covariates, layer, drop_empty_cells
        As for :func:`lfc`.

    Returns
    -------
    dict
        ``pert_col``, ``ctrl_label``, ``n_cells``, ``n_genes``, ``n_control``,
        ``perturbations`` (sorted labels other than the control).

    Raises
    ------
    ValueError
        Unknown column, control label, layer or covariate; no perturbed cells; data
        that are not raw counts; empty cells.
    """
    return _validate_screen(adata, pert_col, ctrl_label, covariates, layer,
                            drop_empty_cells)[0]


def _validate_screen(adata: Any, pert_col: str | None, ctrl_label: Any,
                     covariates: Iterable[str], layer: str | None,
                     drop_empty_cells: bool) -> tuple[dict, np.ndarray]:
    """:func:`validate_screen`'s dict and the raw counts' row sums it took."""
    from .preprocessing import _resolve_screen_keys

    pert_col, ctrl_label, labels = _resolve_screen_keys(adata, pert_col, ctrl_label)
    totals = _empty_cells(adata, covariates, layer, drop_empty_cells)
    perts = sorted(set(labels[totals != 0].tolist()) - {ctrl_label})
    check_has_perturbed(bool(perts), pert_col, ctrl_label)
    return dict(pert_col=pert_col, ctrl_label=ctrl_label, n_cells=int(adata.n_obs),
                n_genes=int(adata.n_vars), n_control=int(np.sum(labels == ctrl_label)),
                perturbations=perts), totals


# ----------------------------------------------------------------------------------
# choosing r
# ----------------------------------------------------------------------------------
def default_r_grid(n_genes: int, n_cells: int | None = None) -> list[int]:
    """The small grid of r values tried by ``r='auto'``.

    Values of :data:`R_CANDIDATES` up to ``max(1, min(n_genes, n_cells) // 5)``.

    Parameters
    ----------
    n_genes : int
    n_cells : int, optional

    Returns
    -------
    list of int
    """
    m = min(n_genes, n_cells) if n_cells is not None else n_genes
    top = max(1, m // 5)
    return [r for r in R_CANDIDATES if r <= top] or [1]


def _es_kwargs(max_iters: int | None) -> dict | None:
    return None if max_iters is None else dict(max_iters=int(max_iters))


def select_r(Y: Any, X: Any, A: Any, r_grid: Sequence[int] | None = None, family: str = "nb",
             max_cells: int | None = 2000, random_state: int = 0, max_iters: int | None = None,
             c: float = 1.0, verbose: bool = False, known: pd.DataFrame | None = None,
             callback: Any = None) -> tuple[int, pd.DataFrame]:
    """Number of latent factors by minimum JIC on a control-priority subsample.

    Parameters
    ----------
    Y, X, A : counts, covariates with intercept, treatments (as for ``fit_gcate``).
    r_grid : sequence of int, optional
        Values of r to try (r = 0 is always evaluated); default :func:`default_r_grid`.
    family : 'nb' or 'poisson'
    max_cells : int or None
        Size of the control-priority subsample.
    random_state : int
    max_iters : int, optional
        Cap on the alternating-minimisation epochs of each fit.
    c : float
        Weight of the JIC penalty.
    verbose : bool
    known, callback
        Passed to :func:`causarray.gcate.estimate_r` (rows finished by an interrupted
        run; called with the rows finished so far after each r).

    Returns
    -------
    r : int
        ``argmin_r JIC(r)``.
    df_r : pandas.DataFrame
        The JIC table (``r, deviance, nu, JIC, time_s``).
    """
    from .gcate import estimate_r, subsample_control_priority

    A_sp = _treatments_csc(A)
    # control priority needs only which cells are treated: an (n, 1) indicator, not n x a
    treated = np.asarray(A_sp.sum(axis=1), dtype=float).reshape(-1, 1)
    rows = subsample_control_priority(treated, max_cells, random_state)
    Ysub = Y.iloc[rows].to_numpy() if isinstance(Y, pd.DataFrame) else Y[rows]
    Asub_sp = A_sp[rows]
    Asub = Asub_sp[:, np.asarray(Asub_sp.sum(axis=0)).ravel() > 0].toarray()
    expressed = np.asarray((Ysub != 0).sum(axis=0)).ravel() > 0
    if not expressed.all():
        logger.info("choosing r: %d gene(s) without counts in the subsample are left out",
                    int((~expressed).sum()))
        Ysub = Ysub[:, expressed]
    n_sub, p = Ysub.shape
    grid = list(r_grid) if r_grid is not None else default_r_grid(p, n_sub)
    d = np.shape(X)[1]
    # fit_gcate needs r <= min(n, p) - (d + a) - 1.  Small panels with many perturbations
    # (Hill: 28 genes, 29 perturbations) cannot fit any factor beside every perturbation at
    # once, though each batch (only its own perturbations) can: r is then chosen on the
    # controls and the largest perturbations that leave room for the grid.
    room = min(n_sub, p) - d - 1
    if Asub.shape[1] > 0 and room - Asub.shape[1] < max(grid):
        k = max(1, min(Asub.shape[1], room - max(grid))) if room >= 2 else 0
        if 0 < k < Asub.shape[1]:
            top = np.argsort(-Asub.sum(axis=0), kind="stable")[:k]
            on = Asub[:, top].sum(axis=1) > 0
            ctrl = Asub.sum(axis=1) == 0
            keep_rows = on | ctrl
            logger.info("choosing r: %d genes leave no room for factors beside all %d "
                        "perturbations; r is chosen on the controls and the %d largest "
                        "perturbations", p, Asub.shape[1], k)
            Ysub, Asub, rows = Ysub[keep_rows], Asub[keep_rows][:, top], rows[keep_rows]
            n_sub = Ysub.shape[0]
    n_obs_cols = d + Asub.shape[1]
    r_top = min(n_sub, p) - n_obs_cols - 1          # identifiability limit of fit_gcate
    if max(grid) > r_top:
        if r_top < 1 or room < 2:
            logger.warning("r cannot be chosen automatically: %d genes and %d observed "
                           "columns leave no room for a latent factor; using r = 0", p,
                           n_obs_cols)
            return 0, pd.DataFrame({"r": [0], "deviance": [np.nan], "nu": [np.nan],
                                    "JIC": [np.nan], "time_s": [0.0]})
        logger.info("choosing r: values above %d are not identifiable with %d genes and %d "
                    "observed columns and are skipped", r_top, p, n_obs_cols)
        grid = [r for r in grid if r <= r_top]
    df_r = estimate_r(Ysub, np.asarray(X, float)[rows], Asub, grid, c=c, family=family,
                      max_cells=None, random_state=random_state,
                      kwargs_es_1=_es_kwargs(max_iters), verbose=verbose, known=known,
                      callback=callback)
    r = int(df_r.loc[df_r["JIC"].idxmin(), "r"])
    return r, df_r


def _treatments_csc(A: Any) -> sp.csc_matrix:
    """A treatment matrix (sparse-dtype or dense DataFrame, sparse, array) as float CSC.

    The front door keeps the one-hot treatments sparse: one entry per perturbed cell
    instead of n x a floats (5 GB for 310k cells x 2,021 perturbations).
    """
    if isinstance(A, pd.DataFrame):
        if A.shape[1] and all(isinstance(dt, pd.SparseDtype) for dt in A.dtypes):
            return sp.csc_matrix(A.sparse.to_coo(), dtype=np.float64)
        A = A.to_numpy(dtype=float)
    if sp.issparse(A):
        return sp.csc_matrix(A, dtype=np.float64)
    A = np.asarray(A, dtype=float)
    return sp.csc_matrix(A[:, None] if A.ndim == 1 else A)


# ----------------------------------------------------------------------------------
# fingerprints (resume checks of the JIC table)
# ----------------------------------------------------------------------------------
def _data_fingerprint(Y: Any, genes: Sequence[str], A: pd.DataFrame, X: np.ndarray,
                      X_A: np.ndarray) -> str:
    """Digest of the data the JIC table of ``r='auto'`` is computed from.

    The same digests as the batch cache of :func:`causarray.batch.gcate_lfc_batch`:
    :func:`causarray.cache.content_digest` of the counts (for on-disk ``H5Counts`` the
    digest of their streamed pass, as the batch cache uses), of the treatments, of
    ``X``, ``X_A`` and of the gene and perturbation names, combined by
    :func:`causarray.cache.fingerprint`.  Besides the shape and the row and column sums
    it hashes the exact values of evenly spaced rows, so counts moved between cells and
    genes of those rows without changing any sum give another digest.

    Parameters
    ----------
    Y : ndarray, scipy.sparse matrix or causarray.ondisk.H5Counts
        Counts, cells x genes.
    genes : sequence of str
        Gene names.
    A : pandas.DataFrame
        One-hot treatments (its columns are the perturbation names).
    X, X_A : ndarray
        Outcome and propensity designs.

    Returns
    -------
    str
        SHA-256 hex digest.
    """
    from .batch import _digest_counts
    from .cache import content_digest, fingerprint

    digest, _ = fingerprint(dict(
        Y=_digest_counts(Y), Y_shape=list(Y.shape),
        gene_names=content_digest(np.asarray([str(g) for g in genes], dtype=object)),
        A=content_digest(_treatments_csc(A)),
        trt_names=content_digest(np.asarray([str(c) for c in A.columns], dtype=object)),
        X=content_digest(np.asarray(X, dtype=float)),
        X_A=content_digest(np.asarray(X_A, dtype=float))))
    return digest


def _jic_paths(cache_path: str | Path) -> tuple[Path, Path]:
    base = Path(cache_path)
    return base.with_name(base.name + ".jic.csv"), base.with_name(base.name + ".jic.json")


def _partial_jic_path(cache_path: str | Path) -> Path:
    base = Path(cache_path)
    return base.with_name(base.name + ".jic.partial.csv")


def _load_partial_jic(cache_path: str | Path | None, fingerprint: dict) -> pd.DataFrame | None:
    """Rows of the JIC table finished by an interrupted run with the same fingerprint."""
    if cache_path is None:
        return None
    part = _partial_jic_path(cache_path)
    _, meta = _jic_paths(cache_path)
    meta_part = meta.with_name(meta.name.replace(".jic.json", ".jic.partial.json"))
    if not (part.is_file() and meta_part.is_file()):
        return None
    try:
        if json.loads(meta_part.read_text()) != fingerprint:
            return None
        df = pd.read_csv(part)
    except (OSError, ValueError):
        return None
    done = sorted(int(v) for v in df["r"] if int(v) > 0)
    if done:
        logger.info("re-using the JIC fits of r = %s finished by an interrupted run", done)
    return df


def _partial_jic_writer(cache_path: str | Path | None, fingerprint: dict):
    """Callback writing the rows finished so far (atomically) next to the cache."""
    if cache_path is None:
        return None
    part = _partial_jic_path(cache_path)
    _, meta = _jic_paths(cache_path)
    meta_part = meta.with_name(meta.name.replace(".jic.json", ".jic.partial.json"))

    def write(df: pd.DataFrame) -> None:
        part.parent.mkdir(parents=True, exist_ok=True)
        meta_part.write_text(json.dumps(fingerprint, sort_keys=True))
        tmp = part.with_name(part.name + ".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(part)

    return write


def _drop_partial_jic(cache_path: str | Path | None) -> None:
    if cache_path is None:
        return
    part = _partial_jic_path(cache_path)
    part.unlink(missing_ok=True)
    part.with_name(part.name.replace(".csv", ".json")).unlink(missing_ok=True)


def _load_cached_jic(cache_path: str | Path | None, fingerprint: dict) -> pd.DataFrame | None:
    if cache_path is None:
        return None
    csv, meta = _jic_paths(cache_path)
    if not (csv.is_file() and meta.is_file()):
        return None
    try:
        stored = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if stored != fingerprint:
        logger.info("cached JIC table %s was computed with other settings; recomputing", csv)
        return None
    logger.info("re-using the JIC table cached in %s", csv)
    return pd.read_csv(csv)


def _store_jic(cache_path: str | Path | None, fingerprint: dict, df_r: pd.DataFrame) -> None:
    if cache_path is None:
        return
    csv, meta = _jic_paths(cache_path)
    csv.parent.mkdir(parents=True, exist_ok=True)
    df_r.to_csv(csv, index=False)
    meta.write_text(json.dumps(fingerprint, sort_keys=True))


# ----------------------------------------------------------------------------------
# the front door
# ----------------------------------------------------------------------------------
#: Cells of the control-priority subsample on which ``r='auto'`` is chosen when
#: ``max_cells`` is None (every cell is still used for the estimates).
R_SUBSAMPLE = 2000

#: Largest cells x perturbations table of propensity scores stored in
#: ``adata.obsm[key_added + '_propensity']`` (32 MB of float64); larger screens keep
#: only the per-perturbation coefficients and the design (scores are recomputed on
#: demand, see :func:`propensity_scores`).
PROPENSITY_TABLE_MAX = 1 << 22


def resolve_verbose(verbose: bool | None) -> bool:
    """Whether to show progress: ``verbose`` when given, else scanpy's verbosity.

    With ``verbose=None``: when scanpy has been imported, progress is shown at
    ``scanpy.settings.verbosity >= 2`` ('info' and above), as scanpy's own steps log;
    without scanpy, when standard error is a terminal.
    """
    if verbose is not None:
        return bool(verbose)
    import sys

    sc = sys.modules.get("scanpy")
    settings = getattr(sc, "settings", None)
    if settings is not None and hasattr(settings, "verbosity"):
        try:
            return int(settings.verbosity) >= 2
        except (TypeError, ValueError):
            return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _design_names(adata: Any, covariates: Sequence[str], d: int) -> list[str]:
    from .preprocessing import covariate_design

    names = ["intercept"]
    if covariates:
        names += [str(c) for c in covariate_design(adata.obs, covariates).columns]
    names.append("log2_library_size")
    return names if len(names) == d else [f"w{j}" for j in range(d)]


def _propensity(adata: Any, A_csc: sp.csc_matrix, names: list[str], X_A: np.ndarray,
                kept: pd.Index, covariates: Sequence[str], random_state: int,
                key_added: str) -> dict:
    """Observed-design propensity models, one perturbation at a time (no n x a array).

    Stores the design ``X_A`` in ``adata.obsm[key_added + '_propensity_design']`` (NaN
    rows: cells left out) and, for screens with at most :data:`PROPENSITY_TABLE_MAX`
    cells x perturbations, the scores table in ``adata.obsm[key_added + '_propensity']``.
    Returns the ``uns`` entries ``propensity`` (summary over the cells used) and
    ``propensity_coef``.
    """
    from .diagnostics import propensity_by_label, treatment_codes

    n, a = A_csc.shape
    design = _design_names(adata, covariates, np.shape(X_A)[1])
    fit = propensity_by_label(treatment_codes(A_csc), X_A, names, random_state=random_state,
                              keep_table=n * a <= PROPENSITY_TABLE_MAX, design_names=design)
    name = f"{key_added}_propensity"
    if fit.table is not None:
        scores = pd.DataFrame(fit.table, index=kept, columns=names)
        adata.obsm[name] = scores.reindex(adata.obs_names)       # NaN: dropped cells
    elif name in adata.obsm:                                     # a smaller earlier run's
        del adata.obsm[name]
    adata.obsm[f"{name}_design"] = pd.DataFrame(
        X_A, index=kept, columns=design).reindex(adata.obs_names)
    return dict(propensity=fit.summary, propensity_coef=fit.coef)


def propensity_scores(adata: Any, treatments: Sequence[str] | None = None,
                      key: str = "causarray") -> pd.DataFrame:
    """Observed-design propensity scores of a :func:`lfc` run, recomputed from its models.

    ``P(A_k = 1 | x) = expit(x' coef_k)`` with the coefficients in
    ``adata.uns[key]['propensity_coef']`` and the design in
    ``adata.obsm[key + '_propensity_design']``; equal (to rounding) to the scores
    table that :func:`lfc` stores for small screens.

    Parameters
    ----------
    adata : anndata.AnnData
        Processed by :func:`lfc` with ``propensity=True``.
    treatments : sequence of str, optional
        Perturbations (default all; cells x perturbations values, so choose a few on
        a large screen).
    key : str

    Returns
    -------
    pandas.DataFrame
        Cells x treatments scores; NaN for cells left out of the run.
    """
    from scipy.special import expit

    store = adata.uns.get(key) if hasattr(adata, "uns") else None
    name = f"{key}_propensity_design"
    check_propensity_models(isinstance(store, dict) and store.get("propensity_coef") is not None
                            and name in adata.obsm, key)
    coef = store["propensity_coef"]
    chosen = list(coef.index) if treatments is None else [str(t) for t in treatments]
    check_treatments_known(chosen, list(coef.index))
    design = adata.obsm[name]
    W = np.asarray(design, dtype=float)
    B = coef.loc[chosen].to_numpy(dtype=float)
    return pd.DataFrame(expit(W @ B.T), index=getattr(design, "index", adata.obs_names),
                        columns=pd.Index(chosen, dtype=object))


@dataclass
class _Screen:
    """The inputs of one :func:`lfc` run, as read from the AnnData.

    ``Y`` is the cells x genes count matrix (ndarray, CSR or on-disk ``H5Counts``),
    ``A`` the sparse one-hot treatments (a sparse-dtype DataFrame, controls dropped),
    ``A_csc`` the same as CSC, ``X = [1 | covariates]``, ``X_A = [1 | covariates |
    log library size]``, ``kept`` the cells used, ``genes`` the gene names and
    ``info`` the result of :func:`validate_screen`.
    """

    Y: Any
    A: pd.DataFrame
    A_csc: sp.csc_matrix
    X: np.ndarray
    X_A: np.ndarray
    kept: pd.Index
    genes: list[str]
    info: dict
    covariates: list[str]
    backed: bool


def _check_lfc_args(r: int | str, family: str, batch_size: int, n_ctrl: int | None,
                    max_cells: int | None, kwargs: dict, gcate_kwargs: dict | None,
                    lfc_kwargs: dict | None) -> int | str:
    """Check the options of :func:`lfc` before any data is read.

    Parameters
    ----------
    r, family, batch_size, n_ctrl, max_cells, gcate_kwargs, lfc_kwargs
        As for :func:`lfc`.
    kwargs : dict
        The extra keywords of :func:`lfc`; each must be a keyword of
        :func:`causarray.batch.gcate_lfc_batch` that :func:`lfc` does not set itself.

    Returns
    -------
    int or 'auto'
        The requested number of latent factors.
    """
    from ._validation import parameter_names
    from .batch import check_batch_keywords, gcate_lfc_batch

    r_req = check_r(r, allow_auto=True)
    check_family(family)
    check_positive_int("batch_size", batch_size)
    for name, val in (("n_ctrl", n_ctrl), ("max_cells", max_cells)):
        check_positive_int(name, val, allow_none=True)
    own = {"Y", "X", "A", "r", "W_A", "batch_size", "max_cells", "n_ctrl", "family",
           "cache_path", "random_state", "verbose", "gcate_kwargs", "lfc_kwargs", "client",
           "pert_col", "ctrl_label", "covariates", "layer", "drop_empty_cells", "control",
           "assignment", "return_shift", "return_factors"}
    batch_names = parameter_names(gcate_lfc_batch) - own
    check_batch_keywords("lfc", kwargs, gcate_kwargs, lfc_kwargs, extra=batch_names)
    return r_req


def _read_screen(adata: Any, pert_col: str | None, ctrl_label: Any,
                 covariates: list[str], layer: str | None, drop_empty_cells: bool,
                 treatments: pd.DataFrame | None = None) -> _Screen:
    """Validate ``adata`` and build the model inputs, keeping the treatments sparse.

    Parameters
    ----------
    adata : anndata.AnnData
        In memory, or backed (its counts then stay on disk, :mod:`causarray.ondisk`).
    pert_col, ctrl_label, covariates, layer, drop_empty_cells
        As for :func:`lfc`.
    treatments : sparse-dtype DataFrame, optional
        The treatments themselves (a guide screen's targets) instead of labels.

    Returns
    -------
    _Screen
        Counts ``Y``, one-hot treatments ``A`` (never n x a dense), ``X``, ``X_A``, the
        cells kept and the gene names.
    """
    from .preprocessing import from_anndata

    backed = bool(getattr(adata, "isbacked", False))
    if treatments is None:
        info, totals = _validate_screen(adata, pert_col, ctrl_label, covariates, layer,
                                        drop_empty_cells)
    else:
        totals = _empty_cells(adata, covariates, layer, drop_empty_cells)
        untreated = np.asarray(treatments.sparse.to_coo().sum(axis=1)).ravel() == 0
        info = dict(pert_col=None, ctrl_label=ctrl_label, n_cells=int(adata.n_obs),
                    n_genes=int(adata.n_vars), n_control=int(np.sum(untreated & (totals != 0))),
                    perturbations=[str(c) for c in treatments.columns])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropping .* cells with zero total count")
        if backed:      # counts stay on disk; each batch reads its rows (causarray.ondisk)
            from .ondisk import open_screen

            Y, A, X, X_A = open_screen(adata, info["pert_col"], info["ctrl_label"],
                                       covariates, layer, drop_empty_cells=drop_empty_cells,
                                       sparse_treatments=True, treatments=treatments)
        else:
            Y, A, X, X_A = from_anndata(adata, info["pert_col"], info["ctrl_label"],
                                        covariates, layer=layer,
                                        drop_empty_cells=drop_empty_cells,
                                        sparse_treatments=True, treatments=treatments,
                                        row_totals=totals)
    kept = pd.Index(A.index)
    if len(kept) < adata.n_obs:
        logger.warning("dropped %d cell(s) with zero total count", adata.n_obs - len(kept))
    Y_mat = Y.to_numpy() if isinstance(Y, pd.DataFrame) else Y      # ndarray, CSR, H5Counts
    return _Screen(Y=Y_mat, A=A, A_csc=_treatments_csc(A), X=X, X_A=X_A, kept=kept,
                   genes=[str(g) for g in adata.var_names], info=info,
                   covariates=covariates, backed=backed)


def _batch_layout(A_csc: sp.csc_matrix, p: int, batch_size: int, n_ctrl: int | None,
                  max_cells: int | None, memory_budget: int | str,
                  control: str = "non-targeting") -> dict:
    """Perturbations per batch and cell caps of the batch run.

    With ``n_ctrl`` and ``max_cells`` both None every cell is used and the number of
    perturbations per batch (at most ``batch_size``) is chosen so that a batch fits
    ``memory_budget`` (:func:`causarray.batch.layout_for_budget`); otherwise the caps
    are used as given.

    Returns
    -------
    dict
        ``batch_size``, ``n_ctrl``, ``max_cells`` (and ``cells_per_batch`` when
        formed from the memory budget).
    """
    from .batch import layout_for_budget

    layout = dict(batch_size=int(batch_size), n_ctrl=n_ctrl, max_cells=max_cells)
    if n_ctrl is None and max_cells is None:
        layout = layout_for_budget(A_csc, p, memory_budget, int(batch_size), control=control)
        logger.info("batches of up to %d perturbations, every cell (largest batch %d cells)",
                    layout["batch_size"], layout["cells_per_batch"])
    return layout


def _jic_table(screen: _Screen, grid: list[int], family: str, n_sub_cap: int,
               random_state: int, max_iters: int | None, cache_path: str | Path | None,
               verbose: bool) -> pd.DataFrame:
    """The JIC table of ``r='auto'``, re-used from (and stored in) the cache when given.

    The cached table is keyed by :func:`_data_fingerprint` and every setting of the
    choice (grid, family, subsample size, seed, epoch cap, package version); rows
    finished by an interrupted run with the same key are re-used as well.

    Returns
    -------
    pandas.DataFrame
        ``r, deviance, nu, JIC, time_s`` (see :func:`select_r`).
    """
    fingerprint = dict(data=_data_fingerprint(screen.Y, screen.genes, screen.A, screen.X,
                                              screen.X_A),
                       grid=grid, family=family, max_cells=n_sub_cap,
                       random_state=random_state, max_iters=max_iters, version=__version__)
    df_r = _load_cached_jic(cache_path, fingerprint)
    if df_r is None:
        logger.info("choosing r by JIC over %s on <= %s cells", grid, n_sub_cap)
        _, df_r = select_r(screen.Y, screen.X, screen.A_csc, grid, family, n_sub_cap,
                           random_state, max_iters, verbose=verbose,
                           known=_load_partial_jic(cache_path, fingerprint),
                           callback=_partial_jic_writer(cache_path, fingerprint))
        _store_jic(cache_path, fingerprint, df_r)
        _drop_partial_jic(cache_path)
    return df_r


def _choose_r(screen: _Screen, r_req: int | str, r_grid: Sequence[int] | None, family: str,
              max_cells: int | None, random_state: int, max_iters: int | None,
              cache_path: str | Path | None,
              verbose: bool) -> tuple[int, pd.DataFrame | None, list[int]]:
    """The number of latent factors: ``r_req``, or argmin JIC when it is ``'auto'``.

    ``'auto'`` evaluates JIC over ``r_grid`` (default :func:`default_r_grid`) on a
    control-priority subsample of ``max_cells`` cells (:data:`R_SUBSAMPLE` when None);
    when every JIC is NaN (no room for a factor) r = 0.

    Returns
    -------
    r : int
    df_r : pandas.DataFrame or None
        The JIC table (None for a given r).
    grid : list of int
        The grid evaluated (empty for a given r).
    """
    if r_req != "auto":
        return int(r_req), None, []
    n, p = screen.Y.shape
    n_sub_cap = R_SUBSAMPLE if max_cells is None else int(max_cells)
    n_sub = min(n, n_sub_cap)
    grid = sorted({int(v) for v in (r_grid if r_grid is not None
                                    else default_r_grid(p, n_sub))})
    df_r = _jic_table(screen, grid, family, n_sub_cap, random_state, max_iters, cache_path,
                      verbose)
    r_used = int(df_r.loc[df_r["JIC"].idxmin(), "r"]) if df_r["JIC"].notna().any() else 0
    logger.info("r = %d (minimum JIC)", r_used)
    return r_used, df_r, grid


def _cap_batch_size(layout: dict, p: int, d: int, r: int) -> None:
    """Cap the perturbations per batch so that each batch can fit ``r`` factors.

    ``fit_gcate`` needs ``r + d + a_batch < min(n, p)`` with ``d`` observed covariate
    columns and ``a_batch`` perturbations; ``layout['batch_size']`` is lowered in place
    to ``p - d - r - 1`` when that is at least 1 and below it.
    """
    if r <= 0:
        return
    room = p - d - r - 1
    if 1 <= room < layout["batch_size"]:
        logger.info("batches of at most %d perturbations: %d genes leave room for r = %d "
                    "factors beside %d observed columns", room, p, r, d)
        layout["batch_size"] = int(room)


def _named_counts(screen: _Screen) -> Any:
    """The counts with their gene names, as :func:`causarray.batch.gcate_lfc_batch` takes them.

    On-disk ``H5Counts`` already carry the names; a sparse matrix becomes a
    sparse-dtype DataFrame (it stays sparse); a dense one a DataFrame without a copy.
    """
    if screen.backed:
        return screen.Y
    if sp.issparse(screen.Y):
        return pd.DataFrame.sparse.from_spmatrix(screen.Y, columns=screen.genes)
    return pd.DataFrame(screen.Y, columns=screen.genes, copy=False)


def _gcate_options(gcate_kwargs: dict | None, max_iters: int | None) -> dict | None:
    """``gcate_kwargs`` with the epoch cap ``max_iters`` set in both GCATE stages."""
    gk = dict(gcate_kwargs or {})
    if max_iters is not None:
        for key in ("kwargs_es_1", "kwargs_es_2"):
            gk[key] = {**gk.get(key, {}), "max_iters": int(max_iters)}
    return gk or None


def _lfc_settings(screen: _Screen, adata: Any, layout: dict, r_used: int, r_req: int | str,
                  grid: list[int], opts: dict, t_start: float) -> dict:
    """The ``settings`` entry of ``adata.uns[key_added]``: what the run used.

    ``opts`` holds the options of :func:`lfc` that are stored as given (``layer``,
    ``family``, ``memory_budget``, ``random_state``, ``max_iters``, ``cache_path``,
    ``client``), and ``fit``, the factor model ``gcate_lfc_batch`` used.
    """
    n, p = screen.Y.shape
    cache_path = opts["cache_path"]
    return dict(
        pert_col=screen.info["pert_col"], ctrl_label=screen.info["ctrl_label"],
        covariates=screen.covariates, layer=opts["layer"], r=r_used, r_requested=str(r_req),
        r_grid=grid, family=opts["family"], batch_size=int(layout["batch_size"]),
        n_ctrl=layout["n_ctrl"], max_cells=layout["max_cells"],
        memory_budget=str(opts["memory_budget"]), random_state=int(opts["random_state"]),
        max_iters=opts["max_iters"], cache_path=None if cache_path is None else str(cache_path),
        dask=opts["client"] is not None, n_cells=int(n), n_cells_dropped=int(adata.n_obs - n),
        n_genes=int(p), n_perturbations=int(screen.A.shape[1]),
        n_control=screen.info["n_control"], assignment=opts["assignment"],
        fit=opts.get("fit"), causarray_version=__version__,
        elapsed_s=round(time.perf_counter() - t_start, 3),
    )


@dataclass(frozen=True)
class GuideOptions:
    """How a screen given as guide counts is read and analysed (see :func:`lfc`)."""

    guides: Any
    guide_targets: Any = None
    nt_label: str = "non-targeting"
    guide_threshold: int = 5
    guide_assignment: str = "threshold"
    moi: str = "auto"
    control: str = "auto"
    pairs: Any = "all"
    gene_positions: Any = None
    cis_window: int = 1_000_000
    moi_covariates: bool = True
    min_target_cells: int = 7
    test_targets: Any = None
    nt_guide_tests: bool = True


def _check_guide_options(g: GuideOptions) -> GuideOptions:
    """Check every guide option before any data is read (names as the keywords)."""
    from ._validation import (
        MOI_CHOICES,
        check_choice,
        check_guide_threshold,
        check_nt_guide_tests,
        check_nt_label,
        check_pairs,
    )
    from .guides import ASSIGNMENT_METHODS

    check_guide_threshold(g.guide_threshold)
    check_choice("guide_assignment", g.guide_assignment, ASSIGNMENT_METHODS)
    check_choice("moi", g.moi, MOI_CHOICES)
    check_choice("control", g.control, ("auto", "complement", "non-targeting"))
    check_positive_int("cis_window", g.cis_window)
    check_positive_int("min_target_cells", g.min_target_cells)
    check_nt_label(g.nt_label)
    check_nt_guide_tests(g.nt_guide_tests)
    return GuideOptions(**{**g.__dict__, "pairs": check_pairs(g.pairs)})


def _guide_settings(g: GuideOptions, moi: str, control: str, ga, n_pairs: int | None) -> dict:
    """The guide part of ``settings`` (what a re-run and the report show)."""
    src = g.guides if isinstance(g.guides, str) else type(g.guides).__name__
    return dict(guides=str(src), nt_label=g.nt_label, guide_threshold=int(g.guide_threshold),
                guide_assignment=g.guide_assignment, moi=moi, control=control,
                pairs=g.pairs if isinstance(g.pairs, str) else "table",
                n_pairs_requested=n_pairs, cis_window=int(g.cis_window),
                moi_covariates=bool(g.moi_covariates),
                min_target_cells=int(g.min_target_cells), n_guides=int(ga.names.size),
                n_nt_guides=int(ga.is_nt.sum()),
                test_targets=None if g.test_targets is None else "slice")


def _lfc_low_moi(adata: Any, ga, g: GuideOptions, args: dict) -> None:
    """A low-MOI guide screen: one label per cell (its target, or the non-targeting
    label), cells without a guide or with two or more perturbations left out, then the
    label route on those cells; the stored results are those of the labels."""
    from .guides import low_moi_labels

    labels, dropped = low_moi_labels(ga, g.nt_label)
    keep = np.array([lab is not None for lab in labels])
    if (~keep).any():
        logger.warning("low MOI: %d cell(s) left out (%s)", int((~keep).sum()),
                       ", ".join(f"{v} {k}" for k, v in dropped.items() if v))
    col = "causarray_target"
    adata.obs[col] = pd.Categorical(np.where(keep, labels, None))
    sub = adata if keep.all() else adata[keep].copy()
    guide_keys = set(GuideOptions.__dataclass_fields__)
    run = {k: v for k, v in args.items()
           if k not in guide_keys | {"adata", "copy", "kwargs", "pert_col", "ctrl_label"}}
    run.update(args["kwargs"], pert_col=col, ctrl_label=g.nt_label, copy=False)
    lfc(sub, **run)
    if sub is adata:
        return
    key = args["key_added"]
    adata.uns[key] = sub.uns[key]
    for name in list(sub.obsm.keys()):
        if name.startswith(key):
            adata.obsm[name] = sub.obsm[name].reindex(adata.obs_names)


def _read_guide_screen(adata: Any, expr: Any, ga, g: GuideOptions, covariates: list[str],
                       layer: str | None, drop_empty_cells: bool) -> tuple[_Screen, Any]:
    """The counts and designs of a high-MOI screen, with the guide treatment columns.

    The treatments are the targets' pooled guides and the non-targeting guides
    (:func:`causarray.highmoi.treatment_columns`), read with the counts by
    :func:`_read_screen`; ``X`` gains the capture covariates (library size and genes
    detected, docs/math.md#high-moi) unless ``moi_covariates`` is off.
    """
    from .highmoi import (MOI_COVARIATES, add_independent_columns, moi_polynomial,
                          treatment_columns)

    only = None
    if g.test_targets is not None:
        from ._validation import check_test_targets

        only = check_test_targets(g.test_targets, ga.target_names)
    cols = treatment_columns(ga, g.min_target_cells, negative_controls=bool(g.nt_guide_tests),
                             only=only)
    T = pd.DataFrame.sparse.from_spmatrix(cols.A, index=expr.obs_names,
                                          columns=pd.Index(cols.names, dtype=object))
    screen = _read_screen(expr, None, g.nt_label, covariates, layer, drop_empty_cells, T)
    if g.moi_covariates:   # the MOI and capture covariates, each unless collinear
        from .preprocessing import standardized_log_genes_detected

        obs = expr.obs.loc[screen.kept]
        poly, poly_names = moi_polynomial(obs["n_guides"].to_numpy(float))
        moi = [obs[c].to_numpy(float) for c in MOI_COVARIATES]
        extra = np.column_stack([moi[0], poly] + moi[1:]
                                + [screen.X_A[:, -1], standardized_log_genes_detected(screen.Y)])
        names = list(MOI_COVARIATES)
        screen.X, kept = add_independent_columns(
            screen.X, extra, names[:1] + poly_names + names[1:]
            + ["log2_library_size", "log_genes_detected"])
        screen.covariates = screen.covariates + kept
    return screen, cols


def _carried(adata: Any, screen: _Screen, g: GuideOptions, control: str) -> tuple | None:
    """What the other-target correction needs in the complement design: the cells'
    treatment matrix and their strata (the number of guides, when it is in ``X``)."""
    if control != "complement":
        return None
    strata = adata.obs.loc[screen.kept, "n_guides"].to_numpy() if g.moi_covariates else None
    return screen.A_csc, strata


def _finish_guide_results(results: pd.DataFrame, cols, ga, pairs: pd.DataFrame | None,
                          carried: tuple | None = None) -> dict:
    """Correct for the other targets' known effects (``carried``: the cells' treatment
    matrix and their strata, for the complement design), split the negative controls
    off, restrict the pairs and build the guide tables."""
    from .calibration_stats import nt_guide_calibration
    from .highmoi import correct_for_other_targets, restrict_pairs, split_negative_controls

    if carried is not None:
        results = correct_for_other_targets(results, carried[0], cols.names, cols.targets,
                                            carried[1])
    table, negatives = split_negative_controls(results, cols.nt_guides)
    table = restrict_pairs(table, pairs)
    targets = ga.target_table()
    targets["tested"] = targets["target"].isin(cols.targets)
    guides = ga.guide_table()
    out: dict[str, Any] = dict(results=table, guides=guides, targets=targets,
                               negative_controls=negatives)
    if len(negatives):
        n_cells = dict(zip(guides["guide"], guides["cells"]))
        out["calibration"] = nt_guide_calibration(negatives, n_cells).summary_frame()
    out["_n_pairs"] = None if pairs is None else int(len(pairs))
    return out


def _guide_screen(adata: Any, g: GuideOptions, covariates: list[str], layer: str | None,
                  drop_empty_cells: bool, args: dict):
    """The guide route of :func:`lfc`: assign the guides, decide the MOI and the control
    arm (logged in one line), then either run a low-MOI screen on its labels (returns
    None: stored) or return the high-MOI screen ``(screen, columns, assignment,
    control, lfc_kwargs)``."""
    from .guides import guide_assignment, infer_moi
    from .highmoi import positive_control_map, write_cell_statistics

    ga, gene_cols = guide_assignment(adata, g.guides, g.guide_targets, g.nt_label,
                                     g.guide_assignment, g.guide_threshold,
                                     args["random_state"])
    cells = write_cell_statistics(adata.obs, ga)
    moi = infer_moi(cells, adata.uns.get("layout")) if g.moi == "auto" else g.moi
    control = ("complement" if g.control == "auto" else g.control) if moi == "high" \
        else "non-targeting"
    logger.info("design: %s MOI (median %.0f guides per cell), each target against %s, "
                "assignment=%r", moi, float(np.median(cells["n_guides"])),
                "the cells without its guides" if control == "complement"
                else "the cells without a targeting guide",
                args["assignment"])
    key = args["key_added"]
    if moi == "low":
        _lfc_low_moi(adata, ga, g, args)
        adata.uns[key]["settings"].update(_guide_settings(g, moi, control, ga, None))
        adata.uns[key].update(guides=ga.guide_table(), targets=ga.target_table())
        return None
    expr = adata if gene_cols is None else adata[:, gene_cols]
    if g.nt_guide_tests == "required":             # the calibration needs them
        from ._validation import check_nt_guides

        check_nt_guides(int(ga.is_nt.sum()), g.nt_label)
    from .highmoi import requested_pairs

    pairs = requested_pairs(g.pairs, expr.var, adata.uns, g.gene_positions, g.cis_window)
    screen, cols = _read_guide_screen(adata, expr, ga, g, covariates, layer, drop_empty_cells)
    screen.genes = [str(v) for v in expr.var_names]
    lfc_kwargs = dict(args["lfc_kwargs"] or {})
    lfc_kwargs.setdefault("targets", positive_control_map(adata.uns) or "auto")
    return screen, cols, ga, control, lfc_kwargs, pairs


#: obs columns that name the donor (sample, individual) of a cell: a cell-level run on a
#: screen whose labels are constant within one of them is warned about.
DONOR_COLUMNS = ("donor", "donor_id", "individual", "patient", "patient_id", "subject",
                 "subject_id", "sample", "sample_id")


def _warn_cell_level_donors(obs: pd.DataFrame, pert_col: str) -> None:
    """Warn when the labels are constant within the levels of a donor-like column: cells
    of one donor are not independent, and a cell-level test counts every donor
    difference once per cell."""
    labels = obs[pert_col].astype(str)
    for col in DONOR_COLUMNS:
        if col not in obs.columns or col == pert_col:
            continue
        donors = obs[col].astype(str)
        n_levels = donors.nunique()
        per_donor = pd.DataFrame({"d": donors, "l": labels}).groupby("d")["l"].nunique()
        if 4 <= n_levels <= len(obs) / 10 and int(per_donor.max()) == 1:
            message = (f"the labels of obs[{pert_col!r}] are constant within each of the "
                       f"{n_levels} levels of obs[{col!r}]: cells of one donor are not "
                       "independent and a cell-level test calls donor differences; use the "
                       f"donor route: tl.lfc(adata, condition_key={pert_col!r}, "
                       f"control_condition=..., donor_key={col!r}) or causarray run "
                       f"--condition-key {pert_col} --control-condition ... --donor-key {col}")
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
            return


def _check_route(args: dict) -> GuideOptions | None:
    """The design options of :func:`lfc` (``args``: its arguments), checked before any
    data is read: the assignment, the donor route's keys, and the guide options (returned
    as :class:`GuideOptions` when ``guides`` is given)."""
    if args["assignment"] is not None:
        check_assignment(args["assignment"])
    check_donor_route(args["condition_key"], args["control_condition"], args["donor_key"])
    check_choice("donor_variance", args["donor_variance"],
                 ("jackknife", "jackknife_raw", "influence"))
    if args["guides"] is None:
        return None
    return _check_guide_options(GuideOptions(
        **{k: args[k] for k in GuideOptions.__dataclass_fields__}))


def _donor_design(pb: Any, st: dict, args: dict, covariates: list[str]) -> np.ndarray:
    """The donors' outcome design of a donor run: intercept, the donor covariates'
    design columns, the full fit's factors U (``obsm[key_added + '_factors']``) and one
    indicator per condition other than the control."""
    from .preprocessing import covariate_design

    r = int(st["settings"]["r"])
    factors = pb.obsm.get(f"{args['key_added']}_factors")
    factors = None if factors is None else np.asarray(factors, dtype=float)
    check_donor_factors(r == 0 or (factors is not None and bool(np.isfinite(factors).all())),
                        args["cache_path"])
    cond = pb.obs[args["condition_key"]].astype(str).to_numpy()
    others = sorted(set(cond) - {str(args["control_condition"])})
    parts = [np.ones((pb.n_obs, 1)), covariate_design(pb.obs, covariates).to_numpy(float),
             np.zeros((pb.n_obs, 0)) if r == 0 else factors,
             np.column_stack([cond == c for c in others]).astype(float)]
    return np.hstack(parts)


def _donor_jackknife(pb: Any, st: dict, args: dict, covariates: list[str],
                     run: dict, moderate: bool = True) -> pd.DataFrame:
    """The delete-one-donor jackknife of a donor run (:func:`causarray.pseudobulk.
    jackknife_tests`): the same analysis, r fixed at the one used, once per donor left
    out; the donors' leverages come from :func:`_donor_design`."""
    from .pseudobulk import jackknife_tests

    def row_keys(df: pd.DataFrame) -> pd.Series:
        genes = df["gene_names"].astype(str)
        return df["trt"].astype(str) + "\x00" + genes if "trt" in df else genes

    design = _donor_design(pb, st, args, covariates)
    res = st["results"]
    keys = row_keys(res)
    reps = np.full((pb.n_obs, len(res)), np.nan)
    rerun = dict(run, r=int(st["settings"]["r"]), propensity=False, verbose=False)
    for i in range(pb.n_obs):
        sub = pb[np.arange(pb.n_obs) != i].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lfc(sub, pert_col=args["condition_key"],
                ctrl_label=str(args["control_condition"]), covariates=covariates,
                cache_path=None, **{k: v for k, v in rerun.items() if k != "cache_path"})
        r_i = sub.uns[args["key_added"]]["results"]
        tau_i = pd.Series(r_i["tau"].to_numpy(), index=row_keys(r_i))
        reps[i] = tau_i.reindex(keys).to_numpy()
    return jackknife_tests(res, reps, design, moderate=moderate)


def _lfc_donors(adata: Any, args: dict, covariates: list[str]) -> None:
    """The donor route: per group (or once), the donors' pseudobulk through the label
    route; the groups' tables stacked (``group`` column) into ``adata.uns[key_added]``."""
    from .pseudobulk import pseudobulk

    key, groupby = args["key_added"], args["groupby"]
    assignment = args["assignment"] or "observational"
    groups: list = [None]
    if groupby is not None:
        check_obs_column("groupby", groupby, adata.obs)
        groups = sorted(adata.obs[groupby].astype(str).unique())
    skip = set(GuideOptions.__dataclass_fields__) | {
        "adata", "copy", "kwargs", "condition_key", "control_condition", "donor_key",
        "groupby", "pert_col", "ctrl_label", "covariates", "layer", "cache_path",
        "donor_variance",
        "assignment"}
    run = {k: v for k, v in args.items() if k not in skip}
    run.update(args["kwargs"], assignment=assignment, copy=False, layer=None)
    # one batch of all conditions: one factor model of the donors, whose U the
    # jackknife's leverages need
    n_conditions = adata.obs[args["condition_key"]].astype(str).nunique() - 1
    run["batch_size"] = max(int(run["batch_size"]), n_conditions)
    logger.info("donor route: %s vs %s in obs[%r], donors obs[%r]%s, assignment=%r",
                "other conditions", args["control_condition"], args["condition_key"],
                args["donor_key"], "" if groupby is None else f", per obs[{groupby!r}]",
                assignment)
    tables, shifts, donors, settings = [], [], {}, None
    for grp in groups:
        cells = None if grp is None else \
            np.flatnonzero(adata.obs[groupby].astype(str).to_numpy() == grp)
        pb = pseudobulk(adata, args["condition_key"], args["control_condition"],
                        args["donor_key"], covariates, args["layer"], cells)
        cache = args["cache_path"]
        lfc(pb, pert_col=args["condition_key"], ctrl_label=str(args["control_condition"]),
            covariates=covariates,
            cache_path=None if cache is None else f"{cache}.{grp or 'all'}.h5", **run)
        st = pb.uns[key]
        if args["donor_variance"] != "influence":
            st["results"] = _donor_jackknife(pb, st, args, covariates, run,
                                             moderate=args["donor_variance"] == "jackknife")
        tables.append(st["results"] if grp is None else st["results"].assign(group=grp))
        if st.get("shift") is not None:
            shifts.append(st["shift"] if grp is None else st["shift"].assign(group=grp))
        factors = pb.obsm.get(f"{key}_factors")
        donors[grp or "all"] = pb.obs.copy() if factors is None else pb.obs.join(factors)
        settings = settings or dict(st["settings"])
    settings.update(route="donor", condition_key=args["condition_key"],
                    control_condition=str(args["control_condition"]),
                    donor_key=args["donor_key"], groupby=groupby,
                    n_donors=int(len(donors[groups[0] or "all"])), assignment=assignment,
                    donor_variance=args["donor_variance"])
    adata.uns[key] = dict(results=pd.concat(tables, ignore_index=True), settings=settings,
                          shift=pd.concat(shifts, ignore_index=True) if shifts else None,
                          design_warning=None, jic=None, donors=donors)


def lfc(adata: Any, *, pert_col: str | None = None, ctrl_label: Any = None,
        covariates: str | Iterable[str] = (), layer: str | None = None, r: int | str = "auto",
        family: str = "nb", batch_size: int = 15, n_ctrl: int | None = None,
        max_cells: int | None = None, memory_budget: int | str = "2GB",
        cache_path: str | Path | None = None, client: Any = None, random_state: int = 0,
        verbose: bool | None = None, r_grid: Sequence[int] | None = None,
        max_iters: int | None = None, propensity: bool = True, key_added: str = "causarray",
        copy: bool = False, drop_empty_cells: bool = False,
        gcate_kwargs: dict | None = None, lfc_kwargs: dict | None = None,
        guides: Any = None, guide_targets: Any = None, nt_label: str = "non-targeting",
        guide_threshold: int = 5, guide_assignment: str = "threshold", moi: str = "auto",
        control: str = "auto", pairs: Any = "all", gene_positions: Any = None,
        cis_window: int = 1_000_000, moi_covariates: bool = True, min_target_cells: int = 7,
        test_targets: Any = None, nt_guide_tests: bool = True,
        assignment: str | None = None, condition_key: str | None = None,
        control_condition: Any = None, donor_key: str | None = None,
        groupby: str | None = None, donor_variance: str = "jackknife", **kwargs) -> Any:
    """Causal log fold changes of every gene under every perturbation of an AnnData screen.

    In scanpy's manner: every option is keyword-only; the results are stored in
    ``adata.uns[key_added]`` (read them with :func:`causarray.get.results`) and ``adata``
    is returned only with ``copy=True``.

    Parameters
    ----------
    adata : anndata.AnnData
        Raw counts (cells x genes) in ``X`` or ``layers[layer]``; perturbation labels in
        ``obs[pert_col]``.  An AnnData opened with ``anndata.read_h5ad(path,
        backed='r')`` keeps its counts on disk: validation, size factors and library
        sizes are computed in streamed row-block passes and each batch reads only its
        own rows (:mod:`causarray.ondisk`); the results equal those of the same file read
        into memory.
    pert_col : str, optional
        Label column (default ``adata.uns['pert_col']``).
    ctrl_label : optional
        Label of control cells (default ``adata.uns['ctrl_label']``).
    covariates : str or iterable of str
        ``obs`` columns adjusted for in both the outcome and the propensity model.
    layer : str, optional
        Layer with the raw counts.
    r : 'auto' or int
        Number of latent confounders; ``'auto'`` picks argmin JIC over ``r_grid``
        (default :func:`default_r_grid`) on a control-priority subsample of
        ``max_cells`` (or 2,000) cells. ``0``: no latent factors, the doubly robust step
        on the observed design only (same batches, same cache).
    family : {'nb', 'poisson'}
    batch_size : int
        Largest number of perturbations per batch (fewer when a batch with all its
        cells would not fit ``memory_budget``).
    n_ctrl, max_cells : int or None
        Caps on the control cells shared by all batches and on the treated cells per
        batch.  ``None`` (default): every cell; the batches are formed from
        ``memory_budget`` instead.
    memory_budget : int or str
        Estimated memory one batch may take (``'2GB'``, ``'512MB'`` or bytes), used
        when ``n_ctrl`` and ``max_cells`` are None; see
        :func:`causarray.batch.layout_for_budget`.
    cache_path : str or Path, optional
        HDF5 batch cache; a re-run with the same settings resumes from it (the JIC
        table is cached next to it as ``<cache_path>.jic.csv``).
    client : dask.distributed.Client, optional
        Run the batches in parallel on a Dask cluster.
    random_state : int
        Seed of every subsample.
    verbose : bool or None
        Progress bars; None follows ``scanpy.settings.verbosity`` (see
        :func:`resolve_verbose`).
    r_grid : sequence of int, optional
        Grid for ``r='auto'``.
    max_iters : int, optional
        Cap on the GCATE alternating-minimisation epochs (both stages and JIC fits).
    propensity : bool
        Compute observed-design propensity scores and their overlap summary.
    key_added : str
        Key in ``adata.uns`` (and prefix in ``adata.obsm``).
    copy : bool
        Work on a copy of ``adata`` and return it; ``adata`` is left unchanged.
    drop_empty_cells : bool
        Leave out cells without any count (their propensity scores are NaN) instead
        of raising.
    gcate_kwargs, lfc_kwargs : dict, optional
        Keyword arguments of :func:`causarray.fit_gcate` / :func:`causarray.LFC`.
    guides : str or AnnData, optional
        A screen given as guide UMI counts instead of labels (high-MOI and multi-guide
        screens; ``docs/usage.md#guide-screens``): ``'feature_types'`` (Cell Ranger's
        guide-capture features inside ``adata``), ``'obsm:KEY'`` (a cells x guides
        matrix in ``obsm``, names in ``uns['KEY_names']`` or ``uns['grna_names']``,
        targets in ``uns['grna_target']``), or a cells x guides AnnData (``var['target']``;
        a MuData modality is one) or its ``.h5ad`` path.  Per cell ``n_guides``,
        ``n_targets``, ``n_nt_guides``, ``guide_umis`` and the MOI covariates
        ``log1p_n_guides``, ``log1p_guide_umis`` are written to ``obs``.
    guide_targets : DataFrame or CSV path, optional
        Guide -> target table (``guide,target`` or Cell Ranger's feature reference).
    nt_label : str
        Target label of the non-targeting guides.
    guide_threshold, guide_assignment : int, str
        Guide-to-cell assignment (:func:`causarray.guides.assign_guides`): 'threshold'
        (UMIs >= ``guide_threshold``, default 5), 'maximum' or 'mixture'.
    moi : {'auto', 'low', 'high'}
        'auto': ``uns['layout']`` when the file states it ('high-moi' / 'low-moi'),
        else high when the median cell carries two or more guides.  Low MOI keeps the
        cells with one perturbation (or only non-targeting guides: the controls) and
        runs the label analysis; high MOI tests every target against ``control``.
    control : {'auto', 'complement', 'non-targeting'}
        High MOI: the cells without the target's guides ('complement', the default) or
        the cells without any targeting guide ('non-targeting').
    pairs : 'all', 'cis' or a table / CSV of ``target, gene``
        The pairs reported (high MOI).  'cis': genes whose TSS is within ``cis_window``
        bases of the target (positions from ``var['chr']``/``var['tss']`` or
        ``gene_positions``, and ``uns['target_table']``).  With a restriction, the
        kept discovery pairs form one BH family and the positive-control pairs
        (``uns['positive_control_pairs']``) another.
    gene_positions : DataFrame or CSV path with ``gene, chr, tss``, optional
    cis_window : int
        Bases between a target and a gene's TSS for ``pairs='cis'`` (default 1 Mb, the
        window of Gasperini et al. 2019).
    moi_covariates : bool
        Adjust for the MOI covariates in high MOI (switch off only to see why they are
        needed).
    min_target_cells : int
        Targets carried by fewer cells are not tested (warned, ``targets['tested']``).
    test_targets : list of str, comma-separated str or file, optional
        Test these targets only (a slice of a large screen; the others stay in the
        cells' background).
    assignment : {'randomized', 'observational'}, optional
        The design (``docs/gcate.md``): 'randomized' (CRISPR screens: a perturbation's
        shift of the cells' latent state beyond chance is kept as its effect, the
        propensity models use the observed design) or 'observational' (case-control
        studies: the whole shift is confounding and is removed).  Default: 'randomized',
        and 'observational' on the donor route.  Stored in ``settings`` and the cache
        fingerprint, and logged in one line.
    condition_key, control_condition, donor_key, groupby : optional
        The donor route of a case-control study (``docs/usage.md#case-control-studies``):
        the condition column and its control value, the donor column, and optionally a
        cell-type column.  Raw counts are summed per donor (per group), donor-level
        ``covariates`` are carried, and the factor model and the doubly robust step run
        on donors (:mod:`causarray.pseudobulk`); ``results`` gain a ``group`` column
        with ``groupby``.
    donor_variance : {'jackknife', 'jackknife_raw', 'influence'}
        The donor route's standard errors: the delete-one-donor jackknife (default; one
        refit per donor, r fixed; each donor weighted by one minus its leverage in
        the outcome model, on Bell and McCaffrey's degrees of freedom, at most n - k),
        its variances moderated by
        empirical Bayes across the genes around a trend in mean expression (as limma;
        ``std_jackknife`` keeps the unmoderated ones, ``std_influence`` the sandwich);
        ``'jackknife_raw'`` the jackknife alone; or ``'influence'``, the
        influence-function variance of the doubly robust estimate.
    nt_guide_tests : bool or 'required'
        Test every non-targeting guide against its complement (the high-MOI
        calibration; ``causarray run --calibration off`` switches it off); 'required'
        also stops, before any fit, when the screen has no non-targeting guide
        (``--calibration on``).
    **kwargs
        Passed to :func:`causarray.batch.gcate_lfc_batch`.  An unknown keyword (here or
        in ``gcate_kwargs`` / ``lfc_kwargs``) raises ``TypeError``.

    Returns
    -------
    anndata.AnnData or None
        The modified copy with ``copy=True``, else None.  ``adata.uns[key_added]``
        holds ``results`` (one row per (perturbation, gene): the columns of
        :func:`causarray.LFC` plus ``trt`` and ``batch``), ``settings``, ``jic``,
        ``propensity`` (overlap summary over each comparison's cells) and
        ``propensity_coef`` (the models' coefficients); the design is in
        ``adata.obsm[key_added + '_propensity_design']`` and, when cells x
        perturbations <= :data:`PROPENSITY_TABLE_MAX`, the scores in
        ``adata.obsm[key_added + '_propensity']`` (else :func:`propensity_scores`);
        when one batch fitted the screen, the cells' latent factors U in
        ``adata.obsm[key_added + '_factors']`` (columns ``factor_1`` ...).
    """
    args = dict(locals())
    from .batch import gcate_lfc_batch

    t_start = time.perf_counter()
    r_req = _check_lfc_args(r, family, batch_size, n_ctrl, max_cells, kwargs, gcate_kwargs,
                            lfc_kwargs)
    gopt = _check_route(args)
    verbose = resolve_verbose(verbose)
    if copy:
        check_copy_in_memory(bool(getattr(adata, "isbacked", False)))
        adata = adata.copy()
    covariates = [covariates] if isinstance(covariates, str) else list(covariates)
    if donor_key is not None:
        _lfc_donors(adata, args, covariates)
        return adata if copy else None
    assignment = "randomized" if assignment is None else assignment
    control_used, cols, ga = "non-targeting", None, None
    if gopt is None:
        screen = _read_screen(adata, pert_col, ctrl_label, covariates, layer,
                              drop_empty_cells)
        _warn_cell_level_donors(adata.obs, screen.info["pert_col"])
    else:
        guided = _guide_screen(adata, gopt, covariates, layer, drop_empty_cells, args)
        if guided is None:              # low MOI: the label route has stored everything
            return adata if copy else None
        screen, cols, ga, control_used, lfc_kwargs, pairs = guided
        propensity = False      # the per-label overlap summary assumes one label per cell
    p = screen.Y.shape[1]
    layout = _batch_layout(screen.A_csc, p, batch_size, n_ctrl, max_cells, memory_budget,
                           control_used)
    r_used, df_r, grid = _choose_r(screen, r_req, r_grid, family, max_cells, random_state,
                                   max_iters, cache_path, verbose)
    _cap_batch_size(layout, p, np.shape(screen.X)[1], r_used)

    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    results, shift, factors = gcate_lfc_batch(
        _named_counts(screen), screen.X, screen.A, r_used, W_A=screen.X_A,
        batch_size=layout["batch_size"], max_cells=layout["max_cells"],
        n_ctrl=layout["n_ctrl"], family=family,
        cache_path=None if cache_path is None else str(cache_path),
        random_state=random_state, verbose=verbose,
        gcate_kwargs=_gcate_options(gcate_kwargs, max_iters), lfc_kwargs=lfc_kwargs,
        client=client, control=control_used, assignment=assignment, return_factors=True,
        **kwargs)

    from .batch import design_warning

    store: dict[str, Any] = dict(results=results.reset_index(drop=True), jic=df_r,
                                 shift=shift, design_warning=design_warning(shift, assignment))
    if gopt is not None:
        store.update(_finish_guide_results(store["results"], cols, ga, pairs,
                                           _carried(adata, screen, gopt, control_used)))
    if propensity:
        store.update(_propensity(adata, screen.A_csc, list(screen.A.columns), screen.X_A,
                                 screen.kept, covariates, random_state, key_added))
    opts = dict(layer=layer, family=family, memory_budget=memory_budget,
                random_state=random_state, max_iters=max_iters, cache_path=cache_path,
                client=client, assignment=assignment, fit=shift.attrs.get("fit"))
    store["settings"] = _lfc_settings(screen, adata, layout, r_used, r_req, grid, opts, t_start)
    if gopt is not None:
        store["settings"].update(_guide_settings(gopt, "high", control_used, ga,
                                                 store.pop("_n_pairs")))
    _store_factors(adata, factors, screen.kept, key_added)
    adata.uns[key_added] = store
    return adata if copy else None


def _store_factors(adata: Any, factors: np.ndarray | None, kept: pd.Index,
                   key_added: str) -> None:
    """The cells' latent factors U in ``adata.obsm[key_added + '_factors']`` (columns
    ``factor_1`` ...; NaN for cells not fitted) when one batch fitted the screen;
    otherwise an earlier run's entry is removed."""
    name = f"{key_added}_factors"
    if factors is None:
        if name in adata.obsm:
            del adata.obsm[name]
        return
    adata.obsm[name] = pd.DataFrame(
        factors, index=kept, columns=[f"factor_{j + 1}" for j in range(factors.shape[1])]
    ).reindex(adata.obs_names)
