"""Data preparation: count capping, designs, size factors and AnnData entry points.

Functions
---------
prep_causarray_data
    Capped counts and the outcome / propensity designs (docs/math.md#data-preparation).
comp_size_factor
    Per-cell size factors: median of ratios on expressed genes, library size or
    fixed scale (docs/math.md#size-factors).
from_anndata
    Build ``(Y, A, X, X_A)`` from an AnnData screen (one label column per cell).
subset_screen
    Keep the most frequent perturbations and a random sample of control cells.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from causarray._validation import (
    as_count_matrix,
    check_at_least,
    check_cells_nonempty,
    check_choice,
    check_covariates,
    check_has_perturbed,
    check_layer,
    check_no_empty_cells,
    check_obs_columns,
    check_positive,
    check_size_factors,
    check_treatment,
    check_x_present,
    row_sums,
)
from causarray._validation import resolve_screen_keys as _resolve_screen_keys

__all__ = [
    "cap_counts",
    "comp_size_factor",
    "count_cap",
    "covariate_design",
    "from_anndata",
    "prep_causarray_data",
    "sparse_treatment_matrix",
    "standardized_log2_library_size",
    "subset_screen",
    "treatment_matrix",
]

logger = logging.getLogger("causarray")

#: Percentile of the per-gene maxima used as the count cap (docs/math.md#data-preparation).
CAP_PERCENTILE = 99.9


# ----------------------------------------------------------------------------- capping
def _gene_maxima(Y: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """Per-gene maxima m_j = max_i y_ij as float64 (implicit zeros included)."""
    if sp.issparse(Y):
        return np.asarray(Y.max(axis=0).toarray(), dtype=np.float64).ravel()
    return np.asarray(Y.max(axis=0), dtype=np.float64)


def count_cap(Y: np.ndarray | sp.csr_matrix) -> float:
    """Count cap q: the 99.9th percentile of the per-gene maxima, rounded.

    q = round(percentile_{99.9}({max_i y_ij}_j)) with numpy's default linear
    interpolation and round-half-to-even.

    Parameters
    ----------
    Y : ndarray or scipy.sparse.csr_matrix, shape (n, p)
        Non-negative counts.

    Returns
    -------
    float
        The integer-valued cap.
    """
    return float(np.round(np.percentile(_gene_maxima(Y), CAP_PERCENTILE)))


def cap_counts(
    Y: np.ndarray | sp.csr_matrix, cap: float | None = None
) -> tuple[np.ndarray | sp.csr_matrix, float]:
    """Winsorise counts: y_ij -> min(y_ij, q).

    Parameters
    ----------
    Y : ndarray or scipy.sparse.csr_matrix, shape (n, p)
        Non-negative counts (not modified).
    cap : float, optional
        The cap q; by default :func:`count_cap` of ``Y``.

    Returns
    -------
    Y_capped : same type and dtype as ``Y``
    cap : float
    """
    q = count_cap(Y) if cap is None else float(cap)
    if sp.issparse(Y):
        out = Y.copy()
        np.minimum(out.data, out.dtype.type(q), out=out.data)
        return out, q
    return np.minimum(Y, Y.dtype.type(q)), q


def standardized_log2_library_size(
    Y: np.ndarray | sp.spmatrix, cell_names: Sequence[Any] | None = None
) -> np.ndarray:
    """Standardised log2 library size (ell_i - mean ell) / sd(ell), ell_i = log2 sum_j y_ij.

    The SD is the sample SD (denominator n - 1).

    Parameters
    ----------
    Y : ndarray or scipy.sparse matrix, shape (n, p)
        Counts without empty cells.
    cell_names : sequence, optional
        Cell names for the error message about empty cells.

    Returns
    -------
    ndarray, shape (n,)
        Zeros (with a ``UserWarning``) when all library sizes are equal or n = 1,
        since the standardisation is then undefined.

    Raises
    ------
    ValueError
        If a cell has zero total count.
    """
    totals = row_sums(Y)                  # one pass: the emptiness check reads these sums
    check_no_empty_cells(Y, cell_names, totals=totals)
    ell = np.log2(totals)
    sd = float(np.std(ell, ddof=1)) if ell.size > 1 else 0.0
    if not sd > 0:
        warnings.warn(
            "all cells have the same library size; the standardised log2 library size "
            "column is set to 0",
            UserWarning,
            stacklevel=2,
        )
        return np.zeros_like(ell)
    return (ell - ell.mean()) / sd


# ----------------------------------------------------------------------------- prep
def standardized_log_genes_detected(Y: Any) -> np.ndarray:
    """Standardised log of the genes detected (non-zero counts) per cell.

    SCEPTRE's ``response_n_nonzero``: with the library size it describes how much of a
    cell's RNA was captured, which in a high-MOI screen also decides which of its guides
    are detected (docs/math.md#high-moi).  ``Y`` is a dense or CSR matrix, or on-disk
    counts with ``row_blocks`` (:class:`causarray.ondisk.H5Counts`, streamed).
    """
    if hasattr(Y, "row_blocks"):
        nnz = np.zeros(Y.shape[0])
        for a, b, block in Y.row_blocks():
            nnz[a:b] = np.asarray((block != 0).sum(axis=1)).ravel()
    elif sp.issparse(Y):
        nnz = np.asarray((Y != 0).sum(axis=1), dtype=float).ravel()
    else:
        nnz = np.count_nonzero(np.asarray(Y), axis=1).astype(float)
    ell = np.log(np.maximum(nnz, 1.0))
    sd = float(np.std(ell, ddof=1)) if ell.size > 1 else 0.0
    return (ell - ell.mean()) / sd if sd > 0 else np.zeros_like(ell)


def _dataframe_like(values: np.ndarray | sp.csr_matrix, like: pd.DataFrame) -> pd.DataFrame:
    """Wrap ``values`` with the index and columns of ``like`` (sparse -> sparse frame)."""
    if sp.issparse(values):
        return pd.DataFrame.sparse.from_spmatrix(values, index=like.index, columns=like.columns)
    return pd.DataFrame(values, index=like.index, columns=like.columns)


def prep_causarray_data(
    Y: Any,
    A: Any,
    X: Any = None,
    X_A: Any = None,
    intercept: bool = True,
) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """Prepare counts, treatments and designs for causarray (docs/math.md#data-preparation).

    Steps, in order:

    1. Cap every count at q = round(99.9th percentile of the per-gene maxima).
       No gene or cell is removed.
    2. ``A`` becomes a 2-D float 0/1 matrix (a 1-D vector is one column); a DataFrame
       (or Series) keeps its index and column names, matched to ``Y`` by position.
    3. ``X = None`` -> n x 0; ``X_A = None`` -> ``X_A := X`` (before the intercept).
    4. The log2 library size of the *capped* counts, standardised with the sample SD
       (ddof=1), is appended as the last column of ``X_A``.
    5. If ``intercept``, a column of ones is prepended to ``X`` and ``X_A``.

    Parameters
    ----------
    Y : ndarray, pandas.DataFrame or scipy.sparse matrix, shape (n, p)
        Raw counts. Non-integer entries are rounded with a warning.
    A : array-like, pandas.DataFrame or Series, shape (n, a) or (n,)
        0/1 treatment indicators; control cells have all-zero rows.
    X : array-like or pandas.DataFrame, shape (n, d0), optional
        Numeric outcome covariates without intercept.
    X_A : array-like or pandas.DataFrame, shape (n, d_A0), optional
        Numeric propensity covariates without intercept; defaults to ``X``.
    intercept : bool
        Prepend a column of ones to both designs.

    Returns
    -------
    Y : capped counts, shape (n, p)
        Same container as the input: a DataFrame stays a DataFrame (index, gene names
        and dtype kept), sparse input is returned as ``csr_matrix``, dense as ndarray.
    A : pandas.DataFrame or ndarray of float64, shape (n, a)
    X : ndarray of float64, shape (n, d0 + intercept)
    X_A : ndarray of float64, shape (n, d_A0 + 1 + intercept)
        Columns ``[1 | X_A0 | standardised log2 library size]``.

    Raises
    ------
    ValueError
        Invalid counts (NaN/inf, negative, wrong shape), a cell with zero total count,
        treatments that are not 0/1 or whose length does not match ``Y``, covariates
        with NaN or the wrong number of rows.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> Y = rng.poisson(3.0, size=(50, 20))
    >>> A = (np.arange(50) < 20).astype(int)
    >>> Y, A, X, X_A = prep_causarray_data(Y, A)
    >>> A.shape, X.shape, X_A.shape
    ((50, 1), (50, 1), (50, 2))
    """
    Y_in = Y
    counts, _ = as_count_matrix(Y, name="Y")
    n = counts.shape[0]
    capped, q = cap_counts(counts)
    logger.debug("prep_causarray_data: counts capped at %g", q)

    cell_names = Y_in.index if isinstance(Y_in, pd.DataFrame) else None
    lib = standardized_log2_library_size(capped, cell_names)

    A_vals, A_names = check_treatment(A, counts.shape, name="A", ref_name="Y")
    if isinstance(A, pd.DataFrame):
        A_out: Any = pd.DataFrame(A_vals, index=A.index, columns=A.columns)
    elif isinstance(A, pd.Series):
        A_out = pd.DataFrame(A_vals, index=A.index, columns=list(A_names))
    else:
        A_out = A_vals

    X0, _ = check_covariates(X, counts.shape, name="X", ref_name="Y")
    if X_A is None:
        XA0 = X0
    else:
        XA0, _ = check_covariates(X_A, counts.shape, name="X_A", ref_name="Y")

    X_A_out = np.column_stack([XA0, lib])
    X_out = X0
    if intercept:
        ones = np.ones((n, 1), dtype=np.float64)
        X_out = np.hstack([ones, X_out])
        X_A_out = np.hstack([ones, X_A_out])

    if isinstance(Y_in, pd.DataFrame):
        Y_out: Any = _dataframe_like(capped, Y_in)
    else:
        Y_out = capped
    return Y_out, A_out, np.ascontiguousarray(X_out), np.ascontiguousarray(X_A_out)


# ----------------------------------------------------------------------------- size factors
def _expressed_gene_set(gene_means: np.ndarray, min_mean: float, min_genes: int) -> np.ndarray:
    """Indices of the genes used for median-of-ratios size factors
    (docs/math.md#size-factors, step 1).

    S = {j : mean_j >= min_mean}; if |S| < min(min_genes, p), S = the ``min_genes``
    genes with the largest means (ties: lower index first); genes with mean 0 dropped.
    """
    p = gene_means.size
    S = np.flatnonzero(gene_means >= min_mean)
    k = min(int(min_genes), p)
    if S.size < k:
        S = np.sort(np.argsort(-gene_means, kind="stable")[:k])
    return S[gene_means[S] > 0]


def _positive_entries(
    Y: np.ndarray | sp.csr_matrix, cols: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, position in ``cols``, value) of the positive entries of Y[:, cols], row-major."""
    if sp.issparse(Y):
        sub = sp.csr_matrix(Y[:, cols])
        sub.eliminate_zeros()
        rows = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
        return rows, sub.indices, sub.data
    sub = np.asarray(Y)[:, cols]
    rows, pos = np.nonzero(sub > 0)
    return rows, pos, sub[rows, pos]


def _grouped_median(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Median of ``values`` within each group 0..n_groups-1; NaN for empty groups.

    Groups already in ascending order (the row-major order of the positive counts) are
    handled one contiguous slice at a time with a selection algorithm, which is several
    times faster than sorting all values; other inputs are sorted once by (group, value).
    """
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    out = np.full(n_groups, np.nan)
    if groups.size == 0 or np.all(groups[1:] >= groups[:-1]):
        for g in np.flatnonzero(counts):
            out[g] = np.median(values[starts[g]:starts[g] + counts[g]])
        return out
    order = np.lexsort((values, groups))
    v = values[order]
    has = counts > 0
    lo = starts[has] + (counts[has] - 1) // 2
    hi = starts[has] + counts[has] // 2
    out[has] = 0.5 * (v[lo] + v[hi])
    return out


def _row_block_slices(n: int, width: int, budget: int = 4 * 2**20) -> list[slice]:
    """Row slices whose dense float64 block of ``width`` columns takes about ``budget`` bytes."""
    step = max(1, budget // (8 * max(width, 1)))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _log_geo_means(Y: np.ndarray | sp.csr_matrix, S: np.ndarray,
                   blocks: list[slice]) -> np.ndarray:
    """G_j = mean_{y_ij > 0} log y_ij for the genes S (docs/math.md#size-factors, step 2)."""
    sum_log = np.zeros(S.size)
    n_pos = np.zeros(S.size)
    for sl in blocks:
        _, pos, vals = _positive_entries(Y[sl], S)
        sum_log += np.bincount(pos, weights=np.log(vals.astype(np.float64)), minlength=S.size)
        n_pos += np.bincount(pos, minlength=S.size)
    return sum_log / n_pos


def _log_ratio_medians(Y: np.ndarray | sp.csr_matrix, S: np.ndarray, log_geo_means: np.ndarray,
                       blocks: list[slice]) -> np.ndarray:
    """L_i = median_{j in S, y_ij > 0} (log y_ij - G_j), NaN without such j (step 3)."""
    L = np.empty(Y.shape[0])
    for sl in blocks:
        rows, pos, vals = _positive_entries(Y[sl], S)
        ratios = np.log(vals.astype(np.float64)) - log_geo_means[pos]
        L[sl] = _grouped_median(ratios, rows, sl.stop - sl.start)
    return L


def _log_median_of_ratios(
    Y: np.ndarray | sp.csr_matrix, min_mean: float, min_genes: int
) -> np.ndarray:
    """L_i = median_{j in S, y_ij > 0} (log y_ij - G_j), G_j = mean_{y_ij > 0} log y_ij.

    NaN for cells with no positive count in S (docs/math.md#size-factors, steps 1-3).
    Two passes over row blocks (the geometric means, then the per-cell medians), so the
    working memory is one block, not a copy of ``Y``.
    """
    return _log_median_of_ratios_with(Y, min_mean, min_genes)[0]


def _log_median_of_ratios_with(Y, min_mean: float, min_genes: int):
    """:func:`_log_median_of_ratios` and its reference ``(S, G)``."""
    n = Y.shape[0]
    gene_means = (
        np.asarray(Y.mean(axis=0, dtype=np.float64)).ravel()
        if sp.issparse(Y)
        else np.asarray(Y).mean(axis=0, dtype=np.float64)
    )
    S = _expressed_gene_set(gene_means, min_mean, min_genes)
    if S.size == 0:
        return np.full(n, np.nan), S, np.zeros(0)
    blocks = _row_block_slices(n, S.size)
    G = _log_geo_means(Y, S, blocks)
    return _log_ratio_medians(Y, S, G, blocks), S, G


@dataclass(frozen=True)
class SizeFactorReference:
    """What median-of-ratios size factors of some cells are relative to
    (docs/math.md#size-factors): the genes ``S``, their log geometric means ``G``, the
    fallback shift ``delta`` of step 4 and the mean ``mean_L`` of the reference cells'
    log factors, which step 5 subtracts."""

    S: np.ndarray
    G: np.ndarray
    delta: float
    mean_L: float


def size_factor_reference(counts: Any, min_mean: float = 2.0,
                          min_genes: int = 100) -> tuple[np.ndarray, SizeFactorReference]:
    """:func:`comp_size_factor` ('geomeans') of ``counts`` and its reference, so that
    other cells' factors (:func:`size_factors_against`) are on the same scale: the
    screen stage's control pool and every batch's treated cells
    (docs/math.md#screen-stage)."""
    Y, _ = as_count_matrix(counts, name="counts", non_integer="ignore")
    totals = row_sums(Y)
    L0, S, G = _log_median_of_ratios_with(Y, min_mean, int(min_genes))
    L = _fill_undefined_log_factors(L0, totals)
    finite, defined = np.isfinite(L), np.isfinite(L0)
    with np.errstate(divide="ignore"):
        T = np.log(totals)
    delta = float(np.median(L0[defined] - T[defined])) if defined.any() else 0.0
    mean_L = float(L[finite].mean()) if finite.any() else 0.0
    s = np.zeros(L.size)
    s[finite] = np.exp(L[finite] - mean_L)
    return s, SizeFactorReference(S=S, G=G, delta=delta, mean_L=mean_L)


def size_factors_against(counts: Any, ref: SizeFactorReference,
                         validated: bool = False) -> np.ndarray:
    """Median-of-ratios size factors of ``counts`` relative to ``ref``
    (:func:`size_factor_reference`): steps 3-5 with the reference's genes, geometric
    means, fallback shift and centring; 0 for empty cells.  ``validated``: ``counts`` is
    an array or CSR matrix of counts already checked (a batch's rows), not checked again."""
    Y = counts if validated else as_count_matrix(counts, name="counts",
                                                 non_integer="ignore")[0]
    totals = row_sums(Y)
    L = np.full(Y.shape[0], np.nan)
    if ref.S.size:
        L = _log_ratio_medians(Y, ref.S, ref.G, _row_block_slices(Y.shape[0], ref.S.size))
    fill = ~np.isfinite(L) & (totals > 0)
    with np.errstate(divide="ignore"):
        L[fill] = np.log(totals[fill]) + ref.delta
    s = np.zeros(L.size)
    finite = np.isfinite(L)
    s[finite] = np.exp(L[finite] - ref.mean_L)
    return s


def _fill_undefined_log_factors(L: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Fallback for cells without counts in S (docs/math.md#size-factors, step 4).

    L_i = T_i + delta with T_i = log sum_j y_ij and delta = median over cells with a
    defined L of (L_i - T_i). Empty cells stay undefined.
    """
    L = L.copy()
    defined = np.isfinite(L)
    with np.errstate(divide="ignore"):
        T = np.log(totals)
    fill = ~defined & (totals > 0)
    if defined.any() and fill.any():
        delta = float(np.median(L[defined] - T[defined]))
        L[fill] = T[fill] + delta
        logger.debug("comp_size_factor: %d cells used the library-size fallback", fill.sum())
    return L


def comp_size_factor(
    counts: Any,
    method: str = "geomeans",
    lib_size: float = 1e4,
    min_mean: float = 2.0,
    min_genes: int = 100,
) -> np.ndarray:
    """Per-cell size factors s_i (docs/math.md#size-factors).

    ``'geomeans'`` (default) — median of ratios on expressed genes:

    1. S = {j : gbar_j >= min_mean} with gbar_j the mean count of gene j; if
       |S| < min(min_genes, p), S = the ``min_genes`` genes with the largest means.
       Genes with mean 0 are dropped from S.
    2. G_j = mean of log y_ij over the cells with y_ij > 0 (log geometric mean).
    3. L_i = median over {j in S : y_ij > 0} of (log y_ij - G_j).
    4. Cells with no positive count in S: L_i = log(sum_j y_ij) + delta, where delta is
       the median of (L_i - log sum_j y_ij) over cells with a defined L.
    5. s_i = exp(L_i - mean of the finite L); empty cells get s_i = 0.

    ``min_mean=0`` uses all genes with a count (the gene set of causarray 0.0.9) but keeps the fallback.

    ``'libsize'``: s_i = sum_j y_ij / geometric mean of the positive totals (0 for empty
    cells). ``'scale'``: s_i = sum_j y_ij / lib_size.

    Parameters
    ----------
    counts : ndarray, pandas.DataFrame or scipy.sparse matrix, shape (n, p)
        Non-negative counts. Sparse input is never densified as a whole (only the
        positive entries of the genes in S are gathered).
    method : {'geomeans', 'libsize', 'scale'}
    lib_size : float
        Target library size for ``'scale'``.
    min_mean : float
        Minimum mean count of the genes used by ``'geomeans'``.
    min_genes : int
        Minimum number of genes used by ``'geomeans'``.

    Returns
    -------
    ndarray of float64, shape (n,)
        Size factors; 0 for cells with zero total count.

    Raises
    ------
    ValueError
        Unknown ``method``, invalid tuning constants, or invalid counts.
    """
    check_choice("method", method, ("geomeans", "libsize", "scale"), sep="; got")
    Y, _ = as_count_matrix(counts, name="counts", non_integer="ignore")
    totals = row_sums(Y)
    if method == "scale":
        check_positive("lib_size", lib_size)
        return totals / float(lib_size)
    if method == "libsize":
        positive = totals > 0
        s = np.zeros_like(totals)
        if positive.any():
            geo_mean = np.exp(np.mean(np.log(totals[positive])))
            s[positive] = totals[positive] / geo_mean
        return s
    check_at_least("min_mean", min_mean, 0)
    check_at_least("min_genes", min_genes, 1, integer=True)
    L = _fill_undefined_log_factors(_log_median_of_ratios(Y, min_mean, int(min_genes)), totals)
    finite = np.isfinite(L)
    s = np.zeros(L.size, dtype=np.float64)
    if finite.any():
        s[finite] = np.exp(L[finite] - L[finite].mean())
    return s


# ----------------------------------------------------------------------------- AnnData


def treatment_matrix(labels: Sequence[Any], ctrl_label: Any, index: Any = None) -> pd.DataFrame:
    """One-hot treatment matrix from per-cell labels, controls dropped.

    Parameters
    ----------
    labels : sequence, length n
        Perturbation label of each cell (compared as ``str``).
    ctrl_label : label of the control cells (all-zero rows).
    index : optional index of the result (e.g. ``adata.obs_names``).

    Returns
    -------
    pandas.DataFrame of float64, shape (n, a)
        One column per non-control label, columns sorted by name.
    """
    labels = np.asarray([str(v) for v in labels], dtype=object)
    perts = sorted(set(labels.tolist()) - {str(ctrl_label)})
    values = (labels[:, None] == np.asarray(perts, dtype=object)[None, :]).astype(np.float64)
    return pd.DataFrame(values, index=index, columns=pd.Index(perts, dtype=object))


def sparse_treatment_matrix(labels: Sequence[Any], ctrl_label: Any,
                            index: Any = None) -> pd.DataFrame:
    """:func:`treatment_matrix` as a sparse-dtype DataFrame (CSC inside).

    One stored entry per perturbed cell instead of n x a floats (5 GB dense for 310k
    cells x 2,021 perturbations); same columns (non-control labels, sorted) and values.

    Parameters
    ----------
    labels, ctrl_label, index
        As for :func:`treatment_matrix`.

    Returns
    -------
    pandas.DataFrame with ``SparseDtype(float64, 0)`` columns, shape (n, a)
    """
    labels = np.asarray([str(v) for v in labels], dtype=object)
    perts = sorted(set(labels.tolist()) - {str(ctrl_label)})
    codes = pd.Categorical(labels, categories=perts).codes
    rows = np.flatnonzero(codes >= 0)
    A = sp.csc_matrix((np.ones(rows.size), (rows, codes[rows])),
                      shape=(labels.size, len(perts)))
    return pd.DataFrame.sparse.from_spmatrix(A, index=index,
                                             columns=pd.Index(perts, dtype=object))


def covariate_design(obs: pd.DataFrame, covariates: str | Iterable[str] = ()) -> pd.DataFrame:
    """Numeric design of cell covariates (no intercept).

    Numeric and boolean columns are used as they are; categorical and string columns
    are one-hot encoded with their first level dropped (the first category of a
    ``Categorical`` after removing unused ones, else the first in sorted order).
    Dummy columns are named ``'<column>_<level>'``.

    Parameters
    ----------
    obs : pandas.DataFrame
        Cell metadata (e.g. ``adata.obs``).
    covariates : str or iterable of str
        Column names.

    Returns
    -------
    pandas.DataFrame of float64, shape (n, d)

    Raises
    ------
    ValueError
        A column that does not exist, or missing values.
    """
    if isinstance(covariates, str):
        covariates = [covariates]
    covariates = list(covariates)
    check_obs_columns(obs, covariates)
    parts: list[pd.DataFrame] = []
    for col in covariates:
        series = obs[col]
        if pd.api.types.is_bool_dtype(series.dtype) or (
            pd.api.types.is_numeric_dtype(series.dtype)
            and not isinstance(series.dtype, pd.CategoricalDtype)
        ):
            parts.append(pd.DataFrame({str(col): series.to_numpy(dtype=np.float64)},
                                      index=obs.index))
            continue
        if isinstance(series.dtype, pd.CategoricalDtype):
            cat = series.cat.remove_unused_categories()
        else:
            cat = pd.Categorical(series.astype(str), categories=sorted(set(series.astype(str))))
            cat = pd.Series(cat, index=obs.index)
        dummies = pd.get_dummies(cat, prefix=str(col), prefix_sep="_", drop_first=True,
                                 dtype=np.float64)
        if dummies.shape[1] == 0:
            logger.info("covariate %r has a single level and adds no column", col)
        parts.append(dummies)
    if not parts:
        return pd.DataFrame(index=obs.index, dtype=np.float64)
    return pd.concat(parts, axis=1)


def _anndata_counts(adata: Any, layer: str | None):
    """The counts of ``adata`` (``X`` or ``layers[layer]``) as an ndarray or a CSR matrix."""
    if layer is None:
        counts = adata.X
    else:
        check_layer(layer, adata.layers.keys())
        counts = adata.layers[layer]
    check_x_present(counts)
    if sp.issparse(counts) and not isinstance(counts, sp.csr_matrix):
        return sp.csr_matrix(counts)
    return counts if sp.issparse(counts) else np.asarray(counts)


def _without_empty_cells(counts, A, Xcov: pd.DataFrame, obs_names,
                         drop_empty_cells: bool, rebuild=None, totals=None):
    """Cells with a zero total count raise, or with ``drop_empty_cells`` are dropped (with
    a warning) from the counts, treatments, covariates and names; a treatment left
    without a cell is dropped too (``rebuild(keep, names)``, when given, makes the
    treatments of the kept cells instead).  ``totals``: the counts' row sums, when the
    caller has them.  Returns ``(counts, A, Xcov, obs_names)``."""
    empty = (row_sums(counts) if totals is None else np.asarray(totals)) == 0
    if not empty.any():
        return counts, A, Xcov, obs_names
    if not drop_empty_cells:
        check_cells_nonempty(empty, obs_names)
    warnings.warn(
        f"dropping {int(empty.sum())} cells with zero total count", UserWarning,
        stacklevel=3,
    )
    keep = ~empty
    if rebuild is not None:
        A = rebuild(keep, obs_names[keep])
    else:
        A = A.loc[keep]
        if (A.sum(axis=0) == 0).any():
            A = A.loc[:, A.sum(axis=0) > 0]
    return counts[keep], A, Xcov.loc[keep], obs_names[keep]


def from_anndata(
    adata: Any,
    pert_col: str | None = None,
    ctrl_label: Any = None,
    covariates: str | Iterable[str] = (),
    layer: str | None = None,
    *,
    as_dataframe: bool | None = None,
    drop_empty_cells: bool = False,
    sparse_treatments: bool = False,
    treatments: pd.DataFrame | None = None,
    row_totals: np.ndarray | None = None,
) -> tuple[Any, pd.DataFrame, np.ndarray, np.ndarray]:
    """Build causarray inputs ``(Y, A, X, X_A)`` from an AnnData screen.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes raw counts in ``X`` (or ``layers[layer]``) and one perturbation
        label per cell in ``obs[pert_col]``.
    pert_col : str, optional
        Label column; default ``adata.uns['pert_col']``.
    ctrl_label : optional
        Label of the control cells; default ``adata.uns['ctrl_label']``.
    covariates : str or iterable of str
        ``obs`` columns used as covariates in both designs (see
        :func:`covariate_design`: numeric as they are, categorical one-hot with the
        first level dropped).
    layer : str, optional
        Use ``adata.layers[layer]`` instead of ``adata.X``.
    as_dataframe : bool, optional
        Container of the returned counts. ``None`` (default): a DataFrame (index
        ``obs_names``, columns ``var_names``) if the counts are stored dense, and a
        ``scipy.sparse.csr_matrix`` if they are sparse — then the gene names are
        ``adata.var_names`` (same order). ``True`` densifies sparse counts into a
        DataFrame; ``False`` always returns a bare matrix.
    drop_empty_cells : bool
        Drop cells with zero total count (with a warning) instead of raising.
    sparse_treatments : bool
        Return ``A`` as a sparse-dtype DataFrame (:func:`sparse_treatment_matrix`)
        instead of a dense one; :func:`causarray.batch.gcate_lfc_batch` keeps it sparse.
    treatments : sparse-dtype DataFrame, optional
        The treatment matrix itself (index ``obs_names``), instead of labels: a guide
        screen's targets, several per cell (:mod:`causarray.highmoi`); ``pert_col`` and
        ``ctrl_label`` are then not used.  Requires ``sparse_treatments``.
    row_totals : ndarray, shape (n_obs,), optional
        The row sums of the counts, when the caller has them (``tl.lfc`` takes them
        while validating the screen): the counts are then not summed again here.

    Returns
    -------
    Y, A, X, X_A
        As :func:`prep_causarray_data`. ``A`` is a DataFrame (index ``obs_names``) with
        one column per non-control label, sorted by name. ``X`` is
        ``[1 | covariates]``, ``X_A`` is ``[1 | covariates | std. log2 library size]``.
        Use :func:`covariate_design` to get the covariate column names.

    Raises
    ------
    ValueError
        Missing label column, unknown control label (the available labels are listed),
        unknown layer or covariate, no perturbed cells, empty cells (unless
        ``drop_empty_cells``).
    """
    counts = _anndata_counts(adata, layer)
    if treatments is None:
        pert_col, ctrl_label, labels = _resolve_screen_keys(adata, pert_col, ctrl_label)
        make_A = sparse_treatment_matrix if sparse_treatments else treatment_matrix
        A = make_A(labels, ctrl_label, index=adata.obs_names)
        check_has_perturbed(A.shape[1] > 0, pert_col, ctrl_label)
    else:
        A = treatments
    Xcov = covariate_design(adata.obs, covariates)
    rebuild = None
    if sparse_treatments:     # rebuilt from the kept labels: labels left empty drop out
        def rebuild(keep, names):
            if treatments is not None:
                return treatments.iloc[np.flatnonzero(keep)]
            return sparse_treatment_matrix(labels[keep], ctrl_label, index=names)
    counts, A, Xcov, obs_names = _without_empty_cells(counts, A, Xcov, adata.obs_names,
                                                      drop_empty_cells, rebuild, row_totals)
    dense_out = (not sp.issparse(counts)) if as_dataframe is None else bool(as_dataframe)
    if dense_out:
        dense = counts.toarray() if sp.issparse(counts) else counts
        Y_in: Any = pd.DataFrame(dense, index=obs_names,
                                 columns=pd.Index(adata.var_names, dtype=object))
    else:
        Y_in = counts
    X0 = Xcov if Xcov.shape[1] else None
    if sparse_treatments:
        # prep_causarray_data checks a dense A; the one-hot of labels is valid by
        # construction, so it gets the (n,) treated indicator and A stays sparse
        treated = np.minimum(np.asarray(A.sparse.to_coo().sum(axis=1)).ravel(), 1.0)
        Y, _, X, X_A = prep_causarray_data(Y_in, treated, X0)
        return Y, A, X, X_A
    Y, A, X, X_A = prep_causarray_data(Y_in, A, X0)
    return Y, A, X, X_A


def subset_screen(
    adata: Any,
    n_perts: int | None = 200,
    n_ctrl: int | None = 2000,
    random_state: int | None = 0,
    *,
    pert_col: str | None = None,
    ctrl_label: Any = None,
) -> Any:
    """Keep the most frequent perturbations and a random sample of control cells.

    Parameters
    ----------
    adata : anndata.AnnData
        Screen with labels in ``obs[pert_col]``.
    n_perts : int or None
        Number of perturbations to keep: those with the most cells (ties broken by
        label name). ``None`` keeps all.
    n_ctrl : int or None
        Number of control cells, drawn without replacement with
        ``numpy.random.default_rng(random_state)``. ``None`` or more than available
        keeps all controls.
    random_state : int or None
        Seed of the control sample.
    pert_col, ctrl_label : optional
        Default ``adata.uns['pert_col']`` / ``adata.uns['ctrl_label']``.

    Returns
    -------
    anndata.AnnData
        A new object (not a view) with the kept cells in their original order; ``uns``
        is kept and unused categories of the label column are removed.
    """
    check_at_least("n_perts", n_perts, 1, integer=True, allow_none=True)
    check_at_least("n_ctrl", n_ctrl, 0, integer=True, allow_none=True)
    pert_col, ctrl_label, labels = _resolve_screen_keys(adata, pert_col, ctrl_label)
    is_ctrl = labels == ctrl_label
    sizes = pd.Series(labels[~is_ctrl]).value_counts()
    ranked = sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))
    if n_perts is not None:
        ranked = ranked[: int(n_perts)]
    keep = np.isin(labels, [label for label, _ in ranked])

    ctrl_idx = np.flatnonzero(is_ctrl)
    if n_ctrl is not None and int(n_ctrl) < ctrl_idx.size:
        rng = np.random.default_rng(random_state)
        ctrl_idx = rng.choice(ctrl_idx, size=int(n_ctrl), replace=False)
    keep[ctrl_idx] = True

    out = adata[keep].copy()
    if isinstance(out.obs[pert_col].dtype, pd.CategoricalDtype):
        out.obs[pert_col] = out.obs[pert_col].cat.remove_unused_categories()
    logger.info("subset_screen: kept %d perturbations and %d control cells",
                len(ranked), int(ctrl_idx.size))
    return out


def size_factors_from_offset(Y, offset) -> np.ndarray:
    """Size factors s (n,) from an ``offset`` argument as the model functions take it.

    ``True``: median-of-ratios :func:`comp_size_factor`; ``False``/``None``: all ones; an
    array: ``exp(offset)`` (log size factors).  Raises if any is non-finite or <= 0.
    """
    n = Y.shape[0]
    if offset is None or offset is False:
        return np.ones(n)
    if offset is True:
        s = np.asarray(comp_size_factor(Y), dtype=float)
    else:
        s = np.exp(np.asarray(offset, dtype=float).ravel())
    check_size_factors(s, n)
    return s
