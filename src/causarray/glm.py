"""Count GLMs for all genes at once: negative-binomial and Poisson, log link.

Model, for cell i and gene j::

    y_ij ~ NB(mu_ij, size r_j)   (Var = mu + mu^2 / r_j;  Poisson when r_j = inf)
    log mu_ij = o_i + x_i' b_j + c_{j, g(i)}

where ``x_i`` are dense covariates (the intercept included), ``g(i)`` is the
perturbation group of cell i (no group for controls) and ``o_i`` an offset (log size
factor).  Group indicators are disjoint, so the group block of the Fisher information
``G'WG`` is diagonal; each Newton step is solved through the Schur complement of that
block (docs/math.md#schur-complement-for-one-hot-treatments), which costs ``O(n p d^2)``
instead of ``O(n p (d + a)^2)`` and gives the exact IRLS solution.

This module is the public front of the engine in :mod:`causarray.engine`, which holds
the two solvers:

* **saturated groups** (:mod:`causarray.engine.saturated`) -- the design is an
  intercept plus one-hot groups with a non-empty control set; the likelihood separates
  into one-parameter problems (closed-form Poisson MLE, safeguarded 1-D Newton for NB);
* **Schur IRLS** (:mod:`causarray.engine.irls`) -- any other design: Newton steps with
  step halving on the deviance, vectorised over a chunk of genes.

Both are exact maximum-likelihood solvers (agreement with statsmodels is tested); a
tiny damping ridge enters only the Hessian, so it does not move the fixed point.
Group coefficients (and 0/1 covariates) whose cells have no counts for a gene have an
MLE of minus infinity: they are pinned at ``-GROUP_COEF_BOUND`` and the rest of the
fit is the MLE without those cells.  Fitting is chunked over genes (the working
matrices are n x chunk) and converged genes leave the active set.  Elementwise passes
are fused: one pass gives the weights and scores, one the log-likelihood kernel; the
deviance constant (which depends on the counts and the size only) is computed once
per fit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .engine import irls, saturated
from .engine.design import Design, groups_from_onehot, sym_outer, sym_unpack
from .engine.families import (
    ETA_MAX,
    ETA_MIN,
    GROUP_COEF_BOUND,
    alpha_from_size,
    deviance_residuals,
    mom_alpha,
    nb_loglik,
    nb_unit_deviance,
    size_from_mom,
)
from .engine.threads import gene_chunks, run_chunks

__all__ = [
    "ETA_MAX", "ETA_MIN", "GROUP_COEF_BOUND", "GLMFit", "deviance_residuals",
    "estimate_dispersion", "estimate_nb_size", "fit_glm", "glm_deviance_residuals", "groups_from_onehot",
    "mom_size", "mom_size_at", "nb_loglik", "nb_unit_deviance", "sym_outer", "sym_unpack",
]

from ._validation import (
    check_family,
    check_matrix_2d,
    check_nb_alpha,
    check_offset,
    check_rows,
    check_shape,
)

logger = logging.getLogger("causarray")

_CHUNK_BYTES = 8 * 2**20      # working memory per gene chunk and temporary (other modules)
_FIT_CHUNK_BYTES = 4 * 2**20  # the engine's own chunks: keeps its temporaries cache-friendly

# former private names, kept for code written against them
_alpha_from_size = alpha_from_size
_Design = Design


@dataclass
class GLMFit:
    """Per-gene GLM fit on the design ``[X | A]`` (one-hot ``A`` handled as groups).

    Attributes
    ----------
    coef : (p, d + a) coefficients; columns follow ``[X | A]``.
    se : (p, d + a) Wald standard errors from the inverse Fisher information (``inf``
        for a group coefficient pinned at ``-GROUP_COEF_BOUND`` because the group has no
        counts; ``nan`` when not computed).
    size : (p,) NB size r_j used in the final fit (``inf`` for Poisson).
    converged : (p,) bool; False for genes stopped by ``max_iter``, stalled genes, genes
        without any count and genes without counts in the control cells of a
        saturated design (their maximum-likelihood estimate does not exist).
    deviance : (p,) residual deviance.
    n_iter : (p,) iterations of the final fit.
    n_covariates : d, the number of columns of ``X``.
    family : 'nb' or 'poisson'.
    """

    coef: np.ndarray
    se: np.ndarray
    size: np.ndarray
    converged: np.ndarray
    deviance: np.ndarray
    n_iter: np.ndarray
    n_covariates: int
    family: str = "nb"
    extra: dict = field(default_factory=dict)

    @property
    def coef_covariates(self) -> np.ndarray:
        return self.coef[:, : self.n_covariates]

    @property
    def coef_groups(self) -> np.ndarray:
        return self.coef[:, self.n_covariates:]

    def predict_log_mean(self, X: np.ndarray, A: np.ndarray | None = None,
                         offset: np.ndarray | None = None) -> np.ndarray:
        """Linear predictor ``o + X b + A c`` (n x p), clipped to [-30, 20]."""
        eta = np.asarray(X, float) @ self.coef_covariates.T
        if A is not None and self.coef.shape[1] > self.n_covariates:
            eta += np.asarray(A, float) @ self.coef_groups.T
        if offset is not None:
            eta += np.asarray(offset, float).reshape(-1)[:, None]
        return np.clip(eta, ETA_MIN, ETA_MAX, out=eta)

    def predict_mean(self, X: np.ndarray, A: np.ndarray | None = None,
                     offset: np.ndarray | None = None) -> np.ndarray:
        """Fitted means ``exp(predict_log_mean(X, A, offset))`` (n x p)."""
        return np.exp(self.predict_log_mean(X, A, offset))



# ----------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------
def _dense_columns(Y, cols) -> np.ndarray:
    """Columns ``cols`` of ``Y`` (dense or sparse) as a dense float64 array."""
    block = Y[:, cols]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=float)


def _gene_chunk_size(n: int, chunk_size: int | None, budget: int = _CHUNK_BYTES) -> int:
    """Genes per chunk so that one n x chunk float64 temporary uses about ``budget`` bytes."""
    if chunk_size:
        return int(chunk_size)
    return int(max(16, min(4096, budget // (8 * max(n, 1)))))


def _as_counts(Y):
    """Y as a dense ndarray or a row-sorted-ready sparse matrix (CSC for column chunks)."""
    if hasattr(Y, "to_numpy") and not sp.issparse(Y):     # pandas
        Y = Y.to_numpy()
    if sp.issparse(Y):
        return Y
    Y = np.asarray(Y)
    check_matrix_2d(Y, "Y", "genes")
    return Y


def fit_glm(Y, X: np.ndarray, A: np.ndarray | None = None, *, family: str = "nb",
            size: np.ndarray | float | None = None, offset: np.ndarray | None = None,
            max_iter: int = 100, tol: float = 1e-8, ridge: float = 1e-10,
            init: np.ndarray | None = None, chunk_size: int | None = None,
            estimate_size: bool | None = None, compute_se: bool = True,
            size_at_init: bool = False) -> GLMFit:
    """Fit a log-link NB or Poisson GLM for every gene (column of ``Y``).

    Parameters
    ----------
    Y : (n, p) counts, dense or scipy.sparse.
    X : (n, d) dense covariates, intercept included.
    A : (n, a) 0/1 treatment indicators or None.  One-hot ``A`` is handled as groups
        (exact Schur-complement IRLS, or the separable per-set solver when ``X`` is only
        the intercept); a non-one-hot ``A`` is appended to ``X``.
    family : 'nb' or 'poisson'.
    size : NB size per gene (p,) or scalar.  ``None`` with family 'nb' estimates it by
        method of moments (Poisson fit -> MoM -> NB fit -> MoM -> NB fit,
        docs/math.md#nb-dispersion).
    offset : (n,) per-cell offsets (log size factors).
    max_iter, tol : iteration cap and relative deviance tolerance of the final fit.
    ridge : relative damping added to the Hessian diagonal only (does not move the MLE).
    init : (p, d + a) starting coefficients (warm start), optional.
    chunk_size : genes per chunk (default: about 4 MiB per n x chunk temporary).
    estimate_size : False to use NB with ``size`` as given even when it is None
        (then alpha = 0, i.e. Poisson).
    compute_se : False skips the standard errors (``se`` is NaN), saving one pass.
    size_at_init : with ``size`` None and ``init`` given, the MoM size is taken at the
        means of ``init`` -- which must then be an NB fit of the same model, such as
        GCATE's coefficients for LFC's outcome GLM -- instead of after the recipe's
        preliminary Poisson and NB fits; only the final NB fit is run.  The separable
        solver (intercept + one-hot groups) always follows the recipe: its Poisson fit is
        in closed form.

    Returns
    -------
    GLMFit
        Coefficients in the columns of ``[X | A]``.  A group (or 0/v covariate) whose
        cells have no counts for a gene has an MLE of minus infinity: its coefficient is
        pinned so that it adds ``-GROUP_COEF_BOUND`` to those cells' log-means (-30 for
        an indicator), with ``se = inf``; the other coefficients are the MLE without
        those cells.  ``converged`` is False for genes stopped by
        ``max_iter`` and for genes whose MLE does not exist (no counts at all, or -- with
        intercept + groups -- none in the control cells).

    Notes
    -----
    With an intercept-only ``X`` and one-hot ``A`` the fit separates per cell set and
    ``tol`` / ``ridge`` are not used (each set's Newton iteration stops when its step
    is below 1e-6, or is predicted to be below 1e-8 by quadratic convergence).
    """
    check_family(family)
    Y = _as_counts(Y)
    X = np.asarray(X, dtype=float)
    check_matrix_2d(X, "X", "covariates")
    n, p = Y.shape
    check_rows(X, n, "X")
    groups = groups_from_onehot(A)
    n_groups = 0
    if A is not None:
        A = np.asarray(A, dtype=float)
        if A.ndim == 1:
            A = A[:, None]
        check_matrix_2d(A, "A", "treatments")
        check_rows(A, n, "A")
        if groups is None:
            X = np.hstack([X, A])
        else:
            n_groups = A.shape[1]
    d = X.shape[1]
    q = d + n_groups
    off = np.zeros(n) if offset is None else np.asarray(offset, dtype=float).ravel()
    check_offset(off, n)
    if init is not None:
        init = np.asarray(init, dtype=float)
        check_shape("init", init, (p, q))

    estimate = family == "nb" and size is None and estimate_size is not False
    if family == "poisson":
        alpha_all = np.zeros(p)
    elif not estimate:
        alpha_all = np.broadcast_to(alpha_from_size(size), (p,)).astype(float)
    else:
        alpha_all = np.zeros(p)
    check_nb_alpha(alpha_all)

    design = Design.build(X, groups, n_groups, off)
    coef, se, converged, dev, n_iter = _fit_by_chunks(
        Y, design, alpha_all, estimate, init, family=family, max_iter=max_iter, tol=tol,
        ridge=ridge, chunk_size=chunk_size, compute_se=compute_se,
        size_at_init=size_at_init)
    size_out = np.where(alpha_all > 0, 1.0 / np.where(alpha_all > 0, alpha_all, 1), np.inf)
    if family == "nb" and not converged.all():
        logger.debug("fit_glm: %d of %d genes did not converge", int((~converged).sum()), p)
    return GLMFit(coef=coef, se=se, size=size_out, converged=converged, deviance=dev,
                  n_iter=n_iter, n_covariates=d, family=family)


def _sorted_chunk(Y, design: Design, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of ``Y`` as dense float64, rows in the design's order.

    A sparse ``Y`` must already be a CSC matrix with its rows sorted.
    """
    if sp.issparse(Y):
        return Y[:, start:stop].toarray().astype(float, copy=False)
    if design.n_groups:
        return np.asarray(Y[design.order, start:stop], dtype=float)
    return np.array(Y[:, start:stop], dtype=float, order="C")


