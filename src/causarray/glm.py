"""Count-GLM engine: negative-binomial and Poisson log-link GLMs for all genes at once.

Model, for cell i and gene j::

    y_ij ~ NB(mu_ij, size r_j)   (Var = mu + mu^2 / r_j;  Poisson when r_j = inf)
    log mu_ij = o_i + x_i' b_j + c_{j, g(i)}

where ``x_i`` are dense covariates (the intercept included), ``g(i)`` is the
perturbation group of cell i (no group for controls) and ``o_i`` an offset (log size
factor).  Group indicators are disjoint, so the group block of the Fisher information
``G'WG`` is diagonal; each Newton step is solved through the Schur complement of that
block (docs/math.md#schur-complement-for-one-hot-treatments), which costs ``O(n p d^2)``
instead of ``O(n p (d + a)^2)`` and gives the exact IRLS solution.

Two solvers share this module:

* **saturated groups** -- the design is an intercept plus one-hot groups with a
  non-empty control set.  The likelihood then separates into one-parameter problems,
  one per (gene, cell set): the Poisson MLE is closed form (log of the set's count sum
  over its size-factor sum) and the NB MLE is a safeguarded one-dimensional Newton
  iteration on a strictly concave function.  No Gram matrices are formed.
* **Schur IRLS** -- any other design (dense covariates, optionally with one-hot
  groups): Newton steps with step halving on the deviance, vectorised over a chunk of
  genes; every Gram block of a chunk is one BLAS call (in float32 when there are more
  than 8 covariates -- the scores stay float64, so the fixed point is unchanged).  The
  Hessian is the observed information (quadratic convergence for the non-canonical NB
  link), with Fisher scoring per gene after a step that needed halving and a cap on the
  step length; convergence is checked with the next Newton step computed from the new
  score and the previous Hessian, so the confirming iteration forms no Gram matrix.

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
from scipy.special import gammaln, xlogy

from ._validation import (
    check_family,
    check_matrix_2d,
    check_nb_alpha,
    check_offset,
    check_rows,
    check_shape,
)

logger = logging.getLogger("causarray")

ETA_MIN, ETA_MAX = -30.0, 20.0
MU_MIN, MU_MAX = float(np.exp(ETA_MIN)), float(np.exp(ETA_MAX))
#: Group coefficients of groups without any count are pinned at ``-GROUP_COEF_BOUND``.
GROUP_COEF_BOUND = 30.0
_CHUNK_BYTES = 8 * 2**20      # working memory per gene chunk and temporary (other modules)
_FIT_CHUNK_BYTES = 4 * 2**20  # the engine's own chunks: keeps its temporaries cache-friendly
_COEF_TOL = 1e-6              # max |coefficient step| for convergence
_MAX_HALVING = 8
_MAX_NEWTON_STEP = 5.0        # largest change of one coefficient in one Newton step


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


def _kernel_sums(y: np.ndarray, eta: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Mean-dependent part of the NB / Poisson log-likelihood, summed over cells.

    NB: sum_i [y eta - (y + r) log1p(mu / r)];  Poisson: sum_i [y eta - mu].  The
    constant part is :func:`causarray.factor_model.loglik_constants`.  ``eta`` is used
    as scratch (overwritten); alpha is (m,).

    Uses sum_i (y + r) log1p(alpha mu) = sum_i y L + (sum_i L) / alpha, L = log1p(alpha mu),
    so that the only temporary is L.
    """
    nb = alpha > 0
    if not nb.any():
        return np.einsum("ij,ij->j", y, eta) - mu.sum(axis=0)
    L = np.multiply(mu, alpha, out=np.empty_like(mu))
    np.log1p(L, out=L)
    tail = L.sum(axis=0)
    np.subtract(eta, L, out=eta)
    del L
    out = np.einsum("ij,ij->j", y, eta)
    if nb.all():
        out -= tail / alpha
    else:
        safe = np.where(nb, alpha, 1.0)
        out -= np.where(nb, tail / safe, mu.sum(axis=0))
    return out


def _deviance_constant(y: np.ndarray, alpha: np.ndarray, ylogy: np.ndarray) -> np.ndarray:
    """Per-gene ``dev + 2 * kernel``: 2 sum_i [y log y - (y + r) log1p(y / r)] (NB) or
    2 sum_i [y log y - y] (Poisson); ``ylogy`` = sum_i y log y (it does not depend on r)."""
    nb = alpha > 0
    if not nb.any():
        return 2.0 * (ylogy - y.sum(axis=0))
    L = np.multiply(y, alpha, out=np.empty_like(y))
    np.log1p(L, out=L)
    tail = np.einsum("ij,ij->j", y, L)
    safe = np.where(nb, alpha, 1.0)
    tail += L.sum(axis=0) / safe
    del L
    if not nb.all():
        tail = np.where(nb, tail, y.sum(axis=0))
    return 2.0 * (ylogy - tail)


def _sum_ylogy(y: np.ndarray) -> np.ndarray:
    """Per-column sum of y log y (0 log 0 = 0), faster than ``xlogy`` for count matrices."""
    L = np.maximum(y, 1e-300)
    np.log(L, out=L)
    return np.einsum("ij,ij->j", y, L)


def _working_weights(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray,
                     observed: bool | np.ndarray = False):
    """Newton weights and scores of the log-link NB / Poisson likelihood.

    Scores ``(y - mu) / (1 + alpha mu)``; weights: Fisher ``mu / (1 + alpha mu)`` or, with
    ``observed`` (a bool or one per column), the observed information
    ``mu (1 + alpha y) / (1 + alpha mu)^2`` (always positive: the NB log-likelihood is
    concave in the linear predictor), which makes the Newton iteration quadratically
    convergent for the non-canonical NB link.
    """
    resid = np.subtract(y, mu)
    if not np.any(alpha > 0):
        return mu.copy(), resid
    t = np.multiply(mu, alpha, out=np.empty_like(mu))
    t += 1.0
    np.reciprocal(t, out=t)
    resid *= t
    np.multiply(mu, t, out=t)
    observed = np.broadcast_to(observed, alpha.shape)
    if observed.any():   # t (1 + alpha y)/(1 + alpha mu) = t (1 + alpha resid)
        u = np.multiply(resid, np.where(observed, alpha, 0.0))
        u += 1.0
        t *= u
    return t, resid


