"""Every input rule of causarray, one function per rule.

The stages (``gcate``, ``glm``, ``dr``, ``propensity``, ``batch``, ``tl``, ...) do not
raise ``ValueError`` / ``TypeError`` on an input themselves: they call the rule here, so
that a rule is written once and its message is the same wherever it applies
(``tests/test_validation.py`` scans the other modules for stray raises, with a short,
commented allow-list of raises that are not input rules).

Each check either returns the input in a canonical form (dense ``numpy.ndarray`` or
``scipy.sparse.csr_matrix``, an ``int`` for integer options, ...) or raises a
``ValueError`` / ``TypeError`` whose message names the problem (and the option, so that
the CLI can name its flag).  Sections: counts, designs and treatments, options, shapes,
stage rules (counts, GCATE's design), AnnData keys, sizes, propensity scores,
inference, LFC options, the batch pipeline, calibration, propensity refits,
``glm_compat``, diagnostics, plots and files.

Conventions
-----------
* ``Y`` is cells x genes (n x p) raw counts; sparse input stays sparse (CSR).
* ``A`` is an n x a 0/1 treatment matrix; a control cell has an all-zero row.
* ``X`` is an n x d covariate matrix.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [  # the general checks; the stage-specific rules are imported by name
    "as_count_matrix",
    "check_covariates",
    "check_family",
    "check_min_cells_per_treatment",
    "check_no_empty_cells",
    "check_no_empty_genes",
    "check_positive_int",
    "check_r",
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
    Y, values, gene_names = _canonical_counts(Y, name)
    n_bad, n_neg, vmin, n_frac = _count_issues(Y, values)
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
        Y = _rounded(Y)
    return Y, gene_names


def _canonical_counts(Y: Any, name: str):
    """``(Y, stored values or None, gene names or None)``: a DataFrame's values and
    column names, sparse as CSR (``values``: its stored entries), dense as an ndarray,
    bool as int64; wrong dimensions, an empty matrix or a non-numeric dtype raise."""
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
    if Y.dtype == np.bool_:
        Y = Y.astype(np.int64)
        values = Y.data if sp.issparse(Y) else None
    if not (np.issubdtype(Y.dtype, np.integer) or np.issubdtype(Y.dtype, np.floating)):
        raise TypeError(f"{name} must hold numeric counts; got dtype {Y.dtype}")
    return Y, values, gene_names


def _count_issues(Y, values) -> tuple[int, int, float, int]:
    """``(non-finite, negative, minimum, non-integer)`` entries of a canonical count
    matrix (``values``: a sparse matrix's stored entries, None for dense)."""
    dtype = Y.dtype
    if np.issubdtype(dtype, np.floating):
        if values is not None:       # the stored values, scanned in blocks (a column view)
            return _count_dense_issues(values.reshape(-1, 1))
        return _count_dense_issues(Y)
    n_neg, vmin = 0, 0.0
    if np.issubdtype(dtype, np.signedinteger):
        arr = values if values is not None else Y
        n_neg = int(np.count_nonzero(arr < 0)) if arr.size else 0
        vmin = float(arr.min()) if arr.size else 0.0
    return 0, n_neg, vmin, 0


def _rounded(Y):
    """A copy of ``Y`` with its entries rounded to the nearest integer (half to even)."""
    if sp.issparse(Y):
        Y = Y.copy()
        np.rint(Y.data, out=Y.data)
        return Y
    return np.rint(Y)


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
    *,
    keep_sparse: bool = False,
) -> tuple[np.ndarray | sp.csc_matrix, np.ndarray | None]:
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
    keep_sparse : bool
        A sparse ``A`` (or a DataFrame whose columns all have a sparse dtype) is checked
        on its stored values and returned as float64 CSC instead of dense: a screen's
        one-hot matrix is n x a with one entry per perturbed cell, 5 GB dense for 310k
        cells x 2,021 perturbations.

    Returns
    -------
    A : ndarray of float64, shape (n, a) (CSC with ``keep_sparse`` and sparse input)
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
    if keep_sparse:
        sparse_names = None
        if isinstance(A, pd.DataFrame) and A.shape[1] and \
                all(isinstance(dt, pd.SparseDtype) for dt in A.dtypes):
            sparse_names = _names_of(A.columns)
            A = A.sparse.to_coo()
        if sp.issparse(A):
            A = sp.csc_matrix(A, dtype=np.float64)
            A.sum_duplicates()
            _check_treatment_values(A, A.data, n_rows, ref, name)
            return A, sparse_names
    values, names = _to_2d_float(A, name, "treatments")
    _check_treatment_values(values, values, n_rows, ref, name)
    return values, names


def _check_treatment_values(A: Any, values: np.ndarray, n_rows: int, ref: str,
                            name: str) -> None:
    """Rows, columns and 0/1 entries of a treatment matrix (``values``: its entries)."""
    if A.shape[0] != n_rows:
        raise ValueError(
            f"{name} has shape {A.shape} but {ref}: the numbers of rows (cells) "
            "must match"
        )
    if A.shape[1] == 0:
        raise ValueError(f"{name} has shape {A.shape}: it has no treatment columns")
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
    Y: np.ndarray | sp.spmatrix | None,
    cell_names: Sequence[Any] | None = None,
    name: str = "Y",
    *,
    totals: np.ndarray | None = None,
) -> None:
    """Raise if any cell (row) has zero total count.

    Such cells have an undefined log library size and a zero size factor.

    Parameters
    ----------
    Y : ndarray or scipy.sparse matrix, shape (n, p)
        Non-negative counts (not read when ``totals`` is given).
    cell_names : sequence, optional
        Names used in the message instead of row indices.
    name : str
        Name used in the message.
    totals : ndarray, shape (n,), optional
        The row sums of ``Y`` (:func:`row_sums`) when the caller has them already, so
        that the counts are not summed twice.

    Raises
    ------
    ValueError
        Naming how many cells are empty and the first few of them.
    """
    empty = np.flatnonzero((row_sums(Y) if totals is None else np.asarray(totals)) == 0)
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


# ----------------------------------------------------------------------------- options
#: Count families of the GLM and factor model (negative binomial, Poisson).
FAMILIES = ("nb", "poisson")
#: How treatments were assigned: at random (CRISPR screens) or observed (case-control).
ASSIGNMENTS = ("randomized", "observational")
#: Which cells a perturbation is compared with (``gcate_lfc_batch(control=...)``).
CONTROLS = ("non-targeting", "complement")


def _or_list(choices: Sequence[str]) -> str:
    """``'a' or 'b'`` / ``'a', 'b' or 'c'`` for an error message."""
    quoted = [repr(c) for c in choices]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


def check_choice(name: str, value: Any, choices: Sequence[str], *, sep: str = ", got") -> Any:
    """Raise unless ``value`` is one of the strings ``choices``.

    Parameters
    ----------
    name : str
        Option name shown in the message.
    value : object
    choices : sequence of str
    sep : str
        Text between the list of choices and the value (``", got"`` or ``"; got"``).

    Returns
    -------
    value, unchanged.

    Raises
    ------
    ValueError
        ``"<name> must be 'a', 'b' or 'c', got <value>"``.
    """
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be {_or_list(choices)}{sep} {value!r}")
    return value


def check_one_of(name: str, value: Any, choices: tuple) -> Any:
    """Like :func:`check_choice`, worded ``"<name> must be one of (...), got <value>"``."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_family(family: Any) -> str:
    """The count family: ``'nb'`` (negative binomial) or ``'poisson'``."""
    return check_choice("family", family, FAMILIES)


def check_assignment(assignment: Any) -> str:
    """How treatments were assigned: ``'randomized'`` or ``'observational'``."""
    if not (isinstance(assignment, str) and assignment in ASSIGNMENTS):
        raise ValueError("assignment must be 'randomized' (CRISPR screens) or 'observational' "
                         f"(case-control studies), got {assignment!r}")
    return assignment


def check_control(control: Any) -> str:
    """Which cells each perturbation is compared with: ``'non-targeting'`` (cells with no
    perturbation, the all-zero rows of A) or ``'complement'`` (every cell that does not
    carry it: high-MOI screens)."""
    if not (isinstance(control, str) and control in CONTROLS):
        raise ValueError("control must be 'non-targeting' (cells without any perturbation) or "
                         f"'complement' (cells without the perturbation: high MOI), got "
                         f"{control!r}")
    return control


def check_no_mask_with_complement(mask: Any) -> None:
    """``control='complement'`` builds each comparison's cells itself."""
    if mask is not None:
        raise ValueError("lfc_kwargs['mask'] cannot be combined with control='complement', "
                         "which sets each perturbation's comparison cells itself")


def _is_int(value: Any) -> bool:
    """A Python or NumPy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """An integer >= 1 (a Python or NumPy integer, not a bool), or None if allowed.

    Raises
    ------
    ValueError
        ``"<name> must be a positive integer[ or None], got <value>"``.
    """
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return int(value)


def check_all_at_least_one(**sizes: Any) -> None:
    """Raise unless every keyword's value is >= 1 (sizes of a simulated design)."""
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"{_and_list(list(sizes))} must all be >= 1")


def _and_list(names: Sequence[str]) -> str:
    """``a, b and c`` for an error message."""
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def check_nonnegative_int(name: str, value: Any) -> int:
    """An integer >= 0 (not a bool): ``"<name> must be a non-negative integer, got ..."``."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_r(r: Any, *, allow_auto: bool = False) -> int | str:
    """The number of latent factors: an integer >= 0, or ``'auto'`` where allowed.

    Raises
    ------
    ValueError
        ``"r must be a non-negative integer (0: no latent factors), got ..."``, or with
        ``allow_auto`` ``"r must be 'auto' or a non-negative integer, got ..."``.
    """
    if allow_auto:
        if isinstance(r, str) and r == "auto":
            return r
        if isinstance(r, str) or not _is_int(r) or r < 0:
            raise ValueError(f"r must be 'auto' or a non-negative integer, got {r!r}")
        return int(r)
    if not _is_int(r) or r < 0:
        raise ValueError(f"r must be a non-negative integer (0: no latent factors), got {r!r}")
    return int(r)



def check_r_grid(r_max: Any) -> list[int]:
    """Candidate numbers of factors: ``1..r_max`` for a scalar, else the positive entries.

    Returns
    -------
    list of int, sorted and unique.

    Raises
    ------
    ValueError
        No positive candidate.
    """
    grid = sorted({int(r) for r in (range(1, int(r_max) + 1) if np.isscalar(r_max) else r_max)
                   if int(r) > 0})
    if not grid:
        raise ValueError("r_max must contain at least one positive number of factors")
    return grid

def check_open_unit(name: str, value: Any) -> float:
    """A number strictly inside (0, 1): ``"<name> must be in (0, 1), got ..."``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = np.nan
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return v



