"""Input checks shared by every stage of causarray.

Each check either returns the input in a canonical form (dense ``numpy.ndarray`` or
``scipy.sparse.csr_matrix``) together with the names carried by a ``pandas`` object,
or raises a ``ValueError`` / ``TypeError`` whose message names the problem.

Conventions
-----------
* ``Y`` is cells x genes (n x p) raw counts; sparse input stays sparse (CSR).
* ``A`` is an n x a 0/1 treatment matrix; a control cell has an all-zero row.
* ``X`` is an n x d covariate matrix.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "as_count_matrix",
    "check_covariates",
    "check_min_cells_per_treatment",
    "check_no_empty_cells",
    "check_no_empty_genes",
    "check_treatment",
    "col_sums",
    "row_sums",
]

#: Entries per row block when scanning large dense matrices (bounds temporaries).
_BLOCK_ENTRIES = 1 << 22
#: How many offending indices / names an error message lists.
_N_PREVIEW = 5


# ----------------------------------------------------------------------------- helpers
def _preview(idx: np.ndarray, names: Sequence[Any] | None = None, k: int = _N_PREVIEW) -> str:
    """Format the first ``k`` offending positions (or their names) for an error message."""
    idx = np.asarray(idx)
    if names is not None:
        items = [repr(str(names[i])) for i in idx[:k]]
    else:
        items = [str(int(i)) for i in idx[:k]]
    more = ", ..." if idx.size > k else ""
    return "[" + ", ".join(items) + more + "]"


def _names_of(index: pd.Index) -> np.ndarray:
    """Labels of a pandas axis as an object array of ``str``."""
    return np.array([str(v) for v in index], dtype=object)


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Row slices covering ``n_rows`` with about ``_BLOCK_ENTRIES`` entries each."""
    step = max(1, _BLOCK_ENTRIES // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _is_anndata(obj: Any) -> bool:
    return hasattr(obj, "obs") and hasattr(obj, "var") and hasattr(obj, "X")


def row_sums(Y: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Per-row (per-cell) totals of a dense or sparse matrix, accumulated in float64.

    Parameters
    ----------
    Y : ndarray or scipy.sparse matrix, shape (n, p)

    Returns
    -------
    ndarray, shape (n,)
    """
    if sp.issparse(Y):
        return np.asarray(Y.sum(axis=1, dtype=np.float64)).ravel()
    return np.asarray(Y).sum(axis=1, dtype=np.float64)


def col_sums(Y: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Per-column (per-gene) totals of a dense or sparse matrix, accumulated in float64.

    Parameters
    ----------
    Y : ndarray or scipy.sparse matrix, shape (n, p)

    Returns
    -------
    ndarray, shape (p,)
    """
    if sp.issparse(Y):
        return np.asarray(Y.sum(axis=0, dtype=np.float64)).ravel()
    return np.asarray(Y).sum(axis=0, dtype=np.float64)


def _dataframe_values(df: pd.DataFrame, name: str) -> np.ndarray | sp.csr_matrix:
    """Numeric values of a DataFrame; all-sparse-dtype frames become CSR."""
    non_numeric = [
        str(c) for c, dt in df.dtypes.items()
        if not (pd.api.types.is_numeric_dtype(dt) or pd.api.types.is_bool_dtype(dt))
    ]
    if non_numeric:
        raise TypeError(
            f"{name} must be numeric; non-numeric columns: {non_numeric[:_N_PREVIEW]}"
            + (" ..." if len(non_numeric) > _N_PREVIEW else "")
        )
    if df.shape[1] > 0 and all(isinstance(dt, pd.SparseDtype) for dt in df.dtypes):
        return sp.csr_matrix(df.sparse.to_coo())
    values = df.to_numpy()
    if values.dtype == object:  # nullable / mixed numeric extension dtypes
        values = df.to_numpy(dtype=np.float64, na_value=np.nan)
    return values


# ----------------------------------------------------------------------------- counts
def _count_dense_issues(Y: np.ndarray) -> tuple[int, int, float, int]:
    """Scan a dense float matrix in row blocks.

    Returns (number non-finite, number negative, minimum, number non-integer).
    """
    n_bad = n_neg = n_frac = 0
    vmin = np.inf
    for rows in _row_blocks(Y.shape[0], Y.shape[1]):
        block = Y[rows]
        finite = np.isfinite(block)
        n_bad += int(block.size - np.count_nonzero(finite))
        if n_bad:
            continue
        neg = block < 0
        n_neg += int(np.count_nonzero(neg))
        if block.size:
            vmin = min(vmin, float(block.min()))
        n_frac += int(np.count_nonzero(block != np.rint(block)))
    return n_bad, n_neg, vmin, n_frac


def as_count_matrix(
    Y: Any,
    name: str = "Y",
    *,
    non_integer: str = "round",
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray | None]:
    """Validate a cells x genes count matrix and bring it to a canonical form.

    Parameters
    ----------
    Y : array-like, pandas.DataFrame or scipy.sparse matrix, shape (n, p)
        Raw counts. A DataFrame's columns are taken as gene names; a DataFrame whose
        columns all have a sparse dtype is converted to CSR.
    name : str
        Name used in error messages.
    non_integer : {'round', 'ignore', 'raise'}
        What to do with non-integer entries (docs/math.md#non-integer-counts):
        ``'round'`` (default) rounds them to the nearest integer (half to even) and
        emits a ``UserWarning`` stating how many entries were rounded; ``'ignore'``
        keeps them; ``'raise'`` raises.

    Returns
    -------
    Y : ndarray or scipy.sparse.csr_matrix, shape (n, p)
        Dense input is returned as an ndarray with its numeric dtype kept (bool becomes
        int64); sparse input of any format is returned as ``csr_matrix``. The input is
        never modified; a copy is made only when a conversion or rounding is needed.
    gene_names : ndarray of str (object dtype), shape (p,), or None
        Column names when ``Y`` is a DataFrame, else None.

    Raises
    ------
    TypeError
        Non-numeric input, or an AnnData object (use ``from_anndata``).
    ValueError
        Wrong number of dimensions, no cells or no genes, NaN or infinite values,
        negative values, or non-integer values with ``non_integer='raise'``.
    """
    if non_integer not in ("round", "ignore", "raise"):
        raise ValueError(
            f"non_integer must be 'round', 'ignore' or 'raise'; got {non_integer!r}"
        )
    if _is_anndata(Y):
        raise TypeError(
            f"{name} is an AnnData object; pass a matrix, or use "
            "causarray.preprocessing.from_anndata(adata) to build the inputs"
        )
    gene_names = None
    if isinstance(Y, pd.DataFrame):
        gene_names = _names_of(Y.columns)
        Y = _dataframe_values(Y, name)
    elif isinstance(Y, pd.Series):
        Y = Y.to_numpy()

    if sp.issparse(Y):
        if not isinstance(Y, sp.csr_matrix):
            Y = sp.csr_matrix(Y)
        values = Y.data
    else:
        Y = np.asarray(Y)
        values = None
    if Y.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (cells x genes) matrix; got {Y.ndim}-D input of "
            f"shape {Y.shape}"
        )
    if Y.shape[0] == 0 or Y.shape[1] == 0:
        raise ValueError(
            f"{name} has shape {Y.shape}; it needs at least one cell and one gene"
        )
    dtype = Y.dtype
    if dtype == np.bool_:
        Y = Y.astype(np.int64)
        values = Y.data if sp.issparse(Y) else None
        dtype = Y.dtype
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise TypeError(f"{name} must hold numeric counts; got dtype {dtype}")

    # scan for NaN / inf, negatives, non-integers
    if np.issubdtype(dtype, np.floating):
        if values is not None:       # the stored values, scanned in blocks (a column view)
            n_bad, n_neg, vmin, n_frac = _count_dense_issues(values.reshape(-1, 1))
        else:
            n_bad, n_neg, vmin, n_frac = _count_dense_issues(Y)
    else:
        n_bad = n_frac = 0
        if np.issubdtype(dtype, np.signedinteger):
            arr = values if values is not None else Y
            n_neg = int(np.count_nonzero(arr < 0)) if arr.size else 0
            vmin = float(arr.min()) if arr.size else 0.0
        else:
            n_neg, vmin = 0, 0.0

    if n_bad:
        raise ValueError(
            f"{name} contains NaN or infinite values ({n_bad} entries); remove or impute "
            "them before running causarray"
        )
    if n_neg:
        raise ValueError(
            f"{name} contains negative values ({n_neg} entries, minimum {vmin:g}); "
            "counts must be non-negative"
        )
    if n_frac and non_integer != "ignore":
        if non_integer == "raise":
            raise ValueError(
                f"{name} contains {n_frac} non-integer entries; raw integer counts are "
                "required"
            )
        warnings.warn(
            f"{name} contains {n_frac} non-integer entries; they were rounded to the "
            "nearest integer",
            UserWarning,
            stacklevel=2,
        )
        if sp.issparse(Y):
            Y = Y.copy()
            np.rint(Y.data, out=Y.data)
        else:
            Y = np.rint(Y)
    return Y, gene_names


# ----------------------------------------------------------------------------- designs
def _reference(n: int | tuple[int, ...], ref_name: str) -> tuple[int, str]:
    """Number of rows expected and a phrase naming where it comes from."""
    if isinstance(n, tuple):
        return int(n[0]), f"{ref_name} has shape {n}"
    return int(n), f"{int(n)} cells were expected"


def _to_2d_float(obj: Any, name: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert a DataFrame / Series / array / sparse matrix to a float64 2-D array."""
    names = None
    if isinstance(obj, pd.DataFrame):
        names = _names_of(obj.columns)
        values = _dataframe_values(obj, name)
        if sp.issparse(values):
            values = values.toarray()
    elif isinstance(obj, pd.Series):
        names = np.array([str(obj.name if obj.name is not None else name)], dtype=object)
        if not (pd.api.types.is_numeric_dtype(obj.dtype) or pd.api.types.is_bool_dtype(obj.dtype)):
            raise TypeError(f"{name} must be numeric; got dtype {obj.dtype}")
        values = obj.to_numpy(dtype=np.float64, na_value=np.nan)
    elif sp.issparse(obj):
        values = obj.toarray()
    else:
        values = np.asarray(obj)
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    if values.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (cells x {what}) matrix or a 1-D vector; got "
            f"{values.ndim}-D input of shape {values.shape}"
        )
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise TypeError(f"{name} must be numeric; got dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.complexfloating):
        raise TypeError(f"{name} must be real-valued; got dtype {values.dtype}")
    values = np.asarray(values, dtype=np.float64)
    return values, names


def check_treatment(
    A: Any,
    n: int | tuple[int, ...],
    name: str = "A",
    ref_name: str = "Y",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate an n x a 0/1 treatment matrix.

    Parameters
    ----------
    A : array-like, pandas.DataFrame / Series or scipy.sparse matrix
        Treatment indicators, shape (n, a) or (n,) (a single treatment; becomes one
        column). A DataFrame's columns (a Series' name) give the treatment names.
    n : int or tuple
        Number of cells, or the shape of the count matrix (then named in the error).
    name, ref_name : str
        Names used in error messages for ``A`` and for the count matrix.

    Returns
    -------
    A : ndarray of float64, shape (n, a)
    names : ndarray of str (object dtype), shape (a,), or None

    Raises
    ------
    TypeError
        ``A`` is None or not numeric.
    ValueError
        More than 2 dimensions, row count different from ``n``, no columns, NaN or
        infinite values, or values other than 0 and 1.
    """
    if A is None:
        raise TypeError(f"{name} (the treatment matrix) is required; got None")
    n_rows, ref = _reference(n, ref_name)
    values, names = _to_2d_float(A, name, "treatments")
    if values.shape[0] != n_rows:
        raise ValueError(
            f"{name} has shape {values.shape} but {ref}: the numbers of rows (cells) "
            "must match"
        )
    if values.shape[1] == 0:
        raise ValueError(f"{name} has shape {values.shape}: it has no treatment columns")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    bad = ~((values == 0) | (values == 1))
    if bad.any():
        others = np.unique(values[bad])
        shown = ", ".join(f"{v:g}" for v in others[:_N_PREVIEW])
        more = ", ..." if others.size > _N_PREVIEW else ""
        raise ValueError(
            f"{name} must contain only 0/1 indicators; found other values: [{shown}{more}]"
        )
    return values, names


def check_covariates(
    X: Any,
    n: int | tuple[int, ...],
    name: str = "X",
    ref_name: str = "Y",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate an n x d covariate matrix.

    Parameters
    ----------
    X : array-like, pandas.DataFrame / Series, scipy.sparse matrix or None
        Numeric covariates, shape (n, d) or (n,). ``None`` gives an n x 0 matrix.
        Categorical covariates must be one-hot encoded beforehand.
    n : int or tuple
        Number of cells, or the shape of the count matrix (then named in the error).
    name, ref_name : str
        Names used in error messages.

    Returns
    -------
    X : ndarray of float64, shape (n, d)
    names : ndarray of str (object dtype), shape (d,), or None

    Raises
    ------
    TypeError
        Non-numeric columns.
    ValueError
        More than 2 dimensions, wrong number of rows, NaN or infinite values.
    """
    n_rows, ref = _reference(n, ref_name)
    if X is None:
        return np.empty((n_rows, 0), dtype=np.float64), None
    values, names = _to_2d_float(X, name, "covariates")
    if values.shape[0] != n_rows:
        raise ValueError(
            f"{name} has shape {values.shape} but {ref}: the numbers of rows (cells) "
            "must match"
        )
    n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if n_bad:
        raise ValueError(f"{name} contains NaN or infinite values ({n_bad} entries)")
    return values, names


# ----------------------------------------------------------------------------- emptiness
def check_no_empty_genes(
    Y: np.ndarray | sp.spmatrix,
    gene_names: Sequence[Any] | None = None,
    name: str = "Y",
) -> None:
    """Raise if any gene (column) has no non-zero count.

    Parameters
    ----------
    Y : ndarray or scipy.sparse matrix, shape (n, p)
        Non-negative counts.
    gene_names : sequence, optional
        Names used in the message instead of column indices.
    name : str
        Name used in the message.

    Raises
    ------
    ValueError
        Naming how many genes are empty and the first few of them.
    """
    empty = np.flatnonzero(col_sums(Y) == 0)
    if empty.size:
        label = "names" if gene_names is not None else "column indices"
        raise ValueError(
            f"{name} has {empty.size} gene(s) with no non-zero count (non-expressed "
            f"features), {label} {_preview(empty, gene_names)}; remove them before fitting"
        )


def check_no_empty_cells(
    Y: np.ndarray | sp.spmatrix,
    cell_names: Sequence[Any] | None = None,
    name: str = "Y",
) -> None:
    """Raise if any cell (row) has zero total count.

    Such cells have an undefined log library size and a zero size factor.

    Parameters
    ----------
    Y : ndarray or scipy.sparse matrix, shape (n, p)
        Non-negative counts.
    cell_names : sequence, optional
        Names used in the message instead of row indices.
    name : str
        Name used in the message.

    Raises
    ------
    ValueError
        Naming how many cells are empty and the first few of them.
    """
    empty = np.flatnonzero(row_sums(Y) == 0)
    if empty.size:
        label = "names" if cell_names is not None else "row indices"
        raise ValueError(
            f"{name} has {empty.size} cell(s) with zero total count, {label} "
            f"{_preview(empty, cell_names)}; remove them first (their log library size "
            "and size factor are undefined)"
        )


def check_min_cells_per_treatment(
    A: Any,
    min_cells: int,
    names: Sequence[Any] | None = None,
    check_controls: bool = True,
) -> None:
    """Raise if a treatment (or the control group) has fewer than ``min_cells`` cells.

    Parameters
    ----------
    A : array-like or pandas.DataFrame, shape (n, a)
        0/1 treatment matrix; control cells have all-zero rows. A DataFrame's columns
        name the treatments.
    min_cells : int
        Minimum number of cells required in each arm.
    names : sequence, optional
        Treatment names (overrides the DataFrame's columns).
    check_controls : bool
        Also require ``min_cells`` control cells.

    Raises
    ------
    ValueError
        Listing the treatments with too few cells and their counts.
    """
    values, df_names = _to_2d_float(A, "A", "treatments")
    names = list(names) if names is not None else df_names
    treated = values.sum(axis=0)
    small = np.flatnonzero(treated < min_cells)
    if small.size:
        labels = (
            [str(names[j]) for j in small] if names is not None else [str(j) for j in small]
        )
        shown = ", ".join(
            f"{lab} ({int(treated[j])})" for lab, j in zip(labels[:_N_PREVIEW], small)
        )
        more = ", ..." if small.size > _N_PREVIEW else ""
        raise ValueError(
            f"{small.size} treatment(s) have fewer than {min_cells} treated cells: "
            f"{shown}{more}"
        )
    if check_controls:
        n_ctrl = int(np.count_nonzero(values.sum(axis=1) == 0))
        if n_ctrl < min_cells:
            raise ValueError(
                f"only {n_ctrl} control cells (rows of A with no treatment); at least "
                f"{min_cells} are needed"
            )


# ----------------------------------------------------------------------------- keywords
#: Keywords of causarray 0.1.1's ``LFC`` that this package accepts for compatibility,
#: in one place: ``ps_model``, ``eps_var`` and ``save_nuisances`` (``LFC`` arguments of
#: the original), ``backend`` (its GLM backend switch) and the GCATE settings the
#: original's ``LFC`` received from its batch runner and dropped (``kwargs_ls_1`` ...,
#: ``c1``, ``num_d``).  Names that become real parameters of ``LFC`` stay valid here.
LFC_COMPAT_KEYWORDS = frozenset({
    "ps_model", "eps_var", "save_nuisances", "backend",
    "kwargs_ls_1", "kwargs_ls_2", "kwargs_es_1", "kwargs_es_2", "c1", "num_d",
})
#: Keywords of causarray 0.1.1's ``fit_gcate`` / ``estimate_r`` accepted for
#: compatibility (unused by the Fisher-scoring solver).
GCATE_COMPAT_KEYWORDS = frozenset({"num_d", "num_missing"})


def parameter_names(*funcs: Any) -> frozenset:
    """Names that can be passed by keyword to any of ``funcs``.

    Parameters
    ----------
    *funcs : callables

    Returns
    -------
    frozenset of str
        Positional-or-keyword and keyword-only parameter names (``*args`` and
        ``**kwargs`` themselves are not names).
    """
    import inspect

    names: set[str] = set()
    for f in funcs:
        for prm in inspect.signature(f).parameters.values():
            if prm.kind in (prm.POSITIONAL_OR_KEYWORD, prm.KEYWORD_ONLY):
                names.add(prm.name)
    return frozenset(names)


def check_keywords(func_name: str, kwargs: Any, accepted: Any) -> None:
    """Raise ``TypeError`` for the first keyword of ``kwargs`` not in ``accepted``.

    The message reads like Python's own, ``f() got an unexpected keyword argument
    'x'``, and suggests the closest accepted name when one is close (difflib).

    Parameters
    ----------
    func_name : str
        Name shown in the message, e.g. ``"LFC"`` or ``"gcate_lfc_batch(lfc_kwargs=...)"``.
    kwargs : mapping or None
        The keywords received.
    accepted : iterable of str
        Names the receiving function(s) accept.

    Raises
    ------
    TypeError
        Naming the unexpected keyword.
    """
    import difflib

    if not kwargs:
        return
    if not hasattr(kwargs, "keys"):
        raise TypeError(f"{func_name} expects a dict of keyword arguments, "
                        f"got {type(kwargs).__name__}")
    accepted = sorted(set(accepted))
    for key in kwargs:
        if key in accepted:
            continue
        msg = f"{func_name}() got an unexpected keyword argument {key!r}"
        if func_name.endswith(")"):
            msg = f"{func_name} got an unexpected keyword argument {key!r}"
        close = difflib.get_close_matches(str(key), accepted, n=1, cutoff=0.75)
        if close:
            msg += f"; did you mean {close[0]!r}?"
        raise TypeError(msg)


def check_targets(targets: Any) -> str | dict[str, tuple[str, ...]] | None:
    """The ``targets`` option: which (perturbation, gene) pairs are on-target.

    ``'auto'`` (a perturbation whose label is a measured gene's name targets that
    gene), ``None`` / ``False`` (no on-target family: every pair is tested with its
    perturbation's other genes), or a mapping ``{perturbation: gene or [genes]}``.
    Returns ``'auto'``, ``None`` or a dict of string tuples.
    """
    if targets is None or targets is False:
        return None
    if isinstance(targets, str):
        if targets != "auto":
            raise ValueError(f"targets must be 'auto', None or a mapping perturbation -> "
                             f"gene(s), got {targets!r}")
        return "auto"
    if not hasattr(targets, "items"):
        raise TypeError("targets must be 'auto', None or a mapping perturbation -> gene(s), "
                        f"got {type(targets).__name__}")
    out: dict[str, tuple[str, ...]] = {}
    for trt, genes in targets.items():
        genes = (genes,) if isinstance(genes, str) else tuple(genes)
        if not all(isinstance(g, str) for g in genes):
            raise TypeError(f"targets[{trt!r}] must be a gene name or a list of gene names")
        out[str(trt)] = genes
    return out
