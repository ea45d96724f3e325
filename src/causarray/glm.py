"""Count-GLM engine: negative-binomial and Poisson log-link GLMs for all genes at once.

Model, for cell i and gene j::

    y_ij ~ NB(mu_ij, size r_j)   (Var = mu + mu^2 / r_j;  Poisson when r_j = inf)
    log mu_ij = o_i + x_i' b_j + c_{j, g(i)}

where ``x_i`` are dense covariates (the intercept included), ``g(i)`` is the
perturbation group of cell i (``-1`` for controls) and ``o_i`` an offset
(log size factor).  Group indicators are disjoint, so the group block of the
Fisher information ``G'WG`` is diagonal; each Newton step is solved through the
Schur complement of that block (SPEC §5.2), which costs ``O(n p d^2)`` instead of
``O(n p (d + a)^2)`` and gives the exact IRLS solution.

Fitting is vectorised over genes: genes are processed in chunks whose working
matrices (n x chunk) stay small, and inside a chunk every Gram matrix is one
BLAS call.  Converged genes leave the active set.  A damping ridge is used only
in the Hessian, so the fixed point is the unpenalised maximum-likelihood
estimate (agreement with statsmodels is tested).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln, xlogy

logger = logging.getLogger("causarray")

ETA_MIN, ETA_MAX = -30.0, 20.0
GROUP_COEF_BOUND = 30.0
_CHUNK_BYTES = 8 * 2**20  # working memory per gene chunk and temporary


# ----------------------------------------------------------------------------------
# families
# ----------------------------------------------------------------------------------
def _alpha_from_size(size: np.ndarray | float | None) -> np.ndarray:
    """NB dispersion alpha = 1/size (0 for Poisson / infinite size)."""
    if size is None:
        return np.zeros(1)
    size = np.asarray(size, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(size), 1.0 / size, 0.0)


def nb_unit_deviance(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Unit deviance of the NB (alpha > 0) or Poisson (alpha = 0) family.

    ``2 [y log(y/mu) - (y + r) log((y + r)/(mu + r))]`` with r = 1/alpha, evaluated as
    ``2 [y log(y/mu) + (y + r) log1p((mu - y)/(y + r))]`` so that huge r does not cancel.
    """
    y = np.asarray(y, dtype=float)
    alpha = np.broadcast_to(alpha, np.broadcast_shapes(np.shape(y), np.shape(alpha)))
    t1 = xlogy(y, y) - xlogy(y, mu)
    pois = 2.0 * (t1 - (y - mu))
    if not np.any(alpha > 0):
        return pois
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(alpha > 0, 1.0 / np.where(alpha > 0, alpha, 1.0), np.inf)
        nb = 2.0 * (t1 + (y + r) * np.log1p((mu - y) / (y + r)))
    return np.where(alpha > 0, nb, pois)