def check_positive(name: str, value: Any) -> None:
    """A number > 0: ``"<name> must be positive; got ..."``."""
    if not value > 0:
        raise ValueError(f"{name} must be positive; got {value!r}")


def check_at_least(name: str, value: Any, low: int, *, integer: bool = False,
                   allow_none: bool = False) -> None:
    """A number >= ``low`` (compared as ``int(value)`` with ``integer``), or None if allowed.

    Raises
    ------
    ValueError
        ``"<name> must be >= <low>[ or None]; got <value>"``.
    """
    if value is None and allow_none:
        return
    if not (int(value) if integer else value) >= low:
        raise ValueError(f"{name} must be >= {low}{' or None' if allow_none else ''}; "
                         f"got {value!r}")

# ----------------------------------------------------------------------------- shapes
def check_matrix_2d(M: Any, name: str, what: str) -> None:
    """Raise unless ``M.ndim == 2``: ``"<name> must be 2-D (cells x <what>), got shape ..."``."""
    if M.ndim != 2:
        raise ValueError(f"{name} must be 2-D (cells x {what}), got shape {M.shape}")


def check_rows(M: Any, n: int, name: str) -> None:
    """Raise unless ``M`` has ``n`` rows (one per cell of ``Y``)."""
    if M.shape[0] != n:
        raise ValueError(f"{name} has {M.shape[0]} rows but Y has {n} cells")


def check_rows_2d(M: Any, n: int, name: str) -> None:
    """Raise unless ``M`` is 2-D with ``n`` rows and finite (one row per cell)."""
    if M.ndim != 2 or M.shape[0] != n:
        raise ValueError(f"{name} must be 2-D with {n} rows (one per cell), got shape {M.shape}")
    check_finite(M, name)


def check_offset(off: np.ndarray, n: int) -> None:
    """Raise unless the per-cell offset has one entry per cell."""
    if off.shape[0] != n:
        raise ValueError(f"offset has length {off.shape[0]} but Y has {n} cells")


def check_row_indices(idx: np.ndarray, what: str) -> None:
    """Raise unless ``idx`` is a 1-D array of integer row indices (empty is fine)."""
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"{what} must be a 1-D array of integer row indices")


def check_shape(name: str, arr: np.ndarray, shape: tuple, what: str = "") -> None:
    """Raise unless ``arr.shape == shape``: ``"<name> must have shape <shape><what>, got ..."``."""
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}{what}, got {arr.shape}")


def check_finite(M: Any, name: str) -> None:
    """Raise if ``M`` (an array, or a sparse matrix's stored values) has NaN or inf."""
    values = M.data if sp.issparse(M) else M
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_size_factors(s: np.ndarray, n: int) -> None:
    """Raise unless there is one finite, positive size factor per cell."""
    if s.shape[0] != n or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError("size factors must be finite, positive and one per cell "
                         "(a cell with no counts has size factor 0: remove empty cells)")


def check_mask_shape(mask: np.ndarray, shape: tuple) -> None:
    """Raise unless a genes-to-test mask has the shape of ``A``."""
    if mask.shape != shape:
        raise ValueError(f"mask must have the shape of A {shape}, got {mask.shape}")



def check_nb_alpha(alpha: np.ndarray) -> None:
    """Raise unless NB dispersions ``alpha = 1 / size`` are finite and >= 0 (0: Poisson)."""
    if np.any(alpha < 0) or not np.all(np.isfinite(alpha)):
        raise ValueError("size must be positive (np.inf for Poisson)")


def check_nb_size(size: np.ndarray) -> None:
    """Raise unless given NB sizes (one per gene) are finite and positive."""
    if not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise ValueError("disp_glm must be positive and finite (one NB size per gene)")

# ----------------------------------------------------------------------------- stage rules
def check_count_flags(all_finite: bool, any_negative: bool, name: str = "Y") -> None:
    """Raise for counts with NaN/inf or negative entries (flags from one scan)."""
    if not all_finite:
        raise ValueError(f"{name} contains NaN or infinite values")
    if any_negative:
        raise ValueError(f"{name} contains negative counts")


def check_count_values(Y: np.ndarray | sp.spmatrix, name: str = "Y") -> None:
    """Raise if a dense or sparse count matrix has NaN/inf or negative entries."""
    data = Y.data if sp.issparse(Y) else Y
    finite = bool(np.all(np.isfinite(data)))
    check_count_flags(finite, finite and bool(np.any(data < 0)), name)


def check_genes_expressed(nnz_gene: np.ndarray) -> None:
    """Raise if a gene has no non-zero count (``nnz_gene``: non-zeros per column of Y)."""
    if np.any(nnz_gene == 0):
        bad = np.flatnonzero(nnz_gene == 0)
        raise ValueError(f"Y has {bad.size} gene(s) with no counts (e.g. columns "
                         f"{bad[:5].tolist()}); remove genes with no counts before fitting")


def check_treatments_have_cells(A: np.ndarray) -> None:
    """Raise if a treatment column of ``A`` has no treated cell."""
    empty_trt = np.flatnonzero(np.all(A == 0, axis=0))
    if empty_trt.size:
        raise ValueError(f"treatment column(s) {empty_trt.tolist()} of A have no cells")


def check_r_estimable(r: int, n: int, p: int, q: int) -> None:
    """Raise if ``r`` latent factors cannot be estimated from n cells x p genes.

    With ``q`` observed columns at most ``min(n, p) - q - 1`` factors are identifiable.
    """
    r_max = min(n, p) - q - 1
    if r > 0 and r > r_max:
        raise ValueError(f"r = {r} is too large: at most {r_max} latent factors can be "
                         f"estimated from {n} cells x {p} genes with {q} observed columns")


def check_design_rank(Z: np.ndarray) -> None:
    """Raise if the observed design ``[X | A]`` is (nearly) singular.

    Scale-free: every column is brought to unit root-mean-square, and the smallest
    singular value must exceed 1e-3 times the largest.
    """
    n = Z.shape[0]
    norms = np.sqrt(np.mean(Z * Z, axis=0))
    sv = np.linalg.svd(Z / np.where(norms > 0, norms, 1.0), compute_uv=False) / np.sqrt(n)
    if sv.min() < 1e-3 * sv.max():
        raise ValueError("the observed design [X | A] is (nearly) singular: "
                         "check for duplicated or constant columns besides the intercept")


#: Why ``LFC`` needs 0/1 treatments (its message for a non-binary ``A``).
_LFC_BINARY_REASON = (
    ": LFC estimates the contrast of treated and control arms, so a continuous treatment "
    "(dose, guide UMI) must be binarised first, e.g. (A > 0); fit_gcate accepts it "
    "continuous")


def check_zero_one(A: np.ndarray, *, for_lfc: bool = False) -> None:
    """Raise unless every entry of ``A`` is 0 or 1.

    ``for_lfc`` words the message for ``LFC`` (which explains why it needs 0/1).
    """
    if not np.all(np.isin(A, (0, 1))):
        if for_lfc:
            raise ValueError("A must contain only 0/1 treatment indicators" + _LFC_BINARY_REASON)
        raise ValueError("A must be binary (0/1)")


def check_counts_scan(scan: Any, name: str, non_integer: str) -> None:
    """Raise for a count matrix's summary that is not raw counts.

    Parameters
    ----------
    scan : object
        With ``dtype``, ``n_bad`` (NaN/inf entries), ``n_neg`` (negative entries),
        ``vmin`` (minimum) and ``n_frac`` (non-integer entries), e.g.
        :class:`causarray.ondisk.CountScan`.
    name : str
        Name used in the message.
    non_integer : {'raise', 'round'}
        ``'raise'``: non-integer entries are an error; ``'round'``: a ``UserWarning``
        says they were rounded.
    """
    if scan.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numeric counts, got dtype {scan.dtype}")
    if scan.n_bad:
        raise ValueError(f"{name} contains {scan.n_bad} NaN or infinite values; causarray "
                         "needs raw counts")
    if scan.n_neg:
        raise ValueError(f"{name} has negative values (minimum {scan.vmin:g}); causarray needs "
                         "raw counts, not normalised or scaled data")
    if scan.n_frac:
        if non_integer == "raise":
            raise ValueError(f"{name} does not hold raw counts: {scan.n_frac} non-integer "
                             "entries (log-normalised data?); pass the layer with raw UMI "
                             "counts")
        warnings.warn(f"{name} contains {scan.n_frac} non-integer entries; they were rounded "
                      "to the nearest integer", UserWarning, stacklevel=3)


def check_raw_counts(counts: Any, name: str = "adata.X") -> None:
    """Raise if a matrix does not hold raw counts (non-negative integers).

    Parameters
    ----------
    counts : ndarray or scipy.sparse matrix
        Cells x genes matrix.
    name : str
        Name used in the message.

    Raises
    ------
    ValueError
        NaN/inf, negative or non-integer entries (e.g. log-normalised data).
    """
    from types import SimpleNamespace

    if counts is None:
        raise ValueError(f"{name} is empty (None); pass the layer holding raw counts")
    vals = counts.data if sp.issparse(counts) else np.asarray(counts)
    scan = SimpleNamespace(dtype=vals.dtype, n_bad=0, n_neg=0, vmin=0.0, n_frac=0)
    if vals.dtype.kind in "biuf":
        if vals.dtype.kind == "f":
            scan.n_bad = int(vals.size - np.count_nonzero(np.isfinite(vals)))
        if not scan.n_bad and vals.size:
            scan.vmin = float(np.min(vals))
            scan.n_neg = int(scan.vmin < 0)
        if not (scan.n_bad or scan.n_neg) and vals.dtype.kind == "f":
            scan.n_frac = int(np.count_nonzero(vals != np.rint(vals)))
    check_counts_scan(scan, name, non_integer="raise")


