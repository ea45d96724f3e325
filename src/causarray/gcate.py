"""GCATE: latent confounder estimation with a NB / Poisson GLM factor model.

Model (docs/math.md#gcate-model), for cell i and gene j::

    log E[y_ij] = o_i + x_i' b_j + a_i' beta_j + u_i' gamma_j,    y_ij ~ NB(size r_j)

with ``o_i`` the log size factor, observed covariates ``X`` (intercept included),
treatment indicators ``A`` and ``r`` latent confounders ``U``.

Stage 1 fits (U, B_X, B_A, Gamma) under the constraint ``U ⟂ span[X | A]`` by
alternating Fisher scoring: a gene step (one GLM per gene on ``[X | U | A]``,
exact one-hot IRLS from :mod:`causarray.glm`) and a cell step (one Newton step per
cell for ``u_i`` with the loadings fixed), after which ``U`` is projected back onto
the orthogonal complement of ``[X | A]`` and the projection is absorbed in the
observed-design coefficients, so the fit is unchanged.

Stage 2 recovers the part of the confounding that is correlated with treatment.
Under the constraint, the stage-1 treatment coefficients are
``beta_hat_k = beta_k + Gamma alpha_k``: direct effects plus the loadings times
the confounders' shift ``alpha_k`` in perturbation k.  Direct effects are sparse,
so ``alpha_k`` is the robust (Huber) regression of ``beta_hat_k`` on ``Gamma``
weighted by the standard errors.  Huber regression is the mean-shift outlier
model ``min ||beta_hat - Gamma alpha - e||^2 + lambda ||e||_1``: the L1-penalised
direct effects of the GCATE second stage.  The returned stage-2 confounders
``U = U_1 + A alpha`` carry that treatment-correlated component, which the doubly
robust step must see (docs/math.md#treatment-correlated-confounding).  See ``docs/gcate.md``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._validation import (
    GCATE_COMPAT_KEYWORDS,
    check_gene_folds,
    _count_dense_issues,
    _row_blocks,
    check_assignment,
    check_control,
    check_count_flags,
    check_design_rank,
    check_family,
    check_finite,
    check_genes_expressed,
    check_keywords,
    check_matrix_2d,
    check_open_unit,
    check_r,
    check_r_estimable,
    check_r_grid,
    check_rows,
    check_shape,
    check_treatments_have_cells,
    parameter_names,
)
from .engine import Design, alpha_from_size, groups_from_onehot, sym_unpack
from .engine.threads import gene_chunks, run_chunks
from .factor_model import (
    deviance_residual_svd,
    fisher_pass,
    group_treatment_coefs,
    loglik_constants,
)
from .glm import GLMFit, fit_glm
from .preprocessing import size_factors_from_offset

logger = logging.getLogger("causarray")

DEFAULT_ES = dict(max_iters=50, rel_tol=2e-4, patience=5, warmup=0, tolerance=0.0)
#: over-relaxation factor of the cell step (1 = plain alternation; see docs/gcate.md)
CELL_STEP_RELAXATION = 1.4


# ----------------------------------------------------------------------------------
# input handling
# ----------------------------------------------------------------------------------
def _as_matrix(M, name: str):
    if isinstance(M, (pd.DataFrame, pd.Series)):
        M = M.to_numpy()
    if sp.issparse(M):
        return M.tocsc() if name == "Y" else M.toarray()
    M = np.asarray(M)
    if name != "Y" or M.dtype.kind not in "iuf":     # integer counts stay integer
        M = M.astype(float, copy=False)
    return M


def _scan_counts(Y) -> tuple[bool, bool, bool, np.ndarray]:
    """(all finite, any negative, any non-integer, non-zeros per gene), block by block.

    The value checks are :func:`causarray._validation._count_dense_issues` (row blocks of
    a dense matrix, or the stored values of a sparse one as a column).
    """
    values = Y.data.reshape(-1, 1) if sp.issparse(Y) else Y
    n_bad, n_neg, _, n_frac = _count_dense_issues(values)
    if sp.issparse(Y):
        nnz = np.asarray((Y != 0).sum(axis=0)).ravel()
    else:
        nnz = np.zeros(Y.shape[1], np.int64)
        for rows in _row_blocks(*Y.shape):
            nnz += np.count_nonzero(Y[rows], axis=0)
    return n_bad == 0, n_neg > 0, n_frac > 0, nnz


def _check_inputs(Y, X, A, r: int, family: str):
    """Validate and convert (Y, X, A); returns Y (dense or CSC), X, A.

    Y is scanned in row blocks (no temporary of its size); integer counts keep their dtype.
    """
    check_family(family)
    Y = _as_matrix(Y, "Y")
    X = _as_matrix(X, "X")
    A = _as_matrix(A, "A")
    check_matrix_2d(Y, "Y", "genes")
    check_matrix_2d(X, "X", "covariates")
    if A.ndim == 1:
        A = A[:, None]
    n, p = Y.shape
    check_rows(X, n, "X")
    check_rows(A, n, "A")
    finite, negative, fractional, nnz_gene = _scan_counts(Y)
    check_count_flags(finite, negative)
    check_finite(A, "A")
    if fractional:
        import warnings
        warnings.warn("Y contains non-integer values; rounding to the nearest integer",
                      UserWarning, stacklevel=3)
        if sp.issparse(Y):
            Y = Y.copy()
            Y.data = np.round(Y.data)
        else:
            Y = np.round(Y)
    check_genes_expressed(nnz_gene)
    check_treatments_have_cells(A)
    check_r(r)
    Z = np.hstack([X, A])
    check_r_estimable(r, n, p, Z.shape[1])
    check_design_rank(Z)
    return Y, X, A


def _initial_glm(Y, X, A, log_s, family: str, disp_glm) -> GLMFit:
    """GLM on [X | A] with the NB size per gene: given, infinite (Poisson) or estimated.

    With ``disp_glm=None`` and family 'nb' the size is the method-of-moments estimate on
    all cells and design [X | A] (docs/math.md#which-cells-estimate-the-dispersion; the
    same fit as :func:`causarray.glm.estimate_dispersion`), whose final NB fit doubles as
    the starting point of GCATE.
    """
    p = Y.shape[1]
    if family == "poisson":
        size = np.full(p, np.inf)
    elif disp_glm is not None:
        size = np.broadcast_to(np.asarray(disp_glm, float), (p,)).copy()
    else:
        return fit_glm(Y, X, A, family="nb", size=None, offset=log_s, max_iter=50,
                       compute_se=False)
    return fit_glm(Y, X, A, family="nb", size=size, offset=log_s, max_iter=50,
                   compute_se=False)


def _start_coef(fit0: GLMFit, d: int, r: int) -> np.ndarray:
    """Coefficients [X | U | A] of the GLM on [X | A] with zero loadings."""
    return np.hstack([fit0.coef[:, :d], np.zeros((fit0.coef.shape[0], r)), fit0.coef[:, d:]])


# ----------------------------------------------------------------------------------
# linear algebra helpers
# ----------------------------------------------------------------------------------
def _orth_basis(Z: np.ndarray) -> np.ndarray:
    Q, _ = np.linalg.qr(Z)
    return Q


def _project_out(U: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """(I - QQ') U without forming the n x n projector."""
    return U - Q @ (Q.T @ U)


def _rebalance(U: np.ndarray, Gamma: np.ndarray):
    """Rotate (U, Gamma) keeping U Gamma' fixed, with U'U = n I (unit-variance factors)."""
    n = U.shape[0]
    Qu, Ru = np.linalg.qr(U)
    Qg, Rg = np.linalg.qr(Gamma)
    P, S, Vt = np.linalg.svd(Ru @ Rg.T)
    U_new = np.sqrt(n) * Qu @ P
    G_new = Qg @ Vt.T * (S / np.sqrt(n))
    return U_new, G_new


def stage1_standard_errors(Y, X: np.ndarray, A: np.ndarray, log_s: np.ndarray,
                           U: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Standard errors of the stage-1 coefficients ``coef`` ([X | U | A]) at dispersions
    re-estimated with the factors.

    The NB sizes GCATE fits with come from a GLM without the factors (on [X | A], or
    given: ``gcate_lfc_batch`` estimates them once on the control pool), whose
    residuals still hold the confounders' variation, so they overstate each gene's
    dispersion and its Fisher variances (twice the realised sampling variance of the
    loadings on the simulated donor studies of ``benchmarks/donor_variance.py``).
    Here the method-of-moments dispersion (:func:`causarray.glm.mom_size_at`,
    ``n - (d + r + a)`` degrees of freedom) is taken at the stage-1 means, and one
    Fisher pass at ``coef`` (its updated coefficients are discarded) gives the
    inverse-information standard errors.
    """
    from .glm import mom_size_at

    alpha = alpha_from_size(mom_size_at(Y, coef, coef.shape[1], np.hstack([X, U, A]), None,
                                        log_s))
    _, se, _ = _gene_passes(Y, X, A, groups_from_onehot(A), log_s, alpha, U, coef.copy(), 1,
                            compute_se=True)
    return se


def loading_noise(Gamma: np.ndarray, Gamma_new: np.ndarray, se: np.ndarray) -> np.ndarray:
    """The sampling covariances (p x r x r) of the rebalanced loadings ``Gamma_new``.

    ``se`` are the standard errors of ``Gamma``'s entries from each gene's Fisher
    information (U fixed; their covariances are dropped: U's columns are orthogonal).
    The rebalancing is linear, ``Gamma_new = Gamma M``, so each row's covariance is
    ``M' diag(se_j^2) M``.
    """
    M = np.linalg.lstsq(Gamma, Gamma_new, rcond=None)[0]
    var = np.where(np.isfinite(se), se, 0.0) ** 2
    return np.einsum("ja,ab,ac->jbc", var, M, M)


# ----------------------------------------------------------------------------------
# the factor model passes
# ----------------------------------------------------------------------------------
class _EarlyStopping:
    """Relative-improvement early stopping (docs/math.md#early-stopping)."""

    def __init__(self, max_iters=50, rel_tol=2e-4, patience=5, warmup=0, tolerance=0.0):
        self.max_iters, self.rel_tol, self.patience = int(max_iters), rel_tol, patience
        self.warmup, self.tolerance = warmup, tolerance
        self.best, self.best_epoch = np.inf, -1

    def __call__(self, epoch: int, value: float) -> bool:
        thr = 0.0 if not np.isfinite(self.best) else self.tolerance + self.rel_tol * abs(self.best)
        if value < self.best - thr:
            self.best, self.best_epoch = value, epoch
        if epoch < self.warmup:
            return False
        return (epoch - self.best_epoch) > self.patience


def _initial_factors(Y, X, A, log_s, fit0, r, random_state):
    """Top-r left singular vectors of the deviance residuals of the GLM on [X | A]."""
    u, _ = deviance_residual_svd(Y, fit0, X, A, log_s, r, random_state=random_state)
    return u


def _factor_design(X: np.ndarray, U: np.ndarray, A: np.ndarray, groups, log_s) -> Design:
    """GLM design of the gene step: dense ``[X | U]`` (plus ``A`` when it is not one-hot)."""
    if groups is None:
        return Design.build(np.hstack([X, U, A]), None, 0, log_s)
    return Design.build(np.hstack([X, U]), groups, A.shape[1], log_s)


def _to_design(coef: np.ndarray, design: Design):
    """(B, C) in the design's scaled units from ``coef`` with columns [X | U | A]."""
    q = design.d
    return (coef[:, :q].T * design.scales[:, None]).copy(), coef[:, q:].T.copy()


def _from_design(B: np.ndarray, C: np.ndarray, design: Design) -> np.ndarray:
    """``coef`` with columns [X | U | A] from the design's scaled (B, C)."""
    return np.hstack([(B / design.scales[:, None]).T, C.T])


def _gene_passes(Y, X, A, groups, log_s, alpha, U, coef, n_pass: int, compute_se: bool = False):
    """``n_pass`` gene-only Fisher-scoring passes (U fixed); returns (coef, se, kernel)."""
    design = _factor_design(X, U, A, groups, log_s)
    B, C = _to_design(coef, design)
    res = None
    for i in range(n_pass):
        res = fisher_pass(Y, design, B, C, alpha, compute_se=compute_se and i == n_pass - 1)
    coef = _from_design(B, C, design)
    se = None
    if res is not None and res.var_b is not None:
        se = np.hstack([np.sqrt(np.maximum(res.var_b, 0)) / design.scales,
                        np.sqrt(np.maximum(res.var_c.T, 0))])
    return coef, se, None if res is None else res.kernel


def _cell_newton_steps(H_packed: np.ndarray, g: np.ndarray, order: np.ndarray, U: np.ndarray,
                       prior_precision: float, block: int = 1024) -> np.ndarray:
    """Newton step of every cell's factors under a N(0, I / prior_precision) prior.

    ``H_packed`` (float32, packed upper triangles) and ``g`` hold the likelihood's Fisher
    information and score per cell in the design's sorted row order; ``U`` is in the
    original order.  Solved ``block`` cells at a time (the unpacked n x r x r stack would
    be the largest array of an epoch).
    """
    n, r = U.shape
    inv = np.empty(n, dtype=np.int64)
    inv[order] = np.arange(n)
    idx = np.arange(r)
    du = np.empty((n, r))
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        srt = inv[rows]
        Hm = sym_unpack(H_packed[srt].astype(np.float64), r)
        Hm[:, idx, idx] += prior_precision
        rhs = g[srt] - prior_precision * U[rows]
        du[rows] = np.linalg.solve(Hm, rhs[..., None])[..., 0]
    return du


def _alternate(Y, X, A, log_s, size, U, coef, Q, es: dict, verbose: bool, desc: str,
               prior_precision: float = 1.0, const: float | None = None,
               warmup_passes: int = 2, relaxation: float = CELL_STEP_RELAXATION):
    """Stage-1 alternating Fisher scoring with U kept orthogonal to span(Q).

    Each epoch is one pass over the counts (:func:`causarray.factor_model.fisher_pass`):
    one safeguarded Fisher-scoring step of every gene's GLM on [X | U | A] (exact
    one-hot elimination), fused with the accumulation of every cell's Fisher system for
    u_i at the new loadings; then one damped Newton step per cell (standard-normal prior
    on u_i), over-relaxed by ``relaxation`` (successive over-relaxation of the block
    coordinate scheme: the fixed point is unchanged, fewer epochs reach it).  U is
    projected back onto the complement of [X | A] and the projection absorbed into the
    observed-design coefficients, which leaves the fit unchanged.
    Before the first epoch, ``warmup_passes`` gene-only passes fit the loadings of the
    initial U.  Returns ``(U, coef, se, hist, last_epoch)``; ``coef`` has columns
    [X | U | A] after a final gene pass for the last U, ``se`` their standard errors.
    """
    from tqdm.auto import tqdm

    n, p = Y.shape
    d, r = X.shape[1], U.shape[1]
    alpha = alpha_from_size(size) * np.ones(p)
    groups = groups_from_onehot(A)
    if const is None:
        const = float(loglik_constants(Y, size).sum())
    stopper = _EarlyStopping(**es)
    coef, _, _ = _gene_passes(Y, X, A, groups, log_s, alpha, U, coef, warmup_passes)
    hist, it = [], -1
    bar = tqdm(range(stopper.max_iters), desc=desc, disable=not verbose, leave=False)
    for it in bar:
        design = _factor_design(X, U, A, groups, log_s)
        B, C = _to_design(coef, design)
        res = fisher_pass(Y, design, B, C, alpha, loadings=slice(d, d + r))
        coef = _from_design(B, C, design)
        f = -(const + res.kernel.sum()) / (n * p)
        hist.append(f)
        bar.set_postfix(nll=f"{f:.5f}")
        if not np.isfinite(f):
            raise FloatingPointError("GCATE objective became non-finite; try a smaller r")
        # cell step with a standard-normal prior on u_i (factors kept at unit variance):
        # cells with little information (few counts) stay near 0 instead of drifting
        du = _cell_newton_steps(res.H, res.g, design.order, U, prior_precision)
        del res
        big = np.abs(du).max(axis=1, keepdims=True)
        U = U + relaxation * du * np.minimum(1.0, 1.0 / np.maximum(big, 1e-300))
        M = Q.T @ U
        U = U - Q @ M
        coef = _absorb_projection(coef, X, A, Q, M, d, r)
        scale = np.maximum(U.std(axis=0), 1e-12)
        U = U / scale
        coef[:, d:d + r] *= scale
        if stopper(it, f):
            break
    coef, se, kernel = _gene_passes(Y, X, A, groups, log_s, alpha, U, coef, 1, compute_se=True)
    hist.append(-(const + kernel.sum()) / (n * p))
    return U, coef, se, hist, it


def _absorb_projection(coef, X, A, Q, M, d, r):
    """Coefficients on [X | A] change by Gamma T' where Q M = [X | A] T."""
    Z = np.hstack([X, A])
    T = np.linalg.solve(Q.T @ Z, M)                          # Z = Q (Q'Z): T = (Q'Z)^-1 M
    Gm = coef[:, d:d + r]
    delta = Gm @ T.T                                          # p x (d + a)
    out = coef.copy()
    out[:, :d] += delta[:, :d]
    out[:, d + r:] += delta[:, d:]
    return out


def affected_genes(beta: np.ndarray, se: np.ndarray, z: float = 3.0) -> np.ndarray:
    """Genes each perturbation visibly moves: ``|beta_jk / se_jk| > z`` (p x a, bool).

    The stage-1 Wald statistics of the treatment coefficients; genes with an undefined
    statistic (no counts in an arm) count as affected.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(beta / se)
    return ~(t <= z)


def pretreatment_factors(Y, X: np.ndarray, A: np.ndarray, log_s: np.ndarray,
                         size: np.ndarray, B_X: np.ndarray, B_A: np.ndarray,
                         Gamma: np.ndarray, U: np.ndarray, keep: np.ndarray,
                         n_steps: int = 4) -> np.ndarray:
    """Re-estimate every cell's factors from the genes no perturbation moves.

    The factors stand for pre-treatment cell states, but stage 1 reads a perturbed
    cell's ``u_i`` off all genes, including those its perturbation changes.  When the
    response varies from cell to cell (partial knockdown, escapers), ``u_i`` then
    measures the response itself: on the Schraivogel panel the HS2 cells' factor
    tracked how strongly HBE1 (which loads on it) was knocked down, and an outcome model
    on that factor explained the effect away (HS2 → HBE1: LFC −5.7 ± 43).  As
    negative-control genes do in RUV-2, genes that no perturbation moves
    (``keep``, from :func:`affected_genes`) measure the cell state without the response.
    Every cell, control or perturbed, is re-estimated from the *same* genes, so the
    factors have the same distribution in every arm (re-estimating only the perturbed
    cells from fewer genes shrinks their factors more than the controls', which biases
    the AIPW contrast through ``E exp(gamma' u)``).  With loadings and coefficients
    fixed, each ``u_i`` maximises ::

        sum_{j in keep} log NB(y_ij; mu_ij, size_j) - |u_i|² / 2,
        log mu_ij = log s_i + x_i' b_j + a_i' beta_j + u_i' gamma_j

    by ``n_steps`` Fisher-scoring steps (each coordinate's step capped at 1) from stage
    1's ``u_i``; the standard-normal prior is stage 1's.  The cells' information matrices
    are formed once, at the start, by one float32 GEMM per row block (the weights, cells x
    genes, times the genes' ``gamma gamma'``, genes x r²) and reused by every step.
    """
    U = np.array(U, dtype=float, copy=True)
    r = U.shape[1]
    cols = np.flatnonzero(keep)
    if r == 0 or cols.size == 0:
        return U
    nb_alpha = np.where(np.isfinite(size), 1.0 / np.where(np.isfinite(size), size, 1.0), 0.0)
    a_k = nb_alpha[cols]
    G = Gamma[cols]
    GG32 = (G[:, :, None] * G[:, None, :]).reshape(cols.size, r * r).astype(np.float32)
    eye = np.eye(r)
    step_rows = max(64, min(4096, (8 * 2**20) // (8 * max(cols.size, 1))))

    def fit_block(rb: slice) -> None:                  # writes its own rows of U
        block = Y[rb][:, cols]
        y = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=float)
        base = log_s[rb, None] + X[rb] @ B_X[cols].T + A[rb] @ B_A[cols].T
        u = U[rb]
        H_inv = None
        for _ in range(n_steps):
            mu = np.exp(np.clip(base + u @ G.T, -30.0, 20.0))
            t = 1.0 / (1.0 + mu * a_k)
            score = ((y - mu) * t) @ G - u
            if H_inv is None:
                # the Fisher information at the start, kept for every step (it changes
                # slowly; its GEMM, cells x genes x r², is the expensive part), float32
                w = (mu * t).astype(np.float32)
                H = (w @ GG32).astype(np.float64).reshape(-1, r, r) + eye
                H_inv = np.linalg.inv(H)
            step = (H_inv @ score[:, :, None])[:, :, 0]
            u = u + np.clip(step, -1.0, 1.0)
        U[rb] = u

    # row blocks are independent: on the pass's threads (one-thread BLAS each)
    run_chunks(fit_block, gene_chunks(U.shape[0], step_rows))
    return U


def winsorize_factors(U: np.ndarray, k: float = 6.0) -> np.ndarray:
    """Clip each factor to median ± k robust SDs (1.4826 MAD).

    A handful of cells dominated by one gene can get extreme factor values; a GLM that is
    linear in U then extrapolates their counterfactual means by orders of magnitude, and
    one such cell can swamp an AIPW mean.  Gaussian-like factors are never clipped at k = 6.
    """
    med = np.median(U, axis=0)
    mad = 1.4826 * np.median(np.abs(U - med), axis=0)
    mad = np.where(mad > 0, mad, U.std(axis=0) + 1e-12)
    return np.clip(U, med - k * mad, med + k * mad)


def _mad_scale(resid: np.ndarray) -> float:
    """The residual scale of the Huber fits: 1.4826 x the median absolute deviation."""
    return 1.4826 * np.median(np.abs(resid - np.median(resid)))


def _huber_weights(resid: np.ndarray, scale: float, epsilon: float) -> np.ndarray:
    """The IRLS weights of Huber's loss, ``min(1, epsilon * scale / |resid|)``."""
    return np.minimum(1.0, epsilon * scale / np.maximum(np.abs(resid), 1e-300))


def huber_regression(Xd: np.ndarray, y: np.ndarray, epsilon: float = 1.35,
                     max_iter: int = 100, tol: float = 1e-8) -> np.ndarray:
    """Huber M-estimate of y ~ Xd (no intercept) by iteratively reweighted least squares.

    The residual scale is re-estimated each iteration as 1.4826 * MAD of the residuals;
    weights are min(1, epsilon * scale / |residual|).  Starts from least squares; each
    reweighted fit solves its (small) normal equations.
    """
    coef, *_ = np.linalg.lstsq(Xd, y, rcond=None)
    for _ in range(max_iter):
        resid = y - Xd @ coef
        scale = _mad_scale(resid)
        if scale <= 0:
            break
        w = _huber_weights(resid, scale, epsilon)
        Xw = Xd * w[:, None]
        try:
            new = np.linalg.solve(Xw.T @ Xd, Xw.T @ y)
        except np.linalg.LinAlgError:
            sw = np.sqrt(w)
            new = np.linalg.lstsq(Xd * sw[:, None], y * sw, rcond=None)[0]
        if np.max(np.abs(new - coef)) < tol * (1.0 + np.max(np.abs(coef))):
            coef = new
            break
        coef = new
    return coef


def huber_covariance(Xd: np.ndarray, y: np.ndarray, coef: np.ndarray,
                     epsilon: float = 1.35) -> np.ndarray:
    """Sandwich covariance of a Huber M-estimate (Huber 1981, §7.6).

    With residual scale ``sigma`` (1.4826 MAD), standardised residuals
    ``u = (y - Xd coef) / sigma``, ``psi(u) = clip(u, -epsilon, epsilon)``::

        Cov(coef) ≈ sigma² (Xd' D Xd)⁻¹ (Xd' diag(psi²) Xd) (Xd' D Xd)⁻¹,
        D = diag(1{|u| <= epsilon})

    treating the rows (genes) as independent given the loadings.
    """
    resid = y - Xd @ coef
    sigma = _mad_scale(resid)
    if not np.isfinite(sigma) or sigma <= 0:
        return np.full((Xd.shape[1], Xd.shape[1]), np.nan)
    u = resid / sigma
    psi = np.clip(u, -epsilon, epsilon)
    bread = np.linalg.pinv((Xd * (np.abs(u) <= epsilon)[:, None]).T @ Xd)
    meat = (Xd * (psi * psi)[:, None]).T @ Xd
    return sigma * sigma * bread @ meat @ bread


def _treatment_shift(beta: np.ndarray, se: np.ndarray, Gamma: np.ndarray, epsilon: float = 1.35,
                     renormalize: bool = True, gamma_noise: np.ndarray | None = None):
    """Huber regression of each perturbation's coefficients on the loadings (stage 2).

    Returns ``(shift, alpha, cov)``: ``beta_hat_k ≈ shift_k + Gamma alpha_k + sparse direct
    effects`` and ``cov[k]``, the sandwich covariance of ``alpha_k`` (NaN where the
    regression could not be fitted).  ``shift_k`` (0 unless ``renormalize``) is a common
    log-scale shift of all genes in perturbation k: size factors estimated from the
    counts absorb part of the perturbation's effects, and under the same sparsity
    assumption (most genes are not affected) the typical gene should show no change.
    ``gamma_noise`` (p x r x r), the sampling covariances of the loadings' estimates:
    when given, ``alpha_k`` is corrected for their attenuation
    (:func:`errors_in_variables_correction`).
    """
    a, r = beta.shape[1], Gamma.shape[1]
    alpha = np.zeros((a, r))
    cov = np.full((a, r, r), np.nan)
    shift = np.zeros(a)
    for k in range(a):
        ok = np.isfinite(beta[:, k]) & np.isfinite(se[:, k]) & (se[:, k] > 0) \
            & (np.abs(beta[:, k]) < 10) & (se[:, k] < 2.0)
        if ok.sum() < 3 * (r + 1):
            continue
        w = 1.0 / se[ok, k]
        design = Gamma[ok] * w[:, None]
        if renormalize:
            design = np.column_stack([w, design])
        coef = huber_regression(design, beta[ok, k] * w, epsilon=epsilon)
        cov_k = huber_covariance(design, beta[ok, k] * w, coef, epsilon=epsilon)
        if gamma_noise is not None and shift_is_evident(coef[-r:], cov_k[-r:, -r:]):
            noise = np.zeros((ok.sum(),) + (design.shape[1],) * 2)
            noise[:, -r:, -r:] = gamma_noise[ok] * (w * w)[:, None, None]
            coef, cov_k = errors_in_variables_correction(design, beta[ok, k] * w, coef,
                                                         cov_k, noise, epsilon=epsilon)
        if renormalize:
            coef, cov_k = coef[1:], cov_k[1:, 1:]
            shift[k] = np.median((beta[:, k] - Gamma @ coef)[ok])
        alpha[k], cov[k] = coef, cov_k
    return shift, alpha, cov


#: Level of the Wald test below which a shift is taken as evident and corrected for the
#: loadings' noise (:func:`shift_is_evident`).
EVIDENT_SHIFT_LEVEL = 0.05


def shift_is_evident(alpha: np.ndarray, cov: np.ndarray) -> bool:
    """Whether the Wald statistic ``alpha' cov^-1 alpha`` exceeds its chi-square(r)
    quantile at :data:`EVIDENT_SHIFT_LEVEL`.

    The attenuation by noisy loadings scales the shift towards 0, which biases nothing
    when there is no shift; correcting it there only inflates noise (by up to
    1/:data:`MIN_RELIABILITY`), most of all for factors fitted to noise, whose loadings
    look more reliable than they are.  So only a shift beyond its sampling noise is
    corrected.
    """
    from scipy.stats import chi2

    if not np.isfinite(cov).all():
        return False
    stat = float(alpha @ np.linalg.pinv(cov) @ alpha)
    return stat > chi2.isf(EVIDENT_SHIFT_LEVEL, alpha.size)


#: Least reliability (smallest eigenvalue of ``G^-1/2 (G - N) G^-1/2``) at which the
#: loadings' noise is corrected; below it the correction would amplify noise.
MIN_RELIABILITY = 0.5


def errors_in_variables_correction(Xd: np.ndarray, y: np.ndarray, coef: np.ndarray,
                                   cov: np.ndarray, noise: np.ndarray,
                                   epsilon: float = 1.35) -> tuple[np.ndarray, np.ndarray]:
    """A Huber fit of ``y ~ Xd`` corrected for noise in the regressors' rows.

    Model: the rows are ``Xd_j = X_j + e_j`` with ``E e_j = 0``, ``Cov e_j = noise[j]``,
    independent of the errors of ``y``.  Least squares on the noisy rows is attenuated:
    ``E[Xd' Xd] = X' X + sum_j noise_j``.  The moment-corrected estimate (Fuller 1987,
    §2.2) solves ``(G - N) coef = Xd' Omega y`` with ``G = Xd' Omega Xd``,
    ``N = sum_j omega_j noise_j`` and ``Omega`` the Huber weights at ``coef``; its
    covariance is ``cov`` mapped by ``(G - N)^-1 G``.  Where the corrected Gram is not
    well conditioned (reliability below :data:`MIN_RELIABILITY`) ``coef`` and ``cov``
    are returned as given.
    """
    resid = y - Xd @ coef
    scale = _mad_scale(resid)
    omega = _huber_weights(resid, scale, epsilon) if scale > 0 else np.ones_like(y)
    Xw = Xd * omega[:, None]
    G = Xw.T @ Xd
    N = np.einsum("j,jab->ab", omega, noise)
    try:
        root = np.linalg.cholesky(G)
        Li = np.linalg.inv(root)
        reliability = np.linalg.eigvalsh(Li @ (G - N) @ Li.T).min()
    except np.linalg.LinAlgError:
        return coef, cov
    if not reliability >= MIN_RELIABILITY:
        return coef, cov
    corrected = np.linalg.solve(G - N, Xw.T @ y)
    M = np.linalg.solve(G - N, G)
    return corrected, M @ cov @ M.T


def chance_imbalance_variance(A: np.ndarray, control: str = "non-targeting",
                              X: np.ndarray | None = None) -> np.ndarray:
    """Variance of each factor's arm-mean difference under random assignment.

    With unit-variance factors and cells assigned to perturbation k or to the controls
    at random, the mean of a pre-treatment factor over the ``n_k`` treated cells minus
    its mean over the ``n_0`` controls has variance ``1/n_k + 1/n_0``.  The controls are
    the cells without any perturbation (``control='non-targeting'``), or every cell
    without perturbation k (``'complement'``, high MOI: ``n_0 = n - n_k``).

    What stage 2 estimates is the factors' *partial* coefficient on ``A_k`` in the
    design ``Z = [X | A]`` of stage 1 (the factors are fitted orthogonal to it), whose
    chance variance is ``[(Z'Z)^-1]_kk``.  For one-hot ``A`` and an intercept-only
    ``X`` that is ``1/n_k + 1/n_0`` exactly; in high MOI ``A_k`` is partly predicted by
    the number of guides in ``X`` and by the batch's other targets, and the variance
    grows by the variance inflation factor ``1/(1 - R^2_k)``.  With ``X`` given and
    ``control='complement'`` that is what is returned (docs/math.md#high-moi).
    """
    A = np.asarray(A)
    n_k = (A != 0).sum(axis=0).astype(float)
    if control == "complement":
        if X is not None and A.shape[1]:
            Z = np.hstack([np.asarray(X, dtype=float), (A != 0).astype(float)])
            G = Z.T @ Z
            inv = np.linalg.pinv(G, hermitian=True)
            return np.diag(inv)[X.shape[1]:].copy()
        n_0 = A.shape[0] - n_k
    else:
        n_0 = np.full(n_k.shape, float((~(A != 0).any(axis=1)).sum()))
    with np.errstate(divide="ignore"):
        return 1.0 / np.maximum(n_k, 1.0) + 1.0 / np.maximum(n_0, 1.0)


@dataclass
class ShiftDecision:
    """Stage-2 confounder shifts after the assignment model is applied.

    ``alpha`` (a x r) is added to the treated cells' factors; ``cov`` (a x r x r) is the
    variance of its error as an estimate of the confounders' true arm-mean difference
    (what the doubly robust step adds to each LFC's variance as ``gamma' cov gamma``);
    ``statistic`` is the chance-imbalance statistic ``D²`` and ``pvalue`` its
    chi-square(r) p-value (NaN for ``'observational'``); ``supported`` marks the
    perturbations whose shift was kept.
    """

    alpha: np.ndarray
    cov: np.ndarray
    statistic: np.ndarray
    pvalue: np.ndarray
    supported: np.ndarray


def decide_shifts(alpha_hat: np.ndarray, cov: np.ndarray, v: np.ndarray,
                  assignment: str = "randomized", level: float = 0.01) -> ShiftDecision:
    """Which part of the stage-2 shift is confounding, under the assignment model.

    The coefficients of perturbation k move along the loadings by ``Gamma alpha_k``.
    Two things do that: a difference in the confounders between treated and control
    cells, and a perturbation whose *effect* is a programme of genes that co-vary in
    the controls too (a transcription factor and its targets, the IFN-γ pathway).  The
    two are not distinguishable from the counts.

    ``'observational'`` (case-control studies, selection on cell state): all of
    ``alpha_hat`` is confounding; its estimation covariance is ``cov``.

    ``'randomized'`` (CRISPR screens: guides are assigned at random): the confounders'
    arm-mean difference ``b_k`` is only chance imbalance, ``b_k ~ N(0, v_k I)`` with
    ``v_k = 1/n_k + 1/n_0`` (:func:`chance_imbalance_variance`).  With
    ``alpha_hat = b_k + e`` and ``e ~ N(0, cov_k)``::

        D²_k = alpha_hat' (v_k I + cov_k)⁻¹ alpha_hat  ~  chi-square(r)

    If ``D²_k`` is within the ``1 - level`` quantile the shift is taken as chance
    imbalance and adjusted by its posterior mean ``v_k (v_k I + cov_k)⁻¹ alpha_hat``
    (error covariance ``v_k I - v_k² (v_k I + cov_k)⁻¹``).  Beyond it the movement is
    larger than randomisation allows: it is the perturbation's effect and is left in
    the LFCs; the chance imbalance then stays unadjusted and its variance ``v_k I`` is
    added instead, so the LFC's standard error stays honest either way.
    """
    a, r = alpha_hat.shape
    if assignment == "observational":
        cov_ok = np.where(np.isfinite(cov), cov, 0.0)
        return ShiftDecision(alpha_hat.copy(), cov_ok, np.full(a, np.nan), np.full(a, np.nan),
                             np.ones(a, bool))
    from scipy.stats import chi2

    alpha = np.zeros((a, r))
    err = np.zeros((a, r, r))
    stat = np.full(a, np.nan)
    supported = np.zeros(a, bool)
    eye = np.eye(r)
    for k in range(a):
        err[k] = v[k] * eye
        if r == 0 or not np.all(np.isfinite(cov[k])):
            continue
        M = np.linalg.pinv(v[k] * eye + cov[k], hermitian=True)
        stat[k] = float(alpha_hat[k] @ M @ alpha_hat[k])
        if stat[k] <= chi2.ppf(1.0 - level, r):
            supported[k] = True
            alpha[k] = v[k] * (M @ alpha_hat[k])
            err[k] = v[k] * eye - v[k] * v[k] * M
            err[k] = 0.5 * (err[k] + err[k].T)
    pvalue = np.where(np.isfinite(stat), chi2.sf(np.nan_to_num(stat), max(r, 1)), np.nan)
    return ShiftDecision(alpha, err, stat, pvalue, supported)


def shift_variance(Gamma: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``gamma_j' cov_k gamma_j``: variance each LFC inherits from the shift (p x a)."""
    return np.einsum("jr,krs,js->jk", Gamma, cov, Gamma)


def _stage1_start(Y, X, A, log_s, fit0: GLMFit, r: int, Q: np.ndarray, A_init,
                  random_state: int) -> np.ndarray:
    """Stage 1's starting factors: from ``A_init`` (its last r columns) or the SVD
    initialisation, projected off [X | A] and scaled to unit SD."""
    n, d, a = X.shape[0], X.shape[1], A.shape[1]
    if A_init is not None:
        A_init = np.asarray(A_init, float)
        check_shape("A_init", A_init, (n, d + a + r))
        U0 = _project_out(A_init[:, d + a:], Q)
    else:
        U0 = _project_out(_initial_factors(Y, X, A, log_s, fit0, r, random_state), Q)
    return U0 / np.maximum(U0.std(axis=0, keepdims=True), 1e-12)


def _stage2_shift(beta_hat, se_hat, Gamma, A, *, skip: bool, renormalize: bool,
                  assignment: str, shift_level: float, control: str = "non-targeting",
                  X: np.ndarray | None = None, gamma_noise: np.ndarray | None = None):
    """Stage 2: the common log shift per treatment, the raw confounder shift alpha_hat and
    the decision on which part of it is adjusted (``skip``: ``c1 == 0``, nothing).

    Under ``'observational'`` the whole shift is removed, so its attenuation by the
    loadings' sampling noise (``gamma_noise``, p x r x r) is a bias of every gene's
    effect in proportion to its loading; the shift is then corrected for it
    (docs/math.md#case-control).  Under ``'randomized'`` only a within-chance shift is
    adjusted and the decision rule is calibrated on the uncorrected estimate."""
    a, r = A.shape[1], Gamma.shape[1]
    if skip:
        alpha_hat = np.zeros((a, r))
        decision = ShiftDecision(alpha_hat, np.zeros((a, r, r)), np.full(a, np.nan),
                                 np.full(a, np.nan), np.zeros(a, bool))
        return np.zeros(a), alpha_hat, decision
    noise = gamma_noise if assignment == "observational" else None
    shift, alpha_hat, cov = _treatment_shift(beta_hat, se_hat, Gamma, renormalize=renormalize,
                                             gamma_noise=noise)
    decision = decide_shifts(alpha_hat, cov, chance_imbalance_variance(A, control, X),
                             assignment, shift_level)
    return shift, alpha_hat, decision


@dataclass(frozen=True)
class _Stage1Fit:
    """Stage 1's factors and coefficients, the input of the pretreatment refits."""

    U: np.ndarray          # n x r (rebalanced)
    B_X: np.ndarray        # p x d
    B_A: np.ndarray        # p x a
    Gamma: np.ndarray      # p x r


def _refit_on_unaffected(data: tuple, stage1: _Stage1Fit, keep: np.ndarray):
    """Factors re-estimated from the genes ``keep`` and one gene pass refitting every
    gene's coefficients to them.  Returns ``(U, coef)``, coef as [B_X | B_A | Gamma]
    (res_2 describes its own U; LFC's outcome GLM starts from these coefficients)."""
    Y, X, A, log_s, size, Q = data
    p, d, r = Y.shape[1], X.shape[1], stage1.U.shape[1]
    U = _project_out(pretreatment_factors(Y, X, A, log_s, size, stage1.B_X, stage1.B_A,
                                          stage1.Gamma, stage1.U, keep), Q)
    start = np.hstack([stage1.B_X, stage1.Gamma, stage1.B_A])
    refit, _, _ = _gene_passes(Y, X, A, groups_from_onehot(A), log_s,
                               alpha_from_size(size) * np.ones(p), U, start, 1)
    return U, np.hstack([refit[:, :d], refit[:, d + r:], refit[:, d:d + r]])


def onehot_groups(A: np.ndarray) -> np.ndarray:
    """Group of each cell of a one-hot treatment matrix: its column, ``-1`` for a cell
    without treatment (``ValueError``-free: callers check one-hotness first)."""
    A = np.asarray(A)
    return np.where(A.sum(axis=1) > 0, np.argmax(A, axis=1), -1)


def _refit_treatments_on_unaffected(data: tuple, stage1: _Stage1Fit, keep: np.ndarray):
    """:func:`_refit_on_unaffected` at fixed loadings: the factors re-estimated from the
    genes ``keep``, then only the treatment coefficients refitted to them
    (:func:`causarray.factor_model.group_treatment_coefs`; one-hot treatments)."""
    Y, X, A, log_s, size, Q = data
    U = _project_out(pretreatment_factors(Y, X, A, log_s, size, stage1.B_X, stage1.B_A,
                                          stage1.Gamma, stage1.U, keep), Q)
    base = log_s[:, None] + X @ stage1.B_X.T + U @ stage1.Gamma.T
    beta, _ = group_treatment_coefs(Y, base, onehot_groups(A), A.shape[1],
                                    alpha_from_size(size) * np.ones(Y.shape[1]))
    return U, np.hstack([stage1.B_X, beta, stage1.Gamma])


GENE_FOLD_PANEL = 100      # gene folds when p < GENE_FOLD_PANEL * r (r / p above 1 %)


def resolve_gene_folds(gene_folds: int | str, p: int, r: int) -> int:
    """Number of gene folds of :func:`fit_gcate`: ``'auto'`` gives 3 when r / p > 1 %.

    Estimating a cell's r factors from p genes gives each gene a leverage of about r / p
    on them, so a gene's own noise enters the factors its outcome model is adjusted for
    in that proportion.  Gene folds remove it at the price of ``folds`` extra factor
    fits; below 1 % it is not worth it.
    """
    gene_folds = check_gene_folds(gene_folds)
    if gene_folds == "auto":
        return 3 if r > 0 and p < GENE_FOLD_PANEL * r else 0
    return gene_folds


def _gene_fold_factors(data: tuple, stage1: _Stage1Fit, keep: np.ndarray, alpha: np.ndarray,
                       gene_folds: int, random_state: int):
    """Each gene's fold and, per fold, factors estimated without its genes (shifted by
    ``A @ alpha`` as the shared U).  Returns ``(gene_fold, [U_0, ...])``."""
    Y, X, A, log_s, size, Q = data
    p, r = Y.shape[1], stage1.U.shape[1]
    gene_fold = np.random.default_rng(random_state).permutation(p) % gene_folds
    fold_U = []
    for f in range(gene_folds):
        keep_f = keep & (gene_fold != f)
        if keep_f.sum() < max(3 * r, 10):
            keep_f = gene_fold != f
        U_f = _project_out(pretreatment_factors(Y, X, A, log_s, size, stage1.B_X, stage1.B_A,
                                                stage1.Gamma, stage1.U, keep_f), Q)
        fold_U.append(winsorize_factors(U_f) + A @ alpha)
    return gene_fold, fold_U


@dataclass(frozen=True)
class _Stage2Options:
    """The options of :func:`fit_gcate` that stage 2 and the pretreatment refit use."""

    family: str
    es: dict
    ls: dict | None
    c1: float | None
    renormalize: bool
    control: str
    assignment: str
    shift_level: float
    pretreatment_u: bool
    affected_z: float
    gene_folds: int | str
    random_state: int


def stage2_result(data: tuple, s: np.ndarray, U1r: np.ndarray, coef1: np.ndarray,
                  se_hat: np.ndarray, hist1: list, opts: _Stage2Options,
                  fixed_loadings: bool = False, gamma_noise: np.ndarray | None = None) -> dict:
    """Stage 2 from a stage-1 fit: the treatment-linked shift, its decision, the
    pretreatment factors and gene folds, as ``res_2`` of :func:`fit_gcate`.

    ``data`` is ``(Y, X, A, log_s, size, Q)``; ``U1r`` the stage-1 factors and ``coef1``
    their coefficients ``[B_X | B_A | Gamma]``, ``se_hat`` the standard errors of
    ``B_A``.  Shared by the per-batch fit and the fit at a screen's loadings
    (:mod:`causarray.screen_stage`); with ``fixed_loadings`` the pretreatment refit
    keeps ``B_X`` and ``Gamma`` and re-estimates only the treatment coefficients.
    ``gamma_noise`` (p x r x r): the sampling covariances of ``Gamma``'s rows.
    """
    Y, X, A, log_s, size, Q = data
    p, d, a, r = Y.shape[1], X.shape[1], A.shape[1], U1r.shape[1]
    beta_hat, Gamma1r = coef1[:, d:d + a], coef1[:, d + a:]
    shift, alpha_hat, decision = _stage2_shift(beta_hat, se_hat, Gamma1r, A,
                                               skip=opts.c1 is not None and opts.c1 == 0,
                                               renormalize=opts.renormalize,
                                               control=opts.control,
                                               assignment=opts.assignment,
                                               shift_level=opts.shift_level, X=X,
                                               gamma_noise=gamma_noise)
    alpha = decision.alpha
    fold_U = gene_fold = unaffected = None
    if opts.pretreatment_u and r > 0 and opts.assignment == "randomized":
        # genes moved by a perturbation beyond the confounder shift that is adjusted
        direct = beta_hat - shift[None, :] - Gamma1r @ alpha.T
        unaffected = ~affected_genes(direct, se_hat, opts.affected_z)
        keep = unaffected.all(axis=1)
        logger.info("GCATE: factors re-estimated from %d of %d genes that no perturbation "
                    "moves (|z| <= %g)", int(keep.sum()), p, opts.affected_z)
        stage1 = _Stage1Fit(U1r, coef1[:, :d], beta_hat, Gamma1r)
        if keep.sum() >= max(3 * r, 10) and not keep.all():
            refit = _refit_treatments_on_unaffected if fixed_loadings else _refit_on_unaffected
            U1r, coef1 = refit(data, stage1, keep)
            beta_hat, Gamma1r = coef1[:, d:d + a], coef1[:, d + a:]
        n_folds = resolve_gene_folds(opts.gene_folds, p, r)
        if n_folds > 1:
            gene_fold, fold_U = _gene_fold_factors(data, stage1, keep, alpha, n_folds,
                                                   opts.random_state)
    U2 = winsorize_factors(U1r) + A @ alpha
    coef2 = coef1.copy()
    coef2[:, d:d + a] = beta_hat - shift[None, :] - Gamma1r @ alpha.T
    kw_glm2 = dict(family=opts.family, disp_glm=size, size_factor=s * np.exp(A @ shift))
    res_2 = _result(X, A, U2, coef2, [hist1[-1]], 0, kw_glm2, opts.es, opts.ls)
    res_2.update(alpha=alpha, alpha_hat=alpha_hat, shift_cov=decision.cov,
                 shift_var=shift_variance(Gamma1r, decision.cov),
                 shift_stat=decision.statistic, shift_pvalue=decision.pvalue,
                 shift_adjusted=decision.supported, assignment=opts.assignment)
    if unaffected is not None:
        res_2["unaffected"] = unaffected
    if fold_U is not None:
        res_2["gene_fold"] = gene_fold
        res_2["U_gene_folds"] = np.stack(fold_U)
    res_2["shift"] = shift
    res_2["se_A"] = se_hat
    return res_2


def _check_options(assignment, control, shift_level, gene_folds, backend) -> None:
    """The options of :func:`fit_gcate` that are checked before any data is read."""
    from ._compat import check_backend

    check_assignment(assignment)
    check_control(control)
    check_open_unit("shift_level", shift_level)
    check_gene_folds(gene_folds)
    check_backend(backend)


def fit_gcate(Y, X, A, r: int, family: str = "nb", disp_glm=None, disp_family=None,
              offset=True, kwargs_ls_1=None, kwargs_ls_2=None, kwargs_es_1=None,
              kwargs_es_2=None, c1=None, A_init=None, random_state: int = 0,
              verbose: bool = False, renormalize: bool = True, backend: str = "auto",
              assignment: str = "observational", shift_level: float = 0.01,
              pretreatment_u: bool = True, affected_z: float = 3.0,
              gene_folds: int | str = "auto", control: str = "non-targeting", **kwargs):
    """Estimate r latent confounders with the two-stage GCATE factor model.

    Parameters
    ----------
    Y : (n, p) raw counts (array, DataFrame or scipy.sparse).
    X : (n, d) observed covariates including the intercept.
    A : (n, a) treatments: 0/1 indicators, or continuous values (dose, guide UMI) as in
        0.1.1 -- a treatment column enters the GLM linearly either way; :func:`LFC` needs
        0/1 indicators.
    r : number of latent factors (>= 0; with 0 both stages are the GLM on [X | A] and U
        has no column).
    family : 'nb' or 'poisson'.
    disp_glm : (p,) NB *size* theta_j per gene (``Var(y) = mu + mu^2 / theta_j``), i.e.
        1/dispersion -- pass ``1 / dispersions`` from DESeq2 or edgeR (the name is
        0.1.1's); estimated on [X | A] by method of moments when None
        (:func:`causarray.glm.estimate_nb_size`).
    disp_family : accepted for compatibility (unused).
    offset : True (median-of-ratios size factors), False/None (none) or an (n,) array of
        log size factors.
    kwargs_es_1, kwargs_es_2 : early stopping of stage 1 / stage 2 (``max_iters``,
        ``rel_tol``, ``patience``, ``warmup``, ``tolerance``).
    kwargs_ls_1, kwargs_ls_2 : accepted for compatibility with the proximal-gradient
        solver of the original (unused by the Fisher-scoring solver).
    c1 : stage-2 switch; ``0`` skips stage 2 (U is then orthogonal to [X | A]).
    renormalize : stage 2 also estimates a common log shift of all genes per perturbation
        (robustly, like the confounder shift) and folds it into the treated cells' size
        factors in ``res_2['kwargs_glm']['size_factor']`` (on by default, together with
        ``LFC(recenter=True)``, which re-centres each perturbation's LFCs; switch both off
        for a perturbation that truly moves most genes one way, see ``docs/dr.md``).
    assignment : 'observational' (default: the published GCATE estimator, every shift of
        the confounders between treated and control cells is confounding; case-control
        studies) or 'randomized' (CRISPR screens, guides assigned at random; the screen
        doors ``gcate_lfc_batch``, ``tl.lfc`` and ``causarray run`` default to it).  Decides
        which part of stage 2's treatment-linked shift is confounding (see
        :func:`decide_shifts` and ``docs/gcate.md``): under randomisation only a shift
        within chance imbalance is adjusted, a larger one is the perturbation's effect.
    shift_level : level of the chance-imbalance test (``'randomized'`` only).
    pretreatment_u : under ``'randomized'`` assignment, re-estimate every cell's factors
        from the genes no perturbation moves (``|z| <= affected_z`` in stage 1), so that
        ``U`` measures the cell's state and not its response
        (:func:`pretreatment_factors`).  Not applied under ``'observational'``: on the
        confounded simulations it raised the FDR at q = 0.05 from 0.052 to 0.065.
    gene_folds : with ``pretreatment_u``, also estimate the factors ``gene_folds`` times,
        each time without one fold of genes (``res_2['U_gene_folds']``, fold of each gene
        in ``res_2['gene_fold']``): the doubly robust step models gene j on factors that
        were not read off gene j's own counts.  On a small panel a cell's factors
        otherwise fit its own noise in each gene and the LFC's standard errors are too
        small (Hill, 26 genes, r = 5, fake perturbations: type-I 0.116 with the shared
        factors, 0.061 with 2 and 0.059 with 5 gene folds).  0 or 1 switches it off.
        ``'auto'`` (default): 3 folds when a gene's share of the factor fit, r / p, is
        above 1 % (p < 100 r: Hill, the TAP-seq panels, Papalexi at r >= 3), none on
        larger panels, where a gene's own noise moves U by ~r/p of itself and the three
        extra factor fits and outcome models only cost time (one tutorial batch, 4,000 x
        8,563, r = 30: 256 s against 118 s without them, see :func:`resolve_gene_folds`).
    control : the cells each perturbation's chance imbalance is judged against:
        ``'non-targeting'`` (the all-zero rows of A) or ``'complement'`` (every cell
        without the perturbation; high-MOI screens, where A has several ones per row).
    A_init : (n, d + a + r) initial [X | A | U]; replaces the SVD initialisation.
    random_state : seed of the randomized SVD.
    verbose : show progress bars.
    backend : 'auto', 'fast' or 'original' (0.1.1's GLM engines); validated, all run this
        package's exact GLM (see :mod:`causarray._compat`).
    **kwargs : only the original's ``GCATE_COMPAT_KEYWORDS`` (unused); any other name
        raises ``TypeError``.

    Returns
    -------
    res_1, res_2 : dict
        ``X_U`` ([X | A | U]), ``B_Gamma`` ([B_X | B_A | Gamma]), ``U``, ``kwargs_glm``
        (``family``, ``disp_glm``, ``size_factor``), ``hist``, ``n_iter``, ``func_val``;
        ``res_2`` additionally ``alpha`` (a x r shift of the confounders per treatment,
        as adjusted), ``alpha_hat`` (stage 2's raw estimate), ``shift_cov`` (a x r x r
        error covariance of ``alpha``), ``shift_var`` (p x a: its variance in each
        gene's log fold change, ``gamma_j' shift_cov_k gamma_j``), ``shift_stat`` /
        ``shift_pvalue`` (chance-imbalance test), ``se_A`` (standard errors of the
        stage-1 treatment coefficients).
    """
    check_keywords("fit_gcate", kwargs, GCATE_COMPAT_KEYWORDS | parameter_names(fit_gcate))
    _check_options(assignment, control, shift_level, gene_folds, backend)
    logger.debug("fit_gcate: assignment=%r, control=%r", assignment, control)
    Y, X, A = _check_inputs(Y, X, A, r, family)
    p = Y.shape[1]
    d = X.shape[1]
    s = size_factors_from_offset(Y, offset)
    log_s = np.log(s)
    fit0 = _initial_glm(Y, X, A, log_s, family, disp_glm)
    size = fit0.size if family == "nb" else np.full(p, np.inf)
    if r == 0:          # no latent factors: both stages are the GLM on [X | A]
        return _without_factors(X, A, fit0, size, s, family, kwargs_es_1, kwargs_es_2,
                                kwargs_ls_1, kwargs_ls_2)
    es1 = {**DEFAULT_ES, **(kwargs_es_1 or {})}
    es2 = {**DEFAULT_ES, **(kwargs_es_2 or {})}
    Z = np.hstack([X, A])
    Q = _orth_basis(Z)

    U0 = _stage1_start(Y, X, A, log_s, fit0, r, Q, A_init, random_state)
    t0 = time.perf_counter()
    U1, coef_1, se_1, hist1, it1 = _alternate(Y, X, A, log_s, size, U0, _start_coef(fit0, d, r),
                                              Q, es1, verbose, "GCATE stage 1")
    del fit0
    logger.info("GCATE stage 1: %d epochs, %.1fs", it1 + 1, time.perf_counter() - t0)
    U1r, Gamma1r = _rebalance(U1, coef_1[:, d:d + r])
    noise = None
    if assignment == "observational":   # the shift is removed: correct its attenuation
        if family == "nb":               # (the weights of stage 2 use these errors too)
            se_1 = stage1_standard_errors(Y, X, A, log_s, U1, coef_1)
        noise = loading_noise(coef_1[:, d:d + r], Gamma1r, se_1[:, d:d + r])
    coef1 = np.hstack([coef_1[:, :d], coef_1[:, d + r:], Gamma1r])   # [B_X | B_A | Gamma]
    kw_glm = dict(family=family, disp_glm=size, size_factor=s)
    res_1 = _result(X, A, U1r, coef1, hist1, it1, kw_glm, es1, kwargs_ls_1)

    opts = _Stage2Options(family=family, es=es2, ls=kwargs_ls_2, c1=c1, renormalize=renormalize,
                          control=control, assignment=assignment, shift_level=shift_level,
                          pretreatment_u=pretreatment_u, affected_z=affected_z,
                          gene_folds=gene_folds, random_state=random_state)
    res_2 = stage2_result((Y, X, A, log_s, size, Q), s, U1r, coef1, se_1[:, d + r:], hist1,
                          opts, gamma_noise=noise)
    return res_1, res_2


def _without_factors(X, A, fit0: GLMFit, size, s, family, es_1, es_2, ls_1, ls_2):
    """``fit_gcate`` with r = 0: res_1 = res_2 = the GLM on [X | A], U with no column."""
    n, a = A.shape
    d = X.shape[1]
    kw_glm = dict(family=family, disp_glm=size, size_factor=s)
    hist = [np.nan]
    U = np.zeros((n, 0))
    res_1 = _result(X, A, U, fit0.coef.copy(), hist, 0, kw_glm, {**DEFAULT_ES, **(es_1 or {})},
                    ls_1)
    res_2 = _result(X, A, U, fit0.coef.copy(), hist, 0, dict(kw_glm),
                    {**DEFAULT_ES, **(es_2 or {})}, ls_2)
    se = getattr(fit0, "se", None)
    res_2["alpha"] = np.zeros((a, 0))
    res_2["shift"] = np.zeros(a)
    res_2["se_A"] = (np.asarray(se)[:, d:] if se is not None and np.ndim(se) == 2
                     else np.full((fit0.coef.shape[0], a), np.nan))
    return res_1, res_2


def _result(X, A, U, coef, hist, n_iter, kw_glm, es, ls) -> dict:
    X_U = np.hstack([X, A, U])
    r = U.shape[1]
    return dict(X_U=X_U, B_Gamma=coef, U=X_U[:, X_U.shape[1] - r:], n_iter=n_iter,
                func_val=hist[-1], hist=np.asarray(hist), kwargs_glm=kw_glm,
                kwargs_es=es, kwargs_ls=dict(ls or {}))


# ----------------------------------------------------------------------------------
# choosing r: JIC
# ----------------------------------------------------------------------------------
def subsample_control_priority(A: np.ndarray, max_cells: int, random_state: int = 0) -> np.ndarray:
    """Sorted row indices of a control-priority subsample of at most ``max_cells`` cells.

    See docs/math.md#control-priority-subsample.
    """
    n = A.shape[0]
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    ctrl = np.flatnonzero(A.sum(axis=1) == 0)
    trt = np.flatnonzero(A.sum(axis=1) > 0)
    n_t_floor = min(trt.size, max(1, max_cells // 4))
    n_c = min(ctrl.size, max_cells - n_t_floor)
    n_t = min(trt.size, max_cells - n_c)
    rng = np.random.default_rng(random_state)
    pick_c = rng.choice(ctrl, n_c, replace=False)
    pick_t = rng.choice(trt, n_t, replace=False)
    return np.sort(np.concatenate([pick_c, pick_t]))


def jic_penalty(n: int, p: int, n_params: int) -> float:
    """nu = n_params * log(min(n, p)) / min(n, p)  (docs/math.md#jic)."""
    m = min(n, p)
    return n_params * np.log(m) / m


def estimate_r(Y, X, A, r_max, c: float = 1.0, family: str = "nb", disp_glm=None,
               disp_family=None, offset=True, max_cells: int | None = None,
               random_state: int = 0, kwargs_ls_1=None, kwargs_ls_2=None, kwargs_es_1=None,
               kwargs_es_2=None, verbose: bool = False, known=None, callback=None,
               backend: str = "auto",
               **kwargs) -> pd.DataFrame:
    """Choose the number of latent factors by the joint information criterion (JIC).

    For each r in the grid, GCATE stage 1 is fitted (warm-started from one shared SVD of
    the deviance residuals of the GLM on [X | A]) and

        deviance(r) = 2 * mean negative log-likelihood per entry (NB with offsets)
        nu(r)       = (d + a + r) * log(min(n, p)) / min(n, p)
        JIC(r)      = deviance(r) + c * nu(r)

    The deviance is the proper NB log-likelihood with size-factor offsets (the original
    evaluated a variant without offsets; see ``docs/gcate.md``).  r = 0 is always included.

    Parameters
    ----------
    Y, X, A : counts, covariates (with intercept), treatments, as for :func:`fit_gcate`.
    r_max : int (grid 1..r_max) or a list of r values.
    c : weight of the penalty.
    max_cells : control-priority subsample size (all controls first, >= max_cells/4 treated).
    offset, family, disp_glm : as for :func:`fit_gcate`.
    kwargs_es_1 : stage-1 early stopping settings.
    known : DataFrame, optional
        Rows (``r, deviance, nu, time_s``) already computed for the same data and settings
        (e.g. by an interrupted run); those r are not refitted.  Each r's fit starts from
        the same shared SVD, so the table does not depend on which r were known.
    callback : callable, optional
        Called with the table of the rows finished so far after each r (to save work
        that an interruption would otherwise lose).
    backend : 'auto', 'fast' or 'original' (0.1.1's GLM engines); validated, all run this
        package's exact GLM.

    Returns
    -------
    DataFrame with columns ``r, deviance, nu, JIC, time_s`` sorted by r.
    """
    # fit_gcate's settings are accepted (as by the original); anything else is a typo
    check_keywords("estimate_r", kwargs, parameter_names(fit_gcate) | GCATE_COMPAT_KEYWORDS)
    A_arr = _as_matrix(A, "A")
    A_arr = A_arr[:, None] if A_arr.ndim == 1 else A_arr
    rows = subsample_control_priority(A_arr, max_cells, random_state)
    Ysub = Y.iloc[rows] if isinstance(Y, pd.DataFrame) else Y[rows]
    Xsub = _as_matrix(X, "X")[rows]
    Asub = A_arr[rows]
    keep_trt = Asub.sum(axis=0) > 0
    Asub = Asub[:, keep_trt]
    grid = check_r_grid(r_max)
    Ysub, Xsub, Asub = _check_inputs(Ysub, Xsub, Asub, max(grid), family)
    if sp.issparse(Ysub):
        Ysub = Ysub.tocsc()
    n, p = Ysub.shape
    d, a = Xsub.shape[1], Asub.shape[1]
    off = offset
    if not isinstance(offset, bool) and offset is not None:
        off = np.asarray(offset, float).ravel()[rows]
    s = size_factors_from_offset(Ysub, off)
    log_s = np.log(s)
    fit0 = _initial_glm(Ysub, Xsub, Asub, log_s, family, disp_glm)
    size = fit0.size if family == "nb" else np.full(p, np.inf)
    alpha = alpha_from_size(size) * np.ones(p)
    const = float(loglik_constants(Ysub, size).sum())
    from ._compat import check_backend

    check_backend(backend)
    es1 = {**DEFAULT_ES, **(kwargs_es_1 or {})}
    Q = _orth_basis(np.hstack([Xsub, Asub]))

    t0 = time.perf_counter()
    u = _initial_factors(Ysub, Xsub, Asub, log_s, fit0, max(grid), random_state)
    U_all = _project_out(u, Q)
    U_all = U_all / np.maximum(U_all.std(axis=0, keepdims=True), 1e-12)
    _, _, kernel0 = _gene_passes(Ysub, Xsub, Asub, groups_from_onehot(Asub), log_s, alpha,
                                 np.zeros((n, 0)), _start_coef(fit0, d, 0), 1)
    nll0 = -(const + kernel0.sum()) / (n * p)
    rows_out = [dict(r=0, deviance=2 * nll0, nu=jic_penalty(n, p, d + a),
                     time_s=time.perf_counter() - t0)]
    done = {}
    if known is not None and len(known):
        done = {int(row["r"]): dict(r=int(row["r"]), deviance=float(row["deviance"]),
                                    nu=float(row["nu"]), time_s=float(row["time_s"]))
                for _, row in pd.DataFrame(known).iterrows() if int(row["r"]) in grid}
    for r in sorted(grid, reverse=True):
        if r in done:
            rows_out.append(done[r])
            continue
        t1 = time.perf_counter()
        _, _, _, hist, _ = _alternate(Ysub, Xsub, Asub, log_s, size, U_all[:, :r],
                                      _start_coef(fit0, d, r), Q, es1, verbose, f"JIC r={r}",
                                      const=const)
        rows_out.append(dict(r=r, deviance=2 * hist[-1], nu=jic_penalty(n, p, d + a + r),
                             time_s=time.perf_counter() - t1))
        if callback is not None:
            callback(pd.DataFrame(rows_out))
    df = pd.DataFrame(rows_out).sort_values("r").reset_index(drop=True)
    df["JIC"] = df["deviance"] + c * df["nu"]
    return df[["r", "deviance", "nu", "JIC", "time_s"]]