def _fit_by_chunks(Y, design: Design, alpha: np.ndarray, estimate: bool,
                   init: np.ndarray | None, *, family: str, max_iter: int, tol: float,
                   ridge: float, chunk_size: int | None, compute_se: bool,
                   size_at_init: bool = False):
    """Fit every gene, one chunk of genes at a time, with the solver the design calls for.

    For each chunk: 1. its counts, dense, rows sorted by group; 2. the fit -- the
    separable per-set solver for intercept + one-hot groups
    (:func:`causarray.engine.saturated.saturated_chunk`), the Schur IRLS otherwise
    (:func:`causarray.engine.irls.schur_chunk`); 3. coefficients and standard errors
    back in the units and column order of ``[X | A]``.  ``alpha`` (p,) is the given
    dispersion, overwritten with the estimated one when ``estimate``.

    Returns coef (p x q), se (p x q), converged, deviance, n_iter.
    """
    n, p = Y.shape
    d = design.d
    q = d + design.n_groups
    if sp.issparse(Y):
        Y = sp.csc_matrix(Y[design.order] if design.n_groups else Y)
    coef = np.zeros((p, q))
    se = np.full((p, q), np.nan)
    converged = np.zeros(p, bool)
    dev = np.zeros(p)
    n_iter = np.zeros(p, int)
    step = _gene_chunk_size(n, chunk_size, _FIT_CHUNK_BYTES)

    def fit_chunk(cols: slice) -> None:                  # writes the chunk's own columns
        Yc = _sorted_chunk(Y, design, cols.start, cols.stop)
        al = None if estimate else alpha[cols]
        ini = None if init is None else init[cols]
        if design.saturated:
            c, s_, al, conv, dv, it = saturated.saturated_chunk(
                design, Yc, al, ini, family=family, max_iter=max_iter, compute_se=compute_se)
            coef[cols], se[cols] = c, s_
        else:
            B, C, al, conv, dv, it, var_b, var_c = irls.schur_chunk(
                design, Yc, al, ini, max_iter=max_iter, tol=tol, ridge=ridge,
                compute_se=compute_se, size_at_init=size_at_init)
            coef[cols, :d] = B.T / design.scales
            coef[cols, d:] = C.T
            if compute_se:
                se[cols, :d] = np.sqrt(np.maximum(var_b, 0)) / design.scales
                se[cols, d:] = np.sqrt(np.maximum(var_c.T, 0))
        alpha[cols] = al
        converged[cols], dev[cols], n_iter[cols] = conv, dv, it

    run_chunks(fit_chunk, gene_chunks(p, step))
    return coef, se, converged, dev, n_iter