# ----------------------------------------------------------------------------- AnnData keys
def _given_or_uns(adata: Any, key: str, given: Any, hint: str) -> Any:
    """``given``, or ``adata.uns[key]`` when it is None (an error naming both if absent)."""
    if given is not None:
        return given
    if key not in adata.uns:
        raise ValueError(f"{key} was not given and adata.uns has no {key!r} entry; pass "
                         f"{key}={hint}")
    return adata.uns[key]


def resolve_screen_keys(
    adata: Any, pert_col: str | None, ctrl_label: Any | None
) -> tuple[str, str, np.ndarray]:
    """Perturbation column, control label and the labels (as str) of an AnnData screen.

    ``pert_col`` / ``ctrl_label`` default to ``adata.uns['pert_col']`` /
    ``adata.uns['ctrl_label']``.

    Raises
    ------
    ValueError
        No such obs column, missing labels, or a control label that does not occur
        (the available labels are listed).
    """
    pert_col = str(_given_or_uns(adata, "pert_col", pert_col,
                                 "<obs column holding the perturbation labels>"))
    if pert_col not in adata.obs.columns:
        raise ValueError(
            f"obs has no column {pert_col!r}; available columns: "
            f"{list(map(str, adata.obs.columns))}"
        )
    labels_raw = adata.obs[pert_col]
    n_missing = int(labels_raw.isna().sum())
    if n_missing:
        raise ValueError(f"obs[{pert_col!r}] has {n_missing} missing labels")
    labels = labels_raw.astype(str).to_numpy()
    ctrl_label = str(_given_or_uns(adata, "ctrl_label", ctrl_label,
                                   "<label of the control cells>"))
    if not np.any(labels == ctrl_label):
        available = sorted(set(labels))
        shown = available[:20] + (["..."] if len(available) > 20 else [])
        raise ValueError(
            f"control label {ctrl_label!r} not found in obs[{pert_col!r}]; available "
            f"labels: {shown}"
        )
    return pert_col, ctrl_label, labels


def check_file(path: Any) -> None:
    """Raise unless ``path`` (a ``pathlib.Path``) is an existing file."""
    if not path.is_file():
        raise ValueError(f"input file not found: {path}")


def check_layer(layer: str, available: Sequence[str]) -> None:
    """Raise unless ``layer`` is one of the AnnData's layers ``available``."""
    if layer not in available:
        raise ValueError(f"adata has no layer {layer!r}; available layers: {list(available)}")


def check_x_present(counts: Any) -> None:
    """Raise if ``adata.X`` is absent (None) and no layer was named."""
    if counts is None:
        raise ValueError("adata.X is empty (None); pass layer=<name of the counts layer>")


def check_has_perturbed(any_perturbed: bool, pert_col: str, ctrl_label: str) -> None:
    """Raise if every cell carries the control label."""
    if not any_perturbed:
        raise ValueError(f"obs[{pert_col!r}] holds only the control label {ctrl_label!r}; "
                         "there are no perturbed cells")


def check_cells_nonempty(empty: np.ndarray, cell_names: Sequence[Any], n_shown: int = 5) -> None:
    """Raise if a cell has zero total count (``empty``: boolean per cell)."""
    if np.any(empty):
        idx = np.flatnonzero(empty)
        shown = [str(cell_names[i]) for i in idx[:n_shown]]
        raise ValueError(f"{idx.size} cell(s) have zero total count, e.g. {shown}; remove "
                         "them or pass drop_empty_cells=True")


def check_copy_in_memory(backed: bool) -> None:
    """``copy=True`` needs an in-memory AnnData (a backed one stores results in place)."""
    if backed:
        raise ValueError("copy=True needs an in-memory AnnData; with backed='r' the "
                         "results are stored in adata.uns of the backed object (use "
                         "copy=False)")


def check_obs_columns(obs: pd.DataFrame, columns: Sequence[str]) -> None:
    """Raise if a covariate column is not in ``obs`` or has missing values."""
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise ValueError(
            f"covariate column(s) {missing} not in obs; available columns: "
            f"{list(map(str, obs.columns))}"
        )
    for col in columns:
        n_missing = int(obs[col].isna().sum())
        if n_missing:
            raise ValueError(f"covariate {col!r} has {n_missing} missing values")


# ----------------------------------------------------------------------------- sizes
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(value: Any, name: str = "memory_budget") -> int:
    """Bytes of a memory size given as a number of bytes or a string like ``'2GB'``.

    Parameters
    ----------
    value : int, float or str
        ``'512MB'``, ``'2GB'``, ``'1.5GiB'`` (decimal and binary units), or bytes.
    name : str
        Name used in the message.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        Not a positive size.
    """
    import re

    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        size = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).upper() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{name} must be a size such as '2GB' or '512MB', got {value!r}")
        size = float(m.group(1)) * _UNITS[unit]
    else:
        raise ValueError(f"{name} must be a size such as '2GB' or '512MB', got {value!r}")
    if not np.isfinite(size) or size <= 0:
        raise ValueError(f"{name} must be a positive size, got {value!r}")
    return int(size)


# ----------------------------------------------------------------------------- propensity
def _float_columns(M: Any, name: str, what: str) -> np.ndarray:
    """``M`` (dense, sparse or pandas) as a float array, a vector as one column."""
    if hasattr(M, "toarray"):
        M = M.toarray()
    try:
        arr = np.asarray(M, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be {what}, got {type(M).__name__}") from err
    return arr[:, None] if arr.ndim == 1 else arr


def check_ps_treatments(A: Any) -> tuple[np.ndarray, list[str]]:
    """A as an n x a float 0/1 array and the treatment names."""
    names = None
    if hasattr(A, "columns"):  # pandas DataFrame
        names = [str(c) for c in A.columns]
    elif hasattr(A, "name") and hasattr(A, "index") and A.name is not None:  # Series
        names = [str(A.name)]
    arr = _float_columns(A, "A", "a numeric 0/1 matrix")
    if arr.ndim != 2:
        raise ValueError(f"A must be 2-D (cells x treatments), got shape {arr.shape}")
    if not np.all(np.isin(arr, (0.0, 1.0))):
        raise ValueError("A must be binary (0/1)")
    if names is None:
        names = [str(k) for k in range(arr.shape[1])]
    return arr, names


def check_ps_design(W_A: Any, n: int) -> np.ndarray:
    """W_A as an n x d finite float array (the propensity models' covariates)."""
    W = _float_columns(W_A, "W_A", "numeric")
    if W.ndim != 2 or W.shape[0] != n:
        raise ValueError(f"W_A must be an n x d matrix with n = {n} rows, got shape {W.shape}")
    if not np.all(np.isfinite(W)):
        raise ValueError("W_A must be finite")
    return W


def check_ps_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """A boolean (or 0/1) n x a mask of the cells eligible per treatment, or None."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 1 and shape[1] == 1:
        m = m[:, None]
    if m.shape != shape:
        raise ValueError(f"mask has shape {m.shape}, expected the shape of A {shape}")
    if m.dtype != bool:
        if not np.all(np.isin(m, (0, 1))):
            raise ValueError("mask must be boolean")
        m = m.astype(bool)
    return m


def check_class_weight(class_weight: Any) -> None:
    """``class_weight`` of the propensity models: None, 'balanced' or {0: w0, 1: w1}."""
    if class_weight is None or class_weight == "balanced":
        return
    if isinstance(class_weight, dict):
        if set(class_weight) - {0, 1}:
            raise ValueError("class_weight dict keys must be 0 and 1")
        if any(not np.isfinite(w) or w <= 0 for w in class_weight.values()):
            raise ValueError("class_weight dict values must be positive")
        return
    raise ValueError(f"class_weight must be None, 'balanced' or a dict, got {class_weight!r}")

def check_ps_clip_auto(ps_clip: str) -> None:
    """A string ``ps_clip`` must be ``'auto'``."""
    if ps_clip != "auto":
        raise ValueError(f"ps_clip must be 'auto', a (lower, upper) pair or None, "
                         f"got {ps_clip!r}")


def check_ps_clip_bounds(ps_clip: Any, a: int) -> tuple[np.ndarray, np.ndarray]:
    """``ps_clip = (lower, upper)``: scalars or length-a arrays, 0 <= lower < upper <= 1.

    Returns
    -------
    lower, upper : ndarray, shape (a,)
    """
    try:
        lo, hi = ps_clip
    except (TypeError, ValueError) as err:
        raise TypeError(f"ps_clip must be 'auto', a (lower, upper) pair or None, "
                        f"got {ps_clip!r}") from err
    try:
        lower = np.broadcast_to(np.asarray(lo, dtype=float), (a,)).copy()
        upper = np.broadcast_to(np.asarray(hi, dtype=float), (a,)).copy()
    except ValueError as err:
        raise ValueError(f"ps_clip bounds must be scalars or arrays of length {a}") from err
    if not (np.all(lower >= 0) and np.all(upper <= 1) and np.all(lower < upper)):
        raise ValueError("ps_clip bounds must satisfy 0 <= lower < upper <= 1")
    return lower, upper


def check_arms(y: np.ndarray, name: str, where: str = "") -> None:
    """Raise unless the 0/1 labels ``y`` of treatment ``name`` hold both arms.

    ``where`` names the training set in the message.
    """
    if not np.any(y == 1):
        raise ValueError(f"treatment {name!r} has no treated cells{where}")
    if not np.any(y == 0):
        raise ValueError(f"treatment {name!r} has no control cells{where}")


def check_auto_clip_arms(n_trt: np.ndarray, n_elig: np.ndarray, names: Sequence[str]) -> None:
    """``ps_clip='auto'`` needs treated and control cells among each treatment's eligible."""
    for k in range(len(n_trt)):
        if n_trt[k] == 0 or n_trt[k] == n_elig[k]:
            raise ValueError(f"treatment {names[k]!r} needs both treated and control "
                             f"cells for ps_clip='auto'")


def check_fold_count(K: Any) -> None:
    """A number of folds: an integral value >= 1."""
    if int(K) != K or K < 1:
        raise ValueError(f"K must be a positive integer, got {K}")


def check_fold_range(K: Any, n: int) -> None:
    """A number of folds: an integer (not a bool) between 1 and the number of cells n."""
    if not _is_int(K) or not 1 <= K <= n:
        raise ValueError(f"K must be an integer between 1 and n = {n}, got {K!r}")


def check_fold_ids(fold_ids: np.ndarray, folds: Any, n: int) -> None:
    """Raise unless there is one fold id per cell."""
    if fold_ids.shape != (n,):
        raise ValueError(f"folds must have one id per cell (n = {n}), got shape "
                         f"{np.shape(folds)}")


def check_positive_number(name: str, value: Any) -> None:
    """A finite number > 0: ``"<name> must be a positive number, got ..."``."""
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value}")


