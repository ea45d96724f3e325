"""Numerical passes of the GCATE factor model (the engine behind :mod:`causarray.gcate`).

Every pass streams the count matrix once, gene chunk by gene chunk, and never forms an
n x p temporary:

* :func:`fisher_pass` -- one safeguarded Fisher-scoring step of every gene's GLM on the
  design ``[X | U | A]`` (one-hot ``A`` eliminated through its Schur complement, exactly
  as in :mod:`causarray.glm`), *fused* with the accumulation of every cell's Fisher
  system for its factors ``u_i`` at the new loadings.  One epoch of the alternating
  algorithm is therefore a single pass over ``Y`` (the Gram matrices are formed in
  float32, the scores in float64, so the fixed point is unchanged);
* :func:`loglik_constants` -- the mean-free part of the log-likelihood, from the non-zero
  counts only;
* :func:`deviance_residual_svd` -- a randomized SVD of the deviance residuals of a GLM
  whose residual matrix is recomputed chunk by chunk in every power iteration instead of
  being stored (it would be an n x p array).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .engine import (
    ETA_MAX,
    ETA_MIN,
    GROUP_COEF_BOUND,
    Design,
    cap_step,
    covariance_diag,
    group_sums,
    halve_steps,
    kernel_sums,
    loglik_constant_terms,
    newton_step,
    newton_system,
    signed_root_deviance,
    sym_outer,
    working_weights,
)
from .engine.threads import gene_chunks, map_chunks, run_chunks
from .glm import GLMFit

#: bytes of one n x chunk float64 temporary in the fused passes (about ten are alive)
PASS_CHUNK_BYTES = 4 * 2**20


def pass_chunk_size(n: int, budget: int = PASS_CHUNK_BYTES) -> int:
    """Genes per chunk so that one n x chunk float64 temporary takes about ``budget`` bytes."""
    return int(max(32, min(2048, budget // (8 * max(n, 1)))))


def sorted_chunk(Y, order: np.ndarray | None, start: int, stop: int) -> np.ndarray:
    """Columns ``start:stop`` of ``Y`` (dense or CSC) as float64, rows permuted by ``order``."""
    if sp.issparse(Y):
        block = Y[:, start:stop].toarray()
        return np.asarray(block if order is None else block[order], dtype=float)
    if order is None:
        return np.asarray(Y[:, start:stop], dtype=float)
    return np.asarray(Y[order, start:stop], dtype=float)


# ----------------------------------------------------------------------------------
# log-likelihood constant
# ----------------------------------------------------------------------------------
def loglik_constants(Y, size: np.ndarray, chunk: int | None = None,
                     max_tabulated: int = 63) -> np.ndarray:
    """Per-gene sum of the log-likelihood terms that do not involve the mean.

    NB with size r: ``sum_i lgamma(y + r) - lgamma(r) - lgamma(y + 1) - y log r``;
    Poisson (r = inf): ``-sum_i lgamma(y + 1)``.  Both vanish at y = 0, so only the
    non-zero counts are visited, and counts up to ``max_tabulated`` are tallied per
    gene so that each (gene, count) term is evaluated once.
    """
    n, p = Y.shape
    size = np.broadcast_to(np.asarray(size, float), (p,))
    out = np.zeros(p)
    step = chunk or pass_chunk_size(n)
    K = max_tabulated + 1
    grid = np.arange(K, dtype=float)
    for start in range(0, p, step):
        stop = min(p, start + step)
        m = stop - start
        y = sorted_chunk(Y, None, start, stop)
        rows, cols = np.nonzero(y)
        v = y[rows, cols]
        r = size[start:stop]
        small = v < K
        tally = np.bincount(cols[small] * K + v[small].astype(np.int64),
                            minlength=m * K).reshape(m, K)
        out[start:stop] = (tally * loglik_constant_terms(grid[None, :], r[:, None])).sum(axis=1)
        if not small.all():
            big = ~small
            out[start:stop] += np.bincount(cols[big], minlength=m,
                                           weights=loglik_constant_terms(v[big], r[cols[big]]))
    return out


# ----------------------------------------------------------------------------------
# fused gene step + cell sums
# ----------------------------------------------------------------------------------
@dataclass
class PassResult:
    """What one :func:`fisher_pass` returns.

    Attributes
    ----------
    kernel : (p,) mean-dependent log-likelihood per gene at the new coefficients.
    H : (n, r(r+1)/2) or None -- packed Fisher information of every cell's factors at the
        new loadings (rows in the design's sorted order).
    g : (n, r) or None -- the matching scores ``sum_j gamma_j (y - mu)/(1 + alpha mu)``.
    var_b, var_c : inverse-Fisher variances (scaled covariates: p x q; groups: a x p) at
        the coefficients the step started from, when requested.
    n_halved : genes whose step had to be shortened.
    """

    kernel: np.ndarray
    H: np.ndarray | None = None
    g: np.ndarray | None = None
    var_b: np.ndarray | None = None
    var_c: np.ndarray | None = None
    n_halved: int = 0


@dataclass
class _PassDesign:
    """A design's dense blocks in the working precision of one pass."""

    design: Design
    XoG: np.ndarray          # [X | o | G] for the linear predictor
    XG: np.ndarray           # [X | G] for the scores
    dtype: type

    @classmethod
    def of(cls, design: Design, dtype: type) -> _PassDesign:
        return cls(design, design.XoG.astype(dtype, copy=False),
                   design.XG.astype(dtype, copy=False), dtype)

    def mean_at(self, B: np.ndarray, C: np.ndarray):
        """``(eta, mu)`` of a chunk at scaled coefficients ``B`` (q x m) and groups ``C``."""
        coef = np.vstack([B, np.ones((1, B.shape[1])), C]).astype(self.dtype)
        eta = self.XoG @ coef
        np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
        return eta, np.exp(eta)

    def gradient(self, resid: np.ndarray) -> np.ndarray:
        """Scores ``[X | G]' resid`` per gene (m x (q + a)), float64."""
        return (resid.T @ self.XG).astype(np.float64)


def _kernel(y: np.ndarray, eta: np.ndarray, mu: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-gene log-likelihood kernel (float64); ``eta`` is overwritten."""
    return kernel_sums(y, eta, mu, alpha).astype(np.float64)


def _safeguarded_update(pd_: _PassDesign, y: np.ndarray, alpha: np.ndarray, B0: np.ndarray,
                        C0: np.ndarray, db: np.ndarray, dc: np.ndarray, kernel0: np.ndarray):
    """Take the Newton step, halving it per gene until the log-likelihood does not drop.

    Step halving on minus the log-likelihood kernel
    (:func:`causarray.engine.newton.halve_steps`).  Returns ``(B, C, mu, kernel,
    n_halved)`` at the accepted coefficients; a gene whose step never helps keeps its old
    coefficients.  The tolerance of the comparison follows the working precision.
    """
    eps = np.finfo(pd_.dtype).eps
    slack = 1e-10 + 10 * eps * np.sqrt(y.shape[0]) * (1.0 + np.abs(kernel0))

    def objective(Bt, Ct, cols):
        yc, ac = (y, alpha) if cols is None else (y[:, cols], alpha[cols])
        eta, mu = pd_.mean_at(Bt, Ct)
        return mu, -_kernel(yc, eta, mu, ac)

    trial = halve_steps(objective, B0, C0, db, dc, -kernel0, slack)
    kern = -trial.f
    bad = np.flatnonzero(trial.stalled)
    if bad.size:                                    # no improvement: stay where we were
        _, trial.mu[:, bad] = pd_.mean_at(trial.B[:, bad], trial.C[:, bad])
        kern[bad] = kernel0[bad]
    return trial.B, trial.C, trial.mu, kern, int(np.count_nonzero(trial.step < 1.0))


def _cell_sums(y: np.ndarray, mu: np.ndarray, alpha: np.ndarray, Gm: np.ndarray):
    """One chunk's Fisher information (packed, float32) and score of every cell's factors."""
    t = np.multiply(mu, alpha)
    t += 1.0
    np.reciprocal(t, out=t)
    resid = np.subtract(y, mu)
    resid *= t
    g = resid @ Gm.astype(resid.dtype)
    del resid
    t *= mu                                         # Fisher weights mu / (1 + alpha mu)
    return t.astype(np.float32, copy=False) @ sym_outer(Gm).astype(np.float32), g


@dataclass
class _ChunkStep:
    """What the gene step of one chunk returns to :func:`fisher_pass`."""

    cols: slice
    kernel: np.ndarray
    n_halved: int
    var: tuple | None = None          # (var_b, var_c) at the starting coefficients
    cell: tuple | None = None         # (H, g): the chunk's share of the cells' systems


def _gene_step(Y, pd_: _PassDesign, B: np.ndarray, C: np.ndarray, alpha: np.ndarray,
               cols: slice, loadings: slice | None, gscale, compute_se: bool,
               ridge: float) -> _ChunkStep:
    """One safeguarded Fisher-scoring step of the genes ``cols`` (B, C updated in place)."""
    design, dtype = pd_.design, pd_.dtype
    a = design.n_groups
    # 1. the chunk's counts (rows sorted), pinned groups, means and kernel at the start
    y = sorted_chunk(Y, design.order, cols.start, cols.stop).astype(dtype, copy=False)
    al = alpha[cols].astype(dtype)
    pinned = group_sums(design, y) == 0 if a else np.zeros((0, y.shape[1]), bool)
    B0, C0 = B[:, cols], C[:, cols]
    C0[pinned] = -GROUP_COEF_BOUND
    eta, mu = pd_.mean_at(B0, C0)
    # 2. Fisher weights and scores (one fused pass), gradient and Newton system
    w, resid = working_weights(y, mu, al)
    kernel0 = _kernel(y, eta, mu, al)
    del eta, mu
    grad = pd_.gradient(resid)
    del resid
    system = newton_system(design, w, pinned, ridge, single=True)
    del w
    var = covariance_diag(system, pinned) if compute_se else None
    # 3. the step, capped, then halved until the log-likelihood does not drop
    db, dc = newton_step(system, grad, pinned)
    del system
    cap_step(db, dc)
    Bt, Ct, mu, kern, n_halved = _safeguarded_update(pd_, y, al, B0, C0, db, dc, kernel0)
    B[:, cols], C[:, cols] = Bt, Ct
    # 4. fused: the chunk's share of every cell's factor system at the new loadings
    cell = None
    if loadings is not None:
        cell = _cell_sums(y, mu, al, Bt[loadings].T * gscale)
    return _ChunkStep(cols, kern, n_halved, var, cell)


def fisher_pass(Y, design: Design, B: np.ndarray, C: np.ndarray, alpha: np.ndarray, *,
                loadings: slice | None = None, compute_se: bool = False,
                ridge: float = 1e-10, chunk: int | None = None,
                dtype: type = np.float32, threads: int | None = None) -> PassResult:
    """One Fisher-scoring step of every gene's GLM, fused with the cells' factor sums.

    Parameters
    ----------
    Y : (n, p) counts, dense or CSC, rows in the original order.
    design : the GLM design ``[X | U | A-dense]`` plus one-hot groups, rows sorted.
    B : (q, p) covariate coefficients in the design's scaled units; updated in place.
    C : (a, p) group coefficients; updated in place.
    alpha : (p,) NB dispersion 1/size (0 = Poisson).
    loadings : rows of ``B`` holding the factor loadings; when given, the Fisher system
        of every cell's factors at the *new* loadings is accumulated in the same pass.
    compute_se : also return the inverse-Fisher variances at the starting coefficients
        (from the same float32 Gram matrices: relative error ~1e-6, far below the
        sampling error of a standard error).
    ridge : relative damping of the Hessian diagonal.
    chunk : genes per chunk.
    dtype : working precision of the elementwise work and of the linear predictor
        (float32: half the memory traffic; the coefficients, the Newton systems and all
        sums over genes stay float64).
    threads : threads over the gene chunks (default: the process's BLAS threads;
        :mod:`causarray.engine.threads`).  The cells' sums are added in chunk order, so
        the result does not depend on it.

    Returns
    -------
    PassResult
    """
    n, p = Y.shape
    a = design.n_groups
    q = design.d
    step = chunk or pass_chunk_size(n)
    pd_ = _PassDesign.of(design, dtype)
    res = PassResult(kernel=np.empty(p))
    gscale = None
    if loadings is not None:
        r = loadings.stop - loadings.start
        res.H = np.zeros((n, r * (r + 1) // 2), dtype=np.float32)
        res.g = np.zeros((n, r))
        gscale = 1.0 / design.scales[loadings]
    if compute_se:
        res.var_b = np.empty((p, q))
        res.var_c = np.empty((a, p))

    def body(cols: slice) -> _ChunkStep:
        return _gene_step(Y, pd_, B, C, alpha, cols, loadings, gscale, compute_se, ridge)

    for out in map_chunks(body, gene_chunks(p, step), threads):
        res.kernel[out.cols] = out.kernel
        res.n_halved += out.n_halved
        if out.var is not None:
            res.var_b[out.cols], res.var_c[:, out.cols] = out.var
        if out.cell is not None:
            res.H += out.cell[0]
            res.g += out.cell[1]
    return res


# ----------------------------------------------------------------------------------
# initial factors: randomized SVD of streamed deviance residuals
# ----------------------------------------------------------------------------------
class _Residuals:
    """The deviance residuals of ``fit``, one gene chunk at a time: ``self(cols)``.

    Computed in float32 (they only seed the factor model); ``fit`` is a GLM on
    ``[X | A]`` whose coefficient columns follow ``[X | A]``.
    """

    def __init__(self, Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
                 offset: np.ndarray, chunk: int):
        n, p = Y.shape
        D = [np.asarray(X, float)]
        if A is not None and fit.coef.shape[1] > np.shape(X)[1]:   # [X | A] (groups or dense A)
            D.append(np.asarray(A, float).reshape(n, -1))
        D.append(np.asarray(offset, float).reshape(n, 1))
        self.Y = Y
        self.D32 = np.hstack(D).astype(np.float32)
        self.coef = np.hstack([fit.coef, np.ones((p, 1))]).astype(np.float32)
        self.alpha = np.broadcast_to(np.where(np.isfinite(fit.size), 1.0 / fit.size, 0.0), (p,))
        self.chunks = gene_chunks(p, chunk)

    def __call__(self, cols: slice) -> np.ndarray:
        eta = self.D32 @ self.coef[cols].T
        np.clip(eta, ETA_MIN, ETA_MAX, out=eta)
        y = sorted_chunk(self.Y, None, cols.start, cols.stop).astype(np.float32)
        return signed_root_deviance(y, np.exp(eta, out=eta),
                                    self.alpha[cols][None, :].astype(np.float32))


def deviance_residual_svd(Y, fit: GLMFit, X: np.ndarray, A: np.ndarray | None,
                          offset: np.ndarray, k: int, n_iter: int = 2, oversample: int = 10,
                          random_state: int = 0):
    """Top-``k`` left singular vectors and values of the deviance residuals of ``fit``.

    A randomized range finder (Halko, Martinsson & Tropp) with ``n_iter`` power
    iterations ``Q <- orth(R R' Q)``.  The n x p residual matrix is never stored: each of
    the ``n_iter + 2`` passes recomputes it chunk by chunk from the counts and the fitted
    means (``R_c`` gives both ``R_c' Q`` and its contribution ``R_c (R_c' Q)``).
    Returns ``(u (n x k), s (k,))``.
    """
    n, p = Y.shape
    kk = min(k + oversample, n, p)
    R = _Residuals(Y, fit, X, A, offset, pass_chunk_size(n))
    rng = np.random.default_rng(random_state)
    omega = rng.standard_normal((p, kk))

    def range_sketch(product) -> np.ndarray:
        """``sum_c product(cols_c, R_c)`` over the chunks, added in chunk order."""
        total = np.zeros((n, kk))
        for part in map_chunks(lambda cols: product(cols, R(cols)), R.chunks):
            total += part
        return total

    Q, _ = np.linalg.qr(range_sketch(lambda cols, Rc: Rc @ omega[cols]))
    for _ in range(n_iter):
        Q, _ = np.linalg.qr(range_sketch(lambda cols, Rc, Q=Q: Rc @ (Rc.T @ Q)))
    Bt = np.empty((p, kk))                                       # (Q' R)'

    def project(cols: slice) -> None:
        Bt[cols] = R(cols).T @ Q

    run_chunks(project, R.chunks)
    ub, s, _ = np.linalg.svd(Bt.T, full_matrices=False)
    return Q @ ub[:, :k], s[:k]


def group_treatment_coefs(Y, base, group: np.ndarray, a: int, alpha: np.ndarray,
                          n_steps: int = 4, start: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Each perturbation's log shift of each gene at fixed offsets (one-hot treatments).

    For the cells ``i`` of group ``k`` (``group[i] == k``; cells with ``group < 0`` are
    not used) the NB (``alpha > 0``) or Poisson model ::

        log mu_ij = base_ij + beta_jk,    y_ij ~ NB(mu_ij, 1 / alpha_j)

    has one parameter per (gene, group).  Its Fisher scoring starts at ``start`` or at
    the Poisson solution ``log(sum y / sum exp(base))`` (exact for Poisson) and takes
    ``n_steps`` steps, each capped at 1 in absolute value; ``beta`` is bounded by the
    engine's group coefficient bound (a group without counts in a gene sits at the lower
    bound).  Groups run on the pass's threads, each forming only its own rows.

    Parameters
    ----------
    Y : (n, p) counts (dense or sparse rows; anything whose ``Y[rows]`` gives them).
    base : (n, p) fixed linear predictor (log size factor, covariates, factors), or a
        function of row indices returning those rows of it.
    group : (n,) group of each cell, ``-1`` for cells that are not used.
    a : number of groups.
    alpha : (p,) NB dispersion ``1 / size`` (0 for Poisson).
    start : (p, a) starting values (e.g. the previous round's estimates).

    Returns
    -------
    beta, information : (p, a) arrays
        The estimates and their Fisher information ``sum_i mu_ij / (1 + alpha_j mu_ij)``.
    """
    p = alpha.shape[0]
    beta = np.zeros((p, a))
    info = np.zeros((p, a))
    rows_of = base if callable(base) else (lambda rows: base[rows])

    def fit_group(k: int) -> None:                     # writes column k
        rows = np.flatnonzero(group == k)
        if rows.size == 0:
            return
        block = Y[rows]
        y = block.toarray() if sp.issparse(block) else np.asarray(block, dtype=float)
        mu0 = np.exp(np.clip(rows_of(rows), ETA_MIN, ETA_MAX))
        if start is None:
            with np.errstate(divide="ignore"):
                b = np.log(y.sum(axis=0)) - np.log(mu0.sum(axis=0))
        else:
            b = np.array(start[:, k], dtype=float)
        b = np.clip(b, -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
        for _ in range(n_steps):                       # 1.-3. weights, score, capped step
            mu = mu0 * np.exp(b)
            t = 1.0 / (1.0 + alpha * mu)
            score = ((y - mu) * t).sum(axis=0)
            fisher = (mu * t).sum(axis=0)
            step = np.where(fisher > 0, score / np.maximum(fisher, 1e-300), 0.0)
            b = np.clip(b + np.clip(step, -1.0, 1.0), -GROUP_COEF_BOUND, GROUP_COEF_BOUND)
        mu = mu0 * np.exp(b)                           # 4. information at the estimate
        beta[:, k] = b
        info[:, k] = (mu / (1.0 + alpha * mu)).sum(axis=0)

    run_chunks(fit_group, range(a))                    # groups on the pass's threads
    return beta, info