def deviance_residuals(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Signed square-root unit deviances; non-finite values become 0."""
    d = np.sqrt(np.maximum(nb_unit_deviance(y, mu, alpha), 0.0)) * np.sign(y - mu)
    d[~np.isfinite(d)] = 0.0
    return d


def nb_loglik(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Elementwise NB (or Poisson where alpha = 0) log-likelihood, constants included."""
    y = np.asarray(y, dtype=float)
    alpha = np.broadcast_to(alpha, np.broadcast_shapes(np.shape(y), np.shape(alpha)))
    pois = xlogy(y, mu) - mu - gammaln(y + 1.0)
    if not np.any(alpha > 0):
        return pois
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(alpha > 0, 1.0 / np.where(alpha > 0, alpha, 1.0), 1.0)
        nb = (gammaln(y + r) - gammaln(r) - gammaln(y + 1.0)
              + xlogy(y, mu) - xlogy(y, mu + r) + r * (np.log(r) - np.log(mu + r)))
    return np.where(alpha > 0, nb, pois)


def loglik_constant(y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-gene sum of the log-likelihood terms that do not depend on the mean.

    With r = 1/alpha: sum_i [lgamma(y + r) - lgamma(r) - lgamma(y + 1) - y log r] (NB) or
    sum_i [-lgamma(y + 1)] (Poisson).  ``loglik = constant + loglik_kernel``.
    """
    alpha = np.broadcast_to(alpha, (1, y.shape[1]))
    out = -gammaln(y + 1.0).sum(axis=0)
    nb = alpha[0] > 0
    if nb.any():
        r = 1.0 / alpha[0, nb]
        yn = y[:, nb]
        out[nb] += (gammaln(yn + r) - gammaln(r) - yn * np.log(r)).sum(axis=0)
    return out


def loglik_kernel(y: np.ndarray, eta: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Mean-dependent part of the NB / Poisson log-likelihood, summed over cells.

    NB: sum_i [y eta - (y + r) log1p(mu / r)];  Poisson: sum_i [y eta - mu].
    """
    alpha = np.broadcast_to(alpha, (1, y.shape[1]))
    nb = alpha > 0
    if nb.any():
        safe = np.where(nb, alpha, 1.0)
        tail = np.where(nb, (y + 1.0 / safe) * np.log1p(mu * alpha), mu)
    else:
        tail = mu
    return (y * eta - tail).sum(axis=0)


# ----------------------------------------------------------------------------------
# design handling
# ----------------------------------------------------------------------------------
def groups_from_onehot(A: np.ndarray | None) -> np.ndarray | None:
    """Group code per row (-1 for all-zero rows) if ``A`` is one-hot, else ``None``."""
    if A is None:
        return None
    A = np.asarray(A)
    if A.ndim != 2 or A.shape[1] == 0:
        return None
    if not np.isin(A, (0, 1)).all() or (A.sum(axis=1) > 1).any():
        return None
    g = np.full(A.shape[0], -1, dtype=np.int64)
    rows, cols = np.nonzero(A)
    g[rows] = cols
    return g


def sym_outer(X: np.ndarray) -> np.ndarray:
    """Row-wise products X_ik X_il for k <= l (n x d(d+1)/2): the Gram's unique entries."""
    iu = np.triu_indices(X.shape[1])
    return np.ascontiguousarray(X[:, iu[0]] * X[:, iu[1]])


def sym_unpack(V: np.ndarray, d: int) -> np.ndarray:
    """Stack of symmetric d x d matrices from their upper-triangular entries (m x d(d+1)/2)."""
    iu = np.triu_indices(d)
    H = np.empty((V.shape[0], d, d))
    H[:, iu[0], iu[1]] = V
    H[:, iu[1], iu[0]] = V
    return H


def _column_scales(X: np.ndarray) -> np.ndarray:
    """Root-mean-square of each column (1 for all-zero columns): the preconditioner."""
    s = np.sqrt(np.mean(X * X, axis=0))
    s[s == 0] = 1.0
    return s


@dataclass
class GLMFit:
    """Per-gene GLM fit on the design ``[X | G]`` (G = one-hot groups).

    Attributes
    ----------
    coef : (p, d + a) coefficients; columns follow ``[X | A]``.
    se : (p, d + a) Wald standard errors from the inverse Fisher information.
    size : (p,) NB size r_j used in the final fit (``inf`` for Poisson).
    converged : (p,) bool, relative deviance change below ``tol``.
    deviance : (p,) residual deviance.
    n_iter : (p,) IRLS iterations used.
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
            eta += np.asarray(offset, float)[:, None]
        return np.clip(eta, ETA_MIN, ETA_MAX, out=eta)


# ----------------------------------------------------------------------------------
# IRLS core on one chunk of genes
# ----------------------------------------------------------------------------------
@dataclass
class _Design:
    """Dense covariates (preconditioned) plus group structure, rows sorted by group."""

    X: np.ndarray              # n x d, preconditioned
    XX: np.ndarray             # n x d*d, row-wise outer products
    groups: np.ndarray         # n, -1 = no group
    n_groups: int
    slices: list               # per group: slice into the group-sorted row order
    order: np.ndarray          # permutation sorting rows by group (controls last)

    @classmethod
    def build(cls, X: np.ndarray, groups: np.ndarray | None, n_groups: int) -> "_Design":
        n = X.shape[0]
        if groups is None:
            groups = np.full(n, -1, dtype=np.int64)
        key = np.where(groups < 0, n_groups, groups)
        order = np.argsort(key, kind="stable")
        Xs = np.ascontiguousarray(X[order])
        gs = groups[order]
        bounds = np.searchsorted(np.where(gs < 0, n_groups, gs), np.arange(n_groups + 1))
        slices = [slice(bounds[k], bounds[k + 1]) for k in range(n_groups)]
        XX = sym_outer(Xs)
        return cls(Xs, XX, gs, n_groups, slices, order)

    def eta(self, B: np.ndarray, C: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """o + X B + G C for a chunk; B (d x m), C (a x m), offset (n x 1 or n x m)."""
        eta = self.X @ B
        for k, sl in enumerate(self.slices):
            eta[sl] += C[k]
        eta += offset
        return eta


def _solve_newton(design: _Design, w: np.ndarray, score: np.ndarray, ridge: float,
                  want_cov: bool = False):
    """Newton step (and optionally the covariance diagonal) for every gene of a chunk.

    ``w`` are IRLS weights and ``score`` = w (y - mu)/mu, both n x m.
    """
    X, d, a = design.X, design.X.shape[1], design.n_groups
    m = w.shape[1]
    H = sym_unpack(w.T @ design.XX, d)                 # X'WX per gene
    gx = (X.T @ score).T                               # m x d
    if a:
        D = np.empty((a, m))
        E = np.empty((a, m, d))                        # X'W G, per group
        gg = np.empty((a, m))
        for k, sl in enumerate(design.slices):
            D[k] = w[sl].sum(axis=0)
            E[k] = (X[sl].T @ w[sl]).T
            gg[k] = score[sl].sum(axis=0)
        Dr = D + ridge * (1.0 + D)
        F = E / Dr[:, :, None]                         # D^-1 E
        H = H - np.einsum("kmd,kme->mde", F, E)
        gx = gx - np.einsum("kmd,km->md", F, gg)
    idx = np.arange(d)
    H[:, idx, idx] += ridge * (1.0 + H[:, idx, idx])
    try:
        L = np.linalg.cholesky(H)
        Hinv_ok = True
    except np.linalg.LinAlgError:
        Hinv_ok = False
    if Hinv_ok:
        db = _chol_solve(L, gx)
    else:
        db = np.einsum("mde,me->md", np.linalg.pinv(H), gx)
    dc = None
    if a:
        dc = (gg - np.einsum("kmd,md->km", E, db)) / Dr
    if not want_cov:
        return db, dc, None, None
    Hinv = np.linalg.pinv(H) if not Hinv_ok else _chol_inverse(L)
    var_b = np.einsum("mdd->md", Hinv)
    var_c = None
    if a:
        var_c = 1.0 / Dr + np.einsum("kmd,mde,kme->km", F, Hinv, F)
    return db, dc, var_b, var_c


def _chol_solve(L: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve (L L') x = b for stacks of small systems."""
    y = np.linalg.solve(L, b[..., None])
    return np.linalg.solve(np.swapaxes(L, -1, -2), y)[..., 0]


def _chol_inverse(L: np.ndarray) -> np.ndarray:
    eye = np.broadcast_to(np.eye(L.shape[-1]), L.shape)
    Linv = np.linalg.solve(L, eye)
    return np.swapaxes(Linv, -1, -2) @ Linv


def _irls_chunk(design: _Design, Y: np.ndarray, offset: np.ndarray, alpha: np.ndarray,
                B: np.ndarray, C: np.ndarray, max_iter: int, tol: float, ridge: float,
                max_halving: int = 8, coef_tol: float = 1e-6):
    """Run IRLS with step halving for one chunk of genes (columns of Y).

    Returns B, C, converged, deviance, n_iter, var_b, var_c.
    """
    m = Y.shape[1]
    alpha = np.broadcast_to(alpha, (1, m)) if alpha.ndim == 1 else alpha

    al_full = np.broadcast_to(alpha, (1, m))
    nb_cols = al_full > 0
    safe_al = np.where(nb_cols, al_full, 1.0)
    # deviance = const_j - 2 * kernel_j(mu); const_j depends on y and r only
    const = 2.0 * (xlogy(Y, Y) - np.where(nb_cols, (Y + 1.0 / safe_al) * np.log1p(Y * al_full),
                                            Y)).sum(axis=0)

    def deviance(Bc, Cc, cols):
        eta = design.eta(Bc, Cc, offset if offset.shape[1] == 1 else offset[:, cols])
        np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
        mu = np.exp(eta)
        return const[cols] - 2.0 * loglik_kernel(Y[:, cols], eta, mu, al_full[:, cols]), mu

    # groups in which a gene has no counts: the MLE is -inf; pin at the bound
    zero_group = np.zeros((design.n_groups, m), bool)
    for k, sl in enumerate(design.slices):
        zero_group[k] = ~(Y[sl] > 0).any(axis=0)
    C[zero_group] = -GROUP_COEF_BOUND
    active = np.arange(m)
    dev, mu = deviance(B, C, active)
    converged = np.zeros(m, bool)
    n_iter = np.zeros(m, int)
    for it in range(max_iter):
        if active.size == 0:
            break
        al = alpha[:, active] if alpha.shape[1] == m else alpha
        y = Y[:, active]
        w = mu / (1.0 + al * mu)
        score = w * (y - mu) / np.maximum(mu, 1e-300)
        db, dc, _, _ = _solve_newton(design, w, score, ridge)
        if dc is not None:
            dc[zero_group[:, active]] = 0.0
        Bold, Cold = B[:, active], C[:, active]
        step = np.ones(active.size)
        new_dev = np.full(active.size, np.inf)
        new_mu = np.empty_like(mu)
        todo = np.arange(active.size)
        for _ in range(max_halving + 1):
            Bt = Bold[:, todo] + step[todo] * db[todo].T
            Ct = Cold[:, todo] + step[todo] * dc[:, todo] if dc is not None else Cold[:, todo]
            np.clip(Ct, -GROUP_COEF_BOUND, GROUP_COEF_BOUND, out=Ct)
            dv, mt = deviance(Bt, Ct, active[todo])
            ref = dev[active[todo]]
            ok = np.isfinite(dv) & (dv <= ref + 1e-12 * np.abs(ref) + 1e-10)
            sel = todo[ok]
            B[:, active[sel]] = Bt[:, ok]
            C[:, active[sel]] = Ct[:, ok]
            new_dev[sel] = dv[ok]
            new_mu[:, sel] = mt[:, ok]
            todo = todo[~ok]
            if todo.size == 0:
                break
            step[todo] *= 0.5
        # genes whose step never improved keep the old iterate and are treated as stalled
        if todo.size:
            new_dev[todo] = dev[active[todo]]
            new_mu[:, todo] = mu[:, todo]
        n_iter[active] += 1
        stalled = np.zeros(active.size, bool)
        stalled[todo] = True
        rel = np.abs(dev[active] - new_dev) / (np.abs(new_dev) + 0.1)
        dmax = np.abs(db).max(axis=1) * step
        if dc is not None and dc.shape[0]:
            dmax = np.maximum(dmax, np.abs(dc).max(axis=0) * step)
        conv_now = (rel < tol) & (dmax < coef_tol) & ~stalled
        converged[active[conv_now]] = True
        dev[active] = new_dev
        keep = ~(conv_now | stalled)
        mu = new_mu[:, keep]
        active = active[keep]
    # final covariance at the solution
    eta = design.eta(B, C, offset)
    np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
    mu = np.exp(eta)
    w = mu / (1.0 + alpha * mu)
    score = w * (Y - mu) / np.maximum(mu, 1e-300)
    _, _, var_b, var_c = _solve_newton(design, w, score, 1e-12, want_cov=True)
    return B, C, converged, dev, n_iter, var_b, var_c


def _wls_start(design: _Design, Y: np.ndarray, offset: np.ndarray, ridge: float):
    """Starting values: one weighted least-squares fit of log(y + 0.1) - o (weights y + 0.1)."""
    mu0 = Y + 0.1
    z = np.log(mu0) - offset
    # Newton step from zero coefficients in the working model with weights mu0
    db, dc, _, _ = _solve_newton(design, mu0, mu0 * z, ridge)
    B = db.T.copy()
    C = dc.copy() if dc is not None else np.zeros((0, Y.shape[1]))
    np.clip(C, -GROUP_COEF_BOUND, GROUP_COEF_BOUND, out=C)
    return B, C


# ----------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------
def _dense_columns(Y, cols) -> np.ndarray:
    block = Y[:, cols]
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=float)


def _gene_chunk_size(n: int, chunk_size: int | None) -> int:
    if chunk_size:
        return int(chunk_size)
    return int(max(16, min(4096, _CHUNK_BYTES // (8 * max(n, 1)))))


def fit_glm(Y, X: np.ndarray, A: np.ndarray | None = None, *, family: str = "nb",
            size: np.ndarray | float | None = None, offset: np.ndarray | None = None,
            max_iter: int = 100, tol: float = 1e-8, ridge: float = 1e-10,
            init: np.ndarray | None = None, chunk_size: int | None = None,
            estimate_size: bool | None = None) -> GLMFit:
    """Fit a log-link NB or Poisson GLM for every gene (column of ``Y``).

    Parameters
    ----------
    Y : (n, p) counts, dense or scipy.sparse.
    X : (n, d) dense covariates, intercept included.
    A : (n, a) 0/1 treatment indicators or None.  One-hot ``A`` is handled as groups
        (exact Schur-complement IRLS); a non-one-hot ``A`` is appended to ``X``.
    family : 'nb' or 'poisson'.
    size : NB size per gene (p,) or scalar.  ``None`` with family 'nb' estimates it by
        method of moments (Poisson fit -> MoM -> NB fit -> MoM -> NB fit, SPEC §4.1).
    offset : (n,) per-cell offsets (log size factors).
    max_iter, tol : IRLS cap and relative deviance tolerance.
    ridge : relative damping added to the Hessian diagonal only (does not move the MLE).
    init : (p, d + a) starting coefficients (warm start), optional.

    Returns
    -------
    GLMFit
    """
    if family not in ("nb", "poisson"):
        raise ValueError(f"family must be 'nb' or 'poisson', got {family!r}")
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (cells x covariates), got shape {X.shape}")
    n, p = Y.shape
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {n} cells")
    groups = groups_from_onehot(A)
    n_groups = 0
    if A is not None:
        A = np.asarray(A, dtype=float)
        if A.ndim == 1:
            A = A[:, None]
        if A.shape[0] != n:
            raise ValueError(f"A has {A.shape[0]} rows but Y has {n} cells")
        if groups is None:
            X = np.hstack([X, A])
        else:
            n_groups = A.shape[1]
    d = X.shape[1]
    off = np.zeros(n) if offset is None else np.asarray(offset, dtype=float).ravel()
    if off.shape[0] != n:
        raise ValueError(f"offset has length {off.shape[0]} but Y has {n} cells")

    if family == "nb" and size is None and estimate_size is not False:
        pois = fit_glm(Y, X if groups is None else X, None if groups is None else A,
                       family="poisson", offset=off, max_iter=min(max_iter, 5), tol=1e-6,
                       ridge=ridge, chunk_size=chunk_size)
        size = mom_size(Y, pois, X, A if groups is not None else None, off)
        nb1 = fit_glm(Y, X, A if groups is not None else None, family="nb", size=size,
                      offset=off, max_iter=min(max_iter, 10), tol=1e-6, ridge=ridge,
                      init=pois.coef, chunk_size=chunk_size)
        size = mom_size(Y, nb1, X, A if groups is not None else None, off)
        init = nb1.coef
    if family == "poisson":
        alpha_all = np.zeros(p)
    else:
        alpha_all = np.broadcast_to(_alpha_from_size(size), (p,)).astype(float)

    scales = _column_scales(X)
    design = _Design.build(X / scales, groups, n_groups)
    Xo = off[design.order][:, None]
    q = d + n_groups
    coef = np.zeros((p, q))
    se = np.full((p, q), np.nan)
    converged = np.zeros(p, bool)
    dev = np.zeros(p)
    n_iter = np.zeros(p, int)
    step = _gene_chunk_size(n, chunk_size)
    for start in range(0, p, step):
        cols = np.arange(start, min(p, start + step))
        Yc = _dense_columns(Y, cols)[design.order]
        if init is not None:
            B = (np.asarray(init, float)[cols, :d] * scales).T.copy()
            C = np.asarray(init, float)[cols, d:].T.copy()
        else:
            B, C = _wls_start(design, Yc, Xo, ridge=1e-8)
        B, C, conv, dv, it, var_b, var_c = _irls_chunk(
            design, Yc, Xo, alpha_all[cols][None, :], B, C, max_iter, tol, ridge)
        coef[cols, :d] = (B.T / scales)
        se[cols, :d] = np.sqrt(np.maximum(var_b, 0)) / scales
        if n_groups:
            coef[cols, d:] = C.T
            se[cols, d:] = np.sqrt(np.maximum(var_c.T, 0))
        converged[cols], dev[cols], n_iter[cols] = conv, dv, it
    size_out = np.where(alpha_all > 0, 1.0 / np.where(alpha_all > 0, alpha_all, 1), np.inf)
    return GLMFit(coef=coef, se=se, size=size_out, converged=converged, deviance=dev,
                  n_iter=n_iter, n_covariates=d, family=family)


def _iter_fitted_means(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
                       offset: np.ndarray, chunk_size: int | None = None):
    """Yield (cols, y, mu) chunks of observed counts and fitted means."""
    n, p = Y.shape
    step = _gene_chunk_size(n, chunk_size)
    for start in range(0, p, step):
        cols = np.arange(start, min(p, start + step))
        eta = X @ fit.coef[cols, :fit.n_covariates].T + offset[:, None]
        if A is not None and fit.coef.shape[1] > fit.n_covariates:
            eta += A @ fit.coef[cols, fit.n_covariates:].T
        np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
        yield cols, _dense_columns(Y, cols), np.exp(eta)


def mom_size(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
             offset: np.ndarray) -> np.ndarray:
    """Method-of-moments NB size per gene from fitted means (SPEC §4.1 step 3-4).

    alpha_j = sum_i [(y - mu)^2 - y] / mu^2 / (n - q), clipped to [1e-8, 100]; size = 1/alpha.
    """
    n, p = Y.shape
    q = fit.coef.shape[1]
    alpha = np.empty(p)
    for cols, y, mu in _iter_fitted_means(Y, fit, X, A, offset):
        num = ((y - mu) ** 2 - y) / np.maximum(mu * mu, 1e-10)
        alpha[cols] = num.sum(axis=0) / max(n - q, 1)
    alpha = np.where(np.isfinite(alpha), alpha, 1e-8)
    alpha = np.clip(alpha, 1e-8, 100.0)
    size = 1.0 / alpha
    zero = np.asarray((Y != 0).sum(axis=0)).ravel() == 0
    size[zero] = 1.0
    return size


def estimate_dispersion(Y, X: np.ndarray, A: np.ndarray | None = None,
                        offset: np.ndarray | None = None, max_iter: int = 50) -> np.ndarray:
    """NB size r_j per gene by the MoM recipe of SPEC §4.1 on design ``[X | A]``."""
    off = np.zeros(Y.shape[0]) if offset is None else np.asarray(offset, float)
    fit = fit_glm(Y, X, A, family="nb", size=None, offset=off, max_iter=max_iter)
    return fit.size


def glm_deviance_residuals(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None = None,
                           offset: np.ndarray | None = None) -> np.ndarray:
    """n x p deviance residuals of a fitted GLM."""
    n, p = Y.shape
    off = np.zeros(n) if offset is None else np.asarray(offset, float)
    out = np.empty((n, p))
    alpha = _alpha_from_size(fit.size)
    for cols, y, mu in _iter_fitted_means(Y, fit, X, A, off):
        out[:, cols] = deviance_residuals(y, mu, alpha[cols][None, :])
    return out