def check_clipped_scores(pi: np.ndarray) -> None:
    """Raise unless clipped propensity scores lie strictly inside (0, 1)."""
    bad = ~(np.isfinite(pi) & (pi > 0) & (pi < 1))
    if np.any(bad):
        cols = np.flatnonzero(bad.any(axis=0)).tolist()
        raise ValueError(f"propensity scores must lie strictly inside (0, 1) after "
                         f"clipping; {int(bad.sum())} do not (treatment columns {cols})")


def check_not_both(new_given: bool, old: str, new: str) -> None:
    """A renamed keyword: raise when both the new name and its deprecated ``old`` are given."""
    if new_given:
        raise TypeError(f"pass {new!r} only ({old!r} is its deprecated alias)")


def check_clip(clip):
    """``clip`` of the propensity helpers: None, 'auto' or (lower, upper), 0 <= lower < upper <= 1.
    """
    if clip is None or (isinstance(clip, str) and clip == "auto"):
        return clip
    msg = ("clip must be None or a pair (lower, upper) with 0 <= lower < upper <= 1 "
           f"(or 'auto'), got {clip!r}")
    if isinstance(clip, (str, bytes)):
        raise ValueError(msg)
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if not 0 <= lo < hi <= 1:
        raise ValueError(msg)
    return clip


def check_nuisance_cache_path(cache_path: Any) -> None:
    """``save_nuisances=True`` writes beside the result cache, so it needs ``cache_path``."""
    if cache_path is None:
        raise ValueError("save_nuisances=True requires cache_path (the nuisances are "
                         "written beside the result cache)")


# ----------------------------------------------------------------------------- inference
def as_float_array(x: Any, name: str) -> np.ndarray:
    """``x`` as a float ndarray; ``TypeError`` naming ``name`` when it is not numeric."""
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be numeric, got {type(x).__name__}") from err
    return arr


def check_1d(arr: np.ndarray, name: str) -> None:
    """Raise unless ``arr`` is 1-D."""
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")


def check_same_shape(name: str, arr: np.ndarray, shape: tuple) -> None:
    """Raise unless ``arr.shape == shape``: ``"<name> has shape ..., expected ..."``."""
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")


def check_df(df: np.ndarray) -> None:
    """Degrees of freedom must be positive (NaN marks an undefined df)."""
    if np.any(df[~np.isnan(df)] <= 0):
        raise ValueError("df must be positive (NaN marks an undefined df)")


def check_df_shape(pvalue: np.ndarray, df: Any, shape: tuple) -> None:
    """``df`` must broadcast to the statistics without changing their shape."""
    if pvalue.shape != shape:
        raise ValueError(f"df has shape {np.shape(df)}, expected {shape} or a scalar")


def check_pvalues(vals: np.ndarray) -> None:
    """Non-NaN p-values must lie in [0, 1]."""
    if np.any((vals < 0) | (vals > 1)):
        raise ValueError("pvalues must lie in [0, 1] (NaN marks a test not performed)")


def check_eta_finite(tested: np.ndarray, finite_cols: np.ndarray) -> None:
    """Influence values must be finite for every tested gene."""
    if np.any(tested & ~finite_cols):
        raise ValueError("eta must be finite for every tested gene")


def check_fdx_needs(eta: Any, std: Any) -> None:
    """FDX control needs the influence values ``eta`` and the standard errors ``std``."""
    if eta is None or std is None:
        raise ValueError("fdx=True needs eta and std")


