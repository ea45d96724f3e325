"""GLM entry points with causarray 0.1.1's signatures and return shapes.

0.1.1's ``fit_glm`` / ``fit_glm_fast`` return the tuple
``(B, Yhat, disp_glm, offsets, resid_deviance)``; this package's engine
(:func:`causarray.glm.fit_glm`, used everywhere inside the package) returns a
:class:`~causarray.glm.GLMFit`.  The functions here are thin adapters over that
engine, so ``causarray.fit_glm`` behaves like the original's while internal code keeps
the object-returning engine.  Differences from 0.1.1, all deliberate:

* one engine: exact maximum-likelihood IRLS (agreement with statsmodels is tested), so
  ``fit_glm`` and ``fit_glm_fast`` give the same fit;
* no coefficient bounds and no regularised fallback (``shrinkage``, ``alpha`` are
  accepted and ignored): a gene whose MLE does not exist gets the engine's pinned
  coefficients instead of the original's all-zero row and swapped fallback means
  (docs/math.md#outcome-model);
* ``impute`` given as an array is used as the prediction covariates (the original
  overwrote it with the training covariates); ``offset_test`` is their offset.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._validation import (
    check_both_groups,
    check_choice,
    check_covariate_columns,
    check_gene_indices,
    check_impute_design,
    check_impute_needs_A,
    check_label_occurs,
    check_matrix_2d,
    check_obs_column,
    check_offset_rows,
    check_offset_test,
    check_positive_int,
)
from .engine import ETA_MAX, ETA_MIN, alpha_from_size, deviance_residuals
from .glm import fit_glm as _engine
from .preprocessing import comp_size_factor

logger = logging.getLogger("causarray")


def _offsets(Y, offset) -> np.ndarray | None:
    if offset is None or offset is False:
        return None
    if offset is True:
        return np.log(comp_size_factor(Y))
    off = np.asarray(offset, dtype=float).ravel()
    check_offset_rows(off, Y.shape[0])
    return off


def _gaussian(Y: np.ndarray, Xd: np.ndarray, off: np.ndarray | None):
    """Least squares per gene (identity link; an offset is subtracted from Y)."""
    Z = Y - (0.0 if off is None else off[:, None])
    coef, *_ = np.linalg.lstsq(Xd, Z, rcond=None)
    return coef.T


def _predict(B: np.ndarray, X: np.ndarray, off, family: str) -> np.ndarray:
    eta = X @ B.T
    if off is not None:
        eta = eta + off[:, None]
    if family == "gaussian":
        return eta
    return np.exp(np.clip(eta, ETA_MIN, ETA_MAX))


def fit_glm(Y, X, A=None, family: str = "gaussian", disp_family: str = "poisson",
            disp_glm=None, impute=False, offset=None, offset_test=None,
            shrinkage: bool = False, alpha: float = 1e-4, maxiter: int = 1000,
            thres_disp: float = 100.0, n_jobs: int = -3, random_state: int = 0,
            verbose: bool = False, mem_limit_gb=None):
    """Fit a GLM to every column of ``Y`` on ``[X | A]`` (0.1.1 interface).

    Model: ``g(E y_ij) = o_i + x_i' b_j + a_i' c_j`` with g = identity ('gaussian'), log
    ('poisson') or log with NB variance ``mu + mu^2 / r_j`` ('nb'); genes with
    ``r_j > thres_disp`` are fitted as Poisson.  Exact maximum likelihood.

    Parameters
    ----------
    Y : (n, p) outcomes (counts for 'poisson' / 'nb'; dense or sparse).
    X : (n, d) covariates including the intercept.
    A : (n,) or (n, a) treatments or None.
    family : 'gaussian' (default, as in 0.1.1), 'poisson' or 'nb'.
    disp_family : accepted (the NB size is estimated by method of moments).
    disp_glm : (p,) NB *sizes* r_j (``Var(y) = mu + mu^2 / r_j``), i.e. 1/dispersion --
        pass ``1 / dispersions`` from DESeq2 or edgeR; estimated when None and family is
        'nb'.
    impute : False -> ``Yhat`` is the (n, p) fitted mean; True or an (m, d) covariate
        array -> ``Yhat = (Yhat_0, Yhat_1)``, each (m, p, a): predictions with every
        treatment off, and with treatment k on (at the training covariates, or at the
        array given).
    offset : None/False, True (log median-of-ratios size factors) or (n,) offsets.
    offset_test : (m,) offsets of the prediction rows (default: ``offset``).
    maxiter : iteration cap of the fit.
    shrinkage, alpha, n_jobs, random_state, verbose, mem_limit_gb : accepted for
        compatibility (no effect: there is no regularised fallback, and the engine is
        vectorised over genes).

    Returns
    -------
    B : (p, d + a) coefficients, columns ``[X | A]``.
    Yhat : (n, p) fitted means, or the pair ``(Yhat_0, Yhat_1)`` described above.
    disp_glm : (p,) NB sizes used (``None`` for 'gaussian' / 'poisson' unless given).
    offsets : (n,) offsets or None.
    resid_deviance : (n, p) signed deviance residuals (``y - mu`` for 'gaussian').
    """
    check_choice("family", family, ("gaussian", "poisson", "nb"))
    X = np.asarray(X, dtype=float)
    check_matrix_2d(X, "X", "covariates")
    if A is not None:
        A = np.asarray(A, dtype=float)
        A = A[:, None] if A.ndim == 1 else A
    else:
        check_impute_needs_A(impute)
    if shrinkage:
        logger.info("fit_glm: shrinkage is accepted for compatibility; the exact MLE is used")
    off = _offsets(Y, offset)
    Xd = X if A is None else np.hstack([X, A])
    d, a = X.shape[1], 0 if A is None else A.shape[1]

    if family == "gaussian":
        Yd = Y.toarray() if sp.issparse(Y) else np.asarray(Y, dtype=float)
        B = _gaussian(Yd, Xd, off)
        size = None if disp_glm is None else np.asarray(disp_glm, float)
    else:
        if family == "nb" and disp_glm is not None:
            size = np.asarray(disp_glm, dtype=float).ravel()
            size = np.where(size > thres_disp, np.inf, size)
        else:
            size = None
        fit = _engine(Y, X, A, family=family, size=size, offset=off, max_iter=int(maxiter),
                      compute_se=False)
        B = fit.coef
        if family == "nb":
            size = np.asarray(fit.size, dtype=float)
            if disp_glm is None and np.any(size > thres_disp):
                # as in 0.1.1, near-Poisson genes (r_j > thres_disp) are fitted as Poisson
                size = np.where(size > thres_disp, np.inf, size)
                B = _engine(Y, X, A, family="nb", size=size, offset=off,
                            max_iter=int(maxiter), compute_se=False).coef
        else:
            size = None if disp_glm is None else np.asarray(disp_glm, float)

    Yd = Y.toarray() if sp.issparse(Y) else np.asarray(Y, dtype=float)
    mu = _predict(B, Xd, off, family)
    if family == "gaussian":
        resid = Yd - mu
    else:
        al = np.zeros(B.shape[0]) if family == "poisson" else alpha_from_size(size)
        resid = deviance_residuals(Yd, mu, np.broadcast_to(al, (B.shape[0],))[None, :])

    if impute is False:
        Yhat = mu
    else:
        X_test = X if impute is True else np.asarray(impute, dtype=float)
        check_impute_design(X_test, impute, d)
        off_t = off if offset_test is None else np.asarray(offset_test, float).ravel()
        check_offset_test(off_t, offset_test, X_test.shape[0])
        m = X_test.shape[0]
        base = np.hstack([X_test, np.zeros((m, a))])
        y0 = _predict(B, base, off_t, family)
        dtype = np.float32 if (mem_limit_gb is not None
                               and 2 * m * B.shape[0] * a * 8 / 1e9 > mem_limit_gb) \
            else np.float64
        Y0 = np.repeat(y0[:, :, None], a, axis=2).astype(dtype)
        Y1 = np.empty_like(Y0)
        for k in range(a):
            Xk = base.copy()
            Xk[:, d + k] = 1.0
            Y1[:, :, k] = _predict(B, Xk, off_t, family)
        Yhat = (Y0, Y1)
    return B, Yhat, size, off, resid


def fit_glm_fast(Y, X, A=None, family: str = "gaussian", disp_family: str = "poisson",
                 disp_glm=None, impute=False, offset=None, offset_test=None,
                 shrinkage: bool = False, alpha: float = 1e-4, maxiter: int = 1000,
                 thres_disp: float = 100.0, n_jobs: int = -3, random_state: int = 0,
                 verbose: bool = False, mem_limit_gb=None):
    """0.1.1's batched-engine GLM: the same fit and return values as :func:`fit_glm`.

    In 0.1.1 ``fit_glm`` was a per-gene statsmodels loop and ``fit_glm_fast`` a batched
    IRLS engine computing the same maximum-likelihood fit; here both are this
    package's batched exact engine.
    """
    return fit_glm(Y, X, A, family=family, disp_family=disp_family, disp_glm=disp_glm,
                   impute=impute, offset=offset, offset_test=offset_test,
                   shrinkage=shrinkage, alpha=alpha, maxiter=maxiter, thres_disp=thres_disp,
                   n_jobs=n_jobs, random_state=random_state, verbose=verbose,
                   mem_limit_gb=mem_limit_gb)


def _read_rows(X, start: int, stop: int, genes: np.ndarray | None) -> sp.csr_matrix:
    block = X[start:stop]
    block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
    if genes is not None:
        block = block[:, genes]
    return block.astype(np.float64)


def fit_glm_ondisk(path: str, perturbation_col: str = "perturbation",
                   control_label: Any = "control", target_label: Any = None,
                   gene_indices=None, covariate_columns=None, chunk_size: int = 2048,
                   max_iter: int = 25, verbose: bool = False):
    """NB GLM of one treatment-vs-control indicator for an ``.h5ad`` file on disk.

    The counts are read in row blocks of ``chunk_size`` cells from the file opened in
    anndata's backed mode (never as one dense matrix) and kept sparse; the design is
    ``[1 | obs[covariate_columns] | A]`` with ``A = 1`` for cells whose
    ``obs[perturbation_col]`` is not ``control_label`` (only ``control_label`` and
    ``target_label`` cells when a target is named).  Offsets are the log median-of-ratios
    size factors of the selected genes; the NB size is estimated by method of moments.
    Cells without counts in the selected genes are dropped with a warning (their size
    factor would be 0).

    Returns
    -------
    B : (p, 2 + n_covariates) coefficients ``[1 | covariates | A]``.
    Yhat : (n_kept, p) fitted means.
    disp : (p,) NB sizes.
    offsets : (n_kept,) log size factors.
    resid_deviance : (n_kept, p) deviance residuals.
    """
    import anndata as ad

    check_positive_int("chunk_size", chunk_size)
    adata = ad.read_h5ad(path, backed="r")
    try:
        obs = adata.obs
        check_obs_column("perturbation_col", perturbation_col, obs)
        labels = obs[perturbation_col].astype(str).to_numpy()
        ctrl = str(control_label)
        check_label_occurs("control_label", control_label, labels, perturbation_col)
        if target_label is not None:
            check_label_occurs("target_label", target_label, labels, perturbation_col)
            keep = np.isin(labels, [ctrl, str(target_label)])
        else:
            keep = np.ones(labels.size, bool)
        n_vars = adata.n_vars
        genes = None if gene_indices is None else np.asarray(gene_indices, dtype=np.int64)
        check_gene_indices(genes, n_vars)
        covs = list(covariate_columns or [])
        check_covariate_columns(covs, obs)
        blocks = []
        for start in range(0, adata.n_obs, int(chunk_size)):
            stop = min(adata.n_obs, start + int(chunk_size))
            rows = np.flatnonzero(keep[start:stop])
            if rows.size:
                blocks.append(_read_rows(adata.X, start, stop, genes)[rows])
            if verbose:
                logger.info("fit_glm_ondisk: read cells %d-%d", start, stop)
        Y = sp.vstack(blocks, format="csr")
        cells = np.flatnonzero(keep)
        Z = np.column_stack([obs[c].to_numpy()[cells].astype(float) for c in covs]) \
            if covs else np.empty((cells.size, 0))
    finally:
        adata.file.close()
    empty = np.asarray(Y.sum(axis=1)).ravel() == 0
    if empty.any():
        warnings.warn(f"fit_glm_ondisk: dropping {int(empty.sum())} cell(s) without counts in "
                      "the selected genes", RuntimeWarning, stacklevel=2)
        Y, Z, cells = Y[~empty], Z[~empty], cells[~empty]
    A = (labels[cells] != ctrl).astype(float)[:, None]
    check_both_groups(A)
    X = np.hstack([np.ones((cells.size, 1)), Z])
    offsets = np.log(comp_size_factor(Y))
    B, Yhat, disp, _, resid = fit_glm(Y, X, A, family="nb", offset=offsets,
                                      maxiter=max_iter)
    return B, Yhat, disp, offsets, resid


__all__ = ["fit_glm", "fit_glm_fast", "fit_glm_ondisk"]