def _iter_fitted_means(Y, coef: np.ndarray, n_covariates: int, X: np.ndarray,
                       A: np.ndarray | None, offset: np.ndarray, chunk_size: int | None = None):
    """Yield (cols, y, mu) chunks of observed counts and fitted means of the coefficients
    ``coef`` (columns ``[X | A]``, the first ``n_covariates`` for ``X``)."""
    n, p = Y.shape
    step = _gene_chunk_size(n, chunk_size)
    X = np.asarray(X, float)
    if A is not None:
        A = np.asarray(A, float)
        if A.ndim == 1:
            A = A[:, None]
        if coef.shape[1] == n_covariates + A.shape[1]:
            pass
        elif n_covariates == X.shape[1] + A.shape[1]:   # A was appended to X
            X, A = np.hstack([X, A]), None
    for start in range(0, p, step):
        cols = np.arange(start, min(p, start + step))
        eta = X @ coef[cols, :n_covariates].T + offset[:, None]
        if A is not None and coef.shape[1] > n_covariates:
            eta += A @ coef[cols, n_covariates:].T
        np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
        yield cols, _dense_columns(Y, cols), np.exp(eta, out=eta)


def mom_size(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
             offset: np.ndarray) -> np.ndarray:
    """Method-of-moments NB size per gene from fitted means (docs/math.md#nb-dispersion).

    alpha_j = sum_i [(y - mu)^2 - y] / max(mu^2, 1e-10) / (n - q), clipped to [1e-8, 100];
    size = 1/alpha (1 for genes without counts).
    """
    return mom_size_at(Y, fit.coef, fit.n_covariates, X, A, offset)