def check_fdx_inputs(
    stat: np.ndarray, eta: np.ndarray, std: np.ndarray, n: int, alpha: float, c: float, B: int
) -> None:
    """Shapes and tuning constants of :func:`causarray.inference.fdx_control`."""
    check_1d(stat, "stat")
    check_same_shape("std", std, stat.shape)
    if eta.ndim != 2 or eta.shape[1] != stat.size:
        raise ValueError(f"eta must be n x p with p = {stat.size}, got shape {eta.shape}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not 0 <= c < 1:
        raise ValueError(f"c must lie in [0, 1), got {c}")
    if int(B) != B or B < 1:
        raise ValueError(f"B must be a positive integer, got {B}")


# ----------------------------------------------------------------------------- LFC options
def check_counterfactual_shape(mu0_shape: tuple, a_hat: int, n: int, p: int, a: int) -> None:
    """Given counterfactual means (genes x cells, a treatments) must match the data."""
    if mu0_shape != (p, n) or a_hat != a:
        raise ValueError(f"Y_hat holds predictions for {mu0_shape[1]} cells x "
                         f"{mu0_shape[0]} genes x {a_hat} treatments, "
                         f"expected {n} x {p} x {a}")


def check_counterfactual_array(arr: np.ndarray, n: int, p: int, a: int) -> None:
    """An array ``Y_hat`` must be n x p x a x 2 (control, treated means)."""
    if arr.shape != (n, p, a, 2):
        raise ValueError(f"Y_hat must be a CounterfactualMeans or an array of shape {(n, p, a, 2)}")


def check_gene_fold_shape(gene_fold: np.ndarray, p: int) -> None:
    """``W_gene_folds``: one fold id per gene."""
    if gene_fold.shape != (p,):
        raise ValueError(f"W_gene_folds: the gene folds must have shape {(p,)}, "
                         f"got {gene_fold.shape}")


def check_gene_fold_ids(gene_fold: np.ndarray, n_designs: int) -> None:
    """``W_gene_folds``: every gene's fold indexes one of the designs."""
    if not np.isin(gene_fold, np.arange(n_designs)).all():
        raise ValueError(f"W_gene_folds: every gene's fold must be one of 0..{n_designs - 1} "
                         f"(one design per fold)")


def check_gene_fold_design(W_f: np.ndarray, f: int, n: int) -> None:
    """``W_gene_folds``: each fold's design has one row per cell."""
    if W_f.shape[0] != n:
        raise ValueError(f"W_gene_folds: design {f} has {W_f.shape[0]} rows, expected {n}")


def check_removed_keywords(kwargs: Any) -> None:
    """``TypeError`` for keywords of ``LFC`` that were removed (not merely renamed)."""
    if "clip_pseudo_outcomes" in kwargs:
        raise TypeError("clip_pseudo_outcomes was removed: AIPW pseudo-outcomes are never clipped")


def check_recenter_genes(recenter_genes: np.ndarray, p: int, a: int) -> None:
    """A boolean genes x treatments array."""
    if recenter_genes.shape != (p, a) or recenter_genes.dtype != bool:
        raise ValueError(f"recenter_genes must be a boolean (genes x treatments) array of "
                         f"shape {(p, a)}, got {recenter_genes.dtype} {recenter_genes.shape}")


def check_shift_variance(shift_variance: np.ndarray, p: int, a: int) -> None:
    """A finite, non-negative genes x treatments array."""
    if shift_variance.shape != (p, a) or not np.all(np.isfinite(shift_variance)) \
            or (shift_variance < 0).any():
        raise ValueError(f"shift_variance must be a finite, non-negative (genes x "
                         f"treatments) array of shape {(p, a)}, got shape "
                         f"{shift_variance.shape}")


# ----------------------------------------------------------------------------- batch pipeline
def check_control_pool(n_ctrl_cells: int) -> None:
    """The batch pipeline needs control cells (all-zero rows of A) to share."""
    if n_ctrl_cells == 0:
        raise ValueError("A has no control cells (all-zero rows); the batch pipeline compares "
                         "every perturbation with a shared pool of control cells")


def check_design_given(X: Any, A: Any) -> None:
    """With a count matrix (not a file) as Y, X and A must be given."""
    if X is None or A is None:
        raise ValueError("X and A are required with a count matrix Y; pass a path to an "
                         ".h5ad file (or an AnnData opened with backed='r') as Y to build "
                         "them from the file")


def check_no_design_with_file(X: Any, A: Any) -> None:
    """With a file (or backed AnnData) as Y, X and A are built from it."""
    if X is not None or A is not None:
        raise ValueError("with a file (or backed AnnData) as Y, X and A are built from it: "
                         "leave them out and pass pert_col / ctrl_label / covariates")


def check_design_columns(X: np.ndarray) -> None:
    """The covariate design must have columns (at least the intercept)."""
    if X.shape[1] == 0:
        raise ValueError("X has no columns; pass the design returned by prep_causarray_data "
                         "(it includes the intercept)")


def check_unique_treatment_names(names: Sequence[str]) -> None:
    """Treatment names (columns of A) must be unique."""
    if len(set(names)) != len(names):
        raise ValueError("treatment names (columns of A) must be unique")


def check_control_size_factors(s: np.ndarray) -> None:
    """Every control cell needs counts (a positive size factor)."""
    if np.any(s <= 0):
        raise ValueError("a control cell has no counts (size factor 0); remove empty cells")


def check_executor_client(executor: Any, client: Any) -> None:
    """At most one of ``executor`` and ``client``."""
    if executor is not None and client is not None:
        raise ValueError("pass either executor or client, not both")


def check_lfc_kwargs(lfc_kwargs: Any, reserved: Sequence[str]) -> None:
    """``lfc_kwargs`` of the batch pipeline: not the per-batch inputs, no warm start."""
    bad = [k for k in reserved if k in lfc_kwargs]
    if bad:
        raise ValueError(f"lfc_kwargs may not set {bad}: gcate_lfc_batch builds them per batch")
    if lfc_kwargs.get("outcome_init", None) is not None:
        raise ValueError("lfc_kwargs may set outcome_init only to None (no warm start): "
                         "gcate_lfc_batch starts each batch's outcome GLM from its GCATE fit")


def check_warm_start(warm_start_U: bool, executor: Any) -> None:
    """``warm_start_U`` chains the batches, so they cannot run on an executor."""
    if warm_start_U and executor is not None:
        raise ValueError("warm_start_U=True makes every batch depend on the previous one; "
                         "it cannot run on an executor or client")


def check_factor_fit(fit: Any, reasons: Sequence[str]) -> str:
    """``fit`` of :func:`causarray.gcate_lfc_batch`: ``'auto'``, ``'screen'`` or
    ``'per_batch'``; ``'screen'`` asked for where ``reasons`` (why the screen-level
    estimator does not apply) is not empty raises, naming them."""
    check_choice("fit", fit, ("auto", "screen", "per_batch"))
    if fit == "screen" and reasons:
        raise ValueError(f"fit='screen' needs {' and '.join(reasons)}; "
                         "use fit='per_batch' (or 'auto')")
    return fit


# ----------------------------------------------------------------------------- calibration
def check_uns_key(adata: Any, uns_key: str, obsm_key: str) -> None:
    """Guide counts in ``obsm[obsm_key]`` without column names need ``uns['grna_names']``."""
    if uns_key not in adata.uns:
        raise ValueError(f"obsm[{obsm_key!r}] holds guide counts without names; store the "
                         "guide names in uns['grna_names'] (one per column)")


def check_guide_names(n_names: int, n_cols: int, key: str) -> None:
    """One guide name per column of the guide-count matrix."""
    if n_names != n_cols:
        raise ValueError(f"uns['grna_names'] has {n_names} names but obsm[{key!r}] has "
                         f"{n_cols} columns")


def check_guide_targets(n_targets: int, n_cols: int, tkey: str, key: str) -> None:
    """One guide target per column of the guide-count matrix."""
    if n_targets != n_cols:
        raise ValueError(f"uns[{tkey!r}] has {n_targets} entries but obsm[{key!r}] "
                         f"has {n_cols} columns")


def check_guide_matrix(values: Any, key: str) -> None:
    """The guide counts ``obsm[key]`` must be a cells x guides matrix."""
    if values.ndim != 2:
        raise ValueError(f"obsm[{key!r}] must be a cells x guides matrix")


def check_guide_key(adata: Any, guide_key: Any) -> None:
    """``guide_key`` must name an obs column or an obsm key of ``adata``."""
    if not isinstance(guide_key, str):
        raise ValueError(f"guide_key must be an obs column, an obsm key, None or False, "
                         f"got {guide_key!r}")
    if guide_key not in adata.obsm and guide_key not in adata.obs.columns:
        raise ValueError(f"guide_key {guide_key!r} is neither an obs column nor an obsm key; "
                         f"obs columns: {list(map(str, adata.obs.columns))}, obsm keys: "
                         f"{list(map(str, adata.obsm.keys()))}")


def check_excluded_guides(excluded: Sequence[str], guides: Any) -> None:
    """``exclude_guides`` needs guide identities and must name guides of the controls."""
    if guides is None:
        raise ValueError("exclude_guides was given but adata has no guide identities; "
                         "pass guide_key=<obs column or obsm key>")
    seen = {str(g) for g in guides if g is not None}
    unknown = [g for g in excluded if g not in seen]
    if unknown:
        raise ValueError(f"exclude_guides: {unknown} are not guides of the control cells; "
                         f"known guides: {sorted(seen)[:10]}{' ...' if len(seen) > 10 else ''}")


def check_fake_budget(n_fake: int, fake_size: int, usable: int, n_ctrl: int, keep: int) -> None:
    """``n_fake`` fakes of ``fake_size`` cells must fit in the usable control cells."""
    if n_fake * fake_size > usable:
        raise ValueError(
            f"n_fake={n_fake} fake perturbations of fake_size={fake_size} cells need "
            f"{n_fake * fake_size} control cells, but only {usable} of the {n_ctrl} "
            f"control cells can be used (at least {keep} stay in the control arm); "
            "lower n_fake or fake_size")


def check_fake_controls(size: int, n_ctrl: int, n_fake: int, min_cells: int,
                        keep_fraction: float) -> None:
    """Automatic fakes need at least ``min_cells`` cells each."""
    import math

    if size < min_cells:
        need = int(math.ceil(n_fake * min_cells / (1.0 - keep_fraction)))
        raise ValueError(
            f"too few control cells for the calibration check: {n_ctrl} control cells, but "
            f"n_fake={n_fake} fake perturbations of at least {min_cells} cells with half "
            f"of the controls kept as the control arm need {need}; lower n_fake")


def check_run_settings(store: Any, key: str) -> None:
    """``adata.uns[key]`` must hold the settings of a ``tl.lfc`` run."""
    from collections.abc import Mapping

    if not isinstance(store, Mapping) or not isinstance(store.get("settings"), Mapping):
        raise ValueError(f"adata.uns[{key!r}] holds no run settings; run causarray.tl.lfc(adata) "
                         "first or pass the settings to calibration_check yourself")


def check_runner_result(res: Any) -> None:
    """A calibration runner must return a table with ``trt``, ``pvalue`` and ``padj``."""
    if not isinstance(res, pd.DataFrame):
        raise TypeError(f"the runner must return a pandas DataFrame, got {type(res).__name__}")
    check_table_columns(res, ("trt", "pvalue", "padj"), "the runner's result table")


# ----------------------------------------------------------------------------- propensity refits
#: Overlap metrics a refit trigger / target may name (propensity_refit.METRICS).
REFIT_METRICS = ("auc", "overlap_ratio", "ess_treated_fraction", "ess_control_fraction")


def _unique_names(names: Any, n: int, label: str, of: str) -> list:
    """``names`` as a list of ``n`` distinct (as strings) labels."""
    names = list(names)
    if len(names) != n:
        raise ValueError(f"{label} has {len(names)} entries for {n} {of}")
    if len(set(map(str, names))) != len(names):
        raise ValueError(f"{label} must be unique")
    return names


def refit_treatments(A: Any, treatment_names: Sequence | None) -> tuple[np.ndarray, list]:
    """A as an n x a 0/1 float array and unique treatment names (given or from A)."""
    arr = A.to_numpy() if isinstance(A, pd.DataFrame) else np.asarray(A)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or not np.all(np.isin(arr, (0, 1))):
        raise ValueError("A must be a 1-D or 2-D matrix of 0/1 treatment indicators")
    if treatment_names is None:
        treatment_names = list(A.columns) if isinstance(A, pd.DataFrame) \
            else list(range(arr.shape[1]))
    return arr.astype(float), _unique_names(treatment_names, arr.shape[1], "treatment_names",
                                            "treatments")


def refit_covariates(X_A: Any, n: int,
                     covariate_names: Sequence | None) -> tuple[np.ndarray, list]:
    """X_A as an n x d finite float array and unique covariate names."""
    arr = X_A.to_numpy() if isinstance(X_A, pd.DataFrame) else np.asarray(X_A)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"X_A must be 2-D with {n} rows (the rows of A), got shape "
                         f"{arr.shape}")
    try:
        arr = arr.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError("X_A must contain numeric covariates") from exc
    if not np.all(np.isfinite(arr)):
        raise ValueError("X_A contains NaN or infinite values")
    if covariate_names is None:
        covariate_names = list(X_A.columns) if isinstance(X_A, pd.DataFrame) \
            else [f"covariate_{j + 1}" for j in range(arr.shape[1])]
    return arr, _unique_names(covariate_names, arr.shape[1], "covariate_names",
                              "columns of X_A")


def refit_resolver(names: list, size: int, what: str):
    """A function mapping a name (or a position) of ``names`` to its position."""
    lookup = {name: j for j, name in enumerate(names)}
    lookup_str = {str(name): j for j, name in enumerate(names)}

    def resolve(value) -> int:
        if isinstance(value, (str, bytes)) or not isinstance(value, (int, np.integer)):
            if value in lookup:
                return lookup[value]
            if str(value) in lookup_str:
                return lookup_str[str(value)]
        elif value in lookup:
            return lookup[value]
        elif 0 <= int(value) < size:
            return int(value)
        raise ValueError(f"Unknown {what}: {value!r}")

    return resolve