def _scores(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Scores ``(y - mu) / (1 + alpha mu)`` alone (see ``_working_weights``)."""
    resid = np.subtract(y, mu)
    if np.any(alpha > 0):
        t = np.multiply(mu, alpha)
        t += 1.0
        resid /= t
    return resid


def _mom_alpha(y: np.ndarray, mu: np.ndarray, dof: int) -> np.ndarray:
    """Method-of-moments dispersion per gene (docs/math.md#nb-dispersion), before clipping.

    alpha_j = sum_i [(y - mu)^2 - y] / max(mu^2, 1e-10) / max(dof, 1); non-finite -> 1e-8.
    """
    num = np.subtract(y, mu)
    num *= num
    num -= y
    den = np.multiply(mu, mu)
    np.maximum(den, 1e-10, out=den)
    num /= den
    del den
    alpha = num.sum(axis=0) / max(dof, 1)
    alpha = np.clip(alpha, 1e-8, 1e6)
    alpha[~np.isfinite(alpha)] = 1e-8
    return alpha


def _size_from_mom(alpha: np.ndarray, all_zero: np.ndarray) -> np.ndarray:
    """alpha clipped to [1e-8, 100], size = 1/alpha, 1 for all-zero genes.

    See docs/math.md#nb-dispersion.
    """
    size = 1.0 / np.clip(alpha, 1e-8, 100.0)
    size[all_zero | ~np.isfinite(size)] = 1.0
    return size


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


@dataclass
class _Design:
    """Preconditioned dense covariates plus group structure, rows sorted by group.

    Rows are ordered group 0, group 1, ..., group a-1, then the control cells.
    """

    X: np.ndarray              # n x d, preconditioned, sorted rows
    scales: np.ndarray         # d, column scales (coef_original = coef_scaled / scales)
    n_groups: int
    bounds: np.ndarray         # a + 2 row boundaries: group k = [bounds[k], bounds[k+1])
    order: np.ndarray          # permutation sorting rows by group (controls last)
    offset: np.ndarray         # n, sorted offsets
    saturated: bool            # intercept + one-hot groups with non-empty sets
    bin_cols: np.ndarray       # covariate columns taking exactly two values, one of them 0
    _XXG: np.ndarray | None = None
    _XXG32: np.ndarray | None = None
    _XG: np.ndarray | None = None
    _XoG: np.ndarray | None = None

    @classmethod
    def build(cls, X: np.ndarray, groups: np.ndarray | None, n_groups: int,
              offset: np.ndarray) -> _Design:
        n = X.shape[0]
        if groups is None:
            groups = np.full(n, -1, dtype=np.int64)
        key = np.where(groups < 0, n_groups, groups)
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=n_groups + 1)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        scales = _column_scales(X)
        Xs = np.ascontiguousarray(X[order] / scales)
        saturated = bool(n_groups > 0 and X.shape[1] == 1 and np.ptp(X[:, 0]) == 0
                         and X[0, 0] != 0 and (counts > 0).all())
        bin_cols = np.array([j for j in range(X.shape[1]) if np.ptp(X[:, j]) > 0
                             and np.unique(X[:, j]).size == 2 and (X[:, j] == 0).any()], int)
        return cls(Xs, scales, n_groups, bounds, order, np.ascontiguousarray(offset[order]),
                   saturated, bin_cols)

    @property
    def d(self) -> int:
        return self.X.shape[1]

    @property
    def slices(self) -> list[slice]:
        """Row slices of the groups (controls excluded)."""
        return [slice(self.bounds[k], self.bounds[k + 1]) for k in range(self.n_groups)]

    @property
    def set_slices(self) -> list[slice]:
        """Row slices of the groups followed by the control cells."""
        return [slice(self.bounds[k], self.bounds[k + 1]) for k in range(self.n_groups + 1)]

    def _onehot(self) -> np.ndarray:
        G = np.zeros((self.X.shape[0], self.n_groups))
        for k, sl in enumerate(self.slices):
            G[sl, k] = 1.0
        return G

    @property
    def XXG(self) -> np.ndarray:
        """``[sym_outer(X) | G]``: one GEMM with the weights gives X'WX and diag(G'WG)."""
        if self._XXG is None:
            self._XXG = np.ascontiguousarray(np.hstack([sym_outer(self.X), self._onehot()]))
        return self._XXG

    @property
    def XXG32(self) -> np.ndarray:
        """``XXG`` in single precision, for the Hessians of the Newton iterations."""
        if self._XXG32 is None:
            self._XXG32 = self.XXG.astype(np.float32)
        return self._XXG32

    @property
    def XG(self) -> np.ndarray:
        """``[X | G]``: one GEMM with the scores gives the whole gradient."""
        if self._XG is None:
            self._XG = np.ascontiguousarray(np.hstack([self.X, self._onehot()]))
        return self._XG

    @property
    def XoG(self) -> np.ndarray:
        """``[X | o | G]``: one GEMM gives the linear predictor offset included."""
        if self._XoG is None:
            self._XoG = np.ascontiguousarray(
                np.hstack([self.X, self.offset[:, None], self._onehot()]))
        return self._XoG

    def linear_predictor(self, B: np.ndarray, C: np.ndarray) -> np.ndarray:
        """Clipped ``o + X B + G C`` for a chunk; B (d x m), C (a x m)."""
        coef = np.vstack([B, np.ones((1, B.shape[1])), C])
        eta = self.XoG @ coef
        return np.clip(eta, ETA_MIN, ETA_MAX, out=eta)


# ----------------------------------------------------------------------------------
# Schur-complement IRLS (dense covariates, optional one-hot groups)
# ----------------------------------------------------------------------------------
def _group_sums(design: _Design, arr: np.ndarray) -> np.ndarray:
    """Per-group column sums (a x m) of a row-sorted n x m array."""
    out = np.zeros((design.n_groups, arr.shape[1]))
    for k, sl in enumerate(design.slices):
        if sl.stop > sl.start:
            arr[sl].sum(axis=0, out=out[k])
    return out


@dataclass
class _NewtonSystem:
    """Schur-reduced Newton matrix of a chunk: covariate block ``S`` and group terms."""

    S: np.ndarray            # m x d x d Schur complement (damped)
    E: np.ndarray            # a x m x d cross blocks X'W G (0 for pinned groups)
    Dr: np.ndarray           # a x m damped group diagonal (1 for pinned groups)


def _gram(design: _Design, w: np.ndarray, single: bool) -> np.ndarray:
    """``w' [sym_outer(X) | G]`` (m x (d(d+1)/2 + a)): every X'WX and diag(G'WG) at once.

    ``single`` forms it in float32 (twice the GEMM speed).  Used only for the Hessians of
    the Newton iterations: the scores stay float64, so the fixed point -- the MLE -- is
    unchanged and only the (already quadratic) convergence rate is touched.
    """
    if single:
        return (w.astype(np.float32).T @ design.XXG32).astype(np.float64)
    return w.T @ design.XXG


def _gradient(design: _Design, resid: np.ndarray) -> np.ndarray:
    """Score ``[X | G]' resid`` per gene (m x (d + a))."""
    return resid.T @ design.XG


def _newton_system(design: _Design, w: np.ndarray, pinned: np.ndarray, ridge: float,
                   single: bool = False, pinb: np.ndarray | None = None) -> _NewtonSystem:
    """Schur-reduced Newton matrix for every gene of a chunk from weights ``w`` (n x m).

    Pinned groups (a x m) and pinned covariates (``pinb``, m x d) are held fixed: they
    drop out of the system (identity rows).
    """
    d, a = design.d, design.n_groups
    m = w.shape[1]
    nsym = d * (d + 1) // 2
    WG = _gram(design, w, single)                          # m x (nsym + a)
    H = sym_unpack(WG[:, :nsym], d)
    if a:
        D = WG[:, nsym:].T.copy()                          # a x m
        E = np.empty((a, m, d))
        for k, sl in enumerate(design.slices):
            np.matmul(w[sl].T, design.X[sl], out=E[k])
        if pinned.any():
            E[pinned] = 0.0
        if pinb is not None:
            E[:, pinb] = 0.0
        Dr = D + ridge * (1.0 + D)
        Dr[pinned] = 1.0
        F = (E / Dr[:, :, None]).transpose(1, 2, 0)        # m x d x a
        H -= F @ E.transpose(1, 0, 2)
    else:
        E = np.zeros((0, m, d))
        Dr = np.ones((0, m))
    idx = np.arange(d)
    H[:, idx, idx] += ridge * (1.0 + np.abs(H[:, idx, idx]))
    if pinb is not None and pinb.any():
        H[pinb] = 0.0
        H.transpose(0, 2, 1)[pinb] = 0.0
        g_idx, j_idx = np.nonzero(pinb)
        H[g_idx, j_idx, j_idx] = 1.0
    return _NewtonSystem(H, E, Dr)


def _batched_solve(S: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve S_j x_j = b_j for a stack of small systems; least squares where singular."""
    try:
        return np.linalg.solve(S, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        out = np.empty_like(b)
        for j in range(S.shape[0]):
            out[j] = np.linalg.lstsq(S[j], b[j], rcond=None)[0]
        return out


def _batched_inverse(S: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(S)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(S)


def _newton_step(sys_: _NewtonSystem, g: np.ndarray, pinned: np.ndarray,
                 pinb: np.ndarray | None = None):
    """Newton step (db: m x d, dc: a x m) for the score ``g`` (m x (d + a)).

    Block elimination of the diagonal group block: S db = g_x - E' D^-1 g_g, then
    dc = D^-1 (g_g - E db).  Pinned groups get dc = 0, pinned covariates db = 0.
    """
    d = sys_.S.shape[-1]
    gx = g[:, :d] if pinb is None else np.where(pinb, 0.0, g[:, :d])
    gg = np.where(pinned, 0.0, g[:, d:].T)
    if gg.shape[0]:
        gx = gx - np.einsum("kmd,km->md", sys_.E, gg / sys_.Dr)
    db = _batched_solve(sys_.S, gx)
    dc = (gg - np.einsum("kmd,md->km", sys_.E, db)) / sys_.Dr
    return db, dc


def _step_size(db: np.ndarray, dc: np.ndarray) -> np.ndarray:
    """Largest |coefficient change| per gene."""
    dmax = np.abs(db).max(axis=1) if db.shape[1] else np.zeros(db.shape[0])
    if dc.shape[0]:
        dmax = np.maximum(dmax, np.abs(dc).max(axis=0))
    return dmax


def _covariance_diag(sys_: _NewtonSystem, pinned: np.ndarray, pinb: np.ndarray | None = None):
    """Diagonals of the inverse Fisher information: var_b (m x d), var_c (a x m)."""
    Sinv = _batched_inverse(sys_.S)
    var_b = np.einsum("mdd->md", Sinv)
    if pinb is not None:
        var_b[pinb] = np.inf
    a = sys_.Dr.shape[0]
    if not a:
        return var_b, np.zeros((0, var_b.shape[0]))
    F = (sys_.E / sys_.Dr[:, :, None]).transpose(1, 0, 2)   # m x a x d
    var_c = (1.0 / sys_.Dr + np.einsum("mkd,mkd->km", F @ Sinv, F))
    var_c[pinned] = np.inf
    return var_b, var_c


def _evaluate(design: _Design, y: np.ndarray, alpha: np.ndarray, B: np.ndarray,
              C: np.ndarray, cst: np.ndarray):
    """Fitted means and deviance of a chunk at coefficients (B, C)."""
    eta = design.linear_predictor(B, C)
    mu = np.exp(eta)
    dev = cst - 2.0 * _kernel_sums(y, eta, mu, alpha)
    return mu, dev


def _irls_chunk(design: _Design, Y: np.ndarray, alpha: np.ndarray, B: np.ndarray,
                C: np.ndarray, pinned: np.ndarray, skip: np.ndarray, ylogy: np.ndarray,
                max_iter: int, tol: float, ridge: float, compute_se: bool,
                coef_tol: float = _COEF_TOL, pinb: np.ndarray | None = None):
    """Newton iteration with step halving for one chunk of genes (columns of row-sorted ``Y``).

    Each iteration: observed-information weights and scores at the current iterate (one
    fused pass), the Schur-reduced Newton step, one evaluation of the deviance at the
    trial point (halving the step for genes whose deviance rose).  A gene converges when
    the relative deviance change of its last step is below ``tol`` and the next Newton
    step, computed from the new score and the previous Hessian (so no new Gram matrix is
    formed for the check), is below ``coef_tol``.  ``B`` (d x m) and ``C`` (a x m) are
    updated in place; genes in ``skip`` are not fitted.  Groups in ``pinned`` (a x m) and
    binary covariates in ``pinb`` (m x d) whose cells have no counts are held at
    ``-GROUP_COEF_BOUND`` (their maximum-likelihood estimate is minus infinity).

    Returns converged, deviance, n_iter, var_b (m x d), var_c (a x m).
    """
    m = Y.shape[1]
    C[pinned] = -GROUP_COEF_BOUND
    if pinb is not None:
        if pinb.any():
            val = design.X[np.abs(design.X).argmax(axis=0), np.arange(design.d)]  # v of 0/v
            B.T[pinb] = (-GROUP_COEF_BOUND / np.broadcast_to(val, pinb.shape))[pinb]
        else:
            pinb = None
    cst = _deviance_constant(Y, alpha, ylogy)
    mu, dev = _evaluate(design, Y, alpha, B, C, cst)
    converged = np.zeros(m, bool)
    n_iter = np.zeros(m, int)
    active = np.flatnonzero(~skip)
    if active.size < m:
        Ya, mua, ala = Y[:, active], mu[:, active], alpha[active]
    else:
        Ya, mua, ala = Y, mu, alpha
    del mu
    single = design.d > 8
    sys_prev = None
    rel = np.full(active.size, np.inf)
    # Newton with the observed information; per gene, Fisher scoring (expected
    # information) after a step that needed halving, until a full step settles again:
    # far from the optimum the observed curvature of the NB likelihood can vanish
    fisher = np.zeros(active.size, bool)
    for it in range(max_iter + 1):
        if active.size == 0:
            break
        pin = pinned[:, active]
        pb = None if pinb is None else pinb[active]
        if it < max_iter:
            w, resid = _working_weights(Ya, mua, ala, observed=~fisher)
        else:                          # last pass: only the score, for the convergence check
            w, resid = None, _scores(Ya, mua, ala)
        g = _gradient(design, resid)
        del resid
        if sys_prev is not None:       # convergence check with the previous Hessian
            dbc, dcc = _newton_step(sys_prev, g, pin, pb)
            done = (rel < tol) & (_step_size(dbc, dcc) < coef_tol)
            if done.any():
                # take that last (tiny, quasi-Newton) step too: it cuts the error further
                # at no cost; its deviance change is of the order of its square
                converged[active[done]] = True
                B[:, active[done]] += dbc[done].T
                C[:, active[done]] = np.clip(C[:, active[done]] + dcc[:, done],
                                             -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
                keep = ~done
                active, pin, g, rel = active[keep], pin[:, keep], g[keep], rel[keep]
                fisher = fisher[keep]
                pb = None if pb is None else pb[keep]
                Ya, mua, ala = Ya[:, keep], mua[:, keep], ala[keep]
                w = None if w is None else w[:, keep]
                if active.size == 0:
                    break
        if it == max_iter:
            break
        sys_ = _newton_system(design, w, pin, ridge, single=single, pinb=pb)
        del w
        db, dc = _newton_step(sys_, g, pin, pb)
        # trust region: no coefficient moves by more than _MAX_NEWTON_STEP at once (far
        # below its optimum a log-mean has almost no curvature and Newton overshoots)
        big = _step_size(db, dc)
        shrink = np.minimum(1.0, _MAX_NEWTON_STEP / np.maximum(big, 1e-300))
        db *= shrink[:, None]
        dc *= shrink
        B0, C0 = B[:, active], C[:, active]
        Bt = B0 + db.T
        Ct = np.clip(C0 + dc, -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
        dev0 = dev[active]
        # deviance = constant - 2 kernel: its rounding error scales with the constant
        slack = 1e-10 + 1e-12 * np.abs(dev0) + 1e-13 * np.abs(cst[active])
        mut, devt = _evaluate(design, Ya, ala, Bt, Ct, cst[active])
        ok = np.isfinite(devt) & (devt <= dev0 + slack)
        step = np.ones(active.size)
        bad = np.flatnonzero(~ok)
        for _h in range(_MAX_HALVING):
            if bad.size == 0:
                break
            step[bad] *= 0.5
            Bt[:, bad] = B0[:, bad] + step[bad] * db[bad].T
            Ct[:, bad] = np.clip(C0[:, bad] + step[bad] * dc[:, bad],
                                 -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
            mub, devb = _evaluate(design, Ya[:, bad], ala[bad], Bt[:, bad], Ct[:, bad],
                                  cst[active[bad]])
            okb = np.isfinite(devb) & (devb <= dev0[bad] + slack[bad])
            acc = bad[okb]
            mut[:, acc] = mub[:, okb]
            devt[acc] = devb[okb]
            bad = bad[~okb]
        good = np.ones(active.size, bool)
        good[bad] = False              # never improved: keep the previous iterate (stalled)
        B[:, active[good]] = Bt[:, good]
        C[:, active[good]] = Ct[:, good]
        n_iter[active] += 1
        dev[active[good]] = devt[good]
        rel = np.abs(dev0 - devt) / (np.abs(devt) + 0.1)
        size = _step_size(db, dc)
        # a full Newton step below the tolerance leaves an error of its square: converged;
        # so is a gene whose tiny Newton step cannot lower the deviance beyond rounding
        conv_now = (good & (rel < tol) & (step == 1.0) & (size < coef_tol)) | (
            ~good & (size < 10 * coef_tol))
        converged[active[conv_now]] = True
        # a stalled Newton step is retried as a Fisher-scoring step from the same iterate
        retry = ~good & ~fisher & ~conv_now
        if retry.any():
            mut[:, retry] = mua[:, retry]
            rel[retry] = np.inf
        fisher = np.where(step * shrink < 1.0, True, np.where(rel < 1e-3, False, fisher))
        keep = (good | retry) & ~conv_now
        if keep.all():
            mua, sys_prev = mut, sys_
        else:
            active, rel, fisher = active[keep], rel[keep], fisher[keep]
            Ya, mua, ala = Ya[:, keep], mut[:, keep], ala[keep]
            sys_prev = _NewtonSystem(sys_.S[keep], sys_.E[:, keep], sys_.Dr[:, keep])
        del mut, sys_
    del Ya, mua
    var_b = var_c = None
    if compute_se:
        fit = np.flatnonzero(~skip)
        var_b = np.full((m, design.d), np.nan)
        var_c = np.full((design.n_groups, m), np.nan)
        if fit.size:
            eta = design.linear_predictor(B[:, fit], C[:, fit])
            mu = np.exp(eta, out=eta)
            w = mu if not np.any(alpha[fit] > 0) else mu / (1.0 + alpha[fit] * mu)
            pbf = None if pinb is None else pinb[fit]
            sys_ = _newton_system(design, w, pinned[:, fit], 1e-12, pinb=pbf)
            del w, mu, eta
            var_b[fit], var_c[:, fit] = _covariance_diag(sys_, pinned[:, fit], pbf)
        var_b[skip] = np.inf
        var_c[:, skip] = np.inf
    return converged, dev, n_iter, var_b, var_c


def _wls_start(design: _Design, Y: np.ndarray, pinned: np.ndarray):
    """Starting values: one weighted least-squares fit of log(y + 0.1) - o (weights y + 0.1)."""
    mu0 = Y + 0.1
    z = np.log(mu0)
    z -= design.offset[:, None]
    z *= mu0
    sys_ = _newton_system(design, mu0, pinned, 1e-8)
    db, dc = _newton_step(sys_, _gradient(design, z), pinned)
    C = np.clip(dc, -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
    return db.T.copy(), C


def _group_mean_start(design: _Design, Y: np.ndarray):
    """Start at the Poisson MLE of intercept + groups (closed form), other coefficients 0.

    Returns None when ``X`` has no constant column or there are no control cells.
    """
    const = np.flatnonzero((np.ptp(design.X, axis=0) == 0) & (design.X[0] != 0))
    a = design.n_groups
    if const.size == 0 or design.bounds[a] == design.bounds[a + 1]:
        return None
    s = np.exp(design.offset)
    sums = np.empty((a + 1, Y.shape[1]))
    ssum = np.empty(a + 1)
    for k, r in enumerate(design.set_slices):
        Y[r].sum(axis=0, out=sums[k])
        ssum[k] = s[r].sum()
    with np.errstate(divide="ignore"):
        theta = np.log(np.maximum(sums, 0.5) / np.maximum(ssum, 1e-300)[:, None])
    B = np.zeros((design.d, Y.shape[1]))
    B[const[0]] = theta[-1] / design.X[0, const[0]]
    C = np.clip(theta[:-1] - theta[-1], -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
    return B, C


def _schur_chunk(design: _Design, Y: np.ndarray, alpha: np.ndarray | None,
                 init: np.ndarray | None, *, max_iter: int, tol: float, ridge: float,
                 compute_se: bool):
    """Fit one row-sorted chunk with the Schur IRLS; alpha None = MoM recipe
    (docs/math.md#nb-dispersion)."""
    n, m = Y.shape
    d, a = design.d, design.n_groups
    all_zero = ~(Y > 0).any(axis=0)
    pinned = (_group_sums(design, Y) == 0) & ~all_zero[None, :]
    pinb = None
    if design.bin_cols.size:
        hit = (design.X[:, design.bin_cols] != 0).astype(float).T @ Y     # nb x m
        pinb = np.zeros((m, d), bool)
        pinb[:, design.bin_cols] = (hit == 0).T & ~all_zero[:, None]
    ylogy = _sum_ylogy(Y)
    if init is not None:
        B = (init[:, :d] * design.scales).T.copy()
        C = init[:, d:].T.copy()
    else:
        start = _group_mean_start(design, Y)
        B, C = _wls_start(design, Y, pinned) if start is None else start
    _pin_all_zero(design, B, C, all_zero)
    if alpha is None:
        zeros = np.zeros(m)
        _irls_chunk(design, Y, zeros, B, C, pinned, all_zero, ylogy, min(max_iter, 5), 1e-6,
                    ridge, False, pinb=pinb)
        dof = n - d - a
        mu = np.exp(design.linear_predictor(B, C))
        alpha = np.clip(_mom_alpha(Y, mu, dof), 1e-8, 100.0)
        del mu
        _irls_chunk(design, Y, alpha, B, C, pinned, all_zero, ylogy, min(max_iter, 10), 1e-6,
                    ridge, False, pinb=pinb)
        mu = np.exp(design.linear_predictor(B, C))
        size = _size_from_mom(_mom_alpha(Y, mu, dof), all_zero)
        del mu
        alpha = 1.0 / size
    conv, dev, n_iter, var_b, var_c = _irls_chunk(
        design, Y, alpha, B, C, pinned, all_zero, ylogy, max_iter, tol, ridge, compute_se,
        pinb=pinb)
    return B, C, alpha, conv, dev, n_iter, var_b, var_c


def _pin_all_zero(design: _Design, B: np.ndarray, C: np.ndarray, all_zero: np.ndarray) -> None:
    """Genes without counts: mean pinned at the lower clip (intercept column if any)."""
    if not all_zero.any():
        return
    B[:, all_zero] = 0.0
    C[:, all_zero] = -GROUP_COEF_BOUND
    const = np.flatnonzero((np.ptp(design.X, axis=0) == 0) & (design.X[0] != 0))
    if const.size:
        c0 = const[0]
        B[c0, all_zero] = (ETA_MIN - design.offset.max()) / design.X[0, c0]


# ----------------------------------------------------------------------------------
# saturated groups: intercept + one-hot groups (separable one-parameter problems)
# ----------------------------------------------------------------------------------
@dataclass
class _SetStats:
    """Per-set sufficient statistics of a chunk (sets = groups, then controls)."""

    Sy: np.ndarray           # K x m count sums
    Ss: np.ndarray           # K size-factor sums
    o_lo: np.ndarray         # K min offset
    o_hi: np.ndarray         # K max offset
    pinned: np.ndarray       # K x m, set without counts
    all_zero: np.ndarray     # m


def _set_stats(design: _Design, Y: np.ndarray, s: np.ndarray) -> _SetStats:
    sl = design.set_slices
    K = len(sl)
    Sy = np.empty((K, Y.shape[1]))
    for k, r in enumerate(sl):
        Y[r].sum(axis=0, out=Sy[k])
    o = design.offset
    Ss = np.array([s[r].sum() for r in sl])
    pinned = Sy == 0
    return _SetStats(Sy, Ss, np.array([o[r].min() for r in sl]),
                     np.array([o[r].max() for r in sl]), pinned, pinned.all(axis=0))


def _fill_pinned(theta: np.ndarray, st: _SetStats) -> np.ndarray:
    """Set log-means of sets without counts: groups at control - bound; a control set
    without counts at (largest group) - bound; genes without counts at the lower clip."""
    th = theta.copy()
    ctrl_pin = st.pinned[-1] & ~st.all_zero
    if ctrl_pin.any():
        th[-1, ctrl_pin] = np.where(st.pinned[:-1, ctrl_pin], -np.inf,
                                    th[:-1, ctrl_pin]).max(axis=0) - GROUP_COEF_BOUND
    th[-1, st.all_zero] = ETA_MIN - st.o_hi.max()
    grp = st.pinned[:-1]
    th[:-1][grp] = np.broadcast_to(th[-1], grp.shape)[grp] - GROUP_COEF_BOUND
    return th


def _set_means(design: _Design, s: np.ndarray, theta: np.ndarray, st: _SetStats,
               free: np.ndarray | None = None) -> np.ndarray:
    """mu_ij = s_i exp(theta_{set(i), j}), clipped to [e^-30, e^20] where needed.

    ``free`` (K x m) restricts the clipping check to those sets (the means of pinned sets
    are then left unclipped: they do not enter the Newton iteration).
    """
    with np.errstate(under="ignore"):
        eth = np.exp(theta)
    mu = np.empty((s.shape[0], theta.shape[1]))
    for k, r in enumerate(design.set_slices):
        np.multiply(s[r, None], eth[k], out=mu[r])
    hi = theta + st.o_hi[:, None]
    lo = theta + st.o_lo[:, None]
    if free is not None:
        hi, lo = hi[free], lo[free]
    if hi.size and (hi.max() > ETA_MAX or lo.min() < ETA_MIN):
        np.clip(mu, MU_MIN, MU_MAX, out=mu)
    return mu


def _set_newton(design: _Design, Y: np.ndarray, s: np.ndarray, theta: np.ndarray,
                alpha: np.ndarray, st: _SetStats, max_iter: int,
                coef_tol: float = _COEF_TOL):
    """Safeguarded Newton on every (set, gene) log-mean; theta (K x m) updated in place.

    Each one-parameter NB log-likelihood is strictly concave in theta, so its score is
    decreasing: the iterate keeps a bracket [lo, hi] around the root and bisects when a
    Newton step leaves it.  A gene converges when its largest step is below ``coef_tol``,
    or when the quadratic convergence of Newton's method predicts the next step,
    |step_k|^3 / |step_{k-1}|^2, to be below ``coef_tol / 100`` (which saves the final,
    confirming iteration).  Returns converged (m,), n_iter (m,).
    """
    K, m = theta.shape
    free = ~st.pinned
    theta[st.pinned] = 0.0          # placeholder: pinned sets are masked out below
    active = np.flatnonzero(~st.all_zero)
    converged = np.zeros(m, bool)
    n_iter = np.zeros(m, int)
    lo = np.full((K, m), -np.inf)
    hi = np.full((K, m), np.inf)
    slices = design.set_slices
    Ya, ala = (Y, alpha) if active.size == m else (Y[:, active], alpha[active])
    prev = np.full((K, active.size), np.inf)          # previous |step| (inf: none yet)
    for _ in range(max_iter):
        if active.size == 0:
            break
        th = theta[:, active]
        fr = free[:, active]
        mu = _set_means(design, s, th, st, fr)
        t = np.multiply(mu, ala)
        t += 1.0
        np.reciprocal(t, out=t)
        resid = np.subtract(Ya, mu)
        resid *= t
        np.multiply(mu, t, out=mu)                          # mu now holds w
        del t
        score = np.empty((K, active.size))
        info = np.empty((K, active.size))
        cross = np.empty((K, active.size))
        for k, r in enumerate(slices):
            resid[r].sum(axis=0, out=score[k])
            mu[r].sum(axis=0, out=info[k])
            cross[k] = np.einsum("ij,ij->j", mu[r], resid[r])
        del mu, resid
        # observed information: sum mu (1 + alpha y)/(1 + alpha mu)^2 = sum w + alpha sum w r
        hess = info + ala * cross
        hess = np.where(hess > 0, hess, info)
        hess[~fr] = 1.0
        step = np.clip(score / hess, -_MAX_NEWTON_STEP, _MAX_NEWTON_STEP)
        lo_a, hi_a = lo[:, active], hi[:, active]
        lo_a = np.where((score > 0) & fr, np.maximum(lo_a, th), lo_a)
        hi_a = np.where((score < 0) & fr, np.minimum(hi_a, th), hi_a)
        prop = th + step
        outside = (prop < lo_a) | (prop > hi_a)
        both = np.isfinite(lo_a) & np.isfinite(hi_a)
        with np.errstate(invalid="ignore"):
            prop = np.where(outside & both, 0.5 * (lo_a + hi_a), prop)
        prop = np.where(fr, prop, th)
        absstep = np.where(fr, np.abs(prop - th), 0.0)
        newton = ~(outside & both)                    # a bisection step predicts nothing
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            nxt = np.where(absstep == 0, 0.0, absstep ** 3 / prev ** 2)
        nxt = np.where((newton & np.isfinite(prev)) | ~fr, nxt, np.inf)
        theta[:, active] = prop
        lo[:, active], hi[:, active] = lo_a, hi_a
        n_iter[active] += 1
        done = (absstep.max(axis=0) < coef_tol) | (
            (absstep.max(axis=0) < 1e-3) & (nxt.max(axis=0) < 0.01 * coef_tol))
        converged[active[done]] = True
        prev = np.where(newton, absstep, np.inf)
        if done.any():
            keep = ~done
            active, prev = active[keep], prev[:, keep]
            Ya, ala = Ya[:, keep], ala[keep]
    return converged, n_iter


def _set_mom(design: _Design, Y: np.ndarray, s: np.ndarray, theta: np.ndarray,
             st: _SetStats, dof: int) -> np.ndarray:
    mu = _set_means(design, s, _fill_pinned(theta, st), st)
    return _mom_alpha(Y, mu, dof)


def _saturated_chunk(design: _Design, Y: np.ndarray, alpha: np.ndarray | None,
                     init: np.ndarray | None, *, family: str, max_iter: int,
                     compute_se: bool):
    """Fit intercept + one-hot groups for one row-sorted chunk by per-set Newton."""
    n, m = Y.shape
    a = design.n_groups
    s = np.exp(design.offset)
    st = _set_stats(design, Y, s)
    with np.errstate(divide="ignore"):
        theta = np.log(st.Sy / st.Ss[:, None])            # Poisson MLE per set (closed form)
    ok_genes = ~st.all_zero & ~st.pinned[-1]
    if family == "poisson":
        alpha = np.zeros(m)
        converged = ok_genes.copy()
        n_iter = np.ones(m, int)
    else:
        if alpha is None:
            dof = n - 1 - a
            a0 = np.clip(_set_mom(design, Y, s, theta, st, dof), 1e-8, 100.0)
            _set_newton(design, Y, s, theta, a0, st, min(max_iter, 10))
            alpha = 1.0 / _size_from_mom(_set_mom(design, Y, s, theta, st, dof), st.all_zero)
        elif init is not None:
            x0 = design.X[0, 0] * design.scales[0]
            start = init[:, :1].T * x0 + np.vstack([init[:, 1:].T, np.zeros((1, m))])
            theta = np.where(st.pinned | ~np.isfinite(start), theta, start)
        converged, n_iter = _set_newton(design, Y, s, theta, alpha, st, max_iter)
        converged &= ok_genes
    theta = _fill_pinned(theta, st)
    # deviance and Fisher information at the solution: one fused pass
    mu = _set_means(design, s, theta, st)
    eta = np.log(mu)
    ylogy = _sum_ylogy(Y)
    cst = _deviance_constant(Y, alpha, ylogy)
    if compute_se:
        w = mu / (1.0 + alpha * mu) if np.any(alpha > 0) else mu
        info = np.empty((a + 1, m))
        for k, r in enumerate(design.set_slices):
            w[r].sum(axis=0, out=info[k])
        del w
    dev = cst - 2.0 * _kernel_sums(Y, eta, mu, alpha)
    del mu, eta
    x0 = design.X[0, 0] * design.scales[0]              # the constant column's value
    coef = np.empty((m, 1 + a))
    coef[:, 0] = theta[-1] / x0
    coef[:, 1:] = (theta[:-1] - theta[-1]).T
    se = np.full((m, 1 + a), np.nan)
    if compute_se:
        with np.errstate(divide="ignore"):
            var = 1.0 / info
        se[:, 0] = np.sqrt(var[-1]) / abs(x0)
        se[:, 1:] = np.sqrt(var[:-1] + var[-1]).T
        se[:, 1:][st.pinned[:-1].T] = np.inf
        se[st.all_zero | st.pinned[-1]] = np.inf
    return coef, se, alpha, converged, dev, n_iter


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
            estimate_size: bool | None = None, compute_se: bool = True) -> GLMFit:
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
        alpha_all = np.broadcast_to(_alpha_from_size(size), (p,)).astype(float)
    else:
        alpha_all = np.zeros(p)
    check_nb_alpha(alpha_all)

    design = _Design.build(X, groups, n_groups, off)
    if sp.issparse(Y):
        Y = sp.csc_matrix(Y[design.order] if n_groups else Y)
    coef = np.zeros((p, q))
    se = np.full((p, q), np.nan)
    converged = np.zeros(p, bool)
    dev = np.zeros(p)
    n_iter = np.zeros(p, int)
    step = _gene_chunk_size(n, chunk_size, _FIT_CHUNK_BYTES)
    for start in range(0, p, step):
        stop = min(p, start + step)
        cols = slice(start, stop)
        if sp.issparse(Y):
            Yc = Y[:, start:stop].toarray().astype(float, copy=False)
        elif n_groups:
            Yc = np.asarray(Y[design.order, start:stop], dtype=float)
        else:
            Yc = np.array(Y[:, start:stop], dtype=float, order="C")
        al = None if estimate else alpha_all[cols]
        ini = None if init is None else init[cols]
        if design.saturated:
            c, s_, al, conv, dv, it = _saturated_chunk(
                design, Yc, al, ini, family=family, max_iter=max_iter, compute_se=compute_se)
            coef[cols], se[cols] = c, s_
        else:
            B, C, al, conv, dv, it, var_b, var_c = _schur_chunk(
                design, Yc, al, ini, max_iter=max_iter, tol=tol, ridge=ridge,
                compute_se=compute_se)
            coef[cols, :d] = B.T / design.scales
            coef[cols, d:] = C.T
            if compute_se:
                se[cols, :d] = np.sqrt(np.maximum(var_b, 0)) / design.scales
                se[cols, d:] = np.sqrt(np.maximum(var_c.T, 0))
        alpha_all[cols] = al
        converged[cols], dev[cols], n_iter[cols] = conv, dv, it
    size_out = np.where(alpha_all > 0, 1.0 / np.where(alpha_all > 0, alpha_all, 1), np.inf)
    if family == "nb" and not converged.all():
        logger.debug("fit_glm: %d of %d genes did not converge", int((~converged).sum()), p)
    return GLMFit(coef=coef, se=se, size=size_out, converged=converged, deviance=dev,
                  n_iter=n_iter, n_covariates=d, family=family)


def _iter_fitted_means(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
                       offset: np.ndarray, chunk_size: int | None = None):
    """Yield (cols, y, mu) chunks of observed counts and fitted means."""
    n, p = Y.shape
    step = _gene_chunk_size(n, chunk_size)
    X = np.asarray(X, float)
    if A is not None:
        A = np.asarray(A, float)
        if A.ndim == 1:
            A = A[:, None]
        if fit.coef.shape[1] == fit.n_covariates + A.shape[1]:
            pass
        elif fit.n_covariates == X.shape[1] + A.shape[1]:   # A was appended to X
            X, A = np.hstack([X, A]), None
    for start in range(0, p, step):
        cols = np.arange(start, min(p, start + step))
        eta = X @ fit.coef[cols, :fit.n_covariates].T + offset[:, None]
        if A is not None and fit.coef.shape[1] > fit.n_covariates:
            eta += A @ fit.coef[cols, fit.n_covariates:].T
        np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
        yield cols, _dense_columns(Y, cols), np.exp(eta, out=eta)


def mom_size(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
             offset: np.ndarray) -> np.ndarray:
    """Method-of-moments NB size per gene from fitted means (docs/math.md#nb-dispersion).

    alpha_j = sum_i [(y - mu)^2 - y] / max(mu^2, 1e-10) / (n - q), clipped to [1e-8, 100];
    size = 1/alpha (1 for genes without counts).
    """
    n, p = Y.shape
    q = fit.coef.shape[1]
    alpha = np.empty(p)
    nonzero = np.zeros(p, bool)
    off = np.zeros(n) if offset is None else np.asarray(offset, float).ravel()
    for cols, y, mu in _iter_fitted_means(Y, fit, X, A, off):
        alpha[cols] = _mom_alpha(y, mu, n - q)
        nonzero[cols] = (y > 0).any(axis=0)
    return _size_from_mom(alpha, ~nonzero)


def estimate_dispersion(Y, X: np.ndarray, A: np.ndarray | None = None,
                        offset: np.ndarray | None = None, max_iter: int = 50) -> np.ndarray:
    """NB size r_j per gene by the MoM recipe on design ``[X | A]``
    (docs/math.md#nb-dispersion)."""
    off = np.zeros(Y.shape[0]) if offset is None else np.asarray(offset, float)
    fit = fit_glm(Y, X, A, family="nb", size=None, offset=off, max_iter=max_iter,
                  compute_se=False)
    return fit.size


def glm_deviance_residuals(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None = None,
                           offset: np.ndarray | None = None) -> np.ndarray:
    """n x p deviance residuals of a fitted GLM."""
    n, p = Y.shape
    off = np.zeros(n) if offset is None else np.asarray(offset, float).ravel()
    out = np.empty((n, p))
    alpha = _alpha_from_size(fit.size)
    for cols, y, mu in _iter_fitted_means(Y, fit, X, A, off):
        out[:, cols] = deviance_residuals(y, mu, alpha[cols][None, :])
    return out