def mom_size_at(Y, coef: np.ndarray, n_covariates: int, X: np.ndarray,
                A: np.ndarray | None, offset: np.ndarray | None) -> np.ndarray:
    """:func:`mom_size` at given coefficients ``coef`` (columns ``[X | A]``, the first
    ``n_covariates`` for ``X``), e.g. of a model fitted outside :func:`fit_glm`."""
    n, p = Y.shape
    q = coef.shape[1]
    alpha = np.empty(p)
    nonzero = np.zeros(p, bool)
    off = np.zeros(n) if offset is None else np.asarray(offset, float).ravel()
    for cols, y, mu in _iter_fitted_means(Y, coef, n_covariates, X, A, off):
        alpha[cols] = mom_alpha(y, mu, n - q)
        nonzero[cols] = (y > 0).any(axis=0)
    return size_from_mom(alpha, ~nonzero)


def estimate_nb_size(Y, X: np.ndarray, A: np.ndarray | None = None,
                     offset: np.ndarray | None = None, max_iter: int = 50) -> np.ndarray:
    """NB *size* theta_j per gene by the MoM recipe on design ``[X | A]``
    (docs/math.md#nb-dispersion).

    The model is ``y_ij ~ NB(mu_ij, theta_j)`` with ``Var(y_ij) = mu_ij + mu_ij^2 /
    theta_j``: theta is the *size* (``size`` of R's ``rnbinom``, ``n`` of
    :func:`scipy.stats.nbinom`), the inverse of the *dispersion* ``alpha_j = 1/theta_j``
    that DESeq2 and edgeR report.  A large theta means nearly Poisson.  Every
    ``disp_glm`` argument of this package takes this size; to use DESeq2 dispersions
    pass ``1 / dispersions``.

    Parameters
    ----------
    Y : (n, p) counts, dense or scipy.sparse.
    X : (n, d) covariates, intercept included.
    A : (n, a) treatment indicators or None.
    offset : (n,) log size factors or None.
    max_iter : Newton iterations of each GLM fit of the recipe.

    Returns
    -------
    numpy.ndarray
        (p,) sizes theta_j in [0.01, 1e8] (1 for a gene without counts).
    """
    off = np.zeros(Y.shape[0]) if offset is None else np.asarray(offset, float)
    fit = fit_glm(Y, X, A, family="nb", size=None, offset=off, max_iter=max_iter,
                  compute_se=False)
    return fit.size


def estimate_dispersion(Y, X: np.ndarray, A: np.ndarray | None = None,
                        offset: np.ndarray | None = None, max_iter: int = 50) -> np.ndarray:
    """The NB *size* theta_j per gene -- despite its name, not the dispersion.

    Kept under causarray 0.1.1's name for its callers; identical to
    :func:`estimate_nb_size`, which new code should use.  The result is
    ``theta_j = 1 / alpha_j`` with ``Var(y) = mu + mu^2 / theta_j``; a DESeq2 or edgeR
    dispersion is ``1 / estimate_dispersion(...)``.
    """
    return estimate_nb_size(Y, X, A, offset=offset, max_iter=max_iter)


def glm_deviance_residuals(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None = None,
                           offset: np.ndarray | None = None) -> np.ndarray:
    """n x p deviance residuals of a fitted GLM."""
    n, p = Y.shape
    off = np.zeros(n) if offset is None else np.asarray(offset, float).ravel()
    out = np.empty((n, p))
    alpha = alpha_from_size(fit.size)
    for cols, y, mu in _iter_fitted_means(Y, fit.coef, fit.n_covariates, X, A, off):
        out[:, cols] = deviance_residuals(y, mu, alpha[cols][None, :])
    return out