def refit_mask(mask: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """A boolean mask of the shape of A (a 1-D mask is one column), or None."""
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 1:
        m = m[:, None]
    check_mask_shape(m, shape)
    return m


def parse_condition(condition: str) -> tuple[str, str]:
    """``'<metric>_lt'`` / ``'<metric>_gt'`` as (metric, 'lt' or 'gt')."""
    if not isinstance(condition, str) or condition[-3:] not in ("_lt", "_gt"):
        raise ValueError(f"condition {condition!r} must be '<metric>_lt' or '<metric>_gt'")
    name = condition[:-3]
    if name not in REFIT_METRICS:
        raise ValueError(f"condition {condition!r} names no metric; metrics are "
                         f"{list(REFIT_METRICS)}")
    return name, condition[-2:]


def check_conditions(*conds: Any) -> None:
    """Trigger / target conditions: non-empty mappings of known metric conditions."""
    from collections.abc import Mapping

    for cond in conds:
        if not isinstance(cond, Mapping) or not cond:
            raise ValueError("trigger / target must be non-empty mappings like "
                             "{'auc_gt': 0.9}")
        for c in cond:
            parse_condition(c)


def check_refit_mappings(drop_by_treatment: Any, penalty_factors_by_treatment: Any,
                         ps_model: str) -> None:
    """``drop_by_treatment`` / ``penalty_factors_by_treatment`` are mappings; penalties
    need the logistic model (an L2 penalty)."""
    from collections.abc import Mapping

    if not isinstance(drop_by_treatment, Mapping):
        raise ValueError("drop_by_treatment must be a mapping {treatment: covariates}")
    if not isinstance(penalty_factors_by_treatment, Mapping):
        raise ValueError("penalty_factors_by_treatment must be a mapping "
                         "{treatment: {covariate: factor}}")
    if penalty_factors_by_treatment and ps_model != "logistic":
        raise ValueError("penalty_factors_by_treatment is supported only for logistic models "
                         f"(an L2 penalty), got ps_model={ps_model!r}")


def refit_drops_and_factors(drop_by_treatment: Any, penalty_factors_by_treatment: Any,
                            t_of: Any, c_of: Any, t_names: list,
                            c_names: list) -> tuple[dict[int, set], dict[int, dict]]:
    """Dropped covariates and penalty factors (>= 1) per treatment position.

    ``t_of`` / ``c_of`` map a treatment / covariate name to its position
    (:func:`refit_resolver`).  Raises for repeated treatments, duplicate covariates,
    non-numeric or < 1 factors, and covariates both dropped and penalized.
    """
    from collections.abc import Mapping

    drops: dict[int, set] = {}
    for t, covs in drop_by_treatment.items():
        j = t_of(t)
        if j in drops:
            raise ValueError(f"treatment {t_names[j]!r} is given more than once")
        covs = [covs] if isinstance(covs, (str, bytes, int, np.integer)) else list(covs)
        idx = [c_of(c) for c in covs]
        if len(set(idx)) != len(idx):
            raise ValueError(f"duplicate dropped covariates for treatment {t_names[j]!r}")
        drops[j] = set(idx)
    factors: dict[int, dict] = {}
    for t, fs in penalty_factors_by_treatment.items():
        j = t_of(t)
        if j in factors:
            raise ValueError(f"treatment {t_names[j]!r} is given more than once")
        if not isinstance(fs, Mapping):
            raise ValueError(f"penalty factors of treatment {t_names[j]!r} must be a mapping "
                             "{covariate: factor}")
        res: dict[int, float] = {}
        for c, f in fs.items():
            k = c_of(c)
            try:
                f = float(f)
            except (TypeError, ValueError):
                raise ValueError(f"penalty factor of {c_names[k]!r} must be a number, "
                                 f"got {f!r}") from None
            if not np.isfinite(f) or f < 1:
                raise ValueError(f"penalty factors must be finite numbers at least 1, got {f} "
                                 f"for {c_names[k]!r}")
            if k in res:
                raise ValueError(f"duplicate penalty factor for covariate {c_names[k]!r}")
            res[k] = f
        factors[j] = res
    for j in set(drops) & set(factors):
        both = drops[j] & set(factors[j])
        if both:
            raise ValueError(f"covariates {[c_names[k] for k in sorted(both)]} are both "
                             f"dropped and penalized for treatment {t_names[j]!r}")
    return drops, factors


def check_refit_pi_hat(pi: np.ndarray, shape: tuple) -> None:
    """Given scores must have the shape of A and be probabilities."""
    if pi.shape != shape:
        raise ValueError(f"pi_hat must have the shape of A {shape}, got {pi.shape}")
    if not np.all(np.isfinite(pi)) or np.any((pi < 0) | (pi > 1)):
        raise ValueError("pi_hat must hold probabilities in [0, 1]")


def check_pi_hat_shape(pi: np.ndarray, shape: tuple) -> None:
    """Given scores must have the shape of A."""
    if pi.shape != shape:
        raise ValueError(f"pi_hat must have the shape of A {shape}, got {pi.shape}")


def check_kept_covariates(kept: Sequence[int], treatment: Any) -> None:
    """Dropping must leave a treatment at least one covariate."""
    if not kept:
        raise ValueError(f"dropping removes every covariate of treatment {treatment!r}")


def check_bracket(bracket: Any) -> tuple[float, float]:
    """A penalty-factor bracket ``(low, high)`` with ``1 <= low < high < inf``."""
    try:
        low, high = (float(b) for b in bracket)
    except (TypeError, ValueError):
        raise ValueError(f"bracket must be a pair (low, high), got {bracket!r}") from None
    if not 1.0 <= low < high or not np.isfinite(high):
        raise ValueError(f"bracket must satisfy 1 <= low < high < inf, got {bracket!r}")
    return low, high


def check_tol(tol: Any) -> None:
    """A positive tolerance."""
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")


def check_unique_candidates(cand: Sequence[int]) -> None:
    """Candidate covariates must be unique."""
    if len(set(cand)) != len(cand):
        raise ValueError("candidates must be unique")


# ----------------------------------------------------------------------------- glm_compat
def check_offset_rows(off: np.ndarray, n: int) -> None:
    """One offset per row of Y (``fit_glm`` of the 0.1.1 interface)."""
    if off.shape[0] != n:
        raise ValueError(f"offset has length {off.shape[0]} but Y has {n} rows")


def check_impute_needs_A(impute: Any) -> None:
    """Counterfactual predictions (``impute``) need the treatments A."""
    if impute is not False:
        raise ValueError("impute needs treatments A (predictions with each treatment on/off)")


def check_impute_design(X_test: np.ndarray, impute: Any, d: int) -> None:
    """An ``impute`` design has the d columns of X."""
    if X_test.ndim != 2 or X_test.shape[1] != d:
        raise ValueError(f"impute must be True or an array with {d} columns, got shape "
                         f"{np.shape(impute)}")


def check_offset_test(off_t: np.ndarray | None, offset_test: Any, m: int) -> None:
    """One offset per row of the ``impute`` design."""
    if off_t is not None and off_t.shape[0] != m:
        if offset_test is None:
            raise ValueError("impute has different rows from X: pass offset_test")
        raise ValueError("offset_test must have one entry per row of impute")


def check_obs_column(name: str, column: Any, obs: pd.DataFrame) -> None:
    """``column`` (the option ``name``) must be a column of ``obs``."""
    if column not in obs:
        raise ValueError(f"{name} {column!r} is not a column of obs "
                         f"(columns: {list(obs.columns)[:10]})")


def check_label_occurs(name: str, label: Any, labels: np.ndarray, column: str) -> None:
    """``label`` (the option ``name``) must occur in ``obs[column]`` (as str)."""
    if not np.any(labels == str(label)):
        raise ValueError(f"{name} {label!r} does not occur in obs[{column!r}]")


def check_gene_indices(genes: np.ndarray | None, n_vars: int) -> None:
    """Gene positions: a non-empty 1-D array in [0, n_vars), or None."""
    if genes is not None and (genes.ndim != 1 or genes.size == 0 or genes.min() < 0
                              or genes.max() >= n_vars):
        raise ValueError(f"gene_indices must be a non-empty 1-D array of indices in "
                         f"[0, {n_vars})")


def check_covariate_columns(covs: Sequence[str], obs: pd.DataFrame) -> None:
    """Covariate columns must be columns of ``obs``."""
    missing = [c for c in covs if c not in obs]
    if missing:
        raise ValueError(f"covariate_columns {missing} are not columns of obs")


def check_both_groups(A: np.ndarray) -> None:
    """A single 0/1 treatment column must hold both control and perturbed cells."""
    if A.min() == A.max():
        raise ValueError("fit_glm_ondisk needs both control and perturbed cells after "
                         "dropping empty cells")


# ----------------------------------------------------------------------------- diagnostics
def check_scores(pi: np.ndarray, shape: tuple) -> None:
    """Propensity scores of the shape of A, finite and in [0, 1]."""
    if pi.shape != shape:
        raise ValueError(f"pi_hat has shape {pi.shape}, expected the shape of A {shape}")
    if not np.all(np.isfinite(pi)) or np.any((pi < 0) | (pi > 1)):
        raise ValueError("pi_hat must hold finite scores in [0, 1]")


def check_names(names: Sequence[str], n: int, what: str, unique: bool = True) -> None:
    """``n`` labels, unique unless ``unique`` is False."""
    if len(names) != n:
        raise ValueError(f"{what} has {len(names)} entries, expected {n}")
    dup = pd.Index(names)
    if unique and dup.has_duplicates:
        raise ValueError(f"{what} must be unique; duplicated: "
                         f"{list(dup[dup.duplicated()].unique()[:5])}")


def check_unit_bounds(name: str, bounds: Any) -> tuple[float, float]:
    """A pair ``(low, high)`` with ``0 <= low < high <= 1``."""
    lo, hi = bounds
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"{name} must satisfy 0 <= low < high <= 1, got {bounds}")
    return lo, hi


def check_has_controls(control: np.ndarray) -> None:
    """A must have control cells (all-zero rows)."""
    if not control.any():
        raise ValueError("A has no control cells (rows with all zeros)")


def check_has_treated(treated: np.ndarray, name: Any) -> None:
    """Treatment ``name`` must have treated cells."""
    if not treated.any():
        raise ValueError(f"treatment {name!r} has no treated cells")


def check_association_covariates(Z: np.ndarray, n: int) -> None:
    """Covariates to associate with the treatments: a finite n x m matrix."""
    if Z.ndim != 2 or Z.shape[0] != n:
        raise ValueError(f"Z must be an n x m matrix with n = {n} rows, got shape {Z.shape}")
    if not np.all(np.isfinite(Z)):
        raise ValueError("Z must be finite")


def check_bool_mask(values: np.ndarray) -> np.ndarray:
    """A test mask as booleans: bool, or numbers that are all 0 or 1."""
    v = np.asarray(values)
    if v.dtype == bool:
        return v
    if v.dtype.kind in "iuf" and np.all(np.isin(v, (0, 1))):
        return v.astype(bool)
    raise TypeError("test_mask must be boolean (True/False or 0/1)")


def check_labels(values: Any, what: str) -> None:
    """Reject missing labels (None / NaN), which would otherwise match the string 'None'."""
    bad = [v for v in values if v is None or (isinstance(v, float) and np.isnan(v))]
    if bad:
        raise ValueError(f"{what} labels must not be missing (None or NaN; {len(bad)} found)")


def check_unique_labels(labels: Sequence[str], what: str) -> None:
    """Labels of a test mask must be unique."""
    s = pd.Index(labels)
    if s.has_duplicates:
        extra = " (duplicate treatment-gene tests)" if what == "(treatment, gene)" else ""
        raise ValueError(f"duplicated {what} labels in test_mask{extra}: "
                         f"{list(s[s.duplicated()].unique()[:5])}")


def check_results_column(results: pd.DataFrame, column: str) -> None:
    """The result table must have ``column``."""
    if column not in results.columns:
        raise ValueError(f"results has no column {column!r}")


def check_mask_multiindex(test_mask: pd.Series) -> None:
    """A Series test mask is indexed by (treatment, gene)."""
    if not isinstance(test_mask.index, pd.MultiIndex) or test_mask.index.nlevels != 2:
        raise ValueError("a Series test_mask needs a 2-level (treatment, gene) MultiIndex")


def check_mask_labels_given(treatment_names: Any, gene_names: Any) -> None:
    """An array test mask needs its row and column labels."""
    if treatment_names is None or gene_names is None:
        raise ValueError("an array test_mask needs treatment_names and gene_names")


def check_test_mask_shape(vals: np.ndarray, n_trt: int, n_genes: int) -> None:
    """An array test mask is treatments x genes."""
    if vals.shape != (n_trt, n_genes):
        raise ValueError(f"test_mask has shape {vals.shape}, expected "
                         f"({n_trt}, {n_genes}) treatments x genes")


def check_treatment_column(results: pd.DataFrame, treatment_col: str, n_trt: int) -> None:
    """Without a treatment column in the results, the mask may hold one treatment only."""
    if treatment_col not in results.columns and n_trt != 1:
        raise ValueError(f"results has no column {treatment_col!r} but test_mask holds "
                         f"{n_trt} treatments")


def check_unique_result_rows(row_keys: Sequence[str]) -> None:
    """Result rows must be unique (treatment, gene) pairs (keys joined by NUL)."""
    dup = pd.Index(row_keys)
    if dup.has_duplicates:
        shown = [tuple(k.split("\x00")) for k in dup[dup.duplicated()].unique()[:5]]
        raise ValueError(f"results has duplicated (treatment, gene) rows (duplicate "
                         f"treatment-gene tests), e.g. {shown}: the mask cannot be aligned "
                         "unambiguously")


def check_mask_covers_results(out: pd.Series, trts: np.ndarray, genes: np.ndarray) -> None:
    """Every result row must have an entry in the test mask (``out``: NaN where none)."""
    if out.isna().any():
        bad = np.flatnonzero(out.isna().to_numpy())
        shown = [(str(trts[i]), str(genes[i])) for i in bad[:5]]
        raise ValueError(f"{bad.size} result row(s) have no entry in test_mask (missing "
                         f"treatment-gene tests), e.g. {shown}")


# ----------------------------------------------------------------------------- plots
def check_uns_entry(data: Any, key: str) -> Any:
    """``data.uns[key]``, the record of a :func:`causarray.tl.lfc` run, which must exist.

    Returns
    -------
    The entry ``data.uns[key]``.
    """
    uns = getattr(data, "uns", None)
    if uns is None or key not in uns:
        raise ValueError(f"adata.uns has no {key!r} entry; run causarray.tl.lfc(adata) first")
    return uns[key]


def check_table_columns(table: pd.DataFrame, columns: Sequence[str],
                        what: str = "result table") -> None:
    """``table`` must have every one of ``columns``; the missing ones are listed in order."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}")


def check_jic_stored(jic: Any) -> None:
    """A stored JIC table (None when ``tl.lfc`` ran with a fixed r)."""
    if jic is None:
        raise ValueError("no JIC table stored: r was fixed; run tl.lfc with r='auto'")


def check_obsm_scores(adata: Any, name: str) -> None:
    """``adata.obsm[name]`` must hold the propensity scores of a ``tl.lfc`` run."""
    if name not in adata.obsm:
        raise ValueError(f"adata.obsm has no {name!r}; run tl.lfc(adata, propensity=True)")


def check_pi_hat_given(pi_hat: Any) -> None:
    """Scores ``pi_hat`` must come with a treatment matrix (they are not stored in it)."""
    if pi_hat is None:
        raise ValueError("pi_hat is required when data is a treatment matrix")


def check_plot_treatments(names: Sequence[str], treatments: Sequence[Any]) -> list[int]:
    """Positions of the treatments to draw, given by name or by column position.

    An integer that is not also a treatment name is a column position in
    ``0..len(names) - 1``; anything else must be a name (compared as ``str``).

    Returns
    -------
    list of int, one per entry of ``treatments``, not empty.
    """
    names = list(names)
    chosen = []
    for t in treatments:
        if _is_int(t) and str(t) not in names:
            if not 0 <= int(t) < len(names):
                raise ValueError(f"treatment position {t} out of range 0..{len(names) - 1}")
            chosen.append(int(t))
        elif str(t) in names:
            chosen.append(names.index(str(t)))
        else:
            raise ValueError(f"unknown treatment {t!r}; available: {names[:20]}")
    if not chosen:
        raise ValueError("no treatment to plot")
    return chosen


def check_enough_axes(n_panels: int, n_axes: int) -> None:
    """One Axes per panel to draw."""
    if n_axes < n_panels:
        raise ValueError(f"{n_panels} treatments to draw but {n_axes} axes given")


def check_known_labels(labels: Sequence[str], available: Sequence[str], what: str) -> None:
    """Row / column labels to show must be among ``available`` (the first ten unknown listed)."""
    have = set(available)
    unknown = [x for x in labels if x not in have]
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown[:10]}")


def check_vmax(vmax: Any) -> float | None:
    """A colour limit: None, or a finite number > 0 (the scale is [-vmax, vmax]).

    Raises
    ------
    TypeError
        Not a number.
    ValueError
        Not finite or not positive.
    """
    if vmax is None:
        return None
    try:
        vmax_f = float(vmax)
    except (TypeError, ValueError):
        raise TypeError(f"vmax must be None or a positive number, got {vmax!r}") from None
    if not (np.isfinite(vmax_f) and vmax_f > 0):
        raise ValueError(f"vmax must be None or a finite number > 0 (the colour scale "
                         f"is [-vmax, vmax]), got {vmax!r}")
    return vmax_f


def check_calibration_table(table: Any) -> pd.DataFrame:
    """The p-value table of a calibration check (``CalibrationResult.pvalues`` or a frame)."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError("result must be a CalibrationResult or a table with a 'pvalue' column")
    return table


def check_some_finite(keep: np.ndarray) -> None:
    """At least one finite p-value to plot (``keep`` marks the finite ones)."""
    if not np.any(keep):
        raise ValueError("no finite p-values to plot")


# ----------------------------------------------------------------------------- files
def check_h5_key(f: Any, path: str, key: str) -> None:
    """The HDF5 file must hold a matrix at ``key``."""
    if key not in f:
        raise ValueError(f"{path} has no matrix {key!r}")


def check_h5_dense(node: Any) -> None:
    """A dense HDF5 dataset of counts must be 2-D."""
    if node.ndim != 2:
        raise ValueError(f"{node.name} is a {node.ndim}-D dataset, not a cells x genes "
                         "matrix")


def check_h5_sparse(node: Any, shape: Any) -> None:
    """An HDF5 group of counts must be a CSR/CSC matrix (data, indices, indptr, shape)."""
    if shape is None or not {"data", "indices", "indptr"} <= set(node.keys()):
        raise ValueError(f"{node.name} is neither a dense matrix nor a CSR/CSC sparse matrix")


def check_h5_row_major(fmt: str, path: str, key: str) -> None:
    """Rows are read lazily, so a sparse matrix on disk must be CSR, not CSC."""
    if fmt == "csc":
        raise ValueError(f"{path}:{key} is stored column-wise (CSC); rows cannot "
                         "be read lazily. Rewrite it as CSR, e.g. adata.X = "
                         "adata.X.tocsr(); adata.write_h5ad(path)")


def check_cache_path(path: Any) -> None:
    """``cache_path`` names a file (a ``pathlib.Path``), not a directory."""
    if path.is_dir():
        raise ValueError(f"cache_path {str(path)!r} is a directory; pass a file path "
                         "such as 'results.h5'")


def check_results_path(path: Any, cache_path: Any = None) -> Any:
    """``results_path`` of ``gcate_lfc_batch``: None, or a new ``.parquet`` file in an
    existing folder, not the cache itself.  Returns it as a ``pathlib.Path`` (or None)."""
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"results_path must be a path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    out = Path(path)
    if out.suffix != ".parquet":
        raise ValueError(f"results_path must end in '.parquet', got {str(out)!r}")
    if not out.parent.is_dir():
        raise ValueError(f"results_path {str(out)!r}: folder {str(out.parent)!r} does not "
                         "exist")
    if cache_path is not None and out.resolve() == Path(cache_path).resolve():
        raise ValueError(f"results_path {str(out)!r} is the cache_path; pass another file")
    return out


def check_cache_format(is_cache: bool, path: Any) -> None:
    """A file read as a batch cache must carry the cache's format tag."""
    if not is_cache:
        raise ValueError(f"{str(path)!r} is not a causarray batch cache")


def check_cache_batches(n_batches: int, path: Any) -> None:
    """A batch cache read as a result must hold at least one batch."""
    if not n_batches:
        raise ValueError(f"{str(path)!r} holds no batches")


# ----------------------------------------------------------------------------------
# propensity per perturbation label (front door without a cells x perturbations array)
# ----------------------------------------------------------------------------------
def check_one_label_per_cell(per_cell: np.ndarray) -> None:
    """Per-label propensity models need at most one perturbation per cell."""
    if per_cell.size and per_cell.max() > 1:
        raise ValueError(f"{int(np.count_nonzero(per_cell > 1))} cell(s) carry more than one "
                         "perturbation; per-label propensity models need one label per cell")


def check_label_codes(codes: np.ndarray, a: int) -> None:
    """Integer codes of the cells' perturbations: -1 (control) or 0 .. a - 1."""
    if codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be integers (-1 for controls), got dtype {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() >= a):
        raise ValueError(f"codes must lie in -1 .. {a - 1} (one per treatment name)")


def check_propensity_design(W: np.ndarray, n: int, names: Sequence[str]) -> None:
    """The propensity design: n x d, with one name per column."""
    if W.ndim != 2 or W.shape[0] != n:
        raise ValueError(f"W_A must be an n x d matrix with n = {n} rows, got shape {W.shape}")
    if len(names) != W.shape[1]:
        raise ValueError(f"design_names has {len(names)} entries, W_A has {W.shape[1]} columns")


def check_has_label_controls(n_controls: int) -> None:
    """The shared control cells (code -1) must exist."""
    if n_controls == 0:
        raise ValueError("there are no control cells (code -1)")


def check_propensity_models(present: bool, key: str) -> None:
    """``tl.propensity_scores`` needs the models a ``tl.lfc(propensity=True)`` run stored."""
    if not present:
        raise ValueError(f"adata holds no propensity models under {key!r}; run "
                         "causarray.tl.lfc(adata, propensity=True)")


def check_treatments_known(chosen: Sequence[str], available: Sequence[str]) -> None:
    """Treatments asked for must be among those with a stored model."""
    have = set(available)
    unknown = [t for t in chosen if t not in have]
    if unknown:
        raise ValueError(f"unknown treatment(s) {unknown[:5]}; available: "
                         f"{list(available[:20])}")


def check_gene_folds(gene_folds: Any) -> int | str:
    """``fit_gcate(gene_folds=)``: 'auto' or an integer >= 0 (0 or 1: no gene folds)."""
    if isinstance(gene_folds, str):
        if gene_folds != "auto":
            raise ValueError(f"gene_folds must be 'auto' or an integer >= 0, got {gene_folds!r}")
        return gene_folds
    if isinstance(gene_folds, bool) or not isinstance(gene_folds, (int, np.integer)) \
            or gene_folds < 0:
        raise ValueError(f"gene_folds must be 'auto' or an integer >= 0, got {gene_folds!r}")
    return int(gene_folds)


# ----------------------------------------------------------------------------------
# guides (high-MOI and multi-guide screens, causarray.guides)
# ----------------------------------------------------------------------------------
MOI_CHOICES = ("auto", "low", "high")
PAIR_CHOICES = ("all", "cis")


def check_guide_source(guides: Any) -> str:
    """Where the guide counts are: ``'feature_types'``, ``'obsm'`` (``'obsm:KEY'``),
    ``'path'`` (an ``.h5ad`` file) or ``'anndata'`` (an AnnData of cells x guides)."""
    if isinstance(guides, str) and guides == "feature_types":
        return "feature_types"
    if isinstance(guides, str) and guides.startswith("obsm:") and len(guides) > 5:
        return "obsm"
    if isinstance(guides, (str, Path)) and str(guides).endswith(".h5ad"):
        if not Path(guides).is_file():
            raise ValueError(f"guides: no such file {str(guides)!r}")
        return "path"
    if hasattr(guides, "obs_names") and hasattr(guides, "X") and hasattr(guides, "var"):
        return "anndata"
    raise TypeError("guides must be 'feature_types', 'obsm:KEY', an AnnData of guide counts "
                    f"(cells x guides) or the path of such an .h5ad file; got {guides!r}")


def check_guide_feature_types(feature_types: np.ndarray, guide_type: str) -> np.ndarray:
    """The columns of the expression AnnData that are guide-capture features."""
    is_guide = np.asarray(feature_types, dtype=object) == guide_type
    if not is_guide.any():
        raise ValueError(f"guides='feature_types': adata.var['feature_types'] has no "
                         f"{guide_type!r} feature")
    return is_guide


def check_obsm_key(adata: Any, key: str) -> str:
    """An ``obsm`` key of ``adata`` holding the guide counts."""
    if key not in adata.obsm:
        raise ValueError(f"guides='obsm:{key}': adata.obsm has no key {key!r}; available: "
                         f"{sorted(adata.obsm.keys())}")
    return key


def check_guide_cells(guide_cells: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Rows of the guide matrix for each expression cell (matched by name)."""
    pos = pd.Index(guide_cells).get_indexer(cells)
    missing = np.flatnonzero(pos < 0)
    if missing.size:
        raise ValueError(f"guides: the guide matrix's cells do not match the expression "
                         f"cells: {missing.size} of {len(cells)} expression cells are not in "
                         f"it (first: {[str(c) for c in cells[missing[:_N_PREVIEW]]]})")
    return pos


def check_guide_count_values(values: np.ndarray) -> None:
    """Guide counts are non-negative integer UMI counts."""
    v = np.asarray(values)
    if v.size == 0:
        return
    if not np.issubdtype(v.dtype, np.number) or not np.all(np.isfinite(v)):
        raise ValueError("guides: guide counts must be finite non-negative integer UMI counts")
    if (v < 0).any():
        raise ValueError(f"guides: guide counts must be non-negative; found {int((v < 0).sum())}"
                         " negative value(s)")
    if not np.all(v == np.round(v)):
        raise ValueError("guides: guide counts must be integer UMI counts; found non-integer "
                         "values (pass the raw guide UMI matrix)")


def check_guide_targets_complete(missing: np.ndarray) -> None:
    """Every guide has a target."""
    if len(missing):
        raise ValueError(f"guide_targets: {len(missing)} guide(s) have no target: "
                         f"{[str(g) for g in missing[:_N_PREVIEW]]}; give a guide-target "
                         "table that lists every guide")


def check_guide_target_table(columns: list) -> tuple[str, str]:
    """The guide and target columns of a guide-target table."""
    cols = [str(c) for c in columns]
    for guide_col, target_cols in (("guide", ("target",)), ("grna_id", ("grna_target",)),
                                   ("id", ("target_gene_name", "target_gene_id"))):
        if guide_col in cols:
            for t in target_cols:
                if t in cols:
                    return guide_col, t
    raise ValueError("guide_targets: the table needs columns 'guide,target' (or 'grna_id,"
                     "grna_target', or Cell Ranger's 'id,target_gene_name'); got "
                     f"{cols}")


def check_guide_threshold(threshold: Any) -> int:
    """A UMI threshold: an integer >= 1."""
    if not _is_int(threshold) or threshold < 1:
        raise ValueError("guide_threshold must be a positive integer number of UMIs, got "
                         f"{threshold!r}")
    return int(threshold)


def check_nt_label(nt_label: Any) -> str:
    """The target label of non-targeting guides: a non-empty string."""
    if not isinstance(nt_label, str) or not nt_label:
        raise ValueError(f"nt_label must be a non-empty string, got {nt_label!r}")
    return nt_label


def check_nt_guide_tests(value: Any) -> Any:
    """``nt_guide_tests``: True, False or 'required'."""
    if not (isinstance(value, (bool, np.bool_)) or value == "required"):
        raise ValueError(f"nt_guide_tests must be True, False or 'required', got {value!r}")
    return value


def check_nt_guides(n_nt: int, nt_label: str) -> None:
    """The calibration of a guide screen needs non-targeting guides."""
    if n_nt == 0:
        raise ValueError(f"nt_label: no guide targets {nt_label!r}, and the calibration "
                         "needs non-targeting guides; set nt_label to their target label, or "
                         "switch the calibration off")


def check_pairs(pairs: Any) -> Any:
    """Pairs to test: 'all', 'cis', a DataFrame with ``target, gene`` columns or the path
    of such a CSV file."""
    if isinstance(pairs, str) and pairs in PAIR_CHOICES:
        return pairs
    if isinstance(pairs, (str, Path)):
        if not Path(pairs).is_file():
            raise ValueError(f"pairs must be 'all', 'cis' or a CSV file of target,gene pairs;"
                             f" no such file {str(pairs)!r}")
        pairs = pd.read_csv(pairs)
    if isinstance(pairs, pd.DataFrame):
        if not {"target", "gene"} <= set(map(str, pairs.columns)):
            raise ValueError("pairs: the table needs columns 'target' and 'gene'; got "
                             f"{[str(c) for c in pairs.columns]}")
        return pairs
    raise TypeError(f"pairs must be 'all', 'cis' or a table of target,gene pairs; got "
                    f"{pairs!r}")


def check_test_targets(targets: Any, known: list[str]) -> list[str]:
    """``test_targets``: a list of targets (or a file with one per line, or a CSV with a
    ``target`` column), each a target of the screen."""
    if isinstance(targets, (str, Path)) and Path(targets).is_file():
        df = pd.read_csv(targets, dtype=str)
        targets = df["target"] if "target" in df.columns else \
            [df.columns[0]] + df.iloc[:, 0].tolist()
    elif isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    names = [str(t) for t in targets]
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"test_targets: {len(unknown)} name(s) are not targets of the "
                         f"screen: {unknown[:_N_PREVIEW]}")
    return names


def check_cis_inputs(has_gene_pos: bool, has_target_pos: bool) -> None:
    """``pairs='cis'`` needs gene and target positions."""
    if not has_gene_pos or not has_target_pos:
        what = [w for w, ok in (("gene positions (var['chr'], var['tss'] or gene_positions=)",
                                 has_gene_pos),
                                ("target positions (uns['target_table'] with target, chr, "
                                 "start, end)", has_target_pos)) if not ok]
        raise ValueError(f"pairs='cis' needs {' and '.join(what)}")


# ----------------------------------------------------------------------------------
# case-control studies (causarray.pseudobulk)
# ----------------------------------------------------------------------------------
def check_donor_design(n_conditions: pd.Series, condition: pd.Series, control: str,
                       donor_key: str, condition_key: str) -> None:
    """Every donor in one condition; at least two donors in the control arm and in each
    other condition (``n_conditions``, ``condition``: per donor)."""
    both = n_conditions.index[n_conditions.to_numpy() > 1]
    if len(both):
        raise ValueError(f"donor_key: {len(both)} donor(s) of obs[{donor_key!r}] appear in "
                         f"more than one condition of obs[{condition_key!r}] "
                         f"({[str(d) for d in both[:_N_PREVIEW]]}); a donor must belong "
                         "to one arm")
    counts = condition.value_counts()
    small = {str(c): int(n) for c, n in counts.items() if n < 2}
    if control not in counts.index:
        small[control] = 0
    if small or len(counts) < 2:
        raise ValueError(f"condition_key: each arm needs at least 2 donors; donors per "
                         f"condition: {dict((str(c), int(n)) for c, n in counts.items())}")


def check_donor_covariates_constant(n_values: pd.Series, covariate: str,
                                    donor_key: str) -> None:
    """A donor-level covariate takes one value per donor."""
    varying = n_values.index[n_values.to_numpy() > 1]
    if len(varying):
        raise ValueError(f"covariates: {covariate!r} varies within {len(varying)} donor(s) "
                         f"of obs[{donor_key!r}] ({[str(d) for d in varying[:_N_PREVIEW]]}); "
                         "the donor route takes donor-level covariates only")


def check_donor_route(condition_key: Any, control_condition: Any, donor_key: Any) -> None:
    """The donor route needs the condition, its control value and the donor."""
    given = {"condition_key": condition_key, "control_condition": control_condition,
             "donor_key": donor_key}
    missing = [k for k, v in given.items() if v is None]
    if missing and len(missing) < 3:
        raise ValueError(f"the donor route needs condition_key, control_condition and "
                         f"donor_key; missing: {', '.join(missing)}")


def check_donor_factors(available: bool, cache_path: Any) -> None:
    """The donor jackknife's leverages need the donors' factors of the full fit."""
    if not available:
        where = "" if cache_path is None else (
            f"; a cache written by an older causarray ({cache_path!r}) does not hold "
            "them: delete it or pass another cache_path (--overwrite on the command line)")
        raise ValueError("the donor route's jackknife needs every donor's latent factors, "
                         "which one batch of all conditions and donors provides" + where)
